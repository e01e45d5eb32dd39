"""``replica pipeline``: the stages chained into one scheduled run, and each run's record.

The sections of one config file, in the order they run (each optional but ``index`` and ``search``)::

    ingest -> embed -> import -> index -> search -> report

Every stage resumes and skips what is complete, so a scheduled run does only the new work: URL
lists not ingested yet, tars not embedded yet, embedding shards not in the index yet (they become
new index shards; the trained quantizer and the existing index shards are not touched), and, with
``pipeline.search_queries: new``, the query images no earlier run searched. A link left empty between two
sections is filled from the section before it: embed reads ingest's complete tars, index the embed
(or import) output, search the index.

Which queries a run searches is decided here, not in search: the query images in
``search.queries`` (a folder) are listed, those an earlier run's search went through are dropped
(the ``source`` column of its ``queries.parquet``, and the files a finished search was handed in
its ``query_inputs.parquet``, unreadable ones included), and the rest go to search as the run's own
``query_inputs.parquet``. A query searched once is not searched again against corpus data added
later; ``pipeline.search_queries: all`` searches every query image against the corpus as it is now.

Each run has a folder of its own, ``{search.output}/run_id={run_id}/``: the pipeline holds its lock
for the whole run and writes ``pipeline.json`` (inputs, software version and image, status, what
each stage did) there when it starts and when it ends; search writes its tables there. No two runs
share a file, so runs started side by side never rewrite each other's record, and ``replica runs``
lists them by reading each folder.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipeline.config import (
    EmbedConfig,
    EmbedderConfig,
    ImportConfig,
    IndexConfig,
    IngestConfig,
    PipelineConfig,
    SearchConfig,
    to_dict,
)
from pipeline.errors import ConfigError, ReplicaError
from pipeline.layout import runs as layout
from pipeline.layout.runs import PipelineRecord, ResultsFolder, RunFolder
from pipeline.progress import NullProgress, Progress
from pipeline.storage import basename, filesystem, join, unstrip

#: Lists in a run record (tars, shards) are kept up to this length; the stages' own files list all.
RECORD_LIST_LIMIT = 10_000


@dataclass
class Chain:
    """The sections of one config file, as built from it (and the flags)."""

    pipeline: PipelineConfig
    index: IndexConfig
    search: SearchConfig
    ingest: IngestConfig | None = None
    imports: ImportConfig | None = None
    embed: EmbedConfig | None = None


@dataclass
class QueryFile:
    key: str
    url: str
    #: URL of its ``{stem}.txt`` prompt, when there is one
    prompt_url: str | None = None


@dataclass
class QuerySelection:
    """The query images of a run in ``new`` mode."""

    listed: int
    searched_before: int
    new: list[QueryFile]


@dataclass
class ChainPlan:
    chain: Chain
    run_id: str
    run: RunFolder
    #: None when every query is searched (mode "all", or queries that are not a folder of images)
    queries: QuerySelection | None
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- plan


def embedder_input_size(cfg: EmbedderConfig) -> int | None:
    """The short side, in pixels, the embedder resizes corpus images to (None: it squashes whole images)."""
    if cfg.name == "sscd":
        from pipeline.embedders.sscd import DEFAULT_SIZE

        return cfg.image_size or DEFAULT_SIZE
    if cfg.name == "open_clip" and cfg.model:
        from pipeline.embedders.clip import model_image_size

        return cfg.image_size or model_image_size(cfg.model)
    return None


def check_resize(ingest: IngestConfig, embed: EmbedConfig) -> list[str]:
    """Refuse an ingest resize that leaves fewer pixels than the embedder reads; note risky modes."""
    notes = []
    need = embedder_input_size(embed.embedder)
    if ingest.resize_mode in ("keep_ratio", "center_crop") and need and ingest.image_size < need:
        raise ConfigError(f"ingest.image_size {ingest.image_size} is below the {need} px short side that embed's "
                          f"{embed.embedder.name} embedder reads: every image would be upscaled; set "
                          f"ingest.image_size >= {need}")
    if ingest.resize_mode == "border":
        notes.append("ingest.resize_mode border pads non-square images with white bars that become part of what "
                     "the descriptor sees: copies without the bars score lower (keep_ratio keeps the picture whole)")
    if ingest.resize_mode == "keep_ratio_largest" and need and ingest.image_size < 2 * need:
        notes.append(f"ingest.resize_mode keep_ratio_largest at {ingest.image_size} px leaves the short side of wide "
                     f"images below the {need} px the embedder reads")
    return notes


def list_query_files(spec: str, storage) -> list[QueryFile] | None:
    """The query images of a folder, as search reads them (key = file stem, prompt in {stem}.txt);
    None when ``spec`` is not a folder of images (tars or a Parquet file: searched whole every run)."""
    from pipeline.queries import IMAGE_SUFFIXES

    fs, path = filesystem(spec, storage)
    if path.endswith(".parquet") or not fs.isdir(path) or fs.glob(path.rstrip("/") + "/*.tar"):
        return None
    names = sorted(fs.ls(path, detail=False))
    present = set(names)
    files = []
    for p in names:
        if p.lower().endswith(IMAGE_SUFFIXES):
            stem = basename(p).rsplit(".", 1)[0]
            txt = p.rsplit(".", 1)[0] + ".txt"
            files.append(QueryFile(stem, unstrip(fs, p), unstrip(fs, txt) if txt in present else None))
    keys = [f.key for f in files]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"query keys repeat in {spec!r} (two images with one name): each generated image needs its own")
    return files


def select_queries(spec: str, results: ResultsFolder, run_id: str, storage) -> QuerySelection | None:
    """The query images no earlier run's search in ``results`` went through (matched by their URL)."""
    files = list_query_files(spec, storage)
    if files is None:
        return None
    searched: set[str] = set()
    for other in results.run_ids():
        if other != run_id:
            searched.update(results.run(other).query_sources())
    new = [f for f in files if f.url not in searched]
    return QuerySelection(listed=len(files), searched_before=len(files) - len(new), new=new)


def _with(cfg: Any, **changes: Any) -> Any:
    return dataclasses.replace(cfg, **{k: v for k, v in changes.items() if v is not None})


def link(chain: Chain) -> Chain:
    """Fill the empty links between sections from the section before, and one Ray address for all."""
    address = chain.pipeline.ray.address
    ray = (lambda c: _with(c, ray=_with(c.ray, address=address))) if address else (lambda c: c)
    ingest = ray(chain.ingest) if chain.ingest else None
    embed = chain.embed
    if embed is not None:
        embed = ray(embed)
        if not embed.input and ingest is not None:
            # a glob, not a list: embed keeps only the tars ingest completed (pipeline/layout/ingest.py)
            embed = _with(embed, input=[join(ingest.output, "*.tar")])
    index = ray(chain.index)
    if not index.embeddings:
        index = _with(index, embeddings=(embed.output if embed else None) or
                      (chain.imports.output if chain.imports else None))
    search = ray(chain.search)
    if not search.index:
        search = _with(search, index=index.index)
    return Chain(chain.pipeline, index, search, ingest, chain.imports, embed)


def plan_chain(chain: Chain) -> ChainPlan:
    """Check every section before any work; raise ConfigError (exit code 2) if one cannot work."""
    from pipeline.embed import check_settings as check_embed
    from pipeline.index.plan import plan_index
    from pipeline.layout.index import MANIFEST_FILE, IndexFolder
    from pipeline.layout.runs import check_run_id

    chain = link(chain)
    notes: list[str] = []
    if chain.ingest is not None:
        from pipeline.ingest import plan as plan_ingest

        if chain.embed is None:
            raise ConfigError("the config has an ingest section but no embed section: the tars would never reach the index")
        notes += check_resize(chain.ingest, chain.embed)
        plan_ingest(chain.ingest)
    if chain.embed is not None:
        if not chain.embed.input:
            raise ConfigError("embed.input is empty and there is no ingest section to take the tars from")
        check_embed(chain.embed)
    if chain.imports is not None:
        from pipeline.import_embeddings import plan as plan_import

        plan_import(chain.imports)
    plan_index(chain.index)
    search = chain.search
    if not search.output or not search.queries:
        raise ConfigError("the search section needs queries (generated images) and output (a results folder)")
    for name in ("pipeline.run_id", "search.run_id"):
        value = chain.pipeline.run_id if name == "pipeline.run_id" else search.run_id
        if value:
            check_run_id(value)
    if chain.pipeline.run_id and search.run_id and chain.pipeline.run_id != search.run_id:
        raise ConfigError(f"pipeline.run_id {chain.pipeline.run_id!r} and search.run_id {search.run_id!r} differ: "
                          "set one of them")
    run_id = chain.pipeline.run_id or search.run_id or dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    chain = dataclasses.replace(chain, search=_with(search, run_id=run_id))
    results = ResultsFolder(search.output, search.s3)
    try:
        results.check_writable()
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"cannot write to search.output {search.output!r}: {type(exc).__name__}: {exc}") from exc
    fs, path = filesystem(search.queries, search.s3)
    if not fs.exists(path):
        raise ConfigError(f"search.queries {search.queries!r} does not exist")
    if IndexFolder(chain.index.index, chain.index.s3).exists(MANIFEST_FILE):
        from pipeline.search import plan_search  # with an index already built, search checks all it can now

        plan_search(chain.search)
    selection = None
    if chain.pipeline.search_queries == "new":
        selection = select_queries(search.queries, results, run_id, search.s3)
        if selection is None:
            notes.append(f"search.queries {search.queries!r} is not a folder of images: every query in it is searched "
                         "in every run (pipeline.search_queries: new picks new images from a folder)")
    return ChainPlan(chain, run_id, results.run(run_id), selection, notes)


# --------------------------------------------------------------------------- the run record


def source_digest() -> str:
    """sha256 over the running code of ``pipeline/`` (a Ray job's working dir has no .git to name it)."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def software() -> dict[str, Any]:
    """Versions of replica (installed and running) and of the libraries that shape its outputs."""
    from importlib.metadata import PackageNotFoundError, version

    def ver(*names: str) -> str | None:
        for name in names:
            try:
                return version(name)
            except PackageNotFoundError:
                continue
        return None

    running = None
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if pyproject.is_file():  # a checkout or a job's working dir: the version of the code that runs
        import tomllib

        running = tomllib.loads(pyproject.read_text()).get("project", {}).get("version")
    return {"replica": running or ver("replica-search"), "replica_installed": ver("replica-search"),
            "source_sha256": source_digest(), "python": sys.version.split()[0], "ray": ver("ray"),
            "torch": ver("torch"), "faiss": ver("faiss-gpu", "faiss-gpu-cu12", "faiss-cpu"),
            "open_clip_torch": ver("open_clip_torch"), "img2dataset": ver("img2dataset"), "pyarrow": ver("pyarrow"),
            "numpy": ver("numpy")}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _capped(items: list[str]) -> dict[str, Any]:
    return {"count": len(items), "names": items[:RECORD_LIST_LIMIT], "truncated": len(items) > RECORD_LIST_LIMIT}


# --------------------------------------------------------------------------- the run

#: what the command line shows after a stage: (stage, its result)
Report = Callable[[str, Any], None]


def run_chain(plan: ChainPlan, progress: Progress | None = None, report: Report | None = None) -> PipelineRecord:
    """Run the planned stages in order, holding the run folder's pipeline lock, recording the run."""
    progress = progress or NullProgress()
    report = report or (lambda stage, result: None)
    chain = plan.chain
    with plan.run.pipeline_lock(break_lock=chain.search.break_lock, stale_after_s=chain.search.lock_stale_after_s):
        before = plan.run.read_pipeline_record()
        if before is not None and before.status == layout.RUN_SUCCEEDED:
            raise ConfigError(f"run {plan.run_id!r} already succeeded ({plan.run.url}): leave run_id empty or pick a new one")
        sections = {"pipeline": chain.pipeline, "ingest": chain.ingest, "embed": chain.embed, "import": chain.imports,
                    "index": chain.index, "search": chain.search}
        record = PipelineRecord(run_id=plan.run_id, status=layout.RUN_RUNNING, started_at=_now(), software=software(),
                                image=os.environ.get("REPLICA_IMAGE") or None, host=socket.gethostname(),
                                config={k: to_dict(v) for k, v in sections.items() if v is not None})
        plan.run.write_pipeline_record(record)
        started = time.time()
        for note in plan.notes:
            progress.log(f"note: {note}")
        try:
            _stages(plan, progress, report, record)
        except BaseException as exc:
            record.status = layout.RUN_FAILED
            record.exit_code = exc.exit_code if isinstance(exc, ReplicaError) else 1
            record.error = f"{type(exc).__name__}: {exc}"[:2000]
            raise
        else:
            record.status = layout.RUN_SUCCEEDED
            record.exit_code = 0
        finally:
            record.finished_at = _now()
            record.seconds = round(time.time() - started, 3)
            plan.run.write_pipeline_record(record)
        return record


def _stages(plan: ChainPlan, progress: Progress, report: Report, record: PipelineRecord) -> None:
    chain = plan.chain
    stages = record.stages

    def done(stage: str, result: Any, entry: dict[str, Any]) -> None:
        stages[stage] = entry
        plan.run.write_pipeline_record(record)  # so a run that dies later still says what it did
        report(stage, result)

    if chain.ingest is not None:
        from pipeline.ingest import run_ingest

        t = time.time()
        s = run_ingest(chain.ingest, progress)
        entry = s.to_json()
        entry["new_tars"] = _capped(s.new_tars)
        done("ingest", s, {**entry, "wall_seconds": round(time.time() - t, 3)})
        s.raise_for_failures(chain.ingest.max_failed_fraction)
    if chain.embed is not None:
        from pipeline.embed import run_embed

        shards: list[str] = []
        t = time.time()
        s = run_embed(chain.embed, progress, on_shard_done=lambda st: shards.append(st.shard))
        done("embed", s, {"shards_total": s.shards_total, "shards_skipped": s.shards_skipped,
                          "shards_done": s.shards_done, "images": s.images, "embedded": s.embedded, "failed": s.failed,
                          "shard_errors": s.shard_errors, "shards_failed": s.shards_failed,
                          "new_shards": _capped(sorted(shards)), "seconds": round(s.seconds, 3),
                          "wall_seconds": round(time.time() - t, 3)})
        s.raise_for_failures(chain.embed.max_failed_fraction, chain.embed.max_failed_shards)
    if chain.imports is not None:
        from pipeline.import_embeddings import raise_for_failures, run_import

        s = run_import(chain.imports, progress)
        done("import", s, dict(s))
        raise_for_failures(s, chain.imports.max_failed_fraction)
    _index(plan, progress, done)
    _search(plan, progress, done)


def _index(plan: ChainPlan, progress: Progress, done) -> None:
    from pipeline.index.build import run_build
    from pipeline.layout.index import MANIFEST_FILE, IndexFolder

    folder = IndexFolder(plan.chain.index.index, plan.chain.index.s3)
    old = folder.read_manifest() if folder.exists(MANIFEST_FILE) else None
    old_shards = {s.name for s in old.shards} if old else set()
    built = run_build(plan.chain.index, progress)
    m = built.manifest
    done("index", built, {"factory": m.factory, "ntotal": m.ntotal, "added": m.ntotal - (old.ntotal if old else 0),
                          "index_shards": len(m.shards),
                          "new_index_shards": sorted(s.name for s in m.shards if s.name not in old_shards),
                          "trained_sha256": m.trained_sha256, "timings": built.timings})


def _search(plan: ChainPlan, progress: Progress, done) -> None:
    from pipeline.search import run_search

    search = plan.chain.search
    sel = plan.queries
    entry: dict[str, Any] = {"mode": plan.chain.pipeline.search_queries, "queries": search.queries}
    if sel is not None:
        entry.update(listed=sel.listed, searched_before=sel.searched_before, new=len(sel.new))
        if not sel.new:
            progress.log(f"no new query images under {search.queries}: search skipped "
                         f"({sel.listed} listed, all searched by earlier runs)")
            done("search", None, {**entry, "skipped": "no new query images"})
            return
        search = _with(search, queries=_write_query_inputs(plan.run, sel, search.s3))
    t = time.time()
    result = run_search(search, progress)
    rep = result.summary.replication.get("replication", {}).get("all", {})
    done("search", result, {**entry, "searched": result.summary.queries.get("count"), "run_url": result.run_url,
                            "replication_rate": rep.get("rate"), "index_vectors": result.summary.index.get("ntotal"),
                            "wall_seconds": round(time.time() - t, 3)})


def _write_query_inputs(run: RunFolder, sel: QuerySelection, storage) -> str:
    """The run's new query images as the Parquet search reads (key, path, prompt); returns its URL."""
    from pipeline.storage import read_bytes

    prompts = [read_bytes(f.prompt_url, storage).decode("utf-8", "replace").strip() if f.prompt_url else None
               for f in sel.new]
    run.write_table(layout.QUERY_INPUTS, {"key": [f.key for f in sel.new], "path": [f.url for f in sel.new],
                                          "prompt": prompts})
    return run.file_url(layout.QUERY_INPUTS)


# --------------------------------------------------------------------------- listing runs


def list_runs(results: ResultsFolder) -> list[dict[str, Any]]:
    """One row per run folder: what ``replica runs`` prints (pipeline runs and plain search runs)."""
    rows = []
    for run_id in results.run_ids():
        run = results.run(run_id)
        rec = run.read_pipeline_record()
        search_rec = run.read_record_if_any()
        summary = run.read_summary_if_any()
        row: dict[str, Any] = {"run_id": run_id, "kind": "pipeline" if rec else "search"}
        if rec is not None:
            st = rec.stages
            row.update(status=rec.status, started_at=rec.started_at, seconds=rec.seconds,
                       version=rec.software.get("replica"), image=rec.image, error=rec.error,
                       new_tars=(st.get("ingest") or {}).get("shards_done"),
                       new_shards=(st.get("embed") or {}).get("shards_done"),
                       added_vectors=(st.get("index") or {}).get("added"),
                       index_vectors=(st.get("index") or {}).get("ntotal"),
                       queries=(st.get("search") or {}).get("searched", 0 if st.get("search") else None))
        else:
            row.update(status=layout.RUN_SUCCEEDED if summary else ("searched" if search_rec else "incomplete"),
                       started_at=search_rec.created_at if search_rec else None,
                       seconds=search_rec.seconds if search_rec else None,
                       queries=search_rec.queries if search_rec else None,
                       index_vectors=(search_rec.index or {}).get("ntotal") if search_rec else None)
        if summary is not None:
            row["replication_rate"] = summary.replication.get("replication", {}).get("all", {}).get("rate")
        rows.append(row)
    return rows
