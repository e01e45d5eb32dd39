"""Behaviour that needs several Ray nodes (ray.cluster_utils.Cluster, in a process of its own)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent


def scenario(name: str, tmp_path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)]),
           "RAY_TMPDIR": tempfile.mkdtemp(prefix="rc-", dir="/tmp")}  # short socket paths
    r = subprocess.run([sys.executable, str(HERE / "cluster_scenarios.py"), name, str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_a_node_added_mid_run_widens_the_embed_window(tmp_path):
    r = scenario("widen", tmp_path)
    assert r["embedded"] == 960
    assert r["before"] == 1 and r["after"] >= 2, r  # one tar at a time on the head's CPU, then more


def test_gpu_training_asks_for_a_gpu_and_runs_where_one_joins(tmp_path):
    r = scenario("gpu_train", tmp_path)
    # CPU faiss stands in for GPU faiss on the node that declares a GPU
    assert r["device"].startswith("cpu (a GPU was asked for") and r["device"].endswith(r["gpu_node"]), r
