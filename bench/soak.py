"""Soak: many seeded kill -9 trials across the stages; every record must land exactly once.

    python bench/soak.py --trials 60 --json bench/out/soak.json

Each trial starts a stage on a local Ray, SIGKILLs one of its workers (an embedding actor, a
decode task, an index add task, a search verification task) at a random moment, lets the run
finish (retries and restarts are the product's), and compares the outcome with an undisturbed
run: embedding Parquet byte for byte, the index's (id, code) pairs per inverted list, the
matches table. Prints and writes: trials and faults per kind, records lost, records duplicated,
and trials whose output differed (all three must be 0). The short version is tests/test_faults.py.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import EmbedConfig, IndexConfig, SearchConfig  # noqa: E402
from pipeline.embed import run_embed  # noqa: E402
from pipeline.index.add import run_add  # noqa: E402
from pipeline.index.merge import run_merge  # noqa: E402
from pipeline.index.train import run_train  # noqa: E402
from pipeline.layout.embeddings import EmbeddingsFolder  # noqa: E402
from pipeline.layout.index import IndexFolder  # noqa: E402
from pipeline.search import run_search  # noqa: E402
from pipeline.testing.faults import Killer, index_entries  # noqa: E402


def keys_and_bytes(folder: Path) -> tuple[list[str], dict[str, bytes]]:
    import pyarrow.parquet as pq

    files = sorted(folder.glob("*.parquet"))
    keys = [k for f in files for k in pq.read_table(f, columns=["key", "shard"]).to_pylist()]
    return [f"{k['shard']}/{k['key']}" for k in keys], {f.name: f.read_bytes() for f in files}



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=60)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--tars", type=int, default=8)
    ap.add_argument("--per-tar", type=int, default=80)
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    from pipeline.ray_util import connect
    from pipeline.sample import make_sample_tars
    from pipeline.synthetic_images import apply_edit
    from pipeline.testing.vectors import MixtureSource, write_folder
    from pipeline.verify import load_candidate

    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="replica-soak-"))
    connect(None, num_cpus=os.cpu_count() or 2, _temp_dir=tempfile.mkdtemp(prefix="rs-", dir="/tmp"))
    make_sample_tars(str(work / "tars"), tars=args.tars, per_tar=args.per_tar, seed=5)
    embed = EmbedConfig(input=[str(work / "tars" / "*.tar")], output=str(work / "emb"), batch_size=8,
                        max_tars_in_flight=2)
    run_embed(embed)
    base_keys, base_bytes = keys_and_bytes(work / "emb")
    list(write_folder(EmbeddingsFolder(str(work / "vec")), MixtureSource(64, latent=8, clusters=64), 6, 40_000))
    index = IndexConfig(embeddings=str(work / "vec"), index=str(work / "index"), factory="IVF32,PQ16x4",
                        group_size=1, shard_memory_gb=0.004)
    run_train(index)
    shutil.copytree(work / "index", work / "trained")
    run_add(index)
    run_merge(index)
    base_pairs = index_entries(IndexFolder(index.index))
    images = IndexConfig(embeddings=str(work / "emb"), index=str(work / "image-index"), factory="IVF8,PQ16x4")
    run_train(images)
    run_add(images)
    run_merge(images)
    gen = work / "generated"
    gen.mkdir()
    import pyarrow.parquet as pq

    for j, r in enumerate(pq.read_table(work / "emb" / "00001.parquet").to_pylist()[:4]):
        apply_edit("crop", load_candidate(r["tar_url"], r["tar_offset"], r["tar_size"]), j).save(gen / f"q{j}.png")
    search = SearchConfig(queries=str(gen), index=images.index, output=str(work / "results"), run_id="base",
                          verify_top=5, baseline_size=30, regions=False)
    base_matches = pq.read_table(Path(run_search(search).run_url) / "matches.parquet").drop(["run_id"])

    kinds = ["EmbedActor", "embed_shard", "add_part", "verify_query"]
    faults, trials, lost, duplicated, differed = collections.Counter(), collections.Counter(), 0, 0, []
    started = time.time()
    for t in range(args.trials):
        kind = kinds[t % len(kinds)]
        out = work / f"trial-{t}"
        killer = Killer([kind], rng.uniform(0.0, 2.5), rng)
        killer.start()
        if kind in ("EmbedActor", "embed_shard"):
            run_embed(EmbedConfig(**{**embed.__dict__, "output": str(out)}))
            killer.join()
            keys, blobs = keys_and_bytes(out)
            lost += len(set(base_keys) - set(keys))
            duplicated += len(keys) - len(set(keys))
            same = blobs == base_bytes
        elif kind == "add_part":
            shutil.copytree(work / "trained", out)
            cfg = IndexConfig(**{**index.__dict__, "index": str(out)})
            run_add(cfg)
            killer.join()
            run_merge(cfg)
            pairs = index_entries(IndexFolder(str(out)))
            lost += sum((base_pairs - pairs).values())
            duplicated += sum((pairs - base_pairs).values())
            same = pairs == base_pairs
        else:
            run = Path(run_search(SearchConfig(**{**search.__dict__, "output": str(out), "run_id": f"t{t}"})).run_url)
            killer.join()
            same = pq.read_table(run / "matches.parquet").drop(["run_id"]).equals(base_matches)
        trials[kind] += 1
        faults[kind] += len(killer.killed)
        if not same:
            differed.append(t)
        shutil.rmtree(out, ignore_errors=True)
        print(f"trial {t + 1}/{args.trials}: {kind}, {'killed' if killer.killed else 'nothing running to kill'}, "
              f"{'same output' if same else 'OUTPUT DIFFERS'}", flush=True)
    result = {"trials": dict(trials), "faults_injected": dict(faults), "records_lost": lost,
              "records_duplicated": duplicated, "trials_with_different_output": differed,
              "seconds": round(time.time() - started, 1), "seed": args.seed,
              "machine": f"{os.cpu_count()} cores", "loadavg": os.getloadavg()}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
