"""The shard registry: every embedding shard gets a number once, and vector ids encode it.

A vector's int64 id is ``(shard_number << ROW_BITS) | row`` where ``row`` is the ``row``
column of its Parquet row (its position in the input tar). Numbers are handed out in
registration order and never change, so adding shards later never renumbers what an index
already holds, and every hit maps back to one Parquet row without relying on listing order.

The registry is one small JSON file in the index folder (pipeline/layout/index.py), written
only by the driver.
At LAION-5B scale (~585k shards) it is a few MB and loads in about a second.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa

from pipeline.errors import ConfigError, MismatchError
from pipeline.layout.embeddings import ROW_COLUMNS, EmbeddingsFolder, check_same_identity
from pipeline.layout.index import IndexFolder

#: rows per shard up to 2**24 (16.7M); shard numbers up to 2**39 (5.5e11)
ROW_BITS = 24
ROW_MASK = (1 << ROW_BITS) - 1
MAX_SHARD_NUMBER = (1 << (63 - ROW_BITS)) - 1


def encode_ids(shard_numbers: np.ndarray | int, rows: np.ndarray | int) -> np.ndarray:
    """(shard number, row) -> int64 id. Vectorised; scalars give a 0-d array."""
    s = np.asarray(shard_numbers, dtype=np.int64)
    r = np.asarray(rows, dtype=np.int64)
    if (r < 0).any() or (r > ROW_MASK).any():
        raise ValueError(f"row out of range 0..{ROW_MASK}")
    if (s < 0).any() or (s > MAX_SHARD_NUMBER).any():
        raise ValueError(f"shard number out of range 0..{MAX_SHARD_NUMBER}")
    return (s << ROW_BITS) | r


def decode_ids(ids: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
    """int64 id -> (shard numbers, rows). ``-1`` (faiss' "no result") decodes to (-1, -1)."""
    a = np.asarray(ids, dtype=np.int64)
    missing = a < 0
    return np.where(missing, -1, a >> ROW_BITS), np.where(missing, -1, a & ROW_MASK)


@dataclass
class Registry:
    """Shard name <-> number. ``version`` grows by one with every registration that adds shards."""

    embeddings: EmbeddingsFolder
    identity: dict[str, Any]
    version: int = 0
    names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._numbers = {n: i for i, n in enumerate(self.names)}

    # -- persistence -------------------------------------------------------------------
    @classmethod
    def load(cls, index: IndexFolder) -> "Registry":
        d = index.read_registry()
        return cls(embeddings=EmbeddingsFolder(d["embeddings"], index.storage), identity=d["identity"],
                   version=d["version"], names=list(d["shards"]))

    @classmethod
    def load_or_create(cls, index: IndexFolder, embeddings: EmbeddingsFolder, identity: dict[str, Any]) -> "Registry":
        if not index.has_registry():
            return cls(embeddings=embeddings, identity=identity)
        reg = cls.load(index)
        if reg.embeddings.url != embeddings.url:
            raise MismatchError(
                f"index {index.url!r} registers shards of {reg.embeddings.url!r}, not {embeddings.url!r}; "
                "use a new index location or the same embeddings folder"
            )
        check_same_identity(reg.identity, identity, f"index {index.url!r}")
        return reg

    def save(self, index: IndexFolder) -> None:
        index.write_registry({"embeddings": self.embeddings.url, "identity": self.identity, "version": self.version,
                              "row_bits": ROW_BITS, "shards": self.names})

    # -- numbering ---------------------------------------------------------------------
    def register(self, names: Iterable[str]) -> list[int]:
        """Give each new name the next number; names already known keep theirs. Returns new numbers."""
        new = []
        for name in names:
            if name in self._numbers:
                continue
            number = len(self.names)
            if number > MAX_SHARD_NUMBER:
                raise ConfigError(f"more than {MAX_SHARD_NUMBER + 1} shards cannot be numbered")
            self.names.append(name)
            self._numbers[name] = number
            new.append(number)
        if new:
            self.version += 1
        return new

    def register_complete(self) -> list[int]:
        """Register every complete shard of the embeddings folder not yet known."""
        return self.register(self.embeddings.complete_shards())

    def number(self, name: str) -> int:
        return self._numbers[name]

    def name(self, number: int) -> str:
        if not 0 <= number < len(self.names):
            raise KeyError(f"shard number {number} is not registered (registry has {len(self.names)})")
        return self.names[number]

    def __len__(self) -> int:
        return len(self.names)

    def url(self, number: int) -> str:
        return self.embeddings.parquet_url(self.name(number))

    def shard_rows(self, ids: Sequence[int] | np.ndarray) -> list[tuple[str, int]]:
        """ids -> [(shard name, row)]; ``-1`` ids give ("", -1)."""
        shards, rows = decode_ids(np.asarray(ids, dtype=np.int64))
        return [(self.name(int(s)) if s >= 0 else "", int(r)) for s, r in zip(shards, rows)]


def fetch_rows(ids: Sequence[int] | np.ndarray, registry: Registry, columns: Sequence[str] = ROW_COLUMNS,
               threads: int = 8) -> pa.Table:
    """The Parquet rows of ``ids``, in the order given, plus ``id``, ``shard``, ``row`` columns.

    One read per shard touched (only the row groups holding the rows), shards read in
    parallel threads. ``-1`` ids are not allowed: drop them first.
    """
    ids = np.asarray(ids, dtype=np.int64)
    if (ids < 0).any():
        raise ValueError("fetch_rows got -1 ids (empty results); drop them first")
    if len(ids) == 0:
        return pa.table({"id": pa.array([], pa.int64())})
    shards, rows = decode_ids(ids)
    cols = [c for c in columns if c not in ("row", "shard")]
    order = np.argsort(shards, kind="stable")
    uniq, starts = np.unique(shards[order], return_index=True)
    bounds = list(zip(starts, list(starts[1:]) + [len(order)]))

    def one(i: int) -> tuple[np.ndarray, pa.Table]:
        a, b = bounds[i]
        idx = order[a:b]
        return idx, registry.embeddings.read_rows(registry.name(int(uniq[i])), rows[idx], [*cols, "shard"])

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(uniq)))) as pool:
        parts = list(pool.map(one, range(len(uniq))))
    table = pa.concat_tables([t for _, t in parts])
    where = np.concatenate([idx for idx, _ in parts])
    inverse = np.empty_like(where)
    inverse[where] = np.arange(len(where))
    table = table.take(pa.array(inverse))
    return table.add_column(0, "id", pa.array(ids))
