"""Kill -9 at seeded random moments, in every stage: embedding actors, decode task workers, index
add workers, search verification workers and the driver. Every run, resumed where needed, ends
with every record exactly once, embedding Parquet byte-identical to an undisturbed run, the same
ids in the same lists with the same codes, and identical search results. (bench/soak.py runs
many more trials.)"""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import EmbedConfig, IndexConfig, SearchConfig
from pipeline.embed import run_embed
from pipeline.index.add import run_add
from pipeline.index.merge import run_merge
from pipeline.index.train import run_train
from pipeline.layout.index import IndexFolder
from pipeline.search import run_search
from pipeline.testing.faults import Killer, index_entries

RNG = random.Random(20261201)
REPLICA = [sys.executable, "-m", "pipeline.cli"]


def parquet_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.parquet"))}


@pytest.fixture(scope="module")
def baseline(ray_local, tmp_path_factory):
    """The undisturbed runs every trial is compared with."""
    from pipeline.layout.embeddings import EmbeddingsFolder
    from pipeline.sample import make_sample_tars
    from pipeline.synthetic_images import apply_edit
    from pipeline.testing.vectors import MixtureSource, write_folder
    from pipeline.verify import load_candidate

    root = tmp_path_factory.mktemp("faults")
    make_sample_tars(str(root / "tars"), tars=8, per_tar=80, seed=11)
    embed = EmbedConfig(input=[str(root / "tars" / "*.tar")], output=str(root / "emb"), batch_size=8,
                        max_tars_in_flight=2)
    run_embed(embed)
    # an index over vectors large enough that each add task runs long enough to be caught
    list(write_folder(EmbeddingsFolder(str(root / "vectors")), MixtureSource(64, latent=8, clusters=64), 6, 40_000))
    index = IndexConfig(embeddings=str(root / "vectors"), index=str(root / "index"), factory="IVF32,PQ16x4",
                        group_size=1, shard_memory_gb=0.004)
    run_train(index)
    trained = root / "trained-only"
    shutil.copytree(root / "index", trained)  # what every add trial starts from
    run_add(index)
    run_merge(index)
    images = IndexConfig(embeddings=str(root / "emb"), index=str(root / "image-index"), factory="IVF8,PQ16x4")
    run_train(images)
    run_add(images)
    run_merge(images)
    gen = root / "generated"
    gen.mkdir()
    rows = pq.read_table(root / "emb" / "00002.parquet").to_pylist()[:4]
    for j, r in enumerate(rows):
        apply_edit("crop", load_candidate(r["tar_url"], r["tar_offset"], r["tar_size"]), j).save(gen / f"q{j}.png")
    search = SearchConfig(queries=str(gen), index=images.index, output=str(root / "results"), run_id="base",
                          verify_top=5, baseline_size=30, regions=False)
    run = Path(run_search(search).run_url)
    return {"root": root, "embed": embed, "index": index, "trained": trained, "search": search, "run": run,
            "parquet": parquet_bytes(root / "emb"), "lists": index_entries(IndexFolder(index.index))}


@pytest.mark.parametrize("trial", range(8))
def test_embed_survives_a_killed_actor_or_decode_worker(baseline, trial, tmp_path):
    title = ["EmbedActor", "embed_shard"][trial % 2]
    at_shard = RNG.randint(1, 4)  # the kill lands while later tars are in flight
    killer, done = Killer([title], 0.0, RNG), []

    def on_shard(stats) -> None:  # the killer looks while the run goes on
        done.append(stats.shard)
        if len(done) == at_shard:
            killer.start()

    cfg = EmbedConfig(input=baseline["embed"].input, output=str(tmp_path / "emb"), batch_size=8, max_tars_in_flight=2)
    s = run_embed(cfg, on_shard_done=on_shard)
    killer.join()
    assert killer.killed, f"nothing of kind {title} was running to kill"
    assert not s.shards_failed and s.embedded == 640
    assert parquet_bytes(tmp_path / "emb") == baseline["parquet"]  # byte-identical, every key once


@pytest.mark.parametrize("trial", range(5))
def test_index_add_survives_a_killed_worker(baseline, trial, tmp_path):
    index = tmp_path / "index"
    shutil.copytree(baseline["trained"], index)
    cfg = IndexConfig(**{**baseline["index"].__dict__, "index": str(index)})
    at_part, parts = RNG.randint(0, 3), []
    killer = Killer(["add_part"], 0.0, RNG)
    if at_part == 0:
        killer.start()

    def on_part(part) -> None:  # the killer looks while the run goes on
        parts.append(part)
        if len(parts) == at_part:
            killer.start()

    ledger = run_add(cfg, on_part=on_part)
    killer.join()
    assert killer.killed
    numbers = sorted(n for part in ledger.parts for n in part.shard_numbers)
    assert numbers == list(range(6))  # every shard in exactly one recorded part
    run_merge(cfg)
    assert index_entries(IndexFolder(str(index))) == baseline["lists"]  # same ids, same lists, same codes


@pytest.mark.parametrize("trial", range(4))
def test_search_survives_a_killed_verification_worker(baseline, trial, tmp_path):
    cfg = SearchConfig(**{**baseline["search"].__dict__, "output": str(tmp_path), "run_id": f"killed-{trial}"})
    killer = Killer(["verify_query"], RNG.uniform(0.0, 2.0), RNG)
    killer.start()
    run = Path(run_search(cfg).run_url)
    killer.join()
    assert killer.killed
    for name in ("matches.parquet", "baseline.parquet"):
        want = pq.read_table(baseline["run"] / name).drop(["run_id"])
        assert pq.read_table(run / name).drop(["run_id"]).equals(want), name


def driver_env() -> dict:
    return {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="rf-", dir="/tmp"),
            "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


@pytest.mark.parametrize("trial", range(2))
def test_embed_driver_killed_then_rerun(baseline, trial, tmp_path):
    out = tmp_path / "emb"
    args = [*REPLICA, "embed", "-i", baseline["embed"].input[0], "-o", str(out), "--batch-size", "8",
            "--max-tars-in-flight", "1", "-q"]
    env = driver_env()
    proc = subprocess.Popen(args, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for = RNG.randint(1, 6)  # complete shards before the kill
    deadline = time.time() + 300
    while len(list(out.glob("*.stats.json"))) < wait_for and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
    proc.wait()
    assert len(list(out.glob("*.stats.json"))) < 8, "the kill landed mid-run"
    rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert parquet_bytes(out) == baseline["parquet"]


def test_index_add_driver_killed_between_a_part_and_its_ledger_entry(baseline, tmp_path):
    index = tmp_path / "index"
    shutil.copytree(baseline["trained"], index)
    n = RNG.randint(1, 5)
    script = (
        "import os, signal; from pipeline.config import IndexConfig; from pipeline.index.add import run_add\n"
        "seen = []\n"
        "def on_part(part):\n"
        "    seen.append(part)\n"
        f"    if len(seen) == {n}: os.kill(os.getpid(), signal.SIGKILL)\n"
        f"run_add(IndexConfig(embeddings={baseline['index'].embeddings!r}, index={str(index)!r}, group_size=1,"
        " factory='IVF32,PQ16x4'), use_ray=False, on_part=on_part)"
    )
    proc = subprocess.run([sys.executable, "-c", script], env=driver_env(), capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    cfg = IndexConfig(**{**baseline["index"].__dict__, "index": str(index)})
    ledger = run_add(cfg, use_ray=False)
    assert sorted(n for part in ledger.parts for n in part.shard_numbers) == list(range(6))
    run_merge(cfg, use_ray=False)
    assert index_entries(IndexFolder(str(index))) == baseline["lists"]
