"""Image bytes the tests write into tars and query folders."""
from __future__ import annotations

import io

from PIL import Image


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def sideways_jpeg(image: Image.Image) -> bytes:
    """``image`` stored turned a quarter left with EXIF Orientation 6 ("turn right to view"), as
    phone cameras store photographs."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(image.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif.tobytes())
