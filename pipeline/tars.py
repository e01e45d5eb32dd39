"""Reading WebDataset tars in img2dataset's layout, keeping each image's byte range.

A sample is the run of consecutive members sharing a key (``{key}.jpg``, ``{key}.txt``,
``{key}.json``). Reading streams the tar once (one sequential GET on object stores) and never
raises on bad data: a truncated tar ends the iteration and reports where it broke.
"""
from __future__ import annotations

import json
import re
import tarfile
from dataclasses import dataclass, field
from typing import Iterator

from pipeline.storage import Storage, filesystem

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.(.+)$")
READ_BLOCK = 8 << 20


@dataclass
class Member:
    data: bytes
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
        if txt is not None:
            return txt.data.decode("utf-8", errors="replace")
        return self.meta().get("caption")

    def meta(self) -> dict:
        js = self.members.get("json")
        if js is None:
            return {}
        try:
            value = json.loads(js.data)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}


@dataclass
class TarReadResult:
    """Filled while iterating: where and why a tar broke, if it did."""

    error: str | None = None


def shard_name(tar_url: str) -> str:
    """``s3://b/x/00012.tar`` -> ``00012``: the unit-of-work name used for outputs."""
    base = tar_url.rstrip("/").rsplit("/", 1)[-1]
    return base[:-4] if base.endswith(".tar") else base


def iter_samples(tar_url: str, storage: Storage | None = None, result: TarReadResult | None = None) -> Iterator[Sample]:
    """Yield samples in tar order; on a broken tar, yield the partial sample and stop."""
    result = result if result is not None else TarReadResult()
    fs, path = filesystem(tar_url, storage)
    current: Sample | None = None
    in_member = False  # True while a member's data is being read: a break then spoils the sample
    try:
        with fs.open(path, "rb", block_size=READ_BLOCK) as f, tarfile.open(fileobj=f, mode="r|") as tf:
            for info in tf:
                if not info.isfile():
                    continue
                m = _KEY_EXT.match(info.name)
                key, ext = (m.group(1), m.group(2).lower()) if m else (info.name, "")
                if current is None or key != current.key:
                    if current is not None:
                        yield current
                    current = Sample(key=key)
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
    except (tarfile.TarError, EOFError, OSError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        if current is not None and in_member:
            current.error = result.error
    if current is not None:
        yield current
