"""Ingest: real img2dataset against a real HTTP server on 127.0.0.1, on a real local Ray.

The server (pipeline/testing/image_server.py) answers like the web answers a LAION crawl: images, slow
images, redirects, redirect loops, 404s, 500s, HTML, truncated and cut-off JPEGs, opt-outs.
Every one is a counted outcome; none stops the run.
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import app
from pipeline.config import EmbedConfig, IngestConfig
from pipeline.embed import run_embed
from pipeline.errors import EXIT_LOCKED, EXIT_REFUSED, EXIT_TOO_MANY_FAILURES, ConfigError, MismatchError
from pipeline.ingest import failure_reason, run_ingest
from pipeline.layout.ingest import IngestFolder
from pipeline.layout.lock import OutputLock
from pipeline.testing.image_server import ImageServer

#: what each kind of URL becomes: stored, or failed for this reason
OUTCOME = {"img": "stored", "slowok": "stored", "redirect": "stored", "slow": "timeout", "loop": "redirect_loop",
           "missing": "http_404", "error": "http_500", "html": "decode_error", "truncated": "decode_error",
           "cut": "incomplete_body", "noai": "opted_out"}
KINDS = ["img", "img", "img", "slowok", "slow", "redirect", "loop", "missing", "error", "html", "truncated", "cut",
         "noai", "img"]


@pytest.fixture(scope="module")
def server():
    with ImageServer(ok_delay_s=0.3, slow_delay_s=8.0) as srv:
        for i in range(len(KINDS)):  # drawn before the runs: a busy machine must not turn a good URL into a timeout
            srv.image(i)
        yield srv


def write_list(path: Path, urls: list[str], first: int = 0) -> None:
    n = len(urls)
    pq.write_table(pa.table({"URL": urls, "TEXT": [f"caption {first + i}" for i in range(n)],
                             "similarity": [0.25 + i / 100 for i in range(n)], "punsafe": [0.0] * n}), path)


def cfg_for(lists: Path, out: Path, **kw) -> IngestConfig:
    base = dict(input=[str(lists)], output=str(out), url_column="URL", caption_column="TEXT", columns=["similarity"],
                samples_per_shard=6, threads=8, timeout=3, max_failed_fraction=1.0)
    return IngestConfig(**{**base, **kw})


def tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


def test_every_answer_of_the_web_is_counted_and_the_tars_are_what_embed_reads(tmp_path, server, ray_local):
    urls = [server.url(kind, i) for i, kind in enumerate(KINDS)]
    urls[-1] = server.url("img", len(KINDS) - 1, w=200, h=150)  # smaller than image_size: kept as it was served
    (tmp_path / "lists").mkdir()
    write_list(tmp_path / "lists" / "part-0.parquet", urls)
    out = tmp_path / "tars"

    s = run_ingest(cfg_for(tmp_path / "lists", out))

    expected_failures: dict[str, int] = {}
    for kind in KINDS:
        if OUTCOME[kind] != "stored":
            expected_failures[OUTCOME[kind]] = expected_failures.get(OUTCOME[kind], 0) + 1
    stored = [i for i, kind in enumerate(KINDS) if OUTCOME[kind] == "stored"]
    assert (s.urls, s.downloaded, s.shards_done, s.shards_failed) == (len(KINDS), len(stored), 3, {})
    assert s.failed == expected_failures
    assert s.failed_to_download + s.failed_to_resize == len(KINDS) - len(stored)
    assert s.bytes == sum((out / f"{n:06d}.tar").stat().st_size for n in range(3)) and s.bytes > 0
    assert s.urls_per_s > 0 and s.images_per_s > 0

    # img2dataset's layout: one tar, one Parquet and one stats file per shard of 6 URLs
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"{n:06d}{ext}" for n in range(3) for ext in (".tar", ".parquet", "_stats.json")]
                           + ["_replica"])
    samples = {}
    for n in range(3):
        samples.update(tar_samples(out / f"{n:06d}.tar"))
    # keys: shard number then position in the shard (img2dataset's rule), so key <-> URL is fixed
    assert sorted(samples) == sorted(f"{i // 6:06d}{i % 6}" for i in stored)
    for i in stored:
        members = samples[f"{i // 6:06d}{i % 6}"]
        meta = json.loads(members["json"])
        assert set(members) == {"jpg", "txt", "json"}
        assert meta["url"] == urls[i] and members["txt"].decode() == f"caption {i}"
        assert meta["similarity"] == pytest.approx(0.25 + i / 100) and meta["status"] == "success"
        served = server.image(i, 200, 150) if i == len(KINDS) - 1 else server.image(i)
        assert meta["sha256"] == hashlib.sha256(served).hexdigest()  # the hash of what the site served
        image = Image.open(io.BytesIO(members["jpg"]))
        if i == len(KINDS) - 1:  # already smaller than 288: neither upscaled nor re-encoded
            assert members["jpg"] == served and image.size == (200, 150)
        else:  # keep_ratio at 288: short side 288, nothing cropped or padded
            assert image.size == (384, 288) and (meta["original_width"], meta["original_height"]) == (640, 480)
    per_url = pq.read_table(out / "000001.parquet").to_pylist()  # img2dataset's row per URL, failures included
    assert {r["url"]: r["status"] for r in per_url}[urls[7]] == "failed_to_download"

    # embed reads the folder as it is: every stored image once, with its URL and caption
    emb = run_embed(EmbedConfig(input=[str(out / "*.tar")], output=str(tmp_path / "emb"), batch_size=8))
    assert (emb.images, emb.embedded, emb.failed) == (len(stored), len(stored), {})
    rows = pq.ParquetDataset(sorted(str(p) for p in (tmp_path / "emb").glob("*.parquet"))).read().to_pylist()
    assert sorted(r["url"] for r in rows) == sorted(urls[i] for i in stored)
    assert all(r["caption"] == f"caption {urls.index(r['url'])}" for r in rows)


def test_reruns_fetch_nothing_and_new_lists_get_new_shards(tmp_path, server, ray_local):
    lists, out = tmp_path / "lists", tmp_path / "tars"
    lists.mkdir()
    write_list(lists / "b.parquet", [server.url("img", 100 + i) for i in range(8)], first=100)
    first = run_ingest(cfg_for(lists, out))
    assert (first.shards_done, first.downloaded) == (2, 8)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    hits = sum(server.hits.values())

    again = run_ingest(cfg_for(lists, out))
    assert (again.lists_skipped, again.shards_skipped, again.shards_done, again.urls) == (1, 2, 0, 0)
    assert sum(server.hits.values()) == hits  # not a single request
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == mtimes

    # a list added later, even one that sorts first, gets the next shard numbers: nothing is renumbered
    write_list(lists / "a.parquet", [server.url("img", 200 + i) for i in range(3)], first=200)
    (lists / "README.md").write_text("not a URL list: left out of a folder's lists")
    added = run_ingest(cfg_for(lists, out))
    assert (added.lists_skipped, added.shards_done, added.downloaded) == (1, 1, 3)
    assert [Path(t).name for t in added.new_tars] == ["000002.tar"]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name in mtimes} == mtimes
    ledger = IngestFolder(str(out)).read_info()
    assert [(Path(x.url).name, x.first_shard, x.shards) for x in ledger.lists] == [("b.parquet", 0, 2), ("a.parquet", 2, 1)]
    assert all(k.startswith("000002") for k in tar_samples(out / "000002.tar"))

    # a tar whose stats file is missing (a shard cut short) is redone, and embed leaves it alone until then
    (out / "000001_stats.json").unlink()
    emb = run_embed(EmbedConfig(input=[str(out / "*.tar")], output=str(tmp_path / "emb")))
    assert emb.shards_total == 2 and not (tmp_path / "emb" / "000001.parquet").exists()
    redo = run_ingest(cfg_for(lists, out))
    assert (redo.shards_done, redo.downloaded, [Path(t).name for t in redo.new_tars]) == (1, 2, ["000001.tar"])

    # a list that changed under its name, or other tar settings in the same folder: refused before work
    write_list(lists / "b.parquet", [server.url("img", 100 + i) for i in range(9)], first=100)
    with pytest.raises(ConfigError, match="changed since it was ingested"):
        run_ingest(cfg_for(lists, out))
    write_list(lists / "b.parquet", [server.url("img", 100 + i) for i in range(8)], first=100)
    with pytest.raises(MismatchError, match="image_size: 288 there vs 224 now"):
        run_ingest(cfg_for(lists, out, image_size=224))


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def test_bad_settings_are_refused_before_a_single_request(tmp_path, server):
    lists = tmp_path / "lists"
    lists.mkdir()
    write_list(lists / "part.parquet", [server.url("img", 300 + i) for i in range(3)])
    (lists / "notes.md").write_text("not a list")
    common = ["ingest", "-i", str(lists / "part.parquet"), "-o", str(tmp_path / "tars")]
    hits = sum(server.hits.values())
    cases = [
        ([*common], "has no column 'url' for url_column (its columns: URL, TEXT, similarity, punsafe)"),
        ([*common, "--url-column", "URL"], "no column 'caption' for caption_column"),
        ([*common, "--url-column", "URL", "--caption-column", "TEXT", "--columns", "NSFW"], "no column 'NSFW'"),
        ([*common, "--url-column", "URL", "--caption-column", "", "--timeout", "0"], "timeout must be > 0"),
        ([*common, "--url-column", "URL", "--caption-column", "", "--image-size", "0"], "image_size must be >= 1"),
        ([*common, "--url-column", "URL", "--caption-column", "", "--encode-format", "png", "--encode-quality", "95"],
         "encode_quality must lie in [0, 9] for png"),
        (["ingest", "-i", str(lists / "notes.md"), "-o", str(tmp_path / "tars")], "cannot tell the format"),
        (["ingest", "-i", str(lists / "none-*.parquet"), "-o", str(tmp_path / "tars")], "no URL list"),
        ([*common, "--resize-mode", "stretch"], "'stretch' is not one of"),
    ]
    for args, message in cases:
        r = invoke(*args)
        lines = [line for line in r.output.splitlines() if line.strip()]
        assert r.exit_code == EXIT_REFUSED, (args, r.output)
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, r.output)
    assert sum(server.hits.values()) == hits
    assert not (tmp_path / "tars").exists() or not any((tmp_path / "tars").glob("*.tar"))


def test_a_held_lock_refuses_and_failures_over_the_limit_exit_3(tmp_path, server, ray_local):
    lists = tmp_path / "lists"
    lists.mkdir()
    write_list(lists / "dead.parquet", [server.url("missing", 400 + i) for i in range(4)] + [server.url("img", 404)])
    args = ["ingest", "-i", str(lists), "-o", str(tmp_path / "tars"), "--url-column", "URL", "--caption-column",
            "TEXT", "--samples-per-shard", "5", "--threads", "4", "--quiet"]
    with OutputLock(IngestFolder(str(tmp_path / "tars")).own(), "replica ingest"):
        r = invoke(*args)
    assert r.exit_code == EXIT_LOCKED and "is locked by `replica ingest`" in r.output

    r = invoke(*args, "--max-failed-fraction", "0.5")
    assert r.exit_code == EXIT_TOO_MANY_FAILURES, r.output
    assert "ingested 1/5 images into 1 shard(s)" in r.output and "failed: http_404=4" in r.output
    assert "4 of 5 URLs failed (80.0%, limit 50.0%; http_404=4)" in r.output


def test_failure_reasons_from_img2dataset_messages():
    assert failure_reason("HTTP Error 404: Not Found") == "http_404"
    assert failure_reason("HTTP Error 302: The HTTP server returned a redirect error that would lead to an infinite "
                          "loop.\nThe last 30x error message was:\nFound") == "redirect_loop"
    assert failure_reason("<urlopen error [Errno -2] Name or service not known>") == "dns"
    assert failure_reason("<urlopen error [Errno 111] Connection refused>") == "connection"
    assert failure_reason("IncompleteRead(30579 bytes read, 30580 more expected)") == "incomplete_body"
    assert failure_reason("The read operation timed out") == "timeout"
    assert failure_reason("Image decoding error") == "decode_error"
    assert failure_reason("Use of image disallowed by X-Robots-Tag directive") == "opted_out"
    assert failure_reason("something new") == "other"
