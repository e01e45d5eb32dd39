"""Kill-and-resume of add is exactly once; incremental shards join without rebuilding."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from pipeline.index.add import run_add
from pipeline.index.merge import run_merge
from pipeline.index.registry import decode_ids
from pipeline.index.rerank import SideFileVectors, exact_rerank, recall_at
from pipeline.index.serve import IndexSearcher
from pipeline.index.train import run_train
from pipeline.layout.embeddings import EmbeddingsFolder
from pipeline.layout.index import IndexFolder
from index_helpers import brute_force, config, index_of, make_corpus, registry_of

REPO = Path(__file__).resolve().parents[1]


def all_ids(index: str) -> np.ndarray:
    """Every id held by the recorded parts (read back from the part files)."""
    import faiss

    out = []
    folder = IndexFolder(index)
    for p in folder.read_ledger().parts:
        part = faiss.deserialize_index(np.frombuffer(folder.read_bytes(folder.part_rel(p.name)), np.uint8))
        inv = faiss.extract_index_ivf(part).invlists
        for lst in range(inv.nlist):
            n = inv.list_size(lst)
            if n:
                out.append(faiss.rev_swig_ptr(inv.get_ids(lst), n).copy())
    return np.concatenate(out)


def test_killed_add_resumes_exactly_once(tmp_path):
    corpus = make_corpus(str(tmp_path / "emb"), shards=10, rows=300)
    cfg = config(str(tmp_path / "emb"), str(tmp_path / "index"), group_size=1)
    run_train(cfg)
    # The driver kills itself once the 4th part is written but before the ledger records it,
    # the worst moment for a crash: from the work loop's per-result callback.
    script = (
        "import os, signal; from pipeline.index.add import run_add; from index_helpers import config\n"
        "seen = []\n"
        "def on_part(part):\n"
        "    seen.append(part)\n"
        "    if len(seen) == 4: os.kill(os.getpid(), signal.SIGKILL)\n"
        f"run_add(config({cfg.embeddings!r}, {cfg.index!r}, group_size=1), use_ray=False, on_part=on_part)"
    )
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    # killed after the 4th part file was written but before the ledger recorded it
    recorded = index_of(cfg).read_ledger().parts
    assert 0 < len(recorded) < 4
    part_files = list((tmp_path / "index" / "parts").glob("part-*.index"))
    assert len(part_files) == 4  # an orphan part file exists that the ledger does not know

    ledger = run_add(cfg, use_ray=False)
    shards = [n for p in ledger.parts for n in p.shard_numbers]
    assert sorted(shards) == list(range(10))  # every shard in exactly one recorded part
    ids = all_ids(cfg.index)
    assert len(ids) == len(np.unique(ids))  # no vector twice
    reg = registry_of(cfg)
    _, want = corpus.ok_matrix({n: reg.number(n) for n in reg.names})
    assert sorted(ids.tolist()) == sorted(want.tolist())  # and none missing
    manifest = run_merge(cfg, use_ray=False)
    assert manifest.ntotal == len(want)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_incremental_shards_join_without_rebuilding(tmp_path):
    corpus = make_corpus(str(tmp_path / "emb"), shards=4, rows=400)
    cfg = config(str(tmp_path / "emb"), str(tmp_path / "index"), group_size=2, shard_memory_gb=0.001)
    run_train(cfg)
    run_add(cfg, use_ray=False)
    first = run_merge(cfg, use_ray=False)
    reg1 = registry_of(cfg)
    numbers1 = {n: reg1.number(n) for n in reg1.names}
    shard_files = {p: _sha(p) for p in (tmp_path / "index" / "shards").iterdir()}
    trained_sha = _sha(tmp_path / "index" / "trained.index")

    corpus.add(3, 400)  # three new complete shards ...
    from pipeline.testing.vectors import write_shard

    emb = EmbeddingsFolder(cfg.embeddings)
    write_shard(emb, "zz-incomplete", corpus.source.batch(99, 50), emb.read_info().identity, complete=False)
    ledger = run_add(cfg, use_ray=False)  # ... and one without its stats file
    second = run_merge(cfg, use_ray=False)

    reg2 = registry_of(cfg)
    assert reg2.version == reg1.version + 1 and len(reg2) == 7
    assert all(reg2.number(n) == k for n, k in numbers1.items())  # never renumbered
    assert "zz-incomplete" not in reg2.names
    assert _sha(tmp_path / "index" / "trained.index") == trained_sha  # not retrained
    for p, sha in shard_files.items():  # existing index shards untouched
        assert _sha(p) == sha
    assert second.shards[: len(first.shards)] == first.shards
    assert len(second.shards) > len(first.shards)
    assert second.registry_version == reg2.version
    new_parts = [p for p in ledger.parts if set(p.shard_numbers) & {4, 5, 6}]
    assert {n for p in new_parts for n in p.shard_numbers} == {4, 5, 6}

    x, ids = corpus.ok_matrix({n: reg2.number(n) for n in reg2.names})
    assert second.ntotal == len(x)
    queries = corpus.source.batch(5, 100)  # drawn like shard 5: its neighbours are new vectors too
    truth = brute_force(queries, x, ids, 10)
    with IndexSearcher(index_of(cfg), use_ray=False) as s:
        _, cand = s.search(queries, 100, nprobe=8)
        _, found = exact_rerank(queries, cand, SideFileVectors(index_of(cfg).vectors_folder, s.dim), 10)
    assert recall_at(found, truth, 10) >= 0.9
    assert (decode_ids(found[found >= 0])[0] >= 4).any()  # hits in the new shards

