"""A tar folder written by the ingest stage: img2dataset's WebDataset layout plus replica's ledger.

```
{tars}/{shard}.tar               img2dataset: {key}.jpg, {key}.txt (caption), {key}.json (url, status, hash...)
{tars}/{shard}.parquet           img2dataset: one row per URL of the shard (status, error_message, sizes, hash)
{tars}/{shard}_stats.json        img2dataset: the shard's counts (ShardCounts), written after the tar is
                                 closed: its presence marks the tar complete (img2dataset's incremental rule)
{tars}/_replica/ingest.json      IngestInfo: the settings that shape the tars, and every URL list ingested
                                 with the shard numbers it was given
{tars}/_replica/pending/{n}.feather  img2dataset: the URLs of a shard not yet downloaded (removed when done)
{tars}/_replica/_lock.json       the lock of the run writing the folder (pipeline/layout/lock.py)
```

``{shard}`` is the shard number with ``shard_digits`` digits (``000012``), so ``replica embed``
names its output shards the same. replica's own files live in ``_replica/``: img2dataset's
incremental rule reads every ``*.json`` at the top of the folder as ``{number}_stats.json`` and
would fail on any other.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from pipeline.errors import ConfigError, MismatchError
from pipeline.layout import known_fields
from pipeline.storage import Folder, Storage, basename, filesystem, unstrip

TAR_SUFFIX = ".tar"
#: img2dataset's per-shard files (img2dataset/logger.py write_stats, writer.py)
SHARD_STATS_SUFFIX = "_stats.json"
SHARD_TABLE_SUFFIX = ".parquet"
#: replica's files inside a tar folder
OWN_FOLDER = "_replica"
INFO_FILE = "ingest.json"
PENDING_FOLDER = "pending"
FORMAT_VERSION = 1


@dataclass
class UrlList:
    """One URL list file ingested into the folder, and the shard numbers it owns."""

    url: str
    #: size in bytes when first ingested (and the object's ETag on object stores): a list that
    #: changes under the same name would shift every shard after the change, so it is refused
    size: int
    etag: str | None
    input_format: str
    first_shard: int
    shards: int
    url_column: str
    caption_column: str
    columns: list[str] = field(default_factory=list)
    added_at: str | None = None

    @property
    def shard_range(self) -> range:
        return range(self.first_shard, self.first_shard + self.shards)


@dataclass
class IngestInfo:
    """``_replica/ingest.json``: what shapes the tars, and the ledger of URL lists."""

    #: settings every tar of the folder was made with (resize, encoding, hash, shard size)
    settings: dict[str, Any]
    #: the img2dataset version that wrote the first shards
    img2dataset: str | None = None
    lists: list[UrlList] = field(default_factory=list)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "IngestInfo":
        if not isinstance(d, dict) or "settings" not in d:
            raise MismatchError(f"{OWN_FOLDER}/{INFO_FILE} is not an ingest record")
        d = known_fields(cls, d)
        d["lists"] = [UrlList(**known_fields(UrlList, x)) for x in d.get("lists") or []]
        return cls(**d)

    def find(self, url: str) -> UrlList | None:
        return next((x for x in self.lists if x.url == url), None)

    def next_shard(self) -> int:
        return max((x.first_shard + x.shards for x in self.lists), default=0)


@dataclass
class ShardCounts:
    """``{shard}_stats.json`` as img2dataset writes it (img2dataset/logger.py ``write_stats``)."""

    count: int
    successes: int
    failed_to_download: int
    failed_to_resize: int
    duration: float
    start_time: float | None = None
    end_time: float | None = None
    #: img2dataset's message -> count ("success", "HTTP Error 404: Not Found", "timed out", ...)
    status_dict: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ShardCounts":
        return cls(**known_fields(cls, d))


class IngestFolder(Folder):
    """A tar folder (layout in the module docstring)."""

    def __init__(self, url: str, storage: Storage | None = None, shard_digits: int = 6):
        super().__init__(url, storage)
        self.shard_digits = shard_digits

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "shard_digits": self.shard_digits}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], state["storage"], state.get("shard_digits", 6))

    # -- names -------------------------------------------------------------------------------
    def shard_name(self, number: int) -> str:
        return f"{number:0{self.shard_digits}d}"

    def tar_url(self, number: int) -> str:
        return self.child(self.shard_name(number) + TAR_SUFFIX)

    def table_url(self, number: int) -> str:
        return self.child(self.shard_name(number) + SHARD_TABLE_SUFFIX)

    def stats_rel(self, number: int) -> str:
        return self.shard_name(number) + SHARD_STATS_SUFFIX

    def own(self) -> Folder:
        """``_replica/``: the ledger, the pending URL shards and the lock."""
        return self.sub(OWN_FOLDER)

    def pending_url(self) -> str:
        """Where img2dataset's reader leaves each shard's URLs until the shard is downloaded."""
        return self.own().child(PENDING_FOLDER)

    # -- the ledger --------------------------------------------------------------------------
    def has_info(self) -> bool:
        return self.own().exists(INFO_FILE)

    def read_info(self) -> IngestInfo | None:
        if not self.has_info():
            return None
        return IngestInfo.from_json(self.own().read_json(INFO_FILE))

    def write_info(self, info: IngestInfo) -> None:
        self.own().write_json(INFO_FILE, info.to_json())

    # -- shards --------------------------------------------------------------------------------
    def complete_shards(self) -> set[int]:
        """Numbers of the shards whose stats file exists (one listing of the folder)."""
        out = set()
        for name in self.names(f"*{SHARD_STATS_SUFFIX}"):
            head = name[: -len(SHARD_STATS_SUFFIX)]
            if head.isdigit():
                out.add(int(head))
        return out

    def complete_tars(self) -> list[str]:
        """URLs of the complete tars, in shard order: what ``replica embed`` reads."""
        return [self.tar_url(n) for n in sorted(self.complete_shards())]

    def read_counts(self, number: int) -> ShardCounts:
        return ShardCounts.from_json(self.read_json(self.stats_rel(number)))

    def tar_bytes(self, number: int) -> int:
        return int(self.fs.info(self.fs_path(self.shard_name(number) + TAR_SUFFIX)).get("size") or 0)


def check_same_settings(have: dict[str, Any], want: dict[str, Any], where: str) -> None:
    """Refuse to mix tars made with different resize, encoding, hash or shard settings in one folder."""
    diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
    if diff:
        details = "; ".join(f"{k}: {have.get(k)!r} there vs {want.get(k)!r} now" for k in diff)
        raise MismatchError(f"{where} holds tars made with other settings ({details}); "
                            "use a new output folder or the same settings")


def complete_only(tar_urls: list[str], storage: Storage | None = None) -> tuple[list[str], list[str]]:
    """Split tar URLs into (complete, incomplete): tars of an ingest folder count only once their
    stats file exists; tars of any other folder are taken as they are. One listing per ingest folder."""
    by_parent: dict[str, list[str]] = {}
    for url in tar_urls:
        by_parent.setdefault(url.rstrip("/").rsplit("/", 1)[0], []).append(url)
    complete, incomplete = [], []
    for parent, urls in by_parent.items():
        folder = IngestFolder(parent, storage)
        if not folder.has_info():
            complete.extend(urls)
            continue
        done = {basename(u)[: -len(TAR_SUFFIX)] for u in urls if basename(u).endswith(TAR_SUFFIX)} & {
            n[: -len(SHARD_STATS_SUFFIX)] for n in folder.names(f"*{SHARD_STATS_SUFFIX}")}
        for url in urls:
            (complete if basename(url)[: -len(TAR_SUFFIX)] in done else incomplete).append(url)
    keep = set(complete)
    return [u for u in tar_urls if u in keep], incomplete


def list_fingerprint(url: str, storage: Storage | None = None) -> tuple[int, str | None]:
    """(size, ETag or None) of a URL list file."""
    fs, path = filesystem(url, storage)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise ConfigError(f"URL list {url!r} does not exist") from None
    etag = info.get("ETag") or info.get("etag")
    return int(info.get("size") or 0), (etag.strip('"') if isinstance(etag, str) else None)


def list_urls(spec: list[str], storage: Storage | None = None, is_list: Callable[[str], bool] = lambda u: True
              ) -> list[str]:
    """URL list files named by paths, globs, brace lists or folders (a folder: the files in it that
    ``is_list`` accepts, hidden and ``_`` names left out)."""
    from pipeline.storage import expand_inputs

    out: list[str] = []
    for s in spec:
        fs, path = filesystem(s, storage)
        if not any(ch in s for ch in "*?[{") and fs.isdir(path):
            out.extend(unstrip(fs, p) for p in sorted(fs.ls(path, detail=False))
                       if not basename(p).startswith(("_", ".")) and is_list(p) and fs.isfile(p))
        else:
            out.extend(expand_inputs(s, storage, suffix=""))
    seen: set[str] = set()
    return [u for u in out if not (u in seen or seen.add(u))]
