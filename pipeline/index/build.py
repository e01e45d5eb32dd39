"""train -> add -> merge in one call: what `replica index build` and jobs/build_index.py run."""
from __future__ import annotations

import time
from dataclasses import dataclass

from pipeline.config import IndexConfig
from pipeline.index.add import run_add
from pipeline.index.merge import run_merge
from pipeline.index.plan import plan_index
from pipeline.index.train import run_train
from pipeline.index.tune import run_tune
from pipeline.layout.index import Manifest
from pipeline.progress import NullProgress, Progress


@dataclass
class BuildResult:
    manifest: Manifest
    #: seconds per step
    timings: dict[str, float]


def run_build(cfg: IndexConfig, progress: Progress | None = None, *, use_ray: bool = True) -> BuildResult:
    """Train (once), add every shard not yet added, merge new parts, tune when the index is new or
    grew past ``retune_growth``. Every step is idempotent, so rerunning resumes."""
    progress = progress or NullProgress()
    plan_index(cfg)
    timings = {}
    t = time.time()
    run_train(cfg, progress)
    timings["train"] = round(time.time() - t, 3)
    t = time.time()
    run_add(cfg, progress, use_ray=use_ray)
    timings["add"] = round(time.time() - t, 3)
    t = time.time()
    manifest = run_merge(cfg, progress, use_ray=use_ray)
    timings["merge"] = round(time.time() - t, 3)
    if cfg.tune:
        t = time.time()
        run_tune(cfg, progress, use_ray=use_ray)
        manifest = plan_index(cfg).index.read_manifest()
        timings["tune"] = round(time.time() - t, 3)
    return BuildResult(manifest, timings)
