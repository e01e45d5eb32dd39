"""An index folder: where everything of one sharded IVF-PQ index lives.

```
{index}/registry.json              shard name <-> number (pipeline/index/registry.py)
{index}/trained.index              the trained, empty index (faiss serialised)
{index}/trained.json               TrainedInfo, written last by train: factory, dim, sha256 of trained.index
{index}/parts/{part}.index         one index part per group of shards (add)
{index}/parts/_ledger.json         Ledger: the completed parts, the only truth about what was added
{index}/vectors/{number:09d}.f16   raw fp16 vectors of one shard, row-major (exact rerank)
{index}/shards/{name}.index        index shards with on-disk inverted lists (merge)
{index}/shards/{name}.ivfdata
{index}/manifest.json              Manifest, written last by merge: what search loads
{index}/tuning.json                Tuning: recall against cost of every (nprobe, rerank depth) tried
{index}/_lock.json                 the lock of the run writing the index (pipeline/layout/lock.py)
```
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pipeline.errors import ConfigError, MismatchError
from pipeline.layout import known_fields
from pipeline.layout.embeddings import check_same_identity
from pipeline.storage import Folder

REGISTRY_FILE = "registry.json"
TRAINED_FILE = "trained.index"
TRAINED_INFO_FILE = "trained.json"
PARTS_DIR = "parts"
LEDGER_FILE = "parts/_ledger.json"
VECTORS_DIR = "vectors"
SHARDS_DIR = "shards"
INVLISTS_SUFFIX = ".ivfdata"
MANIFEST_FILE = "manifest.json"
TUNING_FILE = "tuning.json"

MANIFEST_VERSION = 1
LEDGER_VERSION = 1
REGISTRY_VERSION = 1


def vectors_name(number: int) -> str:
    """The fp16 side file of registry shard ``number``, inside the vectors folder."""
    return f"{number:09d}.f16"


def invlists_path(index_path: str) -> str:
    """Where an index file's on-disk inverted lists live: beside it, same stem."""
    return index_path.removesuffix(".index") + INVLISTS_SUFFIX


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class TrainedInfo:
    """``trained.json``: the factory and its sizes, and the checksum of ``trained.index``."""

    factory: str
    dim: int
    metric: str
    nlist: int
    code_size: int
    bytes_per_vector: int
    fixed_bytes: int
    identity: dict[str, Any]
    embeddings: str
    sha256: str = ""
    corpus_estimate: int = 0
    registry_version: int = 0
    train_size: int = 0
    device: str = ""
    sample_seconds: float = 0.0
    train_seconds: float = 0.0
    trained_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TrainedInfo":
        return cls(**known_fields(cls, d))


@dataclass
class IndexShard:
    """One entry of the manifest: an index shard and the parts merged into it."""

    name: str
    index: str
    ivfdata: str
    ntotal: int
    parts: list[str]
    trained_sha256: str
    index_bytes: int = 0
    ivfdata_bytes: int = 0
    #: checksums of the two files, verified when a shard is loaded (empty in indexes of 0.1)
    index_sha256: str = ""
    ivfdata_sha256: str = ""
    #: the registry numbers of the embedding shards it holds, as [first, last] ranges
    numbers: list[list[int]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "IndexShard":
        return cls(**known_fields(cls, d))


@dataclass
class Manifest:
    """``manifest.json``: the published index; search loads exactly what it names."""

    factory: str
    dim: int
    metric: str
    nlist: int
    code_size: int
    bytes_per_vector: int
    identity: dict[str, Any]
    embeddings: str
    trained_sha256: str
    registry_version: int = 0
    ntotal: int = 0
    shards: list[IndexShard] = field(default_factory=list)
    #: exact rerank can read raw fp16 side files (every part wrote them)
    side_vectors: bool = True
    registered_shards: int = 0
    shard_memory_gb: float = 0.0
    #: search settings chosen by measurement (Tuning.summary()); search uses them unless told otherwise
    tuned: dict[str, Any] | None = None
    format_version: int = MANIFEST_VERSION

    @classmethod
    def empty(cls, trained: TrainedInfo) -> "Manifest":
        return cls(factory=trained.factory, dim=trained.dim, metric=trained.metric, nlist=trained.nlist,
                   code_size=trained.code_size, bytes_per_vector=trained.bytes_per_vector,
                   identity=trained.identity, embeddings=trained.embeddings, trained_sha256=trained.sha256)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["shards"] = [s.to_json() for s in self.shards]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Manifest":
        kw = known_fields(cls, d)
        kw["shards"] = [IndexShard.from_json(s) for s in d.get("shards", [])]
        return cls(**kw)

    def check(self, *, identity: dict[str, Any] | None = None, dim: int | None = None,
              trained_sha256: str | None = None, where: str = "index") -> None:
        """Refuse a query embedder, a query dim or a trained index that differ from the index's."""
        if dim is not None and int(dim) != int(self.dim):
            raise MismatchError(f"queries have dim {dim} but {where} holds dim {self.dim} vectors")
        if identity is not None:
            check_same_identity(self.identity, identity, where)
        if trained_sha256 is not None and trained_sha256 != self.trained_sha256:
            raise MismatchError(
                f"{where} was built from trained index {self.trained_sha256[:12]}, not {trained_sha256[:12]}: "
                "parts and shards of different trainings cannot be mixed; build into a new index location"
            )
        for s in self.shards:
            if s.trained_sha256 != self.trained_sha256:
                raise MismatchError(
                    f"{where}: index shard {s.name} comes from trained index {str(s.trained_sha256)[:12]}, "
                    f"the manifest's is {self.trained_sha256[:12]}"
                )


def to_ranges(numbers) -> list[list[int]]:
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


@dataclass
class PartRecord:
    """One completed index part in the ledger: which shards it holds, as number ranges."""

    name: str
    shards: list[list[int]]
    ntotal: int
    rows: dict[str, int]
    trained_sha256: str
    side_vectors: bool = True
    bytes: int = 0
    seconds: float = 0.0

    @property
    def shard_numbers(self) -> list[int]:
        return from_ranges(self.shards)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "PartRecord":
        return cls(**known_fields(cls, d))


@dataclass
class Ledger:
    """``parts/_ledger.json``: rewritten only by the add driver."""

    trained_sha256: str | None = None
    parts: list[PartRecord] = field(default_factory=list)
    format_version: int = LEDGER_VERSION

    def shard_numbers(self) -> set[int]:
        done: set[int] = set()
        for p in self.parts:
            done.update(p.shard_numbers)
        return done

    def to_json(self) -> dict[str, Any]:
        return {"format_version": self.format_version, "trained_sha256": self.trained_sha256,
                "parts": [p.to_json() for p in self.parts]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Ledger":
        return cls(trained_sha256=d.get("trained_sha256"), parts=[PartRecord.from_json(p) for p in d.get("parts", [])],
                   format_version=int(d.get("format_version", LEDGER_VERSION)))


@dataclass
class Tuning:
    """``tuning.json``: recall@k after the exact rerank, against cost, of every (nprobe, rerank depth)
    tried on a sample of the corpus, and the cheapest one that reaches the target."""

    target_recall: float
    k: int
    nprobe: int
    rerank_depth: int
    #: recall@k after the rerank at the chosen point, and of the ANN alone at its nprobe
    recall: float
    ann_recall: float
    #: False when no point tried reached the target (the best one was chosen)
    reached: bool
    #: vectors in the index when it was measured (a rerun after 10% more retunes)
    ntotal: int
    queries: int
    curve: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("curve",)}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Tuning":
        return cls(**known_fields(cls, d))


class IndexFolder(Folder):
    """An index folder (layout in the module docstring)."""

    # -- names ----------------------------------------------------------------------------
    @property
    def trained_url(self) -> str:
        return self.child(TRAINED_FILE)

    @property
    def manifest_url(self) -> str:
        return self.child(MANIFEST_FILE)

    def part_rel(self, name: str) -> str:
        return f"{PARTS_DIR}/{name}.index"

    def vectors_rel(self, number: int) -> str:
        return f"{VECTORS_DIR}/{vectors_name(number)}"

    @property
    def vectors_folder(self) -> Folder:
        return self.sub(VECTORS_DIR)

    def shard_rels(self, name: str) -> tuple[str, str]:
        """(index file, inverted-lists file) of an index shard, relative to the folder."""
        index_rel = f"{SHARDS_DIR}/{name}.index"
        return index_rel, invlists_path(index_rel)

    # -- registry -------------------------------------------------------------------------
    def has_registry(self) -> bool:
        return self.exists(REGISTRY_FILE)

    def read_registry(self) -> dict[str, Any]:
        if not self.has_registry():
            raise ConfigError(f"no shard registry at {self.child(REGISTRY_FILE)!r}: run `replica index train` (or build) first")
        d = self.read_json(REGISTRY_FILE)
        if d.get("format_version") != REGISTRY_VERSION:
            raise MismatchError(f"{self.child(REGISTRY_FILE)!r} has registry format {d.get('format_version')}, "
                                f"this code reads {REGISTRY_VERSION}")
        return d

    def write_registry(self, d: dict[str, Any]) -> None:
        self.write_json(REGISTRY_FILE, {**d, "format_version": REGISTRY_VERSION})

    # -- trained index ----------------------------------------------------------------------
    def is_trained(self) -> bool:
        return self.exists(TRAINED_INFO_FILE)

    def read_trained_info(self) -> TrainedInfo:
        if not self.is_trained():
            raise ConfigError(f"index {self.url!r} is not trained yet ({self.child(TRAINED_INFO_FILE)!r} missing): "
                              "run `replica index train`")
        return TrainedInfo.from_json(self.read_json(TRAINED_INFO_FILE))

    def write_trained(self, data: bytes, info: TrainedInfo) -> None:
        """The trained index, then its info (with the checksum) last, as the completion marker."""
        self.write_bytes(TRAINED_FILE, data)
        self.write_json(TRAINED_INFO_FILE, info.to_json())

    def read_trained(self, expected_sha256: str | None = None) -> tuple[bytes, TrainedInfo]:
        """The bytes of ``trained.index`` checked against ``trained.json`` (and ``expected_sha256``)."""
        info = self.read_trained_info()
        data = self.read_bytes(TRAINED_FILE)
        if sha256_bytes(data) != info.sha256 or (expected_sha256 and info.sha256 != expected_sha256):
            raise MismatchError(f"{self.trained_url!r} does not match its checksum "
                                f"(expected sha256 {(expected_sha256 or info.sha256)[:12]}): it changed or is corrupt")
        return data, info

    # -- parts and ledger -------------------------------------------------------------------
    def read_ledger(self) -> Ledger:
        return Ledger.from_json(self.read_json(LEDGER_FILE)) if self.exists(LEDGER_FILE) else Ledger()

    def write_ledger(self, ledger: Ledger) -> None:
        self.write_json(LEDGER_FILE, ledger.to_json())

    def write_vectors(self, number: int, vectors: np.ndarray) -> None:
        self.write_bytes(self.vectors_rel(number), np.ascontiguousarray(vectors, np.float16).tobytes())

    # -- manifest -------------------------------------------------------------------------
    def has_manifest(self) -> bool:
        return self.exists(MANIFEST_FILE)

    def read_manifest(self) -> Manifest:
        if not self.has_manifest():
            raise ConfigError(f"no index manifest at {self.manifest_url!r}: run `replica index merge` (or build) first")
        d = self.read_json(MANIFEST_FILE)
        if d.get("format_version") != MANIFEST_VERSION:
            raise MismatchError(f"{self.manifest_url!r} has manifest format {d.get('format_version')}, "
                                f"this code reads {MANIFEST_VERSION}")
        return Manifest.from_json(d)

    def write_manifest(self, manifest: Manifest) -> None:
        self.write_json(MANIFEST_FILE, manifest.to_json())

    def write_tuning(self, tuning: Tuning) -> None:
        self.write_json(TUNING_FILE, tuning.to_json())

    def read_tuning(self) -> Tuning | None:
        return Tuning.from_json(self.read_json(TUNING_FILE)) if self.exists(TUNING_FILE) else None
