"""import-embeddings: a clip-retrieval / LAION release folder -> replica embedding shards."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import storage as io
from pipeline.config import ImportConfig
from pipeline.errors import ConfigError, MismatchError
from pipeline.import_embeddings import run_import
from pipeline.layout.embeddings import EmbeddingsFolder, identity_of_schema, vectors_of

DIM = 32


def write_release(root: Path, sizes: list[int], seed: int = 0, storage=None) -> list[np.ndarray]:
    """img_emb/img_emb_{i}.npy (fp16) + metadata/metadata_{i}.parquet, as clip-retrieval writes them."""
    rng = np.random.default_rng(seed)
    out = []
    base = str(root)
    for i, n in enumerate(sizes):
        x = rng.standard_normal((n, DIM)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        x = x.astype(np.float16)
        import io as _io

        buf = _io.BytesIO()
        np.save(buf, x)
        io.write_bytes(io.join(base, "img_emb", f"img_emb_{i}.npy"), buf.getvalue(), storage)
        meta = pa.table({
            "image_path": [f"{i:05d}{r:04d}" for r in range(n)],
            "caption": [f"a photo {i}-{r}" for r in range(n)],
            "url": [f"https://img.example/{i}/{r}.jpg" for r in range(n)],
            "key": [f"{i:05d}{r:04d}" for r in range(n)],
            "width": np.full(n, 640, np.int64),
            "height": np.full(n, 480, np.int64),
            "similarity": rng.random(n),
        })
        with io.atomic_output(io.join(base, "metadata", f"metadata_{i}.parquet"), storage) as f:
            pq.write_table(meta, f)
        out.append(x)
    return out


def cfg_for(inp: str, outp: str, storage=None, **over) -> ImportConfig:
    base = dict(input=inp, output=outp, embedder="open_clip", model="ViT-L-14", weights="openai",
                preprocess="resize224-centercrop", rows_per_shard=120, row_group_size=32)
    base.update(over)
    return ImportConfig(s3=storage or io.Storage(), **base)


def test_import_release_layout(tmp_path):
    released = write_release(tmp_path / "rel", [300, 50])
    cfg = cfg_for(str(tmp_path / "rel"), str(tmp_path / "emb"))
    summary = run_import(cfg)
    names = EmbeddingsFolder(cfg.output).complete_shards()
    assert names == ["emb-000000_0000", "emb-000000_0001", "emb-000000_0002", "emb-000001_0000"]
    assert summary["rows_written"] == 350 and summary["dim"] == DIM
    info = EmbeddingsFolder(cfg.output).read_info().to_json()
    assert info["identity"] == {"embedder": "open_clip", "model": "ViT-L-14", "weights": "openai",
                                "dim": DIM, "preprocess": "resize224-centercrop"}
    t = pq.read_table(tmp_path / "emb" / "emb-000000_0001.parquet")
    assert identity_of_schema(t.schema) == info["identity"]
    assert t.num_rows == 120 and t.column("row").to_pylist() == list(range(120))
    # key, url, caption and vector of release row 120+r are in the same output row r
    assert t.column("key").to_pylist()[5] == "000000125"
    assert t.column("url").to_pylist()[5] == "https://img.example/0/125.jpg"
    assert t.column("caption").to_pylist()[5] == "a photo 0-125"
    np.testing.assert_array_equal(vectors_of(t), released[0][120:240].astype(np.float32))
    assert set(t.column("status").to_pylist()) == {"ok"}
    assert t.column("width").to_pylist()[0] == 640
    assert pq.ParquetFile(tmp_path / "emb" / "emb-000000_0001.parquet").metadata.num_row_groups == 4
    stats = json.loads((tmp_path / "emb" / "emb-000001_0000.stats.json").read_text())
    assert stats["seen"] == 50 and stats["embedded"] == 50 and stats["source"]["rows"] == [0, 50]

    again = run_import(cfg)  # rerun: everything already complete
    assert again["written"] == 0


def test_import_then_index(tmp_path):
    from pipeline.index.build import run_build
    from pipeline.index.registry import fetch_rows
    from pipeline.index.serve import IndexSearcher
    from index_helpers import config, index_of, registry_of

    released = write_release(tmp_path / "rel", [400, 400], seed=3)
    cfg = cfg_for(str(tmp_path / "rel"), str(tmp_path / "emb"), rows_per_shard=200)
    run_import(cfg)
    icfg = config(cfg.output, str(tmp_path / "index"), factory="IVF8,Flat", group_size=2)
    run_build(icfg, use_ray=False)
    q = released[1][[17, 333]].astype(np.float32)
    with IndexSearcher(index_of(icfg), use_ray=False, identity=EmbeddingsFolder(cfg.output).read_info().identity) as s:
        _, ids = s.search(q, 1, nprobe=8)
    rows = fetch_rows(ids[:, 0], registry_of(icfg), columns=["key", "url"])
    assert rows.column("key").to_pylist() == ["000010017", "000010333"]


def test_import_refuses_bad_release(tmp_path):
    write_release(tmp_path / "rel", [100])
    with pytest.raises(ConfigError, match="embedder identity"):
        run_import(cfg_for(str(tmp_path / "rel"), str(tmp_path / "o"), embedder=""))
    with pytest.raises(MismatchError, match="dim 32"):
        run_import(cfg_for(str(tmp_path / "rel"), str(tmp_path / "o"), dim=768))
    with pytest.raises(ConfigError, match="img_emb"):
        run_import(cfg_for(str(tmp_path), str(tmp_path / "o")))
    # metadata that does not match the vectors row for row
    pq.write_table(pa.table({"key": ["a"] * 99}), tmp_path / "rel" / "metadata" / "metadata_0.parquet")
    with pytest.raises(MismatchError, match="row for row"):
        run_import(cfg_for(str(tmp_path / "rel"), str(tmp_path / "o")))
    # importing another model's vectors into an existing folder
    write_release(tmp_path / "rel2", [10])
    run_import(cfg_for(str(tmp_path / "rel2"), str(tmp_path / "o2")))
    with pytest.raises(MismatchError, match="model"):
        run_import(cfg_for(str(tmp_path / "rel2"), str(tmp_path / "o2"), model="ViT-B-32"))


def test_import_from_s3(s3_server, tmp_path):
    released = write_release("s3://replica-test/release", [130], storage=s3_server)
    cfg = cfg_for("s3://replica-test/release", "s3://replica-test/imported", storage=s3_server)
    run_import(cfg)
    assert EmbeddingsFolder(cfg.output, s3_server).complete_shards() == ["emb-000000_0000", "emb-000000_0001"]
    fs, path = io.filesystem(cfg.output + "/emb-000000_0001.parquet", s3_server)
    with fs.open(path, "rb") as f:
        t = pq.read_table(f)
    np.testing.assert_array_equal(vectors_of(t), released[0][120:].astype(np.float32))
