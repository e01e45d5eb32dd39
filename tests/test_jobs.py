"""Deployment: the files under infra/ agree with the code, and jobs run through `ray job submit`.

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
import shlex
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

from pipeline.config import EmbedConfig, IndexConfig, SearchConfig, build

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")


def load_docs(path: Path) -> list:
    return list(yaml.safe_load_all(path.read_text()))


def load_one(path: Path) -> dict:
    docs = load_docs(path)
    assert len(docs) == 1, f"{path} should hold one document"
    return docs[0]


# ---------------------------------------------------------------------------------------------
# infra/ files


def test_every_infra_yaml_parses():
    files = sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))
    names = {str(p.relative_to(INFRA)) for p in files}
    assert {"kuberay/rayjob.yaml", "kuberay/raycronjob.yaml", "ray-cluster.aws.yaml",
            "pipeline.example.yaml", "runtime-env.yaml"} <= names
    for path in files:
        docs = load_docs(path)
        assert docs and all(isinstance(d, dict) and d for d in docs), f"{path} holds an empty or non-mapping document"


def referenced_jobs() -> dict[str, set[str]]:
    """jobs/*.py named anywhere in infra/ and the deployment docs -> where."""
    sources = [p for p in INFRA.rglob("*") if p.is_file()]
    sources += [ROOT / "docs" / "DEPLOY.md", ROOT / "docs" / "GPU.md"]
    found: dict[str, set[str]] = collections.defaultdict(set)
    for path in sources:
        for script in re.findall(r"\bjobs/[A-Za-z0-9_]+\.py\b", path.read_text()):
            found[script].add(str(path.relative_to(ROOT)))
    return found


def test_job_commands_referenced_by_infra_and_docs_exist_and_start():
    found = referenced_jobs()
    assert "jobs/pipeline.py" in found and "jobs/embed.py" in found
    for script, where in sorted(found.items()):
        assert (ROOT / script).is_file(), f"{script} (named in {sorted(where)}) does not exist"
        # The entrypoint imports and reaches its CLI command (lazy imports keep this fast).
        r = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "Usage" in r.stdout, f"{script} --help failed:\n{r.stdout}\n{r.stderr}"


def dockerfile_arg(path: Path, name: str) -> str:
    m = re.search(rf"^ARG {name}=(\S+)$", path.read_text(), re.M)
    assert m, f"{path.name} has no ARG {name}=..."
    return m.group(1)


def test_dockerfiles_copy_only_what_exists_and_the_build_context_admits():
    allowed = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip().startswith("!")]
    for name in ("Dockerfile", "Dockerfile.gpu"):
        text = (INFRA / name).read_text()
        copies = re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.M)
        assert copies, f"{name} copies nothing"
        for line in copies:
            for src in line.split():
                assert (ROOT / src).exists(), f"{name}: COPY {src} does not exist (build from the repo root)"
                assert f"!{src}" in allowed or f"!{src}/" in allowed, f".dockerignore keeps {src} out of {name}'s context"
    gpu = (INFRA / "Dockerfile.gpu").read_text()
    assert dockerfile_arg(INFRA / "Dockerfile.gpu", "CUDA_IMAGE").startswith("nvidia/cuda:12.")
    assert "pip uninstall -y faiss-cpu && pip install faiss-gpu-cu12" in gpu
    # torch must not be PyPI's default build (CUDA 13) in the CUDA 12 image, nor a CUDA build in the CPU image
    assert dockerfile_arg(INFRA / "Dockerfile.gpu", "TORCH_INDEX_URL").endswith("/cu128")
    assert dockerfile_arg(INFRA / "Dockerfile", "TORCH_INDEX_URL").endswith("/cpu")


def containers(cluster_spec: dict) -> list[dict]:
    pods = [cluster_spec["headGroupSpec"]["template"]] + [g["template"] for g in cluster_spec["workerGroupSpecs"]]
    return [c for pod in pods for c in pod["spec"]["containers"]]


def test_rayjob_runs_the_pipeline_job_with_config_map_secret_and_gpu_workers():
    rayjob = load_one(INFRA / "kuberay" / "rayjob.yaml")
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    spec = rayjob["spec"]
    assert shlex.split(spec["entrypoint"]) == ["python", "jobs/pipeline.py", "--config", "/config/pipeline.yaml"]
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == dockerfile_arg(INFRA / "Dockerfile.gpu", "RAY_VERSION")

    # the config file: a ConfigMap item pipeline.yaml mounted at /config on the head (the driver reads it)
    head = cluster["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in head["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
    config_volume = volumes[mounts["/config"]]
    assert [i["path"] for i in config_volume["configMap"]["items"]] == ["pipeline.yaml"]

    # S3 credentials: AWS_* variables from one Secret, on every pod (workers read and write S3 too)
    for c in containers(cluster):
        env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"]}
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env), c["name"]
        assert all(name.startswith("AWS_") and ref["key"] == name for name, ref in env.items())
        assert len({ref["name"] for ref in env.values()}) == 1
        assert not env["AWS_ACCESS_KEY_ID"].get("optional")

    gpu_groups = [g for g in cluster["workerGroupSpecs"]
                  if any("nvidia.com/gpu" in c["resources"]["limits"] for c in g["template"]["spec"]["containers"])]
    assert gpu_groups, "no worker group asks for GPUs"
    images = {c["image"] for c in containers(cluster)}
    assert len(images) == 1 and next(iter(images)).endswith("-gpu")


def test_raycronjob_schedules_exactly_the_rayjob_spec():
    rayjob = load_one(INFRA / "kuberay" / "rayjob.yaml")
    cron = load_one(INFRA / "kuberay" / "raycronjob.yaml")
    assert (cron["apiVersion"], cron["kind"]) == ("ray.io/v1", "RayCronJob")
    assert len(cron["spec"]["schedule"].split()) == 5
    assert cron["spec"]["jobTemplate"] == rayjob["spec"]
    # a run is stopped before the next weekly one starts
    assert cron["spec"]["jobTemplate"]["activeDeadlineSeconds"] < 7 * 24 * 3600


def test_cluster_launcher_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load_one(INFRA / "ray-cluster.aws.yaml")
    config = prepare_config(raw)  # what `ray up` does first: fill in the AWS defaults
    validate_config(config)
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    assert {"cpu_decode", "gpu"} <= set(types)
    # Ray's default setup commands (pip installs at start) must not sneak in
    assert config["setup_commands"] == config["head_setup_commands"] == config["worker_setup_commands"] == []
    rayjob = load_one(INFRA / "kuberay" / "rayjob.yaml")
    assert config["docker"]["image"] == containers(rayjob["spec"]["rayClusterSpec"])[0]["image"]


def test_example_pipeline_config_builds_the_typed_configs():
    from pipeline.index.factory import choose_factory, describe_factory
    from pipeline.index.plan import plan_index

    data = load_one(INFRA / "pipeline.example.yaml")
    assert set(data) == {"embed", "index", "search"}
    embed = build(EmbedConfig, data["embed"], "embed")
    index = build(IndexConfig, data["index"], "index")
    search = build(SearchConfig, data["search"], "search")
    plan_index(index)
    # the stages are chained, and everything lives on S3
    assert index.embeddings == embed.output and search.index == index.index
    urls = [*embed.input, embed.output, embed.embedder.checkpoint, index.index, search.queries, search.output,
            search.subset, *search.blocklist]
    assert all(u.startswith("s3://") for u in urls), urls
    assert embed.gpus_per_actor == 1 and index.train_device == "auto"
    # LAION-5B scale: the factory chosen for 5.85B vectors fits the memory budget
    dim, n = 512, 5_850_000_000
    factory = choose_factory(dim, n, int(index.memory_budget_gb * 2**30), max_nlist=index.max_nlist)
    info = describe_factory(factory, dim, index.metric)
    assert n * info.bytes_per_vector + info.fixed_bytes <= index.memory_budget_gb * 2**30
    assert info.nlist == index.max_nlist and index.train_cap >= 39 * info.nlist


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
    head = Head(f"http://127.0.0.1:{ports['dashboard-port']}", temp_dir, env, log)
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
                         "--output", str(out), "--quiet")
    assert "Connecting to existing Ray cluster" in log  # the job joined the head, not a Ray of its own
    assert "embedded 60/60 images from 3 shards (0 already complete)" in log

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
