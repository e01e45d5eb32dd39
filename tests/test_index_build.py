"""Train/add/merge on a small clustered corpus, in-process: recall, ids, merge equivalence."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.index.build import run_build
from pipeline.index.registry import fetch_rows
from pipeline.index.rerank import ParquetVectors, SideFileVectors, exact_rerank, recall_at
from pipeline.index.serve import IndexSearcher
from pipeline.layout.embeddings import ROW_COLUMNS, EmbeddingsFolder, vectors_of
from index_helpers import brute_force, config, index_of, make_corpus, registry_of


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("idx")
    corpus = make_corpus(str(root / "emb"), shards=8, rows=500)
    cfg = config(str(root / "emb"), str(root / "index"), group_size=1)
    manifest = run_build(cfg, use_ray=False).manifest
    reg = registry_of(cfg)
    x, ids = corpus.ok_matrix({n: reg.number(n) for n in reg.names})
    queries = corpus.source.batch(10_000, 200)
    return corpus, cfg, manifest, reg, x, ids, queries


def test_manifest_records_build(built):
    corpus, cfg, manifest, reg, x, ids, _ = built
    trained = index_of(cfg).read_trained_info()
    assert manifest.ntotal == len(x) == sum(s.ntotal for s in manifest.shards)
    assert manifest.factory == "IVF32,PQ8" and manifest.dim == 32
    assert manifest.identity == EmbeddingsFolder(cfg.embeddings).read_info().identity
    assert manifest.trained_sha256 == trained.sha256
    assert manifest.registry_version == reg.version == 1
    # small shard budget: several index shards, some merged in stages (fan-in 2)
    assert len(manifest.shards) >= 2
    assert any(len(s.parts) > cfg.merge_fanin for s in manifest.shards)
    parts = [p for s in manifest.shards for p in s.parts]
    assert len(parts) == len(set(parts)) == len(corpus.names)


def test_recall_after_rerank_against_brute_force(built):
    corpus, cfg, manifest, reg, x, ids, queries = built
    truth = brute_force(queries, x, ids, 10)
    with IndexSearcher(index_of(cfg), use_ray=False) as s:
        _, approx = s.search(queries, 10, nprobe=8)
        _, cand = s.search(queries, 100, nprobe=8)
        _, reranked = exact_rerank(queries, cand, SideFileVectors(index_of(cfg).vectors_folder, s.dim), 10)
    before, after = recall_at(approx, truth, 10), recall_at(reranked, truth, 10)
    print(f"recall@10 before rerank {before:.3f}, after {after:.3f}")
    assert after >= 0.9
    assert after > before


def test_rerank_sources_agree_and_return_stored_vectors(built):
    corpus, cfg, manifest, reg, x, ids, queries = built
    pick = ids[::37]
    side = SideFileVectors(index_of(cfg).vectors_folder, 32).fetch(pick)
    parquet = ParquetVectors(reg, 32).fetch(pick)
    expected = x[::37].astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(side, expected)
    np.testing.assert_array_equal(parquet, expected)


def test_side_files_read_the_same_rows_from_local_disk_and_from_s3(tmp_path, s3_server):
    """Unsorted ids, duplicates, neighbouring rows (one coalesced range), three shards: the memory
    map (with one file mapped at a time, so maps are evicted and reopened) and S3's ranged reads
    return exactly the stored rows, in the asked order."""
    from pipeline.index.registry import encode_ids
    from pipeline.layout.index import vectors_name
    from pipeline.storage import Folder

    rng = np.random.default_rng(3)
    stored = {n: rng.standard_normal((50, 8)).astype(np.float16) for n in (0, 1, 7)}
    local, remote = Folder(str(tmp_path / "vectors")), Folder("s3://replica-test/side/vectors", s3_server)
    for n, rows in stored.items():
        local.write_bytes(vectors_name(n), rows.tobytes())
        remote.write_bytes(vectors_name(n), rows.tobytes())
    pairs = [(7, 3), (0, 49), (1, 10), (1, 11), (1, 13), (0, 0), (7, 3), (1, 40), (0, 1)]
    ids = np.array([int(encode_ids(n, r)) for n, r in pairs])
    want = np.stack([stored[n][r] for n, r in pairs]).astype(np.float32)
    mapped = SideFileVectors(local, 8, open_files=1)
    for _ in range(2):
        np.testing.assert_array_equal(mapped.fetch(ids), want)
    ranged = SideFileVectors(remote, 8)
    np.testing.assert_array_equal(ranged.fetch(ids), want)
    # ranges: shard 0 rows 0-1 and 49; shard 1 rows 10-13 (gaps <= 4 rows) and 40; shard 7 row 3 once
    assert ranged.requests == 5
    assert SideFileVectors(local, 8).fetch(np.zeros(0, np.int64)).shape == (0, 8)
    # a truncated side file is named, not read past its end
    from pipeline.errors import MismatchError

    for folder in (local, remote):
        folder.write_bytes(vectors_name(1), stored[1][:12].tobytes())
        with pytest.raises(MismatchError, match=r"000000001.f16 holds 12 vectors .* row (13|40) "):
            SideFileVectors(folder, 8).fetch(ids)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_rescoring_gives_each_candidate_its_best_region_and_the_whole_image_score(metric):
    """Queries of several rows (regions) in any order, a query with no candidates, and one with
    no rows: the same scores as scoring every candidate against every row by hand."""
    from pipeline.index.serve import rescore

    rng = np.random.default_rng(0)
    stored = rng.standard_normal((1000, 16)).astype(np.float32)
    vectors = rng.standard_normal((20, 16)).astype(np.float32)
    owner = rng.integers(0, 5, 20)
    owner[owner == 4] = 3  # query 4 has no rows
    cand = [rng.choice(1000, 25, replace=False) for _ in range(5)] + [np.zeros(0, np.int64)]
    got = rescore(vectors, owner, cand, lambda ids: stored[ids], metric)
    for q, ids in enumerate(cand):
        rows = np.nonzero(owner == q)[0]
        if len(ids) == 0 or len(rows) == 0:
            assert len(got[q][0]) == 0
            continue
        v = stored[ids]
        s = v @ vectors[rows].T if metric == "ip" else -((v[:, None] - vectors[rows][None]) ** 2).sum(-1)
        best = s.argmax(axis=1)
        np.testing.assert_allclose(got[q][0], s[np.arange(len(ids)), best], atol=1e-4)
        np.testing.assert_array_equal(got[q][1], rows[best])
        np.testing.assert_allclose(got[q][2], s[:, 0], atol=1e-4)


def test_the_whole_images_own_neighbours_reach_the_rescoring_whatever_its_regions_bring(built):
    """A query whose regions match other corpus images exactly and whose whole image resembles
    image A only loosely: with room for 10 candidates, which the regions' matches and their
    neighbours outscore, A (the whole image's nearest) still gets one, rescored against the
    whole image."""
    from pipeline.config import SearchConfig
    from pipeline.search import candidate_search

    corpus, cfg, manifest, reg, x, ids, queries = built
    rng = np.random.default_rng(4)
    a = 17
    whole = x[a] + 0.9 * np.linalg.norm(x[a]) * rng.standard_normal(x.shape[1]) / np.sqrt(x.shape[1])
    vecs = np.vstack([whole / np.linalg.norm(whole), x[[100, 900, 1700, 2500, 3300]]]).astype(np.float32)
    owner = np.zeros(len(vecs), np.int64)
    with IndexSearcher(index_of(cfg), use_ray=False) as searcher:
        _, nearest = searcher.search(vecs[:1], 1)
        found = candidate_search(vecs, owner, 1, searcher, None, SearchConfig(candidates=20), depth=10)[0]
    a_id = int(nearest[0, 0])
    assert len(found) == 10 and a_id in found
    # by the merged score alone it would have had no place: the 9 others all outscore it
    assert all(c.score_index > found[a_id].score_index for i, c in found.items() if i != a_id)
    assert found[a_id].region == 0
    assert found[a_id].score_whole == pytest.approx(float(vecs[0] @ x[ids == a_id][0]), abs=2e-3)


def test_ids_round_trip_to_parquet_rows(built):
    corpus, cfg, manifest, reg, x, ids, queries = built
    with IndexSearcher(index_of(cfg), use_ray=False) as s:
        _, found = s.search(queries[:20], 5, nprobe=8)
    hits = found[found >= 0]
    table = fetch_rows(hits, reg, columns=[*ROW_COLUMNS, "embedding"])
    assert table.column("id").to_pylist() == hits.tolist()
    for (shard, row), key, vec in zip(reg.shard_rows(hits), table.column("key").to_pylist(), vectors_of(table)):
        i = corpus.names.index(shard)
        assert key == f"{shard}-{row:06d}"
        assert not corpus.bad[i][row]
        np.testing.assert_array_equal(vec, corpus.vectors[i][row].astype(np.float16).astype(np.float32))
    assert set(table.column_names) >= {"key", "url", "caption", "tar_url", "tar_offset", "tar_size", "sha256", "embedding"}


def test_merged_shards_equal_one_index_holding_all_vectors(built):
    corpus, cfg, manifest, reg, x, ids, queries = built
    import faiss

    data, _ = index_of(cfg).read_trained()
    single = faiss.deserialize_index(np.frombuffer(data, np.uint8))
    single.add_with_ids(x.astype(np.float16).astype(np.float32), ids)
    single.nprobe = 8
    d1, i1 = single.search(queries, 10)
    with IndexSearcher(index_of(cfg), use_ray=False) as s:
        d2, i2 = s.search(queries, 10, nprobe=8)
    np.testing.assert_allclose(d2, d1, rtol=1e-5, atol=1e-5)
    same = (i1 == i2).mean()
    assert same > 0.99  # only exact ties may swap
    assert set(i2.ravel()) <= set(ids.tolist()) | {-1}


def test_ntotal_and_ok_rows_only(built):
    corpus, cfg, manifest, reg, x, ids, queries = built
    n_ok = sum(int((~b).sum()) for b in corpus.bad)
    n_bad = sum(int(b.sum()) for b in corpus.bad)
    assert n_bad > 0 and manifest.ntotal == n_ok
    assert index_of(cfg).read_manifest().ntotal == n_ok


def test_rebuild_is_a_no_op(built):
    corpus, cfg, manifest, reg, x, ids, queries = built
    again = run_build(cfg, use_ray=False).manifest
    assert again.shards == manifest.shards and again.ntotal == manifest.ntotal


def test_without_side_files_rerank_reads_parquet(tmp_path):
    from pipeline.index.rerank import source_for

    corpus = make_corpus(str(tmp_path / "emb"), shards=2, rows=300)
    cfg = config(str(tmp_path / "emb"), str(tmp_path / "index"), write_vectors=False)
    manifest = run_build(cfg, use_ray=False).manifest
    assert manifest.side_vectors is False and not (tmp_path / "index" / "vectors").exists()
    src = source_for(index_of(cfg), manifest)
    assert isinstance(src, ParquetVectors)
    ids = np.array([1, 2, 2**24 + 299, 0])  # shard 0 row 0 is a decode error: no vector
    want = np.stack([corpus.vectors[0][1], corpus.vectors[0][2], corpus.vectors[1][299], np.zeros(32)])
    assert corpus.bad[0][0] and not corpus.bad[0][1:3].any() and not corpus.bad[1][299]
    np.testing.assert_array_equal(src.fetch(ids), want.astype(np.float16).astype(np.float32))


def test_merging_onto_a_list_a_whole_number_of_blocks_long_equals_one_index(tmp_path):
    """faiss' append to a fast-scan list whose length is a multiple of its block size in bytes
    overflows the heap (128 entries here: 32 codes of 4 bytes a block); the merge avoids it."""
    import faiss

    from pipeline.index.merge import merge_in_ram

    x = np.random.default_rng(0).standard_normal((1000, 16)).astype("float32")
    trained = faiss.index_factory(16, "IVF1,PQ8x4fsr", faiss.METRIC_INNER_PRODUCT)
    trained.train(x)
    parts, start = [], 0
    for i, n in enumerate([128, 50, 78, 128, 7]):  # the list holds 128, then 256 entries before an append
        part = faiss.clone_index(trained)
        part.add_with_ids(x[start : start + n], np.arange(start, start + n))
        parts.append(str(tmp_path / f"part{i}.index"))
        faiss.write_index(part, parts[-1])
        start += n
    one = faiss.clone_index(trained)
    one.add_with_ids(x[:start], np.arange(start))
    assert merge_in_ram(faiss.serialize_index(trained).tobytes(), parts, str(tmp_path / "merged.index")) == start
    merged = faiss.read_index(str(tmp_path / "merged.index"))
    (d1, i1), (d2, i2) = one.search(x[:100], 20), merged.search(x[:100], 20)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(d1, d2)


def test_fast_scan_shards_are_merged_in_ram_and_equal_one_index(tmp_path):
    """OPQ + 4-bit fast-scan codes (the default kind): shards merged and served in RAM, no .ivfdata."""
    import faiss

    corpus = make_corpus(str(tmp_path / "emb"), shards=4, rows=1500)
    cfg = config(str(tmp_path / "emb"), str(tmp_path / "index"), factory="OPQ16_32,IVF32,PQ16x4fsr",
                 shard_memory_gb=0.00007)
    manifest = run_build(cfg, use_ray=False).manifest
    assert len(manifest.shards) >= 2 and all(s.ivfdata == "" for s in manifest.shards)
    assert not list((tmp_path / "index" / "shards").glob("*.ivfdata"))
    reg = registry_of(cfg)
    x, ids = corpus.ok_matrix({n: reg.number(n) for n in reg.names})
    data, _ = index_of(cfg).read_trained()
    single = faiss.deserialize_index(np.frombuffer(data, np.uint8))
    single.add_with_ids(x.astype(np.float16).astype(np.float32), ids)
    faiss.extract_index_ivf(single).nprobe = 8
    queries = corpus.source.batch(10_000, 100)
    d1, i1 = single.search(queries, 10)
    with IndexSearcher(index_of(cfg), use_ray=False) as s:
        d2, i2 = s.search(queries, 10, nprobe=8)
        _, cand = s.search(queries, 100, nprobe=8)
    np.testing.assert_allclose(d2, d1, rtol=1e-4, atol=1e-4)
    # 4-bit codes tie often and fast-scan keeps its heap approximately: tied ids come in any
    # order; untied ones agree with the single index (a few swap at the heap's edge)
    untied = np.ones_like(d2, bool)
    untied[:, 1:] &= ~np.isclose(d2[:, 1:], d2[:, :-1])
    untied[:, :-1] &= ~np.isclose(d2[:, :-1], d2[:, 1:])
    assert untied.mean() > 0.3 and (i1 == i2)[untied].mean() > 0.95
    _, reranked = exact_rerank(queries, cand, SideFileVectors(index_of(cfg).vectors_folder, 32), 10)
    assert recall_at(reranked, brute_force(queries, x, ids, 10), 10) >= 0.9


def test_sampled_positions_read_only_their_row_groups_and_equal_a_full_read(tmp_path):
    from pipeline.index.train import read_ok_vectors
    from pipeline.layout.embeddings import EmbeddingsFolder

    corpus = make_corpus(str(tmp_path / "emb"), shards=1, rows=3000, bad_every=7)  # 3 row groups of 1,024
    folder = EmbeddingsFolder(corpus.folder)
    all_rows, all_x = read_ok_vectors(folder, corpus.names[0])
    positions = np.array([2999, 5, 1500, 6, 1024])  # unsorted, across groups, one of them a bad row
    rows, x = read_ok_vectors(folder, corpus.names[0], positions=positions)
    want = [p for p in sorted(positions) if p in set(all_rows.tolist())]
    assert rows.tolist() == want
    np.testing.assert_array_equal(x, all_x[np.searchsorted(all_rows, want)])


def test_two_level_coarse_training_recalls_like_one_level(tmp_path):
    """The coarse k-means in two levels (what 2^20 lists need) gives an index as good as one level,
    with the OPQ pre-transform trained first and the codes trained after."""
    corpus = make_corpus(str(tmp_path / "emb"), shards=8, rows=500)
    built = {}
    for name, threshold in (("one", 0), ("two", 16)):
        cfg = config(corpus.folder, str(tmp_path / name), factory="OPQ8_32,IVF64,PQ16x4fsr", tune=False,
                     two_level_from_nlist=threshold)
        run_build(cfg, use_ray=False)
        built[name] = cfg
    assert "two-level k-means (8 x ~8)" in index_of(built["two"]).read_trained_info().device
    assert "two-level" not in index_of(built["one"]).read_trained_info().device
    numbers = {n: i for i, n in enumerate(registry_of(built["one"]).names)}
    x, ids = corpus.ok_matrix(numbers)
    queries = corpus.source.batch(10_000, 300)
    truth = brute_force(queries, x, ids, 10)
    recall = {}
    for name, cfg in built.items():
        with IndexSearcher(index_of(cfg), use_ray=False, threads=1) as s:
            _, found = s.search(queries, 10, nprobe=8)
        recall[name] = recall_at(found, truth, 10)
    assert recall["two"] >= recall["one"] - 0.05 and recall["two"] > 0.3, recall
