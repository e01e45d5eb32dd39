"""The lock of an output folder: one run at a time writes an embeddings folder, an index or a run.

``{folder}/_lock.json`` (or another name a layout module gives) is created with an atomic create (``O_EXCL`` locally; a conditional PUT,
``If-None-Match: *``, on S3), so of two runs started together exactly one gets it. It holds the
owner, host, pid, command and a heartbeat the holder rewrites every ``heartbeat_s`` (a
conditional PUT on the object's ETag on S3, so a broken lock is noticed). Another run refuses
with the holder's details (exit code 4); a lock whose heartbeat is older than ``stale_after_s``
belongs to a dead run and may be broken with ``--break-lock``; a lock held by a process of this
host that no longer exists (a killed run, rerun on the same machine) is broken without asking.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, fields
from typing import Any

from pipeline.errors import OutputLocked
from pipeline.storage import Folder, is_local, local_path

LOCK_FILE = "_lock.json"


@dataclass
class LockInfo:
    owner: str
    host: str
    pid: int
    command: str
    started_at: float
    heartbeat_at: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "LockInfo":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _dead_here(held: LockInfo) -> bool:
    """The holder ran on this host and its process is gone (killed): its lock is certainly stale."""
    if held.host != socket.gethostname():
        return False
    try:
        os.kill(held.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


class OutputLock:
    """``with OutputLock(folder, "embed"):`` holds the folder's lock for the block."""

    def __init__(self, folder: Folder, command: str, *, break_lock: bool = False, stale_after_s: float = 600,
                 heartbeat_s: float = 30, name: str = LOCK_FILE):
        self.folder, self.command, self.name = folder, command, name
        self.break_lock, self.stale_after_s, self.heartbeat_s = break_lock, stale_after_s, heartbeat_s
        now = time.time()
        self.info = LockInfo(owner=uuid.uuid4().hex, host=socket.gethostname(), pid=os.getpid(), command=command,
                             started_at=now, heartbeat_at=now)
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: set when the heartbeat found the lock taken by someone else (it was broken)
        self.lost = False

    # -- the atomic create -------------------------------------------------------------------
    def _create(self) -> bool:
        data = json.dumps(self.info.to_json()).encode()
        if self.folder.local:
            path = local_path(self.folder.child(self.name))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        try:
            self.folder.fs.pipe_file(self.folder.fs_path(self.name), data, mode="create")
        except FileExistsError:
            return False
        self._etag = self.folder.fs.info(self.folder.fs_path(self.name)).get("ETag")
        return True

    def holder(self) -> LockInfo | None:
        try:
            return LockInfo.from_json(self.folder.read_json(self.name))
        except FileNotFoundError:
            return None

    def acquire(self) -> "OutputLock":
        for _ in range(2):
            if self._create():
                self._remove_orphan_temporaries()
                self._thread = threading.Thread(target=self._beat, name="replica-lock-heartbeat", daemon=True)
                self._thread.start()
                return self
            held = self.holder()
            if held is None:  # released between our try and our read: try again
                continue
            age = time.time() - held.heartbeat_at
            if (self.break_lock and age > self.stale_after_s) or _dead_here(held):
                self.folder.remove(self.name)
                continue
            hint = ("it looks dead (no heartbeat for longer than the stale limit): rerun with --break-lock"
                    if age > self.stale_after_s else
                    f"wait for it to finish; if it died, --break-lock works once its heartbeat is "
                    f"{self.stale_after_s:.0f}s old")
            raise OutputLocked(f"{self.folder.url} is locked by `{held.command}` on {held.host} (pid {held.pid}, "
                               f"last heartbeat {age:.0f}s ago): {hint}")
        raise OutputLocked(f"could not take the lock of {self.folder.url}: it keeps changing hands")

    # -- heartbeat ---------------------------------------------------------------------------
    def _write_heartbeat(self) -> None:
        held = self.holder()
        if held is None or held.owner != self.info.owner:
            self.lost = True
            return
        self.info.heartbeat_at = time.time()
        data = json.dumps(self.info.to_json()).encode()
        if is_local(self.folder.url):
            self.folder.write_bytes(self.name, data)
            return
        path = self.folder.fs_path(self.name)
        try:  # only if nobody replaced it since our last write
            self.folder.fs.pipe_file(path, data, **({"IfMatch": self._etag} if self._etag else {}))
        except OSError:
            self.lost = True
            return
        self._etag = self.folder.fs.info(path).get("ETag")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._write_heartbeat()
            except Exception:  # noqa: BLE001 - a missed heartbeat is retried at the next tick
                pass

    def _remove_orphan_temporaries(self) -> None:
        """Delete the hidden temporaries of local atomic writes (storage.atomic_output) that a
        killed writer left in the folder. Only the lock holder writes there, and it calls this
        before its run writes and after it ends, so none of them is in use."""
        if not self.folder.local:
            return  # object stores are written in place: no temporaries
        for root, _dirs, files in os.walk(local_path(self.folder.url)):
            for name in files:
                if name.startswith(".tmp-"):
                    try:
                        os.remove(os.path.join(root, name))
                    except OSError:
                        pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        held = self.holder()
        if held is not None and held.owner == self.info.owner:
            self._remove_orphan_temporaries()
            self.folder.remove(self.name)
        if self.folder.local:  # a run refused before writing anything leaves no empty folder behind
            try:
                os.rmdir(local_path(self.folder.url))
            except OSError:
                pass

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
