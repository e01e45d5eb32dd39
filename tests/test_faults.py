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
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config import EmbedConfig, IndexConfig, SearchConfig
from pipeline.embed import run_embed
from pipeline.index.add import run_add
from pipeline.index.merge import run_merge
from pipeline.index.train import run_train
from pipeline.layout.index import IndexFolder
from pipeline.search import run_search

RNG = random.Random(20261201)
REPLICA = [sys.executable, "-m", "pipeline.cli"]


def descends_from_us(pid: int) -> bool:
    """Only processes of this test's own Ray are ever killed."""
    me = os.getpid()
    while pid > 1:
        if pid == me:
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False


def ray_processes(title: str) -> list[int]:
    """Ray worker processes of ours whose title (``ray::<task or actor>``) starts with ``title``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if cmdline.startswith(f"ray::{title}") and descends_from_us(int(entry.name)):
                found.append(int(entry.name))
    return found


class Killer(threading.Thread):
    """After a random delay, SIGKILLs one live process of the given kind (retrying until one exists)."""

    def __init__(self, titles: list[str], delay_s: float, give_up_s: float = 60):
        super().__init__(daemon=True)
        self.titles, self.delay_s, self.give_up_s = titles, delay_s, give_up_s
        self.killed: list[tuple[str, int]] = []

    def run(self) -> None:
        time.sleep(self.delay_s)
        end = time.time() + self.give_up_s
        while time.time() < end and not self.killed:
            for title in self.titles:
                pids = ray_processes(title)
                if pids:
                    pid = RNG.choice(pids)
                    os.kill(pid, signal.SIGKILL)
                    self.killed.append((title, pid))
                    return
            time.sleep(0.02)


def parquet_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.parquet"))}


def lists_of(index: IndexFolder) -> dict[int, list[tuple[int, bytes]]]:
    """Every inverted list of every index shard: sorted (id, code) pairs, the index's content."""
    import faiss

    from pipeline.index.merge import read_ondisk

    content: dict[int, list] = {}
    for shard in index.read_manifest().shards:
        idx = read_ondisk(index.child(shard.index))
        inv = faiss.extract_index_ivf(idx).invlists
        for lst in range(inv.nlist):
            n = inv.list_size(lst)
            if n:
                ids = faiss.rev_swig_ptr(inv.get_ids(lst), n).copy()
                codes = faiss.rev_swig_ptr(inv.get_codes(lst), n * inv.code_size).copy().reshape(n, -1)
                content.setdefault(lst, []).extend((int(i), c.tobytes()) for i, c in zip(ids, codes))
    return {k: sorted(v) for k, v in content.items()}


@pytest.fixture(scope="module")
def baseline(ray_local, tmp_path_factory):
    """The undisturbed run every trial is compared with."""
    from pipeline.sample import make_sample_tars
    from pipeline.synthetic_images import apply_edit
    from pipeline.verify import load_candidate

    root = tmp_path_factory.mktemp("faults")
    make_sample_tars(str(root / "tars"), tars=6, per_tar=30, seed=11)
    embed = EmbedConfig(input=[str(root / "tars" / "*.tar")], output=str(root / "emb"), batch_size=8,
                        max_tars_in_flight=2)
    run_embed(embed)
    index = IndexConfig(embeddings=str(root / "emb"), index=str(root / "index"), factory="IVF8,PQ8x8",
                        group_size=1, nprobe=8, shard_memory_gb=0.00003)
    run_train(index)
    trained = root / "trained-only"
    shutil.copytree(root / "index", trained)  # what every add trial starts from
    run_add(index)
    run_merge(index)
    gen = root / "generated"
    gen.mkdir()
    rows = pq.read_table(root / "emb" / "00002.parquet").to_pylist()[:4]
    for j, r in enumerate(rows):
        apply_edit("crop", load_candidate(r["tar_url"], r["tar_offset"], r["tar_size"]), j).save(gen / f"q{j}.png")
    search = SearchConfig(queries=str(gen), index=index.index, output=str(root / "results"), run_id="base",
                          verify_top=5, baseline_size=30, regions=False)
    run = Path(run_search(search).run_url)
    return {"root": root, "embed": embed, "index": index, "trained": trained, "search": search, "run": run,
            "parquet": parquet_bytes(root / "emb"), "lists": lists_of(IndexFolder(index.index))}


@pytest.mark.parametrize("trial", range(8))
def test_embed_survives_a_killed_actor_or_decode_worker(baseline, trial, tmp_path):
    title = ["EmbedActor", "embed_shard"][trial % 2]
    cfg = EmbedConfig(input=baseline["embed"].input, output=str(tmp_path / "emb"), batch_size=8, max_tars_in_flight=2)
    killer = Killer([title], RNG.uniform(0.3, 3.0))
    killer.start()
    s = run_embed(cfg)
    killer.join()
    assert killer.killed, f"nothing of kind {title} was running to kill"
    assert not s.shards_failed and s.embedded == 180
    assert parquet_bytes(tmp_path / "emb") == baseline["parquet"]  # byte-identical, every key once


@pytest.mark.parametrize("trial", range(5))
def test_index_add_survives_a_killed_worker(baseline, trial, tmp_path):
    index = tmp_path / "index"
    shutil.copytree(baseline["trained"], index)
    cfg = IndexConfig(**{**baseline["index"].__dict__, "index": str(index)})
    killer = Killer(["add_part"], RNG.uniform(0.0, 1.5))
    killer.start()
    ledger = run_add(cfg)
    killer.join()
    assert killer.killed
    numbers = sorted(n for part in ledger.parts for n in part.shard_numbers)
    assert numbers == list(range(6))  # every shard in exactly one recorded part
    run_merge(cfg)
    assert lists_of(IndexFolder(str(index))) == baseline["lists"]  # same ids, same lists, same codes


@pytest.mark.parametrize("trial", range(4))
def test_search_survives_a_killed_verification_worker(baseline, trial, tmp_path):
    cfg = SearchConfig(**{**baseline["search"].__dict__, "output": str(tmp_path), "run_id": f"killed-{trial}"})
    killer = Killer(["verify_query"], RNG.uniform(0.0, 2.0))
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
    wait_for = RNG.randint(1, 4)  # complete shards before the kill
    deadline = time.time() + 300
    while len(list(out.glob("*.stats.json"))) < wait_for and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(RNG.uniform(0.0, 0.5))
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
    proc.wait()
    assert len(list(out.glob("*.stats.json"))) < 6, "the kill landed mid-run"
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
        " factory='IVF8,PQ8x8'), use_ray=False, on_part=on_part)"
    )
    proc = subprocess.run([sys.executable, "-c", script], env=driver_env(), capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    cfg = IndexConfig(**{**baseline["index"].__dict__, "index": str(index)})
    ledger = run_add(cfg, use_ray=False)
    assert sorted(n for part in ledger.parts for n in part.shard_numbers) == list(range(6))
    run_merge(cfg, use_ray=False)
    assert lists_of(IndexFolder(str(index))) == baseline["lists"]
