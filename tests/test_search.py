"""Search end to end on a small planted corpus: real tars, real Ray, real faiss, real report."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline import schema
from pipeline.cli import app
from pipeline.config import SearchConfig
from pipeline.search import run_dir, run_search

GLOBAL_EDITS = {"resize", "crop", "jpeg", "colour", "brightness_contrast", "greyscale", "flip", "rotate", "combo"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory, ray_local):
    """`replica demo` on a small corpus, through the CLI users run."""
    work = tmp_path_factory.mktemp("demo")
    result = CliRunner().invoke(app, ["demo", "--workdir", str(work), "--corpus-size", "400", "--copies-per-edit", "2",
                                      "--pasted", "4", "--novel", "8", "--quiet"])
    assert result.exit_code == 0, result.output
    run = work / "results" / "run_id=demo"
    return {"work": work, "run": run, "output": result.output,
            "truth": json.loads((work / "truth.json").read_text())}


def table(run: Path, name: str):
    return pq.read_table(run / name)


def test_demo_prints_its_figures(demo):
    out = demo["output"]
    assert "recall@1 of planted copies, per edit:" in out
    assert "false positives at the calibrated threshold" in out
    assert f"report: {demo['run'] / 'report.html'}" in out
    scores = json.loads((demo["work"] / "demo_scores.json").read_text())
    assert set(scores["recall_at_1"]) == GLOBAL_EDITS | {"paste"}


def test_every_output_exists_and_parses(demo):
    run = demo["run"]
    assert table(run, "matches.parquet").schema.equals(schema.matches_schema(), check_metadata=False)
    assert table(run, "queries.parquet").schema.equals(schema.queries_schema(), check_metadata=False)
    assert table(run, "baseline.parquet").schema.equals(schema.baseline_schema(), check_metadata=False)
    summary = json.loads((run / "summary.json").read_text())
    info = json.loads((run / "run.json").read_text())
    assert info["run_id"] == summary["run_id"] == "demo"
    assert 0 < info["index"]["estimated_recall"] <= 1
    assert info["coverage"]["samples_attempted"] == info["coverage"]["vectors_indexed"] == 400
    assert (run / "histogram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (run / "report.html").read_text()
    assert "novel-0" in html and "data:image/jpeg;base64," in html
    assert table(run, "queries.parquet").num_rows == len(demo["truth"])


def test_planted_copies_are_found_and_attributed(demo):
    matches = table(demo["run"], "matches.parquet").to_pylist()
    top1 = {m["query_key"]: m for m in matches if m["rank"] == 1}
    copies = [t for t in demo["truth"] if t["edit"] in GLOBAL_EDITS]
    hits = [top1[t["query_key"]]["match_key"] == t["source_key"] for t in copies]
    assert np.mean(hits) >= 0.9, [t["query_key"] for t, h in zip(copies, hits) if not h]
    for t in copies:  # the source is among the matches, and its subset flag is the planted one
        found = [m for m in matches if m["query_key"] == t["query_key"] and m["match_key"] == t["source_key"]]
        assert found and found[0]["in_subset"] == t["source_in_subset"]
    subset = set(pq.read_table(demo["work"] / "subset.parquet").column("key").to_pylist())
    assert all(m["in_subset"] == (m["match_key"] in subset) for m in matches)


def test_scores_and_summary_match_brute_force(demo):
    """Best scores equal an exhaustive search over every stored vector with the same query regions."""
    from pipeline.config import EmbedderConfig
    from pipeline.embedders import build_embedder
    from pipeline.queries import load_queries
    from pipeline.report import calibrate_threshold

    emb = pq.ParquetDataset(sorted(str(p) for p in (demo["work"] / "embeddings").glob("*.parquet"))).read()
    emb = emb.filter(emb.column("status").to_numpy(zero_copy_only=False) == "ok")
    corpus, keys = schema.vectors_of(emb), emb.column("key").to_pylist()
    embedder = build_embedder(EmbedderConfig())
    queries = {q["query_key"]: q for q in table(demo["run"], "queries.parquet").to_pylist()}
    for q in load_queries(str(demo["work"] / "generated")):
        vecs, _ = embedder.embed_regions(q.image)
        best = float((vecs @ corpus.T).max())
        assert queries[q.key]["best_score"] == pytest.approx(best, abs=2e-3), q.key

    summary = json.loads((demo["run"] / "summary.json").read_text())
    best = np.array([queries[k]["best_score"] for k in queries])
    rate = summary["replication"]["replication"]["all"]
    assert rate["count"] == int((best >= 0.5).sum()) and rate["n"] == len(best)
    base = table(demo["run"], "baseline.parquet").column("top1_score_no_dups").to_numpy()
    assert summary["thresholds"]["calibrated"] == pytest.approx(calibrate_threshold(base, 0.01))
    # The baseline is scored like the queries: regions of the fetched image, itself excluded.
    from pipeline.verify import load_candidate

    rows = {r["key"]: r for r in emb.to_pylist()}
    index_of = {k: i for i, k in enumerate(keys)}
    for row in table(demo["run"], "baseline.parquet").to_pylist()[:30]:
        r = rows[row["sample_key"]]
        vecs, _ = embedder.embed_regions(load_candidate(r["tar_url"], r["tar_offset"], r["tar_size"]))
        scores = (vecs @ corpus.T).max(axis=0)
        scores[index_of[row["sample_key"]]] = -np.inf
        assert row["top1_score"] == pytest.approx(float(scores.max()), abs=2e-3)


def test_blocklisted_images_are_never_fetched_or_shown(demo, monkeypatch):
    import pipeline.io

    truth = [t for t in demo["truth"] if t["edit"] in ("resize", "paste")]
    emb = pq.ParquetDataset(sorted(str(p) for p in (demo["work"] / "embeddings").glob("*.parquet"))).read().to_pylist()
    by_key = {r["key"]: r for r in emb}
    blocked_keys = {truth[0]["source_key"], truth[-1]["source_key"]}
    blocked_url = by_key[truth[1]["source_key"]]["url"]
    blocklist = demo["work"] / "blocklist.txt"
    blocklist.write_text("\n".join([*blocked_keys, blocked_url]) + "\n")
    blocked = blocked_keys | {truth[1]["source_key"]}
    blocked_ranges = {(by_key[k]["tar_url"], by_key[k]["tar_offset"]) for k in blocked}

    fetched = []
    real_read_range = pipeline.io.read_range

    def recording_read_range(url, offset, size, storage=None):
        fetched.append((url, offset))
        return real_read_range(url, offset, size, storage)

    monkeypatch.setattr(pipeline.io, "read_range", recording_read_range)
    monkeypatch.setattr("pipeline.report.read_range", recording_read_range)
    cfg = SearchConfig(queries=str(demo["work"] / "generated"), index=str(demo["work"] / "index"),
                       output=str(demo["work"] / "results"), run_id="blocked", blocklist=[str(blocklist)],
                       subset=str(demo["work"] / "subset.parquet"), baseline_size=100)
    run_search(cfg, progress=False)
    run = Path(run_dir(cfg))
    assert fetched, "verification and the gallery fetch candidate pixels"
    assert not blocked_ranges & set(fetched)
    matches = table(run, "matches.parquet").column("match_key").to_pylist()
    assert not blocked & set(matches)
    info = json.loads((run / "run.json").read_text())
    assert info["blocklist"] == {"entries": 3, "dropped_matches": info["blocklist"]["dropped_matches"]}
    assert info["blocklist"]["dropped_matches"] >= 3
    html = (run / "report.html").read_text()
    assert not any(k in html for k in blocked)


def test_query_embedder_must_match_the_index(demo, tmp_path):
    import torch

    from pipeline.config import EmbedderConfig
    from pipeline.errors import MismatchError

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 8, stride=8), torch.nn.Flatten(), torch.nn.Linear(256, 256))
    path = tmp_path / "other.torchscript.pt"
    torch.jit.save(torch.jit.script(net.eval()), str(path))
    cfg = SearchConfig(queries=str(demo["work"] / "generated"), index=str(demo["work"] / "index"),
                       output=str(tmp_path / "results"),
                       embedder=EmbedderConfig(name="sscd", checkpoint=str(path), image_size=64))
    with pytest.raises(MismatchError, match="other parameters"):
        run_search(cfg, progress=False)
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").glob("run_id=*"))


def test_second_stage_rerank_rescores_candidates_on_their_pixels(demo, tmp_path):
    """A second descriptor (a TorchScript model on the SSCD path) rescoring fetched candidates."""
    import torch

    from pipeline.config import EmbedderConfig
    from pipeline.embedders import build_embedder
    from pipeline.queries import load_queries
    from pipeline.verify import load_candidate

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 8, stride=8), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 8 * 8, 32)).eval()
    path = tmp_path / "rerank.torchscript.pt"
    torch.jit.save(torch.jit.script(net), str(path))
    rerank = EmbedderConfig(name="sscd", checkpoint=str(path), image_size=64)
    cfg = SearchConfig(queries=str(demo["work"] / "generated"), index=str(demo["work"] / "index"),
                       output=str(tmp_path / "results"), run_id="rerank", rerank=rerank, rerank_top=5,
                       verify_top=0, top_k=5, baseline_size=50)
    run_search(cfg, progress=False)
    matches = table(Path(run_dir(cfg)), "matches.parquet").to_pylist()
    assert all(m["score_rerank"] is not None and m["score"] == m["score_rerank"] for m in matches)
    assert all(m["inliers"] is None for m in matches)  # verification was off

    model = build_embedder(rerank)
    query = next(q for q in load_queries(str(demo["work"] / "generated")) if q.key == "copy-crop-0")
    qv = model.embed_images([query.image])
    for m in [m for m in matches if m["query_key"] == "copy-crop-0"]:
        cv = model.embed_images([load_candidate(m["tar_url"], m["tar_offset"], m["tar_size"])])
        assert m["score_rerank"] == pytest.approx(float((cv @ qv.T)[0, 0]), abs=1e-4)
    ranks = [m["score"] for m in matches if m["query_key"] == "copy-crop-0"]
    assert ranks == sorted(ranks, reverse=True)
