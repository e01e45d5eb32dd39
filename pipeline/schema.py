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


# --- Search results (one run directory: {results}/run_id={run_id}/, see docs/RESULTS.md) ---

#: A box ``[x0, y0, x1, y1]`` in pixels of the image it refers to (x1/y1 exclusive).
BOX = pa.list_(pa.int32(), 4)


def matches_schema() -> pa.Schema:
    """``matches.parquet``: one row per query x rank (rank 1 = best)."""
    return pa.schema(
        [
            pa.field("run_id", pa.string(), nullable=False),
            pa.field("query_key", pa.string(), nullable=False),
            pa.field("prompt", pa.string()),
            pa.field("rank", pa.int32(), nullable=False),
            # The matched training image, as recorded in its embedding shard.
            pa.field("match_key", pa.string(), nullable=False),
            pa.field("shard", pa.string()),
            pa.field("row", pa.int32()),
            pa.field("url", pa.string()),
            pa.field("caption", pa.string()),
            pa.field("tar_url", pa.string()),
            pa.field("tar_offset", pa.int64()),
            pa.field("tar_size", pa.int64()),
            # Scores: ANN estimate, exact cosine on stored vectors, optional second descriptor,
            # and the final score that thresholds apply to.
            pa.field("score_index", pa.float32()),
            pa.field("score_exact", pa.float32()),
            pa.field("score_rerank", pa.float32()),
            pa.field("score", pa.float32(), nullable=False),
            # Which query region matched, and where it lies in the query.
            pa.field("region", pa.int32()),
            pa.field("region_box", BOX),
            pa.field("in_subset", pa.bool_()),
            # Local-feature verification (null when not run for this match).
            pa.field("inliers", pa.int32()),
            pa.field("verify_score", pa.float32()),
            pa.field("query_box", BOX),
            pa.field("match_box", BOX),
            # Near-duplicate group of the matched image and how many training copies it has.
            pa.field("dup_group", pa.string()),
            pa.field("dup_group_size", pa.int32()),
            pa.field("embedder", pa.string()),
            pa.field("preprocess", pa.string()),
        ]
    )


def queries_schema() -> pa.Schema:
    """``queries.parquet``: one row per query (generated image)."""
    return pa.schema(
        [
            pa.field("run_id", pa.string(), nullable=False),
            pa.field("query_key", pa.string(), nullable=False),
            pa.field("prompt", pa.string()),
            pa.field("source", pa.string()),
            # JPEG, longest side about 256 px: the gallery needs nothing else to show the query.
            pa.field("thumbnail", pa.binary()),
            pa.field("width", pa.int32()),
            pa.field("height", pa.int32()),
            # Null when the query had no match at all (e.g. everything blocklisted).
            pa.field("best_score", pa.float32()),
            pa.field("best_match_key", pa.string()),
            pa.field("best_score_in_subset", pa.float32()),
            pa.field("best_score_outside_subset", pa.float32()),
            pa.field("replicated", pa.bool_()),
            pa.field("copy_outside_subset_only", pa.bool_()),
        ]
    )


def baseline_schema() -> pa.Schema:
    """``baseline.parquet``: the corpus self-similarity, one row per sampled training image."""
    return pa.schema(
        [
            pa.field("run_id", pa.string(), nullable=False),
            pa.field("sample_key", pa.string(), nullable=False),
            # Best match excluding the sample itself.
            pa.field("top1_score", pa.float32()),
            pa.field("top1_key", pa.string()),
            # Best match excluding the sample itself and its near-duplicates.
            pa.field("top1_score_no_dups", pa.float32()),
            pa.field("near_dup_count", pa.int32()),
        ]
    )
