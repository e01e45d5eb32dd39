"""Test and benchmark support: kill -9 of this process's own Ray workers, by what they run, and
what a fault trial compares afterwards (an index's content) and feeds in (endless zero bytes).

Not used by any stage. Ray names a worker process after the task or actor it runs
(``ray::embed_shard``, ``ray::EmbedActor``...); only descendants of the calling process (the Ray
it started) are ever touched.
"""
from __future__ import annotations

import collections
import io
import os
import random
import signal
import threading
import time
from pathlib import Path

def descends_from_us(pid: int) -> bool:
    """Only processes of this test's own Ray are ever killed."""
    me = os.getpid()
    while pid > 1:
        if pid == me:
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False


def ray_processes(title: str) -> list[int]:
    """Ray worker processes of ours whose title (``ray::<task or actor>``) starts with ``title``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if cmdline.startswith(f"ray::{title}") and descends_from_us(int(entry.name)):
                found.append(int(entry.name))
    return found


def kill_one(titles: list[str], give_up_s: float = 30, rng: random.Random | None = None) -> tuple[str, int] | None:
    """SIGKILL one live process of one of the given kinds (waiting until one exists)."""
    rng = rng or random.Random()
    end = time.time() + give_up_s
    while time.time() < end:
        for title in titles:
            pids = ray_processes(title)
            if pids:
                pid = rng.choice(pids)
                os.kill(pid, signal.SIGKILL)
                return title, pid
        time.sleep(0.01)
    return None


class Killer(threading.Thread):
    """After a random delay, kills one live process of the given kinds."""

    def __init__(self, titles: list[str], delay_s: float, rng: random.Random | None = None):
        super().__init__(daemon=True)
        self.titles, self.delay_s, self.rng, self.killed = titles, delay_s, rng, []

    def run(self) -> None:
        time.sleep(self.delay_s)
        found = kill_one(self.titles, rng=self.rng)
        if found:
            self.killed.append(found)


def index_entries(index) -> collections.Counter:
    """Every (list, id, code) of every shard of a built index (an ``IndexFolder``), counted: two
    indexes hold the same vectors in the same lists with the same codes when these are equal."""
    import faiss

    from pipeline.index.merge import read_shard

    entries: collections.Counter = collections.Counter()
    for shard in index.read_manifest().shards:
        idx = read_shard(index.child(shard.index), in_ram=not shard.ivfdata)
        inv = faiss.extract_index_ivf(idx).invlists
        for lst in range(inv.nlist):
            n = inv.list_size(lst)
            if n:
                ids = faiss.rev_swig_ptr(inv.get_ids(lst), n).copy()
                codes = faiss.rev_swig_ptr(inv.get_codes(lst), n * inv.code_size).copy().reshape(n, -1)
                entries.update((lst, int(i), c.tobytes()) for i, c in zip(ids, codes))
    return entries


class ZeroStream(io.RawIOBase):
    """``size`` zero bytes, read without ever holding them (a huge tar member)."""

    def __init__(self, size: int):
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), self.left)
        b[:n] = bytes(n)
        self.left -= n
        return n
