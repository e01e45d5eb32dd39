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


def _pipeline(config: str, ray_address: str | None, quiet: bool) -> None:
    from pipeline.config import load_file
    from pipeline.embed import run_embed
    from pipeline.index.build import run_build
    from pipeline.search import run_search

    sections = set(load_file(config))
    forced = {"ray": {"address": ray_address}} if ray_address else {}
    progress = progress_for(quiet)
    if "embed" in sections:
        embed_cfg = EMBED.config({}, config, forced)
        s = run_embed(embed_cfg, progress)
        print_embed_summary(s)
        s.raise_for_failures(embed_cfg.max_failed_fraction, embed_cfg.max_failed_shards)
    run_build(INDEX_BUILD.config({}, config, forced), progress)
    result = run_search(SEARCH.config({}, config, forced), progress)
    print_summary(result.summary)
    click.echo(f"results: {result.run_url}")


command(app, "pipeline", [
    click.Option(["--config", "-c", "config"], required=True, metavar="FILE",
                 help="YAML/TOML with the sections embed (optional), index and search."),
    click.Option(["--ray-address", "ray_address"], default=None,
                 help="Ray address for every stage (else each section's ray.address, RAY_ADDRESS, or a local Ray)."),
    quiet_option()], _pipeline,
    "The whole chain for scheduled runs: embed, build or extend the index, search, report.",
    renamed=RENAMED_COMMON)


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
INDEX_BUILD = SectionCommand("index")


def _index_step(step: str, spec: SectionCommand) -> Callable[..., None]:
    def run(config: str | None, local: bool, quiet: bool, **kwargs: Any) -> None:
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
    ("build", INDEX_BUILD, "train + add + merge (each step skips what is already done)."),
):
    command(index_group, _step, _spec.params(LOCAL_OPTION, quiet_option()), _index_step(_step, _spec), _help,
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
    click.Option(["--nprobe", "nprobe"], type=int, default=64, show_default=True, help="IVF lists probed."),
    click.Option(["--rerank", "rerank"], type=int, default=0, show_default=True,
                 help="Fetch this many candidates and rescore them exactly on their stored vectors (0 = off)."),
    LOCAL_OPTION, *_storage_params()], _index_search,
    "Search a built index with vectors from a .npy file; prints JSON lines (query, score, id, shard, row).",
    renamed=RENAMED_COMMON)


# --------------------------------------------------------------------------- import-embeddings

IMPORT = SectionCommand("import")


def _import(config: str | None, quiet: bool, **kwargs: Any) -> None:
    from pipeline.import_embeddings import run_import

    from pipeline.errors import TooManyFailures

    cfg = IMPORT.config(kwargs, config)
    s = run_import(cfg, progress_for(quiet))
    click.echo(f"imported {s['rows_written']:,} rows into {s['written']} shard(s) ({s['shards'] - s['written']} "
               f"already complete) in {s['seconds']} s; {s['rows_failed']} unusable (non-finite) vectors")
    if s["rows_written"] and s["rows_failed"] / s["rows_written"] > cfg.max_failed_fraction:
        raise TooManyFailures(f"{s['rows_failed']} of {s['rows_written']} released vectors are unusable, over "
                              f"--max-failed-fraction {cfg.max_failed_fraction}")


command(app, "import-embeddings", IMPORT.params(quiet_option()), _import,
        "Convert precomputed embeddings (clip-retrieval / LAION release layout) into embedding Parquet shards.",
        renamed=RENAMED_COMMON)


# --------------------------------------------------------------------------- config

#: Which commands read which section (their flags are listed under it in docs/CONFIG.md).
SECTION_COMMANDS = {
    "embed": [("replica embed", EMBED)],
    "index": [("replica index train", INDEX_TRAIN), ("replica index add", INDEX_ADD),
              ("replica index merge", INDEX_MERGE), ("replica index build", INDEX_BUILD)],
    "import": [("replica import-embeddings", IMPORT)],
    "search": [("replica search", SEARCH)],
    "report": [("replica report", REPORT)],
}


def reference_markdown() -> str:
    """docs/CONFIG.md: each section's template and the flag of every field."""
    from pipeline.config import COMMANDS, section_template

    out = [
        "# Configuration reference", "",
        "A config file (YAML or TOML) has one section per command: `embed`, `index`, `import`, `search`, `report`.",
        "Every command takes `--config FILE` and reads its own section; `replica pipeline` reads `embed` (optional),",
        "`index` and `search` from the same file. Flags win over the file.", "",
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
    for name in [section] if section else ["embed", "index", "search"]:
        click.echo("\n".join(section_template(name)))


command(app, "config", [
    click.Argument(["section"], required=False),
    click.Option(["--markdown", "markdown"], is_flag=True, default=False,
                 help="The whole reference as Markdown (docs/CONFIG.md).")], _config,
    "Print a commented config template (SECTION: embed, index, import, search, report; default: the sections "
    "`replica pipeline` reads).")
