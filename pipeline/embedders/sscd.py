"""SSCD copy-detection descriptor from a TorchScript file (e.g. sscd_disc_mixup.torchscript.pt).

Preprocessing follows the SSCD release: ImageNet mean/std, short side resized to 288 by
default. A centre square crop keeps batches one shape; set ``image_size`` to change the size.
"""
from __future__ import annotations

from pipeline.config import EmbedderConfig
from pipeline.embedders.base import Embedder
from pipeline.embedders.torch_util import IMAGENET_MEAN, IMAGENET_STD, TorchImageEmbedder, checkpoint_file, pick_device
from pipeline.storage import Storage

DEFAULT_SIZE = 288


class SscdEmbedder(TorchImageEmbedder, Embedder):
    name = "sscd"

    def __init__(self, cfg: EmbedderConfig, storage: Storage | None = None):
        import torch

        self.device = pick_device(cfg.device)
        path, self.weights = checkpoint_file(cfg, storage)
        # TorchScript is deprecated for new models but the published SSCD files are TorchScript.
        self.model = torch.jit.load(path, map_location=self.device).eval()
        self.turn = cfg.exif_orientation
        self.image_size = cfg.image_size or DEFAULT_SIZE
        self.mean, self.std, self.arch = IMAGENET_MEAN, IMAGENET_STD, "torchscript"
        self._probe_dim()

    def _network(self, x):
        return self.model(x)
