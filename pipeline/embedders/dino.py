"""DINO / DINOv2 vision transformers as timm architectures, weights from a file the user names.

``embedder.model`` is a timm ViT name (``vit_small_patch16_224.dino``, ``vit_base_patch16_224.dino``,
``vit_base_patch14_dinov2.lvd142m``, ...). The model is created with ``pretrained=False`` (torch hub
and the Hugging Face hub fetch from the network) and its weights are loaded from
``embedder.checkpoint``: a plain state_dict (``.pth``/``.pt``, also wrapped as ``{"model"|"state_dict"|
"teacher": ...}``, keys possibly prefixed ``module.``/``backbone.``, as DINO's training checkpoints are)
or a ``.safetensors`` file. ``embedder.model_config`` may name a JSON file of ``timm.create_model``
keyword arguments that change the architecture (``embed_dim``, ``depth``, ``num_heads``,
``patch_size``, ``img_size``): a custom or small ViT of the family.

Two outputs:

* ``embed``: the class token after the final norm, L2-normalised: a global descriptor (an index
  can be built on it like any other);
* ``tokens``: every output token after the final norm (class token, register tokens if the model
  has them, then the patch tokens in raster order), unpooled: the features DCR's split-product
  compares (its DINO model with ``global_pool=''`` returns exactly these), see
  :mod:`pipeline.split_product`.

Preprocessing is the project's usual one (short side resized to ``image_size``, centre square
crop) with the mean/std of the architecture's timm config (ImageNet's for DINO and DINOv2);
``image_size`` defaults to the architecture's input size, and a different one is passed to timm
as ``img_size`` (position embeddings of a checkpoint are resampled to it by timm's loader).
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np

from pipeline.config import EmbedderConfig
from pipeline.embedders.base import Embedder
from pipeline.embedders.torch_util import IMAGENET_MEAN, IMAGENET_STD, TorchImageEmbedder, checkpoint_file, pick_device
from pipeline.errors import ConfigError
from pipeline.storage import Storage, read_bytes

#: wrappers of a state_dict in training checkpoints, tried in this order (DINO evaluates its teacher)
WRAPPERS = ("teacher", "model", "state_dict", "model_ema")
#: key prefixes of wrapped models (DDP's module., DINO's backbone.)
PREFIXES = ("module.", "backbone.")


def model_kwargs(cfg: EmbedderConfig, storage: Storage | None = None) -> dict[str, Any]:
    """The timm keyword arguments of ``embedder.model_config`` (empty when there is none)."""
    if not cfg.model_config:
        return {}
    try:
        kwargs = json.loads(read_bytes(cfg.model_config, storage))
    except ValueError as exc:
        raise ConfigError(f"embedder.model_config {cfg.model_config!r} is not JSON: {exc}") from exc
    if not isinstance(kwargs, dict):
        raise ConfigError(f"embedder.model_config {cfg.model_config!r} must hold a JSON object of timm "
                          "create_model arguments (embed_dim, depth, num_heads, patch_size, img_size)")
    return kwargs


def check_architecture(cfg: EmbedderConfig) -> None:
    import timm

    if not cfg.model:
        raise ConfigError("embedder dino needs embedder.model (a timm ViT, e.g. vit_small_patch16_224.dino "
                          "or vit_base_patch14_dinov2.lvd142m)")
    if not timm.is_model(cfg.model) or not cfg.model.split(".")[0].startswith("vit_"):
        raise ConfigError(f"embedder.model {cfg.model!r} is not a timm vision transformer; DINO and DINOv2 "
                          "are e.g. vit_small_patch16_224.dino, vit_base_patch14_dinov2.lvd142m")
    if not cfg.checkpoint:
        raise ConfigError("embedder dino needs embedder.checkpoint (its weights: a .pth state_dict or a "
                          ".safetensors file; nothing is downloaded)")


def input_size(cfg: EmbedderConfig, storage: Storage | None = None) -> int:
    """The square input side without building the model: image_size, model_config's img_size, or timm's."""
    if cfg.image_size:
        return int(cfg.image_size)
    size = model_kwargs(cfg, storage).get("img_size")
    if size is None:
        from timm.models import get_pretrained_cfg

        pretrained = get_pretrained_cfg(cfg.model)
        size = pretrained.input_size[-1] if pretrained and pretrained.input_size else 224
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def read_state_dict(path: str) -> dict[str, Any]:
    """Tensors of a checkpoint file, unwrapped and unprefixed; no pickled objects are executed."""
    import torch

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
            raise ConfigError(f"embedder.checkpoint {path!r} is not a torch state_dict: {exc}") from exc
    while isinstance(state, dict):
        inner = next((state[k] for k in WRAPPERS if isinstance(state.get(k), dict)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise ConfigError(f"embedder.checkpoint {path!r} holds no state_dict of tensors")
    out = {}
    for key, value in state.items():
        for prefix in PREFIXES:
            key = key.removeprefix(prefix)
        out[key] = value
    return out


class DinoEmbedder(TorchImageEmbedder, Embedder):
    name = "dino"

    def __init__(self, cfg: EmbedderConfig, storage: Storage | None = None):
        import timm
        from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

        check_architecture(cfg)
        self.device = pick_device(cfg.device)
        self.kwargs = model_kwargs(cfg, storage)
        self.turn = cfg.exif_orientation
        self.image_size = input_size(cfg, storage)
        model = timm.create_model(cfg.model, pretrained=False, num_classes=0,
                                  **{**self.kwargs, "img_size": self.image_size})
        if not isinstance(model, VisionTransformer):
            raise ConfigError(f"embedder.model {cfg.model!r} is not a timm VisionTransformer")
        path, self.weights = checkpoint_file(cfg, storage)
        # DINO's projection head (head.*) is not part of the backbone; timm's filter maps the
        # official DINOv2 names and resamples position embeddings to this input size.
        state = {k: v for k, v in read_state_dict(path).items() if not k.startswith("head.")}
        misfit = f"embedder.checkpoint {cfg.checkpoint!r} does not fit {cfg.model}" + (
            f" with {json.dumps(self.kwargs)}" if self.kwargs else "")
        try:
            missing, unexpected = model.load_state_dict(checkpoint_filter_fn(state, model), strict=False)
        except (RuntimeError, ValueError) as exc:  # tensor shapes differ: another size of the family
            raise ConfigError(f"{misfit}: {str(exc).splitlines()[-1].strip()}") from exc
        if missing or unexpected:
            raise ConfigError(f"{misfit}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        self.model = model.to(self.device).eval()
        data = getattr(model, "pretrained_cfg", None) or {}
        self.mean = tuple(data.get("mean") or IMAGENET_MEAN)
        self.std = tuple(data.get("std") or IMAGENET_STD)
        self.arch = cfg.model
        self._probe_dim()

    def _network(self, x):
        return self.model.forward_features(x)[:, 0]

    def tokens(self, batch: np.ndarray) -> np.ndarray:
        """(n, h, w, 3) uint8 -> (n, tokens, width) float32: every output token, unpooled and unnormalised."""
        import torch

        from pipeline.embedders.torch_util import to_normalized_tensor

        with torch.inference_mode():
            x = to_normalized_tensor(batch, self.mean, self.std, self.device)
            return self.model.forward_features(x).float().cpu().numpy()

    def token_images(self, images: list) -> np.ndarray:
        """``tokens`` of PIL images (preprocessed here): for a few query and candidate images."""
        if not images:
            return np.zeros((0, 0, self.dim), np.float32)
        return self.tokens(np.stack([self.preprocess(im) for im in images]))

    def identity(self) -> dict[str, Any]:
        out = super().identity()
        if self.kwargs:
            out["model_config"] = self.kwargs
        return out
