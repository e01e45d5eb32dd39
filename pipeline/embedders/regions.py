"""Query-side windows: a fixed grid, and windows centred on objects.

A copied object pasted into a new scene is found when some query window holds it and little
else: the descriptor squashes each window to a square, so a window that is off by a quarter of
the object's area, or of another aspect ratio, scores far below a tight one. The grid
(:func:`grid_boxes`) covers every position at a few scales but only in the query's own aspect
ratio and at a third of a window's stride, so it rarely isolates an object of another shape.
:func:`object_boxes` adds windows centred on objects from two cues:

- *colour contrast* (:func:`colour_contrast_boxes`): the colour histogram of the window against
  that of the ring around it (Alexe et al., "Measuring the objectness of image windows", TPAMI
  2012), scored with an integral histogram;
- *boundaries* (:func:`boundary_boxes`): windows whose four sides each run along an edge of
  the image's colours (a framed picture, a page, a poster, a screen, an object's extremes), the
  box-boundary idea of EdgeBoxes (Zitnick and Dollar, ECCV 2014) reduced to straight sides.

Both try windows of many sizes and aspect ratios and return the best after non-maximum
suppression.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

Box = tuple[int, int, int, int]

#: Working resolution of the proposals (longest side) and colour levels per channel.
WORK_SIDE = 96
LEVELS = 4
#: Window sides (fractions of the image's width and height) tried by the proposals.
OBJECT_SIDES = (0.25, 0.33, 0.42, 0.52, 0.64)


def grid_boxes(width: int, height: int, scales, step: float) -> list[Box]:
    """The whole image, then for each scale ``s`` windows of ``s`` times each side, spread evenly
    so that neighbours are at most ``step`` of a window apart (n = ceil((1 - s) / (s * step)) + 1
    per axis)."""
    boxes: list[Box] = [(0, 0, width, height)]
    for s in scales:
        cw, ch = max(1, round(width * s)), max(1, round(height * s))
        n = int(np.ceil((1 - s) / (s * step) - 1e-9)) + 1 if s < 1 else 1
        for i in range(n):
            for j in range(n):
                x0 = round((width - cw) * j / max(1, n - 1))
                y0 = round((height - ch) * i / max(1, n - 1))
                box = (x0, y0, x0 + cw, y0 + ch)
                if box not in boxes:
                    boxes.append(box)
    return boxes


def _integral_histogram(image: Image.Image) -> tuple[np.ndarray, float]:
    """(h + 1, w + 1, LEVELS**3) cumulative colour counts of a working copy, and its scale."""
    f = WORK_SIDE / max(image.size)
    small = image.convert("RGB").resize((max(4, round(image.width * f)), max(4, round(image.height * f))),
                                        Image.BILINEAR)
    q = (np.asarray(small, dtype=np.uint16) * LEVELS) >> 8  # 0..LEVELS-1 per channel
    code = (q[..., 0] * LEVELS + q[..., 1]) * LEVELS + q[..., 2]
    onehot = np.zeros(code.shape + (LEVELS ** 3,), np.float32)
    np.put_along_axis(onehot, code[..., None].astype(np.int64), 1.0, axis=-1)
    integral = np.zeros((code.shape[0] + 1, code.shape[1] + 1, LEVELS ** 3), np.float32)
    integral[1:, 1:] = onehot.cumsum(0).cumsum(1)
    return integral, small.width / image.width


def _sums(integral: np.ndarray, x0, y0, x1, y1) -> np.ndarray:
    return integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of box ``a`` with each of the boxes ``b`` (x0, y0, x1, y1 rows)."""
    ix = np.maximum(0, np.minimum(a[2], b[:, 2]) - np.maximum(a[0], b[:, 0]))
    iy = np.maximum(0, np.minimum(a[3], b[:, 3]) - np.maximum(a[1], b[:, 1]))
    inter = ix * iy
    area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def _suppress(b: np.ndarray, score: np.ndarray, count: int, overlap: float) -> list[int]:
    """Indices of the best ``count`` boxes (score > 0), each overlapping the kept ones by IoU <=
    ``overlap``."""
    keep: list[int] = []
    for i in np.argsort(-score, kind="stable"):
        if score[i] <= 0 or len(keep) >= count:
            break
        if keep and iou(b[i], b[keep]).max() > overlap:
            continue
        keep.append(int(i))
    return keep


def _to_image(b: np.ndarray, keep: list[int], f: float, size: tuple[int, int]) -> list[Box]:
    W, H = size
    return [(int(max(0, np.floor(b[i, 0] / f))), int(max(0, np.floor(b[i, 1] / f))),
             int(min(W, np.ceil(b[i, 2] / f))), int(min(H, np.ceil(b[i, 3] / f)))) for i in keep]


def object_boxes(image: Image.Image, count: int = 8) -> list[Box]:
    """Up to ``count`` windows centred on objects: half from the boundary cue (the larger half),
    half from colour contrast, without repeats."""
    boxes = boundary_boxes(image, (count + 1) // 2)
    return boxes + [b for b in colour_contrast_boxes(image, count - len(boxes)) if b not in boxes]


#: Working resolution of the boundary cue, the stride of its window sides (working pixels), the
#: window sides it tries (fractions of the image's), and the share of the strongest colour steps
#: it counts as edges.
BOUNDARY_SIDE = 96
BOUNDARY_STRIDE = 2
BOUNDARY_SIDES = (0.15, 0.9)
EDGE_QUANTILE = 0.85


def boundary_boxes(image: Image.Image, count: int = 4, overlap: float = 0.5) -> list[Box]:
    """Up to ``count`` windows whose four sides each lie along edges, best first: a window's score
    is the smallest, over its four sides, of the share of the side's pixels that sit on an edge
    of the side's orientation (vertical edges for the left and right sides). Edges are the
    strongest ``1 - EDGE_QUANTILE`` of the colour steps between neighbouring pixels, allowed one
    pixel off the side."""
    if count <= 0:
        return []
    f = BOUNDARY_SIDE / max(image.size)
    w, h = max(8, round(image.width * f)), max(8, round(image.height * f))
    a = np.asarray(image.convert("RGB").resize((w, h), Image.BILINEAR), dtype=np.int16)
    # steps[:, x] is the step between columns x - 1 and x: the boundary at x
    vert = np.zeros((h, w + 1), np.int16)
    vert[:, 1:w] = np.abs(np.diff(a, axis=1)).max(axis=2)
    horiz = np.zeros((h + 1, w), np.int16)
    horiz[1:h] = np.abs(np.diff(a, axis=0)).max(axis=2)

    def edges(steps: np.ndarray, inner: np.ndarray, axis: int) -> np.ndarray:
        on = steps >= max(float(np.quantile(inner, EDGE_QUANTILE)), 8.0)
        return on | np.roll(on, 1, axis) | np.roll(on, -1, axis)

    ev, eh = edges(vert, vert[:, 1:w], 1), edges(horiz, horiz[1:h], 0)
    down = np.zeros((h + 1, w + 1), np.float32)  # down[y, x]: vertical edges in column x above row y
    down[1:] = ev.cumsum(0)
    across = np.zeros((h + 1, w + 1), np.float32)  # across[y, x]: horizontal edges in row y left of x
    across[:, 1:] = eh.cumsum(1)

    def spans(n: int) -> np.ndarray:
        at = np.arange(0, n + 1, BOUNDARY_STRIDE)
        lo, hi = np.meshgrid(at, at, indexing="ij")
        ok = (hi - lo >= BOUNDARY_SIDES[0] * n) & (hi - lo <= BOUNDARY_SIDES[1] * n)
        return np.stack([lo[ok], hi[ok]], 1)

    xs, ys = spans(w), spans(h)
    if not len(xs) or not len(ys):
        return []
    x0, x1 = xs[:, :1], xs[:, 1:]
    y0, y1 = ys[:, 0][None, :], ys[:, 1][None, :]
    score = np.minimum(
        np.minimum((down[y1, x0] - down[y0, x0]) / (y1 - y0), (down[y1, x1] - down[y0, x1]) / (y1 - y0)),
        np.minimum((across[y0, x1] - across[y0, x0]) / (x1 - x0), (across[y1, x1] - across[y1, x0]) / (x1 - x0)))
    best = np.argpartition(score, -min(score.size, 250 * count), axis=None)[-min(score.size, 250 * count):]
    xi, yi = np.unravel_index(best, score.shape)
    b = np.stack([xs[xi, 0], ys[yi, 0], xs[xi, 1], ys[yi, 1]], 1).astype(np.float64)
    return _to_image(b, _suppress(b, score[xi, yi], count, overlap), f, image.size)


def colour_contrast_boxes(image: Image.Image, count: int = 8, overlap: float = 0.4) -> list[Box]:
    """Up to ``count`` windows whose colours differ most from the ring around them (chi-square
    distance of the histograms), best first, overlapping each other by IoU <= ``overlap``."""
    if count <= 0:
        return []
    integral, f = _integral_histogram(image)
    h, w = integral.shape[0] - 1, integral.shape[1] - 1
    boxes = []
    for fw in OBJECT_SIDES:
        for fh in OBJECT_SIDES:
            bw, bh = max(2, round(w * fw)), max(2, round(h * fh))
            xs = np.unique(np.linspace(0, w - bw, 9).round().astype(int))
            ys = np.unique(np.linspace(0, h - bh, 9).round().astype(int))
            for y in ys:
                for x in xs:
                    boxes.append((x, y, x + bw, y + bh))
    b = np.asarray(boxes)
    mx, my = (b[:, 2] - b[:, 0]) // 2, (b[:, 3] - b[:, 1]) // 2  # the ring: half a side around
    ox0, oy0 = np.maximum(0, b[:, 0] - mx), np.maximum(0, b[:, 1] - my)
    ox1, oy1 = np.minimum(w, b[:, 2] + mx), np.minimum(h, b[:, 3] + my)
    inner = _sums(integral, b[:, 0], b[:, 1], b[:, 2], b[:, 3])
    ring = _sums(integral, ox0, oy0, ox1, oy1) - inner
    ring_n = ring.sum(axis=1, keepdims=True)
    ok = ring_n[:, 0] > 0.25 * inner.sum(axis=1)  # windows with a real surrounding ring
    p = inner / np.maximum(inner.sum(axis=1, keepdims=True), 1)
    r = ring / np.maximum(ring_n, 1)
    score = np.where(ok, 0.5 * ((p - r) ** 2 / np.maximum(p + r, 1e-9)).sum(axis=1), -1.0)
    return _to_image(b, _suppress(b, score, count, overlap), f, image.size)
