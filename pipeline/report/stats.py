"""The statistics of a replication measurement: rates with Wilson intervals, score tails, calibration."""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np

from pipeline.errors import ConfigError

#: Two-sided 95% normal quantile, for Wilson score intervals.
Z95 = 1.959963984540054


def calibrate_threshold(baseline_scores: Iterable[float], fpr: float) -> float:
    """The score that a fraction ``1 - fpr`` of the baseline scores stays below.

    Returns the smallest threshold ``t`` such that the share of baseline scores ``>= t`` is at
    most ``fpr`` (so at least ``1 - fpr`` of them are ``< t``), choosing ``t`` among the scores
    themselves. When even the baseline maximum would flag more than ``fpr`` of the baseline
    (fewer than ``1 / fpr`` samples), the result is the next float above that maximum, so the
    implied false-positive rate is 0. Null/NaN scores are ignored.

    Feed it ``top1_score_no_dups`` (best match of a training image excluding itself and its
    near-duplicates): the score an unrelated image reaches by chance.
    """
    if not 0.0 < fpr < 1.0:
        raise ConfigError(f"fpr must lie strictly between 0 and 1, got {fpr!r}")
    scores = np.asarray([s for s in baseline_scores if s is not None], dtype=np.float64)
    scores = np.sort(scores[~np.isnan(scores)])
    n = len(scores)
    if n == 0:
        raise ConfigError("cannot calibrate a threshold without baseline scores: run search with a baseline sample")
    allowed = math.floor(fpr * n + 1e-9)  # how many baseline scores may reach the threshold
    if allowed == 0:
        return float(np.nextafter(scores[-1], np.inf))
    candidate = scores[n - allowed]
    # Ties: every score equal to the candidate would count; step up to the next distinct value.
    if n - np.searchsorted(scores, candidate, side="left") > allowed:
        above = scores[scores > candidate]
        return float(above[0]) if len(above) else float(np.nextafter(scores[-1], np.inf))
    return float(candidate)


def exceedance_rate(scores: Iterable[float], threshold: float) -> float | None:
    """Share of the (non-null) scores that are ``>= threshold``; None when there are none."""
    arr = finite(scores)
    return float(np.mean(arr >= threshold)) if len(arr) else None


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval for a binomial proportion (95% by default); None when ``n == 0``."""
    if n <= 0:
        return None
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion(flags: Sequence[bool] | np.ndarray) -> dict[str, Any]:
    """``{"count", "n", "rate", "ci95": [low, high]}`` of a boolean vector."""
    arr = np.asarray(flags, dtype=bool)
    n, k = int(arr.size), int(arr.sum())
    ci = wilson_interval(k, n)
    return {"count": k, "n": n, "rate": (k / n) if n else None, "ci95": list(ci) if ci else None}


def score_stats(scores: Iterable[float]) -> dict[str, Any]:
    """``{"n", "mean", "p95", "max"}`` of the non-null scores (p95: linear interpolation)."""
    arr = finite(scores)
    if not len(arr):
        return {"n": 0, "mean": None, "p95": None, "max": None}
    return {
        "n": int(arr.size),
        "mean": float(arr.mean()),
        "p95": float(np.percentile(arr, 95)),
        "max": float(arr.max()),
    }


def finite(scores: Iterable[float] | None) -> np.ndarray:
    if scores is None:
        return np.zeros(0)
    arr = np.asarray([np.nan if s is None else s for s in scores], dtype=np.float64)
    return arr[~np.isnan(arr)]


def at_least(scores: Sequence[float | None], threshold: float) -> np.ndarray:
    """Per-row ``score >= threshold``, a null score counting as no copy."""
    arr = np.asarray([np.nan if s is None else s for s in scores], dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.nan_to_num(arr, nan=-np.inf) >= threshold
