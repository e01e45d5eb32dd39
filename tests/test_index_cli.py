"""The command line: import-embeddings, index build/search, and the Ray job entrypoint."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from pipeline.cli import app
from test_import_embeddings import write_release

REPO = Path(__file__).resolve().parents[1]


def test_import_build_search_from_the_command_line(tmp_path):
    released = write_release(tmp_path / "rel", [300], seed=5)
    runner = CliRunner()
    r = runner.invoke(app, ["import-embeddings", "--input", str(tmp_path / "rel"), "--output", str(tmp_path / "emb"),
                            "--embedder", "open_clip", "--model", "ViT-L-14", "--weights", "openai",
                            "--rows-per-shard", "100"])
    assert r.exit_code == 0, r.output
    # the job entrypoint takes the flags of `replica index build`
    proc = subprocess.run(
        [sys.executable, "jobs/build_index.py", "--embeddings", str(tmp_path / "emb"), "--index", str(tmp_path / "index"),
         "--factory", "IVF4,Flat", "--group-size", "2", "--local"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "IVF4,Flat: 128 B code + 8 B id = 136 B/vector" in proc.stdout
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest["ntotal"] == 300
    np.save(tmp_path / "q.npy", released[0][[42, 250]].astype(np.float32))
    r = runner.invoke(app, ["index", "search", "--index", str(tmp_path / "index"), "--queries", str(tmp_path / "q.npy"),
                            "--k", "1", "--nprobe", "4", "--rerank", "5", "--local"])
    assert r.exit_code == 0, r.output
    hits = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert [(h["shard"], h["row"]) for h in hits] == [("emb-000000_0000", 42), ("emb-000000_0002", 50)]
    assert all(abs(h["score"] - 1.0) < 1e-2 for h in hits)


def test_cli_reports_config_errors(tmp_path):
    r = CliRunner().invoke(app, ["index", "train", "--embeddings", str(tmp_path / "none"), "--index", str(tmp_path / "i")])
    assert r.exit_code == 2
    assert "does not exist" in r.output
    # merge_fanin 1 would re-merge single parts forever: refused up front
    r = CliRunner().invoke(app, ["index", "merge", "--index", str(tmp_path / "i"), "--merge-fanin", "1"])
    assert r.exit_code == 2 and "merge_fanin must be >= 2" in r.output
