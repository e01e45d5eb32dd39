"""Caption-count throughput: `run_captions` on a local Ray over an embeddings folder of LAION-like captions.

    python bench/caption_counts.py --shards 40 --rows 10000 --partitions 16

Captions are drawn so that some repeat (a Zipf law over 40% of the rows, as stock-photo and
product captions do on LAION) in varied case, spacing and with trailing URLs; the rest are unique
sentences of 8-20 words (LAION's captions average about 10 words). Reported: rows per second of the
whole job (map + reduce, on this machine's CPUs), rows per second of one map task, and the size of
the counts written; docs/SCALING.md scales them to LAION-5B.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

WORDS = ("photo of a the red blue old new woman man dog cat house city street beach sunset vintage poster art "
         "painting portrait stock image white black background isolated vector illustration design logo "
         "wedding dress shoes car mountain river forest table chair kitchen modern classic").split()


def captions(rng: np.random.Generator, n: int, shared: list[str]) -> list[str]:
    out = []
    for _ in range(n):
        if rng.uniform() < 0.4:
            text = shared[min(len(shared) - 1, int(rng.zipf(1.3)) - 1)]
            variant = rng.integers(4)
            text = (text.upper() if variant == 1 else text + " https://example.com/p/" + str(rng.integers(1e6))
                    if variant == 2 else "  ".join(text.split()) if variant == 3 else text)
        else:
            text = " ".join(rng.choice(WORDS, rng.integers(8, 21)))
        out.append(text)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", type=int, default=40)
    ap.add_argument("--rows", type=int, default=10000, help="rows per shard (LAION tars hold 10,000)")
    ap.add_argument("--partitions", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=4)
    args = ap.parse_args()

    from pipeline.captions import run_captions
    from pipeline.config import CaptionsConfig
    from pipeline.layout import embeddings as emb
    from pipeline.layout.embeddings import EmbeddingsFolder, EmbeddingsInfo, ShardStats
    from pipeline.ray_util import connect
    from pipeline.storage import Folder

    rng = np.random.default_rng(0)
    shared = [" ".join(rng.choice(WORDS, rng.integers(4, 12))) for _ in range(5000)]
    ident = {"embedder": "synthetic", "model": "none", "weights": "none", "dim": 4, "preprocess": "none"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = EmbeddingsFolder(os.path.join(tmp, "emb"))
        folder.claim(EmbeddingsInfo(identity=ident))
        n = args.rows
        for s in range(args.shards):
            name = f"{s:06d}"
            table = emb.shard_table(name, 4, ident, {"key": [f"{name}{r:05d}" for r in range(n)],
                                                     "caption": captions(rng, n, shared), "status": ["ok"] * n},
                                    np.zeros((n, 4), np.float32), np.ones(n, bool))
            folder.write_shard(table, ShardStats(shard=name, seen=n, embedded=n))
        connect()
        out = os.path.join(tmp, "captions")
        t = time.time()
        info = run_captions(CaptionsConfig(embeddings=folder.url, output=out, partitions=args.partitions,
                                           group_size=args.group_size))
        wall = time.time() - t
        counts_bytes = sum(os.path.getsize(os.path.join(out, "counts", f)) for f in Folder(out).sub("counts").names())
        import ray

        print(json.dumps({
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Ray CPUs "
                       f"{ray.cluster_resources().get('CPU')}",
            "rows": info.rows, "distinct_captions": info.distinct_captions,
            "distinct_normalized": info.distinct_normalized, "seconds": round(wall, 2),
            "rows_per_s": round(info.rows / wall, 1), "rows_per_task_s": info.timings.get("rows_per_task_s"),
            "counts_bytes": counts_bytes, "counts_bytes_per_distinct": round(counts_bytes / info.distinct_captions, 1),
        }, indent=2))


if __name__ == "__main__":
    main()
