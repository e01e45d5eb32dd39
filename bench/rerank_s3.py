"""Exact-rerank fetch cost on object storage: fp16 side files read by ranged GETs.

    .venv/bin/python bench/rerank_s3.py --vectors 200000 --dim 768 --candidates 1000 --out bench/out/rerank_s3.json

Writes side files in the index layout (``vectors/{number:09d}.f16``, 10,000 rows each) to a local
S3 server (moto, 127.0.0.1), then fetches the vectors of ``--candidates`` random ids the way the
search's fallback path does (``SideFileVectors``: one ranged GET per run of nearby rows, sent in
one batched ``cat_ranges`` call) and the same from local disk. Reports seconds, requests and
bytes per 1,000 candidates (median of 3 draws). The local server has no network latency: the
figure is the client's per-request cost; docs/SCALING.md adds real S3's first-byte latency.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.index.registry import encode_ids  # noqa: E402
from pipeline.index.rerank import SideFileVectors  # noqa: E402
from pipeline.layout.index import vectors_name  # noqa: E402
from pipeline.storage import Folder, Storage  # noqa: E402

ROWS = 10_000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vectors", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--candidates", type=int, default=1000)
    ap.add_argument("--out", default="bench/out/rerank_s3.json")
    args = ap.parse_args()

    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="x",
                 aws_secret_access_key="x").create_bucket(Bucket="bench")
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")  # the local server takes any credentials
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    storage = Storage(endpoint_url=endpoint, region="us-east-1")
    local_dir = Path("/tmp/replica-rerank-s3/vectors")
    local_dir.mkdir(parents=True, exist_ok=True)
    remote, local = Folder("s3://bench/index/vectors", storage), Folder(str(local_dir))
    shards = (args.vectors + ROWS - 1) // ROWS
    rng = np.random.default_rng(0)
    for s in range(shards):
        data = rng.standard_normal((ROWS, args.dim)).astype(np.float16).tobytes()
        remote.write_bytes(vectors_name(s), data)
        local.write_bytes(vectors_name(s), data)
    result = {"vectors": shards * ROWS, "dim": args.dim, "candidates": args.candidates}
    for name, folder in (("local_s3_server", remote), ("local_disk", local)):
        times, requests, nbytes = [], [], []
        for draw in range(3):
            numbers = rng.integers(0, shards, args.candidates)
            rows = rng.integers(0, ROWS, args.candidates)
            ids = np.sort(np.array([encode_ids(int(n), np.array([r]))[0] for n, r in zip(numbers, rows)]))
            src = SideFileVectors(folder, args.dim)
            t = time.perf_counter()
            src.fetch(ids)
            times.append(time.perf_counter() - t)
            requests.append(src.requests)
            nbytes.append(src.bytes_read)
        per = 1000 / args.candidates
        result[name] = {"seconds_per_1000": round(float(np.median(times)) * per, 4),
                        "requests_per_1000": round(float(np.median(requests)) * per),
                        "bytes_per_1000": round(float(np.median(nbytes)) * per)}
        print(name, json.dumps(result[name]), flush=True)
    server.stop()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
