"""Folders written by replica 0.1.0 are read unchanged: embeddings, index and a run folder."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config import SearchConfig
from pipeline.index.registry import Registry
from pipeline.index.serve import IndexSearcher
from pipeline.layout.embeddings import EmbeddingsFolder, vectors_of
from pipeline.layout.index import IndexFolder
from pipeline.layout.runs import RunFolder
from pipeline.report import run_report
from pipeline.search import run_search

FIXTURE = Path(__file__).parent / "fixtures" / "legacy-v0.1"
WHERE = Path("/tmp/replica-legacy-v0.1")  # the absolute path the fixture's files record


@pytest.fixture(scope="module")
def legacy():
    shutil.rmtree(WHERE, ignore_errors=True)
    shutil.copytree(FIXTURE, WHERE)
    yield WHERE
    shutil.rmtree(WHERE, ignore_errors=True)


def test_embeddings_folder_reads(legacy):
    folder = EmbeddingsFolder(str(legacy / "embeddings"))
    info = folder.read_info()
    assert info.identity["embedder"] == "default" and info.embedder_config["name"] == "default"
    assert folder.complete_shards() == ["00000", "00001"]
    stats = folder.read_stats("00000")
    assert (stats.seen, stats.embedded, stats.failed, stats.shard_error) == (12, 12, {}, None)
    assert stats.timings and stats.embedded_by


def test_index_reads_and_finds_every_stored_vector(legacy):
    index = IndexFolder(str(legacy / "index"))
    manifest = index.read_manifest()
    assert (manifest.factory, manifest.ntotal, len(manifest.shards)) == ("IVF4,Flat", 24, 1)
    assert index.read_trained_info().sha256 == manifest.trained_sha256
    assert len(index.read_ledger().parts) == 2
    registry = Registry.load(index)
    assert registry.names == ["00000", "00001"] and registry.embeddings.url == str(legacy / "embeddings")
    folder = registry.embeddings
    vectors = np.concatenate([vectors_of(pq.read_table(folder.parquet_url(s))) for s in registry.names])
    with IndexSearcher(index, use_ray=False, nprobe=4) as searcher:
        _, ids = searcher.search(vectors, 1)
    assert [registry.shard_rows([i])[0] for i in ids[:, 0]] == [(s, r) for s in registry.names for r in range(12)]


def test_run_folder_reads_and_reports_the_same_figures(legacy, tmp_path):
    old = json.loads((legacy / "results" / "run_id=legacy" / "summary.json").read_text())
    copy = tmp_path / "run_id=legacy"
    shutil.copytree(legacy / "results" / "run_id=legacy", copy)
    data = RunFolder(str(copy)).load()
    assert data.run_id == "legacy" and data.queries.num_rows == 3
    summary = run_report(RunFolder(str(copy)), top=3)
    for key in ("thresholds", "calibration", "replication", "queries", "baseline", "coverage", "index"):
        assert getattr(summary, key) == old[key], key


def test_todays_search_over_the_old_index_finds_what_the_old_run_found(legacy, ray_local, tmp_path):
    cfg = SearchConfig(queries=str(legacy / "generated"), index=str(legacy / "index"), output=str(tmp_path),
                       run_id="again", baseline_size=10, top_k=3, candidates=10)
    run = Path(run_search(cfg).run_url)
    keep = ["query_key", "rank", "match_key", "inliers", "dup_group_size"]
    old = pq.read_table(legacy / "results" / "run_id=legacy" / "matches.parquet")
    new = pq.read_table(run / "matches.parquet")
    assert new.select(keep).equals(old.select(keep))  # the same images, in the same order
    for column in ("score_exact", "score"):  # exact scores, up to float summation order
        np.testing.assert_allclose(new.column(column).to_numpy(), old.column(column).to_numpy(), atol=1e-5)
    old_b = pq.read_table(legacy / "results" / "run_id=legacy" / "baseline.parquet")
    new_b = pq.read_table(run / "baseline.parquet")
    assert new_b.select(["sample_key", "top1_key", "near_dup_count"]).equals(
        old_b.select(["sample_key", "top1_key", "near_dup_count"]))
    np.testing.assert_allclose(new_b.column("top1_score").to_numpy(), old_b.column("top1_score").to_numpy(), atol=1e-5)
