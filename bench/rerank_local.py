"""Exact rescoring in a shard actor: fp16 side files on local disk, at corpus scale.

    .venv/bin/python bench/rerank_local.py --vectors 10000000 --dim 512 --queries 1000 --depth 800

Writes ``--vectors`` random fp16 vectors as side files in the index layout
(``vectors/{number:09d}.f16``, 10,000 rows each) under ``--dir``, then times what a shard actor
does for each query: fetch the stored vectors of ``--depth`` candidate ids and score them exactly
(``pipeline.index.serve.rescore`` over ``SideFileVectors``). Candidates are drawn uniformly over
the corpus, like ANN candidates of a corpus stored in random order. Queries go in batches of
``--batch`` (the search sends a batch of queries to each shard actor). Reports milliseconds per
query and per 1,000 candidates (median of ``--passes`` passes over different candidates; each
pass maps the files afresh unless ``--warm``), then removes the files unless ``--keep``. One
thread (``OMP_NUM_THREADS=1``) unless threading is measured.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.index.registry import encode_ids  # noqa: E402
from pipeline.index.rerank import SideFileVectors, widen  # noqa: E402
from pipeline.index.serve import rescore  # noqa: E402
from pipeline.layout.index import vectors_name  # noqa: E402
from pipeline.storage import Folder  # noqa: E402

ROWS = 10_000


def write_side_files(folder: Path, vectors: int, dim: int) -> int:
    """Random fp16 side files, ROWS rows each; files already there (a resumed run) are kept."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = (vectors + ROWS - 1) // ROWS
    rng = np.random.default_rng(0)
    for s in range(shards):
        path = folder / vectors_name(s)
        if path.exists() and path.stat().st_size == ROWS * dim * 2:
            continue
        block = rng.standard_normal((ROWS, dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        tmp = path.with_suffix(".tmp")
        block.astype(np.float16).tofile(tmp)
        os.replace(tmp, path)
        if s % 100 == 0:
            print(f"side files: {s + 1}/{shards}", flush=True)
    return shards


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vectors", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--depth", type=int, default=800, help="candidates rescored per query")
    ap.add_argument("--batch", type=int, default=1000, help="queries sent to the shard actor at once")
    ap.add_argument("--dir", default="/tmp/replica-rerank-local")
    ap.add_argument("--passes", type=int, default=3, help="passes over fresh candidates; the median is reported")
    ap.add_argument("--warm", action="store_true",
                    help="keep one source mapped across passes, as a serving shard actor does (default: remap each pass)")
    ap.add_argument("--keep", action="store_true", help="leave the side files for another run")
    ap.add_argument("--out", default="bench/out/rerank_local.json")
    args = ap.parse_args()

    folder = Path(args.dir) / "vectors"
    t = time.perf_counter()
    shards = write_side_files(folder, args.vectors, args.dim)
    write_s = time.perf_counter() - t
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((args.queries, args.dim), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    widen(np.zeros((1, args.dim), np.float16))  # its lazy import (torch) is a serving actor's start-up cost
    passes = []
    source = SideFileVectors(Folder(str(folder)), args.dim)
    for _ in range(args.passes):
        cand = [encode_ids(rng.integers(0, shards, args.depth), rng.integers(0, ROWS, args.depth))
                for _ in range(args.queries)]
        if not args.warm:
            source = SideFileVectors(Folder(str(folder)), args.dim)
        t = time.perf_counter()
        for lo in range(0, args.queries, args.batch):
            hi = min(lo + args.batch, args.queries)
            rescore(queries[lo:hi], np.arange(hi - lo), cand[lo:hi], source.fetch)
        passes.append(time.perf_counter() - t)
    seconds = float(np.median(passes))
    result = {
        "vectors": shards * ROWS, "dim": args.dim, "queries": args.queries, "depth": args.depth,
        "batch": args.batch, "warm": args.warm, "side_file_gb": round(shards * ROWS * args.dim * 2 / 1e9, 2),
        "write_seconds": round(write_s, 1), "pass_seconds": [round(p, 3) for p in passes],
        "ms_per_query": round(seconds / args.queries * 1000, 3),
        "ms_per_1000_candidates": round(seconds / (args.queries * args.depth) * 1e6, 3),
        "rescored_queries_per_s_per_core": round(args.queries / seconds, 1),
        "loadavg": os.getloadavg(),
    }
    print(json.dumps(result), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()
