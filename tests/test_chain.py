"""`replica pipeline` as a scheduled run: what it refuses before work, which queries it searches, how a
run claims its folder and records how it ended, and `replica runs`. (The whole chain on S3 through
`ray job submit` is tests/test_jobs.py.)"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from pipeline.chain import select_queries
from pipeline.cli import app
from pipeline.errors import EXIT_LOCKED, EXIT_REFUSED, EXIT_TOO_MANY_FAILURES
from pipeline.layout import runs as layout
from pipeline.layout.runs import PipelineRecord, ResultsFolder


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def write_config(path: Path, **sections) -> str:
    path.write_text(yaml.safe_dump(sections))
    return str(path)


@pytest.fixture
def minimal(tmp_path):
    """index + search sections over folders that exist: enough for the plan to pass."""
    (tmp_path / "generated").mkdir()
    for name in ("a", "b"):
        (tmp_path / "generated" / f"{name}.png").write_bytes(b"not read by the plan")
    return {"index": {"embeddings": str(tmp_path / "emb"), "index": str(tmp_path / "index")},
            "search": {"queries": str(tmp_path / "generated"), "output": str(tmp_path / "results")}}


def one_error_line(r) -> str:
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    return lines[0]


def test_the_plan_refuses_what_cannot_work_before_any_stage(tmp_path, minimal):
    cases = [
        ({"search": minimal["search"]}, "has no index section"),
        ({**minimal, "ingest": {"input": [str(tmp_path)], "output": str(tmp_path / "tars")}},
         "ingest section but no embed section"),
        ({**minimal, "ingest": {"input": [str(tmp_path)], "output": str(tmp_path / "tars"), "image_size": 224},
          "embed": {"output": str(tmp_path / "emb"), "embedder": {"name": "sscd"}}},
         "ingest.image_size 224 is below the 288 px short side that embed's sscd embedder reads"),
        ({**minimal, "embed": {"output": str(tmp_path / "emb")}}, "embed.input is empty and there is no ingest section"),
        ({**minimal, "pipeline": {"run_id": "a"}, "search": {**minimal["search"], "run_id": "b"}},
         "pipeline.run_id 'a' and search.run_id 'b' differ"),
        ({**minimal, "search": {**minimal["search"], "queries": str(tmp_path / "none")}}, "does not exist"),
        ({**minimal, "pipeline": {"search_queries": "some"}}, "pipeline.search_queries must be one of new, all"),
    ]
    for i, (sections, message) in enumerate(cases):
        r = invoke("pipeline", "-c", write_config(tmp_path / f"c{i}.yaml", **sections))
        assert r.exit_code == EXIT_REFUSED and message in one_error_line(r), (sections, r.output)
    assert not (tmp_path / "results").exists() or not list((tmp_path / "results").iterdir())


def test_a_run_id_is_claimed_by_one_run_and_a_succeeded_run_is_never_redone(tmp_path, minimal):
    cfg = write_config(tmp_path / "p.yaml", **minimal, pipeline={"run_id": "2026-01-05"})
    run = ResultsFolder(minimal["search"]["output"]).run("2026-01-05")
    with run.pipeline_lock():
        r = invoke("pipeline", "-c", cfg)
    assert r.exit_code == EXIT_LOCKED and "is locked by `replica pipeline`" in r.output
    assert run.read_pipeline_record() is None  # the refused run wrote nothing into the other's folder

    run.write_pipeline_record(PipelineRecord(run_id="2026-01-05", status=layout.RUN_SUCCEEDED, started_at="then"))
    r = invoke("pipeline", "-c", cfg)
    assert r.exit_code == EXIT_REFUSED and "run '2026-01-05' already succeeded" in one_error_line(r)
    assert run.read_pipeline_record().started_at == "then"


def earlier_search_run(results: Path, run_id: str, sources: list[str]) -> None:
    """A run folder as `replica search` leaves it: its queries table says where each query came from."""
    schema = layout.queries_schema()
    n = len(sources)
    columns = {f.name: [None] * n for f in schema}
    columns.update(run_id=[run_id] * n, query_key=[Path(s).stem for s in sources], source=sources)
    ResultsFolder(str(results)).run(run_id).write_table(layout.QUERIES, columns)


def test_new_query_images_are_those_no_earlier_run_searched(tmp_path):
    gen = tmp_path / "generated"
    gen.mkdir()
    for name in ("a.png", "b.jpg", "c.webp", "d.png", "notes.md"):
        (gen / name).write_bytes(b"x")
    (gen / "d.txt").write_text("  a prompt \n")
    results = tmp_path / "results"
    earlier_search_run(results, "r1", [str(gen / "a.png")])
    earlier_search_run(results, "r2", [str(gen / "b.jpg"), str(tmp_path / "elsewhere" / "c.webp")])

    sel = select_queries(str(gen), ResultsFolder(str(results)), "r3", None)
    assert (sel.listed, sel.searched_before) == (4, 2)
    assert [(q.key, Path(q.url).name, q.prompt_url and Path(q.prompt_url).name) for q in sel.new] == \
        [("c", "c.webp", None), ("d", "d.png", "d.txt")]
    # a pipeline run handed c to search, which skipped it as unreadable: once that search finished
    # (run.json), c is not handed over again, run after run
    r4 = ResultsFolder(str(results)).run("r4")
    r4.write_table(layout.QUERY_INPUTS, {"key": ["c"], "path": [str(gen / "c.webp")], "prompt": [None]})
    assert [q.key for q in select_queries(str(gen), ResultsFolder(str(results)), "r5", None).new] == ["c", "d"]
    r4.write_record(layout.RunRecord(run_id="r4", unreadable_queries=[{"source": str(gen / "c.webp"), "error": "x"}]))
    assert [q.key for q in select_queries(str(gen), ResultsFolder(str(results)), "r5", None).new] == ["d"]
    # the run being planned does not count against itself (a rerun of a failed run searches its queries again)
    assert [q.key for q in select_queries(str(gen), ResultsFolder(str(results)), "r2", None).new] == ["b", "d"]
    (gen / "a.jpg").write_bytes(b"x")
    with pytest.raises(Exception, match="query keys repeat"):
        select_queries(str(gen), ResultsFolder(str(results)), "r3", None)
    # a Parquet file or tars of queries: no selection, everything is searched
    assert select_queries(str(tmp_path / "q.parquet"), ResultsFolder(str(results)), "r3", None) is None


def test_a_failed_run_records_why_and_runs_lists_every_run(tmp_path, minimal, ray_local):
    from pipeline.testing.image_server import ImageServer

    with ImageServer() as server:
        (tmp_path / "lists").mkdir()
        pq.write_table(pa.table({"url": [server.url("missing", i) for i in range(4)], "caption": ["c"] * 4}),
                       tmp_path / "lists" / "part.parquet")
        cfg = write_config(tmp_path / "p.yaml", **minimal, pipeline={"run_id": "2026-01-12"},
                           ingest={"input": [str(tmp_path / "lists")], "output": str(tmp_path / "tars"),
                                   "samples_per_shard": 4, "threads": 4, "max_failed_fraction": 0.5},
                           embed={"output": str(tmp_path / "emb")})
        r = invoke("pipeline", "-c", cfg, "--quiet")
    assert r.exit_code == EXIT_TOO_MANY_FAILURES, r.output
    run = ResultsFolder(minimal["search"]["output"]).run("2026-01-12")
    rec = run.read_pipeline_record()
    assert (rec.status, rec.exit_code) == ("failed", EXIT_TOO_MANY_FAILURES) and "4 of 4 URLs failed" in rec.error
    assert rec.stages["ingest"]["failed"] == {"http_404": 4} and "embed" not in rec.stages
    assert rec.config["ingest"]["samples_per_shard"] == 4 and rec.software["img2dataset"]
    assert rec.finished_at and rec.seconds > 0

    earlier_search_run(tmp_path / "results", "2026-01-01", [str(tmp_path / "generated" / "a.png")])
    r = invoke("runs", "--results", str(tmp_path / "results"))
    lines = r.output.splitlines()
    assert r.exit_code == 0 and lines[0].split()[:3] == ["run", "kind", "status"]
    assert lines[1].split()[:3] == ["2026-01-01", "search", "incomplete"]
    assert lines[2].split()[:3] == ["2026-01-12", "pipeline", "failed"]
    assert "2026-01-12: TooManyFailures: 4 of 4 URLs failed" in r.output
    rows = json.loads(invoke("runs", "-c", cfg, "--json").output)
    assert [(row["run_id"], row["status"]) for row in rows] == [("2026-01-01", "incomplete"), ("2026-01-12", "failed")]


def write_release(root: Path, number: int, seeds: list[int], embedder) -> None:
    """A clip-retrieval release file pair of real vectors: what import-embeddings reads."""
    from pipeline.synthetic_images import scene

    (root / "img_emb").mkdir(parents=True, exist_ok=True)
    (root / "metadata").mkdir(exist_ok=True)
    vectors = embedder.embed_images([scene(s, (320, 256)) for s in seeds]).astype(np.float16)
    np.save(root / "img_emb" / f"img_emb_{number}.npy", vectors)
    pq.write_table(pa.table({"key": [f"rel-{s}" for s in seeds], "url": [f"https://img.example/{s}.jpg" for s in seeds],
                             "caption": [f"scene {s}" for s in seeds]}), root / "metadata" / f"metadata_{number}.parquet")


def test_pipeline_with_an_import_section_indexes_released_vectors_and_adds_new_release_files(tmp_path, ray_local):
    """Route B as a scheduled run: import -> index -> search; a new release file is all the rerun imports."""
    from pipeline.config import EmbedderConfig
    from pipeline.embedders import build_embedder
    from pipeline.synthetic_images import scene

    embedder = build_embedder(EmbedderConfig())
    identity = embedder.identity()
    write_release(tmp_path / "release", 0, list(range(60)), embedder)
    gen = tmp_path / "generated"
    gen.mkdir()
    scene(7, (320, 256)).resize((480, 384)).save(gen / "copy-7.png")
    cfg = write_config(
        tmp_path / "p.yaml",
        **{"import": {"input": str(tmp_path / "release"), "output": str(tmp_path / "emb"), "embedder": "default",
                      "model": identity["model"], "weights": identity["weights"],
                      "preprocess": identity["preprocess"], "rows_per_shard": 25},
           "index": {"index": str(tmp_path / "index"), "factory": "IVF4,Flat"},
           # released rows have no pixels: no verification, no region baseline
           "search": {"queries": str(gen), "output": str(tmp_path / "results"), "embedder": {"name": "default"}, "nprobe": 4,
                      "regions": False, "verify_top": 0, "baseline_size": 20}})
    r = invoke("pipeline", "-c", cfg, "--quiet")
    assert r.exit_code == 0, r.output
    assert "imported 60 rows into 3 shard(s) (0 already complete)" in r.output

    write_release(tmp_path / "release", 1, list(range(100, 120)), embedder)
    scene(105, (320, 256)).resize((480, 384)).save(gen / "copy-105.png")
    r = invoke("pipeline", "-c", cfg, "--quiet")
    assert r.exit_code == 0, r.output
    assert "imported 20 rows into 1 shard(s) (3 already complete)" in r.output
    results = ResultsFolder(str(tmp_path / "results"))
    first, second = (results.run(run_id) for run_id in results.run_ids())
    st = second.read_pipeline_record().stages
    assert (st["import"]["written"], st["index"]["added"], st["index"]["ntotal"]) == (1, 20, 80)
    assert (st["search"]["listed"], st["search"]["searched_before"], st["search"]["searched"]) == (2, 1, 1)
    for run, key, match in ((first, "copy-7", "rel-7"), (second, "copy-105", "rel-105")):
        with run.open(layout.MATCHES) as f:
            top = [m for m in pq.read_table(f).to_pylist() if m["rank"] == 1]
        assert [(m["query_key"], m["match_key"]) for m in top] == [(key, match)]
