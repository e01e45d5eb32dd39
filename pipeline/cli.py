"""The ``replica`` command line. Heavy imports stay inside commands so ``--help`` is instant."""
from __future__ import annotations

import functools
import sys
from typing import Annotated, Optional

import typer

app = typer.Typer(
    help="replica: find where generated images replicate their training data, across the whole corpus.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Options shared by every command that touches storage or Ray.
ConfigFile = Annotated[Optional[str], typer.Option("--config", "-c", help="YAML or TOML file with the same fields as the flags; flags win.")]
S3Endpoint = Annotated[Optional[str], typer.Option("--s3-endpoint-url", help="S3-compatible endpoint (else AWS_ENDPOINT_URL).")]
S3Region = Annotated[Optional[str], typer.Option("--s3-region", help="S3 region (else AWS_REGION).")]
RayAddress = Annotated[Optional[str], typer.Option("--address", help="Ray cluster address (else RAY_ADDRESS, else a local Ray).")]


def user_errors(fn):
    """Print ReplicaError messages on one line and exit 2, instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from pipeline.errors import ReplicaError

        try:
            return fn(*args, **kwargs)
        except ReplicaError as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None

    return wrapper


def storage_overrides(endpoint: str | None, region: str | None) -> dict:
    return {"endpoint_url": endpoint, "region": region}


@app.command()
@user_errors
def embed(
    input: Annotated[Optional[list[str]], typer.Option("--input", "-i", help="Tar URL, glob or brace list (repeatable), local or s3://.")] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Folder URL for embeddings/{shard}.parquet.")] = None,
    embedder: Annotated[Optional[str], typer.Option(help="default | open_clip | sscd")] = None,
    model: Annotated[Optional[str], typer.Option(help="open_clip architecture, e.g. ViT-B-32.")] = None,
    pretrained: Annotated[Optional[str], typer.Option(help="open_clip pretrained tag (needs network on the cluster).")] = None,
    checkpoint: Annotated[Optional[str], typer.Option(help="Weights file/URL: open_clip checkpoint or SSCD TorchScript.")] = None,
    model_config: Annotated[Optional[str], typer.Option(help="JSON config of a custom open_clip architecture.")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Resize short side to this, centre-crop a square.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per model call.")] = None,
    row_group_size: Annotated[Optional[int], typer.Option(help="Rows per Parquet row group.")] = None,
    num_actors: Annotated[Optional[int], typer.Option(help="Embedding actors (0 = one per GPU, or 1).")] = None,
    gpus_per_actor: Annotated[Optional[float], typer.Option(help="GPUs per actor (-1 = 1 if the cluster has GPUs).")] = None,
    cpus_per_actor: Annotated[Optional[float], typer.Option(help="CPUs reserved per embedding actor.")] = None,
    max_tars_in_flight: Annotated[Optional[int], typer.Option(help="Tars processed at once (0 = cluster CPUs).")] = None,
    address: RayAddress = None,
    s3_endpoint_url: S3Endpoint = None,
    s3_region: S3Region = None,
    config: ConfigFile = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
):
    """Embed WebDataset tars into one Parquet file per tar (resumable: complete shards are skipped)."""
    from pipeline.config import EmbedConfig, build, load_file, merge
    from pipeline.embed import run_embed

    flags = {
        "input": input or None,
        "output": output,
        "batch_size": batch_size,
        "row_group_size": row_group_size,
        "embedder": {"name": embedder, "model": model, "pretrained": pretrained, "checkpoint": checkpoint,
                     "model_config": model_config, "image_size": image_size, "device": device},
        "ray": {"address": address, "num_actors": num_actors, "gpus_per_actor": gpus_per_actor,
                "cpus_per_actor": cpus_per_actor, "max_tars_in_flight": max_tars_in_flight},
        "storage": storage_overrides(s3_endpoint_url, s3_region),
    }
    cfg = build(EmbedConfig, merge(load_file(config), flags))
    s = run_embed(cfg, progress=not quiet)
    failed = ", ".join(f"{k}={v}" for k, v in sorted(s.failed.items())) or "none"
    typer.echo(
        f"embedded {s.embedded}/{s.images} images from {s.shards_done} shards "
        f"({s.shards_skipped} already complete) in {s.seconds:.1f}s, {s.images_per_s:.0f} img/s; failed: {failed}"
    )
    for shard, err in sorted(s.shard_errors.items()):
        typer.echo(f"shard {shard}: {err}", err=True)


@app.command()
@user_errors
def sample(
    output: Annotated[str, typer.Option("--output", "-o", help="Folder URL for the tars.")],
    tars: Annotated[int, typer.Option(help="Number of tars.")] = 4,
    per_tar: Annotated[int, typer.Option(help="Images per tar.")] = 100,
    seed: Annotated[int, typer.Option(help="Seed of the procedural images.")] = 0,
    s3_endpoint_url: S3Endpoint = None,
    s3_region: S3Region = None,
):
    """Write small LAION-like WebDataset tars of procedural images (no download needed)."""
    from pipeline.io import Storage
    from pipeline.sample import make_sample_tars

    urls = make_sample_tars(output, tars, per_tar, seed, Storage(s3_endpoint_url, s3_region))
    typer.echo(f"wrote {len(urls)} tars of {per_tar} images under {output}")

from pipeline.report import report_command
app.command("report")(report_command)


@app.command()
@user_errors
def search(
    queries: Annotated[Optional[str], typer.Option("--queries", "-q", help="Generated images: folder, tar URL/glob, or Parquet.")] = None,
    index: Annotated[Optional[str], typer.Option(help="Built index folder (holds manifest.json).")] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Results root; the run lands in {output}/run_id={run}/.")] = None,
    run_id: Annotated[Optional[str], typer.Option(help="Run name (default: UTC timestamp).")] = None,
    top_k: Annotated[Optional[int], typer.Option(help="Matches kept per query.")] = None,
    candidates: Annotated[Optional[int], typer.Option(help="ANN candidates per query region before exact rerank.")] = None,
    nprobe: Annotated[Optional[int], typer.Option(help="IVF lists probed (0 = the index default).")] = None,
    regions: Annotated[Optional[bool], typer.Option("--regions/--no-regions", help="Also search regions of each query.")] = None,
    rerank: Annotated[Optional[str], typer.Option(help="Second-stage descriptor on candidate pixels: sscd | open_clip | default.")] = None,
    rerank_checkpoint: Annotated[Optional[str], typer.Option(help="Weights of the rerank descriptor.")] = None,
    rerank_top: Annotated[Optional[int], typer.Option(help="Candidates per query given to the second stage.")] = None,
    verify_top: Annotated[Optional[int], typer.Option(help="Verify the best N candidates with local features (0 = off).")] = None,
    blocklist: Annotated[Optional[list[str]], typer.Option(help="File of keys/URLs/sha256 never fetched or shown (repeatable).")] = None,
    subset: Annotated[Optional[str], typer.Option(help="Parquet/CSV/TXT of keys or URLs forming the subset (e.g. the 12M).")] = None,
    fpr: Annotated[Optional[float], typer.Option(help="False-positive rate for the calibrated threshold.")] = None,
    baseline_size: Annotated[Optional[int], typer.Option(help="Corpus images sampled for the self-similarity baseline.")] = None,
    address: RayAddress = None,
    s3_endpoint_url: S3Endpoint = None,
    s3_region: S3Region = None,
    config: ConfigFile = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress output.")] = False,
):
    """Search generated images against the corpus index and write matches, summary and report."""
    from pipeline.config import SearchConfig, build, load_file, merge
    from pipeline.search import run_dir, run_search

    flags = {
        "queries": queries, "index": index, "output": output, "run_id": run_id, "top_k": top_k,
        "candidates": candidates, "nprobe": nprobe, "regions": regions, "rerank_top": rerank_top,
        "verify_top": verify_top, "blocklist": blocklist or None, "subset": subset, "fpr": fpr,
        "baseline_size": baseline_size, "ray_address": address,
        "rerank": {"name": rerank, "checkpoint": rerank_checkpoint},
        "storage": storage_overrides(s3_endpoint_url, s3_region),
    }
    cfg = build(SearchConfig, merge(load_file(config), flags))
    summary = run_search(cfg, progress=not quiet)
    print_summary(summary)
    typer.echo(f"results: {run_dir(cfg)}  (report.html, summary.json, matches.parquet, queries.parquet)")


def print_summary(summary: dict) -> None:
    from pipeline.report import summary_lines

    for line in summary_lines(summary):
        typer.echo(line)


@app.command()
@user_errors
def demo(
    workdir: Annotated[str, typer.Option(help="Where the demo corpus, index and results go.")] = "demo-output",
    corpus_size: Annotated[int, typer.Option(help="Corpus images.")] = 2000,
    copies_per_edit: Annotated[int, typer.Option(help="Planted copies per edit type.")] = 8,
    pasted: Annotated[int, typer.Option(help="Planted pasted-object copies.")] = 12,
    novel: Annotated[int, typer.Option(help="Generated images that copy nothing.")] = 24,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress output.")] = False,
):
    """The main job on embedded defaults: build a corpus, plant copies, embed, index, search, report."""
    from pipeline.demo import DemoConfig, run_demo

    out = run_demo(DemoConfig(workdir=workdir, corpus_size=corpus_size, copies_per_edit=copies_per_edit,
                              pasted=pasted, novel=novel), progress=not quiet,
                   log=(lambda *_: None) if quiet else typer.echo)
    scores = out["scores"]
    print_summary(out["summary"])
    typer.echo("recall@1 of planted copies, per edit:")
    for edit, r in scores["recall_at_1"].items():
        typer.echo(f"  {edit:22s} {r:6.1%}  ({scores['copies'][edit]} copies)")
    typer.echo(f"subset attribution correct: {scores['subset_attribution_correct']:.1%}")
    typer.echo(f"false positives at the calibrated threshold ({scores['calibrated_threshold']:.3f}): "
               f"{scores['false_positives_at_calibrated']} of {scores['novel_queries']} novel images")
    typer.echo(f"report: {scores['report']}")


@app.command("pipeline")
@user_errors
def pipeline_command(
    config: Annotated[str, typer.Option("--config", "-c", help="YAML/TOML with sections embed, index, search.")],
    address: RayAddress = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress output.")] = False,
):
    """The whole chain for scheduled runs: embed, build or extend the index, search, report."""
    from pipeline.config import EmbedConfig, IndexConfig, SearchConfig, build, load_file, merge
    from pipeline.embed import run_embed
    from pipeline.errors import ConfigError
    from pipeline.index.build import run_build
    from pipeline.search import run_dir, run_search

    data = load_file(config)
    unknown = sorted(set(data) - {"embed", "index", "search"})
    if unknown:
        raise ConfigError(f"unknown section {unknown[0]!r} in {config}; sections are embed, index, search")
    ray_flags = {"ray": {"address": address}} if address else {}
    embed_cfg = build(EmbedConfig, merge(data.get("embed") or {}, ray_flags), "embed") if "embed" in data else None
    index_cfg = build(IndexConfig, merge(data.get("index") or {}, {"ray_address": address}), "index")
    search_cfg = build(SearchConfig, merge(data.get("search") or {}, {"ray_address": address}), "search")
    log = (lambda *_: None) if quiet else typer.echo
    if embed_cfg is not None:
        s = run_embed(embed_cfg, progress=not quiet)
        log(f"embed: {s.embedded}/{s.images} images in {s.shards_done} new shards ({s.shards_skipped} already complete)")
    run_build(index_cfg, log=log)
    summary = run_search(search_cfg, progress=not quiet)
    print_summary(summary)
    typer.echo(f"results: {run_dir(search_cfg)}")


from pipeline.index.cli import import_embeddings_command, index_app  # noqa: E402
app.add_typer(index_app, name="index")
app.command("import-embeddings")(import_embeddings_command)


@app.command("config")
def config_command(
    section: Annotated[Optional[str], typer.Argument(help="embed | index | import | search (default: all, as for `replica pipeline`)")] = None,
    markdown: Annotated[bool, typer.Option("--markdown", help="The whole reference as Markdown (docs/CONFIG.md).")] = False,
):
    """Print a commented config template with every setting and its default (YAML)."""
    from pipeline.config import SECTIONS, reference_markdown, template

    if markdown:
        typer.echo(reference_markdown())
        return
    if section is not None and section not in SECTIONS:
        typer.secho(f"error: unknown section {section!r}; choose one of: {', '.join(SECTIONS)}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    if section:
        typer.echo("\n".join(template(SECTIONS[section])))
        return
    for name, cls in SECTIONS.items():
        if name == "import":
            continue
        typer.echo(f"{name}:")
        typer.echo("\n".join(template(cls, 2)))


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
