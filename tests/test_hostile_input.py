"""Hostile and malformed input: each kind becomes a row with a status and an error, a counted skip,
or a one-line refusal. The job never dies and nothing else is lost."""
from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from image_helpers import encode, sideways_jpeg
from PIL import Image

from pipeline.cli import app
from pipeline.config import EmbedConfig
from pipeline.embed import run_embed
from pipeline.errors import EXIT_REFUSED
from pipeline.layout.embeddings import EmbeddingsFolder
from pipeline.synthetic_images import scene


def photo(seed: int = 1, size=(96, 80)) -> Image.Image:
    return scene(seed, size)


def frames(fmt: str) -> bytes:
    images = [photo(s) for s in (1, 2, 3)]
    return encode(images[0], fmt, save_all=True, append_images=images[1:], duration=100, loop=0)


def bomb_png() -> bytes:
    """A 30,000 x 30,000 PNG of a few KB (900 M pixels): PIL refuses to decode it."""
    import struct
    import zlib

    width = height = 30_000
    row = b"\x00" + bytes(width)  # filter byte + one grey byte per pixel
    comp = zlib.compressobj(9)
    data = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + \
        chunk(b"IDAT", data) + chunk(b"IEND", b"")


def member(tf: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


#: (key, members, expected status, a phrase of the error or None). Order = tar order.
def hostile_samples() -> list[tuple[str, list[tuple[str, bytes]], str, str | None]]:
    jpeg = encode(photo(), "JPEG", quality=90)
    png = encode(photo(2), "PNG")
    webp = encode(photo(3), "WEBP")
    cmyk = encode(photo(4).convert("CMYK"), "JPEG")
    deep = encode(Image.fromarray((np.linspace(0, 65535, 96 * 80).reshape(80, 96)).astype(np.uint16)), "PNG")
    palette = encode(photo(5).convert("P"), "PNG")
    grey_alpha = encode(photo(6).convert("LA"), "PNG")
    return [
        ("ok", [("jpg", jpeg), ("txt", b"a plain caption")], "ok", None),
        ("zero-byte", [("jpg", b"")], "decode_error", "UnidentifiedImageError"),
        ("truncated-jpeg", [("jpg", jpeg[: len(jpeg) // 2])], "decode_error", "truncated"),
        ("truncated-png", [("png", png[: len(png) // 2])], "decode_error", None),
        ("truncated-webp", [("webp", webp[: len(webp) // 2])], "decode_error", None),
        ("png-named-jpg", [("jpg", png)], "ok", None),
        ("bomb", [("png", bomb_png())], "decode_error", "DecompressionBomb"),
        ("cmyk", [("jpg", cmyk)], "ok", None),
        ("sixteen-bit", [("png", deep)], "ok", None),
        ("palette", [("png", palette)], "ok", None),
        ("grey-alpha", [("png", grey_alpha)], "ok", None),
        ("animated-gif", [("jpg", frames("GIF"))], "ok", None),
        ("animated-webp", [("webp", frames("WEBP"))], "ok", None),
        ("svg-as-jpg", [("jpg", b"<svg xmlns='http://www.w3.org/2000/svg'><rect width='9' height='9'/></svg>")],
         "decode_error", "UnidentifiedImageError"),
        ("html-as-jpg", [("jpg", b"<!doctype html><html><body>not an image</body></html>")], "decode_error", None),
        ("latin1-caption", [("jpg", jpeg), ("txt", "caf\xe9 cr\xe8me".encode("latin-1"))], "ok", None),
        ("huge-caption", [("jpg", jpeg), ("txt", b"x" * 1_000_000)], "ok", None),
        ("bad-json", [("jpg", jpeg), ("json", b"{not json")], "ok", None),
        ("huge-json", [("jpg", jpeg), ("json", b'{"url": "' + b"y" * (2 << 20) + b'"}')], "ok", None),
        ("two-images", [("jpg", jpeg), ("png", png)], "ok", None),
        ("upright", [("jpg", encode(photo(7, (96, 64)), "JPEG", quality=95))], "ok", None),
        ("exif-rotated", [("jpg", sideways_jpeg(photo(7, (96, 64))))], "ok", None),
        ("no-image", [("txt", b"caption only")], "no_image", "no image member"),
        ("../escape", [("jpg", jpeg)], "ok", None),
        ("/absolute/path", [("jpg", jpeg)], "ok", None),
        ("x" * 150, [("jpg", jpeg)], "ok", None),  # a PAX/GNU long name
        ("ok", [("jpg", jpeg)], "duplicate_key", "already at row 0"),  # the first key again, further on
    ]


@pytest.fixture(scope="module")
def hostile(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    (root / "tars").mkdir()
    samples = hostile_samples()
    with tarfile.open(root / "tars" / "00000.tar", "w", format=tarfile.GNU_FORMAT) as tf:
        for key, members, _, _ in samples:
            for ext, data in members:
                member(tf, f"{key}.{ext}", data)
        member(tf, "link.jpg", kind=tarfile.SYMTYPE, link="/etc/passwd")
        member(tf, "hard.jpg", kind=tarfile.LNKTYPE, link="ok.jpg")
        member(tf, "dev.jpg", kind=tarfile.CHRTYPE)
    with tarfile.open(root / "tars" / "00001.tar", "w") as tf:  # the same key in another tar
        member(tf, "ok.jpg", encode(photo(9), "JPEG"))
    with tarfile.open(root / "tars" / "00002.tar", "w"):  # a valid, empty tar
        pass
    plain = (root / "tars" / "00000.tar").read_bytes()
    (root / "tars" / "00003.tar").write_bytes(gzip.compress(plain))  # a gzip-compressed tar
    (root / "tars" / "00004.tar").write_bytes(b"this object is not a tar at all" * 40)
    out = root / "emb"
    summary = run_embed(EmbedConfig(input=[str(root / "tars" / "*.tar")], output=str(out), batch_size=8))
    rows = {}
    folder = EmbeddingsFolder(str(out))
    for shard in folder.complete_shards():
        for r in pq.read_table(folder.parquet_url(shard)).to_pylist():
            rows.setdefault(shard, []).append(r)
    return {"root": root, "summary": summary, "rows": rows, "folder": folder, "samples": samples}


def test_every_hostile_sample_is_a_row_with_its_status(hostile):
    rows = hostile["rows"]["00000"]
    assert [r["key"] for r in rows] == [k for k, *_ in hostile["samples"]]
    for row, (key, _, status, phrase) in zip(rows, hostile["samples"]):
        assert row["status"] == status, (key, row["status"], row["error"])
        assert (row["embedding"] is not None) == (status == "ok"), key
        if phrase:
            assert phrase in (row["error"] or ""), (key, row["error"])


def test_text_and_metadata_edge_cases(hostile):
    by_key = {r["key"]: r for r in hostile["rows"]["00000"]}
    assert by_key["latin1-caption"]["caption"] == "caf\ufffd cr\ufffdme"  # decoded, never a crash
    assert len(by_key["huge-caption"]["caption"]) == 16384  # cut to MAX_CAPTION_CHARS
    assert by_key["bad-json"]["url"] is None and by_key["huge-json"]["url"] is None
    assert by_key["two-images"]["tar_size"] == len(encode(photo(), "JPEG", quality=90))  # the .jpg is used
    stats = hostile["folder"].read_stats("00000")
    assert stats.skipped == {"symlink": 1, "hardlink": 1, "device": 1, "oversize_json": 1}
    assert not Path("/etc/passwd.jpg").exists() and not (hostile["root"] / "escape.jpg").exists()


def test_an_exif_rotated_jpeg_is_embedded_upright(hostile):
    """Stored sideways with an Orientation tag, it is embedded (and sized) as viewers show it, and the
    identity says so; the same bytes not turned, as corpora embedded before were, give another vector."""
    from pipeline.config import EmbedderConfig
    from pipeline.embedders.default import DefaultDescriptor

    by_key = {r["key"]: r for r in hostile["rows"]["00000"]}
    upright, rotated = (np.asarray(by_key[k]["embedding"]) for k in ("upright", "exif-rotated"))
    assert (by_key["exif-rotated"]["width"], by_key["exif-rotated"]["height"]) == (96, 64)
    assert hostile["folder"].read_info().identity["preprocess"].startswith("exif-upright,")
    assert float(upright @ rotated) > 0.97
    unturned = DefaultDescriptor(EmbedderConfig(exif_orientation=False))
    assert "exif-upright" not in unturned.identity()["preprocess"]
    sideways = unturned.embed_images([Image.open(io.BytesIO(sideways_jpeg(photo(7, (96, 64)))))])[0]
    assert float(upright @ sideways) < float(upright @ rotated) - 0.2


def test_a_folder_embedded_unturned_is_continued_only_as_it_was_made(ray_local, tmp_path):
    from pipeline.config import EmbedderConfig
    from pipeline.errors import MismatchError
    from pipeline.sample import make_sample_tars

    make_sample_tars(str(tmp_path / "t"), tars=2, per_tar=3)
    first = EmbedConfig(input=[str(tmp_path / "t" / "00000.tar")], output=str(tmp_path / "o"),
                        embedder=EmbedderConfig(exif_orientation=False))
    run_embed(first)
    later = EmbedConfig(input=[str(tmp_path / "t" / "*.tar")], output=str(tmp_path / "o"))
    with pytest.raises(MismatchError, match="before images were turned upright.*--no-embedder-exif-orientation"):
        run_embed(later)
    later.embedder.exif_orientation = False
    assert run_embed(later).embedded == 3  # only the new tar


def test_the_same_key_in_two_tars_lands_twice_with_distinct_ids(hostile):
    assert [r["key"] for r in hostile["rows"]["00001"]] == ["ok"] and hostile["rows"]["00001"][0]["status"] == "ok"


def test_damaged_tars_are_shard_errors_and_the_rest_completes(hostile):
    s = hostile["summary"]
    assert set(s.shard_errors) == {"00003", "00004"} and not s.shards_failed
    assert "gzip-compressed" in s.shard_errors["00003"]
    assert hostile["rows"].get("00002") is None or hostile["rows"]["00002"] == []
    assert hostile["folder"].read_stats("00002").seen == 0  # an empty tar is complete, with nothing in it
    assert hostile["folder"].complete_shards() == ["00000", "00001", "00002", "00003", "00004"]


def one_line_refusal(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith("warning:")]
    assert result.exit_code == EXIT_REFUSED and len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_an_embeddings_shard_with_a_wrong_schema_is_refused(tmp_path):
    from pipeline.config import IndexConfig
    from pipeline.index.train import run_train
    from pipeline.layout.embeddings import EmbeddingsInfo, ShardStats
    from pipeline.testing.vectors import MixtureSource, identity, write_folder

    folder = EmbeddingsFolder(str(tmp_path / "emb"))
    list(write_folder(folder, MixtureSource(16, latent=4, clusters=4), 2, 300))
    folder.claim(EmbeddingsInfo(identity=identity(16)))
    with folder.atomic("wrong.parquet") as f:
        pq.write_table(pa.table({"key": ["a"], "vector": [[0.1] * 16]}), f)
    run_train(IndexConfig(embeddings=folder.url, index=str(tmp_path / "index"), factory="IVF4,Flat"))
    folder.write_json("wrong.stats.json", ShardStats(shard="wrong", seen=1, embedded=1).to_json())
    # add meets it in the part that holds it: that part fails, in one line, the others are recorded
    r = CliRunner().invoke(app, ["index", "add", "--embeddings", folder.url, "--index", str(tmp_path / "index"),
                                 "--local", "--group-size", "1"])
    last = r.output.strip().splitlines()[-1]
    assert r.exit_code == EXIT_REFUSED and last.startswith("error: ") and "is not an embedding shard" in last
    assert "embedding, row, status" in last
    # a fresh build meets it in its training sample and stops before training
    r = CliRunner().invoke(app, ["index", "build", "--embeddings", folder.url, "--index", str(tmp_path / "index2"),
                                 "--local", "--factory", "IVF4,Flat"])
    assert r.exit_code == EXIT_REFUSED and "is not an embedding shard" in r.output.strip().splitlines()[-1]
    assert not (tmp_path / "index2" / "trained.index").exists()


def test_a_corrupt_index_shard_is_refused_on_load(tmp_path):
    from pipeline.config import IndexConfig
    from pipeline.errors import MismatchError
    from pipeline.index.build import run_build
    from pipeline.index.serve import IndexSearcher
    from pipeline.layout.index import IndexFolder
    from pipeline.testing.vectors import MixtureSource, write_folder

    list(write_folder(EmbeddingsFolder(str(tmp_path / "emb")), MixtureSource(16, latent=4, clusters=4), 2, 300))
    manifest = run_build(IndexConfig(embeddings=str(tmp_path / "emb"), index=str(tmp_path / "index"),
                                     factory="IVF4,Flat"), use_ray=False).manifest
    data = tmp_path / "index" / manifest.shards[0].ivfdata
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte in the inverted lists
    data.write_bytes(bytes(raw))
    with pytest.raises(MismatchError, match="does not match the manifest's checksum"):
        IndexSearcher(IndexFolder(str(tmp_path / "index")), use_ray=False)


def test_a_corpus_too_small_for_the_factory(tmp_path):
    from pipeline.testing.vectors import MixtureSource, write_folder

    list(write_folder(EmbeddingsFolder(str(tmp_path / "emb")), MixtureSource(64, latent=4, clusters=4), 1, 180))
    args = ["index", "train", "--embeddings", str(tmp_path / "emb"), "--index", str(tmp_path / "i1")]
    line = one_line_refusal(CliRunner().invoke(app, [*args, "--factory", "IVF16,PQ16x8"]))
    assert "needs at least 256 training vectors" in line and "only 180 are available" in line
    r = CliRunner().invoke(app, [*args[:-1], str(tmp_path / "i2")])  # left to choose: a factory that fits
    assert r.exit_code == 0 and "IVF16,Flat" in r.output, r.output


def test_queries_folder_with_non_images_and_lists_with_wrong_columns(ray_local, tmp_path):
    from pipeline.queries import load_key_set, load_queries
    from pipeline.errors import ConfigError

    folder = tmp_path / "generated"
    folder.mkdir()
    photo(1).save(folder / "good.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (folder / "notes.pdf").write_bytes(b"%PDF-1.4")
    (folder / "good.txt").write_text("a prompt")
    found = load_queries(str(folder))
    assert [q.key for q in found.queries] == ["good"] and found.queries[0].prompt == "a prompt"
    assert sorted(Path(src).name for src, _ in found.unreadable) == ["broken.png", "notes.pdf"]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.png").write_bytes(b"nope")
    with pytest.raises(ConfigError, match="no query images found.*1 unreadable"):
        load_queries(str(empty))
    pq.write_table(pa.table({"score": [1, 2], "label": ["a", "b"]}), tmp_path / "subset.parquet")
    with pytest.raises(ConfigError, match="has no key/url/sha256 column"):
        load_key_set(str(tmp_path / "subset.parquet"))
    pq.write_table(pa.table({"URL": ["https://a", None], "other": ["x", "y"]}), tmp_path / "laion.parquet")
    assert load_key_set(str(tmp_path / "laion.parquet")) == {"https://a"}


@pytest.mark.parametrize("body, phrase", [
    ("embed:\n  nonsense: 1\n", "unknown setting embed.nonsense"),
    ("embed:\n  batch_size: [1, 2]\n", "batch_size must be a number"),
    ("embed:\n  batch_size: -4\n", "batch_size must be >= 1"),
    ("embed:\n  max_failed_fraction: 2\n", "max_failed_fraction must lie in [0, 1]"),
    ("embed:\n  embedder: 7\n", "embed.embedder must be a mapping"),
    ("- just\n- a list\n", "must hold a mapping"),
    ("embed: {input: [\n", "cannot be parsed"),
])
def test_config_fuzz_is_refused_in_one_line(tmp_path, body, phrase):
    from pipeline.sample import make_sample_tars

    make_sample_tars(str(tmp_path / "t"), tars=1, per_tar=2)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(body)
    r = CliRunner().invoke(app, ["embed", "-c", str(cfg), "-i", str(tmp_path / "t" / "*.tar"), "-o", str(tmp_path / "o")])
    assert phrase in one_line_refusal(r)


def test_paths_with_spaces_and_unicode(ray_local, tmp_path):
    from pipeline.sample import make_sample_tars

    where = tmp_path / "dossier d'images — 画像"
    make_sample_tars(str(where / "tars in here"), tars=1, per_tar=4)
    r = CliRunner().invoke(app, ["embed", "-i", str(where / "tars in here" / "*.tar"), "-o", str(where / "sortie é"), "-q"])
    assert r.exit_code == 0 and "embedded 4/4" in r.output, r.output
    assert json.loads((where / "sortie é" / "00000.stats.json").read_text())["embedded"] == 4
