"""The report stage: one search run -> figures an analyst can trust and a gallery to look at.

Reads a run folder (pipeline/layout/runs.py) and writes beside its tables:

- ``histogram.png`` (:mod:`.histogram`): top-1 score densities of the generations against the
  corpus self-similarity baseline, thresholds as vertical lines (as in Somepalli et al. 2023);
- ``report.html`` (:mod:`.gallery`): the self-contained gallery;
- ``summary.json`` (:mod:`.summary`, written last, so its presence means the report is
  complete): replication rates with 95% Wilson intervals (:mod:`.stats`) at the paper's
  thresholds and at one calibrated on the baseline, top-1 statistics, the subset split,
  coverage and index recall.
"""
from __future__ import annotations

from pipeline.errors import ConfigError
from pipeline.layout.runs import RunFolder, RunSummary
from pipeline.report.stats import calibrate_threshold, proportion, score_stats, wilson_interval
from pipeline.report.summary import summarize, summary_lines

__all__ = ["calibrate_threshold", "proportion", "run_report", "score_stats", "summarize", "summary_lines",
           "wilson_interval"]


def run_report(run: RunFolder, top: int = 5, max_queries: int = 200) -> RunSummary:
    """Write ``histogram.png``, ``report.html`` and ``summary.json`` into a run folder; returns the summary.

    ``top`` matches are shown per query; the gallery holds the ``max_queries`` best-scoring
    queries (0 = all of them).
    """
    from pipeline.report.gallery import render_gallery
    from pipeline.report.histogram import render_histogram

    if top < 1:
        raise ConfigError(f"--top must be at least 1, got {top}")
    if max_queries < 0:
        raise ConfigError(f"--max-queries must be 0 (all) or more, got {max_queries}")
    data = run.load()
    summary = summarize(data)
    baseline = data.baseline
    from pipeline.report.summary import score_column

    png = render_histogram(
        data.queries.column("best_score").to_pylist(),
        baseline.column("top1_score").to_pylist() if baseline is not None else None,
        # The histogram is of final scores: the thresholds on the similarity have another axis.
        {name: t for name, t in summary.thresholds.items() if score_column(name) == "score"},
        baseline.column("top1_score_no_dups").to_pylist() if baseline is not None else None,
        title=f"Top-1 final score, run {summary.run_id}",
    )
    run.write_report(png, render_gallery(data, summary, png, top=top, max_queries=max_queries,
                                         storage=run.storage), summary)
    return summary
