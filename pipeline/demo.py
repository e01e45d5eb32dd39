"""``replica demo``: the whole job on embedded defaults, with copies planted where we know them.

With no network and no weights it builds a small LAION-like corpus (procedural scenes and tiles
of the photographs that ship inside installed packages, in WebDataset tars with captions and
URLs), marks part of it as "the subset", makes "generated" images that copy corpus images
(every edit of ``pipeline.synthetic_images.EDITS`` plus objects pasted into new scenes, half from
inside the subset, half from outside) and novel images that copy nothing, then runs
embed -> captions -> index -> search -> report on a local Ray with the default descriptor and
scores the run against what it planted.

The captions are planted too: a few captions are shared by several training images (in several
spellings: case, spacing, a trailing URL, so the exact and the normalised counts differ), some
copies are made of those images, and some prompts are a training caption word for word, so the
report's replication by caption duplication and by prompt-caption match has real numbers.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import synthetic_images as synthetic
from pipeline.layout.runs import GALLERY, MATCHES, QUERIES, RunFolder, RunSummary
from pipeline.progress import NullProgress, Progress
from pipeline.storage import join

PER_TAR = 250
NOVEL_SEED = 10_000_000  # far from every corpus seed
#: planted captions, each shared by this many training images (at most a tenth of the corpus each)
SHARED_CAPTIONS = (("the great wave off kanagawa, woodblock print poster", 12),
                    ("Vintage travel poster of a mountain lake", 6),
                    ("portrait of a woman with a pearl earring", 3))


def spelling(text: str, variant: int) -> str:
    """One of the ways a shared caption is written on the web (all normalise to the same text)."""
    return [text, text.upper(), "  ".join(text.split()), f"{text} https://shop.example.com/p/{variant}"][variant % 4]


@dataclass
class DemoConfig:
    """`replica demo`: the corpus, the planted copies and where everything goes."""

    #: where the demo corpus, index and results go
    workdir: str = "demo-output"
    #: corpus images
    corpus_size: int = 2000
    #: planted copies per edit type
    copies_per_edit: int = 8
    #: planted copies of objects pasted into new scenes
    pasted: int = 12
    #: generated images that copy nothing
    novel: int = 24
    #: share of the corpus marked as "the subset"
    subset_share: float = 0.4
    #: corpus images searched like the queries (verification included) to calibrate the threshold
    baseline_size: int = 200
    #: seed of the corpus and the planted copies
    seed: int = 0
    #: more corpus images after the scenes, never copied and outside the subset: flat shapes on a
    #: gradient, ~10x cheaper to draw than a scene, so benchmarks can grow the corpus to millions
    filler_size: int = 0
    #: faiss factory of the index; empty = plain IVF-PQ with ~4 sqrt(n) lists (on the demo's
    #: 2,000 images OPQ's training costs more than it gains)
    index_factory: str = ""


def corpus_images(n: int, seed: int):
    """(key-independent) images of the corpus: photo tiles first (when installed), then scenes."""
    tiles = [im for _, im in synthetic.photo_tiles(tile=128, out_short=256)]
    rng = np.random.default_rng(seed)
    for i in range(n):
        if i < len(tiles) and i % 3 == 0:
            yield tiles[i // 3]
        else:
            w, h = int(rng.integers(280, 420)), int(rng.integers(220, 340))
            yield synthetic.scene(seed * 7_919 + i, (w, h))


def build_corpus(cfg: DemoConfig) -> dict[str, Any]:
    """Write the corpus tars and the subset list; return the keys, images are re-read later."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.sample import laion_sample, sample_key, write_tar

    rng = np.random.default_rng(cfg.seed)
    captions = [synthetic.caption(cfg.seed + i) for i in range(cfg.corpus_size)]
    shared_rows = rng.permutation(cfg.corpus_size)
    shared: set[int] = set()
    at = 0
    for text, size in SHARED_CAPTIONS:
        size = max(2, min(size, cfg.corpus_size // 10))
        for v, row in enumerate(shared_rows[at:at + size]):
            captions[int(row)] = spelling(text, v)
            shared.add(int(row))
        at += size
    keys, urls, samples = [], [], []
    shard = 0
    for i, image in enumerate(corpus_images(cfg.corpus_size, cfg.seed)):
        key = sample_key(i // PER_TAR, i % PER_TAR)
        url = f"https://images.example.org/{rng.integers(1 << 40):x}/{key}.jpg"
        samples.append(laion_sample(key, image, captions[i], url))
        keys.append(key)
        urls.append(url)
        if len(samples) == PER_TAR or i == cfg.corpus_size - 1:
            write_tar(join(cfg.workdir, "corpus", f"{shard:05d}.tar"), samples)
            samples, shard = [], shard + 1
    in_subset = rng.random(len(keys)) < cfg.subset_share
    subset = pa.table({"key": [k for k, s in zip(keys, in_subset) if s], "url": [u for u, s in zip(urls, in_subset) if s]})
    Path(cfg.workdir).mkdir(parents=True, exist_ok=True)
    pq.write_table(subset, join(cfg.workdir, "subset.parquet"))
    return {"keys": keys, "in_subset": in_subset, "captions": dict(zip(keys, captions)),
            "shared": {keys[i] for i in shared}}


def _write_filler_tar(workdir: str, shard: int, first: int, count: int, seed: int) -> None:
    from pipeline.sample import laion_sample, sample_key, write_tar

    samples = []
    for j in range(count):
        i = first + j
        key = sample_key(shard, j)
        samples.append(laion_sample(key, synthetic.flat_scene(seed * 7_919 + i), synthetic.caption(seed + i),
                                    f"https://images.example.org/filler/{key}.jpg"))
    write_tar(join(workdir, "corpus", f"{shard:05d}.tar"), samples)


def add_filler(cfg: DemoConfig, first_shard: int, progress: Progress) -> None:
    """Write ``cfg.filler_size`` flat-shape images in tars after the scenes' (all cores)."""
    import os
    from concurrent.futures import ProcessPoolExecutor

    first = cfg.corpus_size  # seeds continue after the scenes'
    shards = range((cfg.filler_size + PER_TAR - 1) // PER_TAR)
    with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
        jobs = [pool.submit(_write_filler_tar, cfg.workdir, first_shard + s, first + s * PER_TAR,
                            min(PER_TAR, cfg.filler_size - s * PER_TAR), cfg.seed) for s in shards]
        for done, job in enumerate(jobs, 1):
            job.result()
            if done % 200 == 0 or done == len(jobs):
                progress.log(f"filler: {min(done * PER_TAR, cfg.filler_size)}/{cfg.filler_size} images")


def corpus_image(workdir: str, key: str):
    import tarfile

    from pipeline.verify import decode

    with tarfile.open(join(workdir, "corpus", f"{key[:5]}.tar")) as tf:
        return decode(tf.extractfile(f"{key}.jpg").read())


def plant_queries(cfg: DemoConfig, corpus: dict[str, Any]) -> list[dict[str, Any]]:
    """Write generated images (copies and novel ones) with prompts; return the ground truth."""
    rng = np.random.default_rng(cfg.seed + 1)
    keys, inside = corpus["keys"], corpus["in_subset"]
    pools = {True: [k for k, s in zip(keys, inside) if s], False: [k for k, s in zip(keys, inside) if not s]}
    folder = Path(cfg.workdir) / "generated"
    folder.mkdir(parents=True, exist_ok=True)
    truth = []

    def save(name, image, prompt, **fields):
        image.save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(prompt)
        truth.append({"query_key": name, **fields})

    used: set[str] = set()

    def pick(from_subset: bool, shared: bool = False) -> str:
        pool = [k for k in pools[from_subset] if k in corpus["shared"]] if shared else pools[from_subset]
        free = [k for k in pool if k not in used] or [k for k in pools[from_subset] if k not in used]
        k = str(rng.choice(free))
        used.add(k)
        return k

    for e, edit in enumerate(synthetic.EDITS):
        for j in range(cfg.copies_per_edit):
            # every fourth copy is of an image whose caption is shared; every other prompt is the
            # source's caption word for word
            source = pick(from_subset=j % 2 == 0, shared=(j + e) % 4 == 0)
            image = synthetic.apply_edit(edit, corpus_image(cfg.workdir, source), int(rng.integers(1 << 31)))
            prompt = corpus["captions"][source] if j % 2 == 1 else f"a {edit} copy"
            save(f"copy-{edit}-{j}", image, prompt, edit=edit, source_key=source, source_in_subset=j % 2 == 0,
                 prompt_is_caption=j % 2 == 1, caption_shared=source in corpus["shared"])
    for j in range(cfg.pasted):
        source = pick(from_subset=j % 2 == 0)
        background = synthetic.scene(NOVEL_SEED + 1000 + j, (512, 384))
        image, box = synthetic.paste_object(corpus_image(cfg.workdir, source), background, rng)
        save(f"paste-{j}", image, "an object in a new scene", edit="paste", source_key=source,
             source_in_subset=j % 2 == 0, box=list(box))
    for j in range(cfg.novel):
        # a third of the novel images have a training caption as prompt: such a prompt alone copies nothing
        prompt = corpus["captions"][str(rng.choice(keys))] if j % 3 == 0 else "something new"
        save(f"novel-{j}", synthetic.scene(NOVEL_SEED + j, (384, 320)), prompt, edit="novel",
             source_key=None, source_in_subset=None, prompt_is_caption=j % 3 == 0)
    (Path(cfg.workdir) / "truth.json").write_text(json.dumps(truth, indent=1))
    return truth


def score_run(run_url: str, truth: list[dict[str, Any]], summary: RunSummary) -> dict[str, Any]:
    """Recall@1 per edit, subset attribution of the hits, false positives among novel images."""
    run = RunFolder(run_url)
    matches = run.read_table(MATCHES).to_pylist()
    queries = {q["query_key"]: q for q in run.read_table(QUERIES).to_pylist()}
    top1 = {m["query_key"]: m for m in matches if m["rank"] == 1}
    calibrated = summary.thresholds.get("calibrated")
    per_edit: dict[str, list[bool]] = {}
    attribution = []
    for t in truth:
        if t["edit"] == "novel":
            continue
        m = top1.get(t["query_key"])
        hit = bool(m and m["match_key"] == t["source_key"])
        per_edit.setdefault(t["edit"], []).append(hit)
        if hit:
            attribution.append(bool(m["in_subset"]) == bool(t["source_in_subset"]))
    novel = [t["query_key"] for t in truth if t["edit"] == "novel"]
    novel_scores = [queries[k]["best_score"] for k in novel if queries[k]["best_score"] is not None]
    return {
        "recall_at_1": {e: round(float(np.mean(h)), 3) for e, h in per_edit.items()},
        "copies": {e: len(h) for e, h in per_edit.items()},
        "subset_attribution_correct": round(float(np.mean(attribution)), 3) if attribution else None,
        "calibrated_threshold": calibrated,
        "false_positives_at_calibrated": int(sum(s >= calibrated for s in novel_scores)) if calibrated is not None else None,
        "novel_queries": len(novel),
    }


def run_demo(cfg: DemoConfig, progress: Progress | None = None) -> dict[str, Any]:
    from pipeline.captions import run_captions
    from pipeline.config import CaptionsConfig, EmbedConfig, IndexConfig, SearchConfig
    from pipeline.embed import run_embed
    from pipeline.index.build import run_build
    from pipeline.index.factory import default_nlist
    from pipeline.search import run_search

    progress = progress or NullProgress()
    work = cfg.workdir
    progress.log(f"building a corpus of {cfg.corpus_size} images in {work}/corpus ...")
    corpus = build_corpus(cfg)
    truth = plant_queries(cfg, corpus)
    progress.log(f"planted {sum(t['edit'] != 'novel' for t in truth)} copies and {cfg.novel} novel images in {work}/generated")
    if cfg.filler_size:
        add_filler(cfg, first_shard=(cfg.corpus_size + PER_TAR - 1) // PER_TAR, progress=progress)

    s = run_embed(EmbedConfig(input=[join(work, "corpus", "*.tar")], output=join(work, "embeddings")), progress)
    progress.log(f"embedded {s.embedded}/{s.images} corpus images ({s.images_per_s:.0f} img/s)")
    counted = run_captions(CaptionsConfig(embeddings=join(work, "embeddings"), output=join(work, "captions"),
                                          partitions=4), progress)
    progress.log(f"counted {counted.rows_with_caption} captions: {counted.distinct_captions} distinct, "
                 f"{counted.distinct_normalized} after normalisation")
    # A corpus this small trains OPQ slowly for no gain: plain IVF-PQ, exact rerank restores scores.
    nlist = default_nlist(cfg.corpus_size + cfg.filler_size)  # the whole corpus: a rerun embeds nothing new
    run_build(IndexConfig(embeddings=join(work, "embeddings"), index=join(work, "index"),
                          factory=cfg.index_factory or f"IVF{nlist},PQ32x8"), progress)

    search = SearchConfig(queries=join(work, "generated"), index=join(work, "index"), output=join(work, "results"),
                          run_id="demo", subset=join(work, "subset.parquet"),
                          baseline_size=min(cfg.baseline_size, cfg.corpus_size),
                          captions=join(work, "captions"), label="demo: default descriptor")
    result = run_search(search, progress)
    scores = score_run(result.run_url, truth, result.summary)
    scores["report"] = join(result.run_url, GALLERY)
    (Path(work) / "demo_scores.json").write_text(json.dumps(scores, indent=2))
    return {"summary": result.summary, "scores": scores}
