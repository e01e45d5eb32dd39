"""Ray job entrypoint for the caption counts (how many training images carry each caption).

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/captions.py --embeddings s3://bucket/embeddings --output s3://bucket/captions \
            --partitions 1024 --group-size 100

Takes exactly the flags of ``replica captions`` (or a config file with --config). Rerunning it
after a failure, or after new shards were embedded, counts only the shards not counted yet.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir holds pipeline/

from pipeline.cli import app  # noqa: E402

if __name__ == "__main__":
    app(["captions", *sys.argv[1:]])
