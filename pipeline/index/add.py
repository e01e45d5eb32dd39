"""Add: one task per group of embedding shards -> one index part with global ids.

The completion ledger (``parts/_ledger.json``) is the only truth about what has been added:
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
import os
import signal
import time
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import io
from pipeline.config import IndexConfig
from pipeline.errors import MismatchError
from pipeline.index.manifest import Layout, read_trained_info
from pipeline.index.registry import Registry, encode_ids, register_complete_shards
from pipeline.schema import identity_of_schema

LEDGER_VERSION = 1
Progress = Callable[[str, int, int], None]


# -- ledger --------------------------------------------------------------------------------

def to_ranges(numbers: Iterable[int]) -> list[list[int]]:
    """Sorted ints -> [[first, last], ...] (inclusive)."""
    out: list[list[int]] = []
    for n in sorted(numbers):
        if out and n == out[-1][1] + 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return out


def from_ranges(ranges: list[list[int]]) -> list[int]:
    return [n for a, b in ranges for n in range(a, b + 1)]


def read_ledger(index: str, storage: io.Storage | None = None) -> dict[str, Any]:
    url = Layout(index).ledger
    if not io.exists(url, storage):
        return {"format_version": LEDGER_VERSION, "trained_sha256": None, "parts": []}
    return io.read_json(url, storage)


def write_ledger(index: str, ledger: dict[str, Any], storage: io.Storage | None = None) -> None:
    io.write_json(Layout(index).ledger, ledger, storage)


def ledger_shards(ledger: dict[str, Any]) -> set[int]:
    done: set[int] = set()
    for p in ledger["parts"]:
        done.update(from_ranges(p["shards"]))
    return done


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

def add_part(
    index: str,
    part: str,
    shards: list[tuple[int, str]],
    identity: dict[str, Any],
    trained_sha256: str,
    storage: io.Storage | None = None,
    threads: int = 1,
    write_vectors: bool = True,
) -> dict[str, Any]:
    """Encode the ok rows of ``shards`` [(number, url)] into ``parts/{part}.index``.

    Pure function of its inputs: rerunning it writes the same part. Returns what the ledger records.
    """
    import faiss

    from pipeline.embedders import check_same_identity

    faiss.omp_set_num_threads(max(1, int(threads)))
    layout = Layout(index)
    trained, info = _trained_copy(index, trained_sha256, storage)
    dim = int(info["dim"])
    rows_added: dict[int, int] = {}
    t0 = time.time()
    for number, url in shards:
        fs, path = io.filesystem(url, storage)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            file_identity = identity_of_schema(pf.schema_arrow)
            if file_identity is not None:
                check_same_identity(file_identity, identity, url)
            edim = pf.schema_arrow.field("embedding").type.list_size
            if edim != dim:
                raise MismatchError(f"{url} holds dim {edim} vectors; the index is dim {dim}")
            n_rows = pf.metadata.num_rows
            side = np.zeros((n_rows, dim), dtype=np.float16) if write_vectors else None
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
            io.write_bytes(layout.vectors(number), side.tobytes(), storage)
        rows_added[number] = count
    data = faiss.serialize_index(trained).tobytes()
    io.write_bytes(layout.part(part), data, storage)
    return {
        "name": part,
        "shards": to_ranges(n for n, _ in shards),
        "ntotal": int(trained.ntotal),
        "rows": {str(k): v for k, v in rows_added.items()},
        "trained_sha256": trained_sha256,
        "side_vectors": bool(write_vectors),
        "bytes": len(data),
        "seconds": round(time.time() - t0, 3),
    }


_TRAINED: dict[tuple[str, str], tuple[bytes, dict[str, Any]]] = {}


def _trained_copy(index: str, sha256: str, storage: io.Storage | None) -> tuple[Any, dict[str, Any]]:
    """A fresh copy of the trained index. A Ray worker runs many add tasks: it reads
    trained.index once (0.44 GB at LAION scale) and deserialises a copy per task."""
    import faiss

    from pipeline.index.manifest import read_trained_info, sha256_bytes

    key = (index, sha256)
    if key not in _TRAINED:
        info = read_trained_info(index, storage)
        data = io.read_bytes(Layout(index).trained, storage)
        if sha256_bytes(data) != info["sha256"] or info["sha256"] != sha256:
            raise MismatchError(f"{Layout(index).trained!r} changed while adding (expected sha256 {sha256[:12]})")
        _TRAINED.clear()
        _TRAINED[key] = (data, info)
    data, info = _TRAINED[key]
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8)), info


def _fault_hook(completed: int) -> None:
    """Test aid: REPLICA_FAULT_AFTER_PARTS=N kills this process (SIGKILL) once N parts are
    written but before the ledger records the Nth, the worst moment for a crash."""
    n = os.environ.get("REPLICA_FAULT_AFTER_PARTS")
    if n and completed >= int(n):
        os.kill(os.getpid(), signal.SIGKILL)


# -- the driver ----------------------------------------------------------------------------

def run_add(
    cfg: IndexConfig,
    *,
    use_ray: bool = True,
    log: Callable[[str], None] = print,
    on_progress: Progress | None = None,
) -> dict[str, Any]:
    """Register new complete shards, then add every shard no recorded part holds. Idempotent."""
    from pipeline.index.train import validate

    validate(cfg)
    info = read_trained_info(cfg.index, cfg.storage)
    reg = Registry.load(cfg.index, cfg.storage)
    from pipeline.embedders import check_same_identity
    from pipeline.index.registry import read_embeddings_info

    check_same_identity(read_embeddings_info(reg.embeddings, cfg.storage)["identity"], info["identity"], reg.embeddings)
    new = register_complete_shards(reg, cfg.storage)
    if new:
        reg.save(cfg.index, cfg.storage)
        log(f"registered {len(new)} new shard(s); registry version {reg.version}")
    ledger = read_ledger(cfg.index, cfg.storage)
    if ledger["trained_sha256"] not in (None, info["sha256"]):
        raise MismatchError(
            f"the parts ledger of {cfg.index!r} belongs to trained index {ledger['trained_sha256'][:12]}, "
            f"not {info['sha256'][:12]}; use a new index location"
        )
    ledger["trained_sha256"] = info["sha256"]
    done = ledger_shards(ledger)
    groups = plan_groups(len(reg), done, cfg.group_size)
    if not groups:
        log(f"nothing to add: {len(ledger['parts'])} parts hold all {len(reg)} shards")
        return ledger
    log(f"adding {sum(len(g) for _, g in groups)} shard(s) in {len(groups)} part(s)")

    def args(group: tuple[str, list[int]]) -> tuple:
        name, nums = group
        return (
            cfg.index, name, [(n, reg.url(n)) for n in nums], info["identity"], info["sha256"],
            cfg.storage, max(1, int(cfg.cpus_per_task)), cfg.write_vectors,
        )

    flush_every = max(1, len(groups) // 100)
    state = {"since": 0, "last": time.time(), "completed": 0}

    def record(result: dict[str, Any]) -> None:
        state["completed"] += 1
        _fault_hook(state["completed"])
        overlap = ledger_shards(ledger) & set(from_ranges(result["shards"]))
        if overlap:  # cannot happen with one driver; refuse rather than double-count
            raise MismatchError(f"part {result['name']} holds shards already recorded: {sorted(overlap)[:5]}")
        ledger["parts"].append(result)
        state["since"] += 1
        if state["since"] >= flush_every or time.time() - state["last"] > 10:
            write_ledger(cfg.index, ledger, cfg.storage)
            state["since"], state["last"] = 0, time.time()
        if on_progress:
            on_progress("add", state["completed"], len(groups))

    try:
        if use_ray:
            from pipeline.ray_util import cluster_cpus, connect

            ray = connect(cfg.ray_address)
            task = ray.remote(add_part).options(
                num_cpus=cfg.cpus_per_task, max_retries=3, retry_exceptions=[OSError, ConnectionError]
            )
            limit = cfg.max_tasks_in_flight or max(1, int(cluster_cpus() // max(cfg.cpus_per_task, 1e-3)))
            pending = list(groups)
            running: list = []
            while pending or running:
                while pending and len(running) < limit:
                    running.append(task.remote(*args(pending.pop(0))))
                ready, running = ray.wait(running, num_returns=1)
                record(ray.get(ready[0]))
        else:
            for g in groups:
                record(add_part(*args(g)))
    finally:
        write_ledger(cfg.index, ledger, cfg.storage)
    total = sum(p["ntotal"] for p in ledger["parts"])
    log(f"ledger: {len(ledger['parts'])} parts, {total:,} vectors")
    return ledger

