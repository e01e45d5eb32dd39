"""Ray job entrypoint for the embed stage.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/embed.py --input 's3://bucket/laion/{00000..00099}.tar' --output s3://bucket/embeddings

Takes exactly the flags of ``replica embed``; runs on the cluster the job was submitted to.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir holds pipeline/

from pipeline.cli import app  # noqa: E402

if __name__ == "__main__":
    app(["embed", *sys.argv[1:]])
