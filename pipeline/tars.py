"""Reading WebDataset tars in img2dataset's layout, keeping each image's byte range.

A sample is the run of consecutive members sharing a key (``{key}.jpg``, ``{key}.txt``,
``{key}.json``). Reading streams the tar once (one sequential GET on object stores).

What is data and what is infrastructure (docs/RELIABILITY.md):

* the tar's own damage is data: a header that is not a tar header, a member cut short because
  the *object itself* ends early (every byte of it was read), a gzip-compressed tar, members
  over ``max_member_bytes``, links and devices. It ends the iteration (or skips the member)
  and is reported in :class:`TarReadResult`, never raised;
* a read that fails or stops before the object's end (a reset connection, throttling, a
  permission error) is infrastructure: it is raised, so the shard is retried and, if it keeps
  failing, stays incomplete. It is never recorded as a truncated tar.
"""
from __future__ import annotations

import json
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

from pipeline.storage import Storage, filesystem, retrying

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.(.+)$")
READ_BLOCK = 8 << 20
#: image members larger than this become an error row without being read into memory
MAX_MEMBER_BYTES = 64 << 20
#: caption and metadata members larger than this are skipped (counted)
MAX_SIDE_MEMBER_BYTES = 1 << 20
#: captions are cut to this many characters (counted)
MAX_CAPTION_CHARS = 16384
_GZIP_MAGIC = b"\x1f\x8b"


@dataclass
class Member:
    data: bytes | None  # None when the member was too large to read
    offset: int  # byte offset of the member's data inside the tar
    size: int


@dataclass
class Sample:
    key: str
    members: dict[str, Member] = field(default_factory=dict)
    #: set when the tar broke while this sample was being read
    error: str | None = None

    def image(self) -> tuple[str, Member] | None:
        for ext in IMAGE_EXTS:
            if ext in self.members:
                return ext, self.members[ext]
        return None

    def caption(self) -> str | None:
        txt = self.members.get("txt")
        if txt is not None and txt.data is not None:
            return txt.data.decode("utf-8", errors="replace")[:MAX_CAPTION_CHARS]
        caption = self.meta().get("caption")
        return caption[:MAX_CAPTION_CHARS] if isinstance(caption, str) else None

    def meta(self) -> dict:
        js = self.members.get("json")
        if js is None or js.data is None:
            return {}
        try:
            value = json.loads(js.data)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}


@dataclass
class TarReadResult:
    """Filled while iterating: where and why a tar broke, and what was skipped."""

    error: str | None = None
    #: members not read, by reason ("symlink", "oversize_caption"...)
    skipped: Counter = field(default_factory=Counter)
    #: bytes of the tar read
    bytes_read: int = 0


class _Position:
    """A file object that remembers the furthest byte it has returned."""

    def __init__(self, f):
        self.f, self.furthest = f, 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.furthest = max(self.furthest, self.f.tell())
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        return self.f.seek(pos, whence)

    def tell(self) -> int:
        return self.f.tell()


def shard_name(tar_url: str) -> str:
    """``s3://b/x/00012.tar`` -> ``00012``: the unit-of-work name used for outputs."""
    base = tar_url.rstrip("/").rsplit("/", 1)[-1]
    return base[:-4] if base.endswith(".tar") else base


def _cut_short(exc: BaseException) -> bool:
    """A tar error that means "the bytes ended" (as opposed to "the bytes are not a tar")."""
    text = str(exc).lower()
    return isinstance(exc, EOFError) or "unexpected end" in text or "truncated" in text or "end-of-archive" in text


def _skip_reason(info: tarfile.TarInfo) -> str | None:
    if info.issym():
        return "symlink"
    if info.islnk():
        return "hardlink"
    if info.isdev() or info.isfifo():
        return "device"
    if not info.isfile():
        return "not_a_file"
    return None


def iter_samples(tar_url: str, storage: Storage | None = None, result: TarReadResult | None = None,
                 max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[Sample]:
    """Yield samples in tar order; on a damaged tar, yield the partial sample and stop.

    Raises only for infrastructure failures (see the module docstring). Members are never
    written anywhere, so names with ``..`` or absolute paths and links are harmless: links
    and devices are skipped and counted.
    """
    result = result if result is not None else TarReadResult()
    fs, path = filesystem(tar_url, storage)
    size = retrying(fs.size, path)
    current: Sample | None = None
    in_member = False  # True while a member's data is being read: a break then spoils the sample
    with fs.open(path, "rb", block_size=READ_BLOCK) as raw:
        f = _Position(raw)
        try:
            if raw.read(2) == _GZIP_MAGIC:
                raise tarfile.ReadError("gzip-compressed tar: replica reads uncompressed tars "
                                        "(images are fetched later by byte range)")
            raw.seek(0)
            with tarfile.open(fileobj=f, mode="r|") as tf:
                for info in tf:
                    reason = _skip_reason(info)
                    if reason:
                        result.skipped[reason] += 1
                        continue
                    m = _KEY_EXT.match(info.name)
                    key, ext = (m.group(1), m.group(2).lower()) if m else (info.name, "")
                    if current is None or key != current.key:
                        if current is not None:
                            yield current
                        current = Sample(key=key)
                    limit = max_member_bytes if ext in IMAGE_EXTS else MAX_SIDE_MEMBER_BYTES
                    if info.size > limit:  # left unread: the stream skips it block by block
                        result.skipped[f"oversize_{'image' if ext in IMAGE_EXTS else ext or 'member'}"] += 1
                        current.members[ext] = Member(data=None, offset=info.offset_data, size=info.size)
                        continue
                    in_member = True
                    fh = tf.extractfile(info)
                    data = fh.read() if fh is not None else b""
                    if len(data) != info.size:
                        raise tarfile.ReadError(f"unexpected end of data in member {info.name}")
                    current.members[ext] = Member(data=data, offset=info.offset_data, size=info.size)
                    in_member = False
                # tarfile treats a header cut in half as a clean end: look for the zero block.
                f.seek(tf.offset)
                if f.read(512) != bytes(512):
                    raise tarfile.ReadError(f"truncated tar: no end-of-archive marker at byte {tf.offset}")
        except (tarfile.TarError, EOFError) as exc:
            if _cut_short(exc) and f.furthest < size:
                # the object is longer than what was read: the read stopped, not the tar
                raise OSError(f"read of {tar_url} stopped at byte {f.furthest} of {size}: {exc}") from exc
            result.error = f"{type(exc).__name__}: {exc}"
            if current is not None and in_member:
                current.error = result.error
        finally:
            result.bytes_read = f.furthest
    if current is not None:
        yield current
