"""Mismatches are refused with a clear error: query dim, embedder identity, another training."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from pipeline.errors import ConfigError, MismatchError
from pipeline.index import factory as fac
from pipeline.index.add import run_add
from pipeline.index.build import run_build
from pipeline.index.merge import run_merge
from pipeline.index.serve import IndexSearcher
from pipeline.index.train import run_train
from pipeline.layout.embeddings import EmbeddingsFolder
from pipeline.layout.index import IndexFolder
from pipeline.testing.vectors import identity, write_shard
from index_helpers import config, index_of, make_corpus


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("mm")
    corpus = make_corpus(str(root / "emb"), shards=3, rows=400)
    cfg = config(str(root / "emb"), str(root / "index"), group_size=3)
    run_build(cfg, use_ray=False)
    return root, corpus, cfg


def test_query_dim_mismatch(built):
    root, corpus, cfg = built
    with IndexSearcher(index_of(cfg), use_ray=False) as s:
        with pytest.raises(MismatchError, match="dim 32"):
            s.search(np.zeros((2, 64), np.float32), 5)


def test_query_embedder_identity_mismatch(built):
    root, corpus, cfg = built
    ok = identity(32)
    IndexSearcher(index_of(cfg), use_ray=False, identity=ok).close()
    with pytest.raises(MismatchError, match="model"):
        IndexSearcher(index_of(cfg), use_ray=False, identity={**ok, "model": "ViT-L-14"})


def test_parts_of_another_training_are_refused(built, tmp_path):
    root, corpus, cfg = built
    other = tmp_path / "other"
    shutil.copytree(cfg.index, other)
    cfg2 = config(cfg.embeddings, str(other), group_size=3, factory="IVF16,PQ8")
    # retrain into the copy: same parts and manifest, different trained index
    (other / "trained.json").unlink()
    run_train(cfg2)
    with pytest.raises(MismatchError, match="trained index"):
        run_add(cfg2, use_ray=False)
    with pytest.raises(MismatchError, match="trained index"):
        run_merge(cfg2, use_ray=False)
    folder = IndexFolder(str(other))
    m = folder.read_manifest()
    m.shards[0].trained_sha256 = "0" * 64
    folder.write_manifest(m)
    with pytest.raises(MismatchError, match="trained index"):
        IndexSearcher(folder, use_ray=False)


def test_shard_of_another_embedder_is_refused(built, tmp_path):
    root, corpus, cfg = built
    emb = tmp_path / "emb"
    shutil.copytree(cfg.embeddings, emb)
    index = tmp_path / "index"
    cfg2 = config(str(emb), str(index), group_size=1)
    run_train(cfg2)
    write_shard(EmbeddingsFolder(str(emb)), "foreign", corpus.source.batch(50, 100), identity(32, model="other"))
    with pytest.raises(MismatchError, match="model"):
        run_add(cfg2, use_ray=False)


def test_registry_of_another_folder_or_identity(built, tmp_path):
    from pipeline.index.registry import Registry

    root, corpus, cfg = built
    emb2 = tmp_path / "emb2"
    shutil.copytree(cfg.embeddings, emb2)
    with pytest.raises(MismatchError, match="registers shards of"):
        run_train(config(str(emb2), cfg.index))
    # the registry keeps the identity it was created with
    with pytest.raises(MismatchError, match="weights"):
        Registry.load_or_create(index_of(cfg), EmbeddingsFolder(cfg.embeddings), identity(32, weights="v2"))


def test_factory_choice_and_bad_settings():
    f = fac.choose_factory(512, 1_000_000, int(0.1 * 2**30), max_nlist=4096)
    info = fac.describe_factory(f, 512)
    assert f == "OPQ128_512,IVF4096,PQ128x4fsr" and info.code_size == 64 and info.bytes_per_vector == 72
    assert fac.choose_factory(512, 10**6, int(0.1 * 2**30), max_nlist=4096, opq=False, fast_scan=False) == \
        "IVF4096,PQ64x8"
    big = fac.choose_factory(768, 5_850_000_000, 5_850_000_000 * 72)
    assert "IVF131072_HNSW32" in big and big.endswith("PQ96x4fsr")
    assert fac.choose_factory(64, 5_000, 10**9) == "IVF128,Flat"  # too few vectors to train PQ codebooks
    # fixed sizes: centroids once (not again for the HNSW graph's storage), links, PQ tables, OPQ matrix
    hnsw = fac.describe_factory("OPQ128_512,IVF131072_HNSW32,PQ128x4fsr", 512)
    centroids, links, pq_tables, opq = 131072 * 512 * 4, 131072 * 64 * 4, 128 * 16 * 4 * 4, 512 * 512 * 4
    assert hnsw.fixed_bytes == centroids + links + pq_tables + opq
    with pytest.raises(ConfigError, match="too small"):
        fac.choose_factory(512, 10**9, 2**30)
    with pytest.raises(ConfigError, match="not valid"):
        fac.describe_factory("IVF12,PQ7", 32)
    with pytest.raises(ConfigError, match="not an IVF"):
        fac.describe_factory("Flat", 32)


def test_missing_inputs_fail_before_work(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        run_train(config(str(tmp_path / "nothing"), str(tmp_path / "i")))
    with pytest.raises(ConfigError, match="not trained"):
        run_add(config(str(tmp_path / "nothing"), str(tmp_path / "i")))
    with pytest.raises(ConfigError, match="no index manifest"):
        IndexSearcher(IndexFolder(str(tmp_path / "i")), use_ray=False)
