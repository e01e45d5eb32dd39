"""The final score: monotone in the evidence, the rank order, fitted within its constraints,
saved and identified like weights, and chosen for the descriptor it was fitted for."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline import scoring
from pipeline.errors import ConfigError
from pipeline.search import Candidate


def _cands(rng, n=12):
    out = []
    for i in range(n):
        c = Candidate(i, 0.0, float(rng.uniform(0.2, 0.9)), int(rng.integers(0, 3)))
        if rng.random() < 0.5:
            c.inliers, c.matches = int(rng.integers(15, 200)), int(rng.integers(200, 400))
            c.verify_score, c.query_box, c.match_box = 0.5, (10, 10, 200, 150), (0, 0, 300, 200)
            c.candidate_size = (300, 200)
        out.append(c)
    return out


BOXES = [(0, 0, 400, 300), (0, 0, 200, 150), (100, 75, 300, 225)]


def _models():
    from pipeline.embedders.default import DefaultDescriptor
    from pipeline.verify import DEFAULT_METHOD

    shipped = scoring.shipped_model(DefaultDescriptor().identity(), DEFAULT_METHOD)
    return [scoring.UNFITTED, shipped]


@pytest.mark.parametrize("model", _models(), ids=["unfitted", "shipped"])
def test_more_evidence_never_lowers_the_score(model):
    rng = np.random.default_rng(0)
    x = scoring.features(_cands(rng, 200), (400, 300), BOXES)
    base = model.score(x)
    for name in scoring.MONOTONE:
        j = scoring.FEATURES.index(name)
        more = x.copy()
        more[:, j] += rng.uniform(0.01, 1.0, len(x))
        assert (model.score(more) >= base - 1e-12).all(), name
    assert ((base > 0) & (base < 1)).all()


def test_rank_order_is_score_order():
    rng = np.random.default_rng(1)
    for model in _models():
        ranked = scoring.rank(_cands(rng), model, (400, 300), BOXES)
        scores = [c.score for c in ranked]
        assert scores == sorted(scores, reverse=True)
        # A verified candidate with the same similarity as an unverified one ranks above it.
        a, b = Candidate(1, 0, 0.6, 0), Candidate(2, 0, 0.6, 0)
        a.inliers, a.matches, a.verify_score, a.query_box, a.match_box, a.candidate_size = (
            60, 100, 0.9, (0, 0, 400, 300), (0, 0, 300, 200), (300, 200))
        assert [c.id for c in scoring.rank([b, a], model, (400, 300), BOXES)] == [1, 2]


def test_margin_is_against_the_queries_own_candidates():
    rng = np.random.default_rng(2)
    cands = _cands(rng, 15)
    x = scoring.features(cands, (400, 300), BOXES)
    tenth = sorted((c.similarity for c in cands), reverse=True)[scoring.MARGIN_RANK - 1]
    j = scoring.FEATURES.index("margin")
    assert np.allclose(x[:, j], [c.similarity - tenth for c in cands])
    assert scoring.features([], (400, 300), BOXES).shape == (0, len(scoring.FEATURES))


def test_fit_keeps_evidence_weights_non_negative_and_separates():
    rng = np.random.default_rng(3)
    n = 4000
    y = (rng.random(n) < 0.2).astype(float)
    x = rng.normal(0, 1, (n, len(scoring.FEATURES)))
    x[:, 0] += 2.5 * y  # similarity carries the label
    x[:, 1] -= 0.8 * y  # a monotone feature pointing the wrong way: its weight must stay at 0
    w, b, mean, std = scoring.fit(x, y)
    assert w[0] > 1 and w[1] == 0
    assert all(w[scoring.FEATURES.index(f)] >= 0 for f in scoring.MONOTONE)
    model = scoring.ScoreModel(w.tolist(), b, mean.tolist(), std.tolist())
    p = model.score(x)
    assert p[y == 1].mean() > 0.6 > 0.15 > p[y == 0].mean()


def test_model_file_round_trips_and_is_checked(tmp_path):
    model = scoring.ScoreModel([0.5] * len(scoring.FEATURES), -1.0, [0.0] * len(scoring.FEATURES),
                               [1.0] * len(scoring.FEATURES), fitted_for={"embedder": "x"}, meta={"rows": 3})
    path = tmp_path / "m.json"
    path.write_bytes(model.to_bytes())
    again = scoring.load_model(str(path))
    assert again.to_bytes() == model.to_bytes() and again.sha256 == model.sha256
    assert again.identity()["sha256"] == model.sha256 and again.identity()["fitted"]
    bad = tmp_path / "bad.json"
    bad.write_text('{"weights": [1.0]}')
    with pytest.raises(ConfigError, match="score model"):
        scoring.load_model(str(bad))
    # A model fitted before a feature existed still loads and scores with the features it knows.
    older = scoring.ScoreModel([1.0], 0.0, [0.0], [1.0], features=["similarity"])
    bad.write_bytes(older.to_bytes())
    x = scoring.features(_cands(np.random.default_rng(4)), (400, 300), BOXES)
    assert np.allclose(scoring.load_model(str(bad)).score(x), 1 / (1 + np.exp(-x[:, 0])))
    unknown = scoring.ScoreModel([1.0], 0.0, [0.0], [1.0], features=["sharpness"])
    bad.write_bytes(unknown.to_bytes())
    with pytest.raises(ConfigError, match="features"):
        scoring.load_model(str(bad))


def test_the_shipped_model_is_fitted_for_the_default_descriptor_only():
    from pipeline.embedders.default import DefaultDescriptor
    from pipeline.verify import DEFAULT_METHOD

    identity = DefaultDescriptor().identity()
    shipped = scoring.shipped_model(identity, DEFAULT_METHOD)
    assert shipped is not scoring.UNFITTED and shipped.meta["fitted"]
    assert shipped.fitted_for == scoring.fitted_for(identity, DEFAULT_METHOD)
    # Another descriptor (another whitening, SSCD...) falls back to the fixed weights.
    assert scoring.shipped_model({**identity, "weights": "sha256:other"}, DEFAULT_METHOD) is scoring.UNFITTED
    assert scoring.shipped_model({"embedder": "sscd", "model": "torchscript"}, DEFAULT_METHOD) is scoring.UNFITTED


def test_the_verification_pool_takes_the_best_whole_image_scores_too():
    """Best by similarity first, then by the whole image's similarity (a crop whose whole image
    matches but ranks below images one region resembles), then heads of single regions' lists;
    3.5 x top at most, no image twice."""
    from pipeline.search import verification_pool

    cands = []
    for i in range(60):
        c = Candidate(i, 0.0, 0.9 - 0.01 * i, 1, region_rank=50, score_whole=0.1)
        cands.append(c)
    cands[40].score_whole = 0.8  # the crop: whole image similar, low in the similarity order
    cands[30].score_whole = 0.7
    for i in (20, 25, 55):
        cands[i].region_rank = 1  # heads of some region's list
    pool = verification_pool(cands, top=4)
    ids = [c.id for c in pool]
    assert ids[:4] == [0, 1, 2, 3]
    assert ids[4:6] == [40, 30]
    assert set(ids[6:]) == {20, 25, 55} and len(ids) == len(set(ids)) <= 14
    assert len(verification_pool(cands[:3], top=4)) == 3
    # Many heads of regions' lists: they fill the pool to 3.5 x top, best ranks first.
    for i in range(6, 60):
        cands[i].region_rank = 1 if i % 2 else 2
    pool = verification_pool(cands, top=4)
    assert len(pool) == 14 and all(c.region_rank == 1 for c in pool[6:])
