"""Copy-detection benchmark of the weight-free `default` descriptor against industry hashes.

    python bench/copy_detection.py                  # quality: all methods side by side
    python bench/copy_detection.py --speed          # corpus-side throughput on one CPU core
    python bench/copy_detection.py --boxes          # verification's box accuracy on pasted objects
    python bench/copy_detection.py --quick          # small run (a few minutes) for a smoke check

Data (all offline, deterministic): references are photo tiles (scikit-image, matplotlib and
scikit-learn sample photographs cut into distinct 128 px squares, part 0 of 3; see
:func:`pipeline.synthetic_images.photo_tiles`) and procedural scenes; the corpus holds them plus
procedural "other" images. Queries are edited copies of references, one edit type each
(:data:`pipeline.synthetic_images.EDITS`, plus "paste": an object of a reference pasted into an
unrelated scene), and distractor queries: edited images with no reference in the corpus
(photo tiles of part 1, other procedural seeds). The descriptor's whitening was fitted on
part 2 and on seeds >= 1,000,000: no benchmark pixel was seen by the fit.

Metrics (DISC21 style): micro-AP over all (query, candidate, score) predictions (top 10 per
query, distractors included), recall@1 per edit type, and recall at the score threshold
that 99% of distractor queries' top-1 scores stay below.

Methods: PDQ (pdqhash; the query is hashed in its 8 dihedral variants, min distance), pHash
(imagehash), 32x32 grey thumbnail cosine, and the default descriptor: global only, with the
query-side multi-region search (max over regions per corpus key), and with local-feature
verification (pipeline.verify) of the pool ``pipeline.search`` verifies: the best 10, then up
to 20 images that head (top 3) some region's own list; verified pairs get the verification
score added, so they rank first.
"""
from __future__ import annotations

import os
import sys

if "--speed" in sys.argv:  # one core, one thread: set before numpy/cv2 load their pools
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        os.environ[var] = "1"

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pipeline import synthetic_images as synthetic  # noqa: E402
from pipeline.embedders.default import DefaultDescriptor  # noqa: E402
from pipeline.embedders.default_fit import PHOTO_PARTS, PHOTO_TILE  # noqa: E402

TOP_K = 10
CORPUS_PART, DISTRACTOR_PART = 0, 1
REF_SEED0, OTHER_SEED0, DISTRACTOR_SEED0, SCENE_SEED0 = 0, 100_000, 500_000, 700_000


# ------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------


@dataclass
class Dataset:
    corpus_jpeg: list[bytes]  # corpus images as stored (JPEG q90)
    corpus_names: list[str]
    queries: list[Image.Image]
    query_edit: list[str]  # edit name, "distractor" for queries without a reference
    query_gt: np.ndarray  # corpus index of the reference, -1 for distractors
    paste_box: dict[int, tuple[int, int, int, int]] = field(default_factory=dict)

    def corpus_image(self, i: int) -> Image.Image:
        return Image.open(io.BytesIO(self.corpus_jpeg[i]))


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _scene(seed: int, rng: np.random.Generator) -> Image.Image:
    return synthetic.scene(seed, (int(rng.integers(280, 440)), int(rng.integers(220, 360))))


def build_dataset(n_scene_refs: int, n_other: int, per_edit: int, n_distractors: int, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    photo_refs = synthetic.photo_tiles(PHOTO_TILE, PHOTO_PARTS, CORPUS_PART)
    photo_distractors = synthetic.photo_tiles(PHOTO_TILE, PHOTO_PARTS, DISTRACTOR_PART)
    refs = [(n, im) for n, im in photo_refs]
    refs += [(f"scene:{s}", _scene(s, rng)) for s in range(REF_SEED0, REF_SEED0 + n_scene_refs)]
    others = [(f"scene:{s}", _scene(s, rng)) for s in range(OTHER_SEED0, OTHER_SEED0 + n_other)]
    corpus = refs + others
    corpus_jpeg = [_jpeg(im) for _, im in corpus]
    ref_images = [Image.open(io.BytesIO(b)).convert("RGB") for b in corpus_jpeg[: len(refs)]]

    queries, edits, gts, boxes = [], [], [], {}
    n_photo = len(photo_refs)
    for name in [*synthetic.EDITS, "paste"]:
        # Half the queries of each edit come from photos (when there are photos), half from scenes.
        pick_photo = rng.choice(n_photo, size=min(n_photo, per_edit // 2), replace=False) if n_photo else []
        pick_scene = n_photo + rng.choice(len(refs) - n_photo, size=per_edit - len(pick_photo), replace=False)
        for r in [*pick_photo, *pick_scene]:
            r = int(r)
            if name == "paste":
                if photo_distractors and rng.random() < 0.5:
                    dst = photo_distractors[int(rng.integers(len(photo_distractors)))][1].resize((384, 384), Image.BICUBIC)
                else:
                    dst = synthetic.scene(SCENE_SEED0 + len(queries), (448, 336))
                q, box = synthetic.paste_object(ref_images[r], dst, rng)
                boxes[len(queries)] = box
            else:
                q = synthetic.EDITS[name](ref_images[r], rng)
            queries.append(q)
            edits.append(name)
            gts.append(r)
    # Distractors: edited images whose source is not in the corpus.
    names = list(synthetic.EDITS)
    for k in range(n_distractors):
        if photo_distractors and k % 2 == 0:
            src = photo_distractors[(k // 2) % len(photo_distractors)][1]
        else:
            src = _scene(DISTRACTOR_SEED0 + k, rng)
        queries.append(synthetic.EDITS[names[int(rng.integers(len(names)))]](src, rng))
        edits.append("distractor")
        gts.append(-1)
    return Dataset(corpus_jpeg, [n for n, _ in corpus], queries, edits, np.asarray(gts), boxes)


# ------------------------------------------------------------------------------------------
# Methods: each returns (ids (nq, k), scores (nq, k)), best first
# ------------------------------------------------------------------------------------------


def _topk(sim: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    k = min(k, sim.shape[1])
    idx = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    part = np.take_along_axis(sim, idx, axis=1)
    order = np.argsort(-part, axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1), np.take_along_axis(part, order, axis=1)


def _bits_to_pm1(bits: np.ndarray) -> np.ndarray:
    return bits.astype(np.float32) * 2 - 1


def run_pdq(ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    import pdqhash

    corpus = np.stack([_bits_to_pm1(pdqhash.compute(np.asarray(ds.corpus_image(i).convert("RGB")))[0])
                       for i in range(len(ds.corpus_jpeg))])
    sims = []
    for q in ds.queries:
        variants = np.stack([_bits_to_pm1(h) for h in pdqhash.compute_dihedral(np.asarray(q.convert("RGB")))[0]])
        # dot of +-1 vectors = 256 - 2 * hamming: score = 1 - hamming / 256
        sims.append(((variants @ corpus.T).max(axis=0) + 256) / 512)
    return _topk(np.stack(sims), TOP_K)


def run_phash(ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    import imagehash

    def h(im):
        return _bits_to_pm1(imagehash.phash(im).hash.reshape(-1))

    corpus = np.stack([h(ds.corpus_image(i)) for i in range(len(ds.corpus_jpeg))])
    qs = np.stack([h(q) for q in ds.queries])
    return _topk((qs @ corpus.T + 64) / 128, TOP_K)


def _thumb(im: Image.Image) -> np.ndarray:
    t = np.asarray(im.convert("L").resize((32, 32), Image.BILINEAR), dtype=np.float32).reshape(-1)
    t = t - t.mean()
    return t / (np.linalg.norm(t) + 1e-6)


def run_thumb(ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    corpus = np.stack([_thumb(ds.corpus_image(i)) for i in range(len(ds.corpus_jpeg))])
    qs = np.stack([_thumb(q) for q in ds.queries])
    return _topk(qs @ corpus.T, TOP_K)


def corpus_vectors(ds: Dataset, emb: DefaultDescriptor, batch: int = 256) -> np.ndarray:
    out = []
    for i in range(0, len(ds.corpus_jpeg), batch):
        arr = np.stack([emb.preprocess(ds.corpus_image(j)) for j in range(i, min(i + batch, len(ds.corpus_jpeg)))])
        out.append(emb.embed(arr))
    # Stored as float16 by the embed stage: score what the index will see.
    return np.concatenate(out).astype(np.float16).astype(np.float32)


def run_global(ds: Dataset, emb: DefaultDescriptor, corpus: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    qs = emb.embed_images(ds.queries)
    return _topk(qs @ corpus.T, TOP_K)


def run_regions(ds: Dataset, emb: DefaultDescriptor, corpus: np.ndarray, k: int = TOP_K, heads: int = 3):
    """Every region of a query searched; a corpus image's score is its best over the regions.
    Also returns each query's verification pool, chosen the way ``pipeline.search`` does: the
    best ``k`` by score, then up to ``2k`` images in the first ``heads`` of some region's list
    (an object pasted into a new scene ranks high in its own region but may score low overall)."""
    sims, pools = [], []
    for q in ds.queries:
        vecs, _ = emb.embed_regions(q)
        s = vecs @ corpus.T
        best = s.max(axis=0)  # merge regions per corpus key: max
        sims.append(best)
        top = np.argsort(-best, kind="stable")[:k]
        head = np.argsort(-s, axis=1, kind="stable")[:, :heads]  # (regions, heads)
        rank = {}
        for r in range(head.shape[0]):
            for j, i in enumerate(head[r], 1):
                rank[int(i)] = min(rank.get(int(i), heads + 1), j)
        rest = sorted((i for i in rank if i not in set(top.tolist())), key=lambda i: (rank[i], -best[i]))[: 2 * k]
        pool = [int(i) for i in top] + rest
        pools.append((np.array(pool), best[pool]))
    ids, scores = _topk(np.stack(sims), k)
    return ids, scores, pools


_WORKER: dict = {}


def _verify_init(ds: Dataset) -> None:
    import cv2

    from pipeline.verify import Verifier

    cv2.setNumThreads(1)
    _WORKER.update(ds=ds, verifier=Verifier(), cache={})


def _verify_query(args: tuple[int, list[int]]) -> tuple[list[tuple[int, float]], dict]:
    """Verify one query against its candidates. CPU seconds are measured per step; candidate
    features are cached per worker (a corpus image is often a candidate of several queries),
    and the time to compute them is counted once per image, as in a search without a cache."""
    qi, cands = args
    ds, v, cache = _WORKER["ds"], _WORKER["verifier"], _WORKER["cache"]
    t = {"query_features": 0.0, "candidate_features": [], "match": []}
    t0 = time.process_time()
    qf = v.features(ds.queries[qi], query=True)
    t["query_features"] = time.process_time() - t0
    out = []
    for c in cands:
        if c not in cache:
            t0 = time.process_time()
            cache[c] = v.features(ds.corpus_image(c).convert("RGB"))
            t["candidate_features"].append(time.process_time() - t0)
        t0 = time.process_time()
        r = v.verify(qf, cache[c])
        t["match"].append(time.process_time() - t0)
        out.append((r.inliers, r.score))
    return out, t


def run_verified(ds: Dataset, pools: list[tuple[np.ndarray, np.ndarray]], workers: int, k: int = TOP_K):
    """Verify each query's pool; new score = descriptor score + verification score (0 when not
    verified, so every verified pair ranks above every unverified one), as ``pipeline.search``
    ranks. Returns the new top ``k``."""
    t0 = time.perf_counter()
    jobs = [(qi, [int(c) for c in pool]) for qi, (pool, _) in enumerate(pools)]
    with ProcessPoolExecutor(workers, initializer=_verify_init, initargs=(ds,)) as ex:
        results = list(ex.map(_verify_query, jobs, chunksize=8))
    ids = np.full((len(pools), k), -2, dtype=np.int64)  # -2: no candidate (never a reference)
    new = np.full((len(pools), k), -np.inf)
    qf_s, cf_s, m_s, sizes = [], [], [], []
    for qi, (res, t) in enumerate(results):
        qf_s.append(t["query_features"])
        cf_s += t["candidate_features"]
        m_s += t["match"]
        pool, base = pools[qi]
        sizes.append(len(pool))
        combined = base.astype(np.float64) + np.array([v for _, v in res])
        order = np.argsort(-combined, kind="stable")[:k]
        ids[qi, : len(order)], new[qi, : len(order)] = pool[order], combined[order]
    pair = np.mean(cf_s) + np.asarray(m_s)
    stats = {
        "queries": len(jobs),
        "pairs": len(m_s),
        "pool_mean": round(float(np.mean(sizes)), 1),
        "wall_s": round(time.perf_counter() - t0, 1),
        "query_features_cpu_ms": round(1000 * float(np.mean(qf_s)), 1),
        "candidate_features_cpu_ms": round(1000 * float(np.mean(cf_s)), 1),
        "match_ransac_box_cpu_ms": round(1000 * float(np.mean(m_s)), 1),
        "pair_cpu_ms_mean": round(1000 * float(pair.mean()), 1),
        "pair_cpu_ms_p99": round(1000 * float(np.percentile(pair, 99)), 1),
        "match_cpu_ms_max": round(1000 * float(np.max(m_s)), 1),
    }
    return ids, new, stats


# ------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------


def micro_ap(ids: np.ndarray, scores: np.ndarray, gt: np.ndarray, seed: int = 0) -> float:
    """Area under the precision-recall curve of all predictions (DISC21 micro-AP)."""
    nq, k = ids.shape
    correct = (ids == gt[:, None]).reshape(-1)
    s = scores.reshape(-1).astype(np.float64)
    # Random tie-break: discrete-score hashes get the expected value, not a lucky order.
    perm = np.random.default_rng(seed).permutation(len(s))
    order = perm[np.argsort(-s[perm], kind="stable")]
    tp = np.cumsum(correct[order])
    precision = tp / np.arange(1, len(order) + 1)
    n_pos = int((gt >= 0).sum())
    return float((precision * correct[order]).sum() / n_pos)


def evaluate(ids: np.ndarray, scores: np.ndarray, ds: Dataset) -> dict:
    gt = ds.query_gt
    edits = np.asarray(ds.query_edit)
    top1 = ids[:, 0] == gt
    out = {"micro_ap": round(micro_ap(ids, scores, gt), 4)}
    # The same over the geometric edits only (what hashes are known to miss), distractors kept.
    geo = np.isin(edits, ["crop", "rotate", "combo", "paste", "distractor"])
    out["micro_ap geometric"] = round(micro_ap(ids[geo], scores[geo], gt[geo]), 4)
    pos = gt >= 0
    out["recall@1"] = round(float(top1[pos].mean()), 4)
    for name in dict.fromkeys(ds.query_edit):
        if name != "distractor":
            out[f"r@1 {name}"] = round(float(top1[edits == name].mean()), 4)
    thr = float(np.percentile(scores[~pos, 0], 99))
    hit = ((ids == gt[:, None]) & (scores > thr)).any(axis=1)
    out["thr@99%distr"] = round(thr, 4)
    out["recall@thr"] = round(float(hit[pos].mean()), 4)
    return out


# ------------------------------------------------------------------------------------------
# Speed (corpus side, one core)
# ------------------------------------------------------------------------------------------


def speed(n: int = 2000, batch: int = 64) -> dict:
    import cv2

    cv2.setNumThreads(1)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    rng = np.random.default_rng(1)
    photos = synthetic.photo_tiles(PHOTO_TILE, PHOTO_PARTS, CORPUS_PART, out_short=None)
    blobs = []
    for i in range(256):
        if photos and i % 2 == 0:
            im = photos[(i // 2) % len(photos)][1].resize((400, 400), Image.BICUBIC)
        else:
            im = synthetic.scene(900_000 + i, (400, 300))
        blobs.append(_jpeg(im, quality=int(rng.integers(75, 96))))
    emb = DefaultDescriptor()
    emb.embed(np.stack([emb.preprocess(Image.open(io.BytesIO(blobs[0])))] * batch))  # warm up
    # CPU time of this (single-threaded, single-core) process: other work on the machine does
    # not inflate it; wall time is reported beside it.
    t_pre = t_emb = 0.0
    done = 0
    wall0 = time.perf_counter()
    while done < n:
        t0 = time.process_time()
        arr = np.stack([emb.preprocess(Image.open(io.BytesIO(blobs[(done + j) % len(blobs)]))) for j in range(batch)])
        t1 = time.process_time()
        emb.embed(arr)
        t2 = time.process_time()
        t_pre += t1 - t0
        t_emb += t2 - t1
        done += batch
    wall = time.perf_counter() - wall0
    w, h = Image.open(io.BytesIO(blobs[1])).size
    t0 = time.process_time()
    n_q = 20
    for i in range(n_q):
        emb.embed_regions(synthetic.scene(910_000 + i, (512, 384)))
    t_regions = time.process_time() - t0
    return {
        "images": done,
        "jpeg_example_size": f"{w}x{h}",
        "jpeg_bytes_mean": int(np.mean([len(b) for b in blobs])),
        "decode+preprocess_cpu_ms_per_image": round(1000 * t_pre / done, 3),
        "embed_cpu_ms_per_image": round(1000 * t_emb / done, 3),
        "images_per_cpu_second": round(done / (t_pre + t_emb), 1),
        "images_per_wall_second": round(done / wall, 1),
        "query_regions_per_query": len(emb.embed_regions(synthetic.scene(1, (512, 384)))[1]),
        "query_regions_cpu_ms_per_query_512x384": round(1000 * t_regions / n_q, 1),
    }


def box_accuracy(n: int = 100) -> dict:
    """Pasted objects verified against their reference: how well ``query_box`` finds the paste."""
    from pipeline.verify import Verifier

    def iou(a, b):
        x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
        inter = max(0, x1 - x0) * max(0, y1 - y0)
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    ds = build_dataset(320, 0, n, 0)
    out = {}
    for refine in (True, False):
        v, ious, verified = Verifier(refine_box=refine), [], 0
        for q in [i for i, e in enumerate(ds.query_edit) if e == "paste"]:
            r = v.verify(ds.queries[q], ds.corpus_image(int(ds.query_gt[q])).convert("RGB"))
            if r.verified:
                verified += 1
                ious.append(iou(r.query_box, ds.paste_box[q]))
        key = "agreement box" if refine else "inliers' box"
        out[key] = {"pairs": n, "verified": verified, "iou_p10": round(float(np.percentile(ious, 10)), 3),
                    "iou_median": round(float(np.median(ious)), 3),
                    "share_iou>=0.5": round(float(np.mean(np.array(ious) >= 0.5)), 3)}
    return out


# ------------------------------------------------------------------------------------------


def _table(results: dict[str, dict]) -> str:
    cols = list(next(iter(results.values())).keys())
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--speed", action="store_true", help="measure corpus-side throughput on one core and exit")
    ap.add_argument("--boxes", action="store_true", help="measure verification's box accuracy on pasted objects and exit")
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    ap.add_argument("--scene-refs", type=int, default=320)
    ap.add_argument("--others", type=int, default=1600, help="corpus images no query copies")
    ap.add_argument("--per-edit", type=int, default=100)
    ap.add_argument("--distractors", type=int, default=600)
    ap.add_argument("--region-heads", type=int, default=3,
                    help="verify also images among the first N of some region's list (as search does)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", help="write the results here as JSON")
    args = ap.parse_args()
    if args.speed:
        print(json.dumps(speed(), indent=2))
        return
    if args.boxes:
        print(json.dumps(box_accuracy(), indent=2))
        return
    if args.quick:
        args.scene_refs, args.others, args.per_edit, args.distractors = 60, 200, 20, 100
    t0 = time.perf_counter()
    ds = build_dataset(args.scene_refs, args.others, args.per_edit, args.distractors)
    n_pos = int((ds.query_gt >= 0).sum())
    print(f"corpus {len(ds.corpus_jpeg)} images, {n_pos} copy queries, "
          f"{len(ds.queries) - n_pos} distractor queries (built in {time.perf_counter() - t0:.0f}s)")
    results: dict[str, dict] = {}
    timings: dict[str, float] = {}

    def record(name, fn):
        t = time.perf_counter()
        ids, scores = fn()
        timings[name] = round(time.perf_counter() - t, 1)
        results[name] = evaluate(ids, scores, ds)
        print(name, results[name], f"({timings[name]}s)", flush=True)
        return ids, scores

    record("PDQ (8 dihedral)", lambda: run_pdq(ds))
    record("pHash", lambda: run_phash(ds))
    record("thumb32 cosine", lambda: run_thumb(ds))
    emb = DefaultDescriptor()
    corpus = corpus_vectors(ds, emb)
    record("default: global", lambda: run_global(ds, emb, corpus))
    pools: list = []

    def regions():
        ids, scores, p = run_regions(ds, emb, corpus, heads=args.region_heads)
        pools.extend(p)
        return ids, scores

    record("default: + regions", regions)
    vstats: dict = {}

    def verified():
        vi, vs, st = run_verified(ds, pools, args.workers)
        vstats.update(st)
        return vi, vs

    record("default: + regions + verify", verified)
    print()
    print(_table(results))
    print("\nverification:", vstats)
    print("seconds per method:", timings)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "verification": vstats, "seconds": timings,
                       "corpus": len(ds.corpus_jpeg), "copy_queries": n_pos,
                       "distractor_queries": len(ds.queries) - n_pos,
                       "identity": emb.identity()}, f, indent=2)


if __name__ == "__main__":
    main()
