"""Embedder registry: build and validate descriptors by name.

Heavy imports (torch, open_clip) happen inside the embedder modules, only when one is built.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import numpy as np
from PIL import Image

from pipeline.config import EmbedderConfig
from pipeline.embedders.base import Embedder, square_crop_uint8
from pipeline.errors import ConfigError
from pipeline.storage import Storage, exists

KNOWN = ("default", "open_clip", "sscd", "dino")


def validate(cfg: EmbedderConfig, storage: Storage | None = None) -> None:
    """Cheap checks that need no weights loaded: fail before any work starts."""
    if cfg.name not in KNOWN:
        raise ConfigError(f"unknown embedder {cfg.name!r}; choose one of: {', '.join(KNOWN)}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"embedder.device must be auto, cpu or cuda, got {cfg.device!r}")
    if cfg.image_size is not None and cfg.image_size < 16:
        raise ConfigError(f"embedder.image_size must be >= 16, got {cfg.image_size}")
    if cfg.checkpoint_sha256 and (not cfg.checkpoint or len(cfg.checkpoint_sha256) != 64
                                  or any(c not in "0123456789abcdefABCDEF" for c in cfg.checkpoint_sha256)):
        raise ConfigError("embedder.checkpoint_sha256 must be the 64 hex digits of the checkpoint's sha256 "
                          "(and embedder.checkpoint must be set)")
    for label, url in (("checkpoint", cfg.checkpoint), ("model_config", cfg.model_config)):
        if url and not exists(url, storage):
            raise ConfigError(f"embedder.{label} {url!r} does not exist")
    if cfg.name == "open_clip":
        from pipeline.embedders.clip import known_architectures, register_config

        if not cfg.model:
            raise ConfigError("embedder open_clip needs embedder.model (an architecture, e.g. ViT-B-32)")
        if cfg.model_config:
            register_config(cfg.model_config, storage)
        if cfg.model not in known_architectures():
            raise ConfigError(
                f"unknown open_clip architecture {cfg.model!r}; give embedder.model_config "
                "for a custom one, or pick one from open_clip.list_models()"
            )
        if not cfg.pretrained and not cfg.checkpoint:
            raise ConfigError("embedder open_clip needs embedder.pretrained (a tag) or embedder.checkpoint (a file)")
    if cfg.name == "sscd" and not cfg.checkpoint:
        raise ConfigError("embedder sscd needs embedder.checkpoint (a TorchScript file, e.g. sscd_disc_mixup.torchscript.pt)")
    if cfg.name == "dino":
        from pipeline.embedders.dino import check_architecture, model_kwargs

        check_architecture(cfg)
        model_kwargs(cfg, storage)


def build_embedder(cfg: EmbedderConfig, storage: Storage | None = None) -> Embedder:
    validate(cfg, storage)
    if cfg.name == "default":
        from pipeline.embedders.default import DefaultDescriptor

        return DefaultDescriptor(cfg, storage)
    if cfg.name == "open_clip":
        from pipeline.embedders.clip import OpenClipEmbedder

        return OpenClipEmbedder(cfg, storage)
    if cfg.name == "dino":
        from pipeline.embedders.dino import DinoEmbedder

        return DinoEmbedder(cfg, storage)
    from pipeline.embedders.sscd import SscdEmbedder

    return SscdEmbedder(cfg, storage)


def build_preprocessor(cfg: EmbedderConfig, storage: Storage | None = None) -> Callable[[Image.Image], np.ndarray]:
    """The CPU half of an embedder, built without loading model weights (for decode workers)."""
    if cfg.name == "default":
        from pipeline.embedders.default import DefaultDescriptor

        return DefaultDescriptor(cfg, storage).preprocess
    if cfg.name == "open_clip":
        from pipeline.embedders.clip import model_image_size, register_config

        if cfg.model_config:
            register_config(cfg.model_config, storage)
        size = cfg.image_size or model_image_size(cfg.model)
    elif cfg.name == "dino":
        from pipeline.embedders.dino import input_size

        size = input_size(cfg, storage)
    else:
        from pipeline.embedders.sscd import DEFAULT_SIZE

        size = cfg.image_size or DEFAULT_SIZE
    return partial(square_crop_uint8, size=size, turn=cfg.exif_orientation)
