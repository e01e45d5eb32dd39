"""Serve: index shards loaded by Ray actors; a searcher fans queries out and merges top-k.

Each actor loads one or more index shards in its constructor (nothing heavy is pickled from
the driver): remote shards are copied to local disk once, then opened with their on-disk
inverted lists. ``IndexSearcher.search`` sends the query batch to every actor, each returns
its shards' merged top-k, and the driver merges those. With ``use_ray=False`` the same
shards are searched in this process with the same merge, so both give the same answer.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from pipeline.errors import ConfigError, MismatchError
from pipeline.layout.index import IndexFolder, IndexShard
from pipeline.storage import file_sha256

CACHE_ENV = "REPLICA_INDEX_CACHE"


def merge_topk(scores: list[np.ndarray], ids: list[np.ndarray], k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard (n, k_i) results into the best k (ties by id); missing results are id -1."""
    d = np.concatenate(scores, axis=1)
    i = np.concatenate(ids, axis=1)
    worst = -np.inf if metric == "ip" else np.inf
    d = np.where(i < 0, worst, d)
    key = -d if metric == "ip" else d
    # score first, then id: the same answer however the shards were grouped
    order = np.lexsort((np.where(i < 0, np.iinfo(np.int64).max, i), key), axis=1)[:, :k]
    d = np.take_along_axis(d, order, axis=1)
    i = np.take_along_axis(i, order, axis=1)
    if d.shape[1] < k:
        pad = k - d.shape[1]
        d = np.pad(d, ((0, 0), (0, pad)), constant_values=worst)
        i = np.pad(i, ((0, 0), (0, pad)), constant_values=-1)
    return d.astype(np.float32), i.astype(np.int64)


def set_search_params(index: Any, nprobe: int) -> None:
    import faiss

    ps = faiss.ParameterSpace()
    ps.set_index_parameter(index, "nprobe", int(nprobe))
    quant = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
    if isinstance(quant, faiss.IndexHNSW):
        quant.hnsw.efSearch = max(int(nprobe) * 2, 64)


def local_shard_path(index: IndexFolder, shard: IndexShard, cache_dir: str | None = None) -> str:
    """Path of the shard's .index on local disk (copied, with its .ivfdata beside it, when remote),
    checked against the manifest's checksums (once per local copy)."""
    cache = cache_dir or os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "replica-index")
    key = f"{shard.name}|{shard.trained_sha256}|{shard.ntotal}"
    data = index.local_copy(shard.ivfdata, cache, key)  # the data file first: the index file names it
    path = index.local_copy(shard.index, cache, key)
    if shard.index_sha256:
        verified = f"{path}.verified"
        if index.local or not os.path.exists(verified):
            for file, want in ((path, shard.index_sha256), (data, shard.ivfdata_sha256)):
                if file_sha256(file) != want:
                    raise MismatchError(f"index shard {shard.name}: {file} does not match the manifest's checksum "
                                        "(corrupt or replaced): rebuild it with `replica index merge` into a new index")
            if not index.local:
                open(verified, "w").close()
    return path


class ShardSet:
    """Some index shards searched in one process; the body of a search actor."""

    def __init__(self, index: IndexFolder, shards: list[IndexShard], metric: str, threads: int = 0,
                 cache_dir: str | None = None):
        import faiss

        from pipeline.index.merge import read_ondisk

        if threads:
            faiss.omp_set_num_threads(int(threads))
        self.metric = metric
        self.names = [s.name for s in shards]
        self.indexes = [read_ondisk(local_shard_path(index, s, cache_dir)) for s in shards]
        for s, idx in zip(shards, self.indexes):
            if idx.ntotal != s.ntotal:
                raise MismatchError(f"index shard {s.name} holds {idx.ntotal} vectors, the manifest says {s.ntotal}")

    def ntotal(self) -> int:
        return int(sum(i.ntotal for i in self.indexes))

    def search(self, queries: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        ds, ids = [], []
        for idx in self.indexes:
            set_search_params(idx, nprobe)
            d, i = idx.search(np.ascontiguousarray(queries, dtype=np.float32), k)
            ds.append(d)
            ids.append(i)
        return merge_topk(ds, ids, k, self.metric)


class IndexSearcher:
    """Search a built index: ``IndexSearcher(IndexFolder(url)).search(queries, k)``.

    ``identity`` (the query embedder's identity dict) is checked against the manifest;
    queries of another dim are refused. ``use_ray`` puts the shards in Ray actors
    (``num_actors`` of them, shards spread round-robin); otherwise all are loaded here.
    """

    def __init__(
        self,
        index: IndexFolder,
        *,
        identity: dict[str, Any] | None = None,
        nprobe: int = 64,
        use_ray: bool = True,
        num_actors: int = 0,
        cpus_per_actor: float = 1,
        threads: int = 0,
        ray_address: str | None = None,
        cache_dir: str | None = None,
    ):
        self.index = index
        self.manifest = index.read_manifest()
        self.manifest.check(identity=identity, where=f"index {index.url!r}")
        if not self.manifest.shards:
            raise ConfigError(f"index {index.url!r} has no index shards yet: run `replica index merge`")
        self.dim = int(self.manifest.dim)
        self.metric = self.manifest.metric
        self.nprobe = nprobe
        self.ntotal = int(self.manifest.ntotal)
        shards = self.manifest.shards
        self._actors: list[Any] = []
        self._local: ShardSet | None = None
        if use_ray:
            from pipeline.ray_util import cluster_cpus, connect

            ray = connect(ray_address)
            n = num_actors or max(1, min(len(shards), int(cluster_cpus() // max(cpus_per_actor, 1e-3))))
            n = min(n, len(shards))
            actor_cls = ray.remote(ShardSet).options(num_cpus=cpus_per_actor)
            per = int(threads or max(1, cpus_per_actor))
            self._actors = [actor_cls.remote(index, shards[a::n], self.metric, per, cache_dir) for a in range(n)]
            counts = ray.get([a.ntotal.remote() for a in self._actors])
            if sum(counts) != self.ntotal:
                raise MismatchError(f"actors hold {sum(counts)} vectors, the manifest says {self.ntotal}")
        else:
            self._local = ShardSet(index, shards, self.metric, threads, cache_dir)

    def search(self, queries: np.ndarray, k: int = 10, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(n, d) float32 queries -> (scores (n, k) float32, ids (n, k) int64); id -1 = no result."""
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise MismatchError(f"queries have shape {q.shape}; this index holds dim {self.dim} vectors")
        nprobe = int(nprobe or self.nprobe)
        if self._local is not None:
            return self._local.search(q, k, nprobe)
        import ray

        ref = ray.put(q)
        results = ray.get([a.search.remote(ref, k, nprobe) for a in self._actors])
        return merge_topk([r[0] for r in results], [r[1] for r in results], k, self.metric)

    def close(self) -> None:
        if self._actors:
            import ray

            for a in self._actors:
                ray.kill(a)
        self._actors = []
        self._local = None

    def __enter__(self) -> "IndexSearcher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
