"""Exact rerank: fetch the stored fp16 vectors of candidate ids and rescore them exactly.

Two sources, same answer:

* ``SideFileVectors``: the index folder's fp16 side files (written by add), row-major;
  one vector is ``dim * 2`` bytes at offset ``row * dim * 2``. On local disk (a shard actor's
  copy) the files are memory-mapped; remote, a candidate costs one small ranged read
  (neighbouring rows are coalesced; all ranges go out in one batched call).
* ``ParquetVectors``: the embedding Parquet rows themselves (via the registry), reading only
  the row groups that hold candidates (a whole row group per candidate at worst).

docs/BENCHMARKS.md measures both per 1,000 candidates.
"""
from __future__ import annotations

import resource
from collections import OrderedDict
from typing import Protocol

import numpy as np

from pipeline.errors import MismatchError
from pipeline.index.registry import Registry, decode_ids, fetch_rows
from pipeline.layout.index import IndexFolder, Manifest, vectors_name
from pipeline.storage import Folder


class VectorSource(Protocol):
    dim: int

    def fetch(self, ids: np.ndarray) -> np.ndarray:
        """(n,) int64 ids (no -1) -> (n, dim) float32 vectors, same order."""

    def fetch_stored(self, ids: np.ndarray) -> np.ndarray:
        """The same rows as stored (fp16): rescoring widens them a query at a time."""


def widen(rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """fp16 (or fp32) rows -> fp32, into ``out`` when given, for the rescoring's many rows:
    torch's cast is vectorised (~0.1 ns per value in cache here), numpy's ~2.3 ns. ``fetch`` of a
    few rows stays in numpy, so a driver that embeds without torch never imports it."""
    import torch

    if not rows.flags.writeable or not rows.flags.c_contiguous:  # torch takes only such arrays
        rows = np.array(rows)
    if out is None:
        out = np.empty(rows.shape, np.float32)
    torch.from_numpy(out).copy_(torch.from_numpy(rows))
    return out


class SideFileVectors:
    """fp16 side files in ``folder`` (the index's vectors folder, or a local copy of some of it).

    Local files are memory-mapped and read by fancy indexing: the ``open_files`` most recently
    used stay mapped (at most a quarter of the process's file-descriptor limit; remapping a file
    per batch doubled the cost at 1,000 files). Remote files are read by ranged reads. Both paths
    are vectorised: a shard actor reranks 800 candidates of every query, so a Python step per
    candidate would cost more than the scan.
    """

    def __init__(self, folder: Folder, dim: int, max_gap_rows: int = 4, open_files: int = 2048):
        self.folder = folder
        self.dim = int(dim)
        self.max_gap_rows = max_gap_rows
        # each map holds a file descriptor: stay well inside the process's limit
        self.open_files = max(1, min(open_files, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 4))
        self.bytes_read = 0
        self.requests = 0
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": OrderedDict()}  # maps are reopened, never shipped

    def fetch(self, ids: np.ndarray) -> np.ndarray:
        return self.fetch_stored(ids).astype(np.float32)

    def fetch_stored(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self.dim), dtype=np.float16)
        if len(ids) == 0:
            return out
        order = np.argsort(ids, kind="stable")  # by shard, then row
        shards, rows = decode_ids(ids[order])
        if self.folder.local:
            cuts = np.flatnonzero(np.diff(shards)) + 1
            for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(order)]):
                mapped = self._mapped(int(shards[lo]))
                if rows[hi - 1] >= len(mapped):  # rows are sorted: the last is the largest
                    self._short(int(shards[lo]), len(mapped), int(rows[hi - 1]))
                out[order[lo:hi]] = mapped[rows[lo:hi]]
            self.requests += len(cuts) + 1
            self.bytes_read += len(ids) * self.dim * 2
        else:
            out[order] = self._ranged(shards, rows)
        return out

    def _mapped(self, number: int) -> np.ndarray:
        arr = self._maps.pop(number, None)
        if arr is None:
            path = self.folder.fs_path(vectors_name(number))
            arr = np.memmap(path, dtype=np.float16, mode="r").reshape(-1, self.dim)
            while len(self._maps) >= self.open_files:
                self._maps.popitem(last=False)
        self._maps[number] = arr
        return arr

    def _short(self, number: int, rows: int, asked: int) -> None:
        raise MismatchError(f"side file {self.folder.child(vectors_name(number))} holds {rows} vectors of dim "
                            f"{self.dim}, but row {asked} was asked for: the file is truncated or from another "
                            "index; rebuild the index (`replica index build` into a new folder)")

    def _ranged(self, shards: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Sorted (shard, row) pairs -> vectors: one ranged read per run of nearby rows of a shard,
        all runs sent in one batched call."""
        vb = self.dim * 2
        new_run = np.r_[True, (np.diff(shards) != 0) | (np.diff(rows) > self.max_gap_rows)]
        first = np.flatnonzero(new_run)
        last = np.r_[first[1:], len(rows)] - 1
        start_row, end_row = rows[first], rows[last] + 1
        paths = [self.folder.fs_path(vectors_name(int(s))) for s in shards[first]]
        blobs = self.folder.fs.cat_ranges(paths, (start_row * vb).tolist(), (end_row * vb).tolist())
        for blob, s, lo, hi in zip(blobs, shards[first], start_row, end_row):
            if isinstance(blob, Exception):
                raise blob
            if len(blob) != (hi - lo) * vb:
                self._short(int(s), int(lo) + len(blob) // vb, int(hi) - 1)
        stacked = np.frombuffer(b"".join(blobs), dtype=np.float16).reshape(-1, self.dim)
        run = np.cumsum(new_run) - 1
        base = np.r_[0, np.cumsum(end_row - start_row)[:-1]]
        self.bytes_read += stacked.nbytes
        self.requests += len(first)
        return stacked[base[run] + rows - start_row[run]]


class ParquetVectors:
    def __init__(self, registry: Registry, dim: int, threads: int = 8):
        self.registry = registry
        self.dim = int(dim)
        self.threads = threads

    def fetch(self, ids: np.ndarray) -> np.ndarray:
        return self.fetch_stored(ids).astype(np.float32)

    def fetch_stored(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return np.zeros((0, self.dim), np.float16)
        table = fetch_rows(ids, self.registry, columns=["embedding"], threads=self.threads)
        col = table.column("embedding").combine_chunks()
        # .values keeps the slots of null rows (flatten() would drop them and misalign)
        flat = col.values.to_numpy(zero_copy_only=False)[col.offset * self.dim : (col.offset + len(col)) * self.dim]
        out = np.array(flat.reshape(len(col), self.dim), dtype=np.float16)
        if col.null_count:  # rows that were never embedded (not in the index): zeros
            out[~col.is_valid().to_numpy(zero_copy_only=False)] = 0
        return out


def exact_rerank(
    queries: np.ndarray,
    candidate_ids: np.ndarray,
    source: VectorSource,
    k: int,
    metric: str = "ip",
) -> tuple[np.ndarray, np.ndarray]:
    """Rescore (n, c) candidate ids exactly against their stored vectors; best ``k`` per query.

    Each distinct id is fetched once. Scores are inner products (``metric="ip"``, cosine on
    normalised vectors) or squared L2 distances (``"l2"``); -1 candidates stay at the end.
    """
    q = np.asarray(queries, dtype=np.float32)
    cand = np.asarray(candidate_ids, dtype=np.int64)
    uniq, inverse = np.unique(cand[cand >= 0], return_inverse=True)
    vecs = source.fetch(uniq)
    pos = np.full(cand.shape, -1, dtype=np.int64)
    pos[cand >= 0] = inverse
    worst = -np.inf if metric == "ip" else np.inf
    scores = np.full(cand.shape, worst, dtype=np.float32)
    for r in range(len(q)):
        valid = pos[r] >= 0
        v = vecs[pos[r, valid]]
        if metric == "ip":
            scores[r, valid] = v @ q[r]
        else:
            scores[r, valid] = ((v - q[r]) ** 2).sum(axis=1)
    key = -scores if metric == "ip" else scores
    order = np.lexsort((np.where(cand < 0, np.iinfo(np.int64).max, cand), key), axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(cand, order, axis=1)


def recall_at(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean share of the true top-k ids found in the first k results."""
    hits = [len(set(f[:k].tolist()) & set(t[:k].tolist())) for f, t in zip(found, truth)]
    return float(np.mean(hits) / k)


def source_for(index: IndexFolder, manifest: Manifest, kind: str = "auto") -> VectorSource:
    """The vector source for exact rerank: ``side`` files (cheapest; when add wrote them, which
    ``auto`` reads from the manifest) or the embedding ``parquet`` rows."""
    if kind == "auto":
        kind = "side" if manifest.side_vectors else "parquet"
    if kind == "side":
        return SideFileVectors(index.vectors_folder, manifest.dim)
    return ParquetVectors(Registry.load(index), manifest.dim)
