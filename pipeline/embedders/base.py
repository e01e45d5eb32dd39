"""The embedder interface every descriptor implements.

The embed stage splits work in two so that decoding scales on CPU workers while the model
runs in an actor (on a GPU when there is one):

* ``preprocess(image)`` runs on CPU decode workers: PIL image -> fixed-shape uint8 array.
  uint8 keeps what crosses the Ray object store four times smaller than float32.
* ``embed(batch)`` runs in the embedding actor: (n, *input_shape) uint8 -> (n, dim) float32,
  L2-normalised rows.

``identity()`` is recorded with every output; two outputs whose identities differ are never
mixed (see :func:`pipeline.layout.embeddings.check_same_identity`).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
from PIL import Image


class Embedder(ABC):
    #: registry name ("default", "open_clip", "sscd", "dino")
    name: str
    #: output dimension
    dim: int

    @abstractmethod
    def preprocess(self, image: Image.Image) -> np.ndarray:
        """Decoded RGB image -> fixed-shape uint8 array, cheap enough for a CPU worker."""

    @abstractmethod
    def embed(self, batch: np.ndarray) -> np.ndarray:
        """(n, *input_shape) uint8 -> (n, dim) float32, each row L2-normalised."""

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """Everything that changes the vectors: name, weights id, preprocessing, dim."""

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        """Convenience for small query sets: preprocess then embed in one process."""
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.embed(np.stack([self.preprocess(im) for im in images]))

    def embed_regions(self, image: Image.Image) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
        """Query side: vectors of several regions of one image and their boxes (x0, y0, x1, y1).

        The default is the whole image only; descriptors that support region search override it.
        """
        w, h = image.size
        return self.embed_images([image]), [(0, 0, w, h)]


#: the preprocessing step added to an identity's ``preprocess`` when images are turned upright first
UPRIGHT_STEP = "exif-upright"
#: EXIF Orientation tag value -> the transpose that shows the image as a viewer does
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


def upright(image: Image.Image) -> Image.Image:
    """The image as viewers show it: turned by its EXIF Orientation tag (phone photographs are
    stored sideways with a tag saying so). The tag is dropped from the result, so a second call
    does nothing. Call :func:`draft` first: turning decodes the image."""
    method = _UPRIGHT.get(_orientation(image))
    if method is None:
        return image
    turned = image.transpose(method)
    for key in ("exif", "xmp", "XML:com.adobe.xmp", "Raw profile type exif"):
        turned.info.pop(key, None)
    return turned


def viewed_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) as viewers show the image (:func:`upright`), without decoding it."""
    w, h = image.size
    return (h, w) if _orientation(image) in (5, 6, 7, 8) else (w, h)


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a malformed EXIF block is ignored, as viewers ignore it
        return 1


def with_upright(preprocess: str, turned: bool) -> str:
    """An identity's ``preprocess`` text, naming the upright step when images are turned first."""
    return f"{UPRIGHT_STEP},{preprocess}" if turned else preprocess


def value_channel(image: Image.Image) -> Image.Image:
    """The value channel, the largest of R, G and B, as a grey image: a hue rotation keeps it,
    where it can level two colours' luma and erase the edge between them."""
    return Image.fromarray(np.asarray(to_rgb(image)).max(axis=2))


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparency composited on white (as img2dataset stores such images): dropping
    the alpha channel instead would show whatever colour the transparent pixels happen to hold.
    16-bit and float images are scaled to their own range (PIL's own conversion clips them to
    255, which turns most 16-bit photographs white)."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        a = np.asarray(image, dtype=np.float32)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        return Image.fromarray(a.astype(np.uint8), "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        out = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        out.alpha_composite(rgba)
        return out.convert("RGB")
    return image.convert("RGB")


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def resize_short_side(image: Image.Image, short: int) -> Image.Image:
    w, h = image.size
    scale = short / min(w, h)
    return image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def draft(image: Image.Image, side: int) -> Image.Image:
    """Let a lazily opened JPEG decode at the smallest DCT scale whose sides are still >= ``side``
    (a 1/2, 1/4 or 1/8 decode costs that much less); other images are left alone."""
    if getattr(image, "format", None) == "JPEG":
        try:
            image.draft("RGB", (side, side))  # no-op once the image is loaded
        except Exception:  # noqa: BLE001 - draft is only an optimisation
            pass
    return image


def square_crop_uint8(image: Image.Image, size: int, turn: bool = True) -> np.ndarray:
    """Resize the short side to ``size``, centre-crop a square: (size, size, 3) uint8. A JPEG
    decodes at reduced size when it is larger than it needs to be (:func:`draft`); ``turn``: upright
    first (:func:`upright`)."""
    image = draft(image, size)
    image = upright(image) if turn else image
    return np.asarray(center_crop(resize_short_side(to_rgb(image), size), size), dtype=np.uint8)
