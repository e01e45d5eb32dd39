"""Where a search's time goes: N generated images (regions, verification, nL2, captions on)
against a corpus with pixels, time per stage and the driver's peak RSS.

    python bench/search_stages.py [--corpus-size 20000] [--filler 0] [--factory F] [--queries 1000]
                                  [--workdir DIR] [--keep]

It runs the demo's chain (pipeline.demo: corpus tars -> embed -> captions -> index -> search) at
the sizes given: the queries are planted copies of every edit, pasted objects and novel images,
and the baseline samples 200 corpus images searched like them. ``--filler`` grows the corpus
with flat-shape images that are ~10x cheaper to draw than the scenes; a 1M corpus is
``--corpus-size 20000 --filler 980000 --factory OPQ128_256,IVF4096,PQ128x4fsr``. It prints run.json's
``stage_seconds`` per part (query batches, baseline) with seconds per query, the search's wall
time and the driver's peak RSS, then removes its folder unless ``--keep``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

for var, value in (("RAY_USAGE_STATS_ENABLED", "0"), ("RAY_AUTH_MODE", "disabled"),
                   ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0"), ("OMP_WAIT_POLICY", "PASSIVE")):
    os.environ.setdefault(var, value)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus-size", type=int, default=20_000)
    ap.add_argument("--queries", type=int, default=1000, help="generated images: copies, pasted objects, novel")
    ap.add_argument("--filler", type=int, default=0, help="flat-shape corpus images added after the scenes")
    ap.add_argument("--factory", default="", help="faiss factory; empty = the demo's plain IVF-PQ")
    ap.add_argument("--baseline-size", type=int, default=200)
    ap.add_argument("--workdir", default="/tmp/replica-search-stages")
    ap.add_argument("--keep", action="store_true", help="keep the corpus, index and results")
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args()
    from pipeline import synthetic_images as synthetic
    from pipeline.demo import DemoConfig, run_demo
    from pipeline.layout.runs import RunFolder
    from pipeline.progress import PlainProgress

    novel, pasted = round(0.09 * args.queries), round(0.1 * args.queries)
    per_edit = (args.queries - novel - pasted) // len(synthetic.EDITS)
    novel = args.queries - pasted - per_edit * len(synthetic.EDITS)
    shutil.rmtree(args.workdir, ignore_errors=True)
    cfg = DemoConfig(workdir=args.workdir, corpus_size=args.corpus_size, copies_per_edit=per_edit, pasted=pasted,
                     novel=novel, baseline_size=args.baseline_size,
                     filler_size=args.filler, index_factory=args.factory)
    t = time.perf_counter()
    out = run_demo(cfg, PlainProgress(sys.stderr, interval=60))
    chain_s = time.perf_counter() - t
    run = RunFolder(os.path.join(args.workdir, "results", "run_id=demo")).read_record()
    figures = {
        "corpus": args.corpus_size + args.filler, "filler": args.filler, "queries": run.queries,
        "baseline": args.baseline_size,
        "chain_s": round(chain_s, 1), "search_s": run.seconds,
        "driver_peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "stage_seconds": run.stage_seconds,
        "per_query_ms": {k: round(1000 * v / run.queries, 1) for k, v in run.stage_seconds.get("queries", {}).items()},
        "recall_at_1": out["scores"]["recall_at_1"],
        "index": {k: run.index.get(k) for k in ("factory", "nprobe", "rerank_depth")},
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
