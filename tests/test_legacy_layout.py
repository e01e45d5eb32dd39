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
    # Every figure the old summary had is the same (its scores were similarities: they fill the
    # similarity columns); this version adds figures beside them.
    def same(new, was):
        if isinstance(was, dict):
            return all(k in new and same(new[k], v) for k, v in was.items())
        return new == was
    for key in ("thresholds", "calibration", "replication", "queries", "baseline", "coverage", "index"):
        assert same(getattr(summary, key), old[key]), key


def test_todays_search_over_the_old_index_reproduces_the_old_similarities(legacy, ray_local, tmp_path):
    """An index embedded with release 0.2's whitening searches with no flag (the whitening it
    names still ships) and gives the same exact similarities; ranks now follow the final score."""
    cfg = SearchConfig(queries=str(legacy / "generated"), index=str(legacy / "index"), output=str(tmp_path),
                       run_id="again", baseline_size=10, top_k=3, candidates=10)
    run = Path(run_search(cfg).run_url)
    old = {(m["query_key"], m["match_key"]): m["score_exact"]
           for m in pq.read_table(legacy / "results" / "run_id=legacy" / "matches.parquet").to_pylist()}
    new = {(m["query_key"], m["match_key"]): m["score_exact"] for m in pq.read_table(run / "matches.parquet").to_pylist()}
    both = set(old) & set(new)
    assert len(both) >= len(old) // 2
    assert all(abs(old[k] - new[k]) < 1e-6 for k in both)
    info = json.loads((run / "run.json").read_text())
    assert info["embedder"]["model"] == "gradpyr64-lw-v1"
    assert info["embedder"]["preprocess"] == "jpeg-draft,squash=64x64,bilinear"  # recorded: images not turned
