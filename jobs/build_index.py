"""Ray job entrypoint for the index: train (once) -> add (resumable) -> merge.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/build_index.py --embeddings s3://bucket/embeddings --index s3://bucket/index \
            --memory-budget-gb 450 --shard-memory-gb 48 --group-size 100

Takes exactly the flags of ``replica index build`` (or a config file with --config). The
job connects to the cluster it runs on (RAY_ADDRESS); rerunning it after a failure resumes.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir holds pipeline/

from pipeline.cli import app  # noqa: E402

if __name__ == "__main__":
    app(["index", "build", *sys.argv[1:]])
