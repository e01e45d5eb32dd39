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
