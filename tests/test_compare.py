"""`replica compare` on run folders as search writes them: figures against a recomputation from the
tables, labels, and columns left empty (with a note) when the runs' descriptors differ."""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import app
from pipeline.compare import compare_runs, load_runs, to_markdown
from pipeline.errors import ConfigError
from pipeline.report import wilson_interval
from test_report import build_run, write_corpus


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    corpus = write_corpus(tmp_path_factory.mktemp("corpus"))
    root = tmp_path_factory.mktemp("res") / "results"
    a = build_run(root, "run-a", 1, corpus)
    b = build_run(root, "run-b", 2, corpus, n_queries=25)
    for run_dir, label, calibrated in ((a, "SD 1.4", 0.42), (b, "SD 1.4 + mitigation", 0.44)):
        record = json.loads((run_dir / "run.json").read_text())
        record["settings"] = {"label": label}
        record["thresholds"]["calibrated"] = calibrated
        (run_dir / "run.json").write_text(json.dumps(record))
    return a, b


def expected_top1(run_dir, column: str = "score_exact") -> list[float]:
    m = pq.read_table(run_dir / "matches.parquet").to_pylist()
    best: dict[str, float] = {}
    for r in m:
        best[r["query_key"]] = max(best.get(r["query_key"], -1.0), r[column])
    return list(best.values())


def test_compare_two_runs_against_their_tables(runs):
    a, b = runs
    c = compare_runs(load_runs([str(a), str(b)]))
    assert c.descriptors == ["exact"]
    by_id = {r["run_id"]: r for r in c.rows}
    for run_dir, run_id, label, calibrated in ((a, "run-a", "SD 1.4", 0.42), (b, "run-b", "SD 1.4 + mitigation", 0.44)):
        row = by_id[run_id]
        top1 = np.array(expected_top1(run_dir))
        assert row["label"] == label and row["queries"] == pq.read_metadata(run_dir / "queries.parquet").num_rows
        assert row["top1_exact_mean"] == pytest.approx(top1.mean())
        assert row["top1_exact_p95"] == pytest.approx(np.percentile(top1, 95))
        assert row["top1_exact_max"] == pytest.approx(top1.max())
        queries = pq.read_table(run_dir / "queries.parquet")
        n = queries.num_rows
        # the paper's 0.5 on the descriptor similarity, the calibrated threshold on the final score
        for key, column, t in (("paper", "best_similarity", 0.5), ("calibrated", "best_score", calibrated)):
            k = sum(s is not None and s >= t for s in queries.column(column).to_pylist())
            assert row[f"share_{key}_count"] == k and row[f"share_{key}"] == pytest.approx(k / n)
            assert [row[f"share_{key}_low"], row[f"share_{key}_high"]] == pytest.approx(list(wilson_interval(k, n)))
        only = pq.read_table(run_dir / "queries.parquet").column("copy_outside_subset_only").to_pylist()
        assert row["outside_only_count"] == sum(only)
        smallest: dict[str, float] = {}
        for m in pq.read_table(run_dir / "matches.parquet").to_pylist():
            smallest[m["query_key"]] = min(smallest.get(m["query_key"], 9.0), m["nl2"])
        nl2 = np.array(list(smallest.values()))
        assert row["nl2_min"] == pytest.approx(nl2.min()) and row["nl2_p5"] == pytest.approx(np.percentile(nl2, 5))
        assert row["nl2_max"] == pytest.approx(nl2.max()) and row["nl2_p95"] == pytest.approx(np.percentile(nl2, 95))
    assert not any(n.startswith("nL2") for n in c.notes)
    md = to_markdown(c)
    assert md.count("\n| run-") == 2 and "SD 1.4 + mitigation" in md and "exact p95" in md

    relabelled = compare_runs(load_runs([str(a), str(b)]), ["base", "amg"])
    assert [r["label"] for r in relabelled.rows] == ["base", "amg"]
    with pytest.raises(ConfigError, match="one per run"):
        compare_runs(load_runs([str(a), str(b)]), ["only one"])


def test_runs_with_different_descriptors_or_score_versions_leave_columns_empty(runs, tmp_path):
    import shutil

    a, b = runs
    other = tmp_path / "run_id=run-b"
    shutil.copytree(b, other)
    record = json.loads((other / "run.json").read_text())
    record["embedder"] = {"name": "sscd", "dim": 512}  # another descriptor made score_exact
    record["score_version"] = 2
    (other / "run.json").write_text(json.dumps(record))
    c = compare_runs(load_runs([str(a), str(other)]))
    assert c.descriptors == []
    assert all("top1_exact_mean" not in r for r in c.rows)
    assert all(r["share_paper"] is None and r["share_calibrated"] is None for r in c.rows)
    assert any(n.startswith("exact: the runs' descriptors differ (dim, name)") for n in c.notes)
    assert any("score versions 1, 2" in n for n in c.notes)
    assert c.histogram is None and any(n.startswith("histogram") for n in c.notes)


def test_compare_command_writes_markdown_parquet_and_histogram(runs, tmp_path):
    a, b = runs
    out = tmp_path / "cmp.parquet"
    png = tmp_path / "cmp.png"
    r = CliRunner().invoke(app, ["compare", str(a), str(b), "--markdown", "--parquet", str(out),
                                 "--histogram", str(png), "--label", "x", "--label", "y"])
    assert r.exit_code == 0, r.output
    assert "| run-a | x |" in r.output and "| run-b | y |" in r.output
    table = pq.read_table(out)
    assert table.num_rows == 2 and table.column("label").to_pylist() == ["x", "y"]
    assert json.loads(table.schema.metadata[b"replica.compare.notes"]) == []  # every figure comparable
    assert Image.open(io.BytesIO(png.read_bytes())).size[0] > 300
    r = CliRunner().invoke(app, ["compare", str(a), str(b)])  # the terminal table
    assert r.exit_code == 0 and "replica compare" in r.output and "run-b" in r.output
