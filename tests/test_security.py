"""Credentials never leave the environment; nothing read from storage is unpickled; weights can be pinned."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import app
from pipeline.config import EmbedderConfig
from pipeline.errors import ConfigError

FAKE_KEY_ID = "AKIAREPLICAFAKEKEY7Q"
FAKE_SECRET = "replicaFakeSecret/DoNotLeak+4f2c9e1b7a"
ROOT = Path(__file__).resolve().parents[1]


def tiny_torchscript(path: Path) -> str:
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 8, stride=8), torch.nn.Flatten(), torch.nn.LazyLinear(8))
    net(torch.zeros(1, 3, 64, 64))
    torch.jit.save(torch.jit.script(net.eval()), str(path))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_pinned_weights_load_and_others_are_refused(tmp_path, s3_server):
    from pipeline.embedders import build_embedder
    from pipeline.storage import write_bytes

    digest = tiny_torchscript(tmp_path / "sscd.pt")
    ok = build_embedder(EmbedderConfig(name="sscd", checkpoint=str(tmp_path / "sscd.pt"), image_size=64,
                                       checkpoint_sha256=digest))
    assert ok.identity()["weights"] == f"sha256:{digest}"
    with pytest.raises(ConfigError, match="not the pinned"):
        build_embedder(EmbedderConfig(name="sscd", checkpoint=str(tmp_path / "sscd.pt"), image_size=64,
                                      checkpoint_sha256="0" * 64))
    # fetched from object storage: checked after the download
    write_bytes("s3://replica-test/weights/sscd.pt", (tmp_path / "sscd.pt").read_bytes(), s3_server)
    remote = EmbedderConfig(name="sscd", checkpoint="s3://replica-test/weights/sscd.pt", image_size=64,
                            checkpoint_sha256=digest.upper())
    assert build_embedder(remote, s3_server).identity()["weights"] == f"sha256:{digest}"
    r = CliRunner().invoke(app, ["embed", "-i", str(tmp_path / "x.tar"), "-o", str(tmp_path / "o"),
                                 "--embedder", "sscd", "--embedder-checkpoint", str(tmp_path / "sscd.pt"),
                                 "--embedder-checkpoint-sha256", "abc"])
    assert r.exit_code == 2 and "64 hex digits" in r.output


class Payload:
    """Unpickling this would run code (it makes a folder): a checkpoint must never be unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_checkpoint_is_never_unpickled(tmp_path):
    import open_clip
    import torch

    from pipeline.embedders import build_embedder
    from test_embed import tiny_open_clip

    cfg_path, ckpt, model = tiny_open_clip(tmp_path)
    marker = tmp_path / "code-ran"
    torch.save({"state_dict": model.state_dict(), "extra": Payload(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        build_embedder(EmbedderConfig(name="open_clip", model="replica-tiny-vit", checkpoint=str(tmp_path / "evil.pt"),
                                      model_config=str(cfg_path), device="cpu"))
    assert not marker.exists()
    assert open_clip  # the real loader, through replica's own path


def test_credentials_appear_in_no_output_and_no_log(tmp_path, s3_server):
    """A recognisable fake key in the environment; a whole run on S3 through the CLI, plus a failing
    one; every log line, Ray session log, local file and object written is searched for it."""
    from pipeline.sample import make_sample_tars
    from pipeline.storage import Storage, filesystem
    from pipeline.synthetic_images import scene

    root = "s3://replica-test/secrets"
    make_sample_tars(f"{root}/tars", tars=2, per_tar=30, storage=s3_server)
    gen = tmp_path / "generated"
    gen.mkdir()
    for j in range(2):
        scene(77 + j).save(gen / f"q{j}.png")
    ray_tmp = tempfile.mkdtemp(prefix="rs-", dir="/tmp")
    env = {**os.environ, "AWS_ACCESS_KEY_ID": FAKE_KEY_ID, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
           "RAY_TMPDIR": ray_tmp, "PYTHONPATH": str(ROOT)}
    s3 = {"endpoint_url": s3_server.endpoint_url, "region": s3_server.region}
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({
        "embed": {"input": [f"{root}/tars/*.tar"], "output": f"{root}/emb", "s3": s3},
        "index": {"embeddings": f"{root}/emb", "index": f"{root}/index", "factory": "IVF4,Flat", "s3": s3},
        "search": {"queries": str(gen), "index": f"{root}/index", "output": f"{root}/results", "run_id": "s",
                   "baseline_size": 20, "verify_top": 2, "s3": s3},
    }))
    cli = [sys.executable, "-m", "pipeline.cli"]
    steps = [["pipeline", "-c", str(config)],
             ["embed", "-i", "s3://no-such-bucket-for-secrets/*.tar", "-o", f"{root}/x",  # fails: its message too
              "--s3-endpoint-url", s3_server.endpoint_url, "--s3-region", s3_server.region]]
    logs = []
    for step in steps:
        r = subprocess.run([*cli, *step], env=env, capture_output=True, text=True, timeout=600)
        logs.append(r.stdout + r.stderr)
    assert "results:" in logs[0] and "error:" in logs[1]
    texts = list(logs)
    for path in Path(ray_tmp).rglob("*"):
        if path.is_file():
            texts.append(path.read_bytes().decode("utf-8", "replace"))
    fs, bucket = filesystem("s3://replica-test/secrets", Storage(endpoint_url=s3_server.endpoint_url,
                                                                   region=s3_server.region))
    written = [p for p in fs.find(bucket) if "/tars/" not in p]
    assert any(p.endswith("run.json") for p in written) and any(p.endswith("report.html") for p in written)
    texts += [fs.cat_file(p).decode("utf-8", "replace") for p in written]
    for secret in (FAKE_KEY_ID, FAKE_SECRET):
        leaks = [t[max(0, t.find(secret) - 80): t.find(secret) + 80] for t in texts if secret in t]
        assert not leaks, leaks[:3]
