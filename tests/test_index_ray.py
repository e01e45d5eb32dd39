"""The index through Ray on a real local S3 server: add tasks, merge tasks, search actors."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.index.build import run_build
from pipeline.index.registry import fetch_rows
from pipeline.index.rerank import SideFileVectors, exact_rerank, recall_at
from pipeline.index.serve import IndexSearcher
from index_helpers import brute_force, config, index_of, make_corpus, registry_of


@pytest.fixture(scope="module")
def s3_index(ray_local, s3_server, tmp_path_factory):
    root = "s3://replica-test/index-ray"
    corpus = make_corpus(f"{root}/emb", shards=6, rows=400, storage=s3_server)
    cfg = config(f"{root}/emb", f"{root}/index", group_size=1, s3=s3_server, shard_memory_gb=0.00005)
    manifest = run_build(cfg, use_ray=True).manifest
    return corpus, cfg, manifest, tmp_path_factory.mktemp("cache")


def test_build_on_s3_through_ray(s3_index):
    corpus, cfg, manifest, _ = s3_index
    folder = index_of(cfg)
    assert folder.has_manifest() and folder.read_ledger().parts
    assert len(manifest.shards) >= 2
    for s in manifest.shards:
        assert folder.exists(s.index) and folder.exists(s.ivfdata)
    assert manifest.ntotal == sum(int((~b).sum()) for b in corpus.bad)


def test_ray_actors_return_what_one_process_returns(s3_index):
    corpus, cfg, manifest, cache = s3_index
    queries = corpus.source.batch(777, 100)
    with IndexSearcher(index_of(cfg), use_ray=False, cache_dir=str(cache)) as local:
        d1, i1 = local.search(queries, 20, nprobe=8)
    with IndexSearcher(index_of(cfg), use_ray=True, num_actors=2, cache_dir=str(cache)) as remote:
        assert len(remote._actors) == 2
        d2, i2 = remote.search(queries, 20, nprobe=8)
        d3, i3 = remote.search(queries, 20, nprobe=1)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(d1, d2)
    assert not np.array_equal(i2, i3)  # nprobe reaches the actors


def test_s3_rerank_and_rows(s3_index):
    corpus, cfg, manifest, cache = s3_index
    reg = registry_of(cfg)
    x, ids = corpus.ok_matrix({n: reg.number(n) for n in reg.names})
    queries = corpus.source.batch(778, 100)
    truth = brute_force(queries, x, ids, 10)
    with IndexSearcher(index_of(cfg), use_ray=False, cache_dir=str(cache)) as s:
        _, cand = s.search(queries, 100, nprobe=8)
    side = SideFileVectors(index_of(cfg).vectors_folder, 32)
    _, found = exact_rerank(queries, cand, side, 10)
    assert recall_at(found, truth, 10) >= 0.9
    rows = fetch_rows(found[:3, 0], reg, columns=["key", "url"])
    for (shard, row), key in zip(reg.shard_rows(found[:3, 0]), rows.column("key").to_pylist()):
        assert key == f"{shard}-{row:06d}"


def test_shard_side_rescoring_gives_best_region_and_whole_image_scores(s3_index):
    """Each query as two vectors (its whole image first, then a region): the actors' exact
    rescoring returns, per candidate, the best of the two, which one, and the whole image's."""
    corpus, cfg, manifest, cache = s3_index
    vecs = corpus.source.batch(779, 20)
    owner = np.repeat(np.arange(10), 2)
    with IndexSearcher(index_of(cfg), use_ray=False, cache_dir=str(cache)) as local:
        _, ann = local.search(vecs, 15, nprobe=8)
        cand = [np.unique(np.concatenate([ann[2 * q], ann[2 * q + 1]]))[1:] for q in range(10)]
        expected = local.rescore(vecs, owner, cand)
    with IndexSearcher(index_of(cfg), use_ray=True, num_actors=2, cache_dir=str(cache)) as remote:
        got = remote.rescore(vecs, owner, cand)
    side = SideFileVectors(index_of(cfg).vectors_folder, 32)
    for q, ((best, rows, whole), (b2, r2, w2)) in enumerate(zip(expected, got)):
        stored = side.fetch(cand[q]).astype(np.float32)
        s = stored @ vecs[2 * q: 2 * q + 2].T
        np.testing.assert_allclose(best, s.max(1), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(rows, 2 * q + s.argmax(1))
        np.testing.assert_allclose(whole, s[:, 0], rtol=1e-5, atol=1e-5)
        # the actors score a subset of the candidates each: equal up to float rounding
        np.testing.assert_allclose(b2, best, rtol=1e-6)
        np.testing.assert_array_equal(r2, rows)
        np.testing.assert_allclose(w2, whole, rtol=1e-6)
