"""``summary.json``: every figure of a run, computed from its tables (definitions in docs/RESULTS.md)."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import numpy as np

from pipeline.layout.runs import BASELINE, RUN_JSON, RunData, RunSummary
from pipeline.report.stats import at_least, calibrate_threshold, exceedance_rate, finite, proportion, score_stats

#: The paper's thresholds (SSCD descriptor), used when run.json does not name its own. They
#: apply to the descriptor similarity columns; every other threshold (the calibrated one) to
#: the final score.
DEFAULT_THRESHOLDS = {"replication": 0.5, "duplicate": 0.95}


def score_column(threshold: str) -> str:
    """``similarity`` for the paper's thresholds, ``score`` (the final score) for the others."""
    return "similarity" if threshold in DEFAULT_THRESHOLDS else "score"
DEFAULT_FPR = 0.01

LOWER_BOUND_NOTE = (
    "Measured replication rates are lower bounds: only the indexed vectors were searched "
    "(samples that failed to download, decode or embed are missing), and the approximate "
    "index finds a true nearest neighbour with the estimated recall, not always."
)


def _thresholds(run: dict[str, Any], warnings: list[str]) -> dict[str, float]:
    given = run.get("thresholds") or {}
    out = {}
    for name, default in DEFAULT_THRESHOLDS.items():
        if given.get(name) is None:
            warnings.append(f"{RUN_JSON} names no {name} threshold; using the paper's {default}")
            out[name] = float(default)
        else:
            out[name] = float(given[name])
    for name, value in given.items():
        if name not in out and value is not None:
            out[str(name)] = float(value)
    return out


def summarize(data: RunData) -> RunSummary:
    """Every figure of ``summary.json``, computed from the loaded run."""
    run = data.run.to_json()
    warnings: list[str] = []
    thresholds = _thresholds(run, warnings)
    fpr = float(run.get("fpr") if run.get("fpr") is not None else DEFAULT_FPR)

    q = data.queries
    best = q.column("best_score").to_pylist()
    best_in = q.column("best_score_in_subset").to_pylist()
    best_out = q.column("best_score_outside_subset").to_pylist()
    sim = q.column("best_similarity").to_pylist()
    sim_in = q.column("best_similarity_in_subset").to_pylist()
    sim_out = q.column("best_similarity_outside_subset").to_pylist()

    baseline: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    b_top1: list[float | None] = []
    b_nodup: list[float | None] = []
    b_sim: list[float | None] = []
    b_sim_nodup: list[float | None] = []
    if data.baseline is not None and data.baseline.num_rows:
        b_top1 = data.baseline.column("top1_score").to_pylist()
        b_nodup = data.baseline.column("top1_score_no_dups").to_pylist()
        b_sim = data.baseline.column("top1_similarity").to_pylist()
        b_sim_nodup = data.baseline.column("top1_similarity_no_dups").to_pylist()
        near = finite(data.baseline.column("near_dup_count").to_pylist())
        baseline = {
            "samples": data.baseline.num_rows,
            "top1": score_stats(b_top1),
            "top1_no_dups": score_stats(b_nodup),
            "top1_similarity": score_stats(b_sim),
            "top1_similarity_no_dups": score_stats(b_sim_nodup),
            "samples_with_near_duplicates": int((near > 0).sum()),
            "near_dup_count_mean": float(near.mean()) if len(near) else None,
        }
        if len(finite(b_nodup)):
            t = calibrate_threshold(b_nodup, fpr)
            n_cal = len(finite(b_nodup))
            calibration = {
                "fpr_target": fpr,
                "threshold": t,
                "implied_fpr": exceedance_rate(b_nodup, t),
                "baseline_samples": n_cal,
                "method": "smallest baseline top1_score_no_dups value t with share(score >= t) <= fpr",
            }
            if n_cal * fpr < 10:
                warnings.append(
                    f"the calibrated threshold rests on {n_cal} baseline samples, fewer than 10/fpr = {10 / fpr:.0f}:"
                    " sample more of the corpus for a stable estimate"
                )
        else:
            warnings.append(f"{BASELINE} has no top1_score_no_dups values: no calibrated threshold")
    else:
        warnings.append(f"no {BASELINE} in the run: no calibrated threshold and no false-positive rates")
    if calibration is not None:
        thresholds["calibrated"] = calibration["threshold"]

    replication: dict[str, Any] = {}
    for name, t in thresholds.items():
        on_similarity = score_column(name) == "similarity"
        q_all, q_in, q_out = (sim, sim_in, sim_out) if on_similarity else (best, best_in, best_out)
        b_with, b_without = (b_sim, b_sim_nodup) if on_similarity else (b_top1, b_nodup)
        hit_in, hit_out = at_least(q_in, t), at_least(q_out, t)
        entry: dict[str, Any] = {
            "threshold": t,
            "applies_to": score_column(name),
            "all": proportion(at_least(q_all, t)),
            "in_subset": proportion(hit_in),
            "outside_subset": proportion(hit_out),
            "outside_subset_only": proportion(hit_out & ~hit_in),
        }
        if baseline is not None:
            entry["baseline_fpr"] = proportion(at_least(b_without, t)) if len(finite(b_without)) else None
            entry["baseline_fpr_with_dups"] = proportion(at_least(b_with, t)) if len(finite(b_with)) else None
            baseline.setdefault("rates", {})[name] = {
                "threshold": t,
                "top1": entry["baseline_fpr_with_dups"],
                "top1_no_dups": entry["baseline_fpr"],
            }
        replication[name] = entry

    if data.matches.num_rows:
        dup_sizes = finite(data.matches.column("dup_group_size").to_pylist())
    else:
        dup_sizes = np.zeros(0)
    queries = {
        "count": q.num_rows,
        "with_matches": int(sum(s is not None for s in best)),
        "top1": {"all": score_stats(best), "in_subset": score_stats(best_in), "outside_subset": score_stats(best_out)},
        "top1_similarity": {"all": score_stats(sim), "in_subset": score_stats(sim_in),
                            "outside_subset": score_stats(sim_out)},
        "near_duplicates": int(at_least(sim, thresholds["duplicate"]).sum()),
        "near_duplicates_in_subset": int(at_least(sim_in, thresholds["duplicate"]).sum()),
        "near_duplicates_outside_subset": int(at_least(sim_out, thresholds["duplicate"]).sum()),
        "matched_images_with_training_copies": int((dup_sizes > 1).sum()),
    }

    embedder = run.get("embedder") or {}
    embedder_name = (
        str(embedder.get("embedder") or embedder.get("name") or "") if isinstance(embedder, dict) else str(embedder)
    )
    rerank = run.get("rerank") or {}
    if rerank.get("embedder"):  # the similarity column is the second stage's
        embedder_name = str(rerank["embedder"])
    if "sscd" not in embedder_name.lower():
        warnings.append(
            f"the paper's thresholds (0.5, 0.95) are meaningful for SSCD similarities; this run's similarity is "
            f"{embedder_name or 'an unnamed embedder'}'s: read rates at the calibrated threshold (final score)"
        )

    coverage = dict(run.get("coverage") or {})
    attempted, indexed = coverage.get("samples_attempted"), coverage.get("vectors_indexed")
    coverage["indexed_fraction"] = (indexed / attempted) if attempted and indexed is not None else None
    coverage["lower_bound"] = True
    coverage["note"] = LOWER_BOUND_NOTE
    index = dict(run.get("index") or {})
    if index.get("estimated_recall") is None:
        warnings.append(f"{RUN_JSON} gives no estimated index recall: the search's miss rate is unknown")

    from pipeline.report.memorisation import memorisation, nl2_tails

    nl2 = nl2_tails(data)
    captions = run.get("captions") or {}
    if captions.get("corpus_shards") and (captions.get("shards") or 0) < captions["corpus_shards"]:
        warnings.append(f"the caption counts cover {captions.get('shards')} of the corpus's {captions['corpus_shards']} "
                        "embedding shards: run `replica captions` again to count the new ones")
    if run.get("nl2") and nl2 is None:
        warnings.append("nL2 was asked for but no match has one (no match pixels could be fetched)")
    return RunSummary(
        run_id=data.run_id,
        run_url=data.url,
        created_at=run.get("created_at"),
        reported_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        embedder=embedder,
        rerank=run.get("rerank"),
        verify=run.get("verify"),
        thresholds=thresholds,
        fpr=fpr,
        calibration=calibration,
        queries=queries,
        replication=replication,
        baseline=baseline,
        coverage=coverage,
        index=index,
        blocklist=run.get("blocklist"),
        subset=run.get("subset"),
        warnings=warnings,
        nl2={**nl2, **(run.get("nl2") or {})} if nl2 else None,
        memorisation=memorisation(data, thresholds["replication"]),
    )


def summary_lines(summary: RunSummary) -> list[str]:
    """The headline figures of a summary, as the CLI prints them."""
    q = summary.queries
    lines = [f"run {summary.run_id}: {q['count']} queries"]
    for name, entry in summary.replication.items():
        r = entry["all"]
        if r["rate"] is None:
            continue
        lo, hi = r["ci95"]
        lines.append(
            f"  {name:<12} >= {entry['threshold']:.3f}: {100 * r['rate']:.2f}% [{100 * lo:.2f}, {100 * hi:.2f}]"
            f" ({r['count']}/{r['n']}), copy only outside subset {100 * entry['outside_subset_only']['rate']:.2f}%"
        )
    if summary.nl2:
        n = summary.nl2
        lines.append(f"  nL2 (smallest per generation, small = copy): p5 {n['p5']:.3f}, min {n['min']:.3f}, "
                     f"p95 {n['p95']:.3f}, max {n['max']:.3f} (n={n['n']})")
    for entry in (summary.memorisation or {}).get("by_caption_duplication", []):
        if entry["group"] != "not counted":
            lo, hi = entry["ci95"]
            lines.append(f"  caption on {entry['group']:>6} training image(s): {100 * entry['rate']:.2f}% replicated "
                         f"[{100 * lo:.2f}, {100 * hi:.2f}] ({entry['count']}/{entry['n']})")
    lines.extend(f"  warning: {w}" for w in summary.warnings)
    lines.extend(f"  wrote {url}" for url in summary.outputs.values())
    return lines
