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
from typing import TYPE_CHECKING

from pipeline.config import IndexConfig
from pipeline.errors import ConfigError, MismatchError
from pipeline.index.factory import is_fast_scan
from pipeline.index.plan import IndexPlan, plan_index
from pipeline.index.registry import Registry
from pipeline.layout.index import (IndexFolder, IndexShard, Manifest, PartRecord, TrainedInfo, invlists_path,
                                   sha256_bytes, to_ranges)
from pipeline.progress import NullProgress, Progress
from pipeline.storage import file_sha256

if TYPE_CHECKING:
    import numpy as np


def read_shard(path: str, in_ram: bool):
    """Read an index shard: into RAM (fast-scan shards), or with its inverted lists left in the
    .ivfdata file beside it (IO_FLAG_ONDISK_SAME_DIR; never IO_FLAG_MMAP there: faiss-cpu 1.15
    segfaults searching an on-disk index read with it)."""
    import faiss

    return faiss.read_index(path) if in_ram else faiss.read_index(path, faiss.IO_FLAG_ONDISK_SAME_DIR)


def merge_in_ram(trained_bytes: bytes, inputs: list[str], out_index: str) -> int:
    """Merge ``inputs`` (local index files) into one index held in RAM, written to ``out_index``.

    Fast-scan lists are kept in blocks that OnDiskInvertedLists cannot take: a fast-scan shard is
    merged, stored and served whole, so its size is bounded by ``shard_memory_gb``. Parts are
    memory-mapped and merged one at a time (``merge_from`` moves their lists). Returns ntotal.
    """
    import faiss
    import numpy as np

    index = faiss.deserialize_index(np.frombuffer(trained_bytes, dtype=np.uint8))
    ivf = faiss.extract_index_ivf(index)
    if index.ntotal != 0:
        raise ValueError("the trained index must be empty")
    sizes = np.zeros(ivf.nlist, dtype=np.int64)  # entries per list so far
    for p in inputs:
        part = faiss.read_index(p, faiss.IO_FLAG_MMAP)
        part_ivf = faiss.extract_index_ivf(part)
        added = list_sizes(part_ivf.invlists)
        merge_hazardous_lists(ivf, part_ivf, sizes, added)
        ivf.merge_from(part_ivf, 0)
        sizes += added
        del part
    index.ntotal = ivf.ntotal
    faiss.write_index(index, out_index)
    return int(index.ntotal)


def list_sizes(invlists) -> np.ndarray:
    import numpy as np

    return np.fromiter((invlists.list_size(j) for j in range(invlists.nlist)), dtype=np.int64, count=invlists.nlist)


def merge_hazardous_lists(ivf, part_ivf, sizes, added) -> None:
    """Merge, ahead of ``merge_from``, the lists it would corrupt.

    faiss (1.15) ``BlockInvertedLists::add_entries`` appending to a list whose length in entries is
    a non-zero multiple of its block size in *bytes* copies every block of the list instead of the
    new ones: a heap overflow (a 10M-vector shard aborted with "malloc(): corrupted top size"). Such
    a list is taken out, joined with the part's entries and written back as a new list (an append
    to an empty list is correct); the part's list is emptied, so ``merge_from`` skips it."""
    import faiss
    import numpy as np

    packer = ivf.get_CodePacker()
    target = faiss.downcast_InvertedLists(ivf.invlists)
    source = faiss.downcast_InvertedLists(part_ivf.invlists)
    for j in np.flatnonzero((sizes > 0) & (sizes % packer.block_size == 0) & (added > 0)):
        have_ids, have_codes = _entries(target, int(j), packer)
        new_ids, new_codes = _entries(source, int(j), packer)
        ids = np.concatenate([have_ids, new_ids])
        blocks = _pack(np.concatenate([have_codes, new_codes]), packer)
        target.resize(int(j), 0)
        target.add_entries(int(j), len(ids), faiss.swig_ptr(ids), faiss.swig_ptr(blocks))
        source.resize(int(j), 0)


def _entries(invlists, j: int, packer) -> tuple[np.ndarray, np.ndarray]:
    """(ids, flat codes) of list ``j`` of block inverted lists."""
    import faiss
    import numpy as np

    n = invlists.list_size(j)
    ids = faiss.rev_swig_ptr(invlists.get_ids(j), n).astype(np.int64)  # a copy: the list is rewritten
    nblocks = -(-n // packer.nvec)
    blocks = faiss.rev_swig_ptr(invlists.get_codes(j), nblocks * packer.block_size)
    flat = np.empty(nblocks * packer.nvec * packer.code_size, dtype=np.uint8)
    for b in range(nblocks):
        packer.unpack_all(faiss.swig_ptr(blocks[b * packer.block_size:]),
                          faiss.swig_ptr(flat[b * packer.nvec * packer.code_size:]))
    return ids, flat[: n * packer.code_size]


def _pack(flat, packer) -> np.ndarray:
    """Flat codes -> whole blocks (the last one padded with zero codes)."""
    import faiss
    import numpy as np

    n = len(flat) // packer.code_size
    nblocks = -(-n // packer.nvec)
    padded = np.zeros(nblocks * packer.nvec * packer.code_size, dtype=np.uint8)
    padded[: len(flat)] = flat
    blocks = np.zeros(nblocks * packer.block_size, dtype=np.uint8)
    for b in range(nblocks):
        packer.pack_all(faiss.swig_ptr(padded[b * packer.nvec * packer.code_size:]),
                        faiss.swig_ptr(blocks[b * packer.block_size:]))
    return blocks


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
        idx = read_shard(p, in_ram=False) if ondisk_inputs else faiss.read_index(p, faiss.IO_FLAG_MMAP)
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
    """Build index shard ``name`` from ``parts`` (part names): in RAM for fast-scan codes; otherwise
    into on-disk inverted lists, staged when there are more than ``fanin`` parts."""
    import faiss

    if fanin < 2:
        raise ConfigError(f"merge fan-in must be >= 2, got {fanin}")
    faiss.omp_set_num_threads(max(1, int(threads)))
    trained, info = index.read_trained()
    tmp = tempfile.mkdtemp(prefix=f"merge-{name}-", dir=workdir)
    try:
        files = [index.local_copy(index.part_rel(p), cache_dir=tmp) for p in parts]
        final_dir = os.path.join(tmp, "final")
        os.makedirs(final_dir)
        out = os.path.join(final_dir, f"{name}.index")
        index_rel, ivfdata_rel = index.shard_rels(name)
        if is_fast_scan(info.factory):
            ntotal = merge_in_ram(trained, files, out)
            shard = IndexShard(name=name, index=index_rel, ivfdata="", ntotal=ntotal, parts=parts,
                               trained_sha256=sha256_bytes(trained), index_bytes=os.path.getsize(out),
                               index_sha256=file_sha256(out))
            index.publish_file(out, index_rel)
            return shard
        ondisk = False
        stage = 0
        while len(files) > fanin:  # stage: fan-in groups -> intermediate on-disk indexes
            nxt = []
            for j in range(0, len(files), fanin):
                staged = os.path.join(tmp, f"stage{stage}-{j // fanin:05d}.index")
                merge_to_ondisk(trained, files[j : j + fanin], staged, ondisk_inputs=ondisk)
                nxt.append(staged)
            if ondisk:  # the previous stage's intermediates are no longer needed
                for f in files:
                    os.remove(f)
                    os.remove(invlists_path(f))
            files, ondisk, stage = nxt, True, stage + 1
        ntotal = merge_to_ondisk(trained, files, out, ondisk_inputs=ondisk)
        ivfdata = invlists_path(out)
        index_bytes, ivf_bytes = os.path.getsize(out), os.path.getsize(ivfdata)
        sums = file_sha256(out), file_sha256(ivfdata)
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
    if is_fast_scan(trained.factory):  # lists are stored in blocks of 32 codes: half a block wasted a list
        budget -= trained.nlist * 16 * trained.code_size
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
    numbers = {part.name: part.shard_numbers for part in new_parts}
    for name, part_names in jobs:  # which embedding shards each index shard holds: rerank goes there
        results[name].numbers = to_ranges(n for p in part_names for n in numbers[p])
        manifest.shards.append(results[name])
    manifest.ntotal = sum(s.ntotal for s in manifest.shards)
    manifest.side_vectors = all(part.side_vectors for part in ledger.parts)
    manifest.registry_version = reg.version
    manifest.registered_shards = len(reg)
    manifest.shard_memory_gb = cfg.shard_memory_gb
    p.index.write_manifest(manifest)  # last: what search loads
    progress.log(f"manifest: {len(manifest.shards)} index shard(s), {manifest.ntotal:,} vectors")
    return manifest
