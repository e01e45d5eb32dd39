"""Column layouts of the Parquet files replica writes, and the identity recorded with them.

An embedding shard (``embeddings/{shard}.parquet``) holds one row per sample of one input
tar, in tar order. The vector lives in the same row as its key, URL and caption, so nothing
downstream joins metadata to vectors by file position.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa

FORMAT_VERSION = 1

# Row status values. Anything but "ok" has a null embedding and says why in `error`.
STATUS_OK = "ok"
STATUS_DECODE_ERROR = "decode_error"
STATUS_NO_IMAGE = "no_image"
STATUS_READ_ERROR = "read_error"
STATUS_EMBED_ERROR = "embed_error"

# Parquet file-metadata key holding the JSON identity of what made the file.
IDENTITY_KEY = b"replica.identity"


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
    meta = schema.metadata or {}
    raw = meta.get(IDENTITY_KEY)
    return json.loads(raw) if raw else None
