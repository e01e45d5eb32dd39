"""Every ``replica`` command. Options come from the config dataclasses (pipeline/cli/options.py)."""
from __future__ import annotations

import json
from typing import Any, Callable

import click

from pipeline.cli import app
from pipeline.cli.options import Flag, click_option, command, flags_of, overrides_from
from pipeline.config import SECTIONS, build, file_section, merge

#: Last release's flag names, accepted with a warning until the next release.
RENAMED_COMMON = {"--address": "--ray-address", "--endpoint-url": "--s3-endpoint-url"}
RENAMED_EMBEDDER = {f"--{old}": f"--embedder-{old}" for old in
                    ("model", "pretrained", "checkpoint", "model-config", "image-size", "device")}

CONFIG_OPTION = click.Option(["--config", "-c", "config"], default=None, metavar="FILE",
                             help="YAML/TOML config file; its section for this command has the same fields as the "
                                  "flags (docs/CONFIG.md). Flags win.")
LOCAL_OPTION = click.Option(["--local", "local"], is_flag=True, default=False,
                            help="Run the tasks in this process instead of on Ray.")


def quiet_option(short: bool = True) -> click.Option:
    return click.Option(["--quiet", "-q", "quiet"] if short else ["--quiet", "quiet"], is_flag=True, default=False,
                        help="No progress output (the final summary is still printed).")


def warn(note: str) -> None:
    click.secho(f"warning: {note}", fg="yellow", err=True)


def progress_for(quiet: bool):
    from pipeline.progress import make_progress

    return make_progress(quiet)


class SectionCommand:
    """Options of one config section (or some of its fields), and building the config from file + flags."""

    def __init__(self, section: str, only: list[str] | None = None):
        self.section = section
        self.cls = SECTIONS[section]
        self.flags: list[Flag] = flags_of(self.cls, only)

    def params(self, *extra: click.Parameter, config: bool = True) -> list[click.Parameter]:
        return [*([CONFIG_OPTION] if config else []), *(click_option(f) for f in self.flags), *extra]

    def config(self, kwargs: dict[str, Any], config_file: str | None = None, forced: dict[str, Any] | None = None):
        data, notes = file_section(config_file, self.section)
        for note in notes:
            warn(note)
        flags = overrides_from(kwargs, self.flags)
        return build(self.cls, merge(merge(data, flags), forced or {}), self.section)


# --------------------------------------------------------------------------- ingest

INGEST = SectionCommand("ingest")


def _ingest(config: str | None, quiet: bool, **kwargs: Any) -> None:
    from pipeline.ingest import run_ingest

    cfg = INGEST.config(kwargs, config)
    s = run_ingest(cfg, progress_for(quiet))
    print_ingest_summary(s)
    s.raise_for_failures(cfg.max_failed_fraction)


def print_ingest_summary(s) -> None:
    failed = ", ".join(f"{k}={v}" for k, v in sorted(s.failed.items(), key=lambda kv: (-kv[1], kv[0]))) or "none"
    click.echo(
        f"ingested {s.downloaded:,}/{s.urls:,} images into {s.shards_done} shard(s) ({s.shards_skipped} already "
        f"complete, {s.lists_skipped}/{s.lists} URL lists done before) in {s.seconds:.1f}s: {s.urls_per_s:,.1f} URLs/s, "
        f"{s.images_per_s:,.1f} img/s, {s.bytes / 1e6:,.1f} MB written ({s.bytes_per_s / 1e6:,.2f} MB/s); "
        f"failed: {failed}")
    for shard, err in sorted(s.shards_failed.items()):
        click.echo(f"shard {shard} failed (incomplete): {err}", err=True)


command(app, "ingest", INGEST.params(quiet_option()), _ingest,
        "Download LAION-style URL lists into WebDataset tars with img2dataset, in the layout `replica embed` reads. "
        "Resumable and incremental: complete shards and lists are skipped, new lists get new shards. Dead links, "
        "error statuses, timeouts and non-images are counted by reason, never fatal.",
        renamed=RENAMED_COMMON)


# --------------------------------------------------------------------------- embed

EMBED = SectionCommand("embed")


def _embed(config: str | None, quiet: bool, **kwargs: Any) -> None:
    from pipeline.embed import run_embed

    cfg = EMBED.config(kwargs, config)
    s = run_embed(cfg, progress_for(quiet))
    print_embed_summary(s)
    s.raise_for_failures(cfg.max_failed_fraction, cfg.max_failed_shards)


def print_embed_summary(s) -> None:
    failed = ", ".join(f"{k}={v}" for k, v in sorted(s.failed.items())) or "none"
    click.echo(
        f"embedded {s.embedded}/{s.images} images from {s.shards_done} shards "
        f"({s.shards_skipped} already complete) in {s.seconds:.1f}s, {s.images_per_s:.0f} img/s; failed: {failed}"
    )
    for shard, err in sorted(s.shard_errors.items()):
        click.echo(f"shard {shard} is damaged: {err}", err=True)
    for shard, err in sorted(s.shards_failed.items()):
        click.echo(f"shard {shard} failed (incomplete): {err}", err=True)


command(app, "embed", EMBED.params(quiet_option()), _embed,
        "Embed WebDataset tars into one Parquet file per tar (resumable: complete shards are skipped).",
        renamed={**RENAMED_COMMON, **RENAMED_EMBEDDER})


# --------------------------------------------------------------------------- sample


def _sample(output: str, tars: int, per_tar: int, seed: int, **kwargs: Any) -> None:
    from pipeline.sample import make_sample_tars
    from pipeline.storage import Storage

    s3 = overrides_from(kwargs, flags_of(Storage, _prefix=("s3",))).get("s3", {})
    urls = make_sample_tars(output, tars, per_tar, seed, Storage(**s3))
    click.echo(f"wrote {len(urls)} tars of {per_tar} images under {output}")


def _storage_params() -> list[click.Parameter]:
    from pipeline.storage import Storage

    return [click_option(f) for f in flags_of(Storage, _prefix=("s3",))]


command(app, "sample", [
    click.Option(["--output", "-o", "output"], required=True, help="Folder URL for the tars."),
    click.Option(["--tars", "tars"], type=int, default=4, show_default=True, help="Number of tars."),
    click.Option(["--per-tar", "per_tar"], type=int, default=100, show_default=True, help="Images per tar."),
    click.Option(["--seed", "seed"], type=int, default=0, show_default=True, help="Seed of the procedural images."),
    *_storage_params()], _sample, "Write small LAION-like WebDataset tars of procedural images (no download needed).")


# --------------------------------------------------------------------------- search and report

SEARCH = SectionCommand("search")
REPORT = SectionCommand("report")


def print_summary(summary) -> None:
    from pipeline.report import summary_lines

    for line in summary_lines(summary):
        click.echo(line)


def _search(config: str | None, quiet: bool, **kwargs: Any) -> None:
    from pipeline.layout.runs import GALLERY, MATCHES, QUERIES, SUMMARY
    from pipeline.search import run_search

    result = run_search(SEARCH.config(kwargs, config), progress_for(quiet))
    print_summary(result.summary)
    for part, seconds in result.stage_seconds.items():
        if seconds:
            spent = ", ".join(f"{k} {v:,.1f} s" for k, v in sorted(seconds.items(), key=lambda kv: -kv[1]))
            click.echo(f"time by stage ({part}): {spent}")
    click.echo(f"results: {result.run_url}  ({', '.join((GALLERY, SUMMARY, MATCHES, QUERIES))})")


command(app, "search", SEARCH.params(quiet_option(short=False)), _search,
        "Search generated images against the corpus index and write matches, summary and report.",
        # -q meant --queries here in the last release; it means --quiet everywhere from the next one
        renamed={**RENAMED_COMMON, "-q": "--queries"})


def _report(config: str | None, **kwargs: Any) -> None:
    from pipeline.errors import ConfigError
    from pipeline.layout.runs import RUN_PREFIX, RunFolder
    from pipeline.report import run_report

    cfg = REPORT.config(kwargs, config)
    if not cfg.run:
        raise ConfigError(f"no run given: pass --run with a run folder ({{results}}/{RUN_PREFIX}{{run_id}})")
    print_summary(run_report(RunFolder(cfg.run, cfg.s3), cfg.top, cfg.max_queries))


command(app, "report", REPORT.params(), _report,
        "Summarise a search run: replication rates with intervals, histogram PNG, HTML gallery.",
        renamed=RENAMED_COMMON)


def _compare(runs: tuple[str, ...], labels: tuple[str, ...], markdown: bool, parquet: str | None,
             histogram: str | None, **kwargs: Any) -> None:
    from pipeline.compare import compare_runs, load_runs, print_table, render_histogram, to_markdown, to_parquet
    from pipeline.storage import Storage, write_bytes

    storage = Storage(**overrides_from(kwargs, flags_of(Storage, _prefix=("s3",))).get("s3", {}))
    comparison = compare_runs(load_runs(list(runs), storage), list(labels) or None)
    if markdown:
        click.echo(to_markdown(comparison), nl=False)
    else:
        print_table(comparison)
    if parquet:
        write_bytes(parquet, to_parquet(comparison), storage)
        click.echo(f"wrote {parquet}", err=True)
    if histogram:
        write_bytes(histogram, render_histogram(comparison), storage)
        click.echo(f"wrote {histogram}", err=True)


command(app, "compare", [
    click.Argument(["runs"], nargs=-1, required=True),
    click.Option(["--label", "labels"], multiple=True,
                 help="Label of each run, in the order given (default: the run's own `search --label`, else its id)."),
    click.Option(["--markdown", "markdown"], is_flag=True, default=False, help="Print the table as Markdown."),
    click.Option(["--parquet", "parquet"], default=None, metavar="OUT", help="Also write the table as Parquet."),
    click.Option(["--histogram", "histogram"], default=None, metavar="OUT.png",
                 help="Also draw the runs' top-1 similarity distributions, overlaid, as one PNG."),
    *_storage_params()], _compare,
    "Compare search runs (RUN: a run folder, as `replica runs` lists them), one row per run: top-1 similarity mean, 95th "
    "percentile and max per descriptor, shares >= 0.5 and >= the calibrated threshold with 95% intervals, nL2 tails, "
    "copies found only outside the subset. A column is filled only when every run shares that descriptor.")


# --------------------------------------------------------------------------- demo


def _demo(quiet: bool, **kwargs: Any) -> None:
    from pipeline.demo import DemoConfig, run_demo

    cfg = build(DemoConfig, overrides_from(kwargs, flags_of(DemoConfig)))
    progress = progress_for(quiet)
    out = run_demo(cfg, progress)
    scores = out["scores"]
    print_summary(out["summary"])
    click.echo("recall@1 of planted copies, per edit:")
    for edit, r in scores["recall_at_1"].items():
        click.echo(f"  {edit:22s} {r:6.1%}  ({scores['copies'][edit]} copies)")
    click.echo(f"subset attribution correct: {scores['subset_attribution_correct']:.1%}")
    click.echo(f"false positives at the calibrated threshold ({scores['calibrated_threshold']:.3f}): "
               f"{scores['false_positives_at_calibrated']} of {scores['novel_queries']} novel images")
    click.echo(f"report: {scores['report']}")


def _demo_params() -> list[click.Parameter]:
    from pipeline.demo import DemoConfig

    return [*(click_option(f) for f in flags_of(DemoConfig)), quiet_option()]


command(app, "demo", _demo_params(), _demo,
        "The main job on embedded defaults: build a corpus, plant copies, embed, index, search, report.")


# --------------------------------------------------------------------------- pipeline

PIPELINE = SectionCommand("pipeline")


def _pipeline(config: str, quiet: bool, **kwargs: Any) -> None:
    from pipeline.chain import Chain, plan_chain, run_chain
    from pipeline.config import load_file
    from pipeline.errors import ConfigError
    from pipeline.layout.runs import PIPELINE_RECORD

    present = set(load_file(config))
    missing = [name for name in ("index", "search") if name not in present]
    if missing:
        raise ConfigError(f"{config} has no {' or '.join(missing)} section: replica pipeline needs index and search "
                          "(and optionally ingest, embed, import, pipeline)")
    built = {name: spec.config({}, config) for name, spec in
             (("ingest", INGEST), ("embed", EMBED), ("import", IMPORT)) if name in present}
    chain = Chain(pipeline=PIPELINE.config(kwargs, config), index=INDEX_BUILD.config({}, config),
                  search=SEARCH.config({}, config), ingest=built.get("ingest"), imports=built.get("import"),
                  embed=built.get("embed"))
    plan = plan_chain(chain)

    def show(stage: str, result: Any) -> None:
        if result is None:
            return
        if stage == "ingest":
            print_ingest_summary(result)
        elif stage == "embed":
            print_embed_summary(result)
        elif stage == "import":
            print_import_summary(result)
        elif stage == "index":
            m = result.manifest
            click.echo(f"index: {m.ntotal:,} vectors in {len(m.shards)} index shard(s) ({m.factory})")
        elif stage == "search":
            print_summary(result.summary)

    record = run_chain(plan, progress_for(quiet), show)
    click.echo(f"run {record.run_id} {record.status} in {record.seconds:.1f}s; record: "
               f"{plan.run.file_url(PIPELINE_RECORD)}")
    click.echo(f"results: {plan.run.url}")


command(app, "pipeline", [
    click.Option(["--config", "-c", "config"], required=True, metavar="FILE",
                 help="YAML/TOML with the sections index and search, and optionally ingest, embed, import and "
                      "pipeline (docs/CONFIG.md)."),
    *PIPELINE.params(quiet_option(), config=False)], _pipeline,
    "The whole chain for scheduled runs: ingest, embed, import, extend the index, search the new query images, "
    "report; each run records itself in its own folder of search.output (list them with `replica runs`).",
    renamed=RENAMED_COMMON)


def _runs(config: str | None, results: str | None, as_json: bool, **kwargs: Any) -> None:
    from pipeline.chain import list_runs
    from pipeline.errors import ConfigError
    from pipeline.layout.runs import ResultsFolder
    from pipeline.storage import Storage

    s3 = overrides_from(kwargs, flags_of(Storage, _prefix=("s3",))).get("s3", {})
    search = SEARCH.config({}, config) if config else None
    url = results or (search.output if search else "")
    if not url:
        raise ConfigError("no results folder: pass --results (search.output) or --config with a search section")
    storage = Storage(**{**(search.s3.to_dict() if search else {}), **s3})
    rows = list_runs(ResultsFolder(url, storage))
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        click.echo(f"no runs under {url}")
        return
    cols = [("run_id", "run"), ("kind", "kind"), ("status", "status"), ("started_at", "started"),
            ("seconds", "seconds"), ("version", "version"), ("image", "image"), ("new_tars", "new tars"),
            ("added_vectors", "added vectors"), ("index_vectors", "indexed"), ("queries", "queries"),
            ("replication_rate", "replication")]

    def cell(row: dict[str, Any], key: str) -> str:
        v = row.get(key)
        if v is None:
            return "-"
        if key == "replication_rate":
            return f"{100 * v:.2f}%"
        if key == "seconds":
            return f"{v:.0f}"
        return f"{v:,}" if isinstance(v, int) else str(v)

    table = [[title for _, title in cols]] + [[cell(r, k) for k, _ in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    for line in table:
        click.echo("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())
    for r in rows:
        if r.get("error"):
            click.echo(f"{r['run_id']}: {r['error']}", err=True)


command(app, "runs", [
    CONFIG_OPTION,
    click.Option(["--results", "results"], default=None,
                 help="Results folder (search.output; else taken from --config's search section)."),
    click.Option(["--json", "as_json"], is_flag=True, default=False, help="One JSON object per run instead of a table."),
    *_storage_params()], _runs,
    "List the runs of a results folder (by run id; default ids are UTC start times): status, version, image, what each added and searched, and "
    "the replication rate (read from each run's own folder).")


# --------------------------------------------------------------------------- index


@app.group("index", context_settings={"max_content_width": 110})
def index_group() -> None:
    """Build and query the sharded IVF-PQ index."""


COMMON_INDEX = ["embeddings", "index", "s3", "ray"]
INDEX_TRAIN = SectionCommand("index", [*COMMON_INDEX, "factory", "memory_budget_gb", "metric", "nlist", "max_nlist",
                                       "train_size", "train_cap", "train_max_shards", "seed", "train_device", "threads"])
INDEX_ADD = SectionCommand("index", [*COMMON_INDEX, "group_size", "cpus_per_task", "max_tasks_in_flight",
                                     "write_vectors"])
INDEX_MERGE = SectionCommand("index", [*COMMON_INDEX, "shard_memory_gb", "merge_fanin", "threads"])
INDEX_TUNE = SectionCommand("index", [*COMMON_INDEX, "tune_queries", "target_recall", "retune_growth", "seed",
                                      "threads"])
INDEX_BUILD = SectionCommand("index")
FORCE_OPTION = click.Option(["--force", "force"], is_flag=True, default=False,
                            help="Tune even when the recorded tuning is current.")


def _index_step(step: str, spec: SectionCommand) -> Callable[..., None]:
    def run(config: str | None, local: bool, quiet: bool, force: bool = False, **kwargs: Any) -> None:
        cfg = spec.config(kwargs, config)
        progress = progress_for(quiet)
        if step == "train":
            from pipeline.index.train import run_train

            info = run_train(cfg, progress)
            click.echo(f"trained {info.factory} on {info.train_size:,} vectors ({info.device}), sha256 {info.sha256[:12]}")
        elif step == "add":
            from pipeline.index.add import run_add

            ledger = run_add(cfg, progress, use_ray=not local)
            click.echo(f"ledger: {len(ledger.parts)} parts, {sum(p.ntotal for p in ledger.parts):,} vectors")
        elif step == "merge":
            from pipeline.index.merge import run_merge

            m = run_merge(cfg, progress, use_ray=not local)
            click.echo(f"manifest: {len(m.shards)} index shard(s), {m.ntotal:,} vectors")
        elif step == "tune":
            from pipeline.index.tune import run_tune

            t = run_tune(cfg, progress, use_ray=not local, force=force)
            if t is not None:
                click.echo(json.dumps(t.summary()))
        else:
            from pipeline.index.build import run_build

            built = run_build(cfg, progress, use_ray=not local)
            m = built.manifest
            click.echo(json.dumps({"factory": m.factory, "dim": m.dim, "ntotal": m.ntotal, "timings": built.timings}))
    return run


for _step, _spec, _help in (
    ("train", INDEX_TRAIN, "Register complete shards and train the index on a uniform sample (once)."),
    ("add", INDEX_ADD, "Add every registered shard that no recorded part holds (resumable)."),
    ("merge", INDEX_MERGE, "Merge new parts into new index shards (on-disk inverted lists) and write the manifest."),
    ("tune", INDEX_TUNE, "Measure recall@10 against cost for a grid of nprobe and rerank depths on sampled corpus "
                         "vectors; record the cheapest settings reaching target_recall (search uses them)."),
    ("build", INDEX_BUILD, "train + add + merge + tune (each step skips what is already done)."),
):
    extra = (FORCE_OPTION,) if _step == "tune" else ()
    command(index_group, _step, _spec.params(LOCAL_OPTION, quiet_option(), *extra), _index_step(_step, _spec), _help,
            renamed=RENAMED_COMMON)


def _index_search(index: str, queries: str, k: int, nprobe: int, rerank: int, local: bool, **kwargs: Any) -> None:
    import io
    import sys

    import numpy as np

    from pipeline.index.registry import Registry
    from pipeline.index.rerank import exact_rerank, source_for
    from pipeline.index.serve import IndexSearcher
    from pipeline.layout.index import IndexFolder
    from pipeline.storage import Storage, read_bytes

    storage = Storage(**overrides_from(kwargs, flags_of(Storage, _prefix=("s3",))).get("s3", {}))
    q = np.load(io.BytesIO(read_bytes(queries, storage))).astype(np.float32)
    folder = IndexFolder(index, storage)
    with IndexSearcher(folder, nprobe=nprobe, use_ray=not local) as s:
        d, i = s.search(q, max(k, rerank), nprobe)
        if rerank:
            d, i = exact_rerank(q, i, source_for(folder, s.manifest), k, s.metric)
    reg = Registry.load(folder)
    for qi in range(len(q)):
        for score, vid in zip(d[qi], i[qi]):
            if vid >= 0:
                shard, row = reg.shard_rows([vid])[0]
                sys.stdout.write(json.dumps({"query": qi, "score": float(score), "id": int(vid), "shard": shard,
                                             "row": row}) + "\n")


command(index_group, "search", [
    click.Option(["--index", "index"], required=True, help="Built index folder (holds manifest.json)."),
    click.Option(["--queries", "queries"], required=True, help=".npy file of (n, dim) float query vectors."),
    click.Option(["--k", "k"], type=int, default=10, show_default=True, help="Results per query."),
    click.Option(["--nprobe", "nprobe"], type=int, default=0, show_default=True,
                 help="IVF lists probed; 0 = what the index's tuning measured, else 64."),
    click.Option(["--rerank", "rerank"], type=int, default=0, show_default=True,
                 help="Fetch this many candidates and rescore them exactly on their stored vectors (0 = off)."),
    LOCAL_OPTION, *_storage_params()], _index_search,
    "Search a built index with vectors from a .npy file; prints JSON lines (query, score, id, shard, row).",
    renamed=RENAMED_COMMON)


# --------------------------------------------------------------------------- import-embeddings

IMPORT = SectionCommand("import")


def _import(config: str | None, quiet: bool, **kwargs: Any) -> None:
    from pipeline.import_embeddings import raise_for_failures, run_import

    cfg = IMPORT.config(kwargs, config)
    s = run_import(cfg, progress_for(quiet))
    print_import_summary(s)
    raise_for_failures(s, cfg.max_failed_fraction)


def print_import_summary(s: dict[str, Any]) -> None:
    click.echo(f"imported {s['rows_written']:,} rows into {s['written']} shard(s) ({s['shards'] - s['written']} "
               f"already complete) in {s['seconds']} s; {s['rows_failed']} unusable (non-finite) vectors")


command(app, "import-embeddings", IMPORT.params(quiet_option()), _import,
        "Convert precomputed embeddings (clip-retrieval / LAION release layout) into embedding Parquet shards.",
        renamed=RENAMED_COMMON)


# --------------------------------------------------------------------------- captions

CAPTIONS = SectionCommand("captions")


def _captions(config: str | None, quiet: bool, **kwargs: Any) -> None:
    from pipeline.captions import run_captions

    cfg = CAPTIONS.config(kwargs, config)
    info = run_captions(cfg, progress_for(quiet))
    click.echo(f"counted {info.rows_with_caption:,} captions of {info.rows:,} rows in {info.shards} shard(s): "
               f"{info.distinct_captions:,} distinct, {info.distinct_normalized:,} after normalisation, in "
               f"{info.seconds:.1f}s ({info.timings.get('rows_per_s', 0):,.0f} rows/s); counts: {cfg.output}")


command(app, "captions", CAPTIONS.params(quiet_option()), _captions,
        "Count how many training images carry each caption, exactly and after normalisation (NFKC, casefold, "
        "URLs stripped, whitespace collapsed): Ray tasks over the embedding Parquet, written once as Parquet that "
        "search joins to its matches by hash. Resumable: a rerun counts only new shards.")


# --------------------------------------------------------------------------- config

#: Which commands read which section (their flags are listed under it in docs/CONFIG.md).
SECTION_COMMANDS = {
    "ingest": [("replica ingest", INGEST)],
    "embed": [("replica embed", EMBED)],
    "index": [("replica index train", INDEX_TRAIN), ("replica index add", INDEX_ADD),
              ("replica index merge", INDEX_MERGE), ("replica index tune", INDEX_TUNE),
              ("replica index build", INDEX_BUILD)],
    "import": [("replica import-embeddings", IMPORT)],
    "captions": [("replica captions", CAPTIONS)],
    "search": [("replica search", SEARCH)],
    "report": [("replica report", REPORT)],
    "pipeline": [("replica pipeline", PIPELINE)],
}


def reference_markdown() -> str:
    """docs/CONFIG.md: each section's template and the flag of every field."""
    from pipeline.config import COMMANDS, section_template

    out = [
        "# Configuration reference", "",
        "A config file (YAML or TOML) has one section per command: `ingest`, `embed`, `index`, `import`,",
        "`captions`, `search`, `report`, `pipeline`. Every command takes `--config FILE` and reads its own section; `replica pipeline`",
        "runs the sections the file has, in the order ingest, embed, import, index, search (index and search",
        "required), with its own settings in `pipeline`. Flags win over the file.", "",
        "Flags follow one rule: field `f` of a section is `--f`; field `f` of a nested section `s` is `--s-f`,",
        "and `s.name` is `--s` (`embedder.model` is `--embedder-model`, `s3.endpoint_url` is `--s3-endpoint-url`,",
        "`ray.address` is `--ray-address`). Last release's names (`--address`, `--model`, `--endpoint-url`,",
        "`storage:`, `ray_address:`, flat files...) still work, with a warning, until the next release.", "",
        "Credentials are never config fields: S3 access comes from `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`,",
        "a profile or the instance role. `replica config [SECTION]` prints these templates; this page is",
        "`replica config --markdown`.", "",
    ]
    for name in SECTIONS:
        out += [f"## `{name}` ({COMMANDS[name]})", "", "```yaml", *section_template(name), "```", ""]
        for cmd_name, spec in SECTION_COMMANDS[name]:
            out += [f"`{cmd_name}` flags:", "", "| flag | field |", "| --- | --- |"]
            out += [f"| `{f.flag}` | `{name}.{f.field}` |" for f in spec.flags]
            out.append("")
    return "\n".join(out)


def _config(section: str | None, markdown: bool) -> None:
    from pipeline.config import section_template
    from pipeline.errors import ConfigError

    if markdown:
        click.echo(reference_markdown())
        return
    if section is not None and section not in SECTIONS:
        raise ConfigError(f"unknown section {section!r}; choose one of: {', '.join(SECTIONS)}")
    for name in [section] if section else ["ingest", "embed", "index", "search", "pipeline"]:
        click.echo("\n".join(section_template(name)))


command(app, "config", [
    click.Argument(["section"], required=False),
    click.Option(["--markdown", "markdown"], is_flag=True, default=False,
                 help="The whole reference as Markdown (docs/CONFIG.md).")], _config,
    "Print a commented config template (SECTION: ingest, embed, index, import, captions, search, report, pipeline; "
    "default: "
    "the sections of a `replica pipeline` run from URL lists).")
