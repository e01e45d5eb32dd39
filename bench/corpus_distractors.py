"""Extra corpus images that copy nothing, for measuring copy detection against a larger corpus.

A split of the development benchmark has a few hundred corpus images; LAION has billions. What
a bigger corpus does to detection is the competition it adds at the head of each query window's
list: images whose texture, colours or layout resemble the copied part. These distractors are
made of real images -- the fit split's, never the validation or test split's, so none copies a
reference that is measured -- cut and recombined the way web images are: crops of 15-100% of
the area at aspect ratios 1:2 to 2:1, mirrored, colour-shifted, one image's crop pasted onto
another's, and 2x2 collages. Image ``i`` is drawn from its own seed, so any one of them can be
made again without the others (verification fetches only the pool's).

    python bench/corpus_distractors.py --count 24 --out /tmp/distractors   # look at some
"""
from __future__ import annotations

import argparse
import io
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pipeline import devset  # noqa: E402

#: longest side of the source images and of the distractors made from them
SIDE = 384
COLLAGE = 256


class CorpusDistractors:
    """``n`` distractor images made from the fit split's images (``items``), image ``i`` from seed
    ``(seed, i)``."""

    def __init__(self, items: list[devset.Item], n: int, seed: int = 0):
        self.n, self.seed = n, seed
        self.sources = []
        for it in items:
            if it.split == "fit":
                image = devset.flatten(it.image())
                image.thumbnail((SIDE, SIDE))
                self.sources.append(image)
        if n and not self.sources:
            raise SystemExit("corpus distractors are made from the fit split's images: it has none")

    def __len__(self) -> int:
        return self.n

    def image(self, i: int) -> Image.Image:
        rng = np.random.default_rng((self.seed, i))
        kind = rng.random()
        base = self._crop(rng)
        if kind < 0.5:
            return base
        if kind < 0.8:  # a crop of one image pasted onto another's
            base = base.resize((max(base.width, 160), max(base.height, 160)))
            part = self._crop(rng)
            scale = rng.uniform(0.3, 0.6) * base.width / part.width
            part = part.resize((max(8, round(part.width * scale)), max(8, min(round(part.height * scale), base.height))))
            base.paste(part, (int(rng.integers(0, base.width - part.width + 1)),
                              int(rng.integers(0, base.height - part.height + 1))))
            return base
        canvas = Image.new("RGB", (COLLAGE, COLLAGE))
        half = COLLAGE // 2
        for k in range(4):
            canvas.paste(self._crop(rng).resize((half, half)), ((k % 2) * half, (k // 2) * half))
        return canvas

    def jpeg(self, i: int) -> bytes:
        """Image ``i`` as the corpus stores it: JPEG q90."""
        buf = io.BytesIO()
        self.image(i).save(buf, format="JPEG", quality=90)
        return buf.getvalue()

    def _crop(self, rng: np.random.Generator) -> Image.Image:
        image = self.sources[int(rng.integers(len(self.sources)))]
        area, aspect = rng.uniform(0.15, 1.0), np.exp(rng.uniform(-0.7, 0.7))
        w = min(image.width, max(8, round(image.width * np.sqrt(area * aspect))))
        h = min(image.height, max(8, round(image.height * np.sqrt(area / aspect))))
        x, y = int(rng.integers(0, image.width - w + 1)), int(rng.integers(0, image.height - h + 1))
        out = image.crop((x, y, x + w, y + h))
        if rng.random() < 0.5:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        if rng.random() < 0.3:
            out = ImageEnhance.Color(out).enhance(rng.uniform(0.3, 1.7))
        return out


def main() -> None:
    from pipeline.layout.devset import MANIFEST

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=24, help="how many distractors to write")
    ap.add_argument("--out", required=True, help="folder for the JPEGs (distractor-000000.jpg, ...)")
    ap.add_argument("--cache", default="/tmp/replica-devset", help="the development benchmark's package cache")
    args = ap.parse_args()
    made = CorpusDistractors(devset.load(args.cache, MANIFEST), args.count)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(args.count):
        (out / f"distractor-{i:06d}.jpg").write_bytes(made.jpeg(i))
    print(f"wrote {args.count} distractors to {out}")


if __name__ == "__main__":
    main()
