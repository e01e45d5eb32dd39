"""``histogram.png``: top-1 score densities of the generations against the corpus baseline."""
from __future__ import annotations

import io
from typing import Iterable

import numpy as np

from pipeline.report.stats import finite


def render_histogram(
    generation_scores: Iterable[float],
    baseline_scores: Iterable[float] | None,
    thresholds: dict[str, float],
    baseline_scores_no_dups: Iterable[float] | None = None,
    title: str = "",
) -> bytes:
    """PNG of top-1 score densities, generations vs corpus baseline, thresholds as vertical lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    gen = finite(generation_scores)
    base = finite(baseline_scores)
    nodup = finite(baseline_scores_no_dups)
    everything = np.concatenate([gen, base, nodup, np.asarray(list(thresholds.values()), dtype=np.float64)])
    lo = min(0.0, float(everything.min())) if len(everything) else 0.0
    hi = max(1.0, float(everything.max())) if len(everything) else 1.0
    bins = np.linspace(lo, hi, 61)

    fig = Figure(figsize=(9, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if len(base):
        ax.hist(base, bins=bins, density=True, alpha=0.5, color="#7f7f7f", label=f"training set self-similarity (n={len(base)})")
    if len(nodup):
        ax.hist(nodup, bins=bins, density=True, histtype="step", linewidth=1.5, color="#333333",
                label=f"training set, near-duplicates excluded (n={len(nodup)})")
    if len(gen):
        ax.hist(gen, bins=bins, density=True, alpha=0.55, color="#1f77b4", label=f"generations (n={len(gen)})")
    styles = {"replication": ("#d62728", "--"), "duplicate": ("#9467bd", ":"), "calibrated": ("#2ca02c", "-.")}
    for name, t in thresholds.items():
        colour, style = styles.get(name, ("#ff7f0e", "--"))
        ax.axvline(t, color=colour, linestyle=style, linewidth=1.5, label=f"{name} threshold {t:.3f}")
    ax.set_xlabel("top-1 final score (pipeline.scoring)")
    ax.set_ylabel("density")
    ax.set_xlim(lo, hi)
    ax.set_title(title or "Top-1 similarity: generations vs training set")
    ax.legend(loc="best", fontsize=8, framealpha=0.85)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
