"""Peak memory of one decode task on a hostile tar: a 2 GB member and ten 12,000 x 12,000 JPEGs.

    python bench/decode_memory.py                 # builds the tar (about 2.2 GB) under bench/out/
    python bench/decode_memory.py --keep          # keep the tar for another run

Runs what the embed stage's decode task runs (``iter_samples`` + ``row_for`` with an embedder's
preprocessing) in a fresh process per embedder and reports that process's own peak RSS
(``VmHWM`` of /proc/self/status: ``ru_maxrss`` would carry the parent's peak across exec), before
and after reading the tar. The target is <= 1.5 GB.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.testing.faults import ZeroStream  # noqa: E402

BIG_MEMBER = 2 << 30
SIDE = 12_000


def big_jpeg(seed: int) -> bytes:
    """A 12,000 x 12,000 photograph-like JPEG (a smooth gradient with texture), built in strips."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (SIDE, SIDE))
    for y in range(0, SIDE, 1000):
        yy, xx = np.mgrid[y:y + 1000, 0:SIDE].astype(np.float32)
        strip = np.stack([(xx / SIDE * 255), (yy / SIDE * 255), ((xx + yy) % 512) / 2], axis=-1)
        strip += rng.normal(0, 8, strip.shape).astype(np.float32)
        image.paste(Image.fromarray(np.clip(strip, 0, 255).astype(np.uint8)), (0, y))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def build(path: Path) -> None:
    with tarfile.open(path, "w") as tf:
        info = tarfile.TarInfo("huge-000.jpg")
        info.size = BIG_MEMBER
        tf.addfile(info, ZeroStream(BIG_MEMBER))
        for i in range(10):
            data = big_jpeg(i)
            info = tarfile.TarInfo(f"big-{i:03d}.jpg")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
            print(f"  JPEG {i + 1}/10: {len(data) / 2**20:.1f} MiB", flush=True)


def peak_rss_mib() -> float:
    """This process's own peak resident set, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(tar: str, embedder: str) -> dict:
    """In this (fresh) process: decode the tar as the decode task does; peak RSS in MiB."""
    from pipeline.config import EmbedderConfig
    from pipeline.embed import row_for
    from pipeline.embedders import build_preprocessor
    from pipeline.tars import MAX_MEMBER_BYTES, TarReadResult, iter_samples

    # sscd's preprocessing decodes every image at full size before resizing (no weights needed for it)
    preprocess = build_preprocessor(EmbedderConfig(name="default" if embedder == "default" else "sscd"))
    before = peak_rss_mib()
    read = TarReadResult()
    statuses = []
    for sample in iter_samples(tar, result=read, max_member_bytes=MAX_MEMBER_BYTES):
        row, _ = row_for(sample, preprocess, MAX_MEMBER_BYTES)
        statuses.append(row.status)
    peak = peak_rss_mib()
    return {"embedder_preprocessing": embedder, "rows": len(statuses), "statuses": statuses,
            "skipped": dict(read.skipped), "peak_rss_mib_before": round(before, 1), "peak_rss_mib": round(peak, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tar", default=str(ROOT / "bench" / "out" / "hostile-memory.tar"))
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # internal: run one measurement in this process
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.tar, args.measure)))
        return
    tar = Path(args.tar)
    if not tar.exists():
        tar.parent.mkdir(parents=True, exist_ok=True)
        print(f"building {tar} ...", flush=True)
        build(tar)
    results = []
    for embedder in ("default", "sscd"):
        r = subprocess.run([sys.executable, __file__, "--tar", str(tar), "--measure", embedder],
                           capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        results.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(json.dumps({k: v for k, v in results[-1].items() if k != "statuses"}), flush=True)
    out = {"tar_bytes": tar.stat().st_size, "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    if not args.keep:
        tar.unlink()


if __name__ == "__main__":
    main()
