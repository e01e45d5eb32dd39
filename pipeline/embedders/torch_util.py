"""Shared helpers for torch-based embedders (imported only when one is built)."""
from __future__ import annotations

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pick_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        from pipeline.errors import ConfigError

        raise ConfigError("embedder.device is cuda but no CUDA device is visible to this worker")
    return requested


def checkpoint_file(cfg, storage) -> tuple[str, str]:
    """(local path, ``sha256:<hex>``) of the configured checkpoint, refused when it is not the pinned one."""
    from pipeline.errors import ConfigError
    from pipeline.storage import file_sha256, local_copy

    path = local_copy(cfg.checkpoint, storage, key=cfg.checkpoint_sha256 or "")
    digest = file_sha256(path)
    if cfg.checkpoint_sha256 and digest != cfg.checkpoint_sha256.lower():
        raise ConfigError(f"embedder.checkpoint {cfg.checkpoint!r} has sha256 {digest}, not the pinned "
                          f"{cfg.checkpoint_sha256}: it changed or is not the file you meant")
    return path, f"sha256:{digest}"


def to_normalized_tensor(batch: np.ndarray, mean: tuple, std: tuple, device: str):
    """(n, h, w, 3) uint8 -> (n, 3, h, w) float tensor normalised with mean/std on ``device``."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(batch)).to(device)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return (x - m) / s


class TorchImageEmbedder:
    """Shared body of the torch embedders: square crop on CPU workers, normalise + forward in
    the actor. Subclasses set model, device, image_size, mean, std, arch, weights in
    ``__init__`` (and ``turn``, from ``exif_orientation``), implement ``_network(x)``, then call ``_probe_dim()``."""

    def preprocess(self, image):
        from pipeline.embedders.base import square_crop_uint8

        return square_crop_uint8(image, self.image_size, self.turn)

    def _forward(self, batch: np.ndarray):
        return self._network(to_normalized_tensor(batch, self.mean, self.std, self.device)).float()

    def _probe_dim(self) -> None:
        import torch

        with torch.inference_mode():
            self.dim = int(self._forward(np.zeros((1, self.image_size, self.image_size, 3), np.uint8)).shape[1])

    def embed(self, batch: np.ndarray) -> np.ndarray:
        import torch

        from pipeline.embedders.base import l2_normalize

        with torch.inference_mode():
            return l2_normalize(self._forward(batch).cpu().numpy())

    def identity(self) -> dict:
        from pipeline.embedders.base import with_upright

        return {
            "embedder": self.name,
            "model": self.arch,
            "weights": self.weights,
            "dim": self.dim,
            # jpeg-draft: JPEGs decode at the smallest DCT scale still >= image_size (vectors differ
            # slightly from a full decode, hence its own identity).
            "preprocess": with_upright(f"jpeg-draft,resize_short={self.image_size},center_crop={self.image_size},"
                                       f"mean={list(self.mean)},std={list(self.std)}", self.turn),
        }
