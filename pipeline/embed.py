"""Embed stage: WebDataset tars -> ``{output}/{shard}.parquet``, one file per input tar.

Work is split so each part scales on its own resource:

* one Ray task per input tar (CPU): stream the tar, decode and preprocess images, send
  batches to the embedding actors, then write the shard's Parquet file and stats;
* a pool of embedding actors (one GPU each when the cluster has GPUs): the model is built
  in the actor's constructor and only ever sees preprocessed uint8 batches.

Ray Data's read_webdataset/write_parquet would not keep one output per tar and fail a whole
read task on one truncated tar, hence plain tasks and actors. Memory stays bounded: the
driver keeps at most ``max_tars_in_flight`` tars in progress, and each task at most
``MAX_BATCHES_IN_FLIGHT`` batches waiting on an actor.

A shard is complete when its ``{shard}.stats.json`` exists: it is written last, after the
Parquet file was published atomically. Reruns skip complete shards and redo the others, so
every sample ends up in the output exactly once, whatever was killed in between.
"""
from __future__ import annotations

import io
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from pipeline import schema
from pipeline.config import EmbedConfig, EmbedderConfig, to_dict
from pipeline.embedders import build_embedder, build_preprocessor, check_same_identity, validate
from pipeline.errors import ConfigError, ReplicaError
from pipeline.io import Storage, atomic_output, check_writable, exists, expand_inputs, missing_files, filesystem, join, read_json, write_json
from pipeline.tars import Sample, TarReadResult, iter_samples, shard_name

MAX_BATCHES_IN_FLIGHT = 2
MANIFEST = "_replica.json"


def stats_url(output: str, shard: str) -> str:
    return join(output, f"{shard}.stats.json")


def parquet_url(output: str, shard: str) -> str:
    return join(output, f"{shard}.parquet")


# --------------------------------------------------------------------------- validation


@dataclass
class EmbedPlan:
    cfg: EmbedConfig
    tars: list[str]
    shards: list[str]


def plan(cfg: EmbedConfig) -> EmbedPlan:
    """Check everything that can be checked before work starts; raise ConfigError if not."""
    if not cfg.input:
        raise ConfigError("no input given: pass --input with tar URLs, a glob or a brace list")
    if not cfg.output:
        raise ConfigError("no output given: pass --output with a folder URL for the embeddings")
    if cfg.batch_size < 1 or cfg.row_group_size < 1:
        raise ConfigError("batch_size and row_group_size must be >= 1")
    validate(cfg.embedder, cfg.storage)
    build_preprocessor(cfg.embedder, cfg.storage)  # cheap; catches missing descriptor files early
    try:
        tars = expand_inputs(cfg.input, cfg.storage)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot list input {cfg.input}: {exc}") from exc
    missing = missing_files(tars, cfg.storage)
    if not tars or missing:
        what = missing[0] if missing else ", ".join(cfg.input)
        raise ConfigError(f"no input tar at {what!r}: check --input (a path, glob or brace list of .tar files)")
    shards = [shard_name(t) for t in tars]
    dupes = sorted({s for s in shards if shards.count(s) > 1})
    if dupes:
        raise ConfigError(f"two input tars share the shard name {dupes[0]!r}; outputs are named by tar basename")
    try:
        check_writable(cfg.output, cfg.storage)
    except Exception as exc:  # noqa: BLE001 - any failure to write means the same to the user
        raise ConfigError(f"cannot write to output {cfg.output!r}: {type(exc).__name__}: {exc}") from exc
    return EmbedPlan(cfg=cfg, tars=tars, shards=shards)


def check_output_identity(output: str, identity: dict[str, Any], storage: Storage | None) -> None:
    """Refuse an output folder that holds embeddings made with other parameters."""
    url = join(output, MANIFEST)
    if exists(url, storage):
        check_same_identity(read_json(url, storage)["identity"], identity, f"output {output!r}")


def write_manifest(output: str, identity: dict[str, Any], embedder: EmbedderConfig, storage: Storage | None) -> None:
    """Record what made the vectors; the embedder settings let search rebuild the same embedder."""
    url = join(output, MANIFEST)
    if not exists(url, storage):
        record = {"identity": identity, "embedder_config": to_dict(embedder), "format_version": schema.FORMAT_VERSION}
        write_json(url, record, storage)


def completed_shards(output: str, storage: Storage | None) -> set[str]:
    """Shards whose stats file (the completion marker) exists: one listing of the folder."""
    fs, path = filesystem(output, storage)
    if not fs.exists(path):
        return set()
    names = (p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    return {n[: -len(".stats.json")] for n in names if n.endswith(".stats.json")}


# --------------------------------------------------------------------------- per-shard work


class EmbedActor:
    """Holds one embedder (model loaded here, never pickled from the driver)."""

    def __init__(self, cfg: EmbedderConfig, storage: Storage | None):
        self.embedder = build_embedder(cfg, storage)

    def identity(self) -> dict[str, Any]:
        return self.embedder.identity()

    def embed(self, batch: np.ndarray) -> np.ndarray:
        return self.embedder.embed(batch).astype(np.float16)

    def where(self) -> dict[str, Any]:
        """Node and process of this actor, recorded in each shard's stats."""
        import os

        import ray

        return {"node": ray.util.get_node_ip_address(), "pid": os.getpid()}


@dataclass
class Row:
    key: str
    url: str | None = None
    caption: str | None = None
    width: int | None = None
    height: int | None = None
    tar_offset: int | None = None
    tar_size: int | None = None
    sha256: str | None = None
    status: str = schema.STATUS_OK
    error: str | None = None


def row_for(sample: Sample, preprocess: Callable, tar_url: str) -> tuple[Row, np.ndarray | None]:
    """Metadata row for one sample, and its preprocessed pixels when it decodes."""
    import hashlib

    from PIL import Image

    meta = sample.meta()
    row = Row(key=sample.key, url=meta.get("url"), caption=sample.caption())
    found = sample.image()
    if sample.error:
        row.status, row.error = schema.STATUS_READ_ERROR, sample.error
        return row, None
    if found is None:
        row.status, row.error = schema.STATUS_NO_IMAGE, f"no image member ({', '.join(sample.members) or 'empty'})"
        return row, None
    _, member = found
    row.tar_offset, row.tar_size = member.offset, member.size
    row.sha256 = hashlib.sha256(member.data).hexdigest()
    try:
        image = Image.open(io.BytesIO(member.data))
        row.width, row.height = image.size
        pixels = preprocess(image)
    except Exception as exc:  # noqa: BLE001 - a bad image is data, never a crash
        row.status, row.error = schema.STATUS_DECODE_ERROR, f"{type(exc).__name__}: {exc}"[:500]
        return row, None
    return row, pixels


def embed_shard(
    tar_url: str,
    output: str,
    embedder_cfg: EmbedderConfig,
    identity: dict[str, Any],
    actor,
    storage: Storage | None,
    batch_size: int,
    row_group_size: int,
) -> dict[str, Any]:
    """Embed one tar end to end and publish its Parquet file, then its stats (the marker)."""
    import ray

    started = time.time()
    shard = shard_name(tar_url)
    embedded_by = ray.get(actor.where.remote())
    preprocess = build_preprocessor(embedder_cfg, storage)
    dim = identity["dim"]
    rows: list[Row] = []
    vectors: dict[int, np.ndarray] = {}
    pending: deque[tuple[list[int], Any]] = deque()
    batch_rows: list[int] = []
    batch_pixels: list[np.ndarray] = []
    timings = Counter()

    def collect(block: bool) -> None:
        while pending and (block or len(pending) > MAX_BATCHES_IN_FLIGHT):
            idx, ref = pending.popleft()
            t = time.time()
            try:
                out = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:  # the model raised on this batch
                message = str(exc).strip().splitlines()[-1][:500]
                for i in idx:
                    rows[i].status, rows[i].error = schema.STATUS_EMBED_ERROR, message
                continue
            finally:
                timings["wait_model"] += time.time() - t
            for i, v in zip(idx, out):
                vectors[i] = v

    def flush() -> None:
        if batch_pixels:
            pending.append((list(batch_rows), actor.embed.remote(np.stack(batch_pixels))))
            batch_rows.clear()
            batch_pixels.clear()
            collect(block=False)

    read = TarReadResult()
    t = time.time()
    for sample in iter_samples(tar_url, storage, read):
        timings["read"] += time.time() - t
        t = time.time()
        row, pixels = row_for(sample, preprocess, tar_url)
        timings["decode_preprocess"] += time.time() - t
        rows.append(row)
        if pixels is not None:
            batch_rows.append(len(rows) - 1)
            batch_pixels.append(pixels)
            if len(batch_pixels) >= batch_size:
                flush()
        t = time.time()
    flush()
    collect(block=True)

    t = time.time()
    table = shard_table(rows, vectors, shard, tar_url, dim, identity)
    with atomic_output(parquet_url(output, shard), storage) as f:
        import pyarrow.parquet as pq

        pq.write_table(table, f, row_group_size=row_group_size, compression="zstd")
    timings["write"] += time.time() - t
    failed = Counter(r.status for r in rows if r.status != schema.STATUS_OK)
    stats = {
        "shard": shard,
        "tar_url": tar_url,
        "output": parquet_url(output, shard),
        "seen": len(rows),
        "embedded": sum(1 for r in rows if r.status == schema.STATUS_OK),
        "failed": dict(failed),
        "shard_error": read.error,
        "seconds": round(time.time() - started, 3),
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "identity": identity,
        "embedded_by": embedded_by,
    }
    write_json(stats_url(output, shard), stats, storage)  # last: marks the shard complete
    return stats


def shard_table(rows: list[Row], vectors: dict[int, np.ndarray], shard: str, tar_url: str, dim: int, identity: dict):
    import pyarrow as pa

    for i, r in enumerate(rows):  # an ok row whose batch never came back has no vector
        if r.status == schema.STATUS_OK and i not in vectors:
            r.status, r.error = schema.STATUS_EMBED_ERROR, "no vector returned"
    valid = np.array([r.status == schema.STATUS_OK for r in rows], dtype=bool)
    stacked = np.stack([vectors[i] for i in range(len(rows)) if valid[i]]) if valid.any() else None
    cols = {
        "key": [r.key for r in rows],
        "shard": [shard] * len(rows),
        "row": list(range(len(rows))),
        "url": [r.url for r in rows],
        "caption": [r.caption for r in rows],
        "width": [r.width for r in rows],
        "height": [r.height for r in rows],
        "tar_url": [tar_url] * len(rows),
        "tar_offset": [r.tar_offset for r in rows],
        "tar_size": [r.tar_size for r in rows],
        "sha256": [r.sha256 for r in rows],
        "status": [r.status for r in rows],
        "error": [r.error for r in rows],
    }
    sch = schema.embedding_schema(dim)
    arrays = [pa.array(cols[f.name], type=f.type) for f in sch if f.name != "embedding"]
    arrays.append(schema.embedding_column(stacked, valid, dim))
    return pa.Table.from_arrays(arrays, schema=sch.with_metadata(schema.identity_metadata(identity)))


# --------------------------------------------------------------------------- driver


@dataclass
class EmbedSummary:
    shards_total: int
    shards_skipped: int
    shards_done: int
    images: int
    embedded: int
    failed: dict[str, int]
    shard_errors: dict[str, str]
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


def run_embed(cfg: EmbedConfig, progress: bool = True, on_shard_done: Callable[[dict], None] | None = None) -> EmbedSummary:
    """Validate, connect to Ray, embed every incomplete shard, return the totals."""
    p = plan(cfg)
    from pipeline.ray_util import cluster_cpus, cluster_gpus, connect

    ray = connect(cfg.ray.address)
    gpus = cluster_gpus()
    gpus_per_actor = cfg.ray.gpus_per_actor if cfg.ray.gpus_per_actor >= 0 else (1.0 if gpus else 0.0)
    num_actors = cfg.ray.num_actors or (max(1, int(gpus // gpus_per_actor)) if gpus_per_actor else 1)
    in_flight = cfg.ray.max_tars_in_flight or max(1, int(cluster_cpus()))

    actor_cls = ray.remote(EmbedActor).options(
        num_gpus=gpus_per_actor,
        num_cpus=cfg.ray.cpus_per_actor,
        max_restarts=3,  # a lost worker is an infrastructure error: restart, bounded
        max_task_retries=3,
    )
    actors = [actor_cls.remote(cfg.embedder, cfg.storage) for _ in range(num_actors)]
    try:
        identity = ray.get(actors[0].identity.remote())
    except ray.exceptions.RayActorError as exc:
        if not exc.actor_init_failed:
            raise
        last = [line for line in str(exc).strip().splitlines() if line.strip()][-1]
        raise ReplicaError(f"the embedding actor could not load the embedder: {last.strip()}") from None
    check_output_identity(cfg.output, identity, cfg.storage)
    write_manifest(cfg.output, identity, cfg.embedder, cfg.storage)

    done = completed_shards(cfg.output, cfg.storage)
    todo = [(t, s) for t, s in zip(p.tars, p.shards) if s not in done]
    task = ray.remote(embed_shard).options(
        num_cpus=1,
        max_retries=3,
        retry_exceptions=[ray.exceptions.RayActorError, ray.exceptions.ObjectLostError, OSError],
    )
    summary = EmbedSummary(len(p.tars), len(p.tars) - len(todo), 0, 0, 0, Counter(), {}, 0.0)
    started = time.time()
    with ShardProgress(len(todo), enabled=progress) as bar:
        queue = deque(todo)
        running: dict[Any, str] = {}
        n = 0
        while queue or running:
            while queue and len(running) < in_flight:
                tar_url, shard = queue.popleft()
                ref = task.remote(tar_url, cfg.output, cfg.embedder, identity, actors[n % len(actors)],
                                  cfg.storage, cfg.batch_size, cfg.row_group_size)
                running[ref] = shard
                n += 1
            ready, _ = ray.wait(list(running), num_returns=1)
            shard = running.pop(ready[0])
            stats = ray.get(ready[0])
            summary.shards_done += 1
            summary.images += stats["seen"]
            summary.embedded += stats["embedded"]
            summary.failed.update(stats["failed"])
            if stats["shard_error"]:
                summary.shard_errors[shard] = stats["shard_error"]
            summary.seconds = time.time() - started
            bar.advance(summary)
            if on_shard_done:
                on_shard_done(stats)
    summary.seconds = time.time() - started
    summary.failed = dict(summary.failed)
    for a in actors:
        ray.kill(a)
    return summary


class ShardProgress:
    """Shards done/total, images/s, failures and ETA on one rich progress line."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.enabled = total, enabled
        self.progress = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("embed"), BarColumn(), MofNCompleteColumn(), TextColumn("shards"),
                TextColumn("{task.fields[rate]}"), TextColumn("{task.fields[failures]}"),
                TextColumn("ETA"), TimeRemainingColumn(),
            )
            self.progress.__enter__()
            self.task = self.progress.add_task("embed", total=self.total, rate="", failures="")
        return self

    def advance(self, s: EmbedSummary) -> None:
        if self.progress is not None:
            failures = sum(s.failed.values())
            self.progress.update(self.task, advance=1, rate=f"{s.images_per_s:,.0f} img/s",
                                 failures=f"{failures} failed")

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)
