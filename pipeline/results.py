"""A finished search as the run's tables and record (files named by pipeline/layout/runs.py).

``matches`` holds one row per query x rank, ``queries`` one row per generated image (with a
small JPEG thumbnail, so the gallery needs nothing else to show it); search writes them a batch
of queries at a time. ``run.json`` records what the run was asked, used and covered.
"""
from __future__ import annotations

import datetime as dt
import io
from typing import TYPE_CHECKING, Any

from pipeline.config import to_dict
from pipeline.layout.runs import MATCHES, QUERIES, RunRecord
from pipeline.nl2 import ALPHA as NL2_ALPHA
from pipeline.nl2 import SIZE as NL2_SIZE

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


def caption_columns(plan: "SearchPlan", pairs: list[tuple[str | None, str | None]], embedder) -> dict[str, list]:
    """Per (prompt, caption) of each match: the caption's counts in the corpus (when the run has
    caption counts) and the prompt against the caption (pipeline/prompts.py)."""
    from pipeline.captions import caption_keys, lookup
    from pipeline.prompts import exact_match, text_similarity, token_overlap

    prompts = [p for p, _ in pairs]
    captions = [c for _, c in pairs]
    counts = lookup(plan.captions, caption_keys(captions)) if plan.captions is not None else [None] * len(pairs)
    return {
        "caption_count": [c["caption_count"] if c else None for c in counts],
        "caption_count_normalized": [c["normalized_count"] if c else None for c in counts],
        "prompt_caption_exact": [exact_match(p, c) for p, c in pairs],
        "prompt_caption_overlap": [token_overlap(p, c) for p, c in pairs],
        "prompt_caption_clip": text_similarity(embedder, prompts, captions),
    }


def result_rows(plan: "SearchPlan", queries, picks: list[list["Candidate"]], groups, boxes,
                identity: dict[str, Any], subset: set[str] | None, registry, embedder=None) -> dict[str, list[dict[str, Any]]]:
    """The rows of one batch of queries: ``matches`` (the best ``top_k`` of each query's ranked
    candidates) and ``queries`` (the similarity maxima over all its candidates)."""
    from pipeline.layout.runs import RERANK_COLUMNS
    from pipeline.search import rows_by_id

    cfg, run_id = plan.cfg, plan.run_id
    tau = cfg.replication_threshold
    id_keys = {i: r["key"] for i, r in
               rows_by_id(sorted({n for pairs in groups.values() for _, n in pairs}), registry, ["key"]).items()}
    m_rows, q_rows = [], []
    for q, cands, regions in zip(queries, picks, boxes):
        for rank, c in enumerate(cands[: cfg.top_k], start=1):
            (shard, row), = registry.shard_rows([c.id])
            dup_ids = sorted({n for s, n in groups.get(c.id, []) if s >= cfg.duplicate_threshold} | {c.id})
            m_rows.append({
                "run_id": run_id, "query_key": q.key, "prompt": q.prompt, "rank": rank,
                "match_key": c.row["key"], "shard": shard, "row": row,
                "url": c.row["url"], "caption": c.row["caption"], "tar_url": c.row["tar_url"],
                "tar_offset": c.row["tar_offset"], "tar_size": c.row["tar_size"],
                "score_index": c.score_index, "score_exact": c.score_exact, "score_whole": c.score_whole,
                "score_rerank": c.score_rerank,
                "similarity": c.similarity, "score": c.score,
                **{column: c.scores.get(name) for name, column in RERANK_COLUMNS.items()},
                "nl2": c.nl2, "nl2_references": c.nl2_references,
                "region": c.region, "region_box": list(regions[c.region]),
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
    extra = caption_columns(plan, [(m["prompt"], m["caption"]) for m in m_rows], embedder)
    for i, m in enumerate(m_rows):
        m.update({column: values[i] for column, values in extra.items()})
    return {MATCHES: m_rows, QUERIES: q_rows}


def caption_record(plan: "SearchPlan") -> dict[str, Any] | None:
    """What run.json says of the caption counts the matches were joined to."""
    if plan.captions is None:
        return None
    from pipeline.layout.embeddings import EmbeddingsFolder

    info = plan.captions.read_info()
    corpus = len(EmbeddingsFolder(plan.manifest.embeddings, plan.index.storage).complete_shards())
    return {"url": plan.captions.url, "normalization": info.normalization, "rows": info.rows,
            "distinct_captions": info.distinct_captions, "distinct_normalized": info.distinct_normalized,
            "shards": info.shards, "corpus_shards": corpus}


def run_record(plan: "SearchPlan", identity: dict[str, Any], n_queries: int, counters: dict[str, Any],
               blocklist: set[str], subset: set[str] | None, calibrated: float | None, self_recall: float | None,
               nprobe: int, seconds: float, score_model: dict[str, Any] | None = None, stage=None) -> RunRecord:
    """``run.json``: settings, thresholds, index and coverage of one run."""
    from pipeline.layout.embeddings import EmbeddingsFolder
    from pipeline.layout.runs import SCORE_VERSION
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
        label=cfg.label or None,
        score_version=SCORE_VERSION,
        embedder=identity,
        settings=settings,
        rerank={"embedder": stage.primary.name if stage else None, "top": cfg.rerank_top if stage else 0,
                "descriptors": stage.identities() if stage else []},
        nl2={"neighbours": cfg.nl2_neighbours, "alpha": NL2_ALPHA, "pixels": f"{NL2_SIZE}x{NL2_SIZE} RGB in [0, 1]",
             "references": "the query's best candidates by similarity"} if cfg.nl2_neighbours else None,
        captions=caption_record(plan),
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
        stage_seconds=counters.get("stage_seconds", {}),
        unreadable_queries=[{"source": src, "error": why} for src, why in counters["unreadable_queries"][:100]],
    )
