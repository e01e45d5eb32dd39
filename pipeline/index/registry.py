"""The shard registry: every embedding shard gets a number once, and vector ids encode it.

A vector's int64 id is ``(shard_number << ROW_BITS) | row`` where ``row`` is the ``row``
column of its Parquet row (its position in the input tar). Numbers are handed out in
registration order and never change, so adding shards later never renumbers what an index
already holds, and every hit maps back to one Parquet row without relying on listing order.

The registry is one small JSON file (``{index}/registry.json``) written only by the driver.
At LAION-5B scale (~585k shards) it is a few MB and loads in about a second.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import io
from pipeline.errors import ConfigError, MismatchError

#: rows per shard up to 2**24 (16.7M); shard numbers up to 2**39 (5.5e11)
ROW_BITS = 24
ROW_MASK = (1 << ROW_BITS) - 1
MAX_SHARD_NUMBER = (1 << (63 - ROW_BITS)) - 1
REGISTRY_FILE = "registry.json"
FORMAT_VERSION = 1

#: columns a hit usually needs back (the embedding is fetched only when asked)
ROW_COLUMNS = ("key", "url", "caption", "tar_url", "tar_offset", "tar_size", "embedding")


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
    shards = np.where(missing, -1, a >> ROW_BITS)
    rows = np.where(missing, -1, a & ROW_MASK)
    return shards, rows


def shard_url(embeddings: str, name: str) -> str:
    return io.join(embeddings, f"{name}.parquet")


def stats_url(embeddings: str, name: str) -> str:
    return io.join(embeddings, f"{name}.stats.json")


def list_complete_shards(embeddings: str, storage: io.Storage | None = None) -> list[str]:
    """Names of shards whose stats file (the embed stage's completion marker) exists."""
    fs, path = io.filesystem(embeddings, storage)
    if not fs.exists(path):
        raise ConfigError(f"embeddings folder {embeddings!r} does not exist")
    names = []
    for p in fs.glob(path.rstrip("/") + "/*.stats.json"):
        names.append(p.rsplit("/", 1)[-1][: -len(".stats.json")])
    return sorted(names)


def read_embeddings_info(embeddings: str, storage: io.Storage | None = None) -> dict[str, Any]:
    """The folder's ``_replica.json``: {"identity": {...}, "format_version": 1}."""
    url = io.join(embeddings, "_replica.json")
    if not io.exists(url, storage):
        raise ConfigError(
            f"{url!r} does not exist: point at a folder written by `replica embed` or `replica import-embeddings`"
        )
    info = io.read_json(url, storage)
    if "identity" not in info:
        raise ConfigError(f"{url!r} has no embedder identity")
    return info


@dataclass
class Registry:
    """Shard name <-> number. ``version`` grows by one with every registration that adds shards."""

    embeddings: str
    identity: dict[str, Any]
    version: int = 0
    names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._numbers = {n: i for i, n in enumerate(self.names)}

    # -- persistence -------------------------------------------------------------------
    @classmethod
    def url_in(cls, index: str) -> str:
        return io.join(index, REGISTRY_FILE)

    @classmethod
    def load(cls, index: str, storage: io.Storage | None = None) -> "Registry":
        url = cls.url_in(index)
        if not io.exists(url, storage):
            raise ConfigError(f"no shard registry at {url!r}: run `replica index train` (or build) first")
        d = io.read_json(url, storage)
        if d.get("format_version") != FORMAT_VERSION:
            raise MismatchError(f"{url!r} has registry format {d.get('format_version')}, this code reads {FORMAT_VERSION}")
        return cls(embeddings=d["embeddings"], identity=d["identity"], version=d["version"], names=list(d["shards"]))

    @classmethod
    def load_or_create(
        cls, index: str, embeddings: str, identity: dict[str, Any], storage: io.Storage | None = None
    ) -> "Registry":
        from pipeline.embedders import check_same_identity

        if io.exists(cls.url_in(index), storage):
            reg = cls.load(index, storage)
            if reg.embeddings.rstrip("/") != embeddings.rstrip("/"):
                raise MismatchError(
                    f"index {index!r} registers shards of {reg.embeddings!r}, not {embeddings!r}; "
                    "use a new index location or the same embeddings folder"
                )
            check_same_identity(reg.identity, identity, f"index {index!r}")
            return reg
        return cls(embeddings=embeddings, identity=identity)

    def save(self, index: str, storage: io.Storage | None = None) -> None:
        io.write_json(
            self.url_in(index),
            {
                "format_version": FORMAT_VERSION,
                "embeddings": self.embeddings,
                "identity": self.identity,
                "version": self.version,
                "row_bits": ROW_BITS,
                "shards": self.names,
            },
            storage,
        )

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

    def number(self, name: str) -> int:
        return self._numbers[name]

    def name(self, number: int) -> str:
        if not 0 <= number < len(self.names):
            raise KeyError(f"shard number {number} is not registered (registry has {len(self.names)})")
        return self.names[number]

    def __len__(self) -> int:
        return len(self.names)

    def url(self, number: int) -> str:
        return shard_url(self.embeddings, self.name(number))

    def shard_rows(self, ids: Sequence[int] | np.ndarray) -> list[tuple[str, int]]:
        """ids -> [(shard name, row)]; ``-1`` ids give ("", -1)."""
        shards, rows = decode_ids(np.asarray(ids, dtype=np.int64))
        return [(self.name(int(s)) if s >= 0 else "", int(r)) for s, r in zip(shards, rows)]


def register_complete_shards(reg: Registry, storage: io.Storage | None = None) -> list[int]:
    """Register every complete shard of the registry's embeddings folder not yet known."""
    return reg.register(list_complete_shards(reg.embeddings, storage))


# -- reading rows back ---------------------------------------------------------------------

def read_shard_rows(
    url: str, rows: np.ndarray, columns: Sequence[str], storage: io.Storage | None = None
) -> pa.Table:
    """Rows ``rows`` (values of the ``row`` column) of one embedding shard, in the order given.

    Reads only the row groups that hold them. The embed stage writes rows in tar order with
    ``row`` = position, so row r sits at file position r; that is checked against the ``row``
    column and, if a file breaks it, the whole ``row`` column is read to find them.
    """
    rows = np.asarray(rows, dtype=np.int64)
    fs, path = io.filesystem(url, storage)
    want = list(dict.fromkeys(["row", *columns]))
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        md = pf.metadata
        starts = np.zeros(md.num_row_groups + 1, dtype=np.int64)
        for i in range(md.num_row_groups):
            starts[i + 1] = starts[i] + md.row_group(i).num_rows
        n = int(starts[-1])
        positions = rows.copy()
        if (rows < 0).any() or (rows >= n).any():
            positions = None
        if positions is not None:
            table = _take_positions(pf, starts, positions, want)
            if np.array_equal(table.column("row").to_numpy(), rows):
                return table
        # Fallback: the file is not in row order; locate rows by the `row` column.
        row_col = pf.read(columns=["row"]).column("row").to_numpy().astype(np.int64)
        where = {int(r): i for i, r in enumerate(row_col)}
        missing = [int(r) for r in rows if int(r) not in where]
        if missing:
            raise KeyError(f"{url}: rows {missing[:5]} not present")
        return _take_positions(pf, starts, np.array([where[int(r)] for r in rows]), want)


def _take_positions(pf: pq.ParquetFile, starts: np.ndarray, positions: np.ndarray, columns: list[str]) -> pa.Table:
    groups = np.searchsorted(starts, positions, side="right") - 1
    needed = sorted(set(int(g) for g in groups))
    table = pf.read_row_groups(needed, columns=columns)
    offsets = {g: int(starts[g]) for g in needed}
    # position inside the concatenation of the needed row groups
    base = {}
    acc = 0
    for g in needed:
        base[g] = acc
        acc += int(starts[g + 1] - starts[g])
    local = np.array([base[int(g)] + int(p) - offsets[int(g)] for g, p in zip(groups, positions)], dtype=np.int64)
    return table.take(pa.array(local))


def fetch_rows(
    ids: Sequence[int] | np.ndarray,
    registry: Registry,
    storage: io.Storage | None = None,
    columns: Sequence[str] = ROW_COLUMNS,
    threads: int = 8,
) -> pa.Table:
    """The Parquet rows of ``ids``, in the order given, plus ``id``, ``shard``, ``row`` columns.

    One read per shard touched (only the row groups holding the rows), shards read in
    parallel threads. ``-1`` ids are not allowed: drop them first.
    """
    from concurrent.futures import ThreadPoolExecutor

    ids = np.asarray(ids, dtype=np.int64)
    if (ids < 0).any():
        raise ValueError("fetch_rows got -1 ids (empty results); drop them first")
    shards, rows = decode_ids(ids)
    cols = [c for c in columns if c not in ("row", "shard")]
    order = np.argsort(shards, kind="stable")
    uniq, starts = np.unique(shards[order], return_index=True)
    bounds = list(zip(starts, list(starts[1:]) + [len(order)]))

    def one(i: int) -> tuple[np.ndarray, pa.Table]:
        a, b = bounds[i]
        idx = order[a:b]
        t = read_shard_rows(registry.url(int(uniq[i])), rows[idx], [*cols, "shard"], storage)
        return idx, t

    if len(uniq) == 0:
        return pa.table({"id": pa.array([], pa.int64())})
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(uniq)))) as pool:
        parts = list(pool.map(one, range(len(uniq))))
    table = pa.concat_tables([t for _, t in parts])
    where = np.concatenate([idx for idx, _ in parts])
    inverse = np.empty_like(where)
    inverse[where] = np.arange(len(where))
    table = table.take(pa.array(inverse))
    return table.add_column(0, "id", pa.array(ids))
