"""Shard registry and id encoding: numbers assigned once, ids map back to Parquet rows."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.index.registry import MAX_SHARD_NUMBER, ROW_MASK, Registry, decode_ids, encode_ids, fetch_rows
from pipeline.layout.embeddings import EmbeddingsFolder, vectors_of
from pipeline.layout.index import IndexFolder
from pipeline.testing.vectors import MixtureSource, identity, shard_table, write_folder, write_shard


def test_id_encoding_round_trips_at_the_limits():
    shards = np.array([0, 1, 584_999, MAX_SHARD_NUMBER], dtype=np.int64)
    rows = np.array([0, ROW_MASK, 9_999, 123], dtype=np.int64)
    ids = encode_ids(shards, rows)
    assert ids.dtype == np.int64 and (ids >= 0).all() and len(set(ids.tolist())) == 4
    s, r = decode_ids(ids)
    np.testing.assert_array_equal(s, shards)
    np.testing.assert_array_equal(r, rows)
    assert decode_ids(np.array([-1])) == (np.array([-1]), np.array([-1]))
    with pytest.raises(ValueError):
        encode_ids(0, ROW_MASK + 1)
    with pytest.raises(ValueError):
        encode_ids(MAX_SHARD_NUMBER + 1, 0)


def test_registration_never_renumbers(tmp_path):
    src = MixtureSource(16, latent=4, clusters=5)
    emb, index = EmbeddingsFolder(str(tmp_path / "emb")), IndexFolder(str(tmp_path / "index"))
    list(write_folder(emb, src, 3, 10))
    reg = Registry.load_or_create(index, emb, identity(16))
    assert reg.register_complete() == [0, 1, 2]
    reg.save(index)
    # new shards sort before and after the known ones: known numbers stay, new ones follow
    write_shard(emb, "000000a", src.batch(7, 10), identity(16))
    write_shard(emb, "zzz", src.batch(8, 10), identity(16))
    reg2 = Registry.load(index)
    assert reg2.register_complete() == [3, 4]
    assert reg2.names == ["000000", "000001", "000002", "000000a", "zzz"]
    assert reg2.version == 2 and reg2.register_complete() == [] and reg2.version == 2
    assert reg2.shard_rows(encode_ids([3, 1], [9, 0])) == [("000000a", 9), ("000001", 0)]


def test_fetch_rows_reads_right_rows_in_given_order(tmp_path):
    src = MixtureSource(16, latent=4, clusters=5)
    emb, index = EmbeddingsFolder(str(tmp_path / "emb")), IndexFolder(str(tmp_path / "index"))
    data = list(write_folder(emb, src, 3, 300, bad_every=0))
    for name, x, bad in data:  # small row groups: lookups read only a few of them
        write_shard(emb, name, x, identity(16), row_group_size=32)
    reg = Registry.load_or_create(index, emb, identity(16))
    reg.register_complete()
    ids = encode_ids([2, 0, 2, 1, 0], [299, 5, 0, 150, 5])
    t = fetch_rows(ids, reg, columns=["key", "tar_offset", "embedding"])
    assert t.column("id").to_pylist() == ids.tolist()
    assert t.column("key").to_pylist() == ["000002-000299", "000000-000005", "000002-000000", "000001-000150", "000000-000005"]
    np.testing.assert_array_equal(vectors_of(t)[0], data[2][1][299].astype(np.float16).astype(np.float32))
    assert t.column("tar_offset").to_pylist()[3] == 150 * 4096


def test_rows_found_by_row_column_when_file_is_not_in_row_order(tmp_path):
    src = MixtureSource(16, latent=4, clusters=5)
    x = src.batch(0, 100)
    table = shard_table("s", x, identity(16))
    shuffled = table.take(np.random.default_rng(0).permutation(100))
    pq.write_table(shuffled, tmp_path / "s.parquet", row_group_size=16)
    t = EmbeddingsFolder(str(tmp_path)).read_rows("s", np.array([7, 93, 0]), ["key", "embedding"])
    assert t.column("key").to_pylist() == ["s-000007", "s-000093", "s-000000"]
    np.testing.assert_array_equal(vectors_of(t)[1], x[93].astype(np.float16).astype(np.float32))
