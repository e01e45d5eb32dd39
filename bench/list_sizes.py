"""Time of reading one part's list sizes at LAION's list count (the in-RAM merge reads them for
every part it merges: pipeline.index.merge.list_sizes).

    python bench/list_sizes.py [--nlist 1048576] [--vectors 5000]

A fast-scan IVF part over ``--nlist`` lists (random centroids: only the list count matters) gets
``--vectors`` vectors; the script prints the seconds ``list_sizes`` takes on one thread.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nlist", type=int, default=1 << 20)
    ap.add_argument("--vectors", type=int, default=5000)
    ap.add_argument("--dim", type=int, default=64)
    args = ap.parse_args()
    import faiss
    import numpy as np

    from pipeline.index.merge import list_sizes

    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(0)
    quantizer = faiss.IndexFlatIP(args.dim)
    quantizer.add(rng.standard_normal((args.nlist, args.dim)).astype(np.float32))
    part = faiss.IndexIVFPQFastScan(quantizer, args.dim, args.nlist, args.dim // 2, 4, faiss.METRIC_INNER_PRODUCT)
    x = rng.standard_normal((max(args.vectors, 4096), args.dim)).astype(np.float32)
    part.pq.train(x)
    part.is_trained = True
    part.add(x[: args.vectors])
    t = time.perf_counter()
    sizes = list_sizes(part.invlists)
    print(f"list_sizes over {args.nlist:,} lists ({int(sizes.sum()):,} entries): {time.perf_counter() - t:.3f} s")


if __name__ == "__main__":
    main()
