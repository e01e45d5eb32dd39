"""Jobs run through `ray job submit` (the files under infra/ are checked by tests/test_deploy.py).

The job tests start a real Ray head (with the dashboard, whose job API `ray job submit` talks to)
on 127.0.0.1 ports of their own, submit jobs/embed.py and jobs/pipeline.py with the repository
as the working dir, and stop the head they started by its pid. No mocks.
"""
from __future__ import annotations

import collections
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")


# ---------------------------------------------------------------------------------------------
# `ray job submit` against a real head


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@dataclass
class Head:
    address: str
    temp_dir: str
    env: dict
    metrics_port: int
    log: Path


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head --block` with the dashboard, every port on 127.0.0.1 chosen free."""
    temp_dir = tempfile.mkdtemp(prefix="rj-", dir="/tmp")  # short: Ray's socket paths have a length limit
    ports = {name: free_port() for name in (
        "port", "node-manager-port", "object-manager-port", "ray-client-server-port", "dashboard-port",
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port")}
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           # the job entrypoint's `python` is the first on the head's PATH: this environment's
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    cmd = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
           "--include-dashboard=true", "--num-cpus=2", "--object-store-memory=400000000",
           f"--temp-dir={temp_dir}", "--disable-usage-stats", *(f"--{k}={v}" for k, v in ports.items())]
    log = Path(temp_dir) / "head.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=temp_dir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    head = Head(f"http://127.0.0.1:{ports['dashboard-port']}", temp_dir, env, ports["metrics-export-port"], log)
    try:
        deadline = time.time() + 120
        # the job API answers on the dashboard; it hands jobs to the node's agent
        while not (http_ok(f"{head.address}/api/version")
                   and http_ok(f"http://127.0.0.1:{ports['dashboard-agent-listen-port']}/api/local_raylet_healthz")):
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"Ray head did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield head
    finally:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            proc.wait(timeout=45)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of this head's process group is left
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
        shutil.rmtree(temp_dir, ignore_errors=True)


def ray_job_submit(head: Head, cwd: Path, *entrypoint: str, timeout: float = 150) -> str:
    """The documented command; returns its output (the job's logs). Fails the test if the job fails."""
    cmd = [RAY, "job", "submit", "--address", head.address, "--working-dir", str(ROOT),
           "--runtime-env", str(INFRA / "runtime-env.yaml"), "--", *entrypoint]
    for _ in range(10):
        r = subprocess.run(cmd, cwd=cwd, env=head.env, capture_output=True, text=True, timeout=timeout)
        out = r.stdout + r.stderr
        if "No available agent to submit job" not in out:  # agent still registering: try again
            break
        time.sleep(2)
    assert r.returncode == 0 and "succeeded" in out, f"job failed (rc {r.returncode}):\n{out[-6000:]}"
    return out


def tar_keys(tar_dir: Path) -> list[str]:
    keys = []
    for t in sorted(tar_dir.glob("*.tar")):
        with tarfile.open(t) as tf:
            keys += [n[:-4] for n in tf.getnames() if n.endswith(".jpg")]
    return keys


def test_ray_job_submit_embed_every_key_once_then_resume(ray_head, tmp_path):
    tars, out = tmp_path / "tars", tmp_path / "embeddings"
    r = subprocess.run([str(BIN / "replica"), "sample", "--output", str(tars), "--tars", "3", "--per-tar", "20"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    expected = tar_keys(tars)
    assert len(expected) == 60

    log = ray_job_submit(ray_head, tmp_path, "python", "jobs/embed.py", "--input", f"{tars}/*.tar",
                         "--output", str(out))
    assert "Connecting to existing Ray cluster" in log  # the job joined the head, not a Ray of its own
    assert "embedded 60/60 images from 3 shards (0 already complete)" in log
    # the job's stdout is not a terminal: plain progress lines, not a live display that prints at exit
    assert re.search(r"^embed: 3/3 shards \(100%\), [\d,]+ img/s, 0 failed, \d+s \(done\)$", log, re.M), log[-3000:]

    # the run's counters reach the head's Prometheus endpoint (exported by Ray's metrics agent)
    deadline, text = time.time() + 60, ""
    while time.time() < deadline and "ray_replica_records_total" not in text:
        with urllib.request.urlopen(f"http://127.0.0.1:{ray_head.metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        time.sleep(2)
    for name in ("ray_replica_units_done_total", "ray_replica_records_total", "ray_replica_bytes_read_total",
                 "ray_replica_records_per_second"):
        assert re.search(rf'^{name}{{[^}}]*stage="embed"[^}}]*}} ', text, re.M), (name, text[-2000:])
    assert re.search(r'^ray_replica_records_total{[^}]*stage="embed"[^}]*} 60(\.0)?$', text, re.M)

    files = sorted(out.glob("*.parquet"))
    assert [f.stem for f in files] == ["00000", "00001", "00002"]
    keys = pq.ParquetDataset([str(f) for f in files]).read(columns=["key"]).column("key").to_pylist()
    counts = collections.Counter(keys)
    assert sorted(counts) == sorted(expected) and set(counts.values()) == {1}

    # the upload was the source tree: no virtualenv, no .git
    packages = list(Path(ray_head.temp_dir).glob("session_*/runtime_resources/working_dir_files/_ray_pkg_*/"))
    assert packages and all((p / "jobs" / "embed.py").is_file() for p in packages)
    assert not any((p / ".venv").exists() or (p / ".git").exists() for p in packages)

    # rerunning the same job (what to do after a lost node) skips the complete shards
    before = {f.name: f.stat().st_mtime_ns for f in files}
    log = ray_job_submit(ray_head, tmp_path, "python", "jobs/embed.py", "--input", f"{tars}/*.tar",
                         "--output", str(out), "--quiet")
    assert "embedded 0/0 images from 0 shards (3 already complete)" in log
    assert {f.name: f.stat().st_mtime_ns for f in sorted(out.glob("*.parquet"))} == before


def test_ray_job_submit_pipeline_embed_index_search_report(ray_head, tmp_path):
    from pipeline.sample import make_sample_tars
    from pipeline.synthetic_images import scene

    urls = make_sample_tars(str(tmp_path / "tars"), tars=2, per_tar=150, seed=3)
    generated = tmp_path / "generated"
    generated.mkdir()
    copied = []
    with tarfile.open(urls[1]) as tf:  # three corpus images, upscaled: planted copies
        for name in sorted(n for n in tf.getnames() if n.endswith(".jpg"))[:3]:
            image = Image.open(io.BytesIO(tf.extractfile(name).read())).convert("RGB")
            image.resize((image.width * 2, image.height * 2)).save(generated / f"copy-{name[:-4]}.png")
            copied.append(name[:-4])
    for j in range(2):
        scene(20_000_000 + j, (320, 256)).save(generated / f"novel-{j}.png")

    config = {
        "embed": {"input": [str(tmp_path / "tars" / "*.tar")], "output": str(tmp_path / "embeddings")},
        "index": {"embeddings": str(tmp_path / "embeddings"), "index": str(tmp_path / "index"), "nprobe": 16,
                  # small and quick to train; the chosen default (OPQ + 64-byte PQ) trains for minutes here
                  "factory": "IVF16,PQ8"},
        "search": {"queries": str(generated), "index": str(tmp_path / "index"), "output": str(tmp_path / "results"),
                   "run_id": "scheduled", "regions": False, "verify_top": 0, "baseline_size": 100},
    }
    config_file = tmp_path / "pipeline.yaml"
    config_file.write_text(yaml.safe_dump(config))

    log = ray_job_submit(ray_head, tmp_path, "python", "jobs/pipeline.py", "--config", str(config_file), "--quiet",
                         timeout=300)
    run = tmp_path / "results" / "run_id=scheduled"
    assert f"results: {run}" in log
    queries = pq.read_table(run / "queries.parquet").to_pylist()
    assert sorted(q["query_key"] for q in queries) == sorted([f"copy-{k}" for k in copied] + ["novel-0", "novel-1"])
    top1 = {m["query_key"]: m["match_key"] for m in pq.read_table(run / "matches.parquet").to_pylist() if m["rank"] == 1}
    assert all(top1[f"copy-{k}"] == k for k in copied)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["run_id"] == "scheduled" and summary["queries"]["count"] == 5
    assert (run / "report.html").stat().st_size > 0
