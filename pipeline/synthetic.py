"""Procedural images that stand in for a web corpus when no data can be downloaded.

Deterministic: the same seed gives the same picture in every process.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

WORDS = ["red", "blue", "green", "bright", "dark", "old", "small", "large", "striped", "round"]
NOUNS = ["house", "boat", "tree", "car", "cat", "mountain", "chair", "flower", "bridge", "lamp"]


def scene(seed: int, size: tuple[int, int] = (320, 256)) -> Image.Image:
    """A textured background with random shapes: distinct per seed, natural-ish statistics."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(0, 255, 3)
    grad = rng.uniform(-0.6, 0.6, (3, 2))
    img = np.stack([base[c] + grad[c, 0] * xx + grad[c, 1] * yy for c in range(3)], axis=-1)
    for _ in range(3):  # low-frequency texture
        fx, fy, ph = rng.uniform(0.01, 0.08), rng.uniform(0.01, 0.08), rng.uniform(0, 6.3)
        img += rng.uniform(10, 40) * np.sin(fx * xx + fy * yy + ph)[..., None] * rng.uniform(-1, 1, 3)
    img += rng.normal(0, 6, img.shape)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(rng.integers(4, 12)):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        x1, y1 = x0 + rng.integers(10, w // 2), y0 + rng.integers(10, h // 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.rectangle([x0, y0, x1, y1], fill=colour)
        elif kind == 1:
            draw.ellipse([x0, y0, x1, y1], fill=colour)
        else:
            pts = [(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(3)]
            draw.polygon(pts, fill=colour)
    return pil


def caption(seed: int) -> str:
    rng = np.random.default_rng(seed + 7919)
    return f"a {rng.choice(WORDS)} {rng.choice(NOUNS)} near a {rng.choice(WORDS)} {rng.choice(NOUNS)}"
