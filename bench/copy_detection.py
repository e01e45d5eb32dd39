"""Copy-detection benchmark on real images: the search stage's scoring, split by split.

    python bench/copy_detection.py --split validation             # choose settings here
    python bench/copy_detection.py --fit                          # fit the final-score model (fit split)
    python bench/copy_detection.py --split test --json test.json  # report the test split, once
    python bench/copy_detection.py --split validation --corpus-distractors 100000   # a larger corpus
    python bench/copy_detection.py --verifiers                    # keypoint methods: accuracy, CPU per pair
    python bench/copy_detection.py --speed                        # corpus-side throughput on one core
    python bench/copy_detection.py --embedder sscd --checkpoint sscd_disc_mixup.torchscript.pt --fit
    python bench/copy_detection.py --embedder sscd --checkpoint ... --score-model sscd-score.json --split test

Data: :mod:`pipeline.devset` (photographs, icons, paintings, rendered text from pinned Debian
packages; fetched at bench time, the sha256 of every image in ``bench/devset.sha256``). Each
split has its own corpus (its references and other images, stored as JPEG q90 on white as
img2dataset stores them) and its own queries: every reference copied with ``--edits-per-ref``
edits (``pipeline.synthetic_images.EDITS`` and ``paste``: the image, through its alpha when it
has one, pasted at 35-60% of the width of a photo or painting that is not in the corpus), and
distractors: edits of the split's images that are not in the corpus.

Methods: PDQ (8 dihedral variants), pHash, 32x32 grey thumbnail cosine (brute force), and the
embedder as search scores it (functions of pipeline.search and pipeline.scoring): ``global``
(whole image), ``+ regions`` (grid and object windows, best region per corpus image),
``+ verification`` (the search's pool verified; rank: verified first, then similarity), and
``final score`` (pipeline.scoring's model: what search ranks by).

Metrics (DISC21 style): micro-AP over (query, candidate, score) of the top 10, distractors
included; recall@1 per edit and per category; recall at the threshold that 99% of distractor
queries' top-1 scores stay below; candidate-generation recall (the reference is in the pool
verification sees) apart from verification (verified, given it is there).
"""
from __future__ import annotations

import os
import sys

# One thread per process, as search's Ray tasks run (Ray sets OMP_NUM_THREADS to a task's CPUs),
# set before numpy/cv2 load: the CPU times reported are then one core's. Unpinned, BLAS threads
# spinning in the verification workers doubled the CPU counted per query on a 2-core machine
# (2.58 s against 1.37 s, the same 200 validation queries).
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[var] = "1"

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pipeline import devset  # noqa: E402
from pipeline import scoring  # noqa: E402
from pipeline import synthetic_images as synthetic  # noqa: E402
from pipeline.config import EmbedderConfig, SearchConfig  # noqa: E402
from pipeline.layout.devset import MANIFEST, DevsetCache  # noqa: E402
from pipeline.search import Candidate, merge_regions, verification_pool  # noqa: E402

from corpus_distractors import CorpusDistractors  # noqa: E402

TOP_K = 10
CANDIDATES = 100  # per query region, as SearchConfig.candidates
VERIFY_TOP = SearchConfig().verify_top
QUERY_EDITS = (*synthetic.EDITS, "paste")


# ------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------


@dataclass
class Dataset:
    split: str
    corpus_jpeg: list[bytes]
    corpus_category: list[str]
    queries: list[Image.Image]
    query_edit: list[str]
    query_category: list[str]
    query_gt: np.ndarray  # corpus index of the reference, -1 for distractors
    paste_box: dict[int, tuple] = field(default_factory=dict)
    extra: CorpusDistractors | None = None  # more corpus images, after the split's own

    @property
    def corpus_size(self) -> int:
        return len(self.corpus_jpeg) + (len(self.extra) if self.extra else 0)

    def corpus_bytes(self, i: int) -> bytes:
        return self.corpus_jpeg[i] if i < len(self.corpus_jpeg) else self.extra.jpeg(i - len(self.corpus_jpeg))

    def corpus_image(self, i: int) -> Image.Image:
        return Image.open(io.BytesIO(self.corpus_bytes(i)))


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    devset.flatten(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def build_split(items: list[devset.Item], split: str, edits_per_ref: int, distractor_edits: int,
                limit: int = 0, seed: int = 0) -> Dataset:
    """One split's corpus and queries (deterministic for the items and the seed)."""
    rng = np.random.default_rng(seed + {"fit": 0, "validation": 1, "test": 2}[split])
    mine = [it for it in items if it.split == split]
    if limit and limit < len(mine):  # evenly over the list, so every category stays
        mine = [mine[int(k)] for k in np.linspace(0, len(mine) - 1, limit).round()]
    refs = [it for it in mine if it.role == "reference"]
    others = [it for it in mine if it.role == "other"]
    distractors = [it for it in mine if it.role == "distractor"]
    corpus = refs + others
    originals = [it.image() for it in corpus]
    # Paste backgrounds: photographs and paintings of this split that are not in the corpus.
    scenes = [devset.flatten(it.image()) for it in distractors if it.category in ("photo", "art")]
    scenes = [s for s in scenes if min(s.size) >= 200] or [synthetic.scene(9_000_000 + k, (448, 336)) for k in range(8)]
    queries, edits, cats, gts, boxes = [], [], [], [], {}

    def make(image: Image.Image, name: str) -> Image.Image:
        if name == "paste":
            bg = scenes[int(rng.integers(len(scenes)))]
            q, box = synthetic.paste_object(image, bg, rng, min_width=0.35, max_width=0.6)
            boxes[len(queries)] = box
            return q
        return synthetic.EDITS[name](devset.flatten(image), rng)

    for r, it in enumerate(refs):
        for k in range(edits_per_ref):
            name = QUERY_EDITS[(r * edits_per_ref + k) % len(QUERY_EDITS)]
            queries.append(make(originals[r], name))
            edits.append(name)
            cats.append(it.category)
            gts.append(r)
    for it in distractors:
        image = it.image()
        for _ in range(distractor_edits):
            name = QUERY_EDITS[int(rng.integers(len(QUERY_EDITS)))]
            queries.append(make(image, name))
            edits.append("distractor")
            cats.append(it.category)
            gts.append(-1)
    return Dataset(split, [_jpeg(im) for im in originals], [it.category for it in corpus], queries, edits, cats,
                   np.asarray(gts), boxes)


def scene_split(n: int, seed: int = 0) -> Dataset:
    """Procedural scenes (the whitening's fit scenes, ``default_fit.fit_images``): ``n`` corpus
    images, one edited copy of each (the edits in turn, pastes onto other scenes) and ``n // 3``
    distractors. Added to the score model's fit data, never to validation or test: on flat
    colours a hue shift leaves little for keypoints, and the whole image's similarity is the
    evidence that tells a copy from a region that resembles part of another image."""
    from pipeline.embedders.default_fit import fit_images

    rng = np.random.default_rng(seed + 3)
    images, _ = fit_images(n + n // 3 + 8, devset_cache=None, seed=seed)
    originals, others, backgrounds = images[:n], images[n:n + n // 3], images[n + n // 3:]
    queries, edits, gts, boxes = [], [], [], {}

    def make(image: Image.Image, name: str) -> Image.Image:
        if name == "paste":
            bg = backgrounds[int(rng.integers(len(backgrounds)))].resize((512, 384))
            q, box = synthetic.paste_object(image, bg, rng, min_width=0.35, max_width=0.6)
            boxes[len(queries)] = box
            return q
        return synthetic.EDITS[name](image, rng)

    for r, image in enumerate(originals):
        name = QUERY_EDITS[r % len(QUERY_EDITS)]
        queries.append(make(image, name))
        edits.append(name)
        gts.append(r)
    for image in others:
        queries.append(make(image, QUERY_EDITS[int(rng.integers(len(QUERY_EDITS)))]))
        edits.append("distractor")
        gts.append(-1)
    return Dataset("scenes", [_jpeg(im) for im in originals], ["scene"] * n, queries, edits,
                   ["scene"] * len(queries), np.asarray(gts), boxes)


# ------------------------------------------------------------------------------------------
# Baselines: each returns (ids (nq, k), scores (nq, k)), best first
# ------------------------------------------------------------------------------------------


def _topk(sim: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    k = min(k, sim.shape[1])
    idx = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    part = np.take_along_axis(sim, idx, axis=1)
    order = np.argsort(-part, axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1), np.take_along_axis(part, order, axis=1)


def _bits_to_pm1(bits: np.ndarray) -> np.ndarray:
    return bits.astype(np.float32) * 2 - 1


def run_pdq(ds: Dataset):
    import pdqhash

    corpus = np.stack([_bits_to_pm1(pdqhash.compute(np.asarray(ds.corpus_image(i).convert("RGB")))[0])
                       for i in range(len(ds.corpus_jpeg))])
    sims = []
    for q in ds.queries:
        variants = np.stack([_bits_to_pm1(h) for h in pdqhash.compute_dihedral(np.asarray(q.convert("RGB")))[0]])
        sims.append(((variants @ corpus.T).max(axis=0) + 256) / 512)  # 1 - hamming / 256
    return _topk(np.stack(sims), TOP_K)


def run_phash(ds: Dataset):
    import imagehash

    def h(im):
        return _bits_to_pm1(imagehash.phash(im).hash.reshape(-1))

    corpus = np.stack([h(ds.corpus_image(i)) for i in range(len(ds.corpus_jpeg))])
    return _topk((np.stack([h(q) for q in ds.queries]) @ corpus.T + 64) / 128, TOP_K)


def _thumb(im: Image.Image) -> np.ndarray:
    t = np.asarray(im.convert("L").resize((32, 32), Image.BILINEAR), dtype=np.float32).reshape(-1)
    t = t - t.mean()
    return t / (np.linalg.norm(t) + 1e-6)


def run_thumb(ds: Dataset):
    corpus = np.stack([_thumb(ds.corpus_image(i)) for i in range(len(ds.corpus_jpeg))])
    return _topk(np.stack([_thumb(q) for q in ds.queries]) @ corpus.T, TOP_K)


# ------------------------------------------------------------------------------------------
# The embedder as search scores it
# ------------------------------------------------------------------------------------------


def corpus_vectors(ds: Dataset, emb, batch: int = 128) -> np.ndarray:
    out = []
    for i in range(0, ds.corpus_size, batch):
        out.append(emb.embed(np.stack([emb.preprocess(ds.corpus_image(j))
                                       for j in range(i, min(i + batch, ds.corpus_size))])))
    return np.concatenate(out).astype(np.float16).astype(np.float32)  # stored as float16


def query_candidates(query: Image.Image, emb, corpus: np.ndarray, regions: bool) -> tuple[list[Candidate], list]:
    """One query: search's merged candidates (best region per corpus image), best similarity
    first, and the query's region boxes (``Candidate.region`` indexes them)."""
    vecs, boxes = emb.embed_regions(query) if regions else (emb.embed_images([query]), [(0, 0, *query.size)])
    sims = vecs @ corpus.T
    ids, scores = _topk(sims, CANDIDATES)
    # as search merges regions; the exact score is the best region's (brute force here)
    found = merge_regions(np.zeros(len(vecs), int), 1, scores, ids)[0]
    merged = [Candidate(i, best, float(sims[:, i].max()), int(sims[:, i].argmax()), region_rank=rank,
                        score_whole=float(sims[0, i]))
              for i, (best, rank) in found.items()]
    return sorted(merged, key=lambda c: (-c.score_exact, c.id)), boxes


def candidates(ds: Dataset, emb, corpus: np.ndarray, regions: bool) -> tuple[list[list[Candidate]], list[list]]:
    """Per query: :func:`query_candidates`."""
    found = [query_candidates(q, emb, corpus, regions) for q in ds.queries]
    return [c for c, _ in found], [b for _, b in found]


def _ids_scores(ranked: list[list[Candidate]], key) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(ranked), TOP_K), -2, np.int64)  # -2: no candidate, never a reference
    scores = np.full((len(ranked), TOP_K), -np.inf)
    for qi, cands in enumerate(ranked):
        for j, c in enumerate(cands[:TOP_K]):
            ids[qi, j], scores[qi, j] = c.id, key(c)
    return ids, scores


_WORKER: dict = {}


def _verify_init(images: dict[int, bytes], method: str) -> None:
    """A verification worker: the JPEGs of the corpus images it will see, by corpus index."""
    import cv2

    from pipeline.verify import Verifier

    cv2.setNumThreads(1)
    _WORKER.update(corpus=images, verifier=Verifier(method=method), cache={})


def _verify_query(args) -> tuple[object, float, dict]:
    """One query (or its crop to a window) against the pool members not verified yet on
    ``channel``, as search's verification task does; CPU seconds per step (candidate features
    cached per worker, their cost counted once per image)."""
    key, query, pool, channel = args
    v, cache = _WORKER["verifier"], _WORKER["cache"]
    t0 = time.process_time()
    qf = v.features(query, query=True, channel=channel)
    query_s = time.process_time() - t0
    out = {}
    for c in pool:
        if (c, channel) not in cache:
            t0 = time.process_time()
            im = devset.flatten(Image.open(io.BytesIO(_WORKER["corpus"][c])))
            cache[c, channel] = (v.features(im, channel=channel), im.size, time.process_time() - t0)
        t0 = time.process_time()
        r = v.verify(qf, cache[c, channel][0])
        out[c] = ((r.inliers, r.matches, r.score, r.query_box, r.candidate_box, cache[c, channel][1]),
                  time.process_time() - t0, cache[c, channel][2])
    return key, query_s, out


def verifier_settings() -> str:
    """A short digest of the verifier's default settings: a pair's result on a channel depends
    only on its two images and these, so cached results are reused until they change. How many
    pairs are retried on the value channel or on a window is applied to cached results, so it is
    left out."""
    import hashlib
    import inspect

    from pipeline.verify import Verifier

    sig = inspect.signature(Verifier.__init__)
    sig = sig.replace(parameters=[p for n, p in sig.parameters.items() if not n.startswith(("colour_retr", "window_retr"))])
    return hashlib.sha256(str(sig).encode()).hexdigest()[:10]


def verify_pools(ds: Dataset, cands: list[list[Candidate]], boxes: list[list], method: str, workers: int,
                 cache_file: Path | None):
    """Verify each query's search pool (pipeline.search.verification_pool) in place, as
    ``Verifier.verify_many`` does: luma first, then the first ``colour_retries`` failures again on
    the value channel, then the first ``window_retries`` that still fail on the query cropped to
    the window that found them (``boxes``: each query's region boxes). Results are cached on disk
    per pair and pass (a window's keyed by its box too): a changed pool verifies only its new
    members."""
    from pipeline.verify import Verifier, value_thumbnail

    verifier = Verifier(method=method)
    retries, min_corr = verifier.colour_retries, verifier.colour_retry_min_corr
    pools = [verification_pool(c, VERIFY_TOP) for c in cands]
    cached = {"pairs": {}, "query_s": {}, "candidate_s": {}}
    if cache_file and cache_file.exists():
        cached = pickle.loads(cache_file.read_bytes())
    for key in ("value_pairs", "value_query_s", "value_candidate_s", "window_pairs", "window_query_s"):
        cached.setdefault(key, {})

    def run(todo: list, channel: str, prefix: str) -> None:
        """``todo``: (key, query image, corpus ids); results under ``prefix`` + pairs/query_s."""
        todo = [t for t in todo if t[2]]
        if not todo:
            return
        images = {c: ds.corpus_bytes(c) for _, _, pool in todo for c in pool}
        with ProcessPoolExecutor(workers, initializer=_verify_init, initargs=(images, method)) as ex:
            for key, query_s, out in ex.map(_verify_query, [t + (channel,) for t in todo], chunksize=4):
                cached[prefix + "query_s"][key] = query_s
                for c, (result, match_s, features_s) in out.items():
                    cached[prefix + "pairs"][(key, c)] = (result, match_s)
                    cached[("value_" if channel == "value" else "") + "candidate_s"].setdefault(c, features_s)
        if cache_file:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            cache_file.write_bytes(pickle.dumps(cached))

    run([(qi, ds.queries[qi], [c.id for c in p if (qi, c.id) not in cached["pairs"]]) for qi, p in enumerate(pools)],
        "luma", "")
    thumbs: dict = {}

    def thumb(key):  # value thumbnails of queries ("q", i) and corpus images ("c", i)
        if key not in thumbs:
            kind, i = key
            im = ds.queries[i] if kind == "q" else devset.flatten(ds.corpus_image(i))
            thumbs[key] = value_thumbnail(im)
        return thumbs[key]

    def retried_of(qi: int, pool: list[Candidate]) -> list[int]:  # as Verifier.verify_many picks them
        corr = {c.id: float(thumb(("q", qi)) @ thumb(("c", c.id))) for c in pool if not cached["pairs"][(qi, c.id)][0][2]}
        return sorted((c for c, r in corr.items() if r >= min_corr), key=lambda c: -corr[c])[:retries]

    retried = [retried_of(qi, p) if retries else [] for qi, p in enumerate(pools)]
    run([(qi, ds.queries[qi], [c for c in r if (qi, c) not in cached["value_pairs"]]) for qi, r in enumerate(retried)],
        "value", "value_")

    def after_colour(qi: int, c: int) -> tuple:
        result = cached["pairs"][(qi, c)][0]
        return cached["value_pairs"][(qi, c)][0] if c in retried[qi] and cached["value_pairs"][(qi, c)][0][2] else result

    whole = [(0, 0, *q.size) for q in ds.queries]
    windowed = [[(c.id, tuple(boxes[qi][c.region])) for c in p
                 if not after_colour(qi, c.id)[2] and tuple(boxes[qi][c.region]) != whole[qi]][:verifier.window_retries]
                for qi, p in enumerate(pools)]
    todo = {}
    for qi, found in enumerate(windowed):
        for c, box in found:
            if ((qi, box), c) not in cached["window_pairs"]:
                todo.setdefault((qi, box), []).append(c)
    run([((qi, box), ds.queries[qi].crop(box), ids) for (qi, box), ids in todo.items()], "luma", "window_")
    qf, mt, sizes, per_query = [], [], [], []
    cf = np.mean(list(cached["candidate_s"].values()))
    cf_value = np.mean(list(cached["value_candidate_s"].values())) if cached["value_candidate_s"] else 0.0
    rescued = {"value": 0, "window": 0}
    for qi, pool in enumerate(pools):
        matched, window_of = [], dict(windowed[qi])
        for c in pool:
            result, match_s = cached["pairs"][(qi, c.id)]
            if c.id in retried[qi]:
                again, value_s = cached["value_pairs"][(qi, c.id)]
                match_s += value_s + cf_value
                if again[2]:
                    result, rescued["value"] = again, rescued["value"] + 1
            if c.id in window_of:
                again, window_s = cached["window_pairs"][((qi, window_of[c.id]), c.id)]
                match_s += window_s
                if again[2]:
                    result, rescued["window"] = _shifted(again, window_of[c.id]), rescued["window"] + 1
            inliers, matches, score, qbox, cbox, size = result
            c.inliers, c.matches, c.verify_score, c.query_box, c.match_box = inliers, matches, score, qbox, cbox
            c.candidate_size = size
            matched.append(match_s)
        if pool:
            qf.append(cached["query_s"][qi] + (cached["value_query_s"][qi] if retried[qi] else 0.0)
                      + sum(cached["window_query_s"][(qi, box)] for box in set(window_of.values())))
            per_query.append(qf[-1] + cf * len(pool) + sum(matched))
        mt += matched
        sizes.append(len(pool))
    per_query = np.asarray(per_query)
    return pools, {
        "method": method, "queries": len(pools), "pairs": len(mt), "pool_mean": round(float(np.mean(sizes)), 1),
        "colour_retries": retries, "pairs_retried": sum(len(r) for r in retried), "pairs_rescued": rescued["value"],
        "window_retries": verifier.window_retries, "pairs_retried_on_windows": sum(len(w) for w in windowed),
        "pairs_rescued_on_windows": rescued["window"],
        "query_features_cpu_ms": round(1000 * float(np.mean(qf)), 1),
        "candidate_features_cpu_ms": round(1000 * float(cf), 1),
        "match_cpu_ms": round(1000 * float(np.mean(mt)), 1),
        "cpu_s_per_query_mean": round(float(per_query.mean()), 3),
        "cpu_s_per_query_p95": round(float(np.percentile(per_query, 95)), 3),
    }


def _shifted(result: tuple, box: tuple) -> tuple:
    """A cached window result with its query box in whole-query pixels."""
    inliers, matches, score, (x0, y0, x1, y1), cbox, size = result
    return inliers, matches, score, (x0 + box[0], y0 + box[1], x1 + box[0], y1 + box[1]), cbox, size


def final_ranking(ds: Dataset, cands, boxes, model: scoring.ScoreModel) -> list[list[Candidate]]:
    return [scoring.rank(list(c), model, q.size, b) for c, q, b in zip(cands, ds.queries, boxes)]


def fit_rows(ds: Dataset, cands, boxes, depth: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Training rows of the score model: every query's best ``depth`` candidates and its
    verified pool, labelled 1 for the reference."""
    xs, ys = [], []
    for qi, (c, q, b) in enumerate(zip(cands, ds.queries, boxes)):
        x = scoring.features(c, q.size, b)
        keep = np.array([j < depth or cc.verify_score is not None for j, cc in enumerate(c)], bool)
        xs.append(x[keep])
        ys.append(np.array([cc.id == ds.query_gt[qi] for cc in c], float)[keep])
    return np.concatenate(xs), np.concatenate(ys)


# ------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------


def micro_ap(ids: np.ndarray, scores: np.ndarray, gt: np.ndarray, seed: int = 0) -> float:
    """Area under the precision-recall curve of all predictions (DISC21 micro-AP)."""
    correct = (ids == gt[:, None]).reshape(-1)
    s = scores.reshape(-1).astype(np.float64)
    perm = np.random.default_rng(seed).permutation(len(s))  # random tie-break (hashes tie a lot)
    order = perm[np.argsort(-s[perm], kind="stable")]
    tp = np.cumsum(correct[order])
    precision = tp / np.arange(1, len(order) + 1)
    n_pos = int((gt >= 0).sum())
    return float((precision * correct[order]).sum() / max(n_pos, 1))


def evaluate(ids: np.ndarray, scores: np.ndarray, ds: Dataset, per_category: bool = True) -> dict:
    gt, edits, cats = ds.query_gt, np.asarray(ds.query_edit), np.asarray(ds.query_category)
    top1 = ids[:, 0] == gt
    pos = gt >= 0
    out = {"micro_ap": round(micro_ap(ids, scores, gt), 4), "recall@1": round(float(top1[pos].mean()), 4)}
    for name in QUERY_EDITS:
        if (edits == name).any():
            out[f"r@1 {name}"] = round(float(top1[edits == name].mean()), 3)
    finite = np.where(np.isfinite(scores[~pos, 0]), scores[~pos, 0], -1e9)
    thr = float(np.percentile(finite, 99)) if len(finite) else float("inf")
    hit = ((ids == gt[:, None]) & (scores > thr)).any(axis=1)
    out["thr@99%distr"] = round(thr, 4)
    out["recall@thr"] = round(float(hit[pos].mean()), 4)
    if per_category:
        for cat in devset.CATEGORIES:
            m = cats == cat
            if (m & pos).any():
                out[f"{cat}: micro_ap"] = round(micro_ap(ids[m], scores[m], gt[m]), 3)
                out[f"{cat}: r@1"] = round(float(top1[m & pos].mean()), 3)
    return out


def generation_recall(ds: Dataset, pools, cands) -> dict:
    """Per edit: the reference among the candidates at all, in the verification pool, and
    verified when it is there (verification's own accuracy, apart from candidate generation)."""
    out = {}
    edits = np.asarray(ds.query_edit)
    for name in QUERY_EDITS:
        idx = np.nonzero(edits == name)[0]
        if not len(idx):
            continue
        found = [any(c.id == ds.query_gt[q] for c in cands[q]) for q in idx]
        in_pool = [next((c for c in pools[q] if c.id == ds.query_gt[q]), None) for q in idx]
        verified = [c is not None and bool(c.verify_score) for c in in_pool]
        n_pool = sum(c is not None for c in in_pool)
        out[name] = {"candidates": round(float(np.mean(found)), 3), "pool": round(n_pool / len(idx), 3),
                     "verified_given_pool": round(sum(verified) / max(n_pool, 1), 3)}
    distractor = np.nonzero(edits == "distractor")[0]
    out["distractor: any pool member verified"] = round(float(np.mean([any(bool(c.verify_score) for c in pools[q])
                                                                       for q in distractor])), 3)
    return out


# ------------------------------------------------------------------------------------------
# Runs
# ------------------------------------------------------------------------------------------


def build_embedder(args):
    from pipeline.embedders import build_embedder as build

    cfg = EmbedderConfig(name=args.embedder, checkpoint=args.checkpoint, model=args.model,
                         pretrained=args.pretrained, device="cpu", query_object_regions=args.object_regions)
    return build(cfg)


def run_split(args, items, model: scoring.ScoreModel | None) -> dict:
    ds = build_split(items, args.split, args.edits_per_ref, args.distractor_edits, args.limit)
    if args.corpus_distractors:
        ds.extra = CorpusDistractors(items, args.corpus_distractors)
    return run_dataset(args, ds, model)


def run_dataset(args, ds: Dataset, model: scoring.ScoreModel | None) -> dict:
    n_pos = int((ds.query_gt >= 0).sum())
    counts = {c: ds.corpus_category.count(c) for c in sorted(set(ds.corpus_category))}
    extra = f" + {len(ds.extra)} corpus distractors" if ds.extra else ""
    print(f"{ds.split}: corpus {len(ds.corpus_jpeg)} {counts}{extra}, {n_pos} copy queries, "
          f"{len(ds.queries) - n_pos} distractor queries", flush=True)
    results: dict[str, dict] = {}

    def record(name, ids_scores):
        results[name] = evaluate(*ids_scores, ds)
        print(name, json.dumps(results[name]), flush=True)

    if not args.no_hashes and ds.split != "scenes" and not ds.extra:  # brute-force hashes: the split alone
        record("PDQ (8 dihedral)", run_pdq(ds))
        record("pHash", run_phash(ds))
        record("thumb32 cosine", run_thumb(ds))
    emb = build_embedder(args)
    corpus = corpus_vectors(ds, emb)
    glob, _ = candidates(ds, emb, corpus, regions=False)
    record(f"{emb.name}: global", _ids_scores(glob, lambda c: c.score_exact))
    cands, boxes = candidates(ds, emb, corpus, regions=True)
    record(f"{emb.name}: + regions", _ids_scores(cands, lambda c: c.score_exact))
    out = {"split": ds.split, "corpus": ds.corpus_size, "corpus_by_category": counts,
           "corpus_distractors": len(ds.extra) if ds.extra else 0, "copy_queries": n_pos,
           "distractor_queries": len(ds.queries) - n_pos, "identity": emb.identity(), "results": results}
    if args.no_verify:
        out["generation_recall"] = generation_recall(ds, [verification_pool(c, VERIFY_TOP) for c in cands], cands)
        out["fit_rows"] = None
        return out
    name = f"scenes{len(ds.corpus_jpeg)}" if ds.split == "scenes" else \
        f"{ds.split}-e{args.edits_per_ref}.{args.distractor_edits}-l{args.limit}" + \
        (f"-d{len(ds.extra)}" if ds.extra else "")
    cache = DevsetCache(Path(args.cache)).verified_pairs(name, args.method, verifier_settings())
    pools, vstats = verify_pools(ds, cands, boxes, args.method, args.workers, cache)
    by_evidence = [sorted(c, key=lambda c: (-bool(c.verify_score), -(c.verify_score or 0) - c.score_exact)) for c in cands]
    record(f"{emb.name}: + verification", _ids_scores(by_evidence, lambda c: (c.verify_score or 0) + c.score_exact))
    out["verification"] = vstats
    out["generation_recall"] = generation_recall(ds, pools, cands)
    if model is not None:
        ranked = final_ranking(ds, cands, boxes, model)
        record(f"{emb.name}: final score", _ids_scores(ranked, lambda c: c.score))
        out["score_model"] = model.identity()
    out["fit_rows"] = fit_rows(ds, cands, boxes)
    return out


def table(results: dict[str, dict], keys: list[str]) -> str:
    lines = ["| method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(str(r.get(k, "")) for k in keys) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", choices=devset.SPLITS, default="validation")
    ap.add_argument("--fit", action="store_true", help="fit the final-score model on the fit split and save it")
    ap.add_argument("--score-model", help="score model file to evaluate (default: the shipped one for the embedder)")
    ap.add_argument("--out", help="where --fit writes the model (default: the shipped file for the default embedder)")
    ap.add_argument("--embedder", default="default", choices=("default", "sscd", "open_clip"))
    ap.add_argument("--checkpoint", help="weights file of the embedder (SSCD TorchScript, open_clip checkpoint)")
    ap.add_argument("--model", help="open_clip architecture")
    ap.add_argument("--pretrained", help="open_clip pretrained tag")
    ap.add_argument("--method", default=None, help="verification keypoints (default: pipeline.verify.DEFAULT_METHOD)")
    ap.add_argument("--scenes", type=int, default=300,
                    help="with --fit: procedural scenes (and their copies) added to the fit split's rows")
    ap.add_argument("--edits-per-ref", type=int, default=3)
    ap.add_argument("--distractor-edits", type=int, default=2)
    ap.add_argument("--limit", type=int, default=0, help="use at most this many images of the split (quick runs)")
    ap.add_argument("--quick", action="store_true", help="--limit 150 --no-hashes")
    ap.add_argument("--no-hashes", action="store_true", help="skip PDQ, pHash and the thumbnail")
    ap.add_argument("--corpus-distractors", type=int, default=0, metavar="N",
                    help="add N images made from the fit split's (crops, collages, pastes; bench/corpus_distractors.py) "
                         "to the corpus: detection against a larger corpus (not with --fit)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-verify", action="store_true", help="descriptor only: global and regions")
    ap.add_argument("--object-regions", type=int, default=EmbedderConfig().query_object_regions,
                    help="object-centred query windows besides the grid (embedder.query_object_regions)")
    ap.add_argument("--cache", default="/tmp/replica-devset", help="package cache and verification results")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--speed", action="store_true", help="corpus-side throughput on one core, then exit")
    ap.add_argument("--verifiers", action="store_true", help="compare keypoint methods on validation pairs, then exit")
    args = ap.parse_args()
    from pipeline.verify import DEFAULT_METHOD

    args.method = args.method or DEFAULT_METHOD
    if args.quick:
        args.limit, args.no_hashes = args.limit or 150, True
    items = devset.load(args.cache, MANIFEST)
    if args.speed:
        print(json.dumps(speed(items), indent=2))
        return
    if args.verifiers:
        print(json.dumps(compare_verifiers(items, args), indent=2))
        return
    if args.fit and args.corpus_distractors:
        ap.error("--corpus-distractors are made from the fit split's images: measure validation or test with them")
    if args.fit:
        args.split = "fit"
        out = run_split(args, items, None)
        x, y = out.pop("fit_rows")
        queries = out["copy_queries"] + out["distractor_queries"]
        if args.scenes:
            scenes = run_dataset(args, scene_split(args.scenes), None)
            xs, ys = scenes.pop("fit_rows")
            x, y = np.concatenate([x, xs]), np.concatenate([y, ys])
            queries += scenes["copy_queries"] + scenes["distractor_queries"]
        w, b, mean, std = scoring.fit(x, y)
        emb_identity = out["identity"]
        model = scoring.ScoreModel(weights=w.round(6).tolist(), bias=round(b, 6), mean=mean.round(6).tolist(),
                                   std=std.round(6).tolist(), fitted_for=scoring.fitted_for(emb_identity, args.method),
                                   meta={"fitted": True, "data": "development benchmark, fit split (pipeline.devset)"
                                         + (f", {args.scenes} procedural scenes" if args.scenes else ""),
                                         "rows": int(len(y)), "positives": int(y.sum()), "queries": queries})
        path = args.out or str(Path(scoring.__file__).parent / "embedders" / "data" / f"score-{emb_identity['model']}.json")
        Path(path).write_bytes(model.to_bytes())
        print(f"wrote {path} sha256:{model.sha256}")
        print(json.dumps(dict(zip(scoring.FEATURES, model.weights)), indent=1))
        return
    emb_identity = build_embedder(args).identity()
    model = (scoring.load_model(args.score_model) if args.score_model
             else scoring.shipped_model(emb_identity, args.method))
    out = run_split(args, items, None if args.no_verify else model)
    out.pop("fit_rows")
    keys = ["micro_ap", "recall@1", *[f"r@1 {e}" for e in QUERY_EDITS], "thr@99%distr", "recall@thr"]
    print()
    print(table(out["results"], keys))
    print()
    print(table(out["results"], [f"{c}: {m}" for c in devset.CATEGORIES for m in ("micro_ap", "r@1")]))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **out}, indent=2))
    print("\ncandidate generation vs verification:", json.dumps(out["generation_recall"], indent=1))
    print("verification:", out.get("verification"))


# ------------------------------------------------------------------------------------------
# Speed and keypoint methods
# ------------------------------------------------------------------------------------------


def speed(items, n: int = 2048, batch: int = 64) -> dict:
    """Corpus side on one core: JPEG decode (draft) + preprocess, embed; and the query side."""
    import cv2

    from pipeline.embedders.default import DefaultDescriptor

    cv2.setNumThreads(1)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    sample = [it for it in items if it.split == "validation"][:256]
    blobs = [_jpeg(it.image(), quality=85) for it in sample]
    emb = DefaultDescriptor()
    emb.embed(np.stack([emb.preprocess(Image.open(io.BytesIO(blobs[0])))] * batch))  # warm up
    t_pre = t_emb = 0.0
    done = 0
    while done < n:
        t0 = time.process_time()
        arr = np.stack([emb.preprocess(Image.open(io.BytesIO(blobs[(done + j) % len(blobs)]))) for j in range(batch)])
        t1 = time.process_time()
        emb.embed(arr)
        t_pre += t1 - t0
        t_emb += time.process_time() - t1
        done += batch
    queries = [devset.flatten(it.image()) for it in sample[:30]]
    t0 = time.process_time()
    n_regions = [len(emb.embed_regions(q)[1]) for q in queries]
    t_regions = time.process_time() - t0
    return {
        "images": done, "jpeg_bytes_mean": int(np.mean([len(b) for b in blobs])),
        "decode+preprocess_cpu_ms_per_image": round(1000 * t_pre / done, 3),
        "embed_cpu_ms_per_image": round(1000 * t_emb / done, 3),
        "images_per_cpu_second": round(done / (t_pre + t_emb), 1),
        "query_regions_mean": round(float(np.mean(n_regions)), 1),
        "query_side_cpu_ms_per_query": round(1000 * t_regions / len(queries), 1),
    }


def compare_verifiers(items, args, n_pairs: int = 150) -> dict:
    """Each keypoint method on the same validation pairs: copies (query, its reference) by edit,
    and unrelated pairs (a distractor query and its most similar corpus image): how many are
    verified, and CPU per pair (query features counted once per query, as search does)."""
    import cv2

    from pipeline.embedders.default import DefaultDescriptor
    from pipeline.verify import METHODS, Verifier

    cv2.setNumThreads(1)  # one thread, as each verification task runs
    ds = build_split(items, "validation", args.edits_per_ref, 1, args.limit)
    emb = DefaultDescriptor()
    corpus = corpus_vectors(ds, emb)
    rng = np.random.default_rng(0)
    pos = [int(q) for q in rng.permutation(np.nonzero(ds.query_gt >= 0)[0])[:n_pairs]]
    neg_q = [int(q) for q in rng.permutation(np.nonzero(ds.query_gt < 0)[0])[:n_pairs]]
    neg = [(q, int(np.argmax(emb.embed_images([ds.queries[q]]) @ corpus.T))) for q in neg_q]
    pairs = [(q, int(ds.query_gt[q])) for q in pos] + neg
    images = {c: devset.flatten(ds.corpus_image(c)) for _, c in pairs}
    out = {}
    for method in METHODS:
        v = Verifier(method=method)
        verified, cpu, qcpu = [], [], []
        for q, c in pairs:
            t0 = time.process_time()
            qf = v.features(ds.queries[q], query=True)
            t1 = time.process_time()
            r = v.verify(qf, v.features(images[c]))
            cpu.append(time.process_time() - t1)
            qcpu.append(t1 - t0)
            verified.append(r.verified)
        verified = np.array(verified)
        edits = np.array([ds.query_edit[q] for q in pos])
        out[method] = {
            "copies_verified": round(float(verified[:len(pos)].mean()), 3),
            "unrelated_verified": round(float(verified[len(pos):].mean()), 3),
            "per_edit": {e: round(float(verified[:len(pos)][edits == e].mean()), 2) for e in QUERY_EDITS if (edits == e).any()},
            "per_category": {c: round(float(verified[:len(pos)][np.array([ds.query_category[q] for q in pos]) == c].mean()), 2)
                             for c in devset.CATEGORIES},
            "pair_cpu_ms": round(1000 * float(np.mean(cpu)), 1),
            "query_features_cpu_ms": round(1000 * float(np.mean(qcpu)), 1),
            "cpu_s_per_query_at_pool_30": round(float(np.mean(qcpu) + 30 * np.mean(cpu)), 2),
        }
        print(method, json.dumps(out[method]), flush=True)
    return {"pairs": {"copies": len(pos), "unrelated": len(neg)}, "methods": out}


if __name__ == "__main__":
    main()
