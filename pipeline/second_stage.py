"""Second-stage descriptors: similarities computed on the fetched pixels of a query's best candidates.

Each descriptor writes its own match column ``score_<name>`` (``-`` becomes ``_``):

* ``sscd``, ``dino``, ``open_clip``, ``default``: the cosine of the embedder's global vectors (the
  query's regions too, when the search uses regions: the best region counts);
* ``dino-split``: DCR's split-product of DINO's unpooled tokens (:mod:`pipeline.split_product`),
  whole images only (tokens have a fixed layout), with ``chunks`` pieces and optionally the cross
  variant.

The first descriptor listed is the one whose similarity the thresholds and the final score read
(it also fills ``score_rerank``, as a single second stage always has). Weights come from the
search's weights sections (``sscd``, ``dino``, ``clip``): the same loader as the embed stage's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import ConfigError

#: descriptor name -> (embedder name, similarity); the names `--rerank` accepts
KINDS = {"sscd": ("sscd", "cosine"), "dino": ("dino", "cosine"), "dino-split": ("dino", "split-product"),
         "open_clip": ("open_clip", "cosine"), "default": ("default", "cosine")}


def column_of(name: str) -> str:
    """The match column a descriptor writes."""
    return "score_" + name.replace("-", "_")


def check_names(names: list[str]) -> None:
    unknown = [n for n in names if n not in KINDS]
    if unknown:
        raise ConfigError(f"unknown second-stage descriptor {unknown[0]!r}; choose from {', '.join(KINDS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"a second-stage descriptor is listed twice: {names}")


@dataclass
class Descriptor:
    name: str
    embedder: Any
    similarity: str
    chunks: int = 0
    cross: bool = False

    @property
    def column(self) -> str:
        return column_of(self.name)

    def identity(self) -> dict[str, Any]:
        """What makes this descriptor's scores: the embedder's identity and the similarity."""
        # "embedder" names the descriptor, so a score model fitted for DINO's cosine is not taken for
        # its split-product (pipeline.scoring.fitted_for reads it)
        out = {**self.embedder.identity(), "embedder": self.name, "similarity": self.similarity}
        if self.similarity == "split-product":
            out.update(chunks=self.chunks, cross=self.cross)
        return out

    def scores(self, query, candidates: list, regions: bool) -> np.ndarray:
        """Similarity of each candidate image to the query image."""
        if not candidates:
            return np.zeros(0, np.float32)
        if self.similarity == "split-product":
            from pipeline.split_product import split_product

            q = self.embedder.token_images([query])
            c = self.embedder.token_images(candidates)
            return split_product(q, c, self.chunks, self.cross)[0]
        qv = self.embedder.embed_regions(query)[0] if regions else self.embedder.embed_images([query])
        return (self.embedder.embed_images(candidates) @ qv.T).max(axis=1)


class SecondStage:
    """The descriptors of one search, built once (weights loaded, embedders shared by dino and dino-split)."""

    def __init__(self, names: list[str], configs: dict[str, Any], storage=None, chunks: int = 0, cross: bool = False):
        """``configs``: embedder name -> its EmbedderConfig (weights, sizes, device)."""
        from pipeline.embedders import build_embedder

        check_names(names)
        built: dict[str, Any] = {}
        self.descriptors = []
        for name in names:
            embedder_name, similarity = KINDS[name]
            if embedder_name not in built:
                built[embedder_name] = build_embedder(configs[embedder_name], storage)
            self.descriptors.append(Descriptor(name, built[embedder_name], similarity, chunks, cross))

    @property
    def primary(self) -> Descriptor:
        return self.descriptors[0]

    def identities(self) -> list[dict[str, Any]]:
        """For run.json: each descriptor's name, column and identity."""
        return [{"name": d.name, "column": d.column, "identity": d.identity()} for d in self.descriptors]

    def scores(self, query, candidates: list, regions: bool) -> dict[str, np.ndarray]:
        return {d.name: d.scores(query, candidates, regions) for d in self.descriptors}


def embedder_configs(cfg) -> dict[str, Any]:
    """Each second-stage embedder's settings, from a SearchConfig's weights sections."""
    from pipeline.config import EmbedderConfig

    return {"sscd": cfg.sscd.embedder("sscd"), "dino": cfg.dino.embedder("dino"),
            "open_clip": cfg.clip.embedder("open_clip"), "default": EmbedderConfig(name="default")}


def validate(cfg) -> None:
    """Cheap checks of a SearchConfig's second stage before any work: names, chunks, each embedder's settings."""
    from pipeline.embedders import validate as validate_embedder

    check_names(cfg.rerank)
    if cfg.rerank_chunks < 0:
        raise ConfigError(f"rerank_chunks must be >= 0 (0 = one chunk per token), got {cfg.rerank_chunks}")
    from pipeline.config import RERANK_WEIGHTS

    configs = embedder_configs(cfg)
    for embedder_name in dict.fromkeys(KINDS[n][0] for n in cfg.rerank):
        try:
            validate_embedder(configs[embedder_name], cfg.s3)
        except ConfigError as exc:
            section = RERANK_WEIGHTS[embedder_name]
            where = f": its weights are search.{section}.* (flags --{section}-*)" if section else ""
            raise ConfigError(f"second-stage {embedder_name}{where}: {exc}") from exc


def from_search(cfg) -> SecondStage | None:
    """The second stage a SearchConfig asks for (weights loaded), or None when it lists none."""
    if not cfg.rerank:
        return None
    return SecondStage(cfg.rerank, embedder_configs(cfg), cfg.s3, cfg.rerank_chunks, cfg.rerank_cross)
