"""`replica index train|add|merge|build|search` and `replica import-embeddings`.

Flags override the config file (same field names as pipeline.config.IndexConfig /
ImportConfig). faiss and Ray are imported inside the commands.
"""
from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import typer

from pipeline.errors import ReplicaError

index_app = typer.Typer(help="Build and query the sharded IVF-PQ index.", no_args_is_help=True)


@contextmanager
def _progress() -> Iterator[Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), transient=False,
    ) as bar:
        tasks: dict[str, Any] = {}

        def update(step: str, done: int, total: int) -> None:
            if step not in tasks:
                tasks[step] = bar.add_task(step, total=total)
            bar.update(tasks[step], completed=done, total=total)

        yield bar, update


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", fg="red", err=True)
    raise typer.Exit(2)


def _index_config(config: Optional[str], flags: dict[str, Any]):
    from pipeline.config import IndexConfig, build, load_file, merge

    data = load_file(config)
    data = data.get("index", data) if isinstance(data.get("index"), dict) else data
    storage = {"endpoint_url": flags.pop("endpoint_url", None)}
    return build(IndexConfig, merge(data, {**flags, "storage": storage}), "index")


def _run(step: str, config: Optional[str], flags: dict[str, Any], local: bool) -> None:
    try:
        cfg = _index_config(config, flags)
        with _progress() as (bar, update):
            log = bar.console.print
            if step == "train":
                from pipeline.index.train import run_train

                info = run_train(cfg, log=log, on_progress=update)
                log(f"trained {info['factory']} on {info['train_size']:,} vectors ({info['device']}), "
                    f"sha256 {info['sha256'][:12]}")
            elif step == "add":
                from pipeline.index.add import run_add

                run_add(cfg, use_ray=not local, log=log, on_progress=update)
            elif step == "merge":
                from pipeline.index.merge import run_merge

                run_merge(cfg, use_ray=not local, log=log, on_progress=update)
            else:
                from pipeline.index.build import run_build

                m = run_build(cfg, use_ray=not local, log=log, on_progress=update)
                log(json.dumps({k: m[k] for k in ("factory", "dim", "ntotal", "timings")}))
    except ReplicaError as exc:
        _fail(exc)


CONFIG = typer.Option(None, "--config", "-c", help="YAML/TOML config (an `index:` section or top-level keys)")
EMB = typer.Option(None, "--embeddings", help="embedding folder (local or s3://)")
IDX = typer.Option(None, "--index", help="index folder (local or s3://)")
LOCAL = typer.Option(False, "--local", help="run tasks in this process instead of Ray")
ENDPOINT = typer.Option(None, "--endpoint-url", help="S3-compatible endpoint")


@index_app.command("train")
def train_cmd(
    config: Optional[str] = CONFIG, embeddings: Optional[str] = EMB, index: Optional[str] = IDX,
    factory: Optional[str] = typer.Option(None, help="faiss factory; empty = chosen from memory budget and corpus size"),
    memory_budget_gb: Optional[float] = typer.Option(None, help="RAM for all inverted lists (chooses the factory)"),
    nlist: Optional[int] = typer.Option(None), max_nlist: Optional[int] = typer.Option(None),
    train_size: Optional[int] = typer.Option(None), train_device: Optional[str] = typer.Option(None),
    metric: Optional[str] = typer.Option(None), threads: Optional[int] = typer.Option(None),
    seed: Optional[int] = typer.Option(None), endpoint_url: Optional[str] = ENDPOINT,
    ray_address: Optional[str] = typer.Option(None),
) -> None:
    """Register complete shards and train the index on a uniform sample (once)."""
    _run("train", config, dict(embeddings=embeddings, index=index, factory=factory, memory_budget_gb=memory_budget_gb,
                               nlist=nlist, max_nlist=max_nlist, train_size=train_size, train_device=train_device,
                               metric=metric, threads=threads, seed=seed, endpoint_url=endpoint_url,
                               ray_address=ray_address), True)


@index_app.command("add")
def add_cmd(
    config: Optional[str] = CONFIG, embeddings: Optional[str] = EMB, index: Optional[str] = IDX,
    group_size: Optional[int] = typer.Option(None, help="embedding shards per index part"),
    cpus_per_task: Optional[float] = typer.Option(None), max_tasks_in_flight: Optional[int] = typer.Option(None),
    write_vectors: Optional[bool] = typer.Option(None, "--write-vectors/--no-write-vectors",
                                                 help="write fp16 side files for exact rerank"),
    ray_address: Optional[str] = typer.Option(None), endpoint_url: Optional[str] = ENDPOINT, local: bool = LOCAL,
) -> None:
    """Add every registered shard that no recorded part holds (resumable)."""
    _run("add", config, dict(embeddings=embeddings, index=index, group_size=group_size, cpus_per_task=cpus_per_task,
                             max_tasks_in_flight=max_tasks_in_flight, write_vectors=write_vectors,
                             ray_address=ray_address, endpoint_url=endpoint_url), local)


@index_app.command("merge")
def merge_cmd(
    config: Optional[str] = CONFIG, embeddings: Optional[str] = EMB, index: Optional[str] = IDX,
    shard_memory_gb: Optional[float] = typer.Option(None, help="RAM of one serving actor's index shard"),
    merge_fanin: Optional[int] = typer.Option(None), threads: Optional[int] = typer.Option(None),
    ray_address: Optional[str] = typer.Option(None), endpoint_url: Optional[str] = ENDPOINT, local: bool = LOCAL,
) -> None:
    """Merge new parts into new index shards (on-disk inverted lists) and write the manifest."""
    _run("merge", config, dict(embeddings=embeddings, index=index, shard_memory_gb=shard_memory_gb,
                               merge_fanin=merge_fanin, threads=threads, ray_address=ray_address,
                               endpoint_url=endpoint_url), local)


@index_app.command("build")
def build_cmd(
    config: Optional[str] = CONFIG, embeddings: Optional[str] = EMB, index: Optional[str] = IDX,
    factory: Optional[str] = typer.Option(None), memory_budget_gb: Optional[float] = typer.Option(None),
    nlist: Optional[int] = typer.Option(None), max_nlist: Optional[int] = typer.Option(None),
    train_size: Optional[int] = typer.Option(None), group_size: Optional[int] = typer.Option(None),
    shard_memory_gb: Optional[float] = typer.Option(None), merge_fanin: Optional[int] = typer.Option(None),
    write_vectors: Optional[bool] = typer.Option(None, "--write-vectors/--no-write-vectors"),
    threads: Optional[int] = typer.Option(None), ray_address: Optional[str] = typer.Option(None),
    endpoint_url: Optional[str] = ENDPOINT, local: bool = LOCAL,
) -> None:
    """train + add + merge (each step skips what is already done)."""
    _run("build", config, dict(embeddings=embeddings, index=index, factory=factory, memory_budget_gb=memory_budget_gb,
                               nlist=nlist, max_nlist=max_nlist, train_size=train_size, group_size=group_size,
                               shard_memory_gb=shard_memory_gb, merge_fanin=merge_fanin, write_vectors=write_vectors,
                               threads=threads, ray_address=ray_address, endpoint_url=endpoint_url), local)


@index_app.command("search")
def search_cmd(
    index: str = typer.Option(..., "--index"),
    queries: str = typer.Option(..., help=".npy file of (n, dim) float queries"),
    k: int = typer.Option(10), nprobe: int = typer.Option(64),
    rerank: int = typer.Option(0, help="fetch this many candidates and rescore them exactly (0 = off)"),
    endpoint_url: Optional[str] = ENDPOINT, local: bool = LOCAL,
) -> None:
    """Search a built index with vectors from a .npy file; prints JSON lines (score, id, shard, row)."""
    import numpy as np

    from pipeline.io import Storage, read_bytes
    from pipeline.index.registry import Registry
    from pipeline.index.rerank import exact_rerank, source_for
    from pipeline.index.serve import IndexSearcher

    try:
        storage = Storage(endpoint_url=endpoint_url)
        import io as _io

        q = np.load(_io.BytesIO(read_bytes(queries, storage))).astype(np.float32)
        with IndexSearcher(index, storage, nprobe=nprobe, use_ray=not local) as s:
            d, i = s.search(q, max(k, rerank), nprobe)
            if rerank:
                d, i = exact_rerank(q, i, source_for(index, s.manifest, storage), k, s.metric)
        reg = Registry.load(index, storage)
        for qi in range(len(q)):
            for score, vid in zip(d[qi], i[qi]):
                if vid < 0:
                    continue
                shard, row = reg.shard_rows([vid])[0]
                sys.stdout.write(json.dumps({"query": qi, "score": float(score), "id": int(vid), "shard": shard, "row": row}) + "\n")
    except ReplicaError as exc:
        _fail(exc)


def import_embeddings_command(
    input: str = typer.Option(..., "--input", help="release folder with img_emb/ and metadata/"),
    output: str = typer.Option(..., "--output", help="embedding folder to write"),
    embedder: str = typer.Option(..., help="embedder name of the released vectors, e.g. open_clip"),
    model: str = typer.Option(..., help="model, e.g. ViT-L-14"),
    weights: str = typer.Option("", help="weights tag or file, e.g. openai"),
    preprocess: str = typer.Option("", help="preprocessing the release used, e.g. resize224-centercrop"),
    dim: int = typer.Option(0, help="expected dim (0 = from the files)"),
    rows_per_shard: int = typer.Option(100_000), row_group_size: int = typer.Option(1024),
    prefix: str = typer.Option("emb-"), key_column: str = typer.Option("key"),
    url_column: str = typer.Option("url"), caption_column: str = typer.Option("caption"),
    endpoint_url: Optional[str] = ENDPOINT,
) -> None:
    """Convert precomputed embeddings (clip-retrieval / LAION release layout) into embedding Parquet shards."""
    from pipeline.config import ImportConfig
    from pipeline.import_embeddings import run_import
    from pipeline.io import Storage

    try:
        cfg = ImportConfig(input=input, output=output, storage=Storage(endpoint_url=endpoint_url), embedder=embedder,
                           model=model, weights=weights, preprocess=preprocess, dim=dim, rows_per_shard=rows_per_shard,
                           row_group_size=row_group_size, prefix=prefix, key_column=key_column,
                           url_column=url_column, caption_column=caption_column)
        with _progress() as (bar, update):
            run_import(cfg, log=bar.console.print, on_progress=update)
    except ReplicaError as exc:
        _fail(exc)
