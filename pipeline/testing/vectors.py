"""Test and benchmark support: embedding folders of synthetic vectors with realistic structure.

Not used by any stage. Real image embeddings have low intrinsic dimension: they sit near a
union of low-dimensional clusters. Isotropic Gaussian vectors have none, and every ANN index
looks broken on them. So vectors here are a random linear map of a ``latent``-d Gaussian
mixture, plus small isotropic noise, L2-normalised. Shards are written through the same
:meth:`~pipeline.layout.embeddings.EmbeddingsFolder.write_shard` as the embed stage's.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from pipeline.layout import embeddings as emb
from pipeline.layout.embeddings import EmbeddingsFolder, EmbeddingsInfo, ShardStats

IDENTITY = {"embedder": "synthetic", "model": "mixture", "weights": "none", "dim": 0, "preprocess": "none"}


class MixtureSource:
    """Deterministic generator: ``batch(i, n)`` always gives the same vectors for the same i."""

    def __init__(self, dim: int, latent: int = 48, clusters: int = 1000, spread: float = 0.35,
                 noise: float = 0.1, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.dim, self.latent, self.noise, self.seed, self.spread = dim, latent, noise, seed, spread
        self.centers = rng.standard_normal((clusters, latent)).astype(np.float32)
        self.scales = rng.uniform(0.5, 1.5, size=clusters).astype(np.float32)
        q, _ = np.linalg.qr(rng.standard_normal((dim, latent)))
        self.proj = q.T.astype(np.float32) * np.sqrt(dim / latent)  # (latent, dim)

    def batch(self, i: int, n: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, i])
        c = rng.integers(0, len(self.centers), size=n)
        z = self.centers[c] + rng.standard_normal((n, self.latent)).astype(np.float32) * (self.spread * self.scales[c])[:, None]
        x = z @ self.proj
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        x += rng.standard_normal((n, self.dim)).astype(np.float32) * (self.noise / np.sqrt(self.dim))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x.astype(np.float32)


class PowerLawSource:
    """The second generator: a power-law spectrum (direction i has variance ~ i^-alpha) and
    clusters of Zipf-distributed sizes (a few huge ones, a long tail), the shape of real
    descriptor sets, where a mixture of equal, well-separated clusters flatters an IVF index.
    ``batch(i, n)`` always gives the same vectors for the same i."""

    def __init__(self, dim: int, clusters: int = 4000, alpha: float = 1.0, zipf: float = 1.1,
                 spread: float = 0.6, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.dim, self.seed, self.spread = dim, seed, spread
        self.scale = (np.arange(1, dim + 1, dtype=np.float32) ** (-alpha / 2)).astype(np.float32)
        self.basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0].astype(np.float32)
        self.centers = (rng.standard_normal((clusters, dim)) * self.scale).astype(np.float32)
        weights = 1.0 / np.arange(1, clusters + 1) ** zipf
        self.p = weights / weights.sum()

    def batch(self, i: int, n: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, i])
        c = rng.choice(len(self.centers), size=n, p=self.p)
        z = self.centers[c] + rng.standard_normal((n, self.dim)).astype(np.float32) * (self.spread * self.scale)
        x = z @ self.basis
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x.astype(np.float32)


def identity(dim: int, **over: Any) -> dict[str, Any]:
    return {**IDENTITY, "dim": dim, **over}


def shard_table(name: str, vectors: np.ndarray, ident: dict[str, Any], bad: np.ndarray | None = None) -> pa.Table:
    """One embedding shard in replica's schema; rows where ``bad`` is True are decode errors."""
    n, dim = vectors.shape
    valid = np.ones(n, bool) if bad is None else ~bad
    columns = {
        "key": [f"{name}-{r:06d}" for r in range(n)],
        "url": [f"https://example.com/{name}/{r}.jpg" for r in range(n)],
        "caption": [f"caption {name} {r}" for r in range(n)],
        "width": np.full(n, 256, np.int32),
        "height": np.full(n, 256, np.int32),
        "tar_url": [f"s3://bucket/tars/{name}.tar"] * n,
        "tar_offset": np.arange(n, dtype=np.int64) * 4096,
        "tar_size": np.full(n, 4000, np.int64),
        "status": np.where(valid, emb.STATUS_OK, emb.STATUS_DECODE_ERROR).tolist(),
        "error": [None if v else "synthetic decode error" for v in valid],
    }
    return emb.shard_table(name, dim, ident, columns, vectors[valid], valid)


def write_shard(folder: EmbeddingsFolder, name: str, vectors: np.ndarray, ident: dict[str, Any],
                bad: np.ndarray | None = None, row_group_size: int = 1024, complete: bool = True) -> None:
    """Write ``{name}`` as the embed stage does; ``complete=False`` leaves the Parquet file without its marker."""
    table = shard_table(name, vectors, ident, bad)
    ok = int(len(vectors) - (0 if bad is None else bad.sum()))
    stats = ShardStats(shard=name, seen=len(vectors), embedded=ok,
                       failed={emb.STATUS_DECODE_ERROR: len(vectors) - ok} if ok < len(vectors) else {})
    if complete:
        folder.write_shard(table, stats, row_group_size)
    else:
        import pyarrow.parquet as pq

        with folder.atomic(folder.parquet_name(name)) as f:
            pq.write_table(table, f, row_group_size=row_group_size)


def write_folder(folder: EmbeddingsFolder, source: MixtureSource, shards: int, rows: int, first: int = 0,
                 bad_every: int = 0, row_group_size: int = 1024,
                 ident: dict[str, Any] | None = None) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Write shards ``first .. first+shards-1`` named ``{i:06d}``; yields (name, vectors, bad mask)."""
    ident = ident or identity(source.dim)
    folder.claim(EmbeddingsInfo(identity=ident))
    for s in range(first, first + shards):
        name = f"{s:06d}"
        x = source.batch(s, rows)
        bad = np.zeros(rows, bool)
        if bad_every:
            bad[(s % bad_every)::bad_every] = True
        write_shard(folder, name, x, ident, bad, row_group_size)
        yield name, x, bad
