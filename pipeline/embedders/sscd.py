"""SSCD copy-detection descriptor from a TorchScript file (e.g. sscd_disc_mixup.torchscript.pt).

Preprocessing follows the SSCD release: ImageNet mean/std, short side resized to 288 by
default. A centre square crop keeps batches one shape; set ``image_size`` to change the size.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from pipeline.config import EmbedderConfig
from pipeline.embedders.base import Embedder, l2_normalize, square_crop_uint8
from pipeline.embedders.torch_util import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    file_sha256,
    local_copy,
    pick_device,
    to_normalized_tensor,
)
from pipeline.io import Storage

DEFAULT_SIZE = 288


class SscdEmbedder(Embedder):
    name = "sscd"

    def __init__(self, cfg: EmbedderConfig, storage: Storage | None = None):
        import torch

        self.device = pick_device(cfg.device)
        path = local_copy(cfg.checkpoint, storage)
        self.weights = "sha256:" + file_sha256(path)
        # TorchScript is deprecated for new models but the published SSCD files are TorchScript.
        self.model = torch.jit.load(path, map_location=self.device).eval()
        self.image_size = cfg.image_size or DEFAULT_SIZE
        with torch.inference_mode():
            probe = np.zeros((1, self.image_size, self.image_size, 3), dtype=np.uint8)
            self.dim = int(self._forward(probe).shape[1])

    def preprocess(self, image: Image.Image) -> np.ndarray:
        return square_crop_uint8(image, self.image_size)

    def _forward(self, batch: np.ndarray):
        return self.model(to_normalized_tensor(batch, IMAGENET_MEAN, IMAGENET_STD, self.device)).float()

    def embed(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return l2_normalize(self._forward(batch).cpu().numpy())

    def identity(self) -> dict[str, Any]:
        return {
            "embedder": self.name,
            "model": "torchscript",
            "weights": self.weights,
            "dim": self.dim,
            "preprocess": f"resize_short={self.image_size},center_crop={self.image_size},"
            f"mean={list(IMAGENET_MEAN)},std={list(IMAGENET_STD)}",
        }
