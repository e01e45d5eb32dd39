"""Merge: recorded parts -> index shards with on-disk inverted lists, then the manifest.

Parts not yet in any index shard are packed, in ledger order, into new index shards of at
most ``shard_memory_gb`` each (inverted lists + fixed structures), so each fits one serving
actor. Existing index shards are never rewritten: an incremental run adds new shards.
A shard with more than ``merge_fanin`` parts is merged in stages (fan-in at a time into
intermediate on-disk indexes, then those). One Ray task per new shard; the manifest is
written last, so a killed merge leaves the previous manifest valid and a rerun redoes it.
"""
from __future__ import annotations

import os
import shutil
import tempfile

from pipeline.config import IndexConfig
from pipeline.errors import ConfigError, MismatchError
from pipeline.index.plan import IndexPlan, plan_index
from pipeline.index.registry import Registry
from pipeline.layout.index import (IndexFolder, IndexShard, Manifest, PartRecord, TrainedInfo, invlists_path,
                                   sha256_bytes)
from pipeline.progress import NullProgress, Progress
from pipeline.storage import file_sha256


def read_ondisk(path: str):
    """Read an index whose inverted lists live in a .ivfdata file beside it.

    IO_FLAG_ONDISK_SAME_DIR finds the .ivfdata next to the index file; never IO_FLAG_MMAP
    here (faiss-cpu 1.15 segfaults searching an on-disk index read with it).
    """
    import faiss

    return faiss.read_index(path, faiss.IO_FLAG_ONDISK_SAME_DIR)


def merge_to_ondisk(trained_bytes: bytes, inputs: list[str], out_index: str, ondisk_inputs: bool = False) -> int:
    """Merge the inverted lists of ``inputs`` (local index files) into ``out_index`` + .ivfdata.

    Parts (ArrayInvertedLists) are memory-mapped so their total may exceed RAM; intermediate
    on-disk inputs are opened in place. Returns ntotal.
    """
    import faiss
    import numpy as np

    holders = []
    vec = faiss.InvertedListsPtrVector()
    for p in inputs:
        idx = read_ondisk(p) if ondisk_inputs else faiss.read_index(p, faiss.IO_FLAG_MMAP)
        holders.append(idx)
        vec.push_back(faiss.extract_index_ivf(idx).invlists)
    index = faiss.deserialize_index(np.frombuffer(trained_bytes, dtype=np.uint8))
    ivf = faiss.extract_index_ivf(index)
    if index.ntotal != 0:
        raise ValueError("the trained index must be empty")
    invlists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, invlists_path(out_index))
    ntotal = invlists.merge_from_multiple(vec.data(), vec.size(), False)
    index.ntotal = ivf.ntotal = ntotal
    ivf.replace_invlists(invlists, True)
    invlists.this.disown()
    faiss.write_index(index, out_index)
    del index, holders
    return int(ntotal)


def merge_shard(index: IndexFolder, name: str, parts: list[str], fanin: int = 64, threads: int = 1,
                workdir: str | None = None) -> IndexShard:
    """Build index shard ``name`` from ``parts`` (part names); staged when there are more than ``fanin``."""
    import faiss

    if fanin < 2:
        raise ConfigError(f"merge fan-in must be >= 2, got {fanin}")
    faiss.omp_set_num_threads(max(1, int(threads)))
    trained, _ = index.read_trained()
    tmp = tempfile.mkdtemp(prefix=f"merge-{name}-", dir=workdir)
    try:
        files = [index.local_copy(index.part_rel(p), cache_dir=tmp) for p in parts]
        ondisk = False
        stage = 0
        while len(files) > fanin:  # stage: fan-in groups -> intermediate on-disk indexes
            nxt = []
            for j in range(0, len(files), fanin):
                out = os.path.join(tmp, f"stage{stage}-{j // fanin:05d}.index")
                merge_to_ondisk(trained, files[j : j + fanin], out, ondisk_inputs=ondisk)
                nxt.append(out)
            if ondisk:  # the previous stage's intermediates are no longer needed
                for f in files:
                    os.remove(f)
                    os.remove(invlists_path(f))
            files, ondisk, stage = nxt, True, stage + 1
        final_dir = os.path.join(tmp, "final")
        os.makedirs(final_dir)
        out = os.path.join(final_dir, f"{name}.index")
        ntotal = merge_to_ondisk(trained, files, out, ondisk_inputs=ondisk)
        ivfdata = invlists_path(out)
        index_bytes, ivf_bytes = os.path.getsize(out), os.path.getsize(ivfdata)
        sums = file_sha256(out), file_sha256(ivfdata)
        index_rel, ivfdata_rel = index.shard_rels(name)
        # publish the data file first, the small index file (which names it) last
        index.publish_file(ivfdata, ivfdata_rel)
        index.publish_file(out, index_rel)
        return IndexShard(name=name, index=index_rel, ivfdata=ivfdata_rel, ntotal=ntotal, parts=parts,
                          trained_sha256=sha256_bytes(trained), index_bytes=index_bytes, ivfdata_bytes=ivf_bytes,
                          index_sha256=sums[0], ivfdata_sha256=sums[1])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pack_parts(parts: list[PartRecord], capacity: int) -> list[list[PartRecord]]:
    """Consecutive parts into groups of at most ``capacity`` vectors (a bigger part stands alone)."""
    groups: list[list[PartRecord]] = []
    size = 0
    for p in parts:
        if groups and size + p.ntotal <= capacity:
            groups[-1].append(p)
            size += p.ntotal
        else:
            groups.append([p])
            size = p.ntotal
    return groups


def shard_capacity(trained: TrainedInfo, shard_memory_gb: float) -> int:
    budget = shard_memory_gb * 2**30 - trained.fixed_bytes
    if budget <= trained.bytes_per_vector:
        raise ConfigError(
            f"index.shard_memory_gb={shard_memory_gb} does not even hold the fixed structures "
            f"({trained.fixed_bytes / 2**30:.2f} GiB) of {trained.factory}"
        )
    return int(budget // trained.bytes_per_vector)


def run_merge(cfg: IndexConfig, progress: Progress | None = None, *, use_ray: bool = True) -> Manifest:
    """Merge recorded parts that no index shard holds into new index shards; write the manifest."""
    progress = progress or NullProgress()
    p = plan_index(cfg, needs_embeddings=False)
    with p.lock("replica index merge"):
        return _merge_locked(p, progress, use_ray)


def _merge_locked(p: IndexPlan, progress: Progress, use_ray: bool) -> Manifest:
    cfg = p.cfg
    trained = p.index.read_trained_info()
    manifest = p.index.read_manifest() if p.index.has_manifest() else Manifest.empty(trained)
    if manifest.trained_sha256 != trained.sha256:
        raise MismatchError(
            f"{p.index.manifest_url!r} was built from trained index {manifest.trained_sha256[:12]}, "
            f"but {p.index.trained_url!r} is {trained.sha256[:12]}"
        )
    ledger = p.index.read_ledger()
    if ledger.parts and ledger.trained_sha256 != trained.sha256:
        raise MismatchError(f"the parts ledger belongs to trained index {str(ledger.trained_sha256)[:12]}")
    merged = {name for s in manifest.shards for name in s.parts}
    new_parts = [part for part in ledger.parts if part.name not in merged]
    reg = Registry.load(p.index)
    if not new_parts:
        progress.log(f"nothing to merge: {len(manifest.shards)} index shard(s) hold {manifest.ntotal:,} vectors")
        return manifest
    capacity = shard_capacity(trained, cfg.shard_memory_gb)
    first = len(manifest.shards)
    jobs = [(f"shard-{first + i:05d}", [part.name for part in g]) for i, g in enumerate(pack_parts(new_parts, capacity))]
    progress.log(f"merging {len(new_parts)} part(s), {sum(part.ntotal for part in new_parts):,} vectors -> "
                 f"{len(jobs)} new index shard(s) (<= {capacity:,} vectors each, fan-in {cfg.merge_fanin})")
    results: dict[str, IndexShard] = {}
    with progress.task("merge", len(jobs), "index shards") as bar:
        def record(job: tuple[str, list[str]], shard: IndexShard) -> None:
            results[job[0]] = shard
            bar.advance()

        if use_ray:
            from pipeline.ray_util import RetryPolicy, connect, run_bounded

            ray = connect(cfg.ray.address)
            task = ray.remote(merge_shard).options(num_cpus=1)
            run_bounded(jobs, lambda job, _actor: task.remote(p.index, job[0], job[1], cfg.merge_fanin,
                                                              max(1, cfg.threads)),
                        record, window=len(jobs),
                        retry=RetryPolicy(max_attempts=4, retry_on=(OSError, ConnectionError,
                                                                    ray.exceptions.WorkerCrashedError)))
        else:
            for job in jobs:
                record(job, merge_shard(p.index, job[0], job[1], cfg.merge_fanin, cfg.threads or os.cpu_count() or 1))
    manifest.shards.extend(results[name] for name, _ in jobs)
    manifest.ntotal = sum(s.ntotal for s in manifest.shards)
    manifest.side_vectors = all(part.side_vectors for part in ledger.parts)
    manifest.registry_version = reg.version
    manifest.registered_shards = len(reg)
    manifest.shard_memory_gb = cfg.shard_memory_gb
    p.index.write_manifest(manifest)  # last: what search loads
    progress.log(f"manifest: {len(manifest.shards)} index shard(s), {manifest.ntotal:,} vectors")
    return manifest
