"""Bring your own embeddings: the clip-retrieval / LAION release layout -> embedding Parquet.

Input (as published for LAION-5B, and as clip-retrieval writes it)::

    {input}/img_emb/img_emb_{i}.npy            (n_i, dim) float16, L2-normalised
    {input}/metadata/metadata_{i}.parquet      n_i rows: key/url/caption/... in the same order

The release joins the two by row position; this is the one place replica does so. Each
output row carries its key, URL, caption and vector together, so nothing downstream relies
on positions. A file of ~1M rows becomes several shards of ``rows_per_shard`` rows, named
``{prefix}{i:06d}_{chunk:04d}``; each is written by the embed stage's shard writer (Parquet first, stats file last as the
completion marker), and a rerun skips complete shards.
Vectors are read by byte range from the .npy, so memory stays at one shard.
"""
from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import ImportConfig
from pipeline.errors import ConfigError, MismatchError
from pipeline.layout import embeddings as emb
from pipeline.layout.embeddings import EmbeddingsFolder, EmbeddingsInfo, ShardStats
from pipeline.progress import NullProgress, Progress
from pipeline.storage import Folder, read_range

_NPY = re.compile(r"img_emb_(\d+)\.npy$")


def npy_header(folder: Folder, rel: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, byte offset of the data) of a .npy file, reading only its header."""
    with folder.open(rel) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        offset = f.tell()
    if fortran or len(shape) != 2:
        raise ConfigError(f"{folder.child(rel)}: expected a C-ordered 2-D array, got shape {shape} (fortran={fortran})")
    return tuple(shape), np.dtype(dtype), offset


@dataclass
class ReleaseFile:
    """One release file pair: img_emb/img_emb_{i}.npy and metadata/metadata_{i}.parquet."""

    number: int
    npy: str
    metadata: str
    rows: int = 0
    dim: int = 0
    dtype: Any = None
    offset: int = 0


@dataclass
class ImportPlan:
    cfg: ImportConfig
    release: Folder
    output: EmbeddingsFolder
    files: list[ReleaseFile]
    dim: int
    identity: dict[str, Any]


def plan(cfg: ImportConfig) -> ImportPlan:
    """Check the settings and the release's files before any work."""
    if not cfg.input or not cfg.output:
        raise ConfigError("import-embeddings needs input (the release folder) and output (an embeddings folder)")
    if not cfg.embedder or not cfg.model:
        raise ConfigError(
            "import-embeddings needs the embedder identity of the released vectors: "
            "embedder and model (e.g. --embedder open_clip --model ViT-L-14 --weights openai)"
        )
    if cfg.rows_per_shard < 1 or cfg.rows_per_shard > (1 << 24):
        raise ConfigError("rows_per_shard must be between 1 and 16777216 (rows of one shard fit the id's row bits)")
    if cfg.row_group_size < 1:
        raise ConfigError("row_group_size must be >= 1")
    release = Folder(cfg.input, cfg.s3)
    if not release.exists("img_emb"):
        raise ConfigError(f"{cfg.input!r} has no img_emb/ folder (expected img_emb/img_emb_{{i}}.npy)")
    files = []
    for name in release.names("img_emb/img_emb_*.npy"):
        m = _NPY.search(name)
        if m:
            i = int(m.group(1))
            meta = f"metadata/metadata_{i}.parquet"
            if not release.exists(meta):
                raise ConfigError(f"{release.child(name)} has no metadata file {release.child(meta)!r}")
            files.append(ReleaseFile(i, name, meta))
    if not files:
        raise ConfigError(f"{cfg.input!r}/img_emb holds no img_emb_{{i}}.npy files")
    files.sort(key=lambda f: f.number)
    for f in files:
        shape, f.dtype, f.offset = npy_header(release, f.npy)
        f.rows, f.dim = shape
        with release.open(f.metadata) as fh:
            n_meta = pq.ParquetFile(fh).metadata.num_rows
        if n_meta != f.rows:
            raise MismatchError(f"{release.child(f.npy)} has {f.rows} rows but {release.child(f.metadata)} has "
                                f"{n_meta}: they must match row for row")
    dims = {f.dim for f in files}
    if len(dims) != 1:
        raise MismatchError(f"the .npy files have different dims {sorted(dims)}")
    dim = dims.pop()
    if cfg.dim and cfg.dim != dim:
        raise MismatchError(f"the released vectors have dim {dim}, not the {cfg.dim} given")
    identity = {"embedder": cfg.embedder, "model": cfg.model, "weights": cfg.weights, "dim": dim,
                "preprocess": cfg.preprocess}
    return ImportPlan(cfg, release, EmbeddingsFolder(cfg.output, cfg.s3), files, dim, identity)


def _column(meta: pa.Table, name: str, a: int, b: int, typ: pa.DataType) -> pa.Array:
    if name and name in meta.column_names:
        col = meta.column(name).slice(a, b - a).combine_chunks()
        return col.cast(typ) if col.type != typ else col
    return pa.nulls(b - a, typ)


def import_shard(p: ImportPlan, name: str, f: ReleaseFile, meta: pa.Table, a: int, b: int) -> ShardStats:
    """Rows a..b of one release file -> one embedding shard."""
    cfg, dim = p.cfg, p.dim
    itemsize = f.dtype.itemsize
    raw = read_range(p.release.child(f.npy), f.offset + a * dim * itemsize, (b - a) * dim * itemsize, cfg.s3)
    vecs = np.frombuffer(raw, dtype=f.dtype).reshape(b - a, dim)
    valid = np.isfinite(vecs).all(axis=1)
    n = b - a
    key = _column(meta, cfg.key_column, a, b, pa.string()).to_pylist()
    columns = {
        "key": [k if k is not None else f"{name}-{r:07d}" for r, k in enumerate(key)],
        "url": _column(meta, cfg.url_column, a, b, pa.string()),
        "caption": _column(meta, cfg.caption_column, a, b, pa.string()),
        "width": _column(meta, "width", a, b, pa.int32()),
        "height": _column(meta, "height", a, b, pa.int32()),
        "sha256": _column(meta, "sha256", a, b, pa.string()),
        "status": np.where(valid, emb.STATUS_OK, emb.STATUS_EMBED_ERROR).tolist(),
        "error": [None if v else "non-finite value in released vector" for v in valid],
    }
    table = emb.shard_table(name, dim, p.identity, columns, vecs[valid] if valid.any() else None, valid)
    stats = ShardStats(shard=name, output=p.output.parquet_url(name), seen=n, embedded=int(valid.sum()),
                       failed={emb.STATUS_EMBED_ERROR: int((~valid).sum())} if (~valid).any() else {},
                       source={"npy": p.release.child(f.npy), "rows": [a, b]}, identity=p.identity, imported=True)
    p.output.write_shard(table, stats, cfg.row_group_size)
    return stats


def raise_for_failures(summary: dict[str, Any], max_failed_fraction: float) -> None:
    """Exit code 3 when more than ``max_failed_fraction`` of the imported vectors are unusable."""
    from pipeline.errors import TooManyFailures

    rows, failed = summary["rows_written"], summary["rows_failed"]
    if rows and failed / rows > max_failed_fraction:
        raise TooManyFailures(f"{failed} of {rows} released vectors are unusable, over --max-failed-fraction "
                              f"{max_failed_fraction}")


def run_import(cfg: ImportConfig, progress: Progress | None = None, threads: int = 4) -> dict[str, Any]:
    from pipeline.layout.lock import OutputLock

    progress = progress or NullProgress()
    p = plan(cfg)
    with OutputLock(p.output, "replica import-embeddings", break_lock=cfg.break_lock,
                    stale_after_s=cfg.lock_stale_after_s):
        return _import_locked(p, progress, threads)


def _import_locked(p: ImportPlan, progress: Progress, threads: int) -> dict[str, Any]:
    cfg = p.cfg
    p.output.claim(EmbeddingsInfo(identity=p.identity))
    jobs = [(f"{cfg.prefix}{f.number:06d}_{j:04d}", f, a, min(f.rows, a + cfg.rows_per_shard))
            for f in p.files for j, a in enumerate(range(0, f.rows, cfg.rows_per_shard))]
    complete = set(p.output.complete_shards())
    todo = [jb for jb in jobs if jb[0] not in complete]
    progress.log(f"{len(p.files)} release file(s), {sum(f.rows for f in p.files):,} vectors of dim {p.dim} -> "
                 f"{len(jobs)} shard(s), {len(jobs) - len(todo)} already done")
    t0 = time.time()
    rows = failed = 0
    with progress.task("import", len(todo), "shards") as bar:
        for f in p.files:  # one release file at a time: its metadata is read once
            mine = [jb for jb in todo if jb[1] is f]
            if not mine:
                continue
            with p.release.open(f.metadata) as fh:
                pf = pq.ParquetFile(fh)
                cols = [c for c in (cfg.key_column, cfg.url_column, cfg.caption_column, "width", "height", "sha256")
                        if c and c in pf.schema_arrow.names]
                meta = pf.read(columns=cols)
            with ThreadPoolExecutor(max_workers=threads) as pool:
                for stats in pool.map(lambda jb: import_shard(p, jb[0], f, meta, jb[2], jb[3]), mine):
                    rows += stats.seen
                    failed += stats.seen - stats.embedded
                    bar.advance()
    return {"shards": len(jobs), "written": len(todo), "rows_written": rows, "rows_failed": failed, "dim": p.dim,
            "identity": p.identity, "seconds": round(time.time() - t0, 3)}
