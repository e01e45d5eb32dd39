"""Embed stage on real tars, a real local Ray, and a real local S3 server."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import synthetic_images as synthetic
from pipeline.layout import embeddings as schema
from pipeline.config import EmbedConfig, EmbedderConfig
from pipeline.embed import run_embed
from pipeline.storage import read_range
from pipeline.sample import jpeg_bytes, laion_sample, make_sample_tars, write_tar

REPLICA = [sys.executable, "-m", "pipeline.cli"]

EXPECTED_COLUMNS = [
    "key", "shard", "row", "url", "caption", "width", "height", "tar_url",
    "tar_offset", "tar_size", "sha256", "status", "error", "embedding",
]


def read_output(folder: str | Path) -> "pa.Table":  # noqa: F821
    files = sorted(Path(folder).glob("*.parquet"))
    return pq.ParquetDataset([str(f) for f in files]).read()


def cfg_for(inp, out, **kw) -> EmbedConfig:
    return EmbedConfig(input=[str(inp)], output=str(out), batch_size=16, **kw)


def test_schema_and_exact_row_counts(tmp_path, ray_local):
    make_sample_tars(str(tmp_path / "tars"), tars=3, per_tar=25)
    s = run_embed(cfg_for(tmp_path / "tars" / "*.tar", tmp_path / "emb"))
    assert (s.shards_done, s.images, s.embedded, s.failed) == (3, 75, 75, {})

    for shard in ("00000", "00001", "00002"):
        f = pq.ParquetFile(tmp_path / "emb" / f"{shard}.parquet")
        assert f.schema_arrow.names == EXPECTED_COLUMNS
        assert f.schema_arrow.field("embedding").type.value_type == "halffloat"
        identity = schema.identity_of_schema(f.schema_arrow)
        assert identity["embedder"] == "default" and identity["dim"] == f.schema_arrow.field("embedding").type.list_size
        assert f.metadata.num_row_groups >= 1
        t = f.read()
        assert t.num_rows == 25
        assert t.column("row").to_pylist() == list(range(25))
        assert set(t.column("shard").to_pylist()) == {shard}
        stats = json.loads((tmp_path / "emb" / f"{shard}.stats.json").read_text())
        assert stats["seen"] == stats["embedded"] == 25 and stats["shard_error"] is None

    t = read_output(tmp_path / "emb")
    keys = t.column("key").to_pylist()
    assert len(keys) == len(set(keys)) == 75
    vecs = schema.vectors_of(t)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=2e-3)
    assert t.column("caption")[0].as_py() == synthetic.caption(0)
    assert t.column("url")[0].as_py().startswith("https://example.org/")

    # A rerun skips every complete shard and changes nothing.
    before = (tmp_path / "emb" / "00000.parquet").stat().st_mtime_ns
    again = run_embed(cfg_for(tmp_path / "tars" / "*.tar", tmp_path / "emb"))
    assert (again.shards_skipped, again.shards_done) == (3, 0)
    assert (tmp_path / "emb" / "00000.parquet").stat().st_mtime_ns == before


def test_ranged_reads_return_the_original_image_bytes(tmp_path, ray_local):
    make_sample_tars(str(tmp_path / "tars"), tars=1, per_tar=12)
    run_embed(cfg_for(tmp_path / "tars" / "00000.tar", tmp_path / "emb"))
    t = pq.read_table(tmp_path / "emb" / "00000.parquet")
    with tarfile.open(tmp_path / "tars" / "00000.tar") as tf:
        originals = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
    for row in t.to_pylist():
        data = read_range(row["tar_url"], row["tar_offset"], row["tar_size"])
        assert data == originals[f"{row['key']}.jpg"]
        assert Image.open(__import__("io").BytesIO(data)).size == (row["width"], row["height"])


def test_bad_samples_become_rows_not_crashes(tmp_path, ray_local):
    good = synthetic.scene(1)
    png = __import__("io").BytesIO()
    good.save(png, format="PNG")
    samples = [
        laion_sample("k0", good, "fine", "https://x/0.jpg"),
        ("k1", {"jpg": b"\xff\xd8\xff\xe0 this is not a jpeg", "txt": b"corrupt"}),
        ("k2", {"txt": b"caption only", "json": b'{"url": "https://x/2.jpg"}'}),
        ("k3", {"jpg": jpeg_bytes(good)[:600], "txt": b"truncated jpeg"}),
        ("k4", {"png": png.getvalue(), "json": b'{"url": "https://x/4.png", "caption": "from json"}'}),
        laion_sample("k5", synthetic.scene(5), "last", "https://x/5.jpg"),
    ]
    write_tar(str(tmp_path / "tars" / "bad.tar"), samples)
    # A second tar cut in the middle of its fourth image.
    write_tar(str(tmp_path / "tars" / "cut.tar"), [laion_sample(f"c{i}", synthetic.scene(10 + i), "c", "u") for i in range(6)])
    raw = (tmp_path / "tars" / "cut.tar").read_bytes()
    with tarfile.open(tmp_path / "tars" / "cut.tar") as tf:
        fourth = [m for m in tf.getmembers() if m.name == "c3.jpg"][0]
    (tmp_path / "tars" / "cut.tar").write_bytes(raw[: fourth.offset_data + fourth.size // 2])

    s = run_embed(cfg_for(tmp_path / "tars" / "*.tar", tmp_path / "emb"))
    assert s.shards_done == 2 and "cut" in s.shard_errors

    bad = pq.read_table(tmp_path / "emb" / "bad.parquet").to_pylist()
    assert [r["key"] for r in bad] == ["k0", "k1", "k2", "k3", "k4", "k5"]
    assert [r["status"] for r in bad] == ["ok", "decode_error", "no_image", "decode_error", "ok", "ok"]
    assert all(r["error"] for r in bad if r["status"] != "ok")
    assert all(r["embedding"] is None for r in bad if r["status"] != "ok")
    assert bad[4]["caption"] == "from json" and bad[4]["url"] == "https://x/4.png"
    assert bad[2]["url"] == "https://x/2.jpg"

    cut = pq.read_table(tmp_path / "emb" / "cut.parquet").to_pylist()
    assert [r["key"] for r in cut] == ["c0", "c1", "c2", "c3"]
    assert [r["status"] for r in cut] == ["ok", "ok", "ok", "read_error"]
    stats = json.loads((tmp_path / "emb" / "cut.stats.json").read_text())
    assert stats["seen"] == 4 and stats["embedded"] == 3 and stats["failed"] == {"read_error": 1}
    assert "unexpected end of data" in stats["shard_error"]
    bad_stats = json.loads((tmp_path / "emb" / "bad.stats.json").read_text())
    assert bad_stats["failed"] == {"decode_error": 2, "no_image": 1}


def test_killed_actor_is_restarted_and_every_key_lands_once(tmp_path, ray_local):
    make_sample_tars(str(tmp_path / "tars"), tars=6, per_tar=30)
    killed = []

    def kill_actor_once(stats):
        if not killed:
            os.kill(stats.embedded_by["pid"], signal.SIGKILL)
            killed.append(stats.embedded_by["pid"])

    cfg = cfg_for(tmp_path / "tars" / "*.tar", tmp_path / "emb", max_tars_in_flight=1)
    s = run_embed(cfg, on_shard_done=kill_actor_once)
    assert killed and s.shards_done == 6 and s.embedded == 180
    t = read_output(tmp_path / "emb")
    keys = t.column("key").to_pylist()
    assert len(keys) == len(set(keys)) == 180
    pids = {json.loads(p.read_text())["embedded_by"]["pid"] for p in (tmp_path / "emb").glob("*.stats.json")}
    assert len(pids) >= 2, "later shards ran on a restarted actor"


def test_killed_driver_then_rerun_gives_every_key_exactly_once(tmp_path):
    make_sample_tars(str(tmp_path / "tars"), tars=12, per_tar=40)
    out = tmp_path / "emb"
    # Ray's socket paths must stay short: its own temp dir under /tmp.
    env = dict(os.environ, RAY_TMPDIR=tempfile.mkdtemp(prefix="rk-", dir="/tmp"))
    args = [*REPLICA, "embed", "-i", str(tmp_path / "tars" / "*.tar"), "-o", str(out),
            "--max-tars-in-flight", "1", "--batch-size", "8", "-q"]
    proc = subprocess.Popen(args, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while len(list(out.glob("*.stats.json"))) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait()
    done_before = len(list(out.glob("*.stats.json")))
    assert 2 <= done_before < 12, "the kill landed mid-run"

    rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"({done_before} already complete)" in rerun.stdout
    t = read_output(out)
    keys = t.column("key").to_pylist()
    assert len(keys) == len(set(keys)) == 480
    assert len(list(out.glob("*.stats.json"))) == 12


def test_local_and_s3_runs_give_identical_parquet(tmp_path, ray_local, s3_server):
    make_sample_tars(str(tmp_path / "tars"), tars=2, per_tar=15)
    make_sample_tars("s3://replica-test/tars", tars=2, per_tar=15, storage=s3_server)
    run_embed(cfg_for(tmp_path / "tars" / "*.tar", tmp_path / "emb"))
    s3_cfg = EmbedConfig(input=["s3://replica-test/tars/{00000..00001}.tar"], output="s3://replica-test/emb",
                         batch_size=16, s3=s3_server)
    s = run_embed(s3_cfg)
    assert s.embedded == 30

    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server.endpoint_url, "region_name": s3_server.region})
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("replica-test/emb")) == [
        "00000.parquet", "00000.stats.json", "00001.parquet", "00001.stats.json", "_replica.json"]
    for shard in ("00000", "00001"):
        local = pq.read_table(tmp_path / "emb" / f"{shard}.parquet")
        with fs.open(f"replica-test/emb/{shard}.parquet", "rb") as f:
            remote = pq.read_table(f)
        assert remote.schema.metadata == local.schema.metadata
        # Same content; only the location of the source tar differs.
        assert remote.drop_columns(["tar_url"]).equals(local.drop_columns(["tar_url"]))
        assert set(remote.column("tar_url").to_pylist()) == {f"s3://replica-test/tars/{shard}.tar"}
        row = remote.to_pylist()[3]
        data = read_range(row["tar_url"], row["tar_offset"], row["tar_size"], s3_server)
        assert data == read_range(local.column("tar_url")[3].as_py(), row["tar_offset"], row["tar_size"])


def tiny_open_clip(tmp_path):
    """A tiny open_clip architecture and a checkpoint of it, saved the way users save weights."""
    import open_clip
    import torch

    config = {
        "embed_dim": 24,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 1, "layers": 1},
    }
    cfg_path = tmp_path / "replica-tiny-vit.json"
    cfg_path.write_text(json.dumps(config))
    from pipeline.embedders.clip import register_config

    register_config(str(cfg_path))
    torch.manual_seed(0)
    model = open_clip.create_model("replica-tiny-vit")
    ckpt = tmp_path / "tiny.pt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    return cfg_path, ckpt, model.eval()


def test_open_clip_from_a_local_checkpoint(tmp_path, ray_local):
    import torch

    from pipeline.embedders import build_embedder
    from pipeline.embedders.torch_util import to_normalized_tensor

    cfg_path, ckpt, model = tiny_open_clip(tmp_path)
    ecfg = EmbedderConfig(name="open_clip", model="replica-tiny-vit", checkpoint=str(ckpt), model_config=str(cfg_path), device="cpu")
    emb = build_embedder(ecfg)
    assert emb.dim == 24 and emb.identity()["weights"].startswith("sha256:")
    images = [synthetic.scene(i) for i in range(3)]
    pixels = np.stack([emb.preprocess(im) for im in images])
    assert pixels.shape == (3, 32, 32, 3) and pixels.dtype == np.uint8
    with torch.no_grad():
        want = model.encode_image(to_normalized_tensor(pixels, emb.mean, emb.std, "cpu")).numpy()
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(emb.embed(pixels), want, atol=1e-5)  # the saved weights, not a fresh init

    make_sample_tars(str(tmp_path / "tars"), tars=2, per_tar=10)
    s = run_embed(cfg_for(tmp_path / "tars" / "*.tar", tmp_path / "emb", embedder=ecfg))
    assert s.embedded == 20
    t = read_output(tmp_path / "emb")
    # The stored vector is the model on the tar's JPEG, decoded at the size the model needs.
    import io

    from PIL import Image

    with tarfile.open(sorted((tmp_path / "tars").glob("*.tar"))[0]) as tf:
        first = next(m for m in tf.getmembers() if m.name.endswith(".jpg"))
        lazy = Image.open(io.BytesIO(tf.extractfile(first).read()))
    assert t.column("key")[0].as_py() == first.name.rsplit(".", 1)[0]
    np.testing.assert_allclose(schema.vectors_of(t.slice(0, 1)), emb.embed(emb.preprocess(lazy)[None]), atol=2e-3)


def test_sscd_torchscript_path(tmp_path, ray_local):
    import torch

    from pipeline.embedders import build_embedder
    from pipeline.embedders.torch_util import IMAGENET_MEAN, IMAGENET_STD, to_normalized_tensor

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 5, stride=4), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(8, 16),
    ).eval()
    path = tmp_path / "sscd_like.torchscript.pt"
    torch.jit.save(torch.jit.script(net), str(path))

    ecfg = EmbedderConfig(name="sscd", checkpoint=str(path), image_size=64, device="cpu")
    emb = build_embedder(ecfg)
    assert emb.dim == 16
    assert "resize_short=64" in emb.identity()["preprocess"] and "0.485" in emb.identity()["preprocess"]
    pixels = np.stack([emb.preprocess(synthetic.scene(i, (200, 120))) for i in range(2)])
    with torch.no_grad():
        want = net(to_normalized_tensor(pixels, IMAGENET_MEAN, IMAGENET_STD, "cpu")).numpy()
    np.testing.assert_allclose(emb.embed(pixels), want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-5)
    assert build_embedder(EmbedderConfig(name="sscd", checkpoint=str(path))).image_size == 288  # SSCD's default

    make_sample_tars(str(tmp_path / "tars"), tars=1, per_tar=8)
    s = run_embed(cfg_for(tmp_path / "tars" / "*.tar", tmp_path / "emb", embedder=ecfg))
    assert s.embedded == 8


def test_mixing_embedders_in_one_output_is_refused(tmp_path, ray_local):
    from pipeline.errors import MismatchError

    make_sample_tars(str(tmp_path / "tars"), tars=1, per_tar=4)
    cfg_path, ckpt, _ = tiny_open_clip(tmp_path)
    run_embed(cfg_for(tmp_path / "tars" / "*.tar", tmp_path / "emb"))
    other = EmbedderConfig(name="open_clip", model="replica-tiny-vit", checkpoint=str(ckpt), model_config=str(cfg_path))
    with pytest.raises(MismatchError, match="other parameters"):
        run_embed(cfg_for(tmp_path / "tars" / "*.tar", tmp_path / "emb", embedder=other))


def test_torch_preprocessing_decodes_jpegs_at_the_size_the_model_needs():
    """A large JPEG decodes at a reduced DCT scale (no smaller than the model's input), and the
    identity says so: vectors made before this preprocessing are not mixed with these."""
    import io

    from PIL import Image

    from pipeline.embedders.base import square_crop_uint8
    from pipeline.synthetic_images import scene

    buf = io.BytesIO()
    scene(5, (1600, 1200)).save(buf, format="JPEG", quality=90)
    lazy = Image.open(io.BytesIO(buf.getvalue()))
    out = square_crop_uint8(lazy, 224)
    assert out.shape == (224, 224, 3)
    assert lazy.size == (400, 300)  # 1/4 scale: the smallest whose short side is still >= 224
    full = Image.open(io.BytesIO(buf.getvalue()))
    full.load()
    assert np.abs(square_crop_uint8(full, 224).astype(float) - out).mean() < 6  # same picture
