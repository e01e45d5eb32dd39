"""Add: one task per group of embedding shards -> one index part with global ids.

The completion ledger (:class:`pipeline.layout.index.Ledger`) is the only truth about what has been added:
a part counts once the driver has recorded it there, together with the shard numbers it
holds. Planning takes every registered shard that no recorded part holds, in number order,
and cuts it into groups of ``group_size``; so a resumed run re-plans exactly the missing
groups (same names, so a part file left by a killed run is simply overwritten), and every
vector ends up in exactly one recorded part. Part files not in the ledger are ignored.

Only the driver writes the ledger, rewriting one small file (shard numbers stored as
ranges); it flushes every ~1% of the groups or 10 s, so a kill loses at most that much work.
"""
from __future__ import annotations

import hashlib
import time
from typing import Any, Callable

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import IndexConfig
from pipeline.errors import MismatchError
from pipeline.index.plan import IndexPlan, plan_index
from pipeline.index.registry import Registry, encode_ids
from pipeline.layout.embeddings import EmbeddingsFolder, check_columns, check_same_identity, identity_of_schema
from pipeline.layout.index import IndexFolder, Ledger, PartRecord, to_ranges
from pipeline.progress import NullProgress, Progress


def plan_groups(registered: int, done: set[int], group_size: int) -> list[tuple[str, list[int]]]:
    """Cut registered shards not in ``done`` into groups; names are fixed by their content."""
    pending = [n for n in range(registered) if n not in done]
    groups = []
    for i in range(0, len(pending), group_size):
        nums = pending[i : i + group_size]
        digest = hashlib.sha1(",".join(map(str, nums)).encode()).hexdigest()[:8]
        groups.append((f"part-{nums[0]:09d}-{nums[-1]:09d}-{digest}", nums))
    return groups


# -- the task ------------------------------------------------------------------------------

def add_part(index: IndexFolder, embeddings: EmbeddingsFolder, part: str, shards: list[tuple[int, str]],
             identity: dict[str, Any], trained_sha256: str, threads: int = 1,
             write_vectors: bool = True) -> PartRecord:
    """Encode the ok rows of ``shards`` [(number, name)] into the part ``part``.

    Pure function of its inputs: rerunning it writes the same part. Returns what the ledger records.
    """
    import faiss

    faiss.omp_set_num_threads(max(1, int(threads)))
    trained, info = _trained_copy(index, trained_sha256)
    dim = int(info.dim)
    rows_added: dict[int, int] = {}
    t0 = time.time()
    for number, name in shards:
        url = embeddings.parquet_url(name)
        with embeddings.open(embeddings.parquet_name(name)) as f:
            pf = pq.ParquetFile(f)
            check_columns(pf.schema_arrow, url)
            file_identity = identity_of_schema(pf.schema_arrow)
            if file_identity is not None:
                check_same_identity(file_identity, identity, url)
            edim = pf.schema_arrow.field("embedding").type.list_size
            if edim != dim:
                raise MismatchError(f"{url} holds dim {edim} vectors; the index is dim {dim}")
            side = np.zeros((pf.metadata.num_rows, dim), dtype=np.float16) if write_vectors else None
            count = 0
            for batch in pf.iter_batches(batch_size=8192, columns=["row", "status", "embedding"]):
                ok = pc.and_(pc.equal(batch.column("status"), "ok"), pc.is_valid(batch.column("embedding")))
                batch = batch.filter(ok)
                if batch.num_rows == 0:
                    continue
                rows = batch.column("row").to_numpy().astype(np.int64)
                v16 = batch.column("embedding").flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
                trained.add_with_ids(np.ascontiguousarray(v16, dtype=np.float32), encode_ids(number, rows))
                if side is not None:
                    if rows.max() >= len(side):
                        side = np.concatenate([side, np.zeros((int(rows.max()) + 1 - len(side), dim), np.float16)])
                    side[rows] = v16
                count += len(rows)
        if side is not None:
            index.write_vectors(number, side)
        rows_added[number] = count
    data = faiss.serialize_index(trained).tobytes()
    index.write_bytes(index.part_rel(part), data)
    return PartRecord(name=part, shards=to_ranges(n for n, _ in shards), ntotal=int(trained.ntotal),
                      rows={str(k): v for k, v in rows_added.items()}, trained_sha256=trained_sha256,
                      side_vectors=bool(write_vectors), bytes=len(data), seconds=round(time.time() - t0, 3))


_TRAINED: dict[tuple[str, str], tuple[bytes, Any]] = {}


def _trained_copy(index: IndexFolder, sha256: str) -> tuple[Any, Any]:
    """A fresh copy of the trained index. A Ray worker runs many add tasks: it reads
    trained.index once (0.44 GB at LAION scale) and deserialises a copy per task."""
    import faiss

    key = (index.url, sha256)
    if key not in _TRAINED:
        _TRAINED.clear()
        _TRAINED[key] = index.read_trained(expected_sha256=sha256)
    data, info = _TRAINED[key]
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8)), info


# -- the driver ----------------------------------------------------------------------------

def run_add(cfg: IndexConfig, progress: Progress | None = None, *, use_ray: bool = True,
            on_part: Callable[[PartRecord], None] | None = None) -> Ledger:
    """Register new complete shards, then add every shard no recorded part holds. Idempotent.

    ``on_part`` is called with each part's record as it arrives, before the ledger holds it.
    """
    progress = progress or NullProgress()
    p = plan_index(cfg)
    with p.lock("replica index add"):
        return _add_locked(p, progress, use_ray, on_part)


def _add_locked(p: IndexPlan, progress: Progress, use_ray: bool, on_part) -> Ledger:
    cfg = p.cfg
    info = p.index.read_trained_info()
    reg = Registry.load(p.index)
    check_same_identity(reg.embeddings.read_info().identity, info.identity, reg.embeddings.url)
    new = reg.register_complete()
    if new:
        reg.save(p.index)
        progress.log(f"registered {len(new)} new shard(s); registry version {reg.version}")
    ledger = p.index.read_ledger()
    if ledger.trained_sha256 not in (None, info.sha256):
        raise MismatchError(
            f"the parts ledger of {cfg.index!r} belongs to trained index {ledger.trained_sha256[:12]}, "
            f"not {info.sha256[:12]}; use a new index location"
        )
    ledger.trained_sha256 = info.sha256
    groups = plan_groups(len(reg), ledger.shard_numbers(), cfg.group_size)
    if not groups:
        progress.log(f"nothing to add: {len(ledger.parts)} parts hold all {len(reg)} shards")
        return ledger
    progress.log(f"adding {sum(len(g) for _, g in groups)} shard(s) in {len(groups)} part(s)")

    def args(group: tuple[str, list[int]]) -> tuple:
        name, nums = group
        return (p.index, reg.embeddings, name, [(n, reg.name(n)) for n in nums], info.identity, info.sha256,
                max(1, int(cfg.cpus_per_task)), cfg.write_vectors)

    # Only the driver writes the ledger; it flushes every ~1% of the groups or 10 s.
    flush_every = max(1, len(groups) // 100)
    state = {"since": 0, "last": time.time()}
    with progress.task("add", len(groups), "parts") as bar:
        def record(_group: Any, part: PartRecord) -> None:
            if on_part is not None:
                on_part(part)
            overlap = ledger.shard_numbers() & set(part.shard_numbers)
            if overlap:  # cannot happen with one driver; refuse rather than double-count
                raise MismatchError(f"part {part.name} holds shards already recorded: {sorted(overlap)[:5]}")
            ledger.parts.append(part)
            state["since"] += 1
            if state["since"] >= flush_every or time.time() - state["last"] > 10:
                p.index.write_ledger(ledger)
                state["since"], state["last"] = 0, time.time()
            bar.advance()

        try:
            if use_ray:
                from pipeline.ray_util import RetryPolicy, cluster_cpus, connect, run_bounded

                ray = connect(cfg.ray.address)
                task = ray.remote(add_part).options(num_cpus=cfg.cpus_per_task)
                run_bounded(groups, lambda g, _actor: task.remote(*args(g)), record,
                            window=lambda: cfg.max_tasks_in_flight or max(1, int(cluster_cpus() // cfg.cpus_per_task)),
                            retry=RetryPolicy(max_attempts=4, retry_on=(OSError, ConnectionError,
                                                                        ray.exceptions.WorkerCrashedError)))
            else:
                for g in groups:
                    record(g, add_part(*args(g)))
        finally:
            p.index.write_ledger(ledger)
    total = sum(part.ntotal for part in ledger.parts)
    progress.log(f"ledger: {len(ledger.parts)} parts, {total:,} vectors")
    return ledger
