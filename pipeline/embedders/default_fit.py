"""Fit the default descriptor's learned whitening on the development benchmark's fit split.

    python -m pipeline.embedders.default_fit                 # rewrites the shipped file
    python -m pipeline.embedders.default_fit --out my.npz    # an alternative (embedder.checkpoint)

Training images: the ``fit`` split of :mod:`pipeline.devset` (real photographs, icons,
paintings and rendered text from pinned Debian packages, fetched once into ``--devset-cache``;
the validation and test splits are never read), optionally with procedural scenes
(``--scenes``). Each image gets edited copies (:data:`pipeline.synthetic_images.EDITS` -- which
include 65%-area crops, 10 degree rotations and hue shifts that flip brightness -- plus strong
crops and pasted-object windows, which stand for the query-side regions); the whitening is the
"learned whitening" of Radenovic et al. (TPAMI 2018): whiten the covariance of (image - copy)
differences, then keep the directions of largest variance between images.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from PIL import Image

from pipeline import synthetic_images as synthetic
from pipeline.embedders.base import to_rgb
from pipeline.embedders.default import DIM, SHIPPED_WHITENING, VERSION, Whitening, raw_features, to_input

#: First procedural-scene seed of the fit set (the demo and tests use seeds below it).
FIT_SEED0 = 1_000_000
DEVSET_CACHE = "/tmp/replica-devset"


def strong_crop(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A window of 50-100% of each side: what a query-side region sees of a pasted object."""
    w, h = image.size
    fw, fh = rng.uniform(0.5, 1.0), rng.uniform(0.5, 1.0)
    cw, ch = max(8, round(w * fw)), max(8, round(h * fh))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return image.crop((x0, y0, x0 + cw, y0 + ch))


def fit_images(n_scenes: int = 0, devset_cache: str | None = DEVSET_CACHE,
               seed: int = 0) -> tuple[list[Image.Image], dict]:
    """Training images (RGBA kept: pasted-object windows use the alpha) and their description."""
    rng = np.random.default_rng(seed)
    images: list[Image.Image] = []
    for s in range(FIT_SEED0, FIT_SEED0 + n_scenes):
        w, h = int(rng.integers(200, 420)), int(rng.integers(160, 360))
        images.append(synthetic.scene(s, (w, h)))
    desc: dict = {"procedural_scenes": n_scenes, "procedural_seeds": [FIT_SEED0, FIT_SEED0 + n_scenes]}
    if devset_cache:
        from pipeline import devset
        from pipeline.layout.devset import MANIFEST

        fit = [it for it in devset.load(devset_cache, MANIFEST) if it.split == "fit"]
        images += [it.image() for it in fit]
        desc["devset_fit_images"] = {c: sum(it.category == c for it in fit) for c in devset.CATEGORIES}
        desc["devset_packages"] = [f"{name}={version}" for name, version in devset.PACKAGES]
    return images, desc


def paste_window(image: Image.Image, scene: Image.Image, rng: np.random.Generator) -> Image.Image:
    """``image``'s object pasted into ``scene``, seen through a window that is misaligned with
    the pasted box by up to a fifth of its size on each edge: what a query region sees."""
    pasted, (x0, y0, x1, y1) = synthetic.paste_object(image, scene, rng)
    bw, bh = x1 - x0, y1 - y0
    jx0, jx1, jy0, jy1 = rng.uniform(-0.2, 0.2, 4)
    wx0, wx1 = max(0, round(x0 + jx0 * bw)), min(pasted.width, round(x1 + jx1 * bw))
    wy0, wy1 = max(0, round(y0 + jy0 * bh)), min(pasted.height, round(y1 + jy1 * bh))
    return pasted.crop((wx0, wy0, max(wx1, wx0 + 8), max(wy1, wy0 + 8)))


def copies(image: Image.Image, rng: np.random.Generator, n: int, scenes: list[Image.Image]) -> list[Image.Image]:
    """``n`` edited copies of ``image``: the public edits, strong crops and pasted-object windows."""
    names = list(synthetic.EDITS) + ["strong_crop", "paste_window", "paste_window"]
    flat = to_rgb(image)
    out = []
    for _ in range(n):
        name = names[int(rng.integers(len(names)))]
        if name == "strong_crop":
            out.append(strong_crop(flat, rng))
        elif name == "paste_window":
            out.append(paste_window(image, scenes[int(rng.integers(len(scenes)))], rng))
        else:
            out.append(synthetic.EDITS[name](flat, rng))
    return out


def _features(images: list[Image.Image], batch: int = 256) -> np.ndarray:
    out = []
    for i in range(0, len(images), batch):
        out.append(raw_features(np.stack([to_input(im) for im in images[i:i + batch]])))
    return np.concatenate(out).astype(np.float64)


def learn_whitening(x: np.ndarray, x_copy: np.ndarray, pair_of: np.ndarray, dim: int = DIM,
                    shrink: float = 0.02) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Learned whitening from raw features ``x`` (images) and ``x_copy`` (copies of
    ``x[pair_of]``). Returns (mean, projection (D, dim), kept eigenvalues)."""
    mean = x.mean(axis=0)
    diff = x[pair_of] - x_copy
    c_intra = diff.T @ diff / len(diff)
    # Shrink towards the diagonal's mean: keeps rare directions from being blown up.
    c_intra = (1 - shrink) * c_intra + shrink * np.trace(c_intra) / len(c_intra) * np.eye(len(c_intra))
    evals, evecs = np.linalg.eigh(c_intra)
    p_intra = evecs @ np.diag(evals ** -0.5) @ evecs.T
    z = (x - mean) @ p_intra
    c_inter = z.T @ z / len(z)
    evals2, evecs2 = np.linalg.eigh(c_inter)
    order = np.argsort(evals2)[::-1][:dim]
    proj = p_intra @ evecs2[:, order]
    # Fix the eigenvectors' signs so a refit on the same data gives the same file.
    signs = np.sign(proj[np.abs(proj).argmax(axis=0), np.arange(proj.shape[1])])
    return mean, proj * signs, evals2[order]


def fit(n_scenes: int = 0, copies_per_image: int = 8, dim: int = DIM, seed: int = 0,
        shrink: float = 0.02, verbose: bool = True, devset_cache: str | None = DEVSET_CACHE) -> Whitening:
    t0 = time.perf_counter()
    images, desc = fit_images(n_scenes, devset_cache, seed=seed)
    rng = np.random.default_rng(seed + 1)
    copy_images, pair_of = [], []
    # Pasted-object windows land on the training set's larger pictures.
    scenes = [to_rgb(im) for im in images if min(im.size) >= 200] or [to_rgb(im) for im in images]
    for i, im in enumerate(images):
        for c in copies(im, rng, copies_per_image, scenes):
            copy_images.append(c)
            pair_of.append(i)
    if verbose:
        print(f"fit: {len(images)} images, {len(copy_images)} edited copies ({time.perf_counter() - t0:.0f}s)")
    x = _features([to_rgb(im) for im in images])
    x_copy = _features(copy_images)
    mean, proj, evals = learn_whitening(x, x_copy, np.asarray(pair_of), dim=dim, shrink=shrink)
    meta = {
        **desc,
        "copies_per_image": copies_per_image,
        "pairs": len(copy_images),
        "dim": dim,
        "shrink": shrink,
        "seed": seed,
        "method": "learned whitening (Radenovic et al. 2018): intra-pair whitening, then inter-image PCA",
        "eigenvalues_head": [round(float(e), 4) for e in evals[:8]],
    }
    if verbose:
        print(f"fit: done in {time.perf_counter() - t0:.0f}s")
    return Whitening(mean=mean.astype(np.float32), proj=proj.astype(np.float32), version=VERSION, meta=meta)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(SHIPPED_WHITENING), help="output .npz (default: the shipped file)")
    ap.add_argument("--scenes", type=int, default=0, help="procedural training scenes besides the real images")
    ap.add_argument("--copies", type=int, default=8, help="edited copies per training image")
    ap.add_argument("--devset-cache", default=DEVSET_CACHE, help="where the benchmark's packages are fetched to")
    ap.add_argument("--dim", type=int, default=DIM)
    ap.add_argument("--shrink", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    w = fit(args.scenes, args.copies, args.dim, args.seed, args.shrink, devset_cache=args.devset_cache)
    sha = w.save(args.out)
    print(f"wrote {args.out} ({w.version}, dim {w.dim}) sha256:{sha}")


if __name__ == "__main__":
    main()
