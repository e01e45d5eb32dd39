"""Serve: index shards in Ray actors; a searcher fans queries out, merges, and reranks next to the data.

A search is two rounds:

1. **ANN.** The driver applies the trained index's pre-transform (OPQ) and coarse quantizer
   once per batch (:class:`CoarseQuantizer`), then every shard actor scans only the lists it
   was told (``search_preassigned``) and returns its top-k; the driver merges them by
   (score, id), so the answer does not depend on how the index was cut into shards.
2. **Exact rescoring.** Each candidate goes back to the actor whose index shard holds it; the
   actor keeps that shard's fp16 side files on its local disk (copied once, like the shard)
   and returns exact scores, so no vector crosses the network. Without side files, or with
   ``rerank_in_shards=False``, the driver fetches the vectors itself (ranged reads).

Each actor loads its shards in its constructor (nothing heavy is pickled from the driver).
``use_ray=False`` runs the same shards in this process with the same merges: the same answer.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from pipeline.errors import ConfigError, MismatchError
from pipeline.index.registry import decode_ids
from pipeline.layout.index import IndexFolder, IndexShard, from_ranges, to_ranges, vectors_name
from pipeline.storage import Folder, file_sha256

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


def cache_dir_for(cache_dir: str | None) -> str:
    return cache_dir or os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "replica-index")


def local_shard_path(index: IndexFolder, shard: IndexShard, cache_dir: str | None = None) -> str:
    """Path of the shard's .index on local disk (copied, with its .ivfdata beside it, when remote),
    checked against the manifest's checksums (once per local copy)."""
    cache = cache_dir_for(cache_dir)
    key = f"{shard.name}|{shard.trained_sha256}|{shard.ntotal}"
    # the data file first: the index file names it (a shard held in RAM has none)
    data = index.local_copy(shard.ivfdata, cache, key) if shard.ivfdata else None
    path = index.local_copy(shard.index, cache, key)
    if shard.index_sha256:
        verified = f"{path}.verified"
        if index.local or not os.path.exists(verified):
            for file, want in ((path, shard.index_sha256), (data, shard.ivfdata_sha256)):
                if file is None:
                    continue
                if file_sha256(file) != want:
                    raise MismatchError(f"index shard {shard.name}: {file} does not match the manifest's checksum "
                                        "(corrupt or replaced): rebuild it with `replica index merge` into a new index")
            if not index.local:
                open(verified, "w").close()
    return path


def local_side_files(index: IndexFolder, numbers: list[int], cache_dir: str | None = None) -> Folder:
    """A folder on local disk holding the fp16 side files of ``numbers`` (copied once when remote)."""
    if index.local:
        return index.vectors_folder
    paths = [index.vectors_folder.local_copy(vectors_name(n), cache_dir_for(cache_dir), "side-files")
             for n in numbers]
    return Folder(os.path.dirname(paths[0])) if paths else index.vectors_folder


class CoarseQuantizer:
    """The trained index's pre-transform (OPQ) and coarse quantizer: which lists each query probes."""

    def __init__(self, trained: bytes):
        import faiss

        self.index = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
        self.ivf = faiss.extract_index_ivf(self.index)
        pre = faiss.downcast_index(self.index)
        self.pretransform = pre if isinstance(pre, faiss.IndexPreTransform) else None

    def assign(self, queries: np.ndarray, nprobe: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(transformed queries, list distances, list ids), each (n, nprobe)."""
        import faiss

        x = np.ascontiguousarray(queries, dtype=np.float32)
        if self.pretransform is not None:
            x = self._transform(x)
        quant = faiss.downcast_index(self.ivf.quantizer)
        nprobe = min(int(nprobe), int(self.ivf.nlist))  # probing more lists than exist is probing all
        if isinstance(quant, faiss.IndexHNSW):
            quant.hnsw.efSearch = max(int(nprobe) * 2, 64)
        d, i = quant.search(x, int(nprobe))
        return x, d, i

    def _transform(self, x: np.ndarray) -> np.ndarray:
        import faiss

        for j in range(self.pretransform.chain.size()):
            x = faiss.downcast_VectorTransform(self.pretransform.chain.at(j)).apply(x)
        return np.ascontiguousarray(x, dtype=np.float32)


class ShardSet:
    """Some index shards, and their side files, in one process: the body of a search actor."""

    def __init__(self, index: IndexFolder, shards: list[IndexShard], metric: str, dim: int, threads: int = 0,
                 cache_dir: str | None = None, side_files: bool = False):
        import faiss

        from pipeline.index.merge import read_shard

        if threads:
            faiss.omp_set_num_threads(int(threads))
        self.metric, self.dim = metric, dim
        self.names = [s.name for s in shards]
        self.indexes = [read_shard(local_shard_path(index, s, cache_dir), in_ram=not s.ivfdata) for s in shards]
        for s, idx in zip(shards, self.indexes):
            if idx.ntotal != s.ntotal:
                raise MismatchError(f"index shard {s.name} holds {idx.ntotal} vectors, the manifest says {s.ntotal}")
        self.ivfs = [faiss.extract_index_ivf(idx) for idx in self.indexes]
        numbers = sorted({n for s in shards for n in from_ranges(s.numbers)})
        self.vectors = None
        if side_files:
            from pipeline.index.rerank import SideFileVectors

            self.vectors = SideFileVectors(local_side_files(index, numbers, cache_dir), dim)

    def ntotal(self) -> int:
        return int(sum(i.ntotal for i in self.indexes))

    def search(self, queries: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        """Plain search (each shard runs its own coarse quantizer)."""
        ds, ids = [], []
        for idx, ivf in zip(self.indexes, self.ivfs):
            ivf.nprobe = int(nprobe)
            d, i = idx.search(np.ascontiguousarray(queries, dtype=np.float32), k)
            ds.append(d)
            ids.append(i)
        return merge_topk(ds, ids, k, self.metric)

    def search_assigned(self, x: np.ndarray, list_d: np.ndarray, list_i: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Search transformed queries in the lists the coarse quantizer chose for them."""
        ds, ids = [], []
        for ivf in self.ivfs:
            ivf.nprobe = list_i.shape[1]
            d, i = ivf.search_preassigned(x, k, list_i, list_d)
            ds.append(d)
            ids.append(i)
        return merge_topk(ds, ids, k, self.metric)

    def rescore(self, vectors: np.ndarray, owner: np.ndarray, cand: list[np.ndarray]) -> list[Rescored]:
        """Exact scores of candidates held here: per query, (best score over its vectors, which
        vector, score against its first vector)."""
        return rescore(vectors, owner, cand, self.vectors.fetch_stored, self.metric)


#: per query: each candidate's best exact score over the query's vectors, the vector (row) giving
#: it, and its score against the query's first vector (a region query's whole image)
Rescored = tuple[np.ndarray, np.ndarray, np.ndarray]


def rescore(vectors: np.ndarray, owner: np.ndarray, cand: list[np.ndarray], fetch, metric: str = "ip"
            ) -> list[Rescored]:
    """For each query q (the rows of ``vectors`` with ``owner == q``) and its candidate ids
    ``cand[q]``: the exact best score over q's vectors, the row giving it (a region), and the
    score against q's first row (the whole image, when q's rows are its regions)."""
    import faiss

    from pipeline.index.rerank import widen

    lengths = np.array([len(c) for c in cand], dtype=np.int64)
    flat = np.concatenate([np.asarray(c, np.int64) for c in cand] or [np.zeros(0, np.int64)])
    uniq, where = np.unique(flat, return_inverse=True)  # each stored vector fetched once
    stored = fetch(uniq)  # as stored (fp16): widened a query at a time below
    starts = np.r_[0, np.cumsum(lengths)]
    by_owner = np.argsort(owner, kind="stable")  # each query's rows in order, found once
    bounds = np.searchsorted(owner[by_owner], np.arange(len(cand) + 1))
    # one query's candidates are gathered and widened into buffers reused across queries: they
    # stay in cache, where widening the whole batch at once cost a page fault per 4 KiB of output
    longest = int(lengths.max()) if len(lengths) else 0
    gathered = np.empty((longest, stored.shape[1]), stored.dtype)
    wide = np.empty((longest, stored.shape[1]), np.float32)
    by_idx = faiss.fvec_inner_products_by_idx if metric == "ip" else faiss.fvec_L2sqr_by_idx
    out = []
    for q in range(len(cand)):
        rows = by_owner[bounds[q]:bounds[q + 1]]
        n = int(lengths[q])
        if n == 0 or len(rows) == 0:
            out.append((np.zeros(0, np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32)))
            continue
        x = np.ascontiguousarray(vectors[rows], dtype=np.float32)
        np.take(stored, where[starts[q]:starts[q + 1]], axis=0, out=gathered[:n])
        y = widen(gathered[:n], wide[:n])
        pos = np.ascontiguousarray(np.broadcast_to(np.arange(n, dtype=np.int64), (len(rows), n)))
        s = np.empty(pos.shape, dtype=np.float32)  # (regions, candidates)
        by_idx(faiss.swig_ptr(s), faiss.swig_ptr(x), faiss.swig_ptr(y), faiss.swig_ptr(pos),
               x.shape[1], len(rows), n)
        if metric != "ip":
            s = -s
        best = s.argmax(axis=0)
        out.append((s[best, np.arange(s.shape[1])], rows[best].astype(np.int64), s[0].copy()))
    return out


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
        nprobe: int = 0,
        use_ray: bool = True,
        num_actors: int = 0,
        cpus_per_actor: float = 1,
        threads: int = 0,
        ray_address: str | None = None,
        cache_dir: str | None = None,
        rerank_in_shards: bool = True,
    ):
        self.index = index
        self.manifest = index.read_manifest()
        self.manifest.check(identity=identity, where=f"index {index.url!r}")
        if not self.manifest.shards:
            raise ConfigError(f"index {index.url!r} has no index shards yet: run `replica index merge`")
        self.dim = int(self.manifest.dim)
        self.metric = self.manifest.metric
        # 0: what the index's tuning measured, else 64
        self.nprobe = int(nprobe or (self.manifest.tuned or {}).get("nprobe") or 64)
        self.ntotal = int(self.manifest.ntotal)
        shards = self.manifest.shards
        if any(not s.numbers for s in shards):  # an index of 0.1: which shards hold what, from the ledger
            by_part = {p.name: p.shard_numbers for p in index.read_ledger().parts}
            for s in shards:
                s.numbers = to_ranges(n for p in s.parts for n in by_part.get(p, []))
        self.coarse = CoarseQuantizer(index.read_trained(self.manifest.trained_sha256)[0])
        side = rerank_in_shards and self.manifest.side_vectors
        self._actors: list[Any] = []
        self._local: ShardSet | None = None
        self._owner_of: dict[int, int] = {}  # registry number -> actor (or 0 when local)
        if use_ray:
            from pipeline.ray_util import cluster_cpus, connect

            ray = connect(ray_address)
            # one CPU's worth is left to the search's tasks (verification, nL2): actors holding every
            # CPU would leave those tasks pending forever on a cluster that cannot grow
            n = num_actors or max(1, min(len(shards), int(cluster_cpus() // max(cpus_per_actor, 1e-3)) - 1))
            n = min(n, len(shards))
            actor_cls = ray.remote(ShardSet).options(num_cpus=cpus_per_actor, max_restarts=-1, max_task_retries=2)
            per = int(threads or max(1, cpus_per_actor))
            groups = [shards[a::n] for a in range(n)]
            self._actors = [actor_cls.remote(index, g, self.metric, self.dim, per, cache_dir, side) for g in groups]
            counts = ray.get([a.ntotal.remote() for a in self._actors])
            if sum(counts) != self.ntotal:
                raise MismatchError(f"actors hold {sum(counts)} vectors, the manifest says {self.ntotal}")
        else:
            groups = [shards]
            self._local = ShardSet(index, shards, self.metric, self.dim, threads, cache_dir, side)
        self.rerank_in_shards = side
        for a, group in enumerate(groups):
            for s in group:
                for number in from_ranges(s.numbers):
                    self._owner_of[number] = a

    def _check(self, queries: np.ndarray) -> np.ndarray:
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise MismatchError(f"queries have shape {q.shape}; this index holds dim {self.dim} vectors")
        return q

    def search(self, queries: np.ndarray, k: int = 10, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(n, d) float32 queries -> (ANN scores (n, k) float32, ids (n, k) int64); id -1 = no result."""
        q = self._check(queries)
        x, list_d, list_i = self.coarse.assign(q, int(nprobe or self.nprobe))
        if self._local is not None:
            return self._local.search_assigned(x, list_d, list_i, k)
        import ray

        refs = [ray.put(a) for a in (x, list_d, list_i)]
        results = ray.get([a.search_assigned.remote(*refs, k) for a in self._actors])
        return merge_topk([r[0] for r in results], [r[1] for r in results], k, self.metric)

    def rescore(self, vectors: np.ndarray, owner: np.ndarray, cand: list[np.ndarray],
                fallback=None) -> list[Rescored]:
        """Exact (score, best vector row, first vector's score) of each query's candidates (see
        :func:`rescore`), computed where the vectors are.

        ``fallback`` (a VectorSource) fetches vectors into this process when the shards have no
        side files (or ``rerank_in_shards`` is off).
        """
        vectors = self._check(vectors)
        if not self.rerank_in_shards:
            return rescore(vectors, owner, cand, fallback.fetch_stored, self.metric)
        if self._local is not None:
            return self._local.rescore(vectors, owner, cand)
        import ray

        numbers = [decode_ids(c)[0] for c in cand]
        per_actor = [[c[np.array([self._owner_of[int(n)] == a for n in nums], bool)] if len(c) else c
                      for c, nums in zip(cand, numbers)] for a in range(len(self._actors))]
        refs = [ray.put(vectors), ray.put(owner)]
        answers = ray.get([actor.rescore.remote(*refs, mine) for actor, mine in zip(self._actors, per_actor)])
        out = []
        for q in range(len(cand)):  # put each query's candidates back in the order given
            ids = np.concatenate([per_actor[a][q] for a in range(len(self._actors))])
            scores = np.concatenate([answers[a][q][0] for a in range(len(self._actors))])
            rows = np.concatenate([answers[a][q][1] for a in range(len(self._actors))])
            whole = np.concatenate([answers[a][q][2] for a in range(len(self._actors))])
            order = {int(i): j for j, i in enumerate(ids)}
            pick = np.array([order[int(i)] for i in cand[q]], np.int64)
            out.append((scores[pick], rows[pick], whole[pick]))
        return out

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
