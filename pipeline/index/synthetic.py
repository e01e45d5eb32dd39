"""Embedding folders with realistic structure, for tests and benchmarks.

Real image embeddings have low intrinsic dimension: they sit near a union of low-dimensional
clusters. Isotropic Gaussian vectors have none, and every ANN index looks broken on them.
So vectors here are a random linear map of a ``latent``-d Gaussian mixture, plus small
isotropic noise, L2-normalised.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import io
from pipeline.schema import FORMAT_VERSION, embedding_column, embedding_schema, identity_metadata

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


def identity(dim: int, **over: Any) -> dict[str, Any]:
    return {**IDENTITY, "dim": dim, **over}


def shard_table(name: str, vectors: np.ndarray, ident: dict[str, Any], bad: np.ndarray | None = None) -> pa.Table:
    """One embedding shard in replica's schema; rows where ``bad`` is True are decode errors."""
    n, dim = vectors.shape
    valid = np.ones(n, bool) if bad is None else ~bad
    return pa.table(
        {
            "key": pa.array([f"{name}-{r:06d}" for r in range(n)]),
            "shard": pa.array([name] * n),
            "row": pa.array(np.arange(n, dtype=np.int32)),
            "url": pa.array([f"https://example.com/{name}/{r}.jpg" for r in range(n)]),
            "caption": pa.array([f"caption {name} {r}" for r in range(n)]),
            "width": pa.array(np.full(n, 256, np.int32)),
            "height": pa.array(np.full(n, 256, np.int32)),
            "tar_url": pa.array([f"s3://bucket/tars/{name}.tar"] * n),
            "tar_offset": pa.array(np.arange(n, dtype=np.int64) * 4096),
            "tar_size": pa.array(np.full(n, 4000, np.int64)),
            "sha256": pa.nulls(n, pa.string()),
            "status": pa.array(np.where(valid, "ok", "decode_error")),
            "error": pa.array([None if v else "synthetic decode error" for v in valid], pa.string()),
            "embedding": embedding_column(vectors[valid], valid, dim),
        },
        schema=embedding_schema(dim).with_metadata(identity_metadata(ident)),
    )


def write_shard(folder: str, name: str, vectors: np.ndarray, ident: dict[str, Any], storage: io.Storage | None = None,
                bad: np.ndarray | None = None, row_group_size: int = 1024, complete: bool = True) -> None:
    """Write ``{name}.parquet`` then (if ``complete``) its stats file, as the embed stage does."""
    table = shard_table(name, vectors, ident, bad)
    with io.atomic_output(io.join(folder, f"{name}.parquet"), storage) as f:
        pq.write_table(table, f, row_group_size=row_group_size, compression="zstd")
    if complete:
        ok = int(len(vectors) - (0 if bad is None else bad.sum()))
        stats = {"shard": name, "seen": len(vectors), "embedded": ok, "shard_error": None,
                 "failed": {"decode_error": len(vectors) - ok} if ok < len(vectors) else {}}
        io.write_json(io.join(folder, f"{name}.stats.json"), stats, storage)


def write_folder_info(folder: str, ident: dict[str, Any], storage: io.Storage | None = None) -> None:
    io.write_json(io.join(folder, "_replica.json"), {"identity": ident, "format_version": FORMAT_VERSION}, storage)


def write_folder(folder: str, source: MixtureSource, shards: int, rows: int, storage: io.Storage | None = None,
                 first: int = 0, bad_every: int = 0, row_group_size: int = 1024,
                 ident: dict[str, Any] | None = None) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Write shards ``first .. first+shards-1`` named ``{i:06d}``; yields (name, vectors, bad mask)."""
    ident = ident or identity(source.dim)
    write_folder_info(folder, ident, storage)
    for s in range(first, first + shards):
        name = f"{s:06d}"
        x = source.batch(s, rows)
        bad = np.zeros(rows, bool)
        if bad_every:
            bad[(s % bad_every)::bad_every] = True
        write_shard(folder, name, x, ident, storage, bad, row_group_size)
        yield name, x, bad
