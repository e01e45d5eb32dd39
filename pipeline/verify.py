"""Local-feature verification of a (query, candidate) pair: is the candidate really copied?

Global descriptors rank candidates; this module checks a short list of them geometrically:

1. the query is scaled to at most ``max_side`` pixels and each candidate to at most
   ``candidate_max_side`` (bounded cost; keypoints are scale-invariant, and a candidate's
   features are the larger share of a query's CPU), equalised (CLAHE, so
   low-contrast photos get keypoints), and keypoints are extracted: SIFT by default, or ORB,
   RootSIFT (SIFT with Hellinger-normalised descriptors, Arandjelovic & Zisserman 2012), AKAZE or
   BRISK (``METHODS``; docs/BENCHMARKS.md compares them). A query gets more keypoints than a candidate (a copied object may be a small
   part of it) and is computed once per query;
2. descriptors are matched with Lowe's ratio test, at most one match per candidate keypoint;
3. a similarity transform (rotation + uniform scale + translation; or a full affine /
   homography) is fitted with RANSAC; implausible transforms (reflection, extreme scale) are
   rejected; a pair is verified with at least ``min_inliers`` inliers that are at least
   ``min_inlier_ratio`` of the tentative matches (chance fits among many ambiguous matches
   reach a dozen inliers, but at a low ratio);
4. unless the direct attempt is clearly a copy, the mirrored query is tried too (copies are
   often flipped) and the better accepted attempt is kept; in :meth:`Verifier.verify_many`, up
   to ``colour_retries`` candidates that still fail but look like a recolouring of the query are
   tried once more on the value channel (the largest of R, G and B, which a hue rotation keeps
   while it can invert luma contrast), and up to ``window_retries`` on the query cropped to the
   window (query region) that found them, which frames a pasted object;
5. the matched region is where the aligned images agree: the candidate is warped onto the
   query and the local normalised cross-correlation marks the pixels that match; the query
   box is the bounding box of the agreeing area connected to the inliers (never smaller than
   the inliers' box), the candidate box its back-projection.

The answer (:class:`Verification`) carries the inlier count, a score in [0, 1) (0 = not
verified), whether the mirrored query matched, the transform, and both boxes. Time per pair
is bounded by ``max_side``/``candidate_max_side``, ``n_features``/``n_query_features`` and ``max_iters``;
``time_budget_s`` additionally skips the mirrored attempt once a pair has used its budget.

Search verifies one query against many candidates: :meth:`Verifier.features` computes a
query's features (and its mirror's) once; :meth:`Verifier.verify` accepts either images or
precomputed :class:`Features`. Candidate bytes come from the corpus tars with one ranged read
(:func:`load_candidate`, using the embedding row's ``tar_url``/``tar_offset``/``tar_size``).
"""
from __future__ import annotations

import io
import time
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image

Box = tuple[int, int, int, int]

#: Keypoint methods, and the default (chosen by measurement on the development benchmark's
#: validation split: docs/BENCHMARKS.md).
METHODS = ("orb", "sift", "rootsift", "akaze", "brisk")
DEFAULT_METHOD = "sift"


@dataclass
class Features:
    """Keypoints (in the image's own pixels), descriptors and the working grey image."""

    points: np.ndarray  # (n, 2) float32, original pixel coordinates
    descriptors: np.ndarray | None  # (n, d) uint8 (ORB/AKAZE/BRISK) or float32 (SIFT/RootSIFT)
    size: tuple[int, int]  # (width, height) of the original image
    scale: float = 1.0  # working resolution / original resolution
    grey: np.ndarray | None = field(default=None, repr=False)  # working-resolution grey (uint8)
    mirrored: "Features | None" = field(default=None, repr=False)

    def __len__(self) -> int:
        return 0 if self.descriptors is None else len(self.descriptors)


@dataclass
class Verification:
    inliers: int
    #: 0 when not verified; otherwise grows with the inlier count towards 1
    score: float
    #: matched region in query pixels (x0, y0, x1, y1), None when not verified
    query_box: Box | None
    #: matched region in candidate pixels, None when not verified
    candidate_box: Box | None
    #: True when the mirrored query is what matched
    flipped: bool
    #: tentative (ratio-test) matches of the attempt reported
    matches: int = 0
    #: 2x3 affine (or 3x3 homography) mapping candidate pixels to query pixels (mirror included)
    transform: np.ndarray | None = field(default=None, repr=False)
    seconds: float = 0.0

    @property
    def verified(self) -> bool:
        return self.score > 0


_CLAHE = None


def _clahe():
    global _CLAHE
    if _CLAHE is None:
        import cv2

        _CLAHE = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))
    return _CLAHE


def _grey_array(image: Image.Image, max_side: int, channel: str = "luma") -> tuple[np.ndarray, float]:
    """The working image: luma, or ``value`` (the largest of R, G and B, which a hue rotation
    keeps), scaled and equalised."""
    w, h = image.size
    scale = min(1.0, max_side / max(w, h))
    # Small images are enlarged a little: detectors need some pixels to work with (256 px, or
    # max_side when that is smaller: a smaller working side is asked for to save CPU).
    floor = min(256, max_side)
    if max(w, h) * scale < floor:
        scale = floor / max(w, h)
    if channel == "value" and image.mode == "RGB":
        from pipeline.embedders.base import value_channel

        g = value_channel(image)
    else:
        g = image.convert("L")
    if scale != 1.0:
        g = g.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
    # Local contrast equalisation: low-contrast photos (medical, hazy, dark) get keypoints too,
    # and brightness/contrast edits matter less.
    return _clahe().apply(np.asarray(g, dtype=np.uint8)), scale


def _as3x3(m: np.ndarray) -> np.ndarray:
    return np.vstack([m, [0.0, 0.0, 1.0]]) if m.shape[0] == 2 else m


def _apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    h = _as3x3(m) @ np.vstack([pts.T, np.ones(len(pts))])
    return (h[:2] / h[2]).T


class Verifier:
    """Reusable matcher: detector, matcher, RANSAC and box settings in one place."""

    def __init__(
        self,
        method: str = DEFAULT_METHOD,
        max_side: int = 512,
        candidate_max_side: int = 288,
        n_features: int = 1500,
        n_query_features: int = 5000,
        fast_threshold: int = 5,
        ratio: float = 0.8,
        model: str = "similarity",
        ransac_px: float = 6.0,
        max_iters: int = 2000,
        min_inliers: int = 15,
        min_inlier_ratio: float = 0.2,
        score_scale: float = 20.0,
        try_flip: bool = True,
        refine_box: bool = True,
        time_budget_s: float = 1.0,
        colour_retries: int = 3,
        colour_retry_min_corr: float = 0.7,
        window_retries: int = 3,
    ):
        import cv2

        if method not in METHODS:
            raise ValueError(f"verification method must be one of {', '.join(METHODS)}, got {method!r}")
        if model not in ("similarity", "affine", "homography"):
            raise ValueError(f"verification model must be similarity, affine or homography, got {model!r}")
        self.cv2 = cv2
        self.method, self.max_side, self.n_features = method, max_side, n_features
        self.candidate_max_side = candidate_max_side
        self.ratio, self.model, self.ransac_px, self.max_iters = ratio, model, ransac_px, max_iters
        self.min_inliers, self.min_inlier_ratio, self.score_scale = min_inliers, min_inlier_ratio, score_scale
        self.try_flip, self.refine_box, self.time_budget_s = try_flip, refine_box, time_budget_s
        self.colour_retries, self.colour_retry_min_corr = colour_retries, colour_retry_min_corr
        self.window_retries = window_retries
        if method == "orb":
            def orb(n: int):
                return cv2.ORB_create(nfeatures=n, scaleFactor=1.2, nlevels=8, fastThreshold=fast_threshold)

            self.detector, self.query_detector = orb(n_features), orb(n_query_features)
            self.norm = cv2.NORM_HAMMING
        elif method == "akaze":
            self.detector = self.query_detector = cv2.AKAZE_create(threshold=0.0005)
            self.norm = cv2.NORM_HAMMING
        elif method == "brisk":
            self.detector = self.query_detector = cv2.BRISK_create(thresh=20)
            self.norm = cv2.NORM_HAMMING
        else:  # sift, rootsift; half the default contrast threshold: upscaled and hazy images get keypoints
            self.detector = cv2.SIFT_create(nfeatures=n_features, contrastThreshold=0.02)
            self.query_detector = cv2.SIFT_create(nfeatures=n_query_features, contrastThreshold=0.02)
            self.norm = cv2.NORM_L2
        self.matcher = cv2.BFMatcher(self.norm)

    # -- features ----------------------------------------------------------------------

    def _detect(self, image: Image.Image, detector, max_side: int, channel: str = "luma") -> Features:
        grey, scale = _grey_array(image, max_side, channel)
        kps, desc = detector.detectAndCompute(grey, None)
        if desc is None or len(kps) == 0:
            return Features(np.zeros((0, 2), np.float32), None, image.size, scale, grey)
        if self.method == "rootsift":  # L1-normalise, square-root: L2 distance becomes Hellinger
            desc = np.sqrt(desc / (np.abs(desc).sum(axis=1, keepdims=True) + 1e-7)).astype(np.float32)
        pts = np.array([k.pt for k in kps], dtype=np.float32) / scale
        return Features(pts, desc, image.size, scale, grey)

    def features(self, image: Image.Image, query: bool = False, channel: str = "luma") -> Features:
        """Features of a candidate, or of a query (more keypoints, plus those of its mirror
        image when ``try_flip`` and the channel is luma), on the ``luma`` or ``value`` channel."""
        from pipeline.embedders.base import to_rgb

        image = image if image.mode == "L" else to_rgb(image)
        if not query:
            return self._detect(image, self.detector, self.candidate_max_side, channel)
        f = self._detect(image, self.query_detector, self.max_side, channel)
        if self.try_flip and channel == "luma":
            f.mirrored = self._detect(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), self.query_detector,
                                      self.max_side)
        return f

    # -- matching ----------------------------------------------------------------------

    def _match(self, q: Features, c: Features) -> tuple[np.ndarray, np.ndarray]:
        """Ratio-test matches, at most one per candidate keypoint: (query pts, candidate pts)."""
        empty = np.zeros((0, 2), np.float32)
        if len(q) < 2 or len(c) < 2:
            return empty, empty
        if self.norm == self.cv2.NORM_L2:
            best, second, train = _two_nearest_l2(q.descriptors, c.descriptors)
        else:  # binary descriptors: OpenCV's Hamming matcher is as fast as a matrix product here
            knn = self.matcher.knnMatch(q.descriptors, c.descriptors, k=2)  # two per row: len(c) >= 2
            best, second, train = (np.array(v) for v in zip(*((m.distance, n.distance, m.trainIdx) for m, n in knn)))
        query = np.nonzero(best < self.ratio * second)[0]
        if not len(query):
            return empty, empty
        # One match per candidate keypoint: its closest query keypoint (the first on ties).
        query = query[np.lexsort((query, best[query], train[query]))]
        matched = train[query]
        first = np.r_[True, matched[1:] != matched[:-1]]
        return q.points[query[first]], c.points[matched[first]]

    def _fit(self, qp: np.ndarray, cp: np.ndarray, q_scale: float) -> tuple[np.ndarray | None, np.ndarray]:
        cv2 = self.cv2
        # RANSAC threshold: ``ransac_px`` pixels of the query at its working resolution.
        thr = self.ransac_px / q_scale
        none = (None, np.zeros(len(qp), bool))
        if self.model == "homography":
            if len(qp) < 4:
                return none
            m, mask = cv2.findHomography(cp, qp, cv2.RANSAC, thr, maxIters=self.max_iters)
        elif self.model == "affine":
            m, mask = cv2.estimateAffine2D(cp, qp, method=cv2.RANSAC, ransacReprojThreshold=thr,
                                           maxIters=self.max_iters, refineIters=5)
        else:
            m, mask = cv2.estimateAffinePartial2D(cp, qp, method=cv2.RANSAC, ransacReprojThreshold=thr,
                                                  maxIters=self.max_iters, refineIters=5)
        if m is None or mask is None:
            return none
        det = float(np.linalg.det(m[:2, :2]))
        # Mirror images are handled by the mirrored query; extreme scales are chance fits.
        if det <= 0 or not (1 / 100 <= det <= 100):
            return none
        return m, mask.ravel().astype(bool)

    def _attempt(self, q: Features, c: Features) -> tuple[int, int, np.ndarray | None, np.ndarray, np.ndarray]:
        qp, cp = self._match(q, c)
        if len(qp) < max(3, self.min_inliers):
            return 0, len(qp), None, qp[:0], cp[:0]
        m, inl = self._fit(qp, cp, q.scale)
        if m is None:
            return 0, len(qp), None, qp[:0], cp[:0]
        return int(inl.sum()), len(qp), m, qp[inl], cp[inl]

    def _accepted(self, attempt: tuple) -> bool:
        """Enough inliers, and enough of the tentative matches: chance fits among many
        ambiguous matches (textures, similar scenes) reach a dozen inliers but a low ratio."""
        inliers, n_matches = attempt[0], attempt[1]
        return inliers >= self.min_inliers and inliers >= self.min_inlier_ratio * n_matches

    # -- the matched region --------------------------------------------------------------

    def _agreeing_box(self, q: Features, c: Features, m: np.ndarray, qin: np.ndarray) -> Box:
        """Query box of the area where the warped candidate agrees with the query (local NCC),
        connected to the inliers; at least the inliers' own box. ``q`` is the (possibly
        mirrored) query the transform ``m`` maps into."""
        inlier_box = _box(qin, q.size)
        if not self.refine_box or q.grey is None or c.grey is None:
            return inlier_box
        cv2 = self.cv2
        sq, sc = q.scale, c.scale
        work = np.diag([sq, sq, 1.0]) @ _as3x3(m) @ np.diag([1 / sc, 1 / sc, 1.0])  # working px -> working px
        qh, qw = q.grey.shape
        if self.model == "homography":
            warped = cv2.warpPerspective(c.grey, work, (qw, qh), flags=cv2.INTER_LINEAR)
            valid = cv2.warpPerspective(np.full(c.grey.shape, 255, np.uint8), work, (qw, qh), flags=cv2.INTER_NEAREST)
        else:
            warped = cv2.warpAffine(c.grey, work[:2], (qw, qh), flags=cv2.INTER_LINEAR)
            valid = cv2.warpAffine(np.full(c.grey.shape, 255, np.uint8), work[:2], (qw, qh), flags=cv2.INTER_NEAREST)
        a, b = q.grey.astype(np.float32), warped.astype(np.float32)
        k = (9, 9)
        ma, mb = cv2.blur(a, k), cv2.blur(b, k)
        va = cv2.blur(a * a, k) - ma * ma
        vb = cv2.blur(b * b, k) - mb * mb
        cov = cv2.blur(a * b, k) - ma * mb
        textured = (va > 16.0) & (vb > 16.0)
        ncc = cov / np.sqrt(np.maximum(va * vb, 1e-6))
        agree = (textured & (ncc > 0.5) & (valid > 0)).astype(np.uint8)
        agree = cv2.morphologyEx(agree, cv2.MORPH_CLOSE, np.ones((9, 9), np.uint8))
        n, labels, stats, _ = cv2.connectedComponentsWithStats(agree, connectivity=8)
        if n <= 1:
            return inlier_box
        pts = np.clip(np.round(qin * sq).astype(int), 0, [qw - 1, qh - 1])
        keep = set(int(v) for v in labels[pts[:, 1], pts[:, 0]] if v > 0)
        if not keep:
            return inlier_box
        x0, y0, x1, y1 = inlier_box
        for lab in keep:
            sx, sy, sw, sh = stats[lab, :4]
            x0, y0 = min(x0, sx / sq), min(y0, sy / sq)
            x1, y1 = max(x1, (sx + sw) / sq), max(y1, (sy + sh) / sq)
        w, h = q.size
        return (int(max(0, np.floor(x0))), int(max(0, np.floor(y0))), int(min(w, np.ceil(x1))), int(min(h, np.ceil(y1))))

    # -- the check -----------------------------------------------------------------------

    def verify(self, query: Image.Image | Features, candidate: Image.Image | Features) -> Verification:
        """Is ``candidate`` (or a part of it) copied in ``query``? Either may be precomputed
        :class:`Features` (a query's from ``features(image, query=True)``)."""
        t0 = time.perf_counter()
        q = query if isinstance(query, Features) else self.features(query, query=True)
        c = candidate if isinstance(candidate, Features) else self.features(candidate)
        best, used = self._attempt(q, c), q
        # The mirror is tried unless the direct attempt is already clearly a copy.
        if (best[0] < 2 * self.min_inliers and self.try_flip and q.mirrored is not None
                and time.perf_counter() - t0 < self.time_budget_s):
            other = self._attempt(q.mirrored, c)
            if self._accepted(other) and (not self._accepted(best) or other[0] > best[0]):
                best, used = other, q.mirrored
        inliers, n_matches, m, qin, cin = best
        if not self._accepted(best):
            return Verification(inliers, 0.0, None, None, False, n_matches, None, time.perf_counter() - t0)
        flipped = used is not q
        qbox = self._agreeing_box(used, c, m, qin)
        # Candidate box: the query box mapped back, within the candidate, at least the inliers' box.
        corners = np.array([[qbox[0], qbox[1]], [qbox[2], qbox[1]], [qbox[0], qbox[3]], [qbox[2], qbox[3]]], float)
        back = _apply(np.linalg.inv(_as3x3(m)), corners)
        cbox = _union(_box(back, c.size), _box(cin, c.size))
        if flipped:  # mirrored-query pixels -> query pixels
            w = q.size[0]
            qbox = (w - qbox[2], qbox[1], w - qbox[0], qbox[3])
            mirror = np.array([[-1.0, 0.0, w], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
            m = (mirror @ _as3x3(m))[: m.shape[0]]
        score = float(1.0 - np.exp(-(inliers - self.min_inliers + 1) / self.score_scale))
        return Verification(
            inliers=inliers,
            score=score,
            query_box=qbox,
            candidate_box=cbox,
            flipped=flipped,
            matches=n_matches,
            transform=m,
            seconds=time.perf_counter() - t0,
        )

    def verify_many(self, query: Image.Image, candidates: list[Image.Image | Features],
                    windows: list[Box | None] | None = None) -> list[Verification]:
        """One query against several candidates (best first); the query's features, and each
        candidate's, are computed once. Candidates that fail get two more chances:

        - *colour*: of the candidate images that fail on luma, those whose value thumbnails
          correlate with the query's (:func:`value_thumbnail`, at least ``colour_retry_min_corr``)
          are tried again on the value channel, the ``colour_retries`` most correlated: a hue
          rotation can invert luma contrast (yellow on blue becomes blue on yellow) and leave too
          few matching keypoints, but keeps each pixel's largest channel. The correlation keeps
          the retries to plausible recolourings: on the validation split's real images no retry
          found a copy, and retrying the first 3 failures regardless cost 0.35 s of CPU per
          query there (gated: 0.1 s);
        - *window*: the first ``window_retries`` that still fail and have a window (``windows[j]``,
          the query region whose descriptor found the candidate, in query pixels) smaller than
          the whole query are tried again on the query cropped to that window. A pasted object
          is a small part of a busy scene: the whole query's keypoints and ratio test drown its
          matches (docs/BENCHMARKS.md, "Object windows for cut-outs"), the window that found it
          frames it. Each distinct window's features are computed once; the boxes and transform
          of a window's answer are in whole-query pixels."""
        q = self.features(query, query=True)
        feats = [c if isinstance(c, Features) else self.features(c) for c in candidates]
        out = [self.verify(q, f) for f in feats]
        failed = [j for j, v in enumerate(out) if not v.verified and isinstance(candidates[j], Image.Image)]
        if failed and self.colour_retries:
            thumb = value_thumbnail(query)
            corr = {j: float(thumb @ value_thumbnail(candidates[j])) for j in failed}
            failed = sorted((j for j in failed if corr[j] >= self.colour_retry_min_corr), key=lambda j: -corr[j])
        q_value = None
        for j in failed[: self.colour_retries]:
            if q_value is None:
                q_value = self.features(query, query=True, channel="value")
            again = self.verify(q_value, self.features(candidates[j], channel="value"))
            if again.verified:
                out[j] = again
        return self.retry_on_windows(query, feats, windows, out) if windows else out

    def retry_on_windows(self, query: Image.Image, candidates: list[Features], windows: list[Box | None],
                         results: list[Verification]) -> list[Verification]:
        """``results`` with the first ``window_retries`` failures whose window is smaller than
        the whole query verified again on the query cropped to that window (each window's
        features computed once), in whole-query pixels."""
        out, whole = list(results), (0, 0, *query.size)
        retry = [j for j, v in enumerate(out) if not v.verified and windows[j] is not None
                 and tuple(windows[j]) != whole][: self.window_retries]
        on_window: dict[Box, Features] = {}
        for j in retry:
            box = tuple(int(v) for v in windows[j])
            if box not in on_window:
                on_window[box] = self.features(query.crop(box), query=True)
            again = self.verify(on_window[box], candidates[j])
            if again.verified:
                out[j] = _shifted(again, box[0], box[1])
        return out


def _shifted(v: Verification, dx: int, dy: int) -> Verification:
    """A verification of a crop whose origin is (dx, dy), in the whole image's pixels."""
    x0, y0, x1, y1 = v.query_box
    shift = np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])
    m = (shift @ _as3x3(v.transform))[: v.transform.shape[0]]
    return replace(v, query_box=(x0 + dx, y0 + dy, x1 + dx, y1 + dy), transform=m)


def value_thumbnail(image: Image.Image, side: int = 24) -> np.ndarray:
    """The value channel (largest of R, G, B) at ``side`` x ``side``, zero-mean and unit-norm: two
    images' thumbnails correlate (dot product) near 1 when one is the other recoloured."""
    from pipeline.embedders.base import to_rgb

    small = np.asarray(to_rgb(image).resize((side, side), Image.BILINEAR), dtype=np.float32).max(axis=2).ravel()
    small -= small.mean()
    return small / (np.linalg.norm(small) + 1e-6)


def _two_nearest_l2(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each row of ``a``: L2 distance to its nearest and second-nearest row of ``b``, and
    the nearest's index. One matrix product (BLAS) instead of a brute-force matcher: several
    times less CPU for SIFT's 128-d descriptors at verification's sizes."""
    d = a @ b.T  # |a - b|^2 = |a|^2 - 2 a.b + |b|^2; |a|^2 is added once the two are found
    d *= -2.0
    d += (b * b).sum(1)[None, :]
    rows = np.arange(len(a))
    nearest = d.argmin(axis=1)
    first = d[rows, nearest].copy()
    d[rows, nearest] = np.inf
    second = d.min(axis=1)
    aa = (a * a).sum(1)
    return (np.sqrt(np.maximum(first + aa, 0.0)), np.sqrt(np.maximum(second + aa, 0.0)),
            nearest.astype(np.int64))


def _box(points: np.ndarray, size: tuple[int, int]) -> Box:
    w, h = size
    x0, y0 = np.floor(points.min(axis=0))
    x1, y1 = np.ceil(points.max(axis=0)) + 1
    return (int(max(0, x0)), int(max(0, y0)), int(min(w, max(x1, x0 + 1))), int(min(h, max(y1, y0 + 1))))


def _union(a: Box, b: Box) -> Box:
    return (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))


_DEFAULT: Verifier | None = None


def verify(query: Image.Image, candidate: Image.Image, verifier: Verifier | None = None) -> Verification:
    """Verify one pair with the default settings (SIFT, similarity, mirrored query tried)."""
    global _DEFAULT
    if verifier is None:
        if _DEFAULT is None:
            _DEFAULT = Verifier()
        verifier = _DEFAULT
    return verifier.verify(query, candidate)


def decode(data: bytes) -> Image.Image:
    """Image bytes (e.g. one tar member) -> RGB PIL image, upright as viewers show it."""
    from pipeline.embedders.base import to_rgb, upright

    with Image.open(io.BytesIO(data)) as im:
        rgb = to_rgb(upright(im))
        return rgb.copy() if rgb is im else rgb


def load_candidate(tar_url: str, tar_offset: int, tar_size: int, storage=None) -> Image.Image:
    """A corpus image, fetched with one ranged read from its tar (embedding-row columns)."""
    from pipeline.storage import read_range

    return decode(read_range(tar_url, int(tar_offset), int(tar_size), storage))
