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

Shards are written by :meth:`pipeline.layout.embeddings.EmbeddingsFolder.write_shard` (Parquet
published atomically, then the stats file as the completion marker). Reruns skip complete
shards and redo the others, so every sample ends up in the output exactly once, whatever was
killed in between. Tars go to whichever embedding actor has the fewest tars in flight
(:func:`pipeline.ray_util.run_bounded`).
"""
from __future__ import annotations

import hashlib
import io
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from pipeline.config import EmbedConfig, EmbedderConfig, to_dict
from pipeline.embedders import build_embedder, build_preprocessor, validate
from pipeline.errors import ConfigError, ReplicaError, RunIncomplete, TooManyFailures
from pipeline.layout import embeddings as emb
from pipeline.layout.embeddings import EmbeddingsFolder, EmbeddingsInfo, FailureRecord, ShardStats
from pipeline.layout.ingest import complete_only
from pipeline.progress import NullProgress, Progress
from pipeline.storage import expand_inputs, missing_files
from pipeline.tars import Sample, TarReadResult, iter_samples, shard_name

MAX_BATCHES_IN_FLIGHT = 2


# --------------------------------------------------------------------------- plan


@dataclass
class EmbedPlan:
    cfg: EmbedConfig
    output: EmbeddingsFolder
    tars: list[str]
    shards: list[str]
    #: tars of an ingest folder that are not complete yet (left for a later run)
    unfinished: list[str] = field(default_factory=list)


def check_settings(cfg: EmbedConfig) -> None:
    """The checks that need no input tars (``replica pipeline`` runs them before its ingest makes the tars)."""
    if not cfg.output:
        raise ConfigError("no output given: pass --output with a folder URL for the embeddings")
    for name in ("batch_size", "row_group_size", "shard_attempts", "max_member_bytes"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if not 0 <= cfg.max_failed_fraction <= 1 or cfg.max_failed_shards < 0:
        raise ConfigError("max_failed_fraction must lie in [0, 1] and max_failed_shards be >= 0")
    validate(cfg.embedder, cfg.s3)
    build_preprocessor(cfg.embedder, cfg.s3)  # cheap; catches missing descriptor files early


def plan(cfg: EmbedConfig) -> EmbedPlan:
    """Check everything that can be checked before work starts; raise ConfigError if not."""
    if not cfg.input:
        raise ConfigError("no input given: pass --input with tar URLs, a glob or a brace list")
    check_settings(cfg)
    try:
        tars = expand_inputs(cfg.input, cfg.s3)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot list input {cfg.input}: {exc}") from exc
    missing = missing_files(tars, cfg.s3)
    if not tars or missing:
        what = missing[0] if missing else ", ".join(cfg.input)
        raise ConfigError(f"no input tar at {what!r}: check --input (a path, glob or brace list of .tar files)")
    tars, unfinished = complete_only(tars, cfg.s3)  # `replica ingest` may still be writing some
    if not tars:
        raise ConfigError(f"none of the {len(unfinished)} input tar(s) is complete yet: `replica ingest` is still writing "
                          f"them or was stopped (rerun it), e.g. {unfinished[0]!r}")
    shards = [shard_name(t) for t in tars]
    dupes = sorted(s for s, n in Counter(shards).items() if n > 1)  # one pass: LAION-5B has ~585k tars
    if dupes:
        raise ConfigError(f"two input tars share the shard name {dupes[0]!r}; outputs are named by tar basename")
    output = EmbeddingsFolder(cfg.output, cfg.s3)
    try:
        output.check_writable()
    except Exception as exc:  # noqa: BLE001 - any failure to write means the same to the user
        raise ConfigError(f"cannot write to output {cfg.output!r}: {type(exc).__name__}: {exc}") from exc
    return EmbedPlan(cfg=cfg, output=output, tars=tars, shards=shards, unfinished=unfinished)


# --------------------------------------------------------------------------- per-shard work


class EmbedActor:
    """Holds one embedder (model loaded here, never pickled from the driver)."""

    def __init__(self, cfg: EmbedderConfig, storage):
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
    status: str = emb.STATUS_OK
    error: str | None = None


def row_for(sample: Sample, preprocess: Callable, max_member_bytes: int) -> tuple[Row, np.ndarray | None]:
    """Metadata row for one sample, and its preprocessed pixels when it decodes."""
    from PIL import Image

    from pipeline.embedders.base import viewed_size

    meta = sample.meta()
    url = meta.get("url")
    row = Row(key=sample.key, url=url if isinstance(url, str) else None, caption=sample.caption())
    found = sample.image()
    if sample.error:
        row.status, row.error = emb.STATUS_READ_ERROR, sample.error
        return row, None
    if found is None:
        row.status, row.error = emb.STATUS_NO_IMAGE, f"no image member ({', '.join(sample.members) or 'empty'})"
        return row, None
    _, member = found
    row.tar_offset, row.tar_size = member.offset, member.size
    if member.data is None:
        row.status = emb.STATUS_DECODE_ERROR
        row.error = f"image member of {member.size:,} bytes exceeds max_member_bytes ({max_member_bytes:,}): not read"
        return row, None
    row.sha256 = hashlib.sha256(member.data).hexdigest()
    try:
        image = Image.open(io.BytesIO(member.data))
        row.width, row.height = viewed_size(image)  # the size verification and the report show
        pixels = preprocess(image)
    except Exception as exc:  # noqa: BLE001 - a bad image is data, never a crash (PIL's OSError included)
        row.status, row.error = emb.STATUS_DECODE_ERROR, f"{type(exc).__name__}: {exc}"[:500]
        return row, None
    return row, pixels


def shard_table(rows: list[Row], vectors: dict[int, np.ndarray], shard: str, tar_url: str, dim: int,
                identity: dict[str, Any]):
    for i, r in enumerate(rows):  # an ok row whose batch never came back has no vector
        if r.status == emb.STATUS_OK and i not in vectors:
            r.status, r.error = emb.STATUS_EMBED_ERROR, "no vector returned"
    valid = np.array([r.status == emb.STATUS_OK for r in rows], dtype=bool)
    stacked = np.stack([vectors[i] for i in range(len(rows)) if valid[i]]) if valid.any() else None
    columns = {name: [getattr(r, name) for r in rows] for name in
               ("key", "url", "caption", "width", "height", "tar_offset", "tar_size", "sha256", "status", "error")}
    columns["tar_url"] = [tar_url] * len(rows)
    return emb.shard_table(shard, dim, identity, columns, stacked, valid)


def embed_shard(tar_url: str, output: EmbeddingsFolder, embedder_cfg: EmbedderConfig, identity: dict[str, Any],
                actor, batch_size: int, row_group_size: int, max_member_bytes: int) -> ShardStats:
    """Embed one tar end to end; publish its Parquet file, then its stats (the marker).

    Bad data becomes rows. Anything raised is an infrastructure failure (storage, a lost
    actor): nothing is written for the shard, and the driver retries or records it.
    """
    import os

    import ray

    started = time.time()
    shard = shard_name(tar_url)
    embedded_by = ray.get(actor.where.remote())
    preprocess = build_preprocessor(embedder_cfg, output.storage)
    rows: list[Row] = []
    first_row: dict[str, int] = {}
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
            except ray.exceptions.RayTaskError as exc:  # the model raised on this batch: data
                message = str(exc).strip().splitlines()[-1][:500]
                for i in idx:
                    rows[i].status, rows[i].error = emb.STATUS_EMBED_ERROR, message
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
    for sample in iter_samples(tar_url, output.storage, read, max_member_bytes=max_member_bytes):
        timings["read"] += time.time() - t
        t = time.time()
        if sample.key in first_row:  # a key seen earlier in this tar: kept as a row, never embedded twice
            row, pixels = Row(key=sample.key, status=emb.STATUS_DUPLICATE_KEY,
                              error=f"key already at row {first_row[sample.key]} of this tar"), None
        else:
            first_row[sample.key] = len(rows)
            row, pixels = row_for(sample, preprocess, max_member_bytes)
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
    table = shard_table(rows, vectors, shard, tar_url, identity["dim"], identity)
    stats = ShardStats(
        shard=shard, tar_url=tar_url, output=output.parquet_url(shard), seen=len(rows),
        embedded=sum(1 for r in rows if r.status == emb.STATUS_OK),
        failed=dict(Counter(r.status for r in rows if r.status != emb.STATUS_OK)),
        shard_error=read.error, identity=identity, embedded_by=embedded_by, skipped=dict(read.skipped),
        bytes_read=read.bytes_read,
    )

    def finish(st: ShardStats) -> None:
        timings["write"] += time.time() - t
        st.seconds = round(time.time() - started, 3)
        st.timings = {k: round(v, 3) for k, v in timings.items()}
        st.decoded_by = {"node": ray.util.get_node_ip_address(), "pid": os.getpid(), "started": round(started, 3),
                         "finished": round(time.time(), 3)}

    output.write_shard(table, stats, row_group_size, before_marker=finish)
    return stats


# --------------------------------------------------------------------------- driver


@dataclass
class EmbedSummary:
    shards_total: int
    shards_skipped: int
    shards_done: int = 0
    images: int = 0
    embedded: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    #: tars that are damaged (data): a truncated or unreadable tar, with their error
    shard_errors: dict[str, str] = field(default_factory=dict)
    #: tars that kept failing for infrastructure reasons: incomplete, a rerun redoes them
    shards_failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    @property
    def failed_fraction(self) -> float:
        return sum(self.failed.values()) / self.images if self.images else 0.0

    def raise_for_failures(self, max_failed_fraction: float, max_failed_shards: int) -> None:
        """Exit code 1 when tars are left incomplete, 3 when data failures exceed the limits."""
        if self.shards_failed:
            first, why = next(iter(sorted(self.shards_failed.items())))
            raise RunIncomplete(f"{len(self.shards_failed)} tar(s) kept failing and stay incomplete "
                                f"(first: {first}: {why}); rerun to retry them (--retry-failed: only those)")
        if self.failed_fraction > max_failed_fraction or len(self.shard_errors) > max_failed_shards:
            raise TooManyFailures(
                f"{sum(self.failed.values())} of {self.images} images failed ({self.failed_fraction:.2%}, limit "
                f"{max_failed_fraction:.2%}) and {len(self.shard_errors)} tar(s) are damaged (limit {max_failed_shards}): "
                "see the stats files; raise --max-failed-fraction / --max-failed-shards to accept them")


def start_actors(ray, cfg: EmbedConfig) -> list:
    from pipeline.ray_util import cluster_gpus

    gpus = cluster_gpus()
    gpus_per_actor = cfg.gpus_per_actor if cfg.gpus_per_actor >= 0 else (1.0 if gpus else 0.0)
    num_actors = cfg.num_actors or (max(1, int(gpus // gpus_per_actor)) if gpus_per_actor else 1)
    actor_cls = ray.remote(EmbedActor).options(
        num_gpus=gpus_per_actor,
        num_cpus=cfg.cpus_per_actor,
        # spot nodes come and go for days: a lost actor is always restarted; a batch in flight
        # is retried twice on the restarted actor, then its shard attempt fails and is retried
        max_restarts=-1,
        max_task_retries=2,
    )
    return [actor_cls.remote(cfg.embedder, cfg.s3) for _ in range(num_actors)]


def run_embed(cfg: EmbedConfig, progress: Progress | None = None,
              on_shard_done: Callable[[ShardStats], None] | None = None) -> EmbedSummary:
    """Validate, lock the output, embed every incomplete shard, return the totals.

    Call :meth:`EmbedSummary.raise_for_failures` afterwards for the exit-code verdict.
    """
    from pipeline.layout.lock import OutputLock

    progress = progress or NullProgress()
    p = plan(cfg)
    with OutputLock(p.output, "replica embed", break_lock=cfg.break_lock, stale_after_s=cfg.lock_stale_after_s):
        return _embed_locked(p, progress, on_shard_done)


def _embed_locked(p: EmbedPlan, progress: Progress, on_shard_done) -> EmbedSummary:
    from pipeline.ray_util import connect

    ray = connect(p.cfg.ray.address)
    actors = start_actors(ray, p.cfg)
    try:  # the actors hold CPUs or GPUs: they go whatever happens
        return _embed_with(ray, actors, p, progress, on_shard_done)
    finally:
        for a in actors:
            ray.kill(a)


def _embed_with(ray, actors: list, p: EmbedPlan, progress: Progress, on_shard_done) -> EmbedSummary:
    import datetime as dt

    from pipeline.metrics import StageMetrics
    from pipeline.ray_util import CachedValue, RetryPolicy, cluster_cpus, is_infrastructure, run_bounded

    cfg = p.cfg
    try:
        identity = ray.get(actors[0].identity.remote())
    except ray.exceptions.RayActorError as exc:
        if not exc.actor_init_failed:
            raise
        last = [line for line in str(exc).strip().splitlines() if line.strip()][-1]
        raise ReplicaError(f"the embedding actor could not load the embedder: {last.strip()}") from None
    p.output.claim(EmbeddingsInfo(identity=identity, embedder_config=to_dict(cfg.embedder)))

    done = set(p.output.complete_shards())
    if p.unfinished:
        progress.log(f"{len(p.unfinished)} input tar(s) of an ingest folder are not complete yet (no stats file): "
                     "left for a later run")
    if cfg.retry_failed:
        failed_before = set(p.output.failed_shards())
        todo = [t for t, s in zip(p.tars, p.shards) if s in failed_before and s not in done]
        progress.log(f"retrying {len(todo)} tar(s) recorded as failed")
    else:
        todo = [t for t, s in zip(p.tars, p.shards) if s not in done]
    task = ray.remote(embed_shard).options(num_cpus=1)
    summary = EmbedSummary(len(p.tars), len(p.tars) - len(todo))
    failed: Counter = Counter()
    metrics = StageMetrics("embed")
    started = time.time()
    # the window follows the cluster: tars in flight = its CPUs now (at least one per actor)
    cpus = CachedValue(lambda: max(len(actors), int(cluster_cpus())))

    with progress.task("embed", len(todo), "shards") as bar:
        def record(tar_url: str, stats: ShardStats) -> None:
            summary.shards_done += 1
            summary.images += stats.seen
            summary.embedded += stats.embedded
            failed.update(stats.failed)
            if stats.shard_error:
                summary.shard_errors[stats.shard] = stats.shard_error
            summary.seconds = time.time() - started
            metrics.unit_done(stats.seen, stats.failed, stats.bytes_read, summary.images_per_s)
            bar.advance(note=f"{summary.images_per_s:,.0f} img/s, {sum(failed.values())} failed")
            if on_shard_done:
                on_shard_done(stats)

        def give_up(tar_url: str, exc: BaseException) -> None:
            from pipeline.ray_util import task_error_message
            from pipeline.storage import is_transient

            shard, message = shard_name(tar_url), task_error_message(exc)
            cause = getattr(exc, "cause", None) or exc
            permanent = isinstance(cause, (PermissionError, FileNotFoundError)) or not is_infrastructure(exc)
            p.output.record_failure(FailureRecord(shard=shard, input=tar_url, error=message,
                                                  attempts=cfg.shard_attempts if is_transient(exc) else 1,
                                                  at=dt.datetime.now(dt.timezone.utc).isoformat(),
                                                  permanent=permanent))
            summary.shards_failed[shard] = message
            metrics.failure("shard_failed")
            bar.advance(note=f"{summary.images_per_s:,.0f} img/s, {len(summary.shards_failed)} tar(s) failed")
            if isinstance(cause, PermissionError):  # credentials are run-wide: every other tar would fail too
                raise RunIncomplete(f"access denied reading {tar_url}: {message}; check the credentials "
                                    "(nothing was marked complete for it)")

        run_bounded(
            todo,
            lambda tar_url, actor: task.remote(tar_url, p.output, cfg.embedder, identity, actor, cfg.batch_size,
                                               cfg.row_group_size, cfg.max_member_bytes),
            record,
            window=lambda: cfg.max_tars_in_flight or cpus(),
            actors=actors,
            retry=RetryPolicy(max_attempts=cfg.shard_attempts, retry_if=is_infrastructure, backoff_s=2.0),
            on_failure=give_up,
        )
    summary.seconds = time.time() - started
    summary.failed = dict(failed)
    return summary
