"""A caption-counts folder: how many training images carry each caption, written by `replica captions`.

```
{captions}/_captions.json                   CaptionsInfo, written last: the counts are complete
{captions}/counts/part-{p:05d}.parquet      one row per distinct caption whose hash falls in bucket p
{captions}/_partial/{group}/{p:05d}.parquet one group of embedding shards' counts, bucket p
{captions}/_partial/{group}.json            PartialRecord (the group's shards and rows), written after its buckets
{captions}/_lock.json                       the lock of the run writing the folder (pipeline/layout/lock.py)
```

Counting is a map over groups of embedding shards (each writes its partial counts split into
buckets by hash) then a reduce per bucket (every group's file of that bucket summed); buckets are
chosen by the normalised caption's hash, so both counts of a caption are complete in one bucket.
A rerun counts only the shards no partial record holds, then sums every bucket again.

Rows of ``counts/``: ``caption_hash`` (int64, of the caption as stored) and ``normalized_hash``
(of the normalised caption, pipeline/captions.py), ``caption_count`` and ``normalized_count`` (training
rows carrying it), and ``normalized`` (the normalised text, kept when more than one row carries it).
Search and analysts join a caption to its counts by hash.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import ConfigError
from pipeline.layout import known_fields
from pipeline.storage import Folder

INFO_FILE = "_captions.json"
COUNTS_DIR = "counts"
PARTIAL_DIR = "_partial"
FORMAT_VERSION = 1


def partial_schema() -> pa.Schema:
    """One group's counts: one row per distinct caption of the group."""
    return pa.schema([
        pa.field("caption_hash", pa.int64(), nullable=False),
        pa.field("normalized_hash", pa.int64(), nullable=False),
        pa.field("count", pa.int64(), nullable=False),
        pa.field("normalized", pa.string()),
    ])


def counts_schema() -> pa.Schema:
    """``counts/part-*.parquet``: one row per distinct caption of the corpus."""
    return pa.schema([
        pa.field("caption_hash", pa.int64(), nullable=False),
        pa.field("normalized_hash", pa.int64(), nullable=False),
        pa.field("caption_count", pa.int64(), nullable=False),
        pa.field("normalized_count", pa.int64(), nullable=False),
        pa.field("normalized", pa.string()),
    ])


@dataclass
class PartialRecord:
    """``_partial/{group}.json``: which embedding shards a group counted, written after its bucket files."""

    group: str
    shards: list[str]
    #: hash buckets it was split into (fixed for the folder)
    partitions: int
    rows: int
    rows_with_caption: int
    seconds: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "PartialRecord":
        return cls(**known_fields(cls, d))


@dataclass
class CaptionsInfo:
    """``_captions.json``: what was counted and how; written last."""

    embeddings: str
    #: how captions are normalised and hashed (pipeline/captions.py NORMALIZATION)
    normalization: str
    partitions: int
    shards: int
    #: training rows read, rows with a caption, distinct captions (exact and normalised)
    rows: int
    rows_with_caption: int
    distinct_captions: int
    distinct_normalized: int
    seconds: float | None = None
    #: rows per second of the whole run and of the map tasks (their summed time)
    timings: dict[str, float] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "CaptionsInfo":
        return cls(**known_fields(cls, d))


class CaptionsFolder(Folder):
    """A caption-counts folder (layout in the module docstring)."""

    def partial_name(self, group: str, bucket: int) -> str:
        return f"{PARTIAL_DIR}/{group}/{bucket:05d}.parquet"

    def counts_name(self, bucket: int) -> str:
        return f"{COUNTS_DIR}/part-{bucket:05d}.parquet"

    def lock(self, command: str, **kwargs: Any):
        from pipeline.layout.lock import OutputLock

        return OutputLock(self, command, **kwargs)

    # -- map outputs ----------------------------------------------------------------------
    def write_partial(self, record: PartialRecord, buckets: list[pa.Table]) -> None:
        """Every bucket file of a group, then its record (the group's completion marker)."""
        for b, table in enumerate(buckets):
            with self.atomic(self.partial_name(record.group, b)) as f:
                pq.write_table(table.cast(partial_schema()), f, compression="zstd")
        self.write_json(f"{PARTIAL_DIR}/{record.group}.json", record.to_json())

    def partial_records(self) -> list[PartialRecord]:
        return [PartialRecord.from_json(self.read_json(f"{PARTIAL_DIR}/{n}"))
                for n in self.sub(PARTIAL_DIR).names("*.json")]

    def read_partial(self, group: str, bucket: int) -> pa.Table:
        with self.open(self.partial_name(group, bucket)) as f:
            return pq.read_table(f).cast(partial_schema())

    # -- reduce outputs -------------------------------------------------------------------
    def write_counts(self, bucket: int, table: pa.Table) -> None:
        with self.atomic(self.counts_name(bucket)) as f:
            pq.write_table(table.cast(counts_schema()), f, compression="zstd")

    def read_counts(self, bucket: int, columns: list[str] | None = None) -> pa.Table:
        with self.open(self.counts_name(bucket)) as f:
            return pq.read_table(f, columns=columns)

    def counts_url(self) -> str:
        """The counts as one Parquet dataset (a folder DuckDB and pyarrow read whole)."""
        return self.child(COUNTS_DIR)

    def write_info(self, info: CaptionsInfo) -> None:
        self.write_json(INFO_FILE, info.to_json())

    def read_info(self) -> CaptionsInfo:
        if not self.exists(INFO_FILE):
            raise ConfigError(f"{self.child(INFO_FILE)} does not exist: run `replica captions` on the corpus's "
                              "embeddings first (or it has not finished)")
        return CaptionsInfo.from_json(self.read_json(INFO_FILE))

    def read_info_if_any(self) -> CaptionsInfo | None:
        return self.read_info() if self.exists(INFO_FILE) else None
