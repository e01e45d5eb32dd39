"""Ray job entrypoint for a scheduled run: embed -> index -> search -> report from one config.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/pipeline.py --config infra/pipeline.example.yaml

The config has three sections, ``embed``, ``index`` and ``search``, with the same fields as
the stages' own configs (see docs/CONFIG.md). Every stage resumes: a rerun after a lost node
skips complete embedding shards and index parts, and only redoes what is missing. A run with
no ``search.run_id`` is named by its UTC start time, so each scheduled run keeps its results.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir holds pipeline/

from pipeline.cli import app  # noqa: E402

if __name__ == "__main__":
    app(["pipeline", *sys.argv[1:]])
