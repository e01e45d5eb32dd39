"""Ray job entrypoint for the search stage (and its report).

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/search.py --queries s3://bucket/generated/ --index s3://bucket/index \
            --output s3://bucket/results --subset s3://bucket/laion-aesthetics-6plus.parquet

Takes exactly the flags of ``replica search``.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir holds pipeline/

from pipeline.cli import app  # noqa: E402

if __name__ == "__main__":
    app(["search", *sys.argv[1:]])
