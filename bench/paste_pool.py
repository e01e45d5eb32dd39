"""Where pasted objects are lost: the verification pool's size, and verification itself.

    python bench/paste_pool.py --split fit --edits-per-ref 22          # every fit reference pasted twice
    python bench/paste_pool.py --split validation --corpus-distractors 10000
    python bench/paste_pool.py --split validation --distractors        # + distractor queries' pools
    python bench/paste_pool.py --split fit --edits-per-ref 22 --candidate-sides 288 256 224 192 160
    python bench/paste_pool.py --split fit --edits-per-ref 22 --windows

For the pasted-object queries of a development-benchmark split (``copy_detection.build_split``),
search's candidates are formed as ``copy_detection`` forms them (exact similarities against the
split's corpus, regions merged), and the pool verification would see is cut at several sizes:
the share of pastes whose reference is in it. Then each paste is verified against its reference
as search verifies it (its whole pool; SIFT on the whole query), then the first ``--retries``
pool members that failed and were found by a window other than the whole image are tried again
on the query cropped to that window (``Verifier.retry_on_windows``, search's window retry; this
measurement chose it, and ``copy_detection`` measures it in full).
``--distractors`` does the same for the split's distractor queries: how many would have some
pool member newly verified by the retry. ``--candidate-sides`` verifies each paste's reference
(when it is in the largest pool measured) with candidates worked at other sizes, on the whole
query and then on the window that found it: what a cheaper candidate side, which pays for a
larger pool, costs in verification. ``--windows`` asks whether the pastes outside the pool are
lost for want of a window that frames them: the best overlap (IoU) of any query window with the
pasted box, and the reference's rank over the split's corpus when the pasted box itself, or the
box of its visible (alpha) part, is the window.
Figures in docs/BENCHMARKS.md ("Object windows for cut-outs").
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import copy_detection as cd  # noqa: E402  (first: it pins one thread per process before numpy loads)

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from corpus_distractors import CorpusDistractors  # noqa: E402

from pipeline import devset  # noqa: E402
from pipeline.layout.devset import MANIFEST  # noqa: E402
from pipeline.search import pool_size, verification_pool  # noqa: E402

POOL_SIZES = (30, 36, 42, 48, 60)


class PasteCheck:
    """One split's corpus, its embedder, and a verifier whose candidate features are cached."""

    def __init__(self, ds: cd.Dataset, args):
        import cv2

        from pipeline.verify import Verifier

        cv2.setNumThreads(1)
        self.ds, self.emb = ds, cd.build_embedder(args)
        t = time.time()
        self.corpus = cd.corpus_vectors(ds, self.emb)
        print(f"corpus: {len(self.corpus):,} images embedded in {time.time() - t:.0f} s", flush=True)
        self.verifier, self._features = Verifier(window_retries=args.retries), {}
        # verifiers working candidates at other sides (--candidate-sides)
        self.at_side = {side: Verifier(candidate_max_side=side) for side in args.candidate_sides or ()}

    def features(self, c: int):
        if c not in self._features:
            self._features[c] = self.verifier.features(devset.flatten(self.ds.corpus_image(c)))
        return self._features[c]

    def on_window(self, query, box):
        return self.verifier.features(query.crop(box), query=True)


def reference_at_sides(check: PasteCheck, qi: int, top: int, sides: list[int]) -> dict:
    """Is paste ``qi``'s reference verified with candidates worked at each of ``sides`` (whole
    query, then the window that found it), and the CPU of its candidate features at each side?"""
    query, gt = check.ds.queries[qi], int(check.ds.query_gt[qi])
    cands, boxes = cd.query_candidates(query, check.emb, check.corpus, regions=True)
    found = [c for c in verification_pool(cands, top, size=max(POOL_SIZES)) if c.id == gt]
    if not found:
        return {}
    window = boxes[found[0].region]
    reference = devset.flatten(check.ds.corpus_image(gt))
    qf = check.verifier.features(query, query=True)
    wf = check.on_window(query, window) if window != boxes[0] else None
    row = {}
    for side in sides:
        v = check.at_side[side]
        t = time.process_time()
        cf = v.features(reference)
        row[f"{side} features s"] = time.process_time() - t
        ok = v.verify(qf, cf).verified
        row[f"{side} whole"] = ok
        row[f"{side} + window"] = ok or (wf is not None and v.verify(wf, cf).verified)
    return row


def window_row(check: PasteCheck, refs: list, qi: int, top: int) -> dict:
    """Paste ``qi``: is its reference in search's pool; how well do the query's windows frame the
    pasted box; where does the reference rank when the pasted box, or its visible part, is the
    window?"""
    from pipeline.embedders.regions import iou

    query, gt, pasted = check.ds.queries[qi], int(check.ds.query_gt[qi]), check.ds.paste_box[qi]
    cands, boxes = cd.query_candidates(query, check.emb, check.corpus, regions=True)
    reference = refs[gt].image()
    alpha = reference.getchannel("A").getbbox() if reference.mode == "RGBA" else None
    visible = pasted
    if alpha:  # the reference's opaque part, in query pixels
        sx, sy = (pasted[2] - pasted[0]) / reference.width, (pasted[3] - pasted[1]) / reference.height
        visible = (round(pasted[0] + alpha[0] * sx), round(pasted[1] + alpha[1] * sy),
                   round(pasted[0] + alpha[2] * sx), round(pasted[1] + alpha[3] * sy))
    sims = check.emb.embed_images([query.crop(pasted), query.crop(visible)]) @ check.corpus.T
    rank = (sims > sims[:, gt:gt + 1]).sum(axis=1) + 1
    return {"in the pool": any(c.id == gt for c in verification_pool(cands, top)),
            "best window IoU": float(iou(np.asarray(pasted, float), np.asarray(boxes, float)).max()),
            "first on the pasted box": rank[0] == 1, "first on its visible part": rank[1] == 1,
            "in the top 3 on the pasted box": rank[0] <= 3,
            "similarity on the pasted box": float(sims[0, gt])}


def query_row(check: PasteCheck, qi: int, top: int) -> dict:
    """One query as search verifies it (its pool, luma, whole query), then
    ``Verifier.retry_on_windows``: the first failures found by a window other than the whole
    image tried again on that window."""
    query, gt = check.ds.queries[qi], int(check.ds.query_gt[qi])
    cands, boxes = cd.query_candidates(query, check.emb, check.corpus, regions=True)
    pool = verification_pool(cands, top)
    qf, feats = check.verifier.features(query, query=True), [check.features(c.id) for c in pool]
    first = [check.verifier.verify(qf, f) for f in feats]
    t = time.process_time()
    again = check.verifier.retry_on_windows(query, feats, [boxes[c.region] for c in pool], first)
    retry_s = time.process_time() - t
    ok = {c.id: r.verified for c, r in zip(pool, first)}
    rescued = {c.id for c, r, a in zip(pool, first, again) if a.verified and not r.verified}
    row = {f"pool {n}": any(c.id == gt for c in verification_pool(cands, top, size=n)) for n in POOL_SIZES}
    return {**row, "in the pool": gt in ok, "verified": ok.get(gt, False),
            "verified with the retry": ok.get(gt, False) or gt in rescued,
            "some verified": any(ok.values()), "newly verified by the retry": bool(rescued) and not any(ok.values()),
            "retry cpu s": retry_s}


def summary(rows: list[dict], keys) -> dict:
    return {k: round(float(np.mean([r[k] for r in rows])), 3) for k in keys} if rows else {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", choices=devset.SPLITS, default="validation")
    ap.add_argument("--edits-per-ref", type=int, default=3,
                    help="edits per reference, taken in turn from the edit list (22: every reference pasted twice)")
    ap.add_argument("--corpus-distractors", type=int, default=0, metavar="N",
                    help="add N corpus images made from the fit split's (bench/corpus_distractors.py)")
    ap.add_argument("--distractors", action="store_true", help="also verify distractor queries' pools")
    ap.add_argument("--retries", type=int, default=3, help="failing pool members retried on their windows")
    ap.add_argument("--candidate-sides", type=int, nargs="*", metavar="PX",
                    help="instead: verify each paste's reference with candidates worked at these sides")
    ap.add_argument("--windows", action="store_true",
                    help="instead: the pastes outside the pool, and the windows that would frame them")
    ap.add_argument("--object-regions", type=int, default=cd.EmbedderConfig().query_object_regions)
    ap.add_argument("--cache", default="/tmp/replica-devset", help="the development benchmark's package cache")
    args = ap.parse_args()
    args.embedder, args.checkpoint, args.model, args.pretrained = "default", None, None, None
    if args.split == "fit" and args.corpus_distractors:
        ap.error("--corpus-distractors are made from the fit split's images: measure validation or test with them")
    items = devset.load(args.cache, MANIFEST)
    ds = cd.build_split(items, args.split, args.edits_per_ref, 2)
    if args.corpus_distractors:
        ds.extra = CorpusDistractors(items, args.corpus_distractors)
    check = PasteCheck(ds, args)
    top = cd.VERIFY_TOP
    refs = [it for it in items if it.split == args.split and it.role == "reference"]
    pastes = [i for i, e in enumerate(ds.query_edit) if e == "paste"]
    cutout = {i: refs[int(ds.query_gt[i])].image().mode in ("RGBA", "LA", "PA") for i in pastes}
    if args.candidate_sides:
        found = {i: r for i in pastes if (r := reference_at_sides(check, i, top, args.candidate_sides))}
        keys = [f"{side} {k}" for side in args.candidate_sides for k in ("whole", "+ window")]
        print(f"{args.split}: {len(found)} of {len(pastes)} pastes' references in the pool of {max(POOL_SIZES)}")
        for name, part in (("all", list(found.values())), ("cut-outs", [r for i, r in found.items() if cutout[i]])):
            print(f"  {name} ({len(part)}): verified", summary(part, keys))
        print("  candidate features, ms:", {side: round(1000 * float(np.mean([r[f"{side} features s"]
                                                                          for r in found.values()])), 1)
                                           for side in args.candidate_sides})
        return
    if args.windows:
        found = [window_row(check, refs, i, top) for i in pastes]
        for name, part in (("in the pool", [r for r in found if r["in the pool"]]),
                           ("outside the pool", [r for r in found if not r["in the pool"]])):
            medians = {k: round(float(np.median([r[k] for r in part])), 3) if part else None
                       for k in ("best window IoU", "similarity on the pasted box")}
            print(f"{args.split}: {len(part)} of {len(found)} pastes {name}; medians {medians};",
                  summary(part, ["first on the pasted box", "in the top 3 on the pasted box", "first on its visible part"]))
        return
    rows = {i: query_row(check, i, top) for i in pastes}
    print(f"{args.split}, {len(rows)} pastes, corpus {len(check.corpus):,}; search's pool: {pool_size(top)}")
    for name, part in (("all", list(rows.values())), ("cut-outs", [r for i, r in rows.items() if cutout[i]]),
                       ("rectangles", [r for i, r in rows.items() if not cutout[i]])):
        print(f"  {name} ({len(part)}): in the pool of", summary(part, [f"pool {n}" for n in POOL_SIZES]))
        in_pool = [r for r in part if r["in the pool"]]
        print(f"  {name}, in the pool ({len(in_pool)}):", summary(in_pool, ["verified", "verified with the retry"]))
    print(f"  retry CPU {1000 * np.mean([r['retry cpu s'] for r in rows.values()]):.0f} ms per paste query")
    if args.distractors:
        found = [query_row(check, i, top) for i, e in enumerate(ds.query_edit) if e == "distractor"]
        print(f"  distractor queries ({len(found)}):", summary(found, ["some verified", "newly verified by the retry"]),
              f"retry CPU {1000 * np.mean([r['retry cpu s'] for r in found]):.0f} ms per query")

if __name__ == "__main__":
    main()
