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


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
