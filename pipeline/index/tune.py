"""Tune: search settings chosen by measurement, not fixed.

The recall an IVF index reaches at a given nprobe and rerank depth depends on the data (a
power-law spectrum or Zipf-sized clusters need far more lists probed than a benchmark's
mixture). So after a build, ``tune_queries`` corpus vectors are drawn as queries, their exact
top-k is computed by a scan of every stored vector (one Ray task per group of embedding shards,
reading the fp16 side files; the query itself excluded), and every (nprobe, rerank depth) on a
grid is tried the way search runs it: ANN scan, then exact rescoring of the best ``depth``. For
each depth, the fewest lists probed that reach ``target_recall`` (recall@k after the rerank, with
two standard errors of the sample to spare) is timed again with the scan asked for ``depth + 1``
results, as search asks (the grid scans once per nprobe at the deepest depth, whose longer result
lists cost more); the cheapest of those (ties within timing noise going to the fewest lists
probed) is recorded in the manifest; search uses it unless told otherwise. The whole curve is
kept in ``tuning.json``. A build retunes when the index grew by more than ``retune_growth`` since
the last tuning.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from pipeline.config import IndexConfig
from pipeline.index.plan import IndexPlan, plan_index
from pipeline.index.registry import Registry, encode_ids
from pipeline.layout.index import IndexFolder, Tuning, vectors_name
from pipeline.progress import NullProgress, Progress

#: rerank depths tried (images rescored per query), and the nprobe grid's ceiling
DEPTHS = (10, 25, 50, 100, 200, 400, 800, 1600)
MAX_NPROBE = 4096
#: points whose measured time is within this fraction of the fastest count as equally fast: on
#: shared cores the timings of neighbouring grid points differ by more than their true cost
TIMING_NOISE = 0.2


def cheapest(points: list[dict[str, Any]]) -> dict[str, Any]:
    """The point to use among those reaching the target: of the ones within :data:`TIMING_NOISE`
    of the fastest, the fewest lists probed, then the shallowest rerank (less work for the same
    measured time; a 10M run otherwise chose nprobe 1024 where 128 was as fast and as accurate)."""
    fastest = min(c["ms_per_query"] for c in points)
    near = [c for c in points if c["ms_per_query"] <= fastest * (1 + TIMING_NOISE)]
    return min(near, key=lambda c: (c["nprobe"], c["rerank_depth"], c["ms_per_query"]))


def frontier(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Of the points reaching the target, each rerank depth's fewest lists probed: probing more
    at the same depth is never cheaper, so only these can be the cheapest."""
    fewest: dict[int, dict[str, Any]] = {}
    for c in points:
        if c["rerank_depth"] not in fewest or c["nprobe"] < fewest[c["rerank_depth"]]["nprobe"]:
            fewest[c["rerank_depth"]] = c
    return sorted(fewest.values(), key=lambda c: c["rerank_depth"])


def sample_queries(registry: Registry, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` stored vectors drawn across the corpus, and their ids."""
    from pipeline.index.train import read_ok_vectors

    rng = np.random.default_rng(seed)
    shards = rng.choice(len(registry), size=min(len(registry), max(1, n // 4)), replace=False)
    xs, ids = [], []
    for s in shards:
        rows, x = read_ok_vectors(registry.embeddings, registry.name(int(s)))
        if len(rows):
            take = rng.choice(len(rows), size=min(len(rows), int(np.ceil(n / len(shards)))), replace=False)
            xs.append(x[take])
            ids.append(encode_ids(int(s), rows[take]))
    x, i = np.concatenate(xs), np.concatenate(ids)
    keep = rng.permutation(len(i))[:n]
    return np.ascontiguousarray(x[keep], np.float32), i[keep]


def scan_topk(index: IndexFolder, registry: Registry, numbers: list[int], queries: np.ndarray, k: int,
              side_vectors: bool) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of ``queries`` among the ok vectors of embedding shards ``numbers``: a Ray task."""
    from pipeline.index.train import read_ok_vectors

    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.full((len(queries), k), -1, np.int64)
    for number in numbers:
        if side_vectors:  # one sequential read of the shard's fp16 vectors; rows never embedded are zeros
            raw = index.vectors_folder.read_bytes(vectors_name(number))
            x = np.frombuffer(raw, np.float16).reshape(-1, queries.shape[1]).astype(np.float32)
            rows = np.nonzero(np.abs(x).sum(axis=1) > 0)[0]
            x = x[rows]
        else:
            rows, x = read_ok_vectors(registry.embeddings, registry.name(number))
        if not len(rows):
            continue
        s = queries @ x.T
        both_s = np.concatenate([best_s, s], axis=1)
        both_i = np.concatenate([best_i, np.broadcast_to(encode_ids(number, rows), s.shape)], axis=1)
        top = np.argpartition(-both_s, k - 1, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(both_s, top, 1), np.take_along_axis(both_i, top, 1)
    return best_s, best_i


def ground_truth(p: IndexPlan, registry: Registry, queries: np.ndarray, k: int, side_vectors: bool,
                 use_ray: bool) -> np.ndarray:
    """Exact top-k ids of every query over the whole corpus, best first (ties by id)."""
    from pipeline.index.serve import merge_topk

    groups = [list(range(a, min(a + p.cfg.group_size, len(registry)))) for a in range(0, len(registry), p.cfg.group_size)]
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    if use_ray:
        from pipeline.ray_util import RetryPolicy, cluster_cpus, connect, is_infrastructure, run_bounded

        ray = connect(p.cfg.ray.address)
        task = ray.remote(scan_topk).options(num_cpus=1)
        qref = ray.put(queries)
        run_bounded(groups, lambda g, _a: task.remote(p.index, registry, g, qref, k, side_vectors),
                    lambda _g, r: parts.append(r), window=lambda: max(1, int(cluster_cpus())),
                    retry=RetryPolicy(max_attempts=3, retry_if=is_infrastructure))
    else:
        parts = [scan_topk(p.index, registry, g, queries, k, side_vectors) for g in groups]
    return merge_topk([s for s, _ in parts], [i for _, i in parts], k, "ip")[1]


def recalls_without_self(found: np.ndarray, truth: np.ndarray, self_ids: np.ndarray, k: int) -> np.ndarray:
    """Per query: the share of its true top-k (itself excluded) among its first k results (itself excluded)."""
    out = np.zeros(len(found))
    for q, (f, t, me) in enumerate(zip(found, truth, self_ids)):
        want = [i for i in t if i != me and i >= 0][:k]
        got = [i for i in f if i != me and i >= 0][:k]
        out[q] = len(set(want) & set(got)) / max(1, len(want))
    return out


def recall_without_self(found: np.ndarray, truth: np.ndarray, self_ids: np.ndarray, k: int) -> float:
    """Mean of :func:`recalls_without_self`."""
    return float(np.mean(recalls_without_self(found, truth, self_ids, k)))


def reaches(point: dict[str, Any], target: float) -> bool:
    """Recall at least ``target`` with two standard errors of the tuning sample to spare: a 10M
    run's point at 0.9526 on its 1,000 tuning queries gave 0.948 on 1,000 held-out ones."""
    return point["recall"] - 2 * point.get("recall_se", 0.0) >= target


def run_tune(cfg: IndexConfig, progress: Progress | None = None, *, use_ray: bool = True,
             force: bool = False) -> Tuning | None:
    """Measure recall against cost on a sample and record the cheapest settings that reach the target."""
    progress = progress or NullProgress()
    p = plan_index(cfg)
    with p.lock("replica index tune"):
        manifest = p.index.read_manifest()
        old = manifest.tuned
        if old and not force and manifest.ntotal <= old["ntotal"] * (1 + cfg.retune_growth):
            progress.log(f"tuning is current: nprobe {old['nprobe']}, rerank depth {old['rerank_depth']}, "
                         f"recall@{old['k']} {old['recall']:.3f} (measured at {old['ntotal']:,} vectors)")
            return None
        tuning = measure(p, progress, use_ray)
        manifest = p.index.read_manifest()  # the lock is held: nothing else changed it
        manifest.tuned = tuning.summary()
        p.index.write_tuning(tuning)
        p.index.write_manifest(manifest)
    verdict = "reaches" if tuning.reached else "does NOT reach (the best point was chosen)"
    progress.log(f"tuned: nprobe {tuning.nprobe}, rerank depth {tuning.rerank_depth}: recall@{tuning.k} "
                 f"{tuning.recall:.3f} after the rerank ({tuning.ann_recall:.3f} before), {verdict} the target "
                 f"{tuning.target_recall}")
    return tuning


def measure(p: IndexPlan, progress: Progress, use_ray: bool) -> Tuning:
    from pipeline.index.rerank import source_for
    from pipeline.index.serve import IndexSearcher

    cfg, k = p.cfg, 10
    started = time.time()
    registry = Registry.load(p.index)
    manifest = p.index.read_manifest()
    queries, self_ids = sample_queries(registry, cfg.tune_queries, cfg.seed)
    with progress.step(f"exact top-{k} of {len(queries)} sampled vectors over {manifest.ntotal:,} (tuning)"):
        truth = ground_truth(p, registry, queries, k + 1, manifest.side_vectors, use_ray)
    nprobes = [n for n in (2 ** e for e in range(13)) if n <= min(manifest.nlist, MAX_NPROBE)]
    depths = [d for d in DEPTHS if d >= k]
    depths = [d for d in depths if d < manifest.ntotal] or depths[:1]  # deeper than the corpus adds nothing
    curve: list[dict[str, Any]] = []
    owner = np.arange(len(queries))
    with IndexSearcher(p.index, use_ray=use_ray, threads=cfg.threads, ray_address=cfg.ray.address) as searcher, \
            progress.task("tune", len(nprobes), "nprobe values") as bar:
        source = source_for(p.index, manifest)
        for nprobe in nprobes:
            t = time.perf_counter()
            _, ann = searcher.search(queries, max(depths) + 1, nprobe)
            ann_ms = (time.perf_counter() - t) * 1000 / len(queries)
            ann_recall = recall_without_self(ann, truth, self_ids, k)
            for depth in depths:
                cand = [row[row >= 0][: depth + 1] for row in ann]
                t = time.perf_counter()
                exact = searcher.rescore(queries, owner, cand, fallback=source)
                rerank_ms = (time.perf_counter() - t) * 1000 / len(queries)
                found = np.full((len(queries), k + 1), -1, np.int64)
                for q, (c, (s, _, _)) in enumerate(zip(cand, exact)):
                    best = c[np.lexsort((c, -s))][: k + 1]
                    found[q, : len(best)] = best
                recalls = recalls_without_self(found, truth, self_ids, k)
                curve.append({"nprobe": nprobe, "rerank_depth": depth, "ann_recall": round(ann_recall, 4),
                              "recall": round(float(recalls.mean()), 4),
                              "recall_se": round(float(recalls.std(ddof=1) / np.sqrt(len(recalls))), 4)
                              if len(recalls) > 1 else 0.0,
                              "ms_per_query": round(ann_ms + rerank_ms, 3), "rerank_ms": round(rerank_ms, 3)})
            bar.advance(note=f"nprobe {nprobe}: recall {max(c['recall'] for c in curve if c['nprobe'] == nprobe):.3f}")
        good = frontier([c for c in curve if reaches(c, cfg.target_recall)])
        for c in good:  # the grid timed every scan at the deepest k: time these as search will run them
            t = time.perf_counter()
            searcher.search(queries, c["rerank_depth"] + 1, c["nprobe"])
            c["ms_per_query"] = round((time.perf_counter() - t) * 1000 / len(queries) + c["rerank_ms"], 3)
            c["timed_at_depth"] = True
    best = cheapest(good) if good else max(curve, key=lambda c: (c["recall"], -c["ms_per_query"]))
    return Tuning(target_recall=cfg.target_recall, k=k, nprobe=best["nprobe"], rerank_depth=best["rerank_depth"],
                  recall=best["recall"], ann_recall=best["ann_recall"], reached=bool(good), ntotal=manifest.ntotal,
                  queries=len(queries), curve=curve, seconds=round(time.time() - started, 1))
