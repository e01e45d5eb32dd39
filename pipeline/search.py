"""Search stage: generated images against the whole corpus index, then the report.

For each query (a generated image):
  1. embed it with the index's embedder, whole image and several regions when the embedder
     offers them, so an object copied into a new scene is still found;
  2. fan the region vectors out to the index shard actors and keep ``candidates`` per region;
  3. rescore every candidate exactly on its stored vector; a corpus image's score is its best
     over the query's regions;
  4. drop blocklisted candidates (by key, URL or image hash) before any pixels are fetched;
  5. optionally rescore the best ``rerank_top`` with a second descriptor on their pixels
     (fetched by ranged reads from the corpus tars), and verify the best ``verify_top`` with
     local features: verified copies move ahead, and their matched boxes are kept;
  6. mark each match inside/outside the subset and count its near-duplicates in the corpus.

A baseline (corpus images searched against the corpus, themselves excluded) calibrates a
threshold at a fixed false-positive rate. Everything lands in ``{output}/run_id={run}/``.
"""
from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.config import EmbedderConfig, SearchConfig, build, to_dict
from pipeline.errors import ConfigError
from pipeline.io import Storage, check_writable, join, read_json, write_json

RUN_PREFIX = "run_id="
ROW_COLUMNS = ["key", "url", "caption", "tar_url", "tar_offset", "tar_size", "sha256"]


@dataclass
class Candidate:
    id: int
    score_index: float
    score_exact: float
    region: int
    row: dict[str, Any] = field(default_factory=dict)
    score_rerank: float | None = None
    inliers: int | None = None
    verify_score: float | None = None
    query_box: tuple | None = None
    match_box: tuple | None = None
    #: best rank of this corpus image in any one query region's list (1 = some region's best)
    region_rank: int = 1 << 30

    @property
    def score(self) -> float:
        return self.score_rerank if self.score_rerank is not None else self.score_exact


def run_dir(cfg: SearchConfig) -> str:
    return join(cfg.output, f"{RUN_PREFIX}{cfg.run_id}")


def corpus_embedder_config(manifest: dict[str, Any], storage: Storage | None) -> EmbedderConfig:
    """The embedder settings the corpus was embedded with (recorded by the embed stage)."""
    info = read_json(join(manifest["embeddings"], "_replica.json"), storage)
    if "embedder_config" not in info:
        raise ConfigError("the index's embeddings do not record their embedder settings: pass --embedder explicitly")
    return build(EmbedderConfig, info["embedder_config"])


def validate(cfg: SearchConfig) -> dict[str, Any]:
    """Fail before any work: index readable, output writable, settings possible."""
    from pipeline.index.manifest import read_manifest

    if not cfg.index:
        raise ConfigError("no index given: pass --index with a built index folder")
    if not cfg.output:
        raise ConfigError("no output given: pass --output with a results folder")
    if cfg.top_k < 1 or cfg.candidates < cfg.top_k:
        raise ConfigError(f"need 1 <= top_k <= candidates, got top_k={cfg.top_k}, candidates={cfg.candidates}")
    if not 0 < cfg.fpr < 1:
        raise ConfigError(f"fpr must be between 0 and 1, got {cfg.fpr}")
    manifest = read_manifest(cfg.index, cfg.storage)
    if not cfg.embedder.name:
        cfg.embedder = corpus_embedder_config(manifest, cfg.storage)
    if not cfg.run_id:
        cfg.run_id = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    if "/" in cfg.run_id or "=" in cfg.run_id:
        raise ConfigError(f"run_id {cfg.run_id!r} may not contain '/' or '='")
    from pipeline.embedders import validate as validate_embedder

    validate_embedder(cfg.embedder, cfg.storage)
    if cfg.rerank.name:
        validate_embedder(cfg.rerank, cfg.storage)
    try:
        check_writable(cfg.output, cfg.storage)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"cannot write to output {cfg.output!r}: {type(exc).__name__}: {exc}") from exc
    return manifest


# --------------------------------------------------------------------------- the search


def embed_queries(embedder, images, regions: bool) -> tuple[np.ndarray, np.ndarray, list[tuple]]:
    """All region vectors of all images, the image each belongs to, and each region's box."""
    vecs, owner, boxes = [], [], []
    for qi, image in enumerate(images):
        if regions:
            v, b = embedder.embed_regions(image)
        else:
            v, b = embedder.embed_images([image]), [(0, 0, image.width, image.height)]
        vecs.append(v)
        owner.extend([qi] * len(v))
        boxes.extend(b)
    return np.concatenate(vecs).astype(np.float32), np.array(owner), boxes


def candidate_search(vecs, owner, n_owners, searcher, source, cfg: SearchConfig) -> list[dict[int, "Candidate"]]:
    """ANN candidates of every region vector, rescored exactly, merged per owner and corpus image."""
    from pipeline.index.rerank import exact_rerank

    ann_scores, ann_ids = searcher.search(vecs, cfg.candidates)
    exact_scores, exact_ids = exact_rerank(vecs, ann_ids, source, cfg.candidates)
    return best_per_corpus_image(owner, ann_scores, ann_ids, exact_scores, exact_ids, n_owners)


def best_per_corpus_image(owner, ann_scores, ann_ids, exact_scores, exact_ids, n_queries) -> list[dict[int, Candidate]]:
    """Per query: corpus id -> its best-scoring region (exact score), with that region's ANN score."""
    per_query: list[dict[int, Candidate]] = [dict() for _ in range(n_queries)]
    for r in range(len(owner)):
        ann = {int(i): float(s) for s, i in zip(ann_scores[r], ann_ids[r]) if i >= 0}
        found = per_query[owner[r]]
        for rank, (s, i) in enumerate(((s, int(i)) for s, i in zip(exact_scores[r], exact_ids[r]) if i >= 0), 1):
            c = found.get(i)
            if c is None:
                c = found[i] = Candidate(i, ann.get(i, float("nan")), float(s), r)
            elif s > c.score_exact:
                c.score_index, c.score_exact, c.region = ann.get(i, float("nan")), float(s), r
            c.region_rank = min(c.region_rank, rank)
    return per_query


def blocked(row: dict[str, Any], blocklist: set[str]) -> bool:
    return any(row.get(c) in blocklist for c in ("key", "url", "sha256") if row.get(c))


def fetch_image(row: dict[str, Any], storage: Storage | None):
    from pipeline.verify import load_candidate

    return load_candidate(row["tar_url"], row["tar_offset"], row["tar_size"], storage)


def second_stage(queries, picks: list[list[Candidate]], cfg: SearchConfig, storage, counters) -> None:
    """Rescore each query's best candidates with the rerank descriptor on fetched pixels."""
    from pipeline.embedders import build_embedder

    rerank = build_embedder(cfg.rerank, storage)
    for q, cands in zip(queries, picks):
        top = cands[: cfg.rerank_top]
        if not top:
            continue
        qv, _ = rerank.embed_regions(q.image) if cfg.regions else (rerank.embed_images([q.image]), None)
        cv = rerank.embed_images([fetch_image(c.row, storage) for c in top])
        counters["pixels_fetched"] += len(top)
        scores = (cv @ qv.T).max(axis=1)
        for c, s in zip(top, scores):
            c.score_rerank = float(s)
        cands[: len(top)] = sorted(top, key=lambda c: -c.score)


def verification_pool(cands: list[Candidate], top: int, region_rank: int = 3) -> list[Candidate]:
    """The best ``top`` by score, then candidates near the head of some single region's list
    (an object pasted into a new scene ranks high in its own region but may score low overall),
    ``3 * top`` at most."""
    rest = sorted((c for c in cands[top:] if c.region_rank <= region_rank), key=lambda c: (c.region_rank, -c.score))
    return cands[:top] + rest[: 2 * top]


def verify_query(image, rows: list[dict[str, Any]], storage) -> list[tuple]:
    """One query against its candidates (pixels fetched by ranged reads): a Ray task."""
    from pipeline.verify import Verifier

    images = [fetch_image(r, storage) for r in rows]
    return [(int(v.inliers), float(v.score), v.query_box, v.candidate_box)
            for v in Verifier().verify_many(image, images)]


def verify_stage(queries, picks: list[list[Candidate]], cfg: SearchConfig, storage, counters) -> None:
    """Local-feature verification fanned out as one Ray task per query; verified copies move ahead."""
    import ray

    from pipeline.ray_util import cluster_cpus

    task = ray.remote(verify_query).options(num_cpus=1, max_retries=3)
    window = max(2, 2 * int(cluster_cpus()))  # bounded: query images wait in the object store
    pools = [verification_pool(c, cfg.verify_top) for c in picks]
    pending: dict[Any, int] = {}
    todo = [qi for qi, pool in enumerate(pools) if pool]
    while todo or pending:
        while todo and len(pending) < window:
            qi = todo.pop(0)
            pending[task.remote(queries[qi].image, [c.row for c in pools[qi]], storage)] = qi
        done, _ = ray.wait(list(pending), num_returns=1)
        qi = pending.pop(done[0])
        for c, (inliers, score, qbox, cbox) in zip(pools[qi], ray.get(done[0])):
            c.inliers, c.verify_score, c.query_box, c.match_box = inliers, score, qbox, cbox
        counters["pixels_fetched"] += len(pools[qi])
    for cands in picks:
        # Verification adds its score (0 when unverified, towards 1 with many inliers) for ranking.
        cands.sort(key=lambda c: -(c.score + (c.verify_score or 0)))


def neighbours(ids: list[int], searcher, source, cfg: SearchConfig) -> dict[int, list[tuple[float, int]]]:
    """Each corpus id's nearest corpus images, itself included: [(exact score, id)], best first."""
    from pipeline.index.rerank import exact_rerank

    if not ids:
        return {}
    vecs = source.fetch(np.asarray(ids, dtype=np.int64))
    k = cfg.dup_neighbours + 1
    _, ann_ids = searcher.search(vecs, k)
    scores, nn = exact_rerank(vecs, ann_ids, source, k)
    return {i: [(float(s), int(n)) for s, n in zip(s_row, n_row) if n >= 0] for i, s_row, n_row in zip(ids, scores, nn)}


def sample_baseline_ids(registry, manifest, n: int, rng: np.random.Generator, storage) -> np.ndarray:
    """``n`` corpus ids drawn uniformly from embedded rows, touching few shards."""
    from pipeline.index.registry import encode_ids, fetch_rows

    names = [s for s in range(len(registry))]
    if not names or n <= 0:
        return np.zeros(0, np.int64)
    shards = rng.choice(names, size=min(len(names), max(1, n // 20)), replace=False)
    ids = []
    for s in shards:
        stats = read_json(join(manifest["embeddings"], f"{registry.name(int(s))}.stats.json"), storage)
        seen = int(stats["seen"])
        take = min(seen, int(np.ceil(n / len(shards))))
        ids.extend(encode_ids(int(s), rng.choice(seen, size=take, replace=False)).tolist())
    ids = np.array(sorted(ids), dtype=np.int64)
    status = fetch_rows(ids, registry, storage, columns=["status"]).column("status").to_pylist()
    ok = ids[np.array([st == "ok" for st in status], dtype=bool)]
    return rng.permutation(ok)[:n]


def run_search(cfg: SearchConfig, progress: bool = True) -> dict[str, Any]:
    """Run one search; returns the report's summary (also written as summary.json)."""
    from pipeline.embedders import build_embedder
    from pipeline.index.registry import Registry, fetch_rows
    from pipeline.index.rerank import source_for
    from pipeline.index.serve import IndexSearcher
    from pipeline.queries import load_key_set, load_queries
    from pipeline.report import calibrate_threshold, run_report

    started = time.time()
    storage = cfg.storage
    manifest = validate(cfg)
    queries = load_queries(cfg.queries, storage)
    blocklist: set[str] = set()
    for spec in cfg.blocklist:
        blocklist |= load_key_set(spec, storage)
    subset = load_key_set(cfg.subset, storage) if cfg.subset else None
    counters = {"pixels_fetched": 0, "blocked": 0}
    steps = Steps(progress)

    regions = cfg.regions
    with steps.step(f"embedding {len(queries)} queries"):
        embedder = build_embedder(cfg.embedder, storage)
        qvecs, owner, boxes = embed_queries(embedder, [q.image for q in queries], regions)
    with IndexSearcher(cfg.index, storage, identity=embedder.identity(), ray_address=cfg.ray_address,
                       **({"nprobe": cfg.nprobe} if cfg.nprobe else {})) as searcher:
        cfg.nprobe = searcher.nprobe
        source = source_for(cfg.index, manifest, storage)
        registry = Registry.load(cfg.index, storage)
        with steps.step(f"searching {len(qvecs)} query regions across {len(manifest['shards'])} index shards"):
            per_query = candidate_search(qvecs, owner, len(queries), searcher, source, cfg)

        with steps.step("dropping blocklisted candidates and reading their rows"):
            all_ids = sorted({i for found in per_query for i in found})
            by_id = {r["id"]: r for r in fetch_rows(all_ids, registry, storage, columns=ROW_COLUMNS).to_pylist()} if all_ids else {}
            picks: list[list[Candidate]] = []
            for found in per_query:
                kept = []
                for c in sorted(found.values(), key=lambda c: (-c.score_exact, c.id)):
                    c.row = by_id[c.id]
                    if blocklist and blocked(c.row, blocklist):
                        counters["blocked"] += 1
                        continue
                    kept.append(c)
                picks.append(kept)
        if cfg.rerank.name:
            with steps.step(f"second-stage rerank with {cfg.rerank.name}"):
                second_stage(queries, picks, cfg, storage, counters)
        if cfg.verify_top:
            with steps.step(f"verifying the best {cfg.verify_top} candidates per query"):
                verify_stage(queries, picks, cfg, storage, counters)
        picks = [p[: cfg.top_k] for p in picks]

        with steps.step("counting near-duplicates of the matches"):
            groups = neighbours(sorted({c.id for p in picks for c in p}), searcher, source, cfg)
        with steps.step(f"baseline: {cfg.baseline_size} corpus images searched like the queries"):
            baseline, self_recall = run_baseline(cfg, embedder, searcher, source, registry, manifest, blocklist,
                                                 counters, regions)

    scored = [s for s in baseline["top1_score_no_dups"] if s is not None]
    calibrated = calibrate_threshold(scored, cfg.fpr) if scored else None
    identity = embedder.identity()
    out = run_dir(cfg)
    with steps.step(f"writing results to {out}"):
        write_results(cfg, out, queries, picks, groups, boxes, baseline, identity, subset, registry, storage,
                      calibrated)
        run_info = run_record(cfg, manifest, identity, queries, counters, blocklist, subset, calibrated,
                              self_recall, time.time() - started, storage)
        write_json(join(out, "run.json"), run_info, storage)
    with steps.step("writing the report"):
        summary = run_report(out, storage)
    return summary


def run_baseline(cfg, embedder, searcher, source, registry, manifest, blocklist, counters, regions):
    """The corpus's self-similarity, measured the way queries are scored.

    Sampled corpus images are fetched, embedded (regions included when queries use them) and
    searched; each one's best match excludes itself and, for ``top1_score_no_dups``, its
    near-duplicates (stored vectors scoring >= the duplicate threshold). Also returns the
    share of samples whose own stored vector comes back when searched for: the index's recall
    for exact copies at this nprobe.
    """
    from pipeline.index.registry import fetch_rows

    rng = np.random.default_rng(cfg.seed)
    ids = sample_baseline_ids(registry, manifest, cfg.baseline_size, rng, cfg.storage).tolist()
    rows = {r["id"]: r for r in fetch_rows(ids, registry, cfg.storage, columns=ROW_COLUMNS).to_pylist()} if ids else {}
    ids = [i for i in ids if not (blocklist and blocked(rows[i], blocklist))]
    stored = neighbours(ids, searcher, source, cfg)
    self_recall = float(np.mean([any(n == i for _, n in stored[i]) for i in ids])) if ids else None
    dups = {i: {n for s, n in stored[i] if s >= cfg.duplicate_threshold and n != i} for i in ids}
    if regions:
        images = [fetch_image(rows[i], cfg.storage) for i in ids]
        counters["pixels_fetched"] += len(images)
        vecs, owner, _ = embed_queries(embedder, images, True)
        found = candidate_search(vecs, owner, len(ids), searcher, source, cfg) if ids else []
        scored = [sorted(((c.score_exact, c.id) for c in f.values()), reverse=True) for f in found]
    else:
        scored = [stored[i] for i in ids]
    others = [[(sc, n) for sc, n in pairs if n != i] for i, pairs in zip(ids, scored)]
    if blocklist:  # a blocked image may not stand as anyone's best match either
        cand = sorted({n for o in others for _, n in o})
        cand_rows = {r["id"]: r for r in fetch_rows(cand, registry, cfg.storage, columns=ROW_COLUMNS).to_pylist()} if cand else {}
        others = [[(sc, n) for sc, n in o if not blocked(cand_rows[n], blocklist)] for o in others]
    tops = sorted({o[0][1] for o in others if o})
    top_keys = {r["id"]: r["key"] for r in fetch_rows(tops, registry, cfg.storage, columns=["key"]).to_pylist()} if tops else {}
    out = {"run_id": [], "sample_key": [], "top1_score": [], "top1_key": [], "top1_score_no_dups": [], "near_dup_count": []}
    for i, o in zip(ids, others):
        no_dups = [sc for sc, n in o if n not in dups[i]]
        out["run_id"].append(cfg.run_id)
        out["sample_key"].append(rows[i]["key"])
        out["top1_score"].append(o[0][0] if o else None)
        out["top1_key"].append(top_keys[o[0][1]] if o else None)
        out["top1_score_no_dups"].append(no_dups[0] if no_dups else None)
        out["near_dup_count"].append(len(dups[i]))
    return out, self_recall


def in_subset(row: dict[str, Any], subset: set[str] | None) -> bool | None:
    if subset is None:
        return None
    return row.get("key") in subset or row.get("url") in subset


def write_results(cfg, out, queries, picks, groups, boxes, baseline, identity, subset, registry, storage, calibrated):
    import io as _io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.io import atomic_output
    from pipeline.schema import baseline_schema, matches_schema, queries_schema

    tau = cfg.replication_threshold
    id_keys = {}
    group_ids = sorted({n for pairs in groups.values() for _, n in pairs})
    if group_ids:
        from pipeline.index.registry import fetch_rows

        id_keys = {r["id"]: r["key"] for r in fetch_rows(group_ids, registry, storage, columns=["key"]).to_pylist()}
    m_rows, q_rows = [], []
    for q, cands in zip(queries, picks):
        for rank, c in enumerate(cands, start=1):
            (shard, row), = registry.shard_rows([c.id])
            dup_ids = sorted({n for s, n in groups.get(c.id, []) if s >= cfg.duplicate_threshold} | {c.id})
            m_rows.append({
                "run_id": cfg.run_id, "query_key": q.key, "prompt": q.prompt, "rank": rank,
                "match_key": c.row["key"], "shard": shard, "row": row,
                "url": c.row["url"], "caption": c.row["caption"], "tar_url": c.row["tar_url"],
                "tar_offset": c.row["tar_offset"], "tar_size": c.row["tar_size"],
                "score_index": c.score_index, "score_exact": c.score_exact, "score_rerank": c.score_rerank,
                "score": c.score, "region": c.region, "region_box": list(boxes[c.region]),
                "in_subset": in_subset(c.row, subset), "inliers": c.inliers, "verify_score": c.verify_score,
                "query_box": list(c.query_box) if c.query_box else None,
                "match_box": list(c.match_box) if c.match_box else None,
                "dup_group": id_keys.get(dup_ids[0], c.row["key"]), "dup_group_size": len(dup_ids),
                "embedder": identity["embedder"] + ":" + identity["model"], "preprocess": identity["preprocess"],
            })
        inside = [c.score for c in cands if in_subset(c.row, subset)]
        outside = [c.score for c in cands if subset is not None and not in_subset(c.row, subset)]
        best = cands[0] if cands else None
        best_score = max((c.score for c in cands), default=None)
        thumb = q.image.copy()
        thumb.thumbnail((256, 256))
        buf = _io.BytesIO()
        thumb.save(buf, format="JPEG", quality=85)
        q_rows.append({
            "run_id": cfg.run_id, "query_key": q.key, "prompt": q.prompt, "source": q.source,
            "thumbnail": buf.getvalue(), "width": q.image.width, "height": q.image.height,
            "best_score": best_score, "best_match_key": best.row["key"] if best else None,
            "best_score_in_subset": max(inside, default=None),
            "best_score_outside_subset": max(outside, default=None),
            "replicated": bool(best_score is not None and best_score >= tau),
            "copy_outside_subset_only": bool(outside and max(outside) >= tau and max(inside, default=-1) < tau),
        })
    for name, rows, sch in (("matches.parquet", m_rows, matches_schema()), ("queries.parquet", q_rows, queries_schema())):
        table = pa.Table.from_pylist(rows, schema=sch)
        with atomic_output(join(out, name), storage) as f:
            pq.write_table(table, f)
    with atomic_output(join(out, "baseline.parquet"), storage) as f:
        pq.write_table(pa.Table.from_pydict(baseline, schema=baseline_schema()), f)


def run_record(cfg, manifest, identity, queries, counters, blocklist, subset, calibrated, self_recall, seconds,
               storage):
    from pipeline.index.registry import list_complete_shards

    attempted, failures = 0, {}
    for name in list_complete_shards(manifest["embeddings"], storage):
        st = read_json(join(manifest["embeddings"], f"{name}.stats.json"), storage)
        attempted += int(st["seen"])
        for k, v in st["failed"].items():
            failures[k] = failures.get(k, 0) + int(v)
    settings = to_dict(cfg)
    settings["storage"] = {k: v for k, v in settings["storage"].items() if k not in ("key", "secret")}
    return {
        "run_id": cfg.run_id,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "seconds": round(seconds, 2),
        "queries": len(queries),
        "embedder": identity,
        "settings": settings,
        "rerank": {"embedder": cfg.rerank.name or None, "top": cfg.rerank_top if cfg.rerank.name else 0},
        "verify": {"top": cfg.verify_top},
        "thresholds": {"replication": cfg.replication_threshold, "duplicate": cfg.duplicate_threshold,
                       "calibrated": calibrated},
        "fpr": cfg.fpr,
        "index": {"url": cfg.index, "factory": manifest["factory"], "ntotal": manifest["ntotal"],
                  "nprobe": cfg.nprobe, "estimated_recall": self_recall,
                  "estimated_recall_method": "share of baseline corpus vectors retrieved as themselves "
                                             "within the candidates, after exact rerank"},
        "coverage": {"samples_attempted": attempted, "vectors_indexed": manifest["ntotal"],
                     "failures_by_reason": failures},
        "blocklist": {"entries": len(blocklist), "dropped_matches": counters["blocked"]},
        "subset": {"source": cfg.subset, "size": len(subset) if subset is not None else None},
        "pixels_fetched": counters["pixels_fetched"],
    }


class Steps:
    """Prints each step with its duration (rich status spinner while it runs)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def step(self, what: str):
        from contextlib import contextmanager

        @contextmanager
        def run():
            t = time.time()
            if not self.enabled:
                yield
                return
            from rich.console import Console

            console = Console(stderr=True)
            with console.status(what + " ..."):
                yield
            console.print(f"[green]done[/green] {what} ({time.time() - t:.1f}s)")

        return run()
