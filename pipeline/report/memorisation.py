"""What the papers trace memorisation to, per run: nL2 tails, replication by caption duplication and by
prompt-caption match, and the training images copied most often.

* nL2 (Carlini et al. 2023; pipeline/nl2.py): each generation's smallest nL2 over its matches (its
  closest copy in pixels; small = copy). AMG (Chen et al. 2024) tabulates the tail of a
  measure on the copying side: the 95th percentile and the maximum of SSCD similarity (large =
  copy). For nL2 the copying side is the low end, so the 5th percentile and the minimum are given,
  with the 95th percentile and the maximum beside them.
* Caption duplication (Somepalli et al. 2023; AMG): a generation's replication (its best similarity
  >= the replication threshold) against how many training rows carry the caption of its most
  similar match, after normalisation: buckets 1, 2-9, 10-99, 100+.
* Prompt vs caption: the same replication against whether the prompt equals that caption after
  normalisation, shares at least half of its words (Jaccard >= 0.5), or neither.

Each rate comes with its 95% Wilson interval (pipeline/report/stats.py).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.layout.runs import RunData
from pipeline.report.stats import finite, proportion

#: caption-duplication buckets: (label, smallest count, largest count or None)
DUP_BUCKETS = (("1", 1, 1), ("2-9", 2, 9), ("10-99", 10, 99), ("100+", 100, None))
#: word overlap (Jaccard) from which a prompt counts as sharing its match's caption
OVERLAP = 0.5
#: training images listed as the most copied
MOST_COPIED = 12


def dup_bucket(count: int | None) -> str:
    if count is None:
        return "not counted"
    for label, low, high in DUP_BUCKETS:
        if count >= low and (high is None or count <= high):
            return label
    return "not counted"


def prompt_bucket(match: dict[str, Any]) -> str:
    if match.get("prompt_caption_exact") is None:
        return "no prompt or no caption"
    if match["prompt_caption_exact"]:
        return "prompt = caption"
    if (match.get("prompt_caption_overlap") or 0) >= OVERLAP:
        return f"shares >= {OVERLAP:.0%} of words"
    return "different"


def most_similar_match(data: RunData) -> dict[str, dict[str, Any]]:
    """Each query's match with the largest similarity (ties: the better rank)."""
    out: dict[str, dict[str, Any]] = {}
    for m in data.matches.to_pylist():
        if m.get("similarity") is None:
            continue
        have = out.get(m["query_key"])
        if have is None or (m["similarity"], -m["rank"]) > (have["similarity"], -have["rank"]):
            out[m["query_key"]] = m
    return out


def rates_by(groups: dict[str, list[bool]], order: list[str]) -> list[dict[str, Any]]:
    return [{"group": g, **proportion(groups[g])} for g in order if g in groups]


def nl2_tails(data: RunData) -> dict[str, Any] | None:
    """Statistics of each query's smallest nL2 (None when the run computed none)."""
    best: dict[str, float] = {}
    for key, value in zip(data.matches.column("query_key").to_pylist(), data.matches.column("nl2").to_pylist()):
        if value is not None and np.isfinite(value):
            best[key] = min(best.get(key, np.inf), float(value))
    arr = finite(list(best.values()))
    if not len(arr):
        return None
    return {"n": int(arr.size), "mean": float(arr.mean()), "p5": float(np.percentile(arr, 5)),
            "min": float(arr.min()), "p95": float(np.percentile(arr, 95)), "max": float(arr.max()),
            "statistic": "per generation, the smallest nL2 over its matches (small = copy)"}


def memorisation(data: RunData, threshold: float) -> dict[str, Any]:
    """Replication by caption duplication and by prompt-caption match, and the most copied images."""
    best = most_similar_match(data)
    by_dup: dict[str, list[bool]] = {}
    by_prompt: dict[str, list[bool]] = {}
    for q in data.queries.to_pylist():
        m = best.get(q["query_key"])
        if m is None:
            continue
        replicated = q["best_similarity"] is not None and q["best_similarity"] >= threshold
        by_dup.setdefault(dup_bucket(m.get("caption_count_normalized")), []).append(replicated)
        by_prompt.setdefault(prompt_bucket(m), []).append(replicated)
    return {
        "threshold": threshold,
        "by_caption_duplication": rates_by(by_dup, [b[0] for b in DUP_BUCKETS] + ["not counted"]),
        "by_prompt_caption": rates_by(by_prompt, ["prompt = caption", f"shares >= {OVERLAP:.0%} of words",
                                                  "different", "no prompt or no caption"]),
        "most_copied": most_copied(data, threshold),
    }


def most_copied(data: RunData, threshold: float, top: int = MOST_COPIED) -> list[dict[str, Any]]:
    """Training images (near-duplicates counted as one) copied by the most generations at ``threshold``."""
    groups: dict[str, dict[str, Any]] = {}
    for m in data.matches.to_pylist():
        if m.get("similarity") is None or m["similarity"] < threshold:
            continue
        image = m["dup_group"] or m["match_key"]
        g = groups.setdefault(image, {"image": image, "queries": set(), "best_similarity": m["similarity"],
                                      "match": m})
        g["queries"].add(m["query_key"])
        if m["similarity"] > g["best_similarity"]:
            g["best_similarity"], g["match"] = m["similarity"], m
    ranked = sorted(groups.values(), key=lambda g: (-len(g["queries"]), -g["best_similarity"], g["image"]))[:top]
    out = []
    for g in ranked:
        m = g["match"]
        out.append({"image": g["image"], "match_key": m["match_key"], "copying_generations": len(g["queries"]),
                    "best_similarity": g["best_similarity"], "training_copies": m["dup_group_size"],
                    "caption": m["caption"], "caption_count_normalized": m.get("caption_count_normalized"),
                    "url": m["url"], "tar_url": m["tar_url"], "tar_offset": m["tar_offset"],
                    "tar_size": m["tar_size"], "in_subset": m["in_subset"]})
    return out
