"""Where everything of one index lives, and the manifest that publishes a built index.

```
{index}/registry.json              shard name <-> number (registry.py)
{index}/trained.index              the trained, empty index (faiss serialised)
{index}/trained.json               factory, dim, metric, sha256 of trained.index, identity
{index}/parts/{part}.index         one index part per group of shards (add.py)
{index}/parts/_ledger.json         the completed parts: the only truth about what was added
{index}/vectors/{number:09d}.f16   raw fp16 vectors of one shard, row-major (exact rerank)
{index}/shards/{name}.index        index shards with on-disk inverted lists (merge.py)
{index}/shards/{name}.ivfdata
{index}/manifest.json              written last by merge: what search loads
```
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from pipeline import io
from pipeline.errors import ConfigError, MismatchError

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class Layout:
    index: str

    @property
    def trained(self) -> str:
        return io.join(self.index, "trained.index")

    @property
    def trained_info(self) -> str:
        return io.join(self.index, "trained.json")

    @property
    def parts(self) -> str:
        return io.join(self.index, "parts")

    def part(self, name: str) -> str:
        return io.join(self.index, "parts", f"{name}.index")

    @property
    def ledger(self) -> str:
        return io.join(self.index, "parts", "_ledger.json")

    def vectors(self, number: int) -> str:
        return io.join(self.index, "vectors", f"{number:09d}.f16")

    def shard_index(self, name: str) -> str:
        return io.join(self.index, "shards", f"{name}.index")

    def shard_ivfdata(self, name: str) -> str:
        return io.join(self.index, "shards", f"{name}.ivfdata")

    @property
    def manifest(self) -> str:
        return io.join(self.index, "manifest.json")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_trained_info(index: str, storage: io.Storage | None = None) -> dict[str, Any]:
    url = Layout(index).trained_info
    if not io.exists(url, storage):
        raise ConfigError(f"index {index!r} is not trained yet ({url!r} missing): run `replica index train`")
    return io.read_json(url, storage)


def read_manifest(index: str, storage: io.Storage | None = None) -> dict[str, Any]:
    url = Layout(index).manifest
    if not io.exists(url, storage):
        raise ConfigError(f"no index manifest at {url!r}: run `replica index merge` (or build) first")
    m = io.read_json(url, storage)
    if m.get("format_version") != MANIFEST_VERSION:
        raise MismatchError(f"{url!r} has manifest format {m.get('format_version')}, this code reads {MANIFEST_VERSION}")
    return m


def empty_manifest(trained: dict[str, Any]) -> dict[str, Any]:
    return {
        "format_version": MANIFEST_VERSION,
        "factory": trained["factory"],
        "dim": trained["dim"],
        "metric": trained["metric"],
        "nlist": trained["nlist"],
        "code_size": trained["code_size"],
        "bytes_per_vector": trained["bytes_per_vector"],
        "identity": trained["identity"],
        "embeddings": trained["embeddings"],
        "trained_sha256": trained["sha256"],
        "registry_version": 0,
        "ntotal": 0,
        "shards": [],
    }


def check_manifest(
    manifest: dict[str, Any],
    *,
    identity: dict[str, Any] | None = None,
    dim: int | None = None,
    trained_sha256: str | None = None,
    where: str = "index",
) -> None:
    """Refuse a query embedder, a query dim or a trained index that differ from the index's."""
    if dim is not None and int(dim) != int(manifest["dim"]):
        raise MismatchError(f"queries have dim {dim} but {where} holds dim {manifest['dim']} vectors")
    if identity is not None:
        from pipeline.embedders import check_same_identity

        check_same_identity(manifest["identity"], identity, where)
    if trained_sha256 is not None and trained_sha256 != manifest["trained_sha256"]:
        raise MismatchError(
            f"{where} was built from trained index {manifest['trained_sha256'][:12]}, not {trained_sha256[:12]}: "
            "parts and shards of different trainings cannot be mixed; build into a new index location"
        )
    for s in manifest.get("shards", []):
        if s.get("trained_sha256") != manifest["trained_sha256"]:
            raise MismatchError(
                f"{where}: index shard {s['name']} comes from trained index {str(s.get('trained_sha256'))[:12]}, "
                f"the manifest's is {manifest['trained_sha256'][:12]}"
            )
