"""Caption stage: how many training images carry each caption, exactly and after normalisation.

Memorised generations often come from images whose caption is repeated across the training set
(Somepalli et al. 2023; Chen et al. 2024, AMG). At LAION scale that is an aggregation over
billions of captions, so it runs on Ray over the embedding Parquet (the ``caption`` column of
every row), never in the driver:

* map: one task per group of embedding shards hashes every caption and writes its counts split
  into ``partitions`` buckets by the normalised caption's hash;
* reduce: one task per bucket sums every group's file of that bucket and writes
  ``counts/part-{bucket}.parquet`` (pipeline/layout/captions.py).

Normalisation (NFKC, casefold, URLs stripped, whitespace collapsed) groups captions that differ
only in case, Unicode form, spacing or a link. Hashes are the first 8 bytes of BLAKE2b as a signed
int64: with ~4 billion distinct captions, n^2 / 2^65 = 0.5 colliding pairs are expected (a
collision would add two captions' counts together); search joins its matches to the counts by
these hashes, computed the same way.
"""
from __future__ import annotations

import hashlib
import re
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import CaptionsConfig
from pipeline.errors import ConfigError, MismatchError
from pipeline.layout.captions import CaptionsFolder, CaptionsInfo, PartialRecord, partial_schema
from pipeline.layout.embeddings import EmbeddingsFolder
from pipeline.progress import NullProgress, Progress

#: recorded with the counts; a change of normalise() or caption_hash() must change it
NORMALIZATION = "nfkc-casefold-nourl-ws/blake2b64-v1"
URL = re.compile(r"(?:[a-z][a-z0-9+.-]*://|www\.)\S+", re.IGNORECASE)


def normalize(text: str) -> str:
    """NFKC, casefold, URLs removed, runs of whitespace made one space, ends stripped."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(URL.sub(" ", text).split())


def caption_hash(text: str) -> int:
    """The int64 a caption (as given) is joined by."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def bucket_of(hashes: np.ndarray, partitions: int) -> np.ndarray:
    """The bucket of each normalised hash (its unsigned value modulo the partitions)."""
    return (np.asarray(hashes, np.int64).view(np.uint64) % np.uint64(partitions)).astype(np.int64)


def has_caption(text: str | None) -> bool:
    return text is not None and bool(text.strip())


def caption_keys(texts: Iterable[str | None]) -> list[tuple[int, int] | None]:
    """(caption hash, normalised hash) of each caption; None where there is no caption."""
    return [(caption_hash(t), caption_hash(normalize(t))) if has_caption(t) else None for t in texts]


# --------------------------------------------------------------------------- plan


@dataclass
class CaptionsPlan:
    cfg: CaptionsConfig
    embeddings: EmbeddingsFolder
    output: CaptionsFolder
    #: complete embedding shards no partial record holds yet, in groups
    groups: list[tuple[str, list[str]]]
    shards: list[str]


def plan_captions(cfg: CaptionsConfig) -> CaptionsPlan:
    """Fail before any work: input readable, output writable, partitions the folder's own."""
    if not cfg.embeddings:
        raise ConfigError("no embeddings given: pass --embeddings with an embedding folder")
    if not cfg.output:
        raise ConfigError("no output given: pass --output with a folder for the caption counts")
    if cfg.partitions < 1 or cfg.group_size < 1:
        raise ConfigError(f"partitions and group_size must be >= 1, got {cfg.partitions} and {cfg.group_size}")
    embeddings = EmbeddingsFolder(cfg.embeddings, cfg.s3)
    embeddings.read_info()  # refuses a folder that is not an embeddings folder
    shards = embeddings.complete_shards()
    if not shards:
        raise ConfigError(f"{cfg.embeddings!r} has no complete embedding shards to count")
    output = CaptionsFolder(cfg.output, cfg.s3)
    try:
        output.check_writable()
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"cannot write to output {cfg.output!r}: {type(exc).__name__}: {exc}") from exc
    done = output.partial_records()
    other = sorted({r.partitions for r in done} - {cfg.partitions})
    if other:
        raise MismatchError(f"{cfg.output!r} holds counts split into {other[0]} partitions, not {cfg.partitions}: "
                            "use the same --partitions or a new output")
    info = output.read_info_if_any()
    if info is not None and info.embeddings != cfg.embeddings:
        raise MismatchError(f"{cfg.output!r} holds the caption counts of {info.embeddings!r}, not "
                            f"{cfg.embeddings!r}: use a new output")
    counted = {s for r in done for s in r.shards}
    todo = [s for s in shards if s not in counted]
    groups = []
    for i in range(0, len(todo), cfg.group_size):
        chunk = todo[i:i + cfg.group_size]
        groups.append(("g-" + hashlib.sha1("\n".join(chunk).encode()).hexdigest()[:16], chunk))
    return CaptionsPlan(cfg, embeddings, output, groups, shards)


# --------------------------------------------------------------------------- the tasks


def count_group(embeddings: EmbeddingsFolder, output: CaptionsFolder, group: str, shards: list[str],
                partitions: int) -> PartialRecord:
    """Map: the caption counts of some embedding shards, written as one file per bucket."""
    started = time.time()
    counts: Counter[tuple[int, int]] = Counter()
    texts: dict[int, str] = {}
    rows = with_caption = 0
    for shard in shards:
        for batch in embeddings.iter_batches(shard, ["caption"]):
            rows += batch.num_rows
            for text in batch.column(0).to_pylist():
                if not has_caption(text):
                    continue
                norm = normalize(text)
                nh = caption_hash(norm)
                counts[(caption_hash(text), nh)] += 1
                texts.setdefault(nh, norm)
                with_caption += 1
    keys = np.array(list(counts), dtype=np.int64).reshape(-1, 2)
    table = pa.table({
        "caption_hash": pa.array(keys[:, 0], pa.int64()),
        "normalized_hash": pa.array(keys[:, 1], pa.int64()),
        "count": pa.array(list(counts.values()), pa.int64()),
        "normalized": pa.array([texts[int(h)] for h in keys[:, 1]], pa.string()),
    }, schema=partial_schema())
    which = bucket_of(keys[:, 1], partitions)
    buckets = [table.filter(pa.array(which == b)) for b in range(partitions)]
    record = PartialRecord(group=group, shards=shards, partitions=partitions, rows=rows,
                           rows_with_caption=with_caption, seconds=round(time.time() - started, 3))
    output.write_partial(record, buckets)
    return record


def sum_bucket(output: CaptionsFolder, groups: list[str], bucket: int) -> dict[str, int]:
    """Reduce: every group's counts of one bucket summed into ``counts/part-{bucket}``."""
    parts = [output.read_partial(g, bucket) for g in groups]
    t = pa.concat_tables(parts) if parts else partial_schema().empty_table()
    exact = t.group_by(["caption_hash", "normalized_hash"]).aggregate([("count", "sum")])
    norm = t.group_by("normalized_hash").aggregate([("count", "sum"), ("normalized", "max")])
    norm = norm.rename_columns(["normalized_hash", "normalized_count", "normalized"])
    joined = exact.rename_columns(["caption_hash", "normalized_hash", "caption_count"]).join(norm, "normalized_hash")
    # the text is kept where it is shared: a unique caption's text is in its embedding row already
    shared = pc.greater(joined.column("normalized_count"), 1)
    text = pc.if_else(shared, joined.column("normalized"), pa.scalar(None, pa.string()))
    joined = joined.set_column(joined.schema.get_field_index("normalized"), "normalized", text)
    joined = joined.select(["caption_hash", "normalized_hash", "caption_count", "normalized_count", "normalized"])
    output.write_counts(bucket, joined.sort_by("caption_hash"))
    return {"distinct_captions": joined.num_rows, "distinct_normalized": norm.num_rows}


# --------------------------------------------------------------------------- the driver


def run_captions(cfg: CaptionsConfig, progress: Progress | None = None) -> CaptionsInfo:
    """Count the captions of every complete embedding shard (only new shards are read again)."""
    progress = progress or NullProgress()
    plan = plan_captions(cfg)
    with plan.output.lock("replica captions", break_lock=cfg.break_lock, stale_after_s=cfg.lock_stale_after_s):
        return _captions_locked(plan, progress)


def _captions_locked(plan: CaptionsPlan, progress: Progress) -> CaptionsInfo:
    from pipeline.ray_util import RetryPolicy, cluster_cpus, connect, run_bounded

    cfg, out = plan.cfg, plan.output
    started = time.time()
    ray = connect(cfg.ray.address)
    retry = RetryPolicy(max_attempts=4, retry_on=(OSError, ConnectionError, ray.exceptions.WorkerCrashedError))
    window = lambda: cfg.max_tasks_in_flight or max(1, int(cluster_cpus() // cfg.cpus_per_task))  # noqa: E731
    if plan.groups:
        task = ray.remote(count_group).options(num_cpus=cfg.cpus_per_task)
        with progress.task("captions: count", len(plan.groups), "groups") as bar:
            run_bounded(plan.groups, lambda g, _actor: task.remote(plan.embeddings, out, g[0], g[1], cfg.partitions),
                        lambda _g, _record: bar.advance(), window=window, retry=retry)
    else:
        progress.log("every complete shard is counted already; summing the buckets again")
    records = out.partial_records()
    reduce = ray.remote(sum_bucket).options(num_cpus=cfg.cpus_per_task)
    names = [r.group for r in records]
    totals = {"distinct_captions": 0, "distinct_normalized": 0}

    def add(_bucket: int, counts: dict[str, int]) -> None:
        for k, v in counts.items():
            totals[k] += v
        bar.advance()

    with progress.task("captions: sum", cfg.partitions, "buckets") as bar:
        run_bounded(list(range(cfg.partitions)), lambda b, _actor: reduce.remote(out, names, b), add,
                    window=window, retry=retry)
    seconds = time.time() - started
    rows = sum(r.rows for r in records)
    map_seconds = sum(r.seconds or 0 for r in records)
    info = CaptionsInfo(
        embeddings=cfg.embeddings, normalization=NORMALIZATION, partitions=cfg.partitions,
        shards=len({s for r in records for s in r.shards}), rows=rows,
        rows_with_caption=sum(r.rows_with_caption for r in records), seconds=round(seconds, 2),
        timings={"rows_per_s": round(rows / seconds, 1) if seconds else 0.0,
                 "rows_per_task_s": round(rows / map_seconds, 1) if map_seconds else 0.0},
        **totals)
    out.write_info(info)  # last: the counts are complete
    return info


# --------------------------------------------------------------------------- lookups


def lookup(output: CaptionsFolder, keys: list[tuple[int, int] | None]) -> list[dict[str, Any] | None]:
    """Counts of captions given by :func:`caption_keys`: {"caption_count", "normalized_count"} or None.

    Reads only the buckets the keys fall in. A caption absent from the counts (not in the corpus)
    has caption_count 0 and the normalised count of any corpus caption sharing its normal form.
    """
    info = output.read_info()
    if info.normalization != NORMALIZATION:
        raise MismatchError(f"{output.url} was counted with normalisation {info.normalization!r}, this version uses "
                            f"{NORMALIZATION!r}: count again into a new folder")
    wanted = [k for k in keys if k is not None]
    if not wanted:
        return [None] * len(keys)
    norm_hashes = np.array([k[1] for k in wanted], np.int64)
    exact: dict[int, int] = {}
    normal: dict[int, int] = {}
    for b in sorted(set(bucket_of(norm_hashes, info.partitions).tolist())):
        t = output.read_counts(b, ["caption_hash", "normalized_hash", "caption_count", "normalized_count"])
        hit = pc.is_in(t.column("normalized_hash"), pa.array(norm_hashes))
        for row in t.filter(hit).to_pylist():
            exact[row["caption_hash"]] = row["caption_count"]
            normal[row["normalized_hash"]] = row["normalized_count"]
    return [None if k is None else {"caption_count": exact.get(k[0], 0), "normalized_count": normal.get(k[1], 0)}
            for k in keys]
