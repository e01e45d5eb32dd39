"""Normalised L2 distance (nL2) of Carlini et al., "Extracting Training Data from Diffusion Models"
(USENIX Security 2023), as Chen et al. (AMG, CVPR 2024) report it.

    nL2(g, x) = l2(g, x) / (alpha * mean over y in S(g) of l2(g, y))

``g`` is a generation, ``x`` a training image, ``S(g)`` the ``n`` training images nearest to ``g``;
alpha = 0.5, n = 50 (Carlini et al.'s values). Small means copy: a generation much closer to one
training image than to its typical neighbours. The division makes the score free of the image's
own contrast and of any constant factor in ``l2`` (Carlini et al. divide by the number of pixels;
it cancels).

At LAION scale the 50 training images nearest to ``g`` in pixel space cannot be found; replica
takes the generation's best ``n`` candidates by descriptor score, whose pixels the search fetches
anyway, as ``S(g)`` (see docs/RESULTS.md). When fewer than ``n`` candidates exist, all of them are
used and their number is recorded.

Pixels: RGB in [0, 1] at 64 x 64 (short side resized, centre square crop, bicubic). Carlini et
al. measured CIFAR-10 at its native 32 x 32; 64 x 64 keeps the layout and colours that make two
pictures the same picture while dropping the detail that JPEG re-encoding and LAION's resizing
change between copies of one image, and a query's 50 references are 50 x 12,288 numbers.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

ALPHA = 0.5
NEIGHBOURS = 50
SIZE = 64


def pixels(image: Image.Image, size: int = SIZE) -> np.ndarray:
    """An image as (size * size * 3,) float32 RGB values in [0, 1], centre square crop."""
    from pipeline.embedders.base import square_crop_uint8

    return square_crop_uint8(image, size).reshape(-1).astype(np.float32) / 255.0


def distances(query: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Euclidean distances from one pixel vector to each row of ``others``."""
    others = np.asarray(others, np.float64).reshape(len(others), -1)
    return np.linalg.norm(others - np.asarray(query, np.float64).reshape(1, -1), axis=1)


def normalized_l2(query: np.ndarray, candidates: np.ndarray, reference: np.ndarray,
                  alpha: float = ALPHA) -> np.ndarray:
    """nL2 of each candidate (rows of pixel vectors) to ``query``, ``reference`` standing for S(g).

    A reference set at distance 0 from the query (it is all exact copies) gives 0 for an exact
    copy and infinity for anything else.
    """
    d = distances(query, candidates)
    scale = alpha * float(distances(query, reference).mean()) if len(reference) else float("nan")
    if scale == 0:
        return np.where(d == 0, 0.0, np.inf)
    return d / scale


def nl2_of_images(query: Image.Image, candidates: Sequence[Image.Image], n: int = NEIGHBOURS,
                  alpha: float = ALPHA, size: int = SIZE) -> tuple[np.ndarray, int]:
    """nL2 of each candidate image, the best ``n`` of them (by the caller's ranking) standing for S(g).

    Returns the scores and how many references were used.
    """
    if not candidates:
        return np.zeros(0), 0
    q = pixels(query, size)
    c = np.stack([pixels(im, size) for im in candidates])
    ref = c[:n]
    return normalized_l2(q, c, ref, alpha), len(ref)


def nl2_of_rows(image: Image.Image, reference_rows: list[dict], match_rows: list[dict],
                storage) -> tuple[list[float | None], int]:
    """A Ray task: the nL2 of each match of a query, its best candidates (``reference_rows``, rows
    with their tar byte ranges) standing for S(g); each image is fetched once. A training image
    without pixels (imported embeddings carry no byte range), missing or undecodable is left out:
    no nL2 for it, not among the references; a storage error that may pass is raised, so the task
    is retried. Returns the scores and how many references there were."""
    from pipeline.storage import is_transient, read_range
    from pipeline.verify import decode

    def key(r: dict) -> tuple:
        return r.get("tar_url"), r.get("tar_offset"), r.get("tar_size")

    fetched: dict[tuple, np.ndarray | None] = {}
    for r in [*reference_rows, *match_rows]:
        k = key(r)
        if k in fetched:
            continue
        fetched[k] = None
        if None in k:
            continue
        try:
            data = read_range(k[0], int(k[1]), int(k[2]), storage)
        except OSError as exc:
            if is_transient(exc):
                raise
            continue
        try:
            fetched[k] = pixels(decode(data))
        except Exception:  # noqa: BLE001 - bytes that are not an image are data, not a failed task
            continue
    references = [fetched[key(r)] for r in reference_rows if fetched[key(r)] is not None]
    if not references:
        return [None] * len(match_rows), 0
    q = pixels(image)
    have = [fetched[key(r)] for r in match_rows]
    scores = normalized_l2(q, np.stack([p if p is not None else q for p in have]), np.stack(references))
    return [float(s) if p is not None else None for s, p in zip(scores, have)], len(references)
