"""Procedural images that stand in for a web corpus when no data can be downloaded.

Deterministic: the same seed gives the same picture in every process.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

WORDS = ["red", "blue", "green", "bright", "dark", "old", "small", "large", "striped", "round"]
NOUNS = ["house", "boat", "tree", "car", "cat", "mountain", "chair", "flower", "bridge", "lamp"]


def scene(seed: int, size: tuple[int, int] = (320, 256)) -> Image.Image:
    """A textured background with random shapes: distinct per seed, natural-ish statistics."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(0, 255, 3)
    grad = rng.uniform(-0.6, 0.6, (3, 2))
    img = np.stack([base[c] + grad[c, 0] * xx + grad[c, 1] * yy for c in range(3)], axis=-1)
    for _ in range(3):  # low-frequency texture
        fx, fy, ph = rng.uniform(0.01, 0.08), rng.uniform(0.01, 0.08), rng.uniform(0, 6.3)
        img += rng.uniform(10, 40) * np.sin(fx * xx + fy * yy + ph)[..., None] * rng.uniform(-1, 1, 3)
    img += rng.normal(0, 6, img.shape)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    _draw_shapes(ImageDraw.Draw(pil), rng, size)
    return pil


def flat_scene(seed: int, size: tuple[int, int] = (320, 256)) -> Image.Image:
    """Shapes on a smooth gradient: ~1 ms, for corpora grown to millions (``scene`` takes ~15)."""
    rng = np.random.default_rng(seed)
    corners = rng.integers(0, 256, (2, 2, 3), dtype=np.uint8)
    pil = Image.fromarray(corners).resize(size, Image.BILINEAR)
    _draw_shapes(ImageDraw.Draw(pil), rng, size)
    return pil


def _draw_shapes(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: tuple[int, int]) -> None:
    w, h = size
    for _ in range(rng.integers(4, 12)):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        x1, y1 = x0 + rng.integers(10, w // 2), y0 + rng.integers(10, h // 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.rectangle([x0, y0, x1, y1], fill=colour)
        elif kind == 1:
            draw.ellipse([x0, y0, x1, y1], fill=colour)
        else:
            pts = [(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(3)]
            draw.polygon(pts, fill=colour)


def caption(seed: int) -> str:
    rng = np.random.default_rng(seed + 7919)
    return f"a {rng.choice(WORDS)} {rng.choice(NOUNS)} near a {rng.choice(WORDS)} {rng.choice(NOUNS)}"


# --------------------------------------------------------------------------------------------
# Edits: what a copy looks like. Each edit is ``edit(image, rng) -> image`` (RGB in, RGB out),
# deterministic for a given ``numpy.random.Generator`` state. The benchmark, the tests and the
# demo plant copies with these; ``EDITS`` is the public table.
# --------------------------------------------------------------------------------------------

from typing import Callable  # noqa: E402

import io  # noqa: E402

from PIL import ImageEnhance  # noqa: E402

Edit = Callable[[Image.Image, np.random.Generator], Image.Image]


def _rgb(image: Image.Image) -> Image.Image:
    from pipeline.embedders.base import to_rgb

    return to_rgb(image)


def edit_resize(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Rescale by 0.35x-1.6x, keeping the aspect ratio."""
    image = _rgb(image)
    s = float(rng.choice([rng.uniform(0.35, 0.8), rng.uniform(1.2, 1.6)]))
    w, h = image.size
    return image.resize((max(16, round(w * s)), max(16, round(h * s))), Image.BICUBIC)


def edit_crop(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Keep 65-90% of the area (random aspect within that), at a random position."""
    image = _rgb(image)
    w, h = image.size
    area = rng.uniform(0.65, 0.90)
    aspect = rng.uniform(-0.15, 0.15)  # log ratio of the kept width share to the kept height share
    fw = min(1.0, np.sqrt(area) * np.exp(aspect))
    fh = min(1.0, area / fw)
    cw, ch = max(8, round(w * fw)), max(8, round(h * fh))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return image.crop((x0, y0, x0 + cw, y0 + ch))


def edit_jpeg(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Recompress as JPEG at quality 15-35."""
    buf = io.BytesIO()
    _rgb(image).save(buf, format="JPEG", quality=int(rng.integers(15, 36)))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def edit_colour(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Colour change: hue rotation anywhere up to +-180 degrees (large ones flip which colours are
    the brighter: yellow on blue becomes blue on yellow), saturation 0.4-1.8x, per-channel gains."""
    image = _rgb(image)
    hsv = np.asarray(image.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(rng.integers(-128, 129))) % 256
    out = Image.fromarray(hsv, "HSV").convert("RGB")
    out = ImageEnhance.Color(out).enhance(float(rng.uniform(0.4, 1.8)))
    gains = rng.uniform(0.8, 1.2, 3)
    arr = np.asarray(out).astype(np.float32) * gains
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def edit_brightness_contrast(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Brightness 0.6-1.4x and contrast 0.6-1.5x."""
    image = _rgb(image)
    image = ImageEnhance.Brightness(image).enhance(float(rng.uniform(0.6, 1.4)))
    return ImageEnhance.Contrast(image).enhance(float(rng.uniform(0.6, 1.5)))


def edit_greyscale(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Greyscale (returned as RGB)."""
    return _rgb(image).convert("L").convert("RGB")


def edit_flip(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Horizontal mirror."""
    return _rgb(image).transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def edit_rotate(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Rotate by 3-10 degrees either way, same canvas, black, grey or white corners."""
    angle = float(rng.uniform(3, 10)) * (1 if rng.random() < 0.5 else -1)
    fill = (0, 128, 255)[int(rng.integers(3))]
    return _rgb(image).rotate(angle, resample=Image.BICUBIC, expand=False, fillcolor=(fill, fill, fill))


#: The single edits, by name.
SINGLE_EDITS: dict[str, Edit] = {
    "resize": edit_resize,
    "crop": edit_crop,
    "jpeg": edit_jpeg,
    "colour": edit_colour,
    "brightness_contrast": edit_brightness_contrast,
    "greyscale": edit_greyscale,
    "flip": edit_flip,
    "rotate": edit_rotate,
}


def edit_combo(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """2-4 different single edits in random order (JPEG, when drawn, comes last, as on the web)."""
    names = list(SINGLE_EDITS)
    chosen = [names[i] for i in rng.choice(len(names), size=int(rng.integers(2, 5)), replace=False)]
    chosen.sort(key=lambda n: n == "jpeg")
    for name in chosen:
        image = SINGLE_EDITS[name](image, rng)
    return image


#: Every image-to-image edit: the single ones plus "combo" (several at once).
EDITS: dict[str, Edit] = {**SINGLE_EDITS, "combo": edit_combo}


def apply_edit(name: str, image: Image.Image, seed: int) -> Image.Image:
    """``EDITS[name]`` with its own generator: the same (name, image, seed) gives the same copy."""
    return EDITS[name](image, np.random.default_rng(seed))


def paste_object(
    src: Image.Image,
    dst: Image.Image,
    rng: np.random.Generator,
    min_width: float = 0.35,
    max_width: float = 0.6,
    min_part: float = 0.6,
) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Copy an "object" of ``src`` into the scene ``dst``.

    The object is a region of ``src`` covering ``min_part``-100% of each side (all of it when
    ``src`` has transparency: the object is then pasted through its alpha, as a cut-out). It is
    rescaled (aspect kept) to ``min_width``-``max_width`` of ``dst``'s width (and at most 80% of
    its height) and pasted at a random position. Returns the new image and the pasted box
    ``(x0, y0, x1, y1)`` in ``dst`` pixels (x1/y1 exclusive).
    """
    cutout = src.mode in ("RGBA", "LA", "PA")
    src, dst = (src.convert("RGBA") if cutout else _rgb(src)), _rgb(dst).copy()
    if cutout:
        min_part = 1.0
    sw, sh = src.size
    fw, fh = rng.uniform(min_part, 1.0), rng.uniform(min_part, 1.0)
    ow, oh = max(8, round(sw * fw)), max(8, round(sh * fh))
    ox, oy = int(rng.integers(0, sw - ow + 1)), int(rng.integers(0, sh - oh + 1))
    obj = src.crop((ox, oy, ox + ow, oy + oh))
    dw, dh = dst.size
    scale = rng.uniform(min_width, max_width) * dw / ow
    scale = min(scale, 0.8 * dh / oh)
    pw, ph = max(8, round(ow * scale)), max(8, round(oh * scale))
    obj = obj.resize((pw, ph), Image.BICUBIC)
    x0, y0 = int(rng.integers(0, dw - pw + 1)), int(rng.integers(0, dh - ph + 1))
    dst.paste(obj, (x0, y0), obj if cutout else None)
    return dst, (x0, y0, x0 + pw, y0 + ph)


# --------------------------------------------------------------------------------------------
# Real photographs that ship inside installed packages (scikit-image, matplotlib,
# scikit-learn: all in the ``dev`` extra). Missing packages are skipped, so the runtime install
# works without them; callers fall back to procedural scenes.
# --------------------------------------------------------------------------------------------

# Natural photographs only, whose tiles are distinct images: no drawings, binary masks or
# chessboards, not the right half of a stereo pair (it would duplicate the left one), and no
# seamless textures (brick, grass, gravel) or text pages, whose tiles repeat each other.
_SKIMAGE_PHOTOS = (
    "astronaut.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png", "coffee.png",
    "coins.png", "color.png", "hubble_deep_field.jpg", "ihc.png", "moon.png", "motorcycle_left.png",
    "retina.jpg", "rocket.jpg",
)
_MATPLOTLIB_PHOTOS = ("grace_hopper.jpg",)
_SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")


def _package_dir(module: str) -> str | None:
    import importlib.util
    import os

    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    return os.path.dirname(spec.origin)


def real_photo_files() -> list[tuple[str, str]]:
    """``(name, path)`` of every bundled photograph found in the installed packages."""
    import os

    found: list[tuple[str, str]] = []
    sources = [
        ("skimage", _package_dir("skimage.data"), "", _SKIMAGE_PHOTOS),
        ("matplotlib", _package_dir("matplotlib"), "mpl-data/sample_data", _MATPLOTLIB_PHOTOS),
        ("sklearn", _package_dir("sklearn.datasets"), "images", _SKLEARN_PHOTOS),
    ]
    for package, base, sub, names in sources:
        if base is None:
            continue
        for name in names:
            path = os.path.join(base, sub, name)
            if os.path.isfile(path):
                found.append((f"{package}:{name.rsplit('.', 1)[0]}", path))
    return found


def real_photos() -> list[tuple[str, Image.Image]]:
    """The bundled photographs as RGB images (empty when none of the packages is installed)."""
    out = []
    for name, path in real_photo_files():
        with Image.open(path) as im:
            out.append((name, im.convert("RGB")))
    return out


def photo_tiles(
    tile: int = 160,
    parts: int = 1,
    part: int = 0,
    out_short: int | None = 256,
    min_std: float = 24.0,
    max_dark: float = 0.2,
) -> list[tuple[str, Image.Image]]:
    """Cut every bundled photograph into non-overlapping ``tile``-pixel squares: distinct images.

    Tiles of one photo are assigned to ``parts`` disjoint groups in a diagonal pattern (tile
    (i, j) belongs to group ``(i + j) % parts``) so that, e.g., the whitening fit, the corpus
    and the distractors of the benchmark never share pixels. Tiles that are not distinct images
    are dropped: flat ones (grey standard deviation below ``min_std``: sky, walls) and mostly
    black ones (more than ``max_dark`` of the pixels below 16: the borders of the retina and
    deep-field photos, which all look alike).
    Tiles are upscaled to ``out_short`` pixels (None: left at ``tile``).
    """
    out = []
    for name, photo in real_photos():
        w, h = photo.size
        grey = np.asarray(photo.convert("L"), dtype=np.float32)
        for i in range(h // tile):
            for j in range(w // tile):
                if (i + j) % parts != part:
                    continue
                box = (j * tile, i * tile, (j + 1) * tile, (i + 1) * tile)
                g = grey[box[1]:box[3], box[0]:box[2]]
                if g.std() < min_std or (g < 16).mean() > max_dark:
                    continue
                im = photo.crop(box)
                if out_short and out_short != tile:
                    im = im.resize((out_short, out_short), Image.LANCZOS)
                out.append((f"{name}/{i}_{j}", im))
    return out
