"""`replica compare`: several search runs side by side, the table Somepalli et al. and AMG print.

One row per run (a model, prompt set or mitigation setting, named by the run's ``label``):
queries; mean / 95th percentile / max of the top-1 similarity per descriptor; the share of
generations at or above 0.5 and at or above the run's calibrated threshold, with 95% Wilson
intervals; the nL2 tails; the generations whose copy was found only outside the subset.

A figure is only put side by side with another when it means the same thing in both runs: a
descriptor's columns are filled only when every run compared has that descriptor with the same
identity and preprocessing; the share >= 0.5 (on the descriptor similarity, as the paper
defines it) only when every run's similarity comes from the same descriptor; the share >= the
calibrated threshold (on the final score) only when every run's final score was made the same
way (score version, score model, similarity). Otherwise the cells stay empty and a note says why.
"""
from __future__ import annotations

import io
import json
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.errors import ConfigError
from pipeline.layout.runs import RunData, RunFolder, score_version_of
from pipeline.report.stats import at_least, finite, proportion, score_stats
from pipeline.storage import Storage

#: the paper's replication threshold (Somepalli et al.), compared across runs as is
PAPER_THRESHOLD = 0.5


@dataclass
class Descriptor:
    """One similarity a run scored its matches with: which column, made by what."""

    name: str
    column: str
    identity: dict[str, Any]


@dataclass
class Comparison:
    rows: list[dict[str, Any]]
    #: descriptor names whose columns are filled (shared by every run)
    descriptors: list[str]
    #: why a column is empty, one line each
    notes: list[str] = field(default_factory=list)
    #: per run label: top-1 scores of the descriptor drawn in the histogram (None: not comparable)
    histogram: tuple[str, dict[str, list[float]]] | None = None


def descriptors_of(data: RunData) -> list[Descriptor]:
    """The descriptors of a run, from its run.json: the index's (``score_exact``) and its second stage."""
    run = data.run
    out = [Descriptor("exact", "score_exact", dict(run.embedder or {}))]
    rerank = run.rerank or {}
    for entry in rerank.get("descriptors") or []:
        out.append(Descriptor(entry["name"], entry["column"], dict(entry.get("identity") or {})))
    if not rerank.get("descriptors") and rerank.get("embedder"):
        # one second stage in score_rerank: identified by its settings as the run recorded them
        settings = (run.settings or {}).get("rerank") or {}
        out.append(Descriptor(str(rerank["embedder"]), "score_rerank",
                              dict(rerank.get("identity") or {"settings": settings})))
    return out


def similarity_identity(data: RunData) -> dict[str, Any]:
    """The descriptor the ``similarity`` column comes from: the second stage's first, else the index's."""
    descriptors = descriptors_of(data)
    d = descriptors[1] if len(descriptors) > 1 else descriptors[0]
    return {"name": d.name, "identity": d.identity}


def final_score_identity(data: RunData) -> dict[str, Any]:
    """What the final ``score`` column is made of: the score version, the score model and the similarity."""
    model = data.run.score_model or {}
    return {"score_version": score_version_of(data.run), "score_model": model.get("sha256"),
            "similarity": similarity_identity(data)}


def differs(values: list[Any]) -> bool:
    keys = [json.dumps(v, sort_keys=True, default=str) for v in values]
    return len(set(keys)) > 1


def top1_per_query(data: RunData, column: str) -> list[float]:
    """Each query's best value of a match column (queries without a value are left out)."""
    m = data.matches
    if column not in m.column_names or not m.num_rows:
        return []
    best: dict[str, float] = {}
    for key, value in zip(m.column("query_key").to_pylist(), m.column(column).to_pylist()):
        if value is not None and not np.isnan(value):
            best[key] = max(best.get(key, -np.inf), float(value))
    return list(best.values())


def nl2_per_query(data: RunData) -> list[float]:
    """Each query's smallest nL2 over its matches (its closest copy in pixels), where computed."""
    m = data.matches
    if "nl2" not in m.column_names:
        return []
    best: dict[str, float] = {}
    for key, value in zip(m.column("query_key").to_pylist(), m.column("nl2").to_pylist()):
        if value is not None and np.isfinite(value):
            best[key] = min(best.get(key, np.inf), float(value))
    return list(best.values())


def compare_runs(runs: list[RunData], labels: list[str | None] | None = None) -> Comparison:
    """The comparison table of ``runs`` (labels override the runs' own)."""
    if not runs:
        raise ConfigError("nothing to compare: give at least one run folder")
    labels = list(labels or [None] * len(runs))
    if len(labels) != len(runs):
        raise ConfigError(f"{len(labels)} --label value(s) for {len(runs)} run(s): give one per run, in order")
    notes: list[str] = []
    names = [f"{d.run_id}" for d in runs]
    per_run = [{d.name: d for d in descriptors_of(data)} for data in runs]
    shared = [n for n in per_run[0] if all(n in p for p in per_run)]
    for name in sorted({n for p in per_run for n in p} - set(shared)):
        have = [r for r, p in zip(names, per_run) if name in p]
        notes.append(f"{name}: only in run(s) {', '.join(have)}; its columns are empty")
    filled = []
    for name in shared:
        idents = [p[name].identity for p in per_run]
        if differs(idents):
            keys = sorted({k for i in idents for k in i if differs([i.get(k) for i in idents])})
            notes.append(f"{name}: the runs' descriptors differ ({', '.join(keys)}); its columns are empty")
        else:
            filled.append(name)
    similarity_same = not differs([similarity_identity(d) for d in runs])
    if not similarity_same:
        notes.append(f"share >= {PAPER_THRESHOLD}: the runs' similarities come from different descriptors; empty")
    score_same = not differs([final_score_identity(d) for d in runs])
    if not score_same:
        versions = sorted({str(score_version_of(d.run)) for d in runs})
        why = (f"score versions {', '.join(versions)}" if len(versions) > 1
               else "different score models or similarities")
        notes.append(f"share >= the calibrated threshold: runs scored differently ({why}); empty")

    rows = []
    for data, label in zip(runs, labels):
        run = data.run
        row: dict[str, Any] = {
            "run_id": data.run_id,
            "label": label or run.label or (run.settings or {}).get("label") or data.run_id,
            "queries": data.queries.num_rows,
            "score_version": score_version_of(run),
        }
        for name in filled:
            stats = score_stats(top1_per_query(data, per_run[0][name].column))
            row.update({f"top1_{name}_{k}": stats[k] for k in ("mean", "p95", "max")})
        calibrated = (run.thresholds or {}).get("calibrated")
        for key, column, t, same in (("paper", "best_similarity", PAPER_THRESHOLD, similarity_same),
                                     ("calibrated", "best_score", calibrated, score_same)):
            share = proportion(at_least(data.queries.column(column).to_pylist(), t)) if same and t is not None else None
            row[f"share_{key}_threshold"] = t if same else None
            row[f"share_{key}"] = share["rate"] if share else None
            row[f"share_{key}_low"], row[f"share_{key}_high"] = (share["ci95"] or [None, None]) if share else (None, None)
            row[f"share_{key}_count"] = share["count"] if share else None
        nl2 = finite(nl2_per_query(data))
        row.update({"nl2_p5": float(np.percentile(nl2, 5)) if len(nl2) else None,
                    "nl2_min": float(nl2.min()) if len(nl2) else None,
                    "nl2_p95": float(np.percentile(nl2, 95)) if len(nl2) else None,
                    "nl2_max": float(nl2.max()) if len(nl2) else None})
        if (run.subset or {}).get("source"):
            only = proportion(data.queries.column("copy_outside_subset_only").to_pylist())
            row.update({"outside_only_count": only["count"], "outside_only": only["rate"],
                        "outside_only_low": (only["ci95"] or [None])[0], "outside_only_high": (only["ci95"] or [None, None])[1]})
        else:
            row.update({"outside_only_count": None, "outside_only": None, "outside_only_low": None,
                        "outside_only_high": None})
        rows.append(row)
    no_nl2 = [r["run_id"] for r in rows if r["nl2_min"] is None]
    if no_nl2:
        notes.append(f"nL2: not computed in run(s) {', '.join(no_nl2)}")
    no_subset = [r["run_id"] for r in rows if r["outside_only"] is None]
    if no_subset:
        notes.append(f"copies only outside the subset: run(s) {', '.join(no_subset)} searched without a subset")

    histogram = None
    drawn = "similarity" if similarity_same else next(iter(filled), None)
    if drawn is not None:
        column = "similarity" if drawn == "similarity" else per_run[0][drawn].column
        histogram = (drawn, {row["label"]: top1_per_query(data, column) for row, data in zip(rows, runs)})
    else:
        notes.append("histogram: no similarity is shared by every run; not drawn")
    return Comparison(rows=rows, descriptors=filled, notes=notes, histogram=histogram)


def load_runs(urls: list[str], storage: Storage | None = None) -> list[RunData]:
    return [RunFolder(url, storage).load() for url in urls]


# --------------------------------------------------------------------------- renderings


def _pct(rate: float | None, low: float | None = None, high: float | None = None) -> str:
    if rate is None:
        return ""
    text = f"{100 * rate:.2f}%"
    return f"{text} [{100 * low:.2f}, {100 * high:.2f}]" if low is not None and high is not None else text


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def table_cells(c: Comparison) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the comparison as text (terminal and Markdown show the same)."""
    header = ["run", "label", "queries"]
    for name in c.descriptors:
        header += [f"{name} mean", f"{name} p95", f"{name} max"]
    header += [f"share >= {PAPER_THRESHOLD}", "share >= calibrated", "nL2 p95", "nL2 max", "nL2 p5", "nL2 min",
               "copy only outside subset"]
    cells = []
    for r in c.rows:
        line = [r["run_id"], str(r["label"]), f"{r['queries']:,}"]
        for name in c.descriptors:
            line += [_num(r[f"top1_{name}_{k}"]) for k in ("mean", "p95", "max")]
        cal = r["share_calibrated"]
        line += [_pct(r["share_paper"], r["share_paper_low"], r["share_paper_high"]),
                 (_pct(cal, r["share_calibrated_low"], r["share_calibrated_high"])
                  + (f" (t={r['share_calibrated_threshold']:.3f})" if cal is not None else "")),
                 _num(r["nl2_p95"]), _num(r["nl2_max"]), _num(r["nl2_p5"]), _num(r["nl2_min"]),
                 _pct(r["outside_only"], r["outside_only_low"], r["outside_only_high"])]
        cells.append(line)
    return header, cells


def to_markdown(c: Comparison) -> str:
    header, cells = table_cells(c)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(x.replace("|", "\\|") for x in line) + " |" for line in cells]
    if c.notes:
        lines += ["", *(f"- {note}" for note in c.notes)]
    return "\n".join(lines) + "\n"


def print_table(c: Comparison) -> None:
    from rich.console import Console
    from rich.table import Table

    header, cells = table_cells(c)
    table = Table(*header, title="replica compare")
    for line in cells:
        table.add_row(*line)
    # A pipe or a log gets the whole table, not one cut to 80 columns.
    console = Console(width=None if sys.stdout.isatty() else 400)
    console.print(table)
    for note in c.notes:
        console.print(f"note: {note}")


def to_parquet(c: Comparison) -> bytes:
    """One row per run, every figure a column (empty cells are nulls)."""
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(c.rows).replace_schema_metadata(
        {b"replica.compare.notes": json.dumps(c.notes).encode()})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def render_histogram(c: Comparison) -> bytes:
    """One PNG: each run's top-1 distribution of the shared similarity, overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if c.histogram is None:
        raise ConfigError("no similarity is shared by every run compared: no histogram to draw")
    name, series = c.histogram
    values = [v for s in series.values() for v in s]
    lo, hi = (min(values + [0.0]), max(values + [1.0]))
    bins = np.linspace(lo, hi, 51)
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, scores in series.items():
        if scores:
            ax.hist(scores, bins=bins, density=True, histtype="step", linewidth=1.6, label=f"{label} (n={len(scores)})")
    ax.axvline(PAPER_THRESHOLD, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel(f"top-1 similarity ({name})")
    ax.set_ylabel("density")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
