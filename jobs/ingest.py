"""Ray job entrypoint for the ingest stage: URL lists -> WebDataset tars, by img2dataset.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/ingest.py --input 's3://bucket/laion2B-en/*.parquet' --output s3://bucket/laion/tars \
            --url-column URL --caption-column TEXT

Takes exactly the flags of ``replica ingest``; each shard is a Ray task of the cluster the job
was submitted to. Rerunning resumes; new URL lists under the input get new shards.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir holds pipeline/

from pipeline.cli import app  # noqa: E402

if __name__ == "__main__":
    app(["ingest", *sys.argv[1:]])
