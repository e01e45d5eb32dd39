"""Train once: a uniform sample across the embedding shards -> ``{index}/trained.index``.

Runs on the driver (faiss-cpu), or as one Ray task holding a GPU when faiss has GPU support
and the cluster has one: k-means for the coarse quantizer is the part that benefits.
``trained.json`` is written last and is the completion marker; a rerun with the same
settings finds it and does nothing.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import IndexConfig
from pipeline.errors import ConfigError, MismatchError
from pipeline.index import factory as fac
from pipeline.index.plan import IndexPlan, plan_index
from pipeline.index.registry import Registry
from pipeline.layout.embeddings import EmbeddingsFolder, check_columns, vectors_of
from pipeline.layout.index import TrainedInfo, sha256_bytes
from pipeline.progress import NullProgress, Progress


def set_threads(threads: int = 0) -> int:
    import faiss

    n = threads or os.cpu_count() or 1
    faiss.omp_set_num_threads(n)
    return n


def gpu_faiss_available() -> bool:
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def read_ok_vectors(folder: EmbeddingsFolder, shard: str, positions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(rows, float32 vectors) of the status-"ok" rows of one shard (or of ``positions`` only)."""
    with folder.open(folder.parquet_name(shard)) as f:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(f)
        check_columns(pf.schema_arrow, folder.parquet_url(shard))
        columns = ["row", "status", "embedding"]
        if positions is None:
            table = pf.read(columns=columns)
        else:  # only the row groups that hold a wanted position are read and decoded
            sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
            starts = np.concatenate([[0], np.cumsum(sizes)])
            positions = np.sort(positions)
            groups = np.unique(np.searchsorted(starts, positions, side="right") - 1)
            table = pf.read_row_groups(groups.tolist(), columns=columns)
            kept = np.concatenate([np.arange(starts[g], starts[g + 1]) for g in groups]) if len(groups) else []
            table = table.take(pa.array(np.searchsorted(kept, positions)))
    ok = pc.and_(pc.equal(table.column("status"), "ok"), pc.is_valid(table.column("embedding")))
    table = table.filter(ok)
    if table.num_rows == 0:
        return np.zeros(0, np.int64), np.zeros((0, table.schema.field("embedding").type.list_size), np.float32)
    return table.column("row").to_numpy().astype(np.int64), vectors_of(table)


def sample_vectors(folder: EmbeddingsFolder, shards: list[str], n_sample: int, *, max_shards: int = 2048,
                   seed: int = 0, threads: int = 8, progress: Progress | None = None) -> tuple[np.ndarray, int]:
    """A uniform random sample of ~``n_sample`` ok vectors; also returns the estimated corpus size.

    Up to ``max_shards`` shards are picked uniformly at random (input tars hold about the same
    number of samples, so this is close to uniform over vectors), then rows are drawn from each
    in proportion to its size.
    """
    progress = progress or NullProgress()
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(shards), size=min(max_shards, len(shards)), replace=False).tolist())
    with ThreadPoolExecutor(max_workers=threads) as pool:
        rows = np.array(list(pool.map(lambda i: folder.shard_rows(shards[i]), chosen)), dtype=np.int64)
    n_est = int(round(rows.mean() * len(shards))) if len(rows) else 0
    total = int(rows.sum())
    if total == 0:
        raise ConfigError("the embedding shards hold no rows: nothing to train on")
    share = np.minimum(rows, np.ceil(rows * (n_sample / total)).astype(np.int64))
    seeds = rng.integers(0, 2**31, size=len(chosen))

    with progress.task("sample", len(chosen), "shards") as bar:
        def one(j: int) -> np.ndarray:
            k = int(share[j])
            if k == 0:
                return np.zeros((0, 0), np.float32)
            pos = np.random.default_rng(seeds[j]).choice(int(rows[j]), size=k, replace=False)
            _, vecs = read_ok_vectors(folder, shards[chosen[j]], positions=pos)
            bar.advance()
            return vecs

        with ThreadPoolExecutor(max_workers=threads) as pool:
            parts = [p for p in pool.map(one, range(len(chosen))) if p.size]
    x = np.ascontiguousarray(np.concatenate(parts))
    if len(x) > n_sample:
        x = x[np.sort(rng.choice(len(x), size=n_sample, replace=False))]
    return x, n_est


def train_index(x: np.ndarray, factory: str, metric: str = "ip", gpu: bool = False,
                two_level_from: int = 0) -> tuple[Any, str]:
    """Train an empty index of ``factory`` on ``x``; k-means on this node's GPUs when ``gpu`` and
    faiss has GPU support here (else on its CPUs, said in the returned device), in two levels
    from ``two_level_from`` lists on (0: never)."""
    import faiss

    index = faiss.index_factory(x.shape[1], factory, fac.metric_of(metric))
    ivf_pq = faiss.try_extract_index_ivf(index)
    if ivf_pq is not None and hasattr(faiss.downcast_index(ivf_pq), "do_polysemous_training"):
        # the factory turns on polysemous code reordering (simulated annealing, minutes of CPU)
        # that only polysemous search uses; we never search that way
        faiss.downcast_index(ivf_pq).do_polysemous_training = False
    use_gpu = gpu and gpu_faiss_available()
    used = "cpu" if not gpu else "cpu (a GPU was asked for, but faiss on this node has no GPU support)"
    if use_gpu:
        used = f"cuda x{faiss.get_num_gpus()}"
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and two_level_from and ivf.nlist >= two_level_from:
        train_two_level(index, x, spherical=metric == "ip", gpu=use_gpu)
        return index, used + f", two-level k-means ({int(np.sqrt(ivf.nlist))} x ~{ivf.nlist // int(np.sqrt(ivf.nlist))})"
    if use_gpu:
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlat(ivf.d, ivf.metric_type))
    index.train(x)
    if use_gpu:
        ivf.clustering_index = None
    return index, used


def train_two_level(index, x: np.ndarray, spherical: bool, gpu: bool) -> None:
    """Train ``index`` with its coarse k-means split in two levels: sqrt(nlist) clusters first,
    then each cluster's points into a share of the nlist centroids proportional to its size.

    One-level k-means costs n_sample x nlist distance computations per iteration: at 2^20 lists
    and 30 points a list, ~10^18 flop, a day on a GPU. Two levels cost n_sample x 2 sqrt(nlist),
    minutes (faiss.contrib.clustering.two_level_clustering; its IVF wrapper handles only L2).
    The pre-transform (OPQ) is trained first and the centroids live in its output space; the
    residual codes are then trained by the index itself (the quantizer, full, is not retrained).
    """
    import faiss
    from faiss.contrib.clustering import two_level_clustering

    top = faiss.downcast_index(index)
    inner = top
    if isinstance(top, faiss.IndexPreTransform):
        for i in range(top.chain.size()):
            vt = top.chain.at(i)
            vt.train(x)
            x = vt.apply(x)
        inner = faiss.downcast_index(top.index)
    ivf = faiss.extract_index_ivf(inner)
    centroids, _ = two_level_clustering(np.ascontiguousarray(x, np.float32), int(np.sqrt(ivf.nlist)), ivf.nlist,
                                        spherical=spherical, gpu=gpu, seed=1234)
    ivf.quantizer.train(centroids)
    ivf.quantizer.add(centroids)
    inner.train(x)  # the codes (PQ on residuals); the quantizer already holds nlist centroids
    top.is_trained = True


def _train_job(p: IndexPlan, shards: list[str], info: TrainedInfo, n_sample: int, gpu: bool,
               progress: Progress | None = None) -> TrainedInfo:
    """Sample, train, write. Runs on the driver or inside a GPU Ray task."""
    import faiss

    cfg = p.cfg
    set_threads(cfg.threads)
    t0 = time.time()
    x, _ = sample_vectors(p.embeddings, shards, n_sample, max_shards=cfg.train_max_shards, seed=cfg.seed,
                          progress=progress)
    t1 = time.time()
    index, device = train_index(x, info.factory, cfg.metric, gpu, cfg.two_level_from_nlist)
    if gpu:
        import ray

        device += f" on node {ray.get_runtime_context().get_node_id()[:12]}"
    t2 = time.time()
    data = faiss.serialize_index(index).tobytes()
    info.sha256 = sha256_bytes(data)
    info.train_size = int(len(x))
    info.device = device
    info.sample_seconds = round(t1 - t0, 3)
    info.train_seconds = round(t2 - t1, 3)
    info.trained_bytes = len(data)
    p.index.write_trained(data, info)
    return info


def run_train(cfg: IndexConfig, progress: Progress | None = None) -> TrainedInfo:
    """Register complete shards, choose the factory, sample, train. Idempotent."""
    progress = progress or NullProgress()
    p = plan_index(cfg)
    with p.lock("replica index train"):
        return _train_locked(p, progress)


def _train_locked(p: IndexPlan, progress: Progress) -> TrainedInfo:
    cfg = p.cfg
    identity = p.embeddings.read_info().identity
    reg = Registry.load_or_create(p.index, p.embeddings, identity)
    new = reg.register_complete()  # saved once the settings are known to work

    def save_registry() -> None:
        if new:
            reg.save(p.index)
            progress.log(f"registered {len(new)} new shard(s); registry version {reg.version}, {len(reg)} shards")

    if len(reg) == 0:
        raise ConfigError(f"{cfg.embeddings!r} has no complete shards (no shard's stats file is written yet)")
    if p.index.is_trained():
        save_registry()
        info = p.index.read_trained_info()
        if cfg.factory and cfg.factory != info.factory:
            raise MismatchError(
                f"index {cfg.index!r} is already trained with {info.factory!r}, not {cfg.factory!r}; "
                "use a new index location to train another factory"
            )
        progress.log(f"already trained: {info.factory} (sha256 {info.sha256[:12]})")
        return info

    shards = list(reg.names)
    dim = int(identity.get("dim") or 0)
    if not dim:
        import pyarrow.parquet as pq

        with p.embeddings.open(p.embeddings.parquet_name(shards[0])) as f:
            dim = pq.ParquetFile(f).schema_arrow.field("embedding").type.list_size
    # corpus size from a cheap footer sample
    rng = np.random.default_rng(cfg.seed)
    probe = rng.choice(len(shards), size=min(32, len(shards)), replace=False)
    with ThreadPoolExecutor(max_workers=8) as pool:
        mean_rows = float(np.mean(list(pool.map(lambda i: p.embeddings.shard_rows(shards[i]), probe))))
    n_est = int(round(mean_rows * len(shards)))
    factory = cfg.factory
    if not factory:
        budget = int(cfg.memory_budget_gb * 2**30) if cfg.memory_budget_gb > 0 else None
        if budget is None:  # default: dim/8 bytes of code per vector (64 B at 512-d) plus ids
            budget = n_est * (dim // 8 + fac.ID_BYTES) + fac.default_nlist(n_est, cfg.max_nlist) * dim * 8
        factory = fac.choose_factory(dim, n_est, budget, max_nlist=cfg.max_nlist, nlist=cfg.nlist)
    finfo = fac.describe_factory(factory, dim, cfg.metric)
    n_sample = cfg.train_size or fac.default_train_size(finfo.nlist, n_est, cfg.train_cap)
    need = fac.min_training_points(factory, dim, cfg.metric)
    if min(n_sample, n_est) < need:
        raise ConfigError(
            f"{factory} needs at least {need:,} training vectors (one per IVF list and PQ codeword), but only "
            f"{min(n_sample, n_est):,} are available: use a smaller factory (fewer lists, Flat codes) or leave "
            "--factory empty to have one chosen"
        )
    save_registry()
    progress.log(f"index factory {finfo.describe(n_est)}")
    progress.log(f"training on {n_sample:,} sampled vectors (corpus ~{n_est:,} in {len(shards)} shards)")
    info = TrainedInfo(**finfo.to_dict(), identity=identity, embeddings=p.embeddings.url, corpus_estimate=n_est,
                       registry_version=reg.version)
    if wants_gpu_task(cfg):
        import ray

        # a task asking for a GPU: on an autoscaling cluster whose GPU nodes are gone after embed,
        # the pending request is what makes the autoscaler add one
        progress.log("training in a Ray task that asks for one GPU (it waits until the cluster has one)")
        ref = ray.remote(num_gpus=1)(_train_job).remote(p, shards, info, n_sample, True)
        waited = 0
        while not ray.wait([ref], timeout=60)[0]:
            waited += 60
            progress.log(f"index train: waiting {waited}s for the GPU task (pending until a node with a GPU joins)")
        return ray.get(ref)
    return _train_job(p, shards, info, n_sample, False, progress)


def wants_gpu_task(cfg: IndexConfig) -> bool:
    """``cuda``: always (ask the cluster for a GPU); ``auto``: when the cluster has a GPU now; ``cpu``: never."""
    if cfg.train_device == "cpu":
        return False
    import ray

    from pipeline.ray_util import cluster_gpus, connect

    if cfg.train_device == "cuda":
        connect(cfg.ray.address)
        return True
    if ray.is_initialized() or cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        connect(cfg.ray.address)
        return cluster_gpus() >= 1
    return False
