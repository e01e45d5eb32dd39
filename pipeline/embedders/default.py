"""Weight-free copy descriptor (first version): zero-mean grey thumbnail, 256-d."""
from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from pipeline.config import EmbedderConfig
from pipeline.embedders.base import Embedder, l2_normalize
from pipeline.io import Storage

INPUT_SIZE = 64
GRID = 16


class DefaultDescriptor(Embedder):
    name = "default"
    dim = GRID * GRID

    def __init__(self, cfg: EmbedderConfig | None = None, storage: Storage | None = None):
        self.version = "thumb16-v1"

    def preprocess(self, image: Image.Image) -> np.ndarray:
        return np.asarray(image.convert("RGB").resize((INPUT_SIZE, INPUT_SIZE), Image.BILINEAR), dtype=np.uint8)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        grey = batch.astype(np.float32).mean(axis=3)
        n, k = len(grey), INPUT_SIZE // GRID
        thumbs = grey.reshape(n, GRID, k, GRID, k).mean(axis=(2, 4)).reshape(n, -1)
        return l2_normalize(thumbs - thumbs.mean(axis=1, keepdims=True))

    def identity(self) -> dict[str, Any]:
        return {
            "embedder": self.name,
            "model": self.version,
            "weights": "none",
            "dim": self.dim,
            "preprocess": f"resize={INPUT_SIZE}x{INPUT_SIZE},bilinear",
        }
