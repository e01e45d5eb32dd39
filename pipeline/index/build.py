"""train -> add -> merge in one call: what `replica index build` and jobs/build_index.py run."""
from __future__ import annotations

import time
from typing import Any, Callable

from pipeline.config import IndexConfig
from pipeline.index.add import run_add
from pipeline.index.merge import run_merge
from pipeline.index.train import run_train, validate

Progress = Callable[[str, int, int], None]


def run_build(cfg: IndexConfig, *, use_ray: bool = True, log: Callable[[str], None] = print,
              on_progress: Progress | None = None) -> dict[str, Any]:
    """Train (once), add every shard not yet added, merge new parts; returns the manifest
    plus ``timings`` (seconds per step). Every step is idempotent, so rerunning resumes."""
    validate(cfg)
    timings = {}
    t = time.time()
    run_train(cfg, log=log, on_progress=on_progress)
    timings["train"] = time.time() - t
    t = time.time()
    run_add(cfg, use_ray=use_ray, log=log, on_progress=on_progress)
    timings["add"] = time.time() - t
    t = time.time()
    manifest = run_merge(cfg, use_ray=use_ray, log=log, on_progress=on_progress)
    timings["merge"] = time.time() - t
    return {**manifest, "timings": {k: round(v, 3) for k, v in timings.items()}}
