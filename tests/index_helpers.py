"""Helpers for the index tests: a small clustered corpus written as embedding shards."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.config import IndexConfig
from pipeline.index.registry import Registry, encode_ids
from pipeline.layout.embeddings import EmbeddingsFolder
from pipeline.layout.index import IndexFolder
from pipeline.testing.vectors import MixtureSource, write_folder

DIM = 32


@dataclass
class Corpus:
    folder: str
    source: MixtureSource
    names: list[str]
    vectors: list[np.ndarray]  # per shard, all rows
    bad: list[np.ndarray]  # per shard, rows with status != ok

    def add(self, shards: int, rows: int, storage=None, bad_every: int = 0) -> None:
        first = len(self.names)
        folder = EmbeddingsFolder(self.folder, storage)
        for name, x, bad in write_folder(folder, self.source, shards, rows, first=first, bad_every=bad_every):
            self.names.append(name)
            self.vectors.append(x)
            self.bad.append(bad)

    def ok_matrix(self, numbers: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
        """(vectors, ids) of every ok row, ids from the registry numbers of the shard names."""
        xs, ids = [], []
        for name, x, bad in zip(self.names, self.vectors, self.bad):
            rows = np.nonzero(~bad)[0]
            xs.append(x[rows])
            ids.append(encode_ids(numbers[name], rows))
        return np.concatenate(xs), np.concatenate(ids)


def make_corpus(folder: str, shards: int = 8, rows: int = 500, storage=None, bad_every: int = 53, seed: int = 0) -> Corpus:
    c = Corpus(folder, MixtureSource(DIM, latent=8, clusters=40, seed=seed), [], [], [])
    c.add(shards, rows, storage, bad_every=bad_every)
    return c


def brute_force(queries: np.ndarray, x: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k ids by inner product (on the fp16-rounded vectors the index stores)."""
    x = x.astype(np.float16).astype(np.float32)
    s = queries @ x.T
    return ids[np.argsort(-s, axis=1, kind="stable")[:, :k]]


def config(embeddings: str, index: str, **over) -> IndexConfig:
    base = dict(embeddings=embeddings, index=index, factory="IVF32,PQ8", group_size=2,
                shard_memory_gb=0.00006, merge_fanin=2, threads=1, tune_queries=200)
    base.update(over)
    return IndexConfig(**base)


def index_of(cfg: IndexConfig) -> IndexFolder:
    return IndexFolder(cfg.index, cfg.s3)


def registry_of(cfg: IndexConfig) -> Registry:
    return Registry.load(index_of(cfg))
