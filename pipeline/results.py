"""A finished search as the run's tables and record (files named by pipeline/layout/runs.py).

``matches`` holds one row per query x rank, ``queries`` one row per generated image (with a
small JPEG thumbnail, so the gallery needs nothing else to show it), ``baseline`` the corpus
self-similarity sample; ``run.json`` records what the run was asked, used and covered.
"""
from __future__ import annotations

import datetime as dt
import io
from typing import TYPE_CHECKING, Any

from pipeline.config import to_dict
from pipeline.layout.runs import BASELINE, MATCHES, QUERIES, RunRecord

if TYPE_CHECKING:
    from pipeline.search import Candidate, SearchPlan


def in_subset(row: dict[str, Any], subset: set[str] | None) -> bool | None:
    if subset is None:
        return None
    return row.get("key") in subset or row.get("url") in subset


def thumbnail(image, side: int = 256) -> bytes:
    thumb = image.copy()
    thumb.thumbnail((side, side))
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def write_results(plan: "SearchPlan", queries, picks: list[list["Candidate"]], groups, boxes, baseline,
                  identity: dict[str, Any], subset: set[str] | None, registry) -> None:
    """Write ``matches`` (the best ``top_k`` of each query's ranked candidates), ``queries`` (the
    similarity maxima over all its candidates) and ``baseline`` of one run."""
    from pipeline.search import rows_by_id

    cfg, run_id = plan.cfg, plan.run_id
    tau = cfg.replication_threshold
    id_keys = {i: r["key"] for i, r in
               rows_by_id(sorted({n for pairs in groups.values() for _, n in pairs}), registry, ["key"]).items()}
    m_rows, q_rows = [], []
    for q, cands in zip(queries, picks):
        for rank, c in enumerate(cands[: cfg.top_k], start=1):
            (shard, row), = registry.shard_rows([c.id])
            dup_ids = sorted({n for s, n in groups.get(c.id, []) if s >= cfg.duplicate_threshold} | {c.id})
            m_rows.append({
                "run_id": run_id, "query_key": q.key, "prompt": q.prompt, "rank": rank,
                "match_key": c.row["key"], "shard": shard, "row": row,
                "url": c.row["url"], "caption": c.row["caption"], "tar_url": c.row["tar_url"],
                "tar_offset": c.row["tar_offset"], "tar_size": c.row["tar_size"],
                "score_index": c.score_index, "score_exact": c.score_exact, "score_rerank": c.score_rerank,
                "similarity": c.similarity, "score": c.score, "region": c.region, "region_box": list(boxes[c.region]),
                "in_subset": in_subset(c.row, subset), "inliers": c.inliers, "tentative_matches": c.matches,
                "verify_score": c.verify_score,
                "query_box": list(c.query_box) if c.query_box else None,
                "match_box": list(c.match_box) if c.match_box else None,
                "dup_group": id_keys.get(dup_ids[0], c.row["key"]), "dup_group_size": len(dup_ids),
                "embedder": identity["embedder"] + ":" + identity["model"], "preprocess": identity["preprocess"],
            })
        # Ranked by final score: rank 1 is the best final score; similarities are maxima.
        inside = [c for c in cands if in_subset(c.row, subset)]
        outside = [c for c in cands if subset is not None and not in_subset(c.row, subset)]
        best = cands[0] if cands else None
        sim_in = max((c.similarity for c in inside), default=None)
        sim_out = max((c.similarity for c in outside), default=None)
        best_similarity = max((c.similarity for c in cands), default=None)
        q_rows.append({
            "run_id": run_id, "query_key": q.key, "prompt": q.prompt, "source": q.source,
            "thumbnail": thumbnail(q.image), "width": q.image.width, "height": q.image.height,
            "best_score": best.score if best else None, "best_match_key": best.row["key"] if best else None,
            "best_score_in_subset": inside[0].score if inside else None,
            "best_score_outside_subset": outside[0].score if outside else None,
            "best_similarity": best_similarity, "best_similarity_in_subset": sim_in,
            "best_similarity_outside_subset": sim_out,
            # The paper's definitions: descriptor similarity at the replication threshold.
            "replicated": bool(best_similarity is not None and best_similarity >= tau),
            "copy_outside_subset_only": bool(sim_out is not None and sim_out >= tau and (sim_in is None or sim_in < tau)),
        })
    plan.run.write_table(MATCHES, m_rows)
    plan.run.write_table(QUERIES, q_rows)
    plan.run.write_table(BASELINE, baseline)


def run_record(plan: "SearchPlan", identity: dict[str, Any], n_queries: int, counters: dict[str, int],
               blocklist: set[str], subset: set[str] | None, calibrated: float | None, self_recall: float | None,
               nprobe: int, seconds: float, score_model: dict[str, Any] | None = None) -> RunRecord:
    """``run.json``: settings, thresholds, index and coverage of one run."""
    from pipeline.layout.embeddings import EmbeddingsFolder
    from pipeline.verify import DEFAULT_METHOD

    cfg, manifest = plan.cfg, plan.manifest
    folder = EmbeddingsFolder(manifest.embeddings, plan.index.storage)
    attempted, failures = 0, {}
    for name in folder.complete_shards():
        stats = folder.read_stats(name)
        attempted += int(stats.seen)
        for k, v in stats.failed.items():
            failures[k] = failures.get(k, 0) + int(v)
    settings = to_dict(cfg)
    settings["run_id"] = plan.run_id
    settings["nprobe"] = nprobe
    settings["rerank_depth"] = plan.rerank_depth
    settings["embedder"] = to_dict(plan.embedder)
    return RunRecord(
        run_id=plan.run_id,
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(),
        seconds=round(seconds, 2),
        queries=n_queries,
        embedder=identity,
        settings=settings,
        rerank={"embedder": cfg.rerank.name or None, "top": cfg.rerank_top if cfg.rerank.name else 0},
        verify={"top": cfg.verify_top, "method": DEFAULT_METHOD},
        thresholds={"replication": cfg.replication_threshold, "duplicate": cfg.duplicate_threshold,
                    "calibrated": calibrated},
        score_model=score_model,
        fpr=cfg.fpr,
        index={"url": cfg.index, "factory": manifest.factory, "ntotal": manifest.ntotal, "nprobe": nprobe,
               "rerank_depth": plan.rerank_depth, "settings_from": plan.settings_from, "tuned": manifest.tuned,
               "estimated_recall": self_recall,
               "estimated_recall_method": "share of baseline corpus vectors retrieved as themselves "
                                          "within the candidates, after exact rerank"},
        coverage={"samples_attempted": attempted, "vectors_indexed": manifest.ntotal, "failures_by_reason": failures},
        blocklist={"entries": len(blocklist), "dropped_matches": counters["blocked"]},
        subset={"source": cfg.subset, "size": len(subset) if subset is not None else None},
        pixels_fetched=counters["pixels_fetched"],
        unreadable_queries=[{"source": src, "error": why} for src, why in counters["unreadable_queries"][:100]],
    )
