"""Bring your own embeddings: the clip-retrieval / LAION release layout -> embedding Parquet.

Input (as published for LAION-5B, and as clip-retrieval writes it)::

    {input}/img_emb/img_emb_{i}.npy            (n_i, dim) float16, L2-normalised
    {input}/metadata/metadata_{i}.parquet      n_i rows: key/url/caption/... in the same order

The release joins the two by row position; this is the one place replica does so. Each
output row carries its key, URL, caption and vector together, so nothing downstream relies
on positions. A file of ~1M rows becomes several shards of ``rows_per_shard`` rows, named
``{prefix}{i:06d}_{chunk:04d}``; each is written whole (Parquet first, stats file last, the
embed stage's completion marker), and a rerun skips shards whose stats file exists.
Vectors are read by byte range from the .npy, so memory stays at one shard.
"""
from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import io
from pipeline.config import ImportConfig
from pipeline.errors import ConfigError, MismatchError
from pipeline.schema import FORMAT_VERSION, STATUS_EMBED_ERROR, STATUS_OK, embedding_column, embedding_schema, identity_metadata

Progress = Callable[[str, int, int], None]
_NPY = re.compile(r"img_emb_(\d+)\.npy$")


def npy_header(url: str, storage: io.Storage | None = None) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, byte offset of the data) of a .npy file, reading only its header."""
    fs, path = io.filesystem(url, storage)
    with fs.open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        offset = f.tell()
    if fortran or len(shape) != 2:
        raise ConfigError(f"{url}: expected a C-ordered 2-D array, got shape {shape} (fortran={fortran})")
    return tuple(shape), np.dtype(dtype), offset


def find_inputs(cfg: ImportConfig) -> list[tuple[int, str, str]]:
    """[(i, npy url, metadata url)] in numeric order; every .npy needs its metadata file."""
    fs, path = io.filesystem(cfg.input, cfg.storage)
    emb_dir = path.rstrip("/") + "/img_emb"
    if not fs.exists(emb_dir):
        raise ConfigError(f"{cfg.input!r} has no img_emb/ folder (expected img_emb/img_emb_{{i}}.npy)")
    found = []
    for p in fs.glob(emb_dir + "/img_emb_*.npy"):
        m = _NPY.search(p)
        if m:
            i = int(m.group(1))
            meta = io.join(cfg.input, "metadata", f"metadata_{i}.parquet")
            if not io.exists(meta, cfg.storage):
                raise ConfigError(f"{p} has no metadata file {meta!r}")
            found.append((i, io.unstrip(fs, p), meta))
    if not found:
        raise ConfigError(f"{cfg.input!r}/img_emb holds no img_emb_{{i}}.npy files")
    return sorted(found)


def identity_of(cfg: ImportConfig, dim: int) -> dict[str, Any]:
    return {"embedder": cfg.embedder, "model": cfg.model, "weights": cfg.weights, "dim": dim, "preprocess": cfg.preprocess}


def validate(cfg: ImportConfig) -> None:
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


def _column(meta: pa.Table, name: str, a: int, b: int, typ: pa.DataType) -> pa.Array:
    if name and name in meta.column_names:
        col = meta.column(name).slice(a, b - a).combine_chunks()
        return col.cast(typ) if col.type != typ else col
    return pa.nulls(b - a, typ)


def write_shard(cfg: ImportConfig, name: str, npy: str, offset: int, dim: int, dtype: np.dtype,
                meta: pa.Table, a: int, b: int, identity: dict[str, Any]) -> dict[str, Any]:
    itemsize = dtype.itemsize
    raw = io.read_range(npy, offset + a * dim * itemsize, (b - a) * dim * itemsize, cfg.storage)
    vecs = np.frombuffer(raw, dtype=dtype).reshape(b - a, dim)
    valid = np.isfinite(vecs).all(axis=1)
    n = b - a
    key = _column(meta, cfg.key_column, a, b, pa.string())
    if key.null_count:
        fallback = pa.array([f"{name}-{r:07d}" for r in range(n)])
        key = pa.array([k if k is not None else f for k, f in zip(key.to_pylist(), fallback.to_pylist())], pa.string())
    schema = embedding_schema(dim).with_metadata(identity_metadata(identity))
    table = pa.table(
        {
            "key": key,
            "shard": pa.array([name] * n, pa.string()),
            "row": pa.array(np.arange(n, dtype=np.int32)),
            "url": _column(meta, cfg.url_column, a, b, pa.string()),
            "caption": _column(meta, cfg.caption_column, a, b, pa.string()),
            "width": _column(meta, "width", a, b, pa.int32()),
            "height": _column(meta, "height", a, b, pa.int32()),
            "tar_url": pa.nulls(n, pa.string()),
            "tar_offset": pa.nulls(n, pa.int64()),
            "tar_size": pa.nulls(n, pa.int64()),
            "sha256": _column(meta, "sha256", a, b, pa.string()),
            "status": pa.array(np.where(valid, STATUS_OK, STATUS_EMBED_ERROR), pa.string()),
            "error": pa.array([None if v else "non-finite value in released vector" for v in valid], pa.string()),
            "embedding": embedding_column(vecs[valid] if valid.any() else None, valid, dim),
        },
        schema=schema,
    )
    out = io.join(cfg.output, f"{name}.parquet")
    with io.atomic_output(out, cfg.storage) as f:
        pq.write_table(table, f, row_group_size=cfg.row_group_size)
    stats = {  # the embed stage's stats fields, plus where the rows came from
        "shard": name,
        "tar_url": None,
        "output": out,
        "seen": n,
        "embedded": int(valid.sum()),
        "failed": {STATUS_EMBED_ERROR: int((~valid).sum())} if (~valid).any() else {},
        "shard_error": None,
        "source": {"npy": npy, "rows": [a, b]},
        "identity": identity,
        "imported": True,
    }
    io.write_json(io.join(cfg.output, f"{name}.stats.json"), stats, cfg.storage)  # completion marker, last
    return stats


def run_import(cfg: ImportConfig, log: Callable[[str], None] = print, on_progress: Progress | None = None,
               threads: int = 4) -> dict[str, Any]:
    validate(cfg)
    inputs = find_inputs(cfg)
    headers = [npy_header(npy, cfg.storage) for _, npy, _ in inputs]
    dims = {h[0][1] for h in headers}
    if len(dims) != 1:
        raise MismatchError(f"the .npy files have different dims {sorted(dims)}")
    dim = dims.pop()
    if cfg.dim and cfg.dim != dim:
        raise MismatchError(f"the released vectors have dim {dim}, not the {cfg.dim} given")
    identity = identity_of(cfg, dim)
    info_url = io.join(cfg.output, "_replica.json")
    if io.exists(info_url, cfg.storage):
        from pipeline.embedders import check_same_identity

        check_same_identity(io.read_json(info_url, cfg.storage)["identity"], identity, cfg.output)
    else:
        io.write_json(info_url, {"identity": identity, "format_version": FORMAT_VERSION}, cfg.storage)
    jobs = []
    for (i, npy, meta_url), (shape, dtype, offset) in zip(inputs, headers):
        fs, mpath = io.filesystem(meta_url, cfg.storage)
        with fs.open(mpath, "rb") as f:
            n_meta = pq.ParquetFile(f).metadata.num_rows
        if n_meta != shape[0]:
            raise MismatchError(f"{npy} has {shape[0]} rows but {meta_url} has {n_meta}: they must match row for row")
        for j, a in enumerate(range(0, shape[0], cfg.rows_per_shard)):
            jobs.append((f"{cfg.prefix}{i:06d}_{j:04d}", i, npy, meta_url, offset, dtype, a, min(shape[0], a + cfg.rows_per_shard)))
    todo = [jb for jb in jobs if not io.exists(io.join(cfg.output, f"{jb[0]}.stats.json"), cfg.storage)]
    log(f"{len(inputs)} release file(s), {sum(h[0][0] for h in headers):,} vectors of dim {dim} -> "
        f"{len(jobs)} shard(s), {len(jobs) - len(todo)} already done")
    t0 = time.time()
    meta_cache: dict[str, pa.Table] = {}
    done = 0
    rows = 0
    for i, npy, meta_url in inputs:  # one release file at a time: its metadata is read once
        mine = [jb for jb in todo if jb[1] == i]
        if not mine:
            continue
        fs, mpath = io.filesystem(meta_url, cfg.storage)
        with fs.open(mpath, "rb") as f:
            pf = pq.ParquetFile(f)
            cols = [c for c in (cfg.key_column, cfg.url_column, cfg.caption_column, "width", "height", "sha256")
                    if c and c in pf.schema_arrow.names]
            meta_cache[meta_url] = pf.read(columns=cols)
        with ThreadPoolExecutor(max_workers=threads) as pool:
            futs = [pool.submit(write_shard, cfg, jb[0], npy, jb[4], dim, jb[5], meta_cache[meta_url], jb[6], jb[7], identity)
                    for jb in mine]
            for fut in futs:
                rows += fut.result()["seen"]
                done += 1
                if on_progress:
                    on_progress("import", done, len(todo))
        meta_cache.pop(meta_url)
    summary = {"shards": len(jobs), "written": len(todo), "rows_written": rows, "dim": dim,
               "identity": identity, "seconds": round(time.time() - t0, 3)}
    log(f"imported {rows:,} rows into {len(todo)} shard(s) in {summary['seconds']} s")
    return summary
