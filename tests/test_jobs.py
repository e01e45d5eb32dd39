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

import numpy as np
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


# ---------------------------------------------------------------------------------------------
# the whole chain, on S3, through `ray job submit`, then a scheduled rerun


def chain_config(root: str, storage, run_id: str = "") -> dict:
    """Every section of a scheduled run, all inputs and outputs under ``root`` (a local folder or s3://)."""
    s3 = {"endpoint_url": storage.endpoint_url, "region": storage.region} if root.startswith("s3://") else {}
    return {
        "ingest": {"input": [f"{root}/lists/"], "output": f"{root}/tars", "url_column": "URL", "caption_column": "TEXT",
                   "columns": ["similarity"], "samples_per_shard": 20, "threads": 8, "timeout": 3, "s3": s3},
        "embed": {"output": f"{root}/embeddings", "s3": s3},
        # IVF4 probed whole (nprobe 4): exhaustive, so both runs of the comparison find exactly the same
        "index": {"index": f"{root}/index", "factory": "IVF4,Flat", "s3": s3},
        "search": {"queries": f"{root}/generated/", "output": f"{root}/results", "regions": False, "verify_top": 0,
                   "nprobe": 4,
                   "baseline_size": 30, "s3": s3},
        "pipeline": {"run_id": run_id},
    }


def url_list(server, seeds: list[int], kinds: list[str] = ()) -> bytes:
    import pyarrow as pa

    urls = [server.url("img", s) for s in seeds]
    for i, kind in enumerate(kinds):  # spread over the shards, as dead links are
        urls.insert(5 * i + 2, server.url(kind, 500 + i))
    buf = io.BytesIO()
    pq.write_table(pa.table({"URL": urls, "TEXT": [f"caption of {u.rsplit('/', 2)[-2]} {u.rsplit('/', 1)[-1]}"
                                                   for u in urls], "similarity": [0.3] * len(urls)}), buf)
    return buf.getvalue()


def upscaled(jpeg: bytes) -> bytes:
    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    buf = io.BytesIO()
    image.resize((image.width * 3 // 2, image.height * 3 // 2)).save(buf, format="PNG")
    return buf.getvalue()


def put(root: str, storage, files: dict[str, bytes]) -> None:
    from pipeline.storage import write_bytes

    for rel, data in files.items():
        write_bytes(f"{root}/{rel}", data, storage)


def tar_contents(root: str, storage) -> dict[str, tuple[str, str, str]]:
    """key -> (sha256 of the stored image, caption, url) over every tar of an ingest folder."""
    import hashlib

    from pipeline.storage import filesystem

    fs, path = filesystem(f"{root}/tars", storage)
    out = {}
    for tar in sorted(fs.glob(path + "/*.tar")):
        members: dict[str, dict[str, bytes]] = {}
        with fs.open(tar, "rb") as f, tarfile.open(fileobj=f) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                members.setdefault(key, {})[ext] = tf.extractfile(m).read()
        for key, mem in members.items():
            out[f"{tar.rsplit('/', 1)[-1]}:{key}"] = (hashlib.sha256(mem["jpg"]).hexdigest(), mem["txt"].decode(),
                                                      json.loads(mem["json"])["url"])
    return out


def embeddings_by_key(root: str, storage) -> dict[str, tuple[str, bytes]]:
    from pipeline.layout.embeddings import EmbeddingsFolder

    folder = EmbeddingsFolder(f"{root}/embeddings", storage)
    out = {}
    for shard in folder.complete_shards():
        with folder.open(folder.parquet_name(shard)) as f:
            for row in pq.read_table(f, columns=["key", "url", "embedding"]).to_pylist():
                out[row["key"]] = (row["url"], bytes(memoryview(np.asarray(row["embedding"], np.float16))))
    return out


def run_tables(root: str, storage, run_id: str) -> tuple[list, dict, dict]:
    """A run's matches (query, rank, match url, score), best scores per query, and pipeline record."""
    from pipeline.layout.runs import MATCHES, QUERIES, ResultsFolder

    run = ResultsFolder(f"{root}/results", storage).run(run_id)
    with run.open(MATCHES) as f:
        matches = sorted((m["query_key"], m["rank"], m["url"], round(m["score"], 4))
                         for m in pq.read_table(f).to_pylist())
    with run.open(QUERIES) as f:
        best = {q["query_key"]: round(q["best_score"], 4) for q in pq.read_table(f).to_pylist()}
    return matches, best, run.read_pipeline_record()


def object_versions(root: str, storage) -> dict[str, tuple]:
    """Every object under ``root`` on S3 with its ETag and modification time (a rewrite changes them)."""
    from pipeline.storage import filesystem

    fs, path = filesystem(root, storage)
    return {p: (i.get("ETag"), str(i.get("LastModified"))) for p, i in fs.find(path, detail=True).items()}


def test_ray_job_submit_whole_chain_on_s3_equals_local_then_a_rerun_does_only_new_work(ray_head, s3_server, tmp_path):
    """URL lists and generated images on the local S3 server -> ingest (from a local HTTP server) -> embed ->
    index -> search -> report, submitted with `ray job submit`; the same run on local disk gives the same
    tars, vectors and matches; a second submission with a new URL list and a new query does only that."""
    import uuid

    from pipeline.testing.image_server import ImageServer
    from pipeline.layout.runs import QUERIES, ResultsFolder

    storage = s3_server
    s3_root = f"s3://replica-test/chain-{uuid.uuid4().hex[:8]}"
    local_root = str(tmp_path / "local")
    failures = ["slow", "missing", "error", "html", "truncated", "cut", "loop", "noai"]
    with ImageServer(ok_delay_s=0.2, slow_delay_s=8.0) as server:
        corpus = list(range(40))
        for seed in [*corpus, *range(500, 500 + len(failures)), *range(1000, 1015)]:
            server.image(seed)  # drawn before the runs: a busy machine must not turn a good URL into a timeout
        copied = [5, 23]
        first_inputs = {"lists/part-00000.parquet": url_list(server, corpus, failures),
                        "generated/novel-0.png": upscaled(jpeg_of_scene(9_000_000)),
                        "generated/novel-0.txt": b"a prompt that copies nothing",
                        **{f"generated/copy-{i}.png": upscaled(server.image(i)) for i in copied},
                        **{f"generated/copy-{i}.txt": f"prompt {i}".encode() for i in copied}}
        for root in (s3_root, local_root):
            put(root, storage, first_inputs)
            cfg = tmp_path / f"{'s3' if root == s3_root else 'local'}.yaml"
            cfg.write_text(yaml.safe_dump(chain_config(root, storage)))

        log = ray_job_submit(ray_head, tmp_path, "python", "jobs/pipeline.py", "--config", str(tmp_path / "s3.yaml"),
                             timeout=300)
        # `ray job logs` (what submit printed) holds plain progress lines, one per finished task
        assert "ingest: 3/3 shards (100%)" in log and "embed: 3/3 shards (100%)" in log and "(done)" in log, log[-4000:]
        assert "ingested 40/48 images into 3 shard(s)" in log, log[-4000:]
        ray_job_submit(ray_head, tmp_path, "python", "jobs/pipeline.py", "--config", str(tmp_path / "local.yaml"),
                       "--quiet", timeout=300)

        s3_runs = ResultsFolder(f"{s3_root}/results", storage).run_ids()
        local_runs = ResultsFolder(f"{local_root}/results", storage).run_ids()
        assert len(s3_runs) == len(local_runs) == 1
        # the same tars (keys, stored bytes, captions, URLs), vectors and matches on S3 as on local disk
        assert tar_contents(s3_root, storage) == tar_contents(local_root, storage)
        assert len(tar_contents(s3_root, storage)) == 40
        assert embeddings_by_key(s3_root, storage) == embeddings_by_key(local_root, storage)
        matches, best, record = run_tables(s3_root, storage, s3_runs[0])
        local_matches, local_best, _ = run_tables(local_root, storage, local_runs[0])
        assert matches == local_matches and best == local_best
        top1 = {q: url for q, rank, url, _ in matches if rank == 1}
        assert all(top1[f"copy-{i}"] == server.url("img", i) for i in copied)
        assert record.status == "succeeded" and record.exit_code == 0
        assert record.stages["ingest"]["failed"] == {"timeout": 1, "http_404": 1, "http_500": 1, "decode_error": 2,
                                                     "incomplete_body": 1, "redirect_loop": 1, "opted_out": 1}
        assert record.software["replica"] and record.software["img2dataset"] and record.config["ingest"]["output"]

        # the scheduled rerun: a new URL list and a new generated image arrive
        before = object_versions(s3_root, storage)
        hits = dict(server.hits)
        new_seeds = list(range(1000, 1015))
        put(s3_root, storage, {"lists/part-00001.parquet": url_list(server, new_seeds),
                               "generated/copy-1003.png": upscaled(server.image(1003))})
        log = ray_job_submit(ray_head, tmp_path, "python", "jobs/pipeline.py", "--config", str(tmp_path / "s3.yaml"),
                             timeout=300)
        runs = ResultsFolder(f"{s3_root}/results", storage).run_ids()
        assert len(runs) == 2 and runs[0] == s3_runs[0]
        matches2, _, record2 = run_tables(s3_root, storage, runs[1])
        st = record2.stages
        assert (st["ingest"]["lists_skipped"], st["ingest"]["shards_done"], st["ingest"]["urls"]) == (1, 1, 15)
        assert [t.rsplit("/", 1)[-1] for t in st["ingest"]["new_tars"]["names"]] == ["000003.tar"]
        assert (st["embed"]["shards_done"], st["embed"]["shards_skipped"], st["embed"]["new_shards"]["names"]) == \
            (1, 3, ["000003"])
        assert (st["index"]["added"], st["index"]["ntotal"], len(st["index"]["new_index_shards"])) == (15, 55, 1)
        assert (st["search"]["listed"], st["search"]["searched_before"], st["search"]["searched"]) == (4, 3, 1)
        assert {q for q, *_ in matches2} == {"copy-1003"}
        assert [url for q, rank, url, _ in matches2 if rank == 1] == [server.url("img", 1003)]
        # nothing of the first run was fetched, rewritten or re-searched
        assert all(server.hits[p] == n for p, n in hits.items())
        after = object_versions(s3_root, storage)
        rewritten = {p.rsplit("/", 1)[-1] for p, v in before.items() if after.get(p) != v}
        # only the ledgers that list what exists were rewritten: the URL lists ingested, the index's shard
        # registry, its parts and its manifest, and its tuning (40 -> 55 vectors is more than 10% more);
        # no tar, vector, index shard or earlier result
        assert rewritten == {"ingest.json", "registry.json", "_ledger.json", "manifest.json", "tuning.json"}, \
            rewritten

    # both runs side by side, as `replica runs` lists them and as a hive-partitioned dataset reads them
    from click.testing import CliRunner

    from pipeline.cli import app

    r = CliRunner().invoke(app, ["runs", "--config", str(tmp_path / "s3.yaml")])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert len(lines) == 3 and all("pipeline  succeeded" in line for line in lines[1:]), r.output
    import pyarrow.dataset as ds

    from pipeline.storage import filesystem

    fs, path = filesystem(f"{s3_root}/results", storage)
    table = ds.dataset([f"{path}/run_id={run}/{QUERIES}" for run in runs], filesystem=fs, format="parquet",
                       partitioning=ds.partitioning(flavor="hive"), partition_base_dir=path).to_table()
    assert collections.Counter(table.column("run_id").to_pylist()) == {runs[0]: 3, runs[1]: 1}


def jpeg_of_scene(seed: int) -> bytes:
    from pipeline.synthetic_images import scene

    buf = io.BytesIO()
    scene(seed, (320, 256)).save(buf, format="JPEG", quality=92)
    return buf.getvalue()
