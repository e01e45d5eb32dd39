"""Choosing and describing the faiss index factory.

Either the user gives a factory string, or one is chosen from the corpus size and a memory
budget: the PQ code is the largest size (m bytes, m from faiss' supported list, m | dim)
whose codes + ids fit the budget, nlist grows like 4*sqrt(n) (power of two, capped), and
large nlist gets an HNSW coarse quantizer so assignment stays fast.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.errors import ConfigError

#: bytes per id in faiss inverted lists
ID_BYTES = 8
#: PQ sub-quantizer counts that faiss (CPU and GPU) supports with 8-bit codes
PQ_M_CHOICES = (4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96)
#: from this nlist on, the coarse quantizer is an HNSW graph over the centroids
HNSW_NLIST = 1 << 16
#: below this many vectors the chosen index stores full vectors (Flat): PQ codebooks need far more
#: training points (faiss asks for 39 per codeword, 256 codewords a sub-quantizer)
FLAT_BELOW = 20_000


@dataclass(frozen=True)
class FactoryInfo:
    factory: str
    dim: int
    metric: str
    nlist: int
    code_size: int
    #: inverted-list bytes per vector: PQ code + int64 id
    bytes_per_vector: int
    #: bytes that do not grow with n: coarse centroids, PQ tables, OPQ matrix, HNSW graph
    fixed_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self, n: int | None = None) -> str:
        s = f"{self.factory}: {self.code_size} B code + {ID_BYTES} B id = {self.bytes_per_vector} B/vector"
        if n:
            total = n * self.bytes_per_vector + self.fixed_bytes
            s += f"; {n:,} vectors -> {human_bytes(total)} (+{human_bytes(self.fixed_bytes)} fixed)"
        return s


def human_bytes(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(b) < 1024 or unit == "PiB":
            return f"{b:.1f} {unit}" if unit != "B" else f"{int(b)} B"
        b /= 1024
    return f"{b:.1f} PiB"


def metric_of(name: str) -> int:
    import faiss

    if name == "ip":
        return faiss.METRIC_INNER_PRODUCT
    if name == "l2":
        return faiss.METRIC_L2
    raise ConfigError(f"index metric must be 'ip' or 'l2', got {name!r}")


def describe_factory(factory: str, dim: int, metric: str = "ip") -> FactoryInfo:
    """Build the (untrained) index once to validate the string and read its sizes."""
    import faiss

    try:
        index = faiss.index_factory(dim, factory, metric_of(metric))
    except RuntimeError as exc:
        raise ConfigError(f"index factory {factory!r} is not valid for dim {dim}: {str(exc).splitlines()[-1]}") from None
    try:
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:
        raise ConfigError(f"index factory {factory!r} is not an IVF index; use e.g. IVF4096,PQ64") from None
    fixed = ivf.nlist * ivf.d * 4
    quant = faiss.downcast_index(ivf.quantizer)
    if isinstance(quant, faiss.IndexHNSW):
        fixed += ivf.nlist * (32 * 2 * 4 + ivf.d * 4)  # links at level 0 plus stored centroids
    if isinstance(ivf, faiss.IndexIVFPQ):
        fixed += ivf.pq.M * ivf.pq.ksub * ivf.pq.dsub * 4
    if index.d != ivf.d:  # a pre-transform (OPQ/PCA)
        fixed += index.d * ivf.d * 4
    return FactoryInfo(
        factory=factory,
        dim=dim,
        metric=metric,
        nlist=int(ivf.nlist),
        code_size=int(ivf.code_size),
        bytes_per_vector=int(ivf.code_size) + ID_BYTES,
        fixed_bytes=int(fixed),
    )


def default_nlist(n: int, max_nlist: int = 1 << 17, min_nlist: int = 16) -> int:
    """About 4*sqrt(n), rounded to a power of two, within [min_nlist, max_nlist].

    Also no more than n/39 so every centroid gets the ~39 training points faiss asks for.
    """
    if n <= 0:
        return min_nlist
    target = 4 * math.sqrt(n)
    nlist = 1 << max(0, round(math.log2(target)))
    nlist = min(nlist, max_nlist, max(min_nlist, 1 << int(math.log2(max(1, n // 39)))))
    return max(min_nlist, nlist)


def choose_factory(
    dim: int,
    n: int,
    memory_budget_bytes: int,
    *,
    max_nlist: int = 1 << 17,
    nlist: int = 0,
    opq: bool | None = None,
) -> str:
    """Pick an IVF-PQ factory whose inverted lists for ``n`` vectors fit ``memory_budget_bytes``."""
    if n <= 0:
        raise ConfigError("cannot choose an index for an empty corpus")
    nlist = nlist or default_nlist(n, max_nlist)
    if n < FLAT_BELOW:
        return f"IVF{nlist},Flat"
    fixed_guess = nlist * dim * 4 * (2 if nlist >= HNSW_NLIST else 1)
    per_vector = (memory_budget_bytes - fixed_guess) / n - ID_BYTES
    fitting = [m for m in PQ_M_CHOICES if dim % m == 0 and m <= per_vector and m <= dim // 2]
    if not fitting:
        need = n * (ID_BYTES + min(m for m in PQ_M_CHOICES if dim % m == 0)) + fixed_guess
        raise ConfigError(
            f"index memory budget {human_bytes(memory_budget_bytes)} is too small for {n:,} vectors of dim {dim}: "
            f"needs at least {human_bytes(need)}; raise index.memory_budget_gb"
        )
    m = max(fitting)
    # OPQ helps recall a little at equal code size but its training is slow on CPUs
    # (minutes at 512-d); give opq=True or an explicit factory to use it.
    use_opq = bool(opq)
    coarse = f"IVF{nlist}_HNSW32" if nlist >= HNSW_NLIST else f"IVF{nlist}"
    prefix = f"OPQ{m}_{dim}," if use_opq else ""
    return f"{prefix}{coarse},PQ{m}x8"


def min_training_points(factory: str, dim: int, metric: str = "ip") -> int:
    """The fewest training vectors ``factory`` can be trained on: one per list, one per PQ codeword."""
    import faiss

    index = faiss.index_factory(dim, factory, metric_of(metric))  # kept: ivf points into it
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    pq = getattr(ivf, "pq", None)
    return max(int(ivf.nlist), int(pq.ksub) if pq is not None else 0)


def default_train_size(nlist: int, n: int, cap: int = 2_000_000) -> int:
    """Training sample: ~64 points per centroid (and >= 65536 for the PQ codebooks), capped."""
    return int(min(n, max(64 * nlist, 65_536), cap))
