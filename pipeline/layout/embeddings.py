"""An embeddings folder: what the embed and import stages write and the index reads.

```
{embeddings}/_replica.json          who made the vectors (EmbeddingsInfo), written before any shard
{embeddings}/{shard}.parquet        one row per sample of one input shard, vector in the row
{embeddings}/{shard}.stats.json     ShardStats, written last: its presence marks the shard complete
{embeddings}/{shard}.failed.json    FailureRecord: the shard kept failing (infrastructure); removed once complete
{embeddings}/_lock.json             the lock of the run writing the folder (pipeline/layout/lock.py)
```

A shard is written by :meth:`EmbeddingsFolder.write_shard` only: the Parquet file is
published atomically (temporary name + rename locally; a PUT is all-or-nothing on object
stores), then the stats file. A rerun skips shards with a stats file and redoes the rest, so
every sample lands exactly once whatever was killed in between.

The vector lives in the same Parquet row as its key, URL and caption, so nothing downstream
joins metadata to vectors by file position. Rows are in input order with ``row`` = position;
index ids encode ``row``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import ConfigError, MismatchError
from pipeline.storage import Folder

INFO_FILE = "_replica.json"
PARQUET_SUFFIX = ".parquet"
STATS_SUFFIX = ".stats.json"
FAILED_SUFFIX = ".failed.json"
FORMAT_VERSION = 1

# Row status values. Anything but "ok" has a null embedding and says why in `error`.
STATUS_OK = "ok"
STATUS_DECODE_ERROR = "decode_error"
STATUS_NO_IMAGE = "no_image"
STATUS_READ_ERROR = "read_error"
STATUS_EMBED_ERROR = "embed_error"
STATUS_DUPLICATE_KEY = "duplicate_key"

# Parquet file-metadata key holding the JSON identity of what made the file.
IDENTITY_KEY = b"replica.identity"

#: The columns a search match needs back from its embedding row.
ROW_COLUMNS = ("key", "url", "caption", "tar_url", "tar_offset", "tar_size", "sha256")


def embedding_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("key", pa.string(), nullable=False),
            pa.field("shard", pa.string(), nullable=False),
            pa.field("row", pa.int32(), nullable=False),
            pa.field("url", pa.string()),
            pa.field("caption", pa.string()),
            pa.field("width", pa.int32()),
            pa.field("height", pa.int32()),
            # Byte range of the image member inside its tar: a ranged read fetches one image.
            pa.field("tar_url", pa.string()),
            pa.field("tar_offset", pa.int64()),
            pa.field("tar_size", pa.int64()),
            pa.field("sha256", pa.string()),
            pa.field("status", pa.string(), nullable=False),
            pa.field("error", pa.string()),
            pa.field("embedding", pa.list_(pa.float16(), dim)),
        ]
    )


def embedding_column(vectors: np.ndarray | None, valid: np.ndarray, dim: int) -> pa.Array:
    """Fixed-size-list float16 column; rows where ``valid`` is False are null."""
    full = np.zeros((len(valid), dim), dtype=np.float16)
    if vectors is not None and valid.any():
        full[valid] = vectors.astype(np.float16)
    values = pa.array(full.reshape(-1), type=pa.float16())
    return pa.FixedSizeListArray.from_arrays(values, dim, mask=pa.array(~valid))


def vectors_of(table: pa.Table, column: str = "embedding") -> np.ndarray:
    """(n, dim) float32 matrix of a non-null fixed-size-list column."""
    col = table.column(column).combine_chunks()
    dim = col.type.list_size
    flat = col.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(-1, dim).astype(np.float32)


def identity_metadata(identity: dict[str, Any]) -> dict[bytes, bytes]:
    return {IDENTITY_KEY: json.dumps(identity, sort_keys=True).encode()}


def identity_of_schema(schema: pa.Schema) -> dict[str, Any] | None:
    raw = (schema.metadata or {}).get(IDENTITY_KEY)
    return json.loads(raw) if raw else None


def check_same_identity(have: dict[str, Any], want: dict[str, Any], where: str) -> None:
    """Refuse to mix outputs of different embedders or preprocessing."""
    from pipeline.embedders.base import with_upright

    if have != want:
        diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
        details = "; ".join(f"{k}: {have.get(k)!r} there vs {want.get(k)!r} now" for k in diff)
        hint = "use a new output location or the same embedder settings"
        if diff == ["preprocess"] and with_upright(str(have.get("preprocess")), True) == want.get("preprocess"):
            hint = ("it was embedded before images were turned upright by their EXIF orientation: use a new output "
                    "location, or continue it as it was made with --no-embedder-exif-orientation")
        raise MismatchError(f"{where} holds output made with other parameters ({details}); {hint}")


#: the columns every reader of an embedding shard relies on
REQUIRED_COLUMNS = ("row", "status", "embedding")


def check_columns(schema: pa.Schema, where: str) -> None:
    """Refuse a Parquet file that is not an embedding shard (one line, before anything reads it)."""
    missing = sorted(set(REQUIRED_COLUMNS) - set(schema.names))
    if missing:
        raise MismatchError(f"{where} is not an embedding shard: it lacks the column(s) {', '.join(missing)}")


def shard_table(shard: str, dim: int, identity: dict[str, Any], columns: Mapping[str, Sequence | pa.Array],
                vectors: np.ndarray | None, valid: np.ndarray) -> pa.Table:
    """One shard's table in the embedding schema.

    ``columns`` holds any schema columns but ``shard`` and ``embedding`` (``key`` and ``status``
    are required); missing ones are null, ``row`` defaults to the position. ``vectors`` holds
    the rows where ``valid`` is True, in order.
    """
    n = len(valid)
    sch = embedding_schema(dim)
    arrays = []
    for f in sch:
        if f.name == "embedding":
            arrays.append(embedding_column(vectors, np.asarray(valid, bool), dim))
        elif f.name == "shard":
            arrays.append(pa.array([shard] * n, pa.string()))
        elif f.name == "row" and "row" not in columns:
            arrays.append(pa.array(np.arange(n, dtype=np.int32)))
        elif f.name in columns:
            col = columns[f.name]
            arr = col if isinstance(col, pa.Array) else pa.array(col, type=f.type)
            arrays.append(arr.cast(f.type) if arr.type != f.type else arr)
        elif not f.nullable:
            raise ValueError(f"shard table needs the {f.name!r} column")
        else:
            arrays.append(pa.nulls(n, f.type))
    return pa.Table.from_arrays(arrays, schema=sch.with_metadata(identity_metadata(identity)))


@dataclass
class EmbeddingsInfo:
    """``_replica.json``: what made the vectors. ``embedder_config`` lets search rebuild the embedder."""

    identity: dict[str, Any]
    embedder_config: dict[str, Any] | None = None
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        out = {"identity": self.identity, "format_version": self.format_version}
        if self.embedder_config is not None:
            out["embedder_config"] = self.embedder_config
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "EmbeddingsInfo":
        return cls(identity=d["identity"], embedder_config=d.get("embedder_config"),
                   format_version=int(d.get("format_version", FORMAT_VERSION)))


@dataclass
class ShardStats:
    """``{shard}.stats.json``: the shard's counts, written last as its completion marker."""

    shard: str
    seen: int
    embedded: int
    #: rows by failure status ("decode_error": 3, ...)
    failed: dict[str, int] = field(default_factory=dict)
    #: why the input broke off (a truncated tar), else None
    shard_error: str | None = None
    tar_url: str | None = None
    output: str | None = None
    seconds: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    identity: dict[str, Any] | None = None
    embedded_by: dict[str, Any] | None = None
    #: import-embeddings: where the rows came from
    source: dict[str, Any] | None = None
    imported: bool = False
    #: members not read, by reason (links, devices, oversize members)
    skipped: dict[str, int] = field(default_factory=dict)
    #: bytes of the input read
    bytes_read: int = 0
    #: where the decode task ran and when (node, pid, start and end as Unix times)
    decoded_by: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ShardStats":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class FailureRecord:
    """``{shard}.failed.json``: a shard that kept failing for infrastructure reasons (it stays incomplete)."""

    shard: str
    input: str
    error: str
    attempts: int
    at: str
    #: a failure the run should not retry on its own (access denied, a missing object)
    permanent: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "FailureRecord":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class EmbeddingsFolder(Folder):
    """An embeddings folder (layout in the module docstring)."""

    def parquet_name(self, shard: str) -> str:
        return f"{shard}{PARQUET_SUFFIX}"

    def parquet_url(self, shard: str) -> str:
        return self.child(self.parquet_name(shard))

    def stats_url(self, shard: str) -> str:
        return self.child(f"{shard}{STATS_SUFFIX}")

    # -- the folder's identity ----------------------------------------------------------
    def read_info(self) -> EmbeddingsInfo:
        if not self.exists(INFO_FILE):
            raise ConfigError(
                f"{self.child(INFO_FILE)!r} does not exist: point at a folder written by "
                "`replica embed` or `replica import-embeddings`"
            )
        d = self.read_json(INFO_FILE)
        if "identity" not in d:
            raise ConfigError(f"{self.child(INFO_FILE)!r} has no embedder identity")
        return EmbeddingsInfo.from_json(d)

    def claim(self, info: EmbeddingsInfo) -> None:
        """Write the folder's identity, or refuse when it already holds vectors made otherwise."""
        if self.exists(INFO_FILE):
            check_same_identity(self.read_info().identity, info.identity, f"output {self.url!r}")
        else:
            self.write_json(INFO_FILE, info.to_json())

    # -- shards -------------------------------------------------------------------------
    def complete_shards(self) -> list[str]:
        """Names of shards whose stats file exists (one listing of the folder)."""
        return [n[: -len(STATS_SUFFIX)] for n in self.names(f"*{STATS_SUFFIX}")]

    def read_stats(self, shard: str) -> ShardStats:
        return ShardStats.from_json(self.read_json(f"{shard}{STATS_SUFFIX}"))

    def failed_shards(self) -> list[str]:
        """Shards with a failure record (they are incomplete; a rerun or --retry-failed redoes them)."""
        return [n[: -len(FAILED_SUFFIX)] for n in self.names(f"*{FAILED_SUFFIX}")]

    def record_failure(self, record: FailureRecord) -> None:
        self.write_json(f"{record.shard}{FAILED_SUFFIX}", record.to_json())

    def read_failure(self, shard: str) -> FailureRecord:
        return FailureRecord.from_json(self.read_json(f"{shard}{FAILED_SUFFIX}"))

    def write_shard(self, table: pa.Table, stats: ShardStats, row_group_size: int = 1024,
                    before_marker: Callable[[ShardStats], None] | None = None) -> None:
        """Publish ``{shard}.parquet`` atomically, then its stats file: the one shard writer.

        ``before_marker`` may complete the stats (timings) once the Parquet file is out.
        """
        with self.atomic(self.parquet_name(stats.shard)) as f:
            pq.write_table(table, f, row_group_size=row_group_size, compression="zstd")
        if before_marker is not None:
            before_marker(stats)
        self.write_json(f"{stats.shard}{STATS_SUFFIX}", stats.to_json())  # last: marks it complete
        if self.exists(f"{stats.shard}{FAILED_SUFFIX}"):  # an earlier failure is now history
            self.remove(f"{stats.shard}{FAILED_SUFFIX}")

    def shard_rows(self, shard: str) -> int:
        with self.open(self.parquet_name(shard)) as f:
            return pq.ParquetFile(f).metadata.num_rows

    def iter_batches(self, shard: str, columns: Sequence[str], batch_size: int = 8192) -> Iterator[pa.RecordBatch]:
        with self.open(self.parquet_name(shard)) as f:
            yield from pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=list(columns))

    def read_rows(self, shard: str, rows: np.ndarray, columns: Sequence[str]) -> pa.Table:
        """Rows ``rows`` (values of the ``row`` column) of one shard, in the order given.

        Reads only the row groups that hold them. Rows are written in input order with
        ``row`` = position, so row r sits at position r; that is checked against the ``row``
        column and, if a file breaks it, the whole ``row`` column is read to find them.
        """
        rows = np.asarray(rows, dtype=np.int64)
        want = list(dict.fromkeys(["row", *columns]))
        with self.open(self.parquet_name(shard)) as f:
            pf = pq.ParquetFile(f)
            md = pf.metadata
            starts = np.zeros(md.num_row_groups + 1, dtype=np.int64)
            for i in range(md.num_row_groups):
                starts[i + 1] = starts[i] + md.row_group(i).num_rows
            if not ((rows < 0).any() or (rows >= starts[-1]).any()):
                table = _take_positions(pf, starts, rows, want)
                if np.array_equal(table.column("row").to_numpy(), rows):
                    return table
            # Fallback: the file is not in row order; locate rows by the `row` column.
            where = {int(r): i for i, r in enumerate(pf.read(columns=["row"]).column("row").to_numpy())}
            missing = [int(r) for r in rows if int(r) not in where]
            if missing:
                raise KeyError(f"{self.parquet_url(shard)}: rows {missing[:5]} not present")
            return _take_positions(pf, starts, np.array([where[int(r)] for r in rows], np.int64), want)


def _take_positions(pf: pq.ParquetFile, starts: np.ndarray, positions: np.ndarray, columns: list[str]) -> pa.Table:
    groups = np.searchsorted(starts, positions, side="right") - 1
    needed = sorted(set(int(g) for g in groups))
    table = pf.read_row_groups(needed, columns=columns)
    base, acc = {}, 0
    for g in needed:  # position of each needed row group inside their concatenation
        base[g] = acc
        acc += int(starts[g + 1] - starts[g])
    local = np.array([base[int(g)] + int(p) - int(starts[g]) for g, p in zip(groups, positions)], dtype=np.int64)
    return table.take(pa.array(local))
