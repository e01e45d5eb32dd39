"""Embed-stage throughput: the whole pipeline against its parts, measured in one run.

For each embedder it reports
  * plain loop: read from the tars + decode + the embedder's preprocessing, one process
    (one core): the ceiling a decode-bound pipeline can reach per core;
  * bare forward: the model alone on already-preprocessed batches;
  * single-process ceiling: one core doing decode + preprocessing + model, from the two
    figures above (1 / (1/loop + 1/forward)): what a pipeline can reach per core when the
    model runs on the same CPUs as decoding;
  * pipeline: ``run_embed`` on a local Ray using every core, images/s overall and per core;
  * where the pipeline's time goes (summed over shards: read, decode+preprocess, waiting on
    the model, write).

    python bench/embed_throughput.py --images 2000 --embedders default,open_clip

The open_clip model is ViT-B-32 with random weights (timing only), saved to a checkpoint
and loaded through the same path as real weights.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from pipeline import synthetic_images as synthetic
from pipeline.config import EmbedConfig, EmbedderConfig
from pipeline.sample import laion_sample, write_tar


def make_corpus(folder: Path, images: int, per_tar: int, size: tuple[int, int]) -> list[str]:
    urls = []
    for shard in range((images + per_tar - 1) // per_tar):
        n = min(per_tar, images - shard * per_tar)
        samples = [laion_sample(f"{shard:05d}{i:04d}", synthetic.scene(shard * per_tar + i, size), "c", "u", quality=85)
                   for i in range(n)]
        url = str(folder / f"{shard:05d}.tar")
        write_tar(url, samples)
        urls.append(url)
    return urls


def plain_loop(tars: list[str], ecfg: EmbedderConfig) -> tuple[float, list[np.ndarray]]:
    """Read + decode + preprocess every image in one process: images/s and the pixels."""
    import io

    from PIL import Image

    from pipeline.embedders import build_preprocessor
    from pipeline.tars import iter_samples

    preprocess = build_preprocessor(ecfg)
    pixels = []
    t = time.perf_counter()
    for url in tars:
        for sample in iter_samples(url):
            pixels.append(preprocess(Image.open(io.BytesIO(sample.image()[1].data))))
    return len(pixels) / (time.perf_counter() - t), pixels


def bare_forward(ecfg: EmbedderConfig, pixels: list[np.ndarray], batch_size: int) -> float:
    from pipeline.embedders import build_embedder

    emb = build_embedder(ecfg)
    batches = [np.stack(pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)]
    emb.embed(batches[0])  # warm-up
    t = time.perf_counter()
    for b in batches:
        emb.embed(b)
    return len(pixels) / (time.perf_counter() - t)


def pipeline_run(tars: list[str], out: Path, ecfg: EmbedderConfig, batch_size: int, cpus_per_actor: float) -> dict:
    from pipeline.embed import run_embed

    from pipeline.layout.embeddings import EmbeddingsFolder

    cfg = EmbedConfig(input=tars, output=str(out), embedder=ecfg, batch_size=batch_size, cpus_per_actor=cpus_per_actor)
    s = run_embed(cfg)
    timings = Counter()
    folder = EmbeddingsFolder(str(out))
    for shard in folder.complete_shards():
        timings.update(folder.read_stats(shard).timings)
    return {"images_per_s": s.images_per_s, "images": s.images, "seconds": s.seconds,
            "time_split_s": {k: round(v, 2) for k, v in timings.items()}}


def open_clip_checkpoint(folder: Path) -> EmbedderConfig:
    import open_clip
    import torch

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32")
    path = folder / "vit-b-32-random.pt"
    torch.save(model.state_dict(), path)
    return EmbedderConfig(name="open_clip", model="ViT-B-32", checkpoint=str(path), device="cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--clip-images", type=int, default=256, help="fewer for ViT-B-32: it is slow on CPU")
    ap.add_argument("--per-tar", type=int, default=250)
    ap.add_argument("--width", type=int, default=400)
    ap.add_argument("--height", type=int, default=320)
    ap.add_argument("--embedders", default="default,open_clip")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--cpus-per-actor", type=float, default=1.0)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    from pipeline.ray_util import connect

    cores = os.cpu_count() or 1
    ray = connect(None, num_cpus=cores, object_store_memory=1 << 30)
    results = {"machine": f"{platform.processor() or platform.machine()}, {cores} cores, {platform.python_version()}"}
    with tempfile.TemporaryDirectory(prefix="bench-embed-") as tmp:
        tmp = Path(tmp)
        for name in args.embedders.split(","):
            n = args.images if name == "default" else args.clip_images
            ecfg = EmbedderConfig(name="default") if name == "default" else open_clip_checkpoint(tmp)
            tars = make_corpus(tmp / f"tars-{name}", n, min(args.per_tar, n), (args.width, args.height))
            loop_rate, pixels = plain_loop(tars, ecfg)
            model_rate = bare_forward(ecfg, pixels, args.batch_size)
            # Warm-up: Ray workers import the libraries once; a LAION-scale run amortises that.
            pipeline_run(tars[:1], tmp / f"warm-{name}", ecfg, args.batch_size, args.cpus_per_actor)
            run = pipeline_run(tars, tmp / f"emb-{name}", ecfg, args.batch_size, args.cpus_per_actor)
            per_core = run["images_per_s"] / cores
            ceiling = 1 / (1 / loop_rate + 1 / model_rate)
            results[name] = {
                "images": n,
                "plain_decode_preprocess_per_core": round(loop_rate, 1),
                "bare_forward": round(model_rate, 1),
                "pipeline": round(run["images_per_s"], 1),
                "pipeline_per_core": round(per_core, 1),
                "pipeline_per_core_vs_plain_loop": round(per_core / loop_rate, 3),
                "single_process_ceiling_per_core": round(ceiling, 1),
                "pipeline_per_core_vs_ceiling": round(per_core / ceiling, 3),
                "pipeline_vs_bare_forward": round(run["images_per_s"] / model_rate, 3),
                "time_split_s": run["time_split_s"],
            }
            print(json.dumps({name: results[name]}, indent=2), flush=True)
    ray.shutdown()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
