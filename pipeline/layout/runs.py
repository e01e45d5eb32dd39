"""A results folder: one hive partition per search run, and the files of one run.

```
{results}/run_id={run_id}/run.json          RunRecord, written by search after its tables
{results}/run_id={run_id}/queries.parquet   one row per generated image
{results}/run_id={run_id}/matches.parquet   one row per query x rank
{results}/run_id={run_id}/baseline.parquet  the corpus self-similarity sample
{results}/run_id={run_id}/histogram.png     written by report
{results}/run_id={run_id}/report.html       written by report: the self-contained gallery
{results}/run_id={run_id}/summary.json      RunSummary, written last by report
{results}/run_id={run_id}/pipeline.json     PipelineRecord: a `replica pipeline` run (inputs, software,
                                            image, status, what each stage did), written at its start and end
{results}/run_id={run_id}/query_inputs.parquet  the query images that pipeline run gave search (key, path, prompt)
{results}/run_id={run_id}/_pipeline_lock.json   held by that pipeline run for its whole length
{results}/run_id={run_id}/_batches/plan.json     BatchPlan: how the queries were cut into batches, and
                                                 the settings digest a resumed run must match
{results}/run_id={run_id}/_batches/{n:06d}.matches.parquet, {n:06d}.queries.parquet
                                                 one query batch's rows
{results}/run_id={run_id}/_batches/{n:06d}.json  BatchRecord, written last: batch n is done
{results}/run_id={run_id}/_batches/baseline.json BatchRecord of the baseline (baseline.parquet is done)
```

A search writes each batch of queries as it finishes it, so a killed run resumes with the batches
it had not finished; once every batch is done it assembles ``queries.parquet`` and
``matches.parquet`` from them (one row group per batch) and removes ``_batches/``. The
underscore keeps the folder out of hive-partitioned reads of the results.

Everything a run writes stays in its own folder: runs started side by side never rewrite a
shared file, and ``replica runs`` lists them by reading each folder.

Column meanings are in docs/RESULTS.md; every Parquet file carries ``run_id`` as a column too,
so one file read on its own says which run it belongs to.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import ConfigError, MismatchError
from pipeline.layout import known_fields
from pipeline.storage import Folder, basename

RUN_PREFIX = "run_id="
RUN_JSON = "run.json"
QUERIES = "queries.parquet"
MATCHES = "matches.parquet"
BASELINE = "baseline.parquet"
SUMMARY = "summary.json"
HISTOGRAM = "histogram.png"
GALLERY = "report.html"
PIPELINE_RECORD = "pipeline.json"
QUERY_INPUTS = "query_inputs.parquet"
PIPELINE_LOCK = "_pipeline_lock.json"
BATCHES = "_batches"
BATCH_PLAN = f"{BATCHES}/plan.json"
BASELINE_UNIT = "baseline"

# PipelineRecord.status values
RUN_RUNNING = "running"
RUN_SUCCEEDED = "succeeded"
RUN_FAILED = "failed"

#: How a run's final ``score`` is made; recorded in run.json so runs scored differently are never
#: compared as if they were alike. 1: release 0.2, ``score`` was the descriptor similarity; 2: the
#: final score of pipeline/scoring.py (run.json has ``score_model``).
SCORE_VERSION = 2

#: second-stage descriptors (pipeline/second_stage.py) and the match column each writes
RERANK_COLUMNS = {"sscd": "score_sscd", "dino": "score_dino", "dino-split": "score_dino_split",
                  "open_clip": "score_open_clip", "default": "score_default"}

#: A box ``[x0, y0, x1, y1]`` in pixels of the image it refers to (x1/y1 exclusive).
BOX = pa.list_(pa.int32(), 4)


def matches_schema() -> pa.Schema:
    """``matches.parquet``: one row per query x rank (rank 1 = best)."""
    return pa.schema(
        [
            pa.field("run_id", pa.string(), nullable=False),
            pa.field("query_key", pa.string(), nullable=False),
            pa.field("prompt", pa.string()),
            pa.field("rank", pa.int32(), nullable=False),
            # The matched training image, as recorded in its embedding shard.
            pa.field("match_key", pa.string(), nullable=False),
            pa.field("shard", pa.string()),
            pa.field("row", pa.int32()),
            pa.field("url", pa.string()),
            pa.field("caption", pa.string()),
            pa.field("tar_url", pa.string()),
            pa.field("tar_offset", pa.int64()),
            pa.field("tar_size", pa.int64()),
            # Scores: ANN estimate, exact cosine on stored vectors, optional second descriptor,
            # the descriptor similarity the paper's thresholds apply to (score_rerank when there
            # is a second stage, else score_exact), and the final score (pipeline/scoring.py: all
            # evidence, calibrated; rank order, the calibrated threshold and the report use it).
            pa.field("score_index", pa.float32()),
            pa.field("score_exact", pa.float32()),
            # score_exact is the best query region's; this is the whole query image's.
            pa.field("score_whole", pa.float32()),
            pa.field("score_rerank", pa.float32()),
            pa.field("similarity", pa.float32()),
            pa.field("score", pa.float32(), nullable=False),
            # Each second-stage descriptor's similarity (null when it did not run or did not
            # score this candidate); score_rerank is the first one listed.
            *(pa.field(column, pa.float32()) for column in RERANK_COLUMNS.values()),
            # Carlini et al.'s normalised L2 on pixels (small = copy) and how many of the query's
            # best candidates stood for its nearest training images.
            pa.field("nl2", pa.float32()),
            pa.field("nl2_references", pa.int32()),
            # Which query region matched, and where it lies in the query.
            pa.field("region", pa.int32()),
            pa.field("region_box", BOX),
            pa.field("in_subset", pa.bool_()),
            # Local-feature verification (null when not run for this match).
            pa.field("inliers", pa.int32()),
            pa.field("tentative_matches", pa.int32()),
            pa.field("verify_score", pa.float32()),
            pa.field("query_box", BOX),
            pa.field("match_box", BOX),
            # Near-duplicate group of the matched image and how many training copies it has.
            pa.field("dup_group", pa.string()),
            pa.field("dup_group_size", pa.int32()),
            # Training rows carrying the match's caption, as is and normalised (`replica captions`;
            # null when the run had no caption counts or the match no caption).
            pa.field("caption_count", pa.int64()),
            pa.field("caption_count_normalized", pa.int64()),
            # The generation's prompt against the match's caption (pipeline/prompts.py).
            pa.field("prompt_caption_exact", pa.bool_()),
            pa.field("prompt_caption_overlap", pa.float32()),
            pa.field("prompt_caption_clip", pa.float32()),
            pa.field("embedder", pa.string()),
            pa.field("preprocess", pa.string()),
        ]
    )


def queries_schema() -> pa.Schema:
    """``queries.parquet``: one row per query (generated image)."""
    return pa.schema(
        [
            pa.field("run_id", pa.string(), nullable=False),
            pa.field("query_key", pa.string(), nullable=False),
            pa.field("prompt", pa.string()),
            pa.field("source", pa.string()),
            # JPEG, longest side about 256 px: the gallery needs nothing else to show the query.
            pa.field("thumbnail", pa.binary()),
            pa.field("width", pa.int32()),
            pa.field("height", pa.int32()),
            # Null when the query had no match at all (e.g. everything blocklisted).
            # The rank-1 match: its final score and key.
            pa.field("best_score", pa.float32()),
            pa.field("best_match_key", pa.string()),
            pa.field("best_score_in_subset", pa.float32()),
            pa.field("best_score_outside_subset", pa.float32()),
            # The largest descriptor similarity among the matches (the paper's top-1 similarity).
            pa.field("best_similarity", pa.float32()),
            pa.field("best_similarity_in_subset", pa.float32()),
            pa.field("best_similarity_outside_subset", pa.float32()),
            pa.field("replicated", pa.bool_()),
            pa.field("copy_outside_subset_only", pa.bool_()),
        ]
    )


def baseline_schema() -> pa.Schema:
    """``baseline.parquet``: the corpus self-similarity, one row per sampled training image."""
    return pa.schema(
        [
            pa.field("run_id", pa.string(), nullable=False),
            pa.field("sample_key", pa.string(), nullable=False),
            # Best match excluding the sample itself.
            pa.field("top1_score", pa.float32()),
            pa.field("top1_key", pa.string()),
            # Best match excluding the sample itself and its near-duplicates.
            pa.field("top1_score_no_dups", pa.float32()),
            # The largest descriptor similarity, with and without near-duplicates.
            pa.field("top1_similarity", pa.float32()),
            pa.field("top1_similarity_no_dups", pa.float32()),
            pa.field("near_dup_count", pa.int32()),
        ]
    )


def query_inputs_schema() -> pa.Schema:
    """``query_inputs.parquet``: the query images a pipeline run searched (what ``replica search`` reads)."""
    return pa.schema(
        [
            pa.field("key", pa.string(), nullable=False),
            # URL of the image file (what queries.parquet's `source` then holds)
            pa.field("path", pa.string(), nullable=False),
            pa.field("prompt", pa.string()),
        ]
    )

#: Columns added in release 0.3, and what they are in a run written before: the old ``score``
#: columns were the descriptor similarity (no final score existed), tentative matches unknown.
FILLED_FROM_0_2 = {
    MATCHES: {"similarity": "score", "tentative_matches": None},
    QUERIES: {"best_similarity": "best_score", "best_similarity_in_subset": "best_score_in_subset",
              "best_similarity_outside_subset": "best_score_outside_subset"},
    BASELINE: {"top1_similarity": "top1_score", "top1_similarity_no_dups": "top1_score_no_dups"},
}
#: Match columns added after release 0.3 (second-stage descriptors, nL2, captions, prompts, the
#: whole image's score): null before.
FILLED_FROM_0_3 = {MATCHES: dict.fromkeys([*RERANK_COLUMNS.values(), "score_whole", "nl2", "nl2_references", "caption_count",
                                           "caption_count_normalized", "prompt_caption_exact",
                                           "prompt_caption_overlap", "prompt_caption_clip"])}


TABLE_SCHEMAS = {QUERIES: queries_schema, MATCHES: matches_schema, BASELINE: baseline_schema,
                 QUERY_INPUTS: query_inputs_schema}


@dataclass
class RunRecord:
    """``run.json``: what a search run was asked, what it used and what it covered."""

    run_id: str
    created_at: str | None = None
    seconds: float | None = None
    queries: int | None = None
    #: what the run measures (model, prompt set, mitigation setting), from `replica search --label`
    label: str | None = None
    #: how `score` is made (SCORE_VERSION when written; None = before it was recorded, version 1)
    score_version: int | None = None
    #: identity of the descriptor that made `score_exact`
    embedder: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    #: the second stage: its first descriptor ("embedder"), "top", and every descriptor's name, column, identity
    rerank: dict[str, Any] | None = None
    verify: dict[str, Any] | None = None
    #: nL2 settings (neighbours, alpha, pixels), None when not computed
    nl2: dict[str, Any] | None = None
    #: the caption counts joined to the matches (url, normalization, sizes), None when not joined
    captions: dict[str, Any] | None = None
    #: {"replication": 0.5, "duplicate": 0.95, "calibrated": ...}
    thresholds: dict[str, float | None] = field(default_factory=dict)
    #: the final-score model: sha256, what it was fitted for, its features, whether fitted
    score_model: dict[str, Any] | None = None
    fpr: float | None = None
    index: dict[str, Any] = field(default_factory=dict)
    coverage: dict[str, Any] = field(default_factory=dict)
    blocklist: dict[str, Any] | None = None
    subset: dict[str, Any] | None = None
    pixels_fetched: int | None = None
    #: wall seconds per stage, summed over the query batches ("queries") and the baseline
    #: ("baseline"): where a run's time went
    stage_seconds: dict[str, dict[str, float]] = field(default_factory=dict)
    #: query files that could not be read (skipped): [{"source", "error"}], the first 100
    unreadable_queries: list[dict[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "RunRecord":
        if not isinstance(d, dict):
            raise MismatchError("run.json must hold a JSON object")
        return cls(**known_fields(cls, {**d, "run_id": str(d.get("run_id") or "")}))


def score_version_of(record: RunRecord) -> int:
    """The score version of a run; runs written before it was recorded: 2 when they name a score
    model (release 0.3), else 1."""
    return int(record.score_version or (2 if record.score_model is not None else 1))


@dataclass
class BatchPlan:
    """``_batches/plan.json``: the cut of the queries into batches, fixed at the run's start."""

    batch_size: int
    queries: int
    batches: int
    #: sha256 of the settings that decide a batch's rows: a resume under other settings is refused
    digest: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "BatchPlan":
        return cls(**known_fields(cls, d))


@dataclass
class BatchRecord:
    """``_batches/{n}.json``: one finished unit of a search (a query batch, or the baseline)."""

    unit: str
    queries: int = 0
    pixels_fetched: int = 0
    blocked: int = 0
    seconds: float = 0.0
    #: query files of the batch that could not be decoded: [[source, why]]
    unreadable: list[list[str]] = field(default_factory=list)
    #: the baseline's share of samples found as themselves (index recall for exact copies)
    self_recall: float | None = None
    #: wall seconds of each stage of the unit (read, embed, candidates, verification...)
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "BatchRecord":
        return cls(**known_fields(cls, d))


def batch_unit(n: int) -> str:
    return f"{n:06d}"


@dataclass
class PipelineRecord:
    """``pipeline.json``: one `replica pipeline` run: what it was given, what ran it, how it ended."""

    run_id: str
    #: "running", "succeeded" or "failed" (a run killed outright stays "running"; its lock goes stale)
    status: str
    started_at: str
    finished_at: str | None = None
    seconds: float | None = None
    #: the exit code and one-line error of a failed run
    exit_code: int | None = None
    error: str | None = None
    #: versions of replica and the libraries that shape its output
    software: dict[str, Any] = field(default_factory=dict)
    #: the container image the run ran in ($REPLICA_IMAGE, set by infra/Dockerfile*), when known
    image: str | None = None
    host: str | None = None
    #: every config section as the run used it (its inputs and settings)
    config: dict[str, Any] = field(default_factory=dict)
    #: what each stage did in this run ("ingest", "embed", "import", "index", "search")
    stages: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "PipelineRecord":
        if not isinstance(d, dict):
            raise MismatchError(f"{PIPELINE_RECORD} must hold a JSON object")
        return cls(**known_fields(cls, {"status": "", "started_at": "", **d, "run_id": str(d.get("run_id") or "")}))


@dataclass
class RunSummary:
    """``summary.json``: the report's figures (definitions in docs/RESULTS.md)."""

    run_id: str
    run_url: str
    created_at: str | None
    reported_at: str
    embedder: dict[str, Any]
    rerank: dict[str, Any] | None
    verify: dict[str, Any] | None
    thresholds: dict[str, float]
    fpr: float
    calibration: dict[str, Any] | None
    queries: dict[str, Any]
    replication: dict[str, Any]
    baseline: dict[str, Any] | None
    coverage: dict[str, Any]
    index: dict[str, Any]
    blocklist: dict[str, Any] | None
    subset: dict[str, Any] | None
    warnings: list[str]
    outputs: dict[str, str] = field(default_factory=dict)
    #: nL2 tails (pipeline/report/memorisation.py), None when the run computed no nL2
    nl2: dict[str, Any] | None = None
    #: replication by caption duplication and by prompt-caption match; the most copied images
    memorisation: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "RunSummary":
        return cls(**known_fields(cls, d))


@dataclass
class RunData:
    """One run folder read back and checked against the schemas."""

    url: str
    run: RunRecord
    queries: pa.Table
    matches: pa.Table
    baseline: pa.Table | None

    @property
    def run_id(self) -> str:
        return self.run.run_id


def check_run_id(run_id: str) -> None:
    if not run_id or "/" in run_id or "=" in run_id:
        raise ConfigError(f"run_id {run_id!r} must be non-empty and may not contain '/' or '='")


class RunFolder(Folder):
    """``{results}/run_id={run_id}/``: the files of one run."""

    @property
    def run_id(self) -> str | None:
        """The run id the folder's name gives, when it is a hive partition."""
        name = basename(self.url)
        return name[len(RUN_PREFIX):] if name.startswith(RUN_PREFIX) else None

    def file_url(self, name: str) -> str:
        return self.child(name)

    # -- writing ----------------------------------------------------------------------------
    def write_table(self, name: str, rows: list[dict[str, Any]] | dict[str, list]) -> None:
        """Write one of the run's tables (rows as dicts, or columns) in its schema."""
        schema = TABLE_SCHEMAS[name]()
        table = pa.Table.from_pydict(rows, schema=schema) if isinstance(rows, dict) else pa.Table.from_pylist(rows, schema=schema)
        with self.atomic(name) as f:
            pq.write_table(table, f)

    def write_record(self, record: RunRecord) -> None:
        self.write_json(RUN_JSON, record.to_json())

    # -- query batches (a search's units of work) --------------------------------------------
    def start_batches(self, plan: BatchPlan) -> int:
        """Record the batch plan, or check it against the one a killed run left: returns how many
        units are already done. Other settings than the recorded ones are refused, never mixed."""
        if self.exists(BATCH_PLAN):
            old = BatchPlan.from_json(self.read_json(BATCH_PLAN))
            if old != plan:
                raise ConfigError(
                    f"{self.url} holds the finished batches of an interrupted search with other settings or "
                    f"queries ({old.queries} queries in batches of {old.batch_size}, settings {old.digest[:12]}; "
                    f"now {plan.queries} in batches of {plan.batch_size}, settings {plan.digest[:12]}): rerun it "
                    "with the same settings to resume, or give a new run id")
            return sum(self.batch_record(batch_unit(n)) is not None for n in range(plan.batches))
        self.write_json(BATCH_PLAN, plan.to_json())
        return 0

    def batch_record(self, unit: str) -> BatchRecord | None:
        name = f"{BATCHES}/{unit}.json"
        return BatchRecord.from_json(self.read_json(name)) if self.exists(name) else None

    def write_batch(self, record: BatchRecord, tables: dict[str, list[dict[str, Any]]]) -> None:
        """A batch's tables, then its record last (the batch is done once the record exists)."""
        for name, rows in tables.items():
            with self.atomic(f"{BATCHES}/{record.unit}.{name}") as f:
                pq.write_table(pa.Table.from_pylist(rows, schema=TABLE_SCHEMAS[name]()), f)
        self.write_json(f"{BATCHES}/{record.unit}.json", record.to_json())

    def assemble_batches(self, batches: int) -> None:
        """``queries.parquet`` and ``matches.parquet`` from the batches' files, one row group per
        batch: memory holds one batch's rows at a time."""
        for name in (QUERIES, MATCHES):
            schema = TABLE_SCHEMAS[name]()
            with self.atomic(name) as out:
                with pq.ParquetWriter(out, schema) as writer:
                    for n in range(batches):
                        with self.open(f"{BATCHES}/{batch_unit(n)}.{name}") as f:
                            writer.write_table(pq.read_table(f, schema=schema))

    def remove_batches(self) -> None:
        self.remove(BATCHES)

    def write_pipeline_record(self, record: PipelineRecord) -> None:
        self.write_json(PIPELINE_RECORD, record.to_json())

    def pipeline_lock(self, **kwargs: Any):
        """The lock a pipeline run holds on its run folder (search takes the folder's own lock inside it)."""
        from pipeline.layout.lock import OutputLock

        return OutputLock(self, "replica pipeline", name=PIPELINE_LOCK, **kwargs)

    def write_report(self, histogram_png: bytes, gallery_html: str, summary: RunSummary) -> None:
        """Histogram and gallery, then the summary last: its presence says the report is complete."""
        summary.outputs = {name: self.child(name) for name in (HISTOGRAM, GALLERY, SUMMARY)}
        self.write_bytes(HISTOGRAM, histogram_png)
        self.write_bytes(GALLERY, gallery_html.encode("utf-8"))
        self.write_json(SUMMARY, summary.to_json())

    # -- reading ----------------------------------------------------------------------------
    def read_record(self) -> RunRecord:
        if not self.exists(RUN_JSON):
            raise ConfigError(f"{self.child(RUN_JSON)} does not exist: give the run directory ({{results}}/run_id={{run_id}})")
        return RunRecord.from_json(self.read_json(RUN_JSON))

    def read_pipeline_record(self) -> PipelineRecord | None:
        return PipelineRecord.from_json(self.read_json(PIPELINE_RECORD)) if self.exists(PIPELINE_RECORD) else None

    def read_record_if_any(self) -> RunRecord | None:
        return RunRecord.from_json(self.read_json(RUN_JSON)) if self.exists(RUN_JSON) else None

    def read_summary_if_any(self) -> RunSummary | None:
        return RunSummary.from_json(self.read_json(SUMMARY)) if self.exists(SUMMARY) else None

    def query_sources(self) -> list[str]:
        """The query images this run's search went through: queries.parquet's `source` (that column only),
        and, once the search finished (run.json), every file a pipeline run handed it in query_inputs.parquet
        (unreadable ones included: search skipped and counted them)."""
        out: list[str] = []
        if self.exists(QUERIES):
            with self.open(QUERIES) as f:
                out += [s for s in pq.read_table(f, columns=["source"]).column("source").to_pylist() if s]
        if self.exists(RUN_JSON) and self.exists(QUERY_INPUTS):
            with self.open(QUERY_INPUTS) as f:
                out += pq.read_table(f, columns=["path"]).column("path").to_pylist()
        return out

    def read_summary(self) -> RunSummary:
        if not self.exists(SUMMARY):
            raise ConfigError(f"{self.child(SUMMARY)} does not exist: run `replica report --run {self.url}` first")
        return RunSummary.from_json(self.read_json(SUMMARY))

    def read_table(self, name: str, required: bool = True) -> pa.Table | None:
        """One table, checked against (and cast to) its schema; extra columns of newer versions are dropped."""
        schema = TABLE_SCHEMAS[name]()
        if not self.exists(name):
            if required:
                raise ConfigError(f"{self.child(name)} does not exist: is this a run directory written by `replica search`?")
            return None
        # A file object, not a path: pyarrow would otherwise add run_id from the hive directory name.
        with self.open(name) as f:
            table = pq.read_table(f)
        for column, source in {**FILLED_FROM_0_2.get(name, {}), **FILLED_FROM_0_3.get(name, {})}.items():
            if column not in table.column_names and (source is None or source in table.column_names):
                values = table.column(source) if source else pa.nulls(table.num_rows, schema.field(column).type)
                table = table.append_column(column, values)
        missing = [n for n in schema.names if n not in table.column_names]
        if missing:
            raise MismatchError(f"{self.child(name)} lacks column(s) {', '.join(missing)}: "
                                "not written with this version's schema (see docs/RESULTS.md)")
        try:
            return table.select(schema.names).cast(schema)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
            raise MismatchError(f"{self.child(name)} does not fit its schema (see docs/RESULTS.md): {exc}") from exc

    def load(self) -> RunData:
        """The whole run, with its run id checked against the folder name and every table."""
        data = RunData(url=self.url, run=self.read_record(), queries=self.read_table(QUERIES),
                       matches=self.read_table(MATCHES), baseline=self.read_table(BASELINE, required=False))
        named = self.run_id
        if named is not None and data.run_id and named != data.run_id:
            raise MismatchError(f"{self.url} is named for run {named!r} but its run.json says {data.run_id!r}:"
                                " hive readers would attribute its rows to the wrong run")
        for name, table in ((QUERIES, data.queries), (MATCHES, data.matches), (BASELINE, data.baseline)):
            if table is None or not data.run_id:
                continue
            ids = set(table.column("run_id").to_pylist())
            if ids - {data.run_id}:
                raise MismatchError(f"{self.child(name)} holds run_id {sorted(ids - {data.run_id})} but run.json "
                                    f"says {data.run_id!r}: files of different runs are mixed in one directory")
        return data


class ResultsFolder(Folder):
    """``{results}/``: one ``run_id=...`` partition per run."""

    def run(self, run_id: str) -> RunFolder:
        check_run_id(run_id)
        return RunFolder(self.child(f"{RUN_PREFIX}{run_id}"), self.storage)

    def run_ids(self) -> list[str]:
        return [n[len(RUN_PREFIX):] for n in self.names(f"{RUN_PREFIX}*")]
