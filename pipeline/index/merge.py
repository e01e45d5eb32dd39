"""Merge: recorded parts -> index shards with on-disk inverted lists, then the manifest.

Parts not yet in any index shard are packed, in ledger order, into new index shards of at
most ``shard_memory_gb`` each (inverted lists + fixed structures), so each fits one serving
actor. Existing index shards are never rewritten: an incremental run adds new shards.
A shard with more than ``merge_fanin`` parts is merged in stages (fan-in at a time into
intermediate on-disk indexes, then those). One Ray task per new shard; the manifest is
written last, so a killed merge leaves the previous manifest valid and a rerun redoes it.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from typing import Any, Callable

from pipeline import io
from pipeline.config import IndexConfig
from pipeline.errors import ConfigError, MismatchError
from pipeline.index.add import read_ledger
from pipeline.index.manifest import Layout, empty_manifest, read_trained_info, sha256_bytes
from pipeline.index.registry import Registry

Progress = Callable[[str, int, int], None]


def _local_copy(url: str, tmp: str, storage: io.Storage | None) -> str:
    if io.is_local(url):
        return url.removeprefix("file://")
    dest = os.path.join(tmp, url.rsplit("/", 1)[-1])
    fs, path = io.filesystem(url, storage)
    fs.get_file(path, dest)
    return dest


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
    ivfdata = out_index[: -len(".index")] + ".ivfdata" if out_index.endswith(".index") else out_index + ".ivfdata"
    invlists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, ivfdata)
    ntotal = invlists.merge_from_multiple(vec.data(), vec.size(), False)
    index.ntotal = ivf.ntotal = ntotal
    ivf.replace_invlists(invlists, True)
    invlists.this.disown()
    faiss.write_index(index, out_index)
    del index, holders
    return int(ntotal)


def merge_shard(
    index: str,
    name: str,
    parts: list[str],
    storage: io.Storage | None = None,
    fanin: int = 64,
    threads: int = 1,
    workdir: str | None = None,
) -> dict[str, Any]:
    """Build index shard ``name`` from ``parts`` (part names); staged when there are many."""
    import faiss

    faiss.omp_set_num_threads(max(1, int(threads)))
    layout = Layout(index)
    trained = io.read_bytes(layout.trained, storage)
    t0 = time.time()
    tmp = tempfile.mkdtemp(prefix=f"merge-{name}-", dir=workdir)
    try:
        files = [_local_copy(layout.part(p), tmp, storage) for p in parts]
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
                    os.remove(f[: -len(".index")] + ".ivfdata")
            files, ondisk, stage = nxt, True, stage + 1
        final_dir = os.path.join(tmp, "final")
        os.makedirs(final_dir)
        out = os.path.join(final_dir, f"{name}.index")
        ntotal = merge_to_ondisk(trained, files, out, ondisk_inputs=ondisk)
        ivfdata = out[: -len(".index")] + ".ivfdata"
        index_bytes, ivf_bytes = os.path.getsize(out), os.path.getsize(ivfdata)
        # publish the data file first, the small index file (which names it) last
        for src, dst in ((ivfdata, layout.shard_ivfdata(name)), (out, layout.shard_index(name))):
            if io.is_local(dst):
                dst_path = dst.removeprefix("file://")
                os.makedirs(os.path.dirname(dst_path), exist_ok=True)
                shutil.move(src, dst_path + ".tmp")
                os.replace(dst_path + ".tmp", dst_path)
            else:
                fs, path = io.filesystem(dst, storage)
                fs.put_file(src, path)
        return {
            "name": name,
            "ntotal": ntotal,
            "parts": parts,
            "stages": stage + 1,
            "index_bytes": index_bytes,
            "ivfdata_bytes": ivf_bytes,
            "trained_sha256": sha256_bytes(trained),
            "seconds": round(time.time() - t0, 3),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pack_parts(parts: list[dict[str, Any]], capacity: int) -> list[list[dict[str, Any]]]:
    """Consecutive parts into groups of at most ``capacity`` vectors (a bigger part stands alone)."""
    groups: list[list[dict[str, Any]]] = []
    size = 0
    for p in parts:
        if groups and size + p["ntotal"] <= capacity:
            groups[-1].append(p)
            size += p["ntotal"]
        else:
            groups.append([p])
            size = p["ntotal"]
    return groups


def shard_capacity(trained: dict[str, Any], shard_memory_gb: float) -> int:
    budget = shard_memory_gb * 2**30 - trained["fixed_bytes"]
    if budget <= trained["bytes_per_vector"]:
        raise ConfigError(
            f"index.shard_memory_gb={shard_memory_gb} does not even hold the fixed structures "
            f"({trained['fixed_bytes'] / 2**30:.2f} GiB) of {trained['factory']}"
        )
    return int(budget // trained["bytes_per_vector"])


def run_merge(
    cfg: IndexConfig,
    *,
    use_ray: bool = True,
    log: Callable[[str], None] = print,
    on_progress: Progress | None = None,
) -> dict[str, Any]:
    """Merge recorded parts that no index shard holds into new index shards; write the manifest."""
    trained = read_trained_info(cfg.index, cfg.storage)
    layout = Layout(cfg.index)
    manifest = io.read_json(layout.manifest, cfg.storage) if io.exists(layout.manifest, cfg.storage) else empty_manifest(trained)
    if manifest["trained_sha256"] != trained["sha256"]:
        raise MismatchError(
            f"{layout.manifest!r} was built from trained index {manifest['trained_sha256'][:12]}, "
            f"but {layout.trained!r} is {trained['sha256'][:12]}"
        )
    ledger = read_ledger(cfg.index, cfg.storage)
    if ledger["parts"] and ledger["trained_sha256"] != trained["sha256"]:
        raise MismatchError(f"the parts ledger belongs to trained index {str(ledger['trained_sha256'])[:12]}")
    merged = {p for s in manifest["shards"] for p in s["parts"]}
    new_parts = [p for p in ledger["parts"] if p["name"] not in merged]
    reg = Registry.load(cfg.index, cfg.storage)
    if not new_parts:
        log(f"nothing to merge: {len(manifest['shards'])} index shard(s) hold {manifest['ntotal']:,} vectors")
        return manifest
    capacity = shard_capacity(trained, cfg.shard_memory_gb)
    groups = pack_parts(new_parts, capacity)
    first = len(manifest["shards"])
    jobs = [(f"shard-{first + i:05d}", [p["name"] for p in g]) for i, g in enumerate(groups)]
    n_new = sum(p["ntotal"] for p in new_parts)
    log(f"merging {len(new_parts)} part(s), {n_new:,} vectors -> {len(jobs)} new index shard(s) "
        f"(<= {capacity:,} vectors each, fan-in {cfg.merge_fanin})")
    results = []
    if use_ray:
        from pipeline.ray_util import connect

        ray = connect(cfg.ray_address)
        task = ray.remote(merge_shard).options(num_cpus=1, max_retries=3, retry_exceptions=[OSError, ConnectionError])
        refs = [task.remote(cfg.index, n, ps, cfg.storage, cfg.merge_fanin, max(1, cfg.threads)) for n, ps in jobs]
        for i in range(len(refs)):
            ready, refs_left = ray.wait(refs, num_returns=i + 1)
            if on_progress:
                on_progress("merge", i + 1, len(jobs))
        results = ray.get(refs)
    else:
        for i, (n, ps) in enumerate(jobs):
            results.append(merge_shard(cfg.index, n, ps, cfg.storage, cfg.merge_fanin, cfg.threads or os.cpu_count() or 1))
            if on_progress:
                on_progress("merge", i + 1, len(jobs))
    for r in results:
        manifest["shards"].append(
            {
                "name": r["name"],
                "index": f"shards/{r['name']}.index",
                "ivfdata": f"shards/{r['name']}.ivfdata",
                "ntotal": r["ntotal"],
                "parts": r["parts"],
                "index_bytes": r["index_bytes"],
                "ivfdata_bytes": r["ivfdata_bytes"],
                "trained_sha256": r["trained_sha256"],
            }
        )
    manifest["ntotal"] = sum(s["ntotal"] for s in manifest["shards"])
    # exact rerank can read raw fp16 side files only if every part wrote them
    manifest["side_vectors"] = all(p.get("side_vectors", False) for p in ledger["parts"])
    manifest["registry_version"] = reg.version
    manifest["registered_shards"] = len(reg)
    manifest["shard_memory_gb"] = cfg.shard_memory_gb
    io.write_json(layout.manifest, manifest, cfg.storage)
    log(f"manifest: {len(manifest['shards'])} index shard(s), {manifest['ntotal']:,} vectors")
    return manifest


def expected_shards(n: int, trained: dict[str, Any], shard_memory_gb: float) -> int:
    return max(1, math.ceil(n / shard_capacity(trained, shard_memory_gb)))
