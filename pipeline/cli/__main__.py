"""`python -m pipeline.cli`: the replica command line."""
from pipeline.cli import main

main()
