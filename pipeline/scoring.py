"""The final score of a match: one calibrated number from every piece of evidence.

A candidate carries a descriptor similarity (exact cosine on stored vectors, or the second-stage
descriptor's; the best over the query's regions), the query region that found it, the whole
query image's similarity (a region can resemble a part of an unrelated image; the whole image
rarely does), and -- when it was verified -- inliers, the share of tentative matches they make,
and the areas where the two images agree. The final score is a small logistic model of those
(:class:`ScoreModel`):

    score = sigmoid(bias + sum_i w_i * (x_i - mean_i) / std_i)

fitted on the development benchmark's fit split (``bench/copy_detection.py --fit``): the
probability that the candidate is the copied image. Weights of evidence features are
constrained to be >= 0, so the score never drops when the evidence grows; the margin feature
(similarity minus the query's own 10th best) makes scores of different queries comparable
(a query that resembles everything, like a page of text, gains nothing from that); the whole
query image's similarity enters the same way, as its margin over the query's 10th best. Search
ranks by this score, the baseline is scored the same way, and the calibrated threshold applies
to it; each component stays in its own column of ``matches.parquet``.

The shipped model (``pipeline/embedders/data/score-<descriptor version>.json``) is fitted for
the default descriptor's shipped whitening and the default verifier; a search with another
descriptor (SSCD, CLIP, an older whitening) uses ``search.score_model`` when given (a file fitted
for it by the bench) or else :data:`UNFITTED`, a fixed model that orders by similarity and
verification evidence without a calibrated meaning.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.search import Candidate

#: Feature names, in model order; ``MONOTONE`` ones are evidence (weight >= 0).
FEATURES = ("similarity", "margin", "region_area", "verified", "log_inliers", "inlier_ratio", "query_box_area",
            "match_box_area", "whole_margin")
MONOTONE = ("similarity", "margin", "verified", "log_inliers", "inlier_ratio", "query_box_area", "match_box_area",
            "whole_margin")
#: The margin is taken against the query's ``MARGIN_RANK``-th best similarity.
MARGIN_RANK = 10


def _box_area(box, size) -> float:
    if not box or not size or size[0] <= 0 or size[1] <= 0:
        return 0.0
    return float(np.sqrt(max(0, box[2] - box[0]) * max(0, box[3] - box[1]) / (size[0] * size[1])))


def _nth_best(values: np.ndarray) -> float:
    """The query's ``MARGIN_RANK``-th best value (its worst when it has fewer)."""
    return float(np.sort(values)[::-1][min(MARGIN_RANK, len(values)) - 1])


def features(cands: Sequence["Candidate"], query_size: tuple[int, int], region_boxes: Sequence[tuple]) -> np.ndarray:
    """(n, len(FEATURES)) evidence of one query's candidates (unverified: zeros for verification)."""
    if not cands:
        return np.zeros((0, len(FEATURES)))
    sims = np.array([c.similarity for c in cands], dtype=np.float64)
    reference = _nth_best(sims)
    whole = np.array([c.score_whole if np.isfinite(c.score_whole) else c.similarity for c in cands])
    whole_reference = _nth_best(whole)
    rows = []
    for c, s, w in zip(cands, sims, whole):
        verified = bool(c.verify_score)
        rows.append([
            s,
            s - reference,
            _box_area(region_boxes[c.region], query_size) if region_boxes else 1.0,
            float(verified),
            float(np.log1p(c.inliers)) if verified else 0.0,
            float(c.inliers / max(c.matches or c.inliers, 1)) if verified else 0.0,
            _box_area(c.query_box, query_size) if verified else 0.0,
            _box_area(c.match_box, c.candidate_size) if verified else 0.0,
            w - whole_reference,
        ])
    return np.asarray(rows, dtype=np.float64)


@dataclass
class ScoreModel:
    """``sigmoid(bias + w . standardised features)``; ``meta`` says what it was fitted for and on."""

    weights: list[float]
    bias: float
    mean: list[float]
    std: list[float]
    features: list[str] = field(default_factory=lambda: list(FEATURES))
    #: the descriptor identity (embedder, model, weights) and verifier it was fitted for
    fitted_for: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def score(self, x: np.ndarray) -> np.ndarray:
        """Scores of rows of :func:`features` (all of ``FEATURES``; the model uses its own)."""
        if not len(x):
            return np.zeros(0)
        x = x[:, [FEATURES.index(f) for f in self.features]]
        z = self.bias + ((x - np.asarray(self.mean)) / np.asarray(self.std)) @ np.asarray(self.weights)
        return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))

    def to_bytes(self) -> bytes:
        return (json.dumps(asdict(self), indent=1, sort_keys=True) + "\n").encode()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def identity(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "fitted_for": self.fitted_for, "features": self.features,
                "fitted": bool(self.meta.get("fitted", True))}

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "score model") -> "ScoreModel":
        try:
            d = json.loads(data)
            model = cls(**{k: d[k] for k in ("weights", "bias", "mean", "std", "features", "fitted_for", "meta")})
        except Exception as exc:  # noqa: BLE001 - any format problem is a config problem
            raise ConfigError(f"{where} is not a score model file (JSON from bench/copy_detection.py --fit): {exc}") from exc
        # A model fitted before a feature was added still scores as it did (it ignores the feature).
        unknown = [f for f in model.features if f not in FEATURES]
        if unknown or len(model.weights) != len(model.features):
            raise ConfigError(f"{where} uses features {model.features}; this version computes {list(FEATURES)}")
        return model


#: Without a model fitted for the descriptor: similarity first, verification evidence on top,
#: margin as a tie-breaker. Not calibrated (the threshold calibrated on the baseline still is).
UNFITTED = ScoreModel(weights=[4.0, 1.0, 0.0, 2.0, 1.0, 0.5, 0.5, 0.25, 1.0], bias=0.0,
                      mean=[0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                      std=[0.1, 0.1, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.1], fitted_for={},
                      meta={"fitted": False, "note": "fixed weights, not fitted"})


def fit(x: np.ndarray, y: np.ndarray, l2: float = 1e-3, iters: int = 50) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """Logistic regression with weights of ``MONOTONE`` features kept >= 0 (active set:
    fit by Newton's method, drop the most negative constrained weight, refit).
    Returns (weights, bias, mean, std) on standardised features."""
    mean, std = x.mean(axis=0), x.std(axis=0)
    std = np.where(std > 1e-9, std, 1.0)
    z = (x - mean) / std
    constrained = np.array([f in MONOTONE for f in FEATURES])
    active = np.ones(x.shape[1], bool)
    while True:
        a = np.c_[np.ones(len(z)), z[:, active]]
        w = np.zeros(a.shape[1])
        for _ in range(iters):
            p = 1 / (1 + np.exp(-np.clip(a @ w, -60, 60)))
            grad = a.T @ (p - y) / len(y) + l2 * np.r_[0, w[1:]]
            hess = (a * (p * (1 - p))[:, None]).T @ a / len(y) + l2 * np.diag(np.r_[0, np.ones(len(w) - 1)])
            step = np.linalg.solve(hess + 1e-9 * np.eye(len(w)), grad)
            w -= step
            if np.abs(step).max() < 1e-8:
                break
        full = np.zeros(x.shape[1])
        full[active] = w[1:]
        bad = constrained & active & (full < 0)
        if not bad.any():
            return full, float(w[0]), mean, std
        active[np.argmin(np.where(bad, full, np.inf))] = False


def load_model(url: str | None, storage=None) -> ScoreModel:
    from pipeline.storage import read_bytes

    return ScoreModel.from_bytes(read_bytes(url, storage), f"search.score_model {url!r}")


def shipped_model(identity: dict[str, Any], verifier: str) -> ScoreModel:
    """The shipped model fitted for this descriptor identity and verifier, else :data:`UNFITTED`."""
    from pipeline.embedders.default import DATA_DIR

    path = Path(DATA_DIR) / f"score-{identity.get('model', '')}.json"
    if path.is_file():
        model = ScoreModel.from_bytes(path.read_bytes(), str(path))
        if model.fitted_for == fitted_for(identity, verifier):
            return model
    return UNFITTED


def fitted_for(identity: dict[str, Any], verifier: str) -> dict[str, Any]:
    """What a score model must have been fitted for. The upright step is left out: the development
    benchmark re-encodes every image without EXIF, so a model fitted there holds with and without it."""
    from pipeline.embedders.base import UPRIGHT_STEP

    preprocess = str(identity.get("preprocess") or "").removeprefix(f"{UPRIGHT_STEP},")
    return {"embedder": identity.get("embedder"), "model": identity.get("model"), "weights": identity.get("weights"),
            "preprocess": preprocess, "verifier": verifier}


def rank(cands: list["Candidate"], model: ScoreModel, query_size, region_boxes) -> list["Candidate"]:
    """Score one query's candidates with ``model`` and order them by that score (ties: similarity, id)."""
    for c, s in zip(cands, model.score(features(cands, query_size, region_boxes))):
        c.score = float(s)
    return sorted(cands, key=lambda c: (-c.score, -c.similarity, c.id))
