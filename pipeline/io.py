"""All filesystem access goes through here: one place resolves URLs to fsspec filesystems.

Every stage reads and writes fsspec URLs (a local path, ``file://``, ``s3://``, ``gs://``...).
Object-store options (endpoint, region, credentials) come from :class:`Storage`, which is
filled from the config or from the standard AWS environment variables, and is small and
picklable so Ray workers rebuild the same filesystem on their side.
"""
from __future__ import annotations

import json
import os
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import fsspec
from fsspec.core import url_to_fs


@dataclass(frozen=True)
class Storage:
    """Object-store settings. Empty fields fall back to the standard environment variables."""

    #: S3-compatible endpoint URL; empty = AWS_ENDPOINT_URL(_S3) or AWS itself
    endpoint_url: str | None = None
    #: region; empty = AWS_REGION / AWS_DEFAULT_REGION
    region: str | None = None
    #: access key and secret; empty = the standard AWS credential chain (env, profile, role)
    key: str | None = None
    secret: str | None = None
    #: anonymous access (public buckets)
    anon: bool = False

    @classmethod
    def from_env(cls) -> "Storage":
        return cls(
            endpoint_url=os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
            region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
        )

    def merged_with_env(self) -> "Storage":
        env = Storage.from_env()
        return Storage(
            endpoint_url=self.endpoint_url or env.endpoint_url,
            region=self.region or env.region,
            key=self.key,
            secret=self.secret,
            anon=self.anon,
        )

    def options_for(self, protocol: str) -> dict[str, Any]:
        if protocol not in ("s3", "s3a"):
            return {}
        opts: dict[str, Any] = {}
        client_kwargs: dict[str, Any] = {}
        if self.endpoint_url:
            client_kwargs["endpoint_url"] = self.endpoint_url
        if self.region:
            client_kwargs["region_name"] = self.region
        if client_kwargs:
            opts["client_kwargs"] = client_kwargs
        if self.key:
            opts["key"] = self.key
            opts["secret"] = self.secret
        if self.anon:
            opts["anon"] = True
        # Listings must see objects written moments ago by other workers.
        opts["use_listings_cache"] = False
        return opts

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def is_local(url: str) -> bool:
    return protocol_of(url) in ("file", "local")


def filesystem(url: str, storage: Storage | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Resolve a URL to (filesystem, path inside it)."""
    storage = (storage or Storage()).merged_with_env()
    fs, path = url_to_fs(url, **storage.options_for(protocol_of(url)))
    return fs, path


def join(base: str, *parts: str) -> str:
    base = base.rstrip("/")
    return "/".join([base, *[p.strip("/") for p in parts]])


def unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Turn a filesystem-internal path back into a URL usable by :func:`filesystem`."""
    proto = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    if proto in ("file", "local"):
        return path
    return f"{proto}://{path}"


def expand_inputs(spec: str | list[str], storage: Storage | None = None) -> list[str]:
    """Expand URLs, globs and brace lists (``{00000..00009}.tar``) into sorted, unique URLs.

    Names that match nothing are kept (the caller reports them missing). Explicit names are
    checked by listing each parent folder once, not one request per name: a LAION-scale brace
    list names ~585k tars.
    """
    import braceexpand

    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for s in specs:
        for expanded in braceexpand.braceexpand(s):
            fs, path = filesystem(expanded, storage)
            if any(ch in path for ch in "*?["):
                urls.extend(unstrip(fs, p) for p in sorted(fs.glob(path)))
            elif not path.endswith(".tar") and fs.isdir(path):  # a folder of tars
                urls.extend(unstrip(fs, p) for p in sorted(fs.glob(path.rstrip("/") + "/*.tar")))
            else:
                urls.append(expanded)
    seen: set[str] = set()
    return [u for u in urls if not (u in seen or seen.add(u))]


def missing_files(urls: list[str], storage: Storage | None = None) -> list[str]:
    """The URLs that are not existing files, with one listing per parent folder."""
    by_parent: dict[str, list[tuple[str, str]]] = {}
    for u in urls:
        fs, path = filesystem(u, storage)
        by_parent.setdefault(path.rsplit("/", 1)[0], []).append((u, path))
    missing = []
    for parent, group in by_parent.items():
        fs, _ = filesystem(group[0][0], storage)
        try:
            files = {e["name"].rstrip("/") for e in fs.ls(parent, detail=True) if e["type"] == "file"}
        except FileNotFoundError:
            files = set()
        missing.extend(u for u, path in group if path.rstrip("/") not in files)
    return missing


def exists(url: str, storage: Storage | None = None) -> bool:
    fs, path = filesystem(url, storage)
    return fs.exists(path)


def read_bytes(url: str, storage: Storage | None = None) -> bytes:
    fs, path = filesystem(url, storage)
    return fs.cat_file(path)


def read_range(url: str, offset: int, size: int, storage: Storage | None = None) -> bytes:
    """Read ``size`` bytes at ``offset``: one ranged GET on object stores."""
    fs, path = filesystem(url, storage)
    return fs.cat_file(path, start=offset, end=offset + size)


def read_json(url: str, storage: Storage | None = None) -> Any:
    return json.loads(read_bytes(url, storage))


@contextmanager
def atomic_output(url: str, storage: Storage | None = None, mode: str = "wb") -> Iterator[Any]:
    """Open ``url`` for writing so that it becomes visible only once complete.

    Local and POSIX-like filesystems: write a hidden temporary file beside it, then rename.
    Object stores: a PUT is already all-or-nothing, so write in place; stages that need a
    stronger "done" signal write a completion marker last (see :func:`publish_marker`).
    """
    fs, path = filesystem(url, storage)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if is_local(url):
        fs.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{path.rsplit('/', 1)[-1]}"
        try:
            with fs.open(tmp, mode) as f:
                yield f
            fs.mv(tmp, path)
        finally:
            if fs.exists(tmp):
                fs.rm(tmp)
    else:
        with fs.open(path, mode) as f:
            yield f


def write_bytes(url: str, data: bytes, storage: Storage | None = None) -> None:
    with atomic_output(url, storage) as f:
        f.write(data)


def write_json(url: str, obj: Any, storage: Storage | None = None) -> None:
    write_bytes(url, json.dumps(obj, indent=2, sort_keys=True, default=str).encode(), storage)


def remove(url: str, storage: Storage | None = None) -> None:
    fs, path = filesystem(url, storage)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def check_writable(url: str, storage: Storage | None = None) -> None:
    """Fail early (before any work) when an output location cannot be written."""
    probe = join(url, f".replica-write-probe-{uuid.uuid4().hex}")
    write_bytes(probe, b"ok", storage)
    remove(probe, storage)
