"""Ingest-stage throughput: img2dataset through `run_ingest` against a local HTTP server.

    python bench/ingest_throughput.py --urls 2000 --latency 0.2

The server (pipeline/testing/image_server.py) runs in this process on 127.0.0.1 and answers each
image after ``--latency`` seconds (a web server's response time), ``--dead`` of the URLs with a
404. Images are procedural 640x480 JPEG scenes (quality 92), stored at img2dataset's keep_ratio
288 (384x288). Reported: URLs/s, stored images/s and MB/s written by the whole stage on a local
Ray, and the CPU ceiling of img2dataset's resizer alone (decode + resize + encode, one core).
The server shares the machine's cores with the stage, so the figures are a lower bound.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def resize_ceiling(server, n: int = 200) -> float:
    """Images per second one core resizes with img2dataset's resizer, the stage's settings."""
    from pipeline.config import IngestConfig
    from pipeline.ingest import img2dataset

    cfg = IngestConfig()
    _, _, resizer, _ = img2dataset()
    r = resizer.Resizer(image_size=cfg.image_size, resize_mode=cfg.resize_mode,
                        resize_only_if_bigger=cfg.resize_only_if_bigger, encode_quality=cfg.encode_quality,
                        encode_format=cfg.encode_format, skip_reencode=cfg.skip_reencode)
    images = [server.image(i) for i in range(20)]
    t = time.time()
    for i in range(n):
        r(io.BytesIO(images[i % len(images)]))
    return n / (time.time() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--urls", type=int, default=2000)
    ap.add_argument("--per-shard", type=int, default=500)
    ap.add_argument("--threads", type=int, default=64)
    ap.add_argument("--latency", type=float, default=0.2, help="seconds before each image answer")
    ap.add_argument("--dead", type=float, default=0.1, help="share of URLs answering 404")
    ap.add_argument("--cpus", type=int, default=os.cpu_count())
    args = ap.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from pipeline.config import IngestConfig
    from pipeline.ingest import run_ingest
    from pipeline.testing.image_server import ImageServer

    work = tempfile.mkdtemp(prefix="bench-ingest-")
    ray.init(num_cpus=args.cpus, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="rb-", dir="/tmp"))
    with ImageServer(ok_delay_s=args.latency) as server:
        for i in range(args.urls):  # drawn before timing: the server's own cost is not the stage's
            server.image(i)
        dead = int(args.urls * args.dead)
        urls = [server.url("missing" if i < dead else "slowok", i) for i in range(args.urls)]
        pq.write_table(pa.table({"url": urls, "caption": [f"caption {i}" for i in range(len(urls))]}),
                       f"{work}/urls.parquet")
        # warm-up: one small list, so the Ray workers have imported img2dataset (once per worker at scale)
        pq.write_table(pa.table({"url": [server.url("img", 0)], "caption": ["warm"]}), f"{work}/warm.parquet")
        run_ingest(IngestConfig(input=[f"{work}/warm.parquet"], output=f"{work}/warm"))
        cfg = IngestConfig(input=[f"{work}/urls.parquet"], output=f"{work}/tars", samples_per_shard=args.per_shard,
                           threads=args.threads, max_failed_fraction=1.0)
        s = run_ingest(cfg)
        ceiling = resize_ceiling(server)
    out = {"machine": f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}",
           "urls": s.urls, "stored": s.downloaded, "failed": s.failed, "shards": s.shards_done,
           "latency_s": args.latency, "threads": args.threads, "seconds": round(s.seconds, 2),
           "urls_per_s": round(s.urls_per_s, 1), "images_per_s": round(s.images_per_s, 1),
           "mb_per_s_written": round(s.bytes_per_s / 1e6, 2), "kb_per_image": round(s.bytes / max(1, s.downloaded) / 1e3, 1),
           "resize_ceiling_img_per_s_per_core": round(ceiling, 1)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
