"""Caption counts: normalisation, a Ray run over a small corpus with planted duplicate captions,
the lookup search uses, and a rerun that counts only new shards."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.captions import caption_hash, caption_keys, lookup, normalize, run_captions
from pipeline.config import CaptionsConfig
from pipeline.errors import ConfigError, MismatchError
from pipeline.layout import embeddings as emb
from pipeline.layout.captions import CaptionsFolder
from pipeline.layout.embeddings import EmbeddingsFolder, EmbeddingsInfo, ShardStats

IDENT = {"embedder": "synthetic", "model": "none", "weights": "none", "dim": 4, "preprocess": "none"}

#: planted: one picture's caption in five spellings, another caption repeated exactly three times
SHARDS = {
    "s0": ["a red car", "A red Car", "unique one", None, "the scream by munch", "   "],
    "s1": ["A  RED car https://example.com/x.jpg", "the scream by munch", "unique two", "Ａ red car"],
    "s2": ["the scream by munch", "a red car\n", "unique three"],
}


def write_corpus(folder: EmbeddingsFolder, shards: dict[str, list]) -> None:
    folder.claim(EmbeddingsInfo(identity=IDENT))
    for name, captions in shards.items():
        n = len(captions)
        valid = np.ones(n, bool)
        table = emb.shard_table(name, 4, IDENT, {"key": [f"{name}-{i}" for i in range(n)], "caption": captions,
                                                 "status": [emb.STATUS_OK] * n},
                                np.ones((n, 4), np.float32) / 2, valid)
        folder.write_shard(table, ShardStats(shard=name, seen=n, embedded=n))


def test_normalize():
    assert normalize("  A  RED\tcar https://example.com/x.jpg ") == "a red car"
    assert normalize("Ａ red car") == "a red car"  # NFKC folds the full-width letter
    assert normalize("STRASSE straße") == "strasse strasse"  # casefold, not lower
    assert normalize("see www.example.com/page now") == "see now"
    assert caption_hash("a") != caption_hash("A") and caption_hash("a") == caption_hash("a")
    assert caption_keys([None, " "]) == [None, None]


def test_caption_counts_on_ray_with_planted_duplicates(tmp_path, ray_local):
    corpus = EmbeddingsFolder(str(tmp_path / "emb"))
    write_corpus(corpus, SHARDS)
    cfg = CaptionsConfig(embeddings=corpus.url, output=str(tmp_path / "captions"), partitions=3, group_size=2)
    info = run_captions(cfg)
    assert (info.rows, info.rows_with_caption, info.shards) == (13, 11, 3)

    # the reference: plain counting of the same captions
    texts = [t for caps in SHARDS.values() for t in caps if t is not None and t.strip()]
    exact = {t: texts.count(t) for t in texts}
    normal = {normalize(t): sum(normalize(u) == normalize(t) for u in texts) for t in texts}
    assert normal["a red car"] == 5 and normal["the scream by munch"] == 3 and exact["the scream by munch"] == 3
    assert (info.distinct_captions, info.distinct_normalized) == (len(exact), len(normal))

    out = CaptionsFolder(cfg.output)
    table = pq.read_table(out.counts_url())
    rows = {r["caption_hash"]: r for r in table.to_pylist()}
    assert len(rows) == len(exact)
    for text, count in exact.items():
        row = rows[caption_hash(text)]
        assert row["caption_count"] == count
        assert row["normalized_hash"] == caption_hash(normalize(text))
        assert row["normalized_count"] == normal[normalize(text)]
        # the normalised text is kept only where it is shared
        assert row["normalized"] == (normalize(text) if normal[normalize(text)] > 1 else None)

    # the lookup search uses: a corpus caption, a prompt equal to one after normalisation, a new one
    got = lookup(out, caption_keys(["A red Car", "A RED CAR!", "a Red car", None]))
    assert got[0] == {"caption_count": 1, "normalized_count": 5}
    assert got[1] == {"caption_count": 0, "normalized_count": 0}  # punctuation is not normalised away
    assert got[2] == {"caption_count": 0, "normalized_count": 5}
    assert got[3] is None

    # new shards: only they are read; the buckets are summed again
    write_corpus(corpus, {"s3": ["the scream by munch", "brand new"]})
    groups_before = len(out.partial_records())
    info = run_captions(cfg)
    assert len(out.partial_records()) == groups_before + 1 and info.shards == 4 and info.rows == 15
    assert lookup(out, caption_keys(["the scream by munch"]))[0] == {"caption_count": 4, "normalized_count": 4}

    # the command users run: nothing new to count, the buckets summed again
    from click.testing import CliRunner

    from pipeline.cli import app

    r = CliRunner().invoke(app, ["captions", "--embeddings", corpus.url, "--output", cfg.output, "--partitions", "3",
                                 "-q"])
    assert r.exit_code == 0 and "counted 13 captions of 15 rows in 4 shard(s)" in r.output, r.output

    with pytest.raises(MismatchError, match="partitions"):
        run_captions(CaptionsConfig(embeddings=corpus.url, output=cfg.output, partitions=5))
    with pytest.raises(ConfigError, match="no complete embedding shards"):
        empty = EmbeddingsFolder(str(tmp_path / "empty"))
        empty.claim(EmbeddingsInfo(identity=IDENT))
        run_captions(CaptionsConfig(embeddings=empty.url, output=str(tmp_path / "c2")))
