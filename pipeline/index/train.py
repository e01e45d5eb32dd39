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
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import io
from pipeline.config import IndexConfig
from pipeline.errors import ConfigError, MismatchError
from pipeline.index import factory as fac
from pipeline.index.manifest import Layout, read_trained_info, sha256_bytes
from pipeline.index.registry import Registry, read_embeddings_info, register_complete_shards
from pipeline.schema import vectors_of

Progress = Callable[[str, int, int], None]


def set_threads(threads: int = 0) -> int:
    import faiss

    n = threads or os.cpu_count() or 1
    faiss.omp_set_num_threads(n)
    return n


def gpu_faiss_available() -> bool:
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _num_rows(url: str, storage: io.Storage | None) -> int:
    fs, path = io.filesystem(url, storage)
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def read_ok_vectors(url: str, storage: io.Storage | None = None, positions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(rows, float32 vectors) of the status-"ok" rows of one shard (or of ``positions`` only)."""
    fs, path = io.filesystem(url, storage)
    with fs.open(path, "rb") as f:
        table = pq.ParquetFile(f).read(columns=["row", "status", "embedding"])
    if positions is not None:
        table = table.take(pa.array(np.sort(positions)))
    ok = pc.and_(pc.equal(table.column("status"), "ok"), pc.is_valid(table.column("embedding")))
    table = table.filter(ok)
    if table.num_rows == 0:
        return np.zeros(0, np.int64), np.zeros((0, table.schema.field("embedding").type.list_size), np.float32)
    return table.column("row").to_numpy().astype(np.int64), vectors_of(table)


def sample_vectors(
    urls: list[str],
    n_sample: int,
    *,
    max_shards: int = 2048,
    seed: int = 0,
    storage: io.Storage | None = None,
    threads: int = 8,
    on_progress: Progress | None = None,
) -> tuple[np.ndarray, int]:
    """A uniform random sample of ~``n_sample`` ok vectors; also returns the estimated corpus size.

    Up to ``max_shards`` shards are picked uniformly at random (input tars hold about the same
    number of samples, so this is close to uniform over vectors), then rows are drawn from each
    in proportion to its size.
    """
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(urls), size=min(max_shards, len(urls)), replace=False).tolist())
    with ThreadPoolExecutor(max_workers=threads) as pool:
        rows = np.array(list(pool.map(lambda i: _num_rows(urls[i], storage), chosen)), dtype=np.int64)
    n_est = int(round(rows.mean() * len(urls))) if len(rows) else 0
    total = int(rows.sum())
    if total == 0:
        raise ConfigError("the embedding shards hold no rows: nothing to train on")
    share = np.minimum(rows, np.ceil(rows * (n_sample / total)).astype(np.int64))
    seeds = rng.integers(0, 2**31, size=len(chosen))
    done = [0]

    def one(j: int) -> np.ndarray:
        k = int(share[j])
        if k == 0:
            return np.zeros((0, 0), np.float32)
        pos = np.random.default_rng(seeds[j]).choice(int(rows[j]), size=k, replace=False)
        _, vecs = read_ok_vectors(urls[chosen[j]], storage, positions=pos)
        done[0] += 1
        if on_progress:
            on_progress("sample", done[0], len(chosen))
        return vecs

    with ThreadPoolExecutor(max_workers=threads) as pool:
        parts = [p for p in pool.map(one, range(len(chosen))) if p.size]
    x = np.ascontiguousarray(np.concatenate(parts))
    if len(x) > n_sample:
        x = x[np.sort(rng.choice(len(x), size=n_sample, replace=False))]
    return x, n_est


def train_index(x: np.ndarray, factory: str, metric: str = "ip", device: str = "auto") -> tuple[Any, str]:
    """Train an empty index of ``factory`` on ``x``; k-means on the GPU when asked/available."""
    import faiss

    index = faiss.index_factory(x.shape[1], factory, fac.metric_of(metric))
    ivf_pq = faiss.try_extract_index_ivf(index)
    if ivf_pq is not None and hasattr(faiss.downcast_index(ivf_pq), "do_polysemous_training"):
        # the factory turns on polysemous code reordering (simulated annealing, minutes of CPU)
        # that only polysemous search uses; we never search that way
        faiss.downcast_index(ivf_pq).do_polysemous_training = False
    use_gpu = device == "cuda" or (device == "auto" and gpu_faiss_available())
    if device == "cuda" and not gpu_faiss_available():
        raise ConfigError("index.train_device is cuda but faiss has no GPU support or no GPU is visible")
    used = "cpu"
    if use_gpu:
        ivf = faiss.extract_index_ivf(index)
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlat(ivf.d, ivf.metric_type))
        used = f"cuda x{faiss.get_num_gpus()}"
    index.train(x)
    if use_gpu:
        faiss.extract_index_ivf(index).clustering_index = None
    return index, used


def _train_job(cfg: IndexConfig, urls: list[str], factory: str, info: dict[str, Any], n_sample: int,
               on_progress: Progress | None = None) -> dict[str, Any]:
    """Sample, train, write. Runs on the driver or inside a GPU Ray task."""
    import faiss

    set_threads(cfg.threads)
    t0 = time.time()
    x, _ = sample_vectors(urls, n_sample, max_shards=cfg.train_max_shards, seed=cfg.seed, storage=cfg.storage,
                          on_progress=on_progress)
    t1 = time.time()
    index, device = train_index(x, factory, cfg.metric, cfg.train_device)
    t2 = time.time()
    data = faiss.serialize_index(index).tobytes()
    layout = Layout(cfg.index)
    io.write_bytes(layout.trained, data, cfg.storage)
    info = {
        **info,
        "sha256": sha256_bytes(data),
        "train_size": int(len(x)),
        "device": device,
        "sample_seconds": round(t1 - t0, 3),
        "train_seconds": round(t2 - t1, 3),
        "trained_bytes": len(data),
    }
    io.write_json(layout.trained_info, info, cfg.storage)  # completion marker, last
    return info


def validate(cfg: IndexConfig) -> None:
    if not cfg.embeddings:
        raise ConfigError("index.embeddings is required (the folder written by `replica embed`)")
    if not cfg.index:
        raise ConfigError("index.index is required (where the index is written)")
    if cfg.train_device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"index.train_device must be auto, cpu or cuda, got {cfg.train_device!r}")
    fac.metric_of(cfg.metric)
    for name in ("group_size", "merge_fanin", "nprobe", "train_max_shards"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"index.{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.merge_fanin < 2:
        raise ConfigError("index.merge_fanin must be >= 2")
    if cfg.shard_memory_gb <= 0:
        raise ConfigError("index.shard_memory_gb must be > 0")


def run_train(cfg: IndexConfig, log: Callable[[str], None] = print, on_progress: Progress | None = None) -> dict[str, Any]:
    """Register complete shards, choose the factory, sample, train. Idempotent."""
    validate(cfg)
    emb = read_embeddings_info(cfg.embeddings, cfg.storage)
    identity = emb["identity"]
    reg = Registry.load_or_create(cfg.index, cfg.embeddings, identity, cfg.storage)
    new = register_complete_shards(reg, cfg.storage)
    if new:
        reg.save(cfg.index, cfg.storage)
        log(f"registered {len(new)} new shard(s); registry version {reg.version}, {len(reg)} shards")
    if len(reg) == 0:
        raise ConfigError(f"{cfg.embeddings!r} has no complete shards (no *.stats.json)")
    layout = Layout(cfg.index)
    if io.exists(layout.trained_info, cfg.storage):
        info = read_trained_info(cfg.index, cfg.storage)
        if cfg.factory and cfg.factory != info["factory"]:
            raise MismatchError(
                f"index {cfg.index!r} is already trained with {info['factory']!r}, not {cfg.factory!r}; "
                "use a new index location to train another factory"
            )
        log(f"already trained: {info['factory']} (sha256 {info['sha256'][:12]})")
        return info

    dim = int(identity.get("dim") or 0)
    urls = [reg.url(i) for i in range(len(reg))]
    if not dim:
        import pyarrow.parquet as pq_

        fs, path = io.filesystem(urls[0], cfg.storage)
        with fs.open(path, "rb") as f:
            dim = pq_.ParquetFile(f).schema_arrow.field("embedding").type.list_size
    # corpus size from a cheap footer sample
    rng = np.random.default_rng(cfg.seed)
    probe = rng.choice(len(urls), size=min(32, len(urls)), replace=False)
    with ThreadPoolExecutor(max_workers=8) as pool:
        mean_rows = float(np.mean(list(pool.map(lambda i: _num_rows(urls[i], cfg.storage), probe))))
    n_est = int(round(mean_rows * len(urls)))
    factory = cfg.factory
    if not factory:
        budget = int(cfg.memory_budget_gb * 2**30) if cfg.memory_budget_gb > 0 else None
        if budget is None:  # default: dim/8 bytes of code per vector (64 B at 512-d) plus ids
            budget = n_est * (dim // 8 + fac.ID_BYTES) + fac.default_nlist(n_est, cfg.max_nlist) * dim * 8
        factory = fac.choose_factory(dim, n_est, budget, max_nlist=cfg.max_nlist, nlist=cfg.nlist)
    finfo = fac.describe_factory(factory, dim, cfg.metric)
    n_sample = cfg.train_size or fac.default_train_size(finfo.nlist, n_est, cfg.train_cap)
    if n_sample < finfo.nlist:
        raise ConfigError(
            f"training sample {n_sample:,} is smaller than nlist {finfo.nlist}: lower nlist or raise index.train_size"
        )
    log(f"index factory {finfo.describe(n_est)}")
    log(f"training on {n_sample:,} sampled vectors (corpus ~{n_est:,} in {len(urls)} shards)")
    info = {
        **finfo.to_dict(),
        "identity": identity,
        "embeddings": cfg.embeddings,
        "corpus_estimate": n_est,
        "registry_version": reg.version,
    }
    use_gpu_task = False
    if cfg.train_device != "cpu":
        try:
            from pipeline.ray_util import cluster_gpus, connect

            import ray

            if ray.is_initialized() or cfg.ray_address or os.environ.get("RAY_ADDRESS"):
                connect(cfg.ray_address)
                use_gpu_task = cluster_gpus() >= 1
        except ImportError:
            use_gpu_task = False
    if use_gpu_task:
        import ray

        log("training in a Ray task on one GPU")
        task = ray.remote(num_gpus=1)(_train_job)
        return ray.get(task.remote(cfg, urls, factory, info, n_sample))
    return _train_job(cfg, urls, factory, info, n_sample, on_progress)


def load_trained(index: str, storage: io.Storage | None = None) -> tuple[Any, dict[str, Any]]:
    """(trained empty faiss index, trained.json), checking the checksum."""
    import faiss

    info = read_trained_info(index, storage)
    data = io.read_bytes(Layout(index).trained, storage)
    if sha256_bytes(data) != info["sha256"]:
        raise MismatchError(f"{Layout(index).trained!r} does not match the checksum in trained.json")
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8)), info
