"""All filesystem access goes through here: URLs resolve to fsspec filesystems in one place.

Every stage reads and writes fsspec URLs (a local path, ``file://``, ``s3://``, ``gs://``...).
Object-store options (endpoint, region, anonymous access) come from :class:`Storage`, filled
from the config or from the standard AWS environment variables; credentials never live in it
(they come from the environment, a profile or the instance role), so it can be logged and
pickled to Ray workers, which rebuild the same filesystem on their side.

:class:`Folder` binds a folder URL and its filesystem once and offers relative reads, writes
and listings; the format modules in :mod:`pipeline.layout` build on it.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import fsspec
from fsspec.core import url_to_fs


#: errno values of failures that may pass: throttling (S3 SlowDown), server errors, resets, timeouts
TRANSIENT_ERRNOS = {errno.EBUSY, errno.EIO, getattr(errno, "EREMOTEIO", errno.EIO), errno.EAGAIN, errno.ETIMEDOUT,
                    errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED, errno.EPIPE, errno.ENETUNREACH,
                    errno.EHOSTUNREACH, errno.ENETDOWN}
#: modules whose exceptions are network-level failures of an otherwise valid request
_NETWORK_MODULES = ("aiohttp", "botocore", "urllib3", "http.client", "requests", "fsspec.exceptions")


def is_transient(exc: BaseException) -> bool:
    """Whether a storage error may pass if the request is made again (infrastructure, not data).

    Missing objects, denied access and invalid requests are permanent; throttling, 5xx
    answers, resets, cut bodies and timeouts are transient.
    """
    exc = getattr(exc, "cause", None) or exc  # a Ray task error carries the original
    if isinstance(exc, (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError):
        return exc.errno is None or exc.errno in TRANSIENT_ERRNOS
    return any(c.__module__.split(".")[0] in {m.split(".")[0] for m in _NETWORK_MODULES}
               or c.__module__ in _NETWORK_MODULES for c in type(exc).__mro__)


def retrying(fn: Callable[..., Any], *args: Any, attempts: int = 3, backoff_s: float = 1.0, **kwargs: Any) -> Any:
    """Call ``fn`` again, with exponential backoff, while it fails with a transient storage error."""
    for attempt in range(1, attempts + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - sorted by is_transient
            if attempt == attempts or not is_transient(exc):
                raise
            time.sleep(min(30.0, backoff_s * 2 ** (attempt - 1)))


@dataclass(frozen=True)
class Storage:
    """Object-store settings. Empty fields fall back to the standard environment variables."""

    #: S3-compatible endpoint URL; empty = AWS_ENDPOINT_URL(_S3) or AWS itself
    endpoint_url: str | None = None
    #: region; empty = AWS_REGION / AWS_DEFAULT_REGION
    region: str | None = None
    #: anonymous access (public buckets)
    anon: bool = False
    #: attempts of one S3 request inside the client (botocore's standard retry mode); s3fs and
    #: replica retry a failed read a few more times with backoff on top (docs/RELIABILITY.md)
    retries: int = 5

    @classmethod
    def from_env(cls) -> "Storage":
        return cls(
            endpoint_url=os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
            region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
        )

    def merged_with_env(self) -> "Storage":
        env = Storage.from_env()
        return Storage(endpoint_url=self.endpoint_url or env.endpoint_url, region=self.region or env.region,
                       anon=self.anon, retries=self.retries)

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
        if self.anon:
            opts["anon"] = True
        opts["config_kwargs"] = {"retries": {"max_attempts": max(1, self.retries), "mode": "standard"}}
        # Listings must see objects written moments ago by other workers.
        opts["use_listings_cache"] = False
        return opts

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextmanager
def fsspec_defaults(storage: Storage | None) -> Iterator[None]:
    """Make third-party code that opens URLs with plain ``fsspec`` (img2dataset) use ``storage``'s
    object-store settings (endpoint, region, retries) for the duration of the block.

    fsspec merges ``fsspec.config.conf[protocol]`` into every filesystem it creates for that
    protocol. Ray runs one task at a time in a worker process, so the change stays in one task.
    """
    import fsspec.config

    opts = (storage or Storage()).merged_with_env().options_for("s3")
    saved = {p: fsspec.config.conf.get(p) for p in ("s3", "s3a")}
    for p, before in saved.items():
        fsspec.config.conf[p] = {**(before or {}), **opts}
    try:
        yield
    finally:
        for p, before in saved.items():
            if before is None:
                fsspec.config.conf.pop(p, None)
            else:
                fsspec.config.conf[p] = before


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def is_local(url: str) -> bool:
    return protocol_of(url) in ("file", "local")


def local_path(url: str) -> str:
    """The path of a local URL (``file://`` stripped)."""
    return url.removeprefix("file://")


def filesystem(url: str, storage: Storage | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Resolve a URL to (filesystem, path inside it)."""
    storage = (storage or Storage()).merged_with_env()
    return url_to_fs(url, **storage.options_for(protocol_of(url)))


def join(base: str, *parts: str) -> str:
    base = base.rstrip("/")
    return "/".join([base, *[p.strip("/") for p in parts if p]])


def basename(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Turn a filesystem-internal path back into a URL usable by :func:`filesystem`."""
    proto = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    if proto in ("file", "local"):
        return path
    return f"{proto}://{path}"


def expand_inputs(spec: str | list[str], storage: Storage | None = None, suffix: str = ".tar") -> list[str]:
    """Expand URLs, globs and brace lists (``{00000..00009}.tar``) into sorted, unique URLs.

    A folder stands for the ``*{suffix}`` files in it. Names that match nothing are kept (the
    caller reports them missing). Explicit names are checked by :func:`missing_files` with one
    listing per parent folder, not one request per name: a LAION-scale brace list names ~585k tars.
    """
    import braceexpand

    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for s in specs:
        for expanded in braceexpand.braceexpand(s):
            fs, path = filesystem(expanded, storage)
            if any(ch in path for ch in "*?["):
                urls.extend(unstrip(fs, p) for p in sorted(fs.glob(path)))
            elif not path.endswith(suffix) and fs.isdir(path):
                urls.extend(unstrip(fs, p) for p in sorted(fs.glob(path.rstrip("/") + "/*" + suffix)))
            else:
                urls.append(expanded)
    seen: set[str] = set()
    return [u for u in urls if not (u in seen or seen.add(u))]


def missing_files(urls: list[str], storage: Storage | None = None) -> list[str]:
    """The URLs that are not existing files, with one listing per parent folder."""
    by_parent: dict[str, list[tuple[str, str]]] = {}
    for u in urls:
        _, path = filesystem(u, storage)
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
    return retrying(fs.exists, path)


def read_bytes(url: str, storage: Storage | None = None) -> bytes:
    fs, path = filesystem(url, storage)
    return retrying(fs.cat_file, path)


def read_range(url: str, offset: int, size: int, storage: Storage | None = None) -> bytes:
    """Read ``size`` bytes at ``offset``: one ranged GET on object stores (retried while transient)."""
    fs, path = filesystem(url, storage)
    data = retrying(fs.cat_file, path, start=offset, end=offset + size)
    if len(data) != size:  # the object is shorter than its recorded range: it changed, retrying won't help
        raise EOFError(f"{url}: read {len(data)} of {size} bytes at offset {offset}")
    return data


def read_json(url: str, storage: Storage | None = None) -> Any:
    return json.loads(read_bytes(url, storage))


@contextmanager
def atomic_output(url: str, storage: Storage | None = None, mode: str = "wb") -> Iterator[Any]:
    """Open ``url`` for writing so that it becomes visible only once complete.

    Local and POSIX-like filesystems: write a hidden temporary file beside it, then rename.
    Object stores: a PUT is already all-or-nothing, so write in place; stages that need a
    stronger "done" signal write a completion marker last.
    """
    fs, path = filesystem(url, storage)
    if is_local(url):
        parent = os.path.dirname(path)
        fs.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
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


def dumps(obj: Any) -> bytes:
    """The JSON every replica side file is written with: sorted keys, indented."""
    return json.dumps(obj, indent=2, sort_keys=True, default=str).encode()


def write_json(url: str, obj: Any, storage: Storage | None = None) -> None:
    write_bytes(url, dumps(obj), storage)


def remove(url: str, storage: Storage | None = None) -> None:
    fs, path = filesystem(url, storage)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def check_writable(url: str, storage: Storage | None = None) -> None:
    """Fail early (before any work) when an output location cannot be written."""
    probe = join(url, f".replica-write-probe-{uuid.uuid4().hex}")
    write_bytes(probe, b"ok", storage)
    remove(probe, storage)


def file_sha256(path: str) -> str:
    """sha256 of a local file, read in blocks (index shards reach tens of GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            h.update(block)
    return h.hexdigest()


def publish_file(local_file: str, url: str, storage: Storage | None = None) -> None:
    """Move a finished local file to ``url`` so it appears whole: rename locally, one upload remotely."""
    if is_local(url):
        dest = local_path(url)
        os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
        tmp = os.path.join(os.path.dirname(dest), f".tmp-{uuid.uuid4().hex}-{os.path.basename(dest)}")
        shutil.move(local_file, tmp)
        os.replace(tmp, dest)
    else:
        fs, path = filesystem(url, storage)
        fs.put_file(local_file, path)


def local_copy(url: str, storage: Storage | None = None, cache_dir: str | None = None, key: str = "") -> str:
    """A local path for ``url``: the path itself when local, else a cached download.

    Files of one remote folder copied with the same ``key`` (e.g. a checksum or version, so a
    changed remote file is fetched again) land in one local folder, so files that must sit side
    by side (an index and its inverted lists) do. A copy appears atomically: concurrent workers
    on one node never read a half-written file.
    """
    if is_local(url):
        return local_path(url)
    cache = cache_dir or os.path.join(tempfile.gettempdir(), "replica-cache")
    digest = hashlib.sha1(f"{url.rsplit('/', 1)[0]}|{key}".encode()).hexdigest()[:16]
    target = os.path.join(cache, digest, basename(url))
    if not os.path.exists(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fs, path = filesystem(url, storage)
        tmp = f"{target}.part-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        fs.get_file(path, tmp)
        os.replace(tmp, target)
    return target


class Folder:
    """A folder URL bound to its filesystem once: relative reads, writes and listings.

    Picklable (the filesystem is rebuilt on the other side), so a Ray task can take one.
    """

    def __init__(self, url: str, storage: Storage | None = None):
        self.url = url.rstrip("/") if url not in ("/", "") else url
        self.storage = storage or Storage()
        self._fs: fsspec.AbstractFileSystem | None = None
        self._path = ""

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "storage": self.storage}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], state["storage"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.url == self.url and other.storage == self.storage

    def __hash__(self) -> int:
        return hash((type(self), self.url))

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self._fs is None:
            self._fs, self._path = filesystem(self.url, self.storage)
        return self._fs

    @property
    def path(self) -> str:
        self.fs  # noqa: B018 - resolves the path with the filesystem
        return self._path

    @property
    def local(self) -> bool:
        return is_local(self.url)

    def child(self, rel: str) -> str:
        """The URL of ``rel`` inside this folder."""
        return join(self.url, rel) if rel else self.url

    def sub(self, rel: str) -> "Folder":
        return Folder(self.child(rel), self.storage)

    def fs_path(self, rel: str) -> str:
        """The path of ``rel`` inside the filesystem (what ``self.fs`` methods take)."""
        return join(self.path, rel) if rel else self.path

    def exists(self, rel: str = "") -> bool:
        return retrying(self.fs.exists, self.fs_path(rel))

    def open(self, rel: str, mode: str = "rb", **kwargs: Any):
        return self.fs.open(self.fs_path(rel), mode, **kwargs)

    def read_bytes(self, rel: str) -> bytes:
        return retrying(self.fs.cat_file, self.fs_path(rel))

    def read_range(self, rel: str, offset: int, size: int) -> bytes:
        return retrying(self.fs.cat_file, self.fs_path(rel), start=offset, end=offset + size)

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def atomic(self, rel: str, mode: str = "wb"):
        return atomic_output(self.child(rel), self.storage, mode)

    def write_bytes(self, rel: str, data: bytes) -> None:
        write_bytes(self.child(rel), data, self.storage)

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, dumps(obj))

    def remove(self, rel: str) -> None:
        remove(self.child(rel), self.storage)

    def names(self, pattern: str = "*") -> list[str]:
        """Sorted names (relative to this folder) matching a glob; [] when the folder is absent."""
        if not self.exists():
            return []
        base = self.path.rstrip("/") + "/"
        return sorted(p[len(base):] if p.startswith(base) else basename(p) for p in retrying(self.fs.glob, base + pattern))

    def local_copy(self, rel: str, cache_dir: str | None = None, key: str = "") -> str:
        return local_copy(self.child(rel), self.storage, cache_dir, key)

    def publish_file(self, local_file: str, rel: str) -> None:
        publish_file(local_file, self.child(rel), self.storage)

    def check_writable(self) -> None:
        check_writable(self.url, self.storage)
