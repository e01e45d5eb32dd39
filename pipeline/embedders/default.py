"""Weight-free copy descriptor: multi-scale oriented-gradient pyramid + learned whitening.

Corpus side, one global vector per image:

1. ``preprocess`` (CPU decode workers): JPEGs are decoded with PIL ``draft`` (DCT-domain
   downscale, so a 400 px JPEG costs about a quarter of a full decode), then the whole image
   is squashed (aspect ignored, nothing cut off) to ``INPUT_SIZE`` x ``INPUT_SIZE`` RGB uint8.
2. ``embed`` (embedding actor), batched numpy, no weights but one small matrix:

   * grey levels -> signed gradient-orientation maps (12 directions, cos^6 tuning, so small
     rotations move energy smoothly between neighbouring bins) at two scales (64 and 32 px);
   * pooled on 1x1 (centre-weighted Gaussian), 2x2, 3x3, 4x4 and 6x6 grids (1x1, 2x2, 4x4 at 32 px) with overlapping tent
     windows (crops and small rotations shift content without flipping it between cells);
   * divided by the image's mean gradient energy (contrast invariance), square-rooted
     (Hellinger / power normalisation);
   * plus a standardised 8x8 grey thumbnail and 4x4 colour-opponent means (brightness,
     contrast invariant; colour features are down-weighted by the learned whitening because
     the training pairs include colour jitter and greyscale);
   * made exactly invariant to a horizontal flip: each feature ``a`` and its mirror image
     ``b`` (mirrored cell, mirrored orientation bin) become ``a + b`` and ``|a - b|``;
   * projected with a *learned whitening* (Radenovic et al., "Fine-tuning CNN image
     retrieval with no human annotation", TPAMI 2018, sec. 3.3): the covariance of
     differences between images and their edited copies is whitened, then the directions of
     largest variance between images are kept (``DIM`` of them), and the result is
     L2-normalised.

The whitening is learned once by :mod:`pipeline.embedders.default_fit` from data the project
has (procedural scenes + photographs bundled with scikit-image/matplotlib/scikit-learn, with
the benchmark's pixels held out) and shipped as ``pipeline/embedders/data/<VERSION>.npz``.
Its sha256 is ``identity()["weights"]``; ``EmbedderConfig.checkpoint`` may point at another
whitening file made by the same script.

Query side: :meth:`DefaultDescriptor.embed_regions` embeds the whole query plus overlapping
windows at several scales (``EmbedderConfig.query_region_scales`` / ``query_region_step``;
87 windows by default) and up to ``query_object_regions`` windows on objects, so an object
copied into a new scene is still found, and the whole query once more as its value channel, so
a recoloured flat-colour copy is too; search merges the regions' results per corpus key (max
score).
"""
from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.config import EmbedderConfig
from pipeline.embedders.base import Embedder, draft, l2_normalize, to_rgb, upright, value_channel, with_upright
from pipeline.errors import ConfigError
from pipeline.storage import Storage, read_bytes

#: Feature-code version of new embeddings. Changing the feature code means a new version and a
#: new fit; ``POLARITY_FOLDED`` lists every version this code computes (a whitening file names
#: the one it was fitted for, so corpora embedded with an older version still search).
VERSION = "gradpyr64-lw-v2"
#: v2 folds each orientation bin with the opposite one (a + b, |a - b|): an edge keeps its
#: features when a hue shift makes its darker side the brighter one.
POLARITY_FOLDED = {"gradpyr64-lw-v1": False, "gradpyr64-lw-v2": True}
INPUT_SIZE = 64
#: Output dimension of the shipped whitening.
DIM = 256
#: Signed orientation bins, and the power of the cosine tuning of each bin.
BINS = 12
TUNING_POWER = 6  # computed as (cos^2)^3 below
#: Pooling grids at full resolution (64 px) and at half resolution (32 px).
GRIDS_FULL = (1, 2, 3, 4, 6)
GRIDS_HALF = (1, 2, 4)
THUMB = 8
COLOUR_GRID = 4
#: Default query-side windows (EmbedderConfig.query_region_scales / query_region_step).
DEFAULT_REGION_SCALES = (0.75, 0.6, 0.5, 0.4)
DEFAULT_REGION_STEP = 0.33

DATA_DIR = Path(__file__).parent / "data"
#: The whitening new embeddings use: fitted on the development benchmark's fit split.
SHIPPED_WHITENING = DATA_DIR / f"{VERSION}.npz"
#: Release 0.2's (v1 features, procedural scenes and bundled photographs): corpora embedded with it
#: still search with ``embedder.checkpoint`` set to this file (its sha256 is in their identity).
PREVIOUS_WHITENING = DATA_DIR / "gradpyr64-lw-v1.npz"

_GREY = np.array([0.299, 0.587, 0.114], dtype=np.float32)


# ------------------------------------------------------------------------------------------
# Raw (unwhitened) features
# ------------------------------------------------------------------------------------------


def _tent_matrix(length: int, grid: int) -> np.ndarray:
    """(grid, length) pooling weights: overlapping tents (a Gaussian for grid 1), rows sum to 1."""
    x = np.arange(length, dtype=np.float64) + 0.5
    if grid == 1:
        w = np.exp(-0.5 * ((x - length / 2) / (0.35 * length)) ** 2)[None]
    else:
        width = length / grid
        centres = (np.arange(grid) + 0.5) * width
        w = np.maximum(0.0, 1.0 - np.abs(x[None] - centres[:, None]) / width)
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


@lru_cache(maxsize=None)
def _pooling_2d(length: int, grids: tuple[int, ...]) -> np.ndarray:
    """(length * length, cells) weights of every cell of every grid, cells in (grid, row, col) order."""
    cols = []
    for g in grids:
        t = _tent_matrix(length, g)  # (g, L)
        cols.append(np.einsum("ih,jw->hwij", t, t).reshape(length * length, g * g))
    return np.ascontiguousarray(np.concatenate(cols, axis=1), dtype=np.float32)


@lru_cache(maxsize=None)
def _directions() -> tuple[np.ndarray, np.ndarray]:
    ang = 2 * np.pi * np.arange(BINS) / BINS
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def _orientation_pyramid(grey: np.ndarray, grids: tuple[int, ...], folded: bool) -> list[np.ndarray]:
    """grey (n, L, L) -> per grid g: (n, g, g, BINS) pooled oriented-gradient energy, sqrt'ed."""
    n, length = grey.shape[0], grey.shape[1]
    gx = np.zeros_like(grey)
    gy = np.zeros_like(grey)
    gx[:, :, 1:-1] = grey[:, :, 2:] - grey[:, :, :-2]
    gy[:, 1:-1, :] = grey[:, 2:, :] - grey[:, :-2, :]
    mag = np.sqrt(gx * gx + gy * gy) + 1e-6
    ux, uy = gx / mag, gy / mag
    cos, sin = _directions()
    hist = np.empty((n, BINS, length, length), dtype=np.float32)
    r = np.empty_like(grey)
    for b in range(BINS):
        np.multiply(ux, cos[b], out=r)
        r += uy * sin[b]
        np.maximum(r, 0.0, out=r)
        np.multiply(r, r, out=r)  # cos^2, then cubed: cos^6 (TUNING_POWER)
        np.multiply(r * r, r, out=hist[:, b])
        hist[:, b] *= mag
    # One matrix product pools every cell of every grid (overlapping tent windows).
    pooled = (hist.reshape(n * BINS, length * length) @ _pooling_2d(length, grids)).reshape(n, BINS, -1)
    energy = mag.reshape(n, -1).mean(axis=1)[:, None, None] + 1e-3
    pooled = np.sqrt(np.maximum(pooled / energy, 0.0)).transpose(0, 2, 1)  # (n, cells, BINS)
    if folded:  # bins b and b + 180 degrees -> their sum (unsigned orientation) and |difference|
        a, b = pooled[..., : BINS // 2], pooled[..., BINS // 2:]
        pooled = np.concatenate([a + b, np.abs(a - b)], axis=-1)
    out, start = [], 0
    for g in grids:
        out.append(pooled[:, start:start + g * g, :].reshape(n, g, g, BINS))
        start += g * g
    return out


def _mirror_orientation_grid(g: int, folded: bool) -> np.ndarray:
    """Index permutation of a flattened (g, g, BINS) block under a horizontal mirror: a direction
    at angle t goes to 180 - t; folded, orientation u (mod 180) goes to -u, in both halves."""
    idx = np.arange(g * g * BINS).reshape(g, g, BINS)
    half = BINS // 2
    if folded:
        u = (-np.arange(half)) % half
        mirrored_bins = np.concatenate([u, u + half])
    else:
        mirrored_bins = (half - np.arange(BINS)) % BINS
    return idx[:, ::-1, :][:, :, mirrored_bins].reshape(-1)


def _mirror_grid(g: int, channels: int) -> np.ndarray:
    return np.arange(g * g * channels).reshape(g, g, channels)[:, ::-1, :].reshape(-1)


@lru_cache(maxsize=None)
def _mirror_permutation(folded: bool = True) -> np.ndarray:
    parts, offset = [], 0
    for g in GRIDS_FULL + GRIDS_HALF:
        parts.append(_mirror_orientation_grid(g, folded) + offset)
        offset += g * g * BINS
    parts.append(_mirror_grid(THUMB, 1) + offset)
    offset += THUMB * THUMB
    parts.append(_mirror_grid(COLOUR_GRID, 2) + offset)
    return np.concatenate(parts)


@lru_cache(maxsize=None)
def _flip_invariant_index(folded: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    perm = _mirror_permutation(folded)
    i = np.arange(len(perm))
    fixed = i[perm == i]
    first = i[i < perm]
    return fixed, first, perm[first]


def raw_dim() -> int:
    return len(_mirror_permutation())


def raw_features(batch: np.ndarray, version: str = VERSION) -> np.ndarray:
    """(n, INPUT_SIZE, INPUT_SIZE, 3) uint8 -> (n, raw_dim()) float32, flip-invariant, as
    descriptor ``version`` computes them."""
    folded = POLARITY_FOLDED[version]
    batch = np.asarray(batch)
    if batch.ndim != 4 or batch.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
        raise ValueError(f"expected (n, {INPUT_SIZE}, {INPUT_SIZE}, 3) uint8, got {batch.shape}")
    n = batch.shape[0]
    rgb = batch.astype(np.float32) * (1.0 / 255.0)
    grey = rgb @ _GREY
    half = grey.reshape(n, INPUT_SIZE // 2, 2, INPUT_SIZE // 2, 2).mean(axis=(2, 4))
    feats = _orientation_pyramid(grey, GRIDS_FULL, folded) + _orientation_pyramid(half, GRIDS_HALF, folded)
    parts = [f.reshape(n, -1) for f in feats]
    # Standardised grey thumbnail and colour-opponent means (scaled by the grey contrast).
    k = INPUT_SIZE // THUMB
    thumb = grey.reshape(n, THUMB, k, THUMB, k).mean(axis=(2, 4)).reshape(n, -1)
    mu = thumb.mean(axis=1, keepdims=True)
    sd = grey.std(axis=(1, 2))[:, None] + 0.02
    parts.append((thumb - mu) / sd * 0.5)
    o1 = (rgb[..., 0] - rgb[..., 1]) * 0.7071
    o2 = (rgb[..., 0] + rgb[..., 1] - 2 * rgb[..., 2]) * 0.4082
    c = INPUT_SIZE // COLOUR_GRID
    opp = np.stack([o1, o2], axis=-1).reshape(n, COLOUR_GRID, c, COLOUR_GRID, c, 2).mean(axis=(2, 4))
    parts.append(opp.reshape(n, -1) / sd)
    f = np.concatenate(parts, axis=1)
    fixed, first, second = _flip_invariant_index(folded)
    a, b = f[:, first], f[:, second]
    return np.concatenate([2 * f[:, fixed], a + b, np.abs(a - b)], axis=1).astype(np.float32)


def to_input(image: Image.Image, turn: bool = False) -> np.ndarray:
    """PIL image (lazily opened JPEGs decode at reduced size) -> (S, S, 3) uint8; ``turn``: upright
    by its EXIF orientation first."""
    image = draft(image, INPUT_SIZE)
    image = to_rgb(upright(image) if turn else image)
    small = image.resize((INPUT_SIZE, INPUT_SIZE), Image.BILINEAR, reducing_gap=2.0)
    return np.asarray(small, dtype=np.uint8)


# ------------------------------------------------------------------------------------------
# The learned whitening: saved, versioned, loaded like weights
# ------------------------------------------------------------------------------------------


@dataclass
class Whitening:
    """``v = l2_normalize((raw - mean) @ proj)``; ``meta`` records how it was fitted."""

    mean: np.ndarray  # (raw_dim,) float32
    proj: np.ndarray  # (raw_dim, dim) float32
    version: str = VERSION
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.proj.shape[1])

    def apply(self, raw: np.ndarray) -> np.ndarray:
        return l2_normalize((raw - self.mean) @ self.proj)

    def to_bytes(self) -> bytes:
        """Deterministic .npz bytes (fixed zip timestamps): same arrays -> same sha256."""
        arrays = {
            "mean": np.ascontiguousarray(self.mean, dtype=np.float32),
            "proj": np.ascontiguousarray(self.proj, dtype=np.float32),
            "version": np.array(self.version),
            "meta": np.array(json.dumps(self.meta, sort_keys=True)),
        }
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name in sorted(arrays):
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                arr_buf = io.BytesIO()
                np.lib.format.write_array(arr_buf, arrays[name], allow_pickle=False)
                zf.writestr(info, arr_buf.getvalue())
        return buf.getvalue()

    def save(self, path: str | Path) -> str:
        """Write the .npz; returns its sha256."""
        data = self.to_bytes()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(str(path) + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        return hashlib.sha256(data).hexdigest()

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "whitening") -> "Whitening":
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                w = cls(
                    mean=z["mean"].astype(np.float32),
                    proj=z["proj"].astype(np.float32),
                    version=str(z["version"]),
                    meta=json.loads(str(z["meta"])),
                )
        except Exception as exc:  # noqa: BLE001 - any format problem is a config problem
            raise ConfigError(f"{where} is not a default-descriptor whitening file (.npz): {exc}") from exc
        if w.version not in POLARITY_FOLDED:
            raise ConfigError(
                f"{where} was fitted for descriptor version {w.version!r}, this code computes "
                f"{', '.join(POLARITY_FOLDED)}; refit it with `python -m pipeline.embedders.default_fit`"
            )
        if w.mean.shape != (raw_dim(),) or w.proj.ndim != 2 or w.proj.shape[0] != raw_dim():
            raise ConfigError(f"{where} has shapes {w.mean.shape}/{w.proj.shape}, expected ({raw_dim()},)/({raw_dim()}, d)")
        return w


def shipped_whitening_for(identity: dict[str, Any]) -> str | None:
    """The path of the shipped whitening a corpus identity names (its sha256), when it is not
    the current one: corpora embedded with release 0.2's whitening search without a flag."""
    weights = str(identity.get("weights", ""))
    if PREVIOUS_WHITENING.is_file() and weights == "sha256:" + hashlib.sha256(PREVIOUS_WHITENING.read_bytes()).hexdigest():
        return str(PREVIOUS_WHITENING)
    return None


def load_whitening(url: str | None = None, storage: Storage | None = None,
                   pinned: str | None = None) -> tuple[Whitening, str]:
    """(whitening, sha256 of its file): the shipped one, or ``url`` (any fsspec URL)."""
    if url:
        data = read_bytes(url, storage)
        where = f"embedder.checkpoint {url!r}"
        if pinned and hashlib.sha256(data).hexdigest() != pinned.lower():
            raise ConfigError(f"{where} has sha256 {hashlib.sha256(data).hexdigest()}, not the pinned {pinned}")
    else:
        if not SHIPPED_WHITENING.is_file():
            raise ConfigError(
                f"the default descriptor's whitening {SHIPPED_WHITENING} is missing; "
                "reinstall the package or run `python -m pipeline.embedders.default_fit`"
            )
        data = SHIPPED_WHITENING.read_bytes()
        where = str(SHIPPED_WHITENING)
    return Whitening.from_bytes(data, where), hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------
# The embedder
# ------------------------------------------------------------------------------------------


def region_boxes(width: int, height: int, scales: tuple[float, ...] | list[float] = DEFAULT_REGION_SCALES,
                 step: float = DEFAULT_REGION_STEP) -> list[tuple[int, int, int, int]]:
    """The query-side grid of windows (:func:`pipeline.embedders.regions.grid_boxes`)."""
    from pipeline.embedders.regions import grid_boxes

    return grid_boxes(width, height, scales, step)


def value_view(image: Image.Image) -> Image.Image:
    """The image's :func:`~pipeline.embedders.base.value_channel` as the descriptor's input: where a
    hue rotation levelled two colours' luma, the descriptor (on luma) ranks a recoloured
    flat-colour copy's source far down, and this view of the query ranks it first again
    (docs/BENCHMARKS.md, the demo's colour copies)."""
    return value_channel(image).convert("RGB")


class DefaultDescriptor(Embedder):
    name = "default"
    dim = DIM

    def __init__(self, cfg: EmbedderConfig | None = None, storage: Storage | None = None):
        cfg = cfg or EmbedderConfig()
        if cfg.image_size is not None and cfg.image_size != INPUT_SIZE:
            raise ConfigError(
                f"the default descriptor works on {INPUT_SIZE} px inputs (its whitening is fitted "
                f"for them); leave embedder.image_size unset, got {cfg.image_size}"
            )
        self.whitening, self.sha256 = load_whitening(cfg.checkpoint, storage, cfg.checkpoint_sha256)
        self.dim = self.whitening.dim
        self.region_scales = tuple(float(x) for x in cfg.query_region_scales)
        self.region_step = float(cfg.query_region_step)
        if any(not 0.05 <= x <= 1.0 for x in self.region_scales):
            raise ConfigError(f"embedder.query_region_scales must lie in [0.05, 1], got {list(self.region_scales)}")
        if not 0.05 <= self.region_step <= 1.0:
            raise ConfigError(f"embedder.query_region_step must lie in [0.05, 1], got {self.region_step}")
        self.object_regions = int(cfg.query_object_regions)
        if self.object_regions < 0:
            raise ConfigError(f"embedder.query_object_regions must be >= 0, got {self.object_regions}")
        self.version = self.whitening.version  # an older whitening keeps its own features
        self.turn = cfg.exif_orientation

    def preprocess(self, image: Image.Image) -> np.ndarray:
        return to_input(image, self.turn)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        if len(batch) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.whitening.apply(raw_features(batch, self.version)).astype(np.float32)

    def embed_regions(self, image: Image.Image) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
        """The whole image and the grid's windows, then the windows on objects, then the whole
        image's :func:`value_view` (its box is the whole image's: the one box listed twice)."""
        from pipeline.embedders.regions import OBJECT_SIDES, object_boxes

        image = to_rgb(upright(image) if self.turn else image)
        boxes = region_boxes(image.width, image.height, self.region_scales, self.region_step)
        if self.region_scales:  # regions on: windows on objects too
            boxes += [b for b in object_boxes(image, self.object_regions) if b not in boxes]
        # Work on a copy just large enough that the smallest window still has >= 2x the
        # descriptor's input pixels (a boundary window of 0.15 of a side, >= 1.2x): every window
        # then costs about the same, small, resize.
        smallest = min((*self.region_scales, *(OBJECT_SIDES[:1] if self.object_regions else ())), default=1.0)
        work_side = int(np.ceil(2 * INPUT_SIZE / smallest))
        f = min(1.0, work_side / max(image.size))
        work = image.resize((max(1, round(image.width * f)), max(1, round(image.height * f))), Image.BILINEAR,
                            reducing_gap=2.0) if f < 1.0 else image
        sx, sy = work.width / image.width, work.height / image.height
        inputs = [to_input(work.crop((x0 * sx, y0 * sy, x1 * sx, y1 * sy))) for x0, y0, x1, y1 in boxes]
        if self.region_scales:  # regions on: the whole image once more, as its value channel
            inputs.append(to_input(value_view(work)))
            boxes.append(boxes[0])
        return self.embed(np.stack(inputs)), boxes

    def identity(self) -> dict[str, Any]:
        return {
            "embedder": self.name,
            "model": self.version,
            "weights": f"sha256:{self.sha256}",
            "dim": self.dim,
            "preprocess": with_upright(f"jpeg-draft,squash={INPUT_SIZE}x{INPUT_SIZE},bilinear", self.turn),
        }
