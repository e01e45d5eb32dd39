"""Write small LAION-like WebDataset tars (img2dataset's layout) from procedural images.

Used by the README's first command, the tests and the demo, so nothing has to be downloaded.
"""
from __future__ import annotations

import io
import json
import tarfile
from typing import Callable, Iterable

from PIL import Image

from pipeline import synthetic_images as synthetic
from pipeline.storage import Storage, atomic_output, join


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def sample_key(shard: int, index: int) -> str:
    """img2dataset's key: shard number then index inside the shard, 9 digits."""
    return f"{shard:05d}{index:04d}"


def add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # reproducible bytes
    tf.addfile(info, io.BytesIO(data))


def write_tar(url: str, samples: Iterable[tuple[str, dict[str, bytes]]], storage: Storage | None = None) -> None:
    """Write ``(key, {ext: bytes})`` samples to a tar at ``url`` (published atomically)."""
    with atomic_output(url, storage) as f, tarfile.open(fileobj=f, mode="w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                add_member(tf, f"{key}.{ext}", data)


def laion_sample(key: str, image: Image.Image, caption: str, url: str, quality: int = 90) -> tuple[str, dict[str, bytes]]:
    meta = {"key": key, "url": url, "caption": caption, "status": "success",
            "width": image.width, "height": image.height}
    return key, {"jpg": jpeg_bytes(image, quality), "txt": caption.encode(), "json": json.dumps(meta).encode()}


def make_sample_tars(
    output: str,
    tars: int = 4,
    per_tar: int = 100,
    seed: int = 0,
    storage: Storage | None = None,
    image_for: Callable[[int], Image.Image] | None = None,
) -> list[str]:
    """``tars`` tars of ``per_tar`` procedural images each; returns their URLs."""
    image_for = image_for or (lambda s: synthetic.scene(s))
    urls = []
    for shard in range(tars):
        samples = []
        for i in range(per_tar):
            s = seed + shard * per_tar + i
            key = sample_key(shard, i)
            samples.append(laion_sample(key, image_for(s), synthetic.caption(s), f"https://example.org/img/{key}.jpg"))
        url = join(output, f"{shard:05d}.tar")
        write_tar(url, samples, storage)
        urls.append(url)
    return urls
