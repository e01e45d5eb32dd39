"""Carlini et al.'s normalised L2 against cases computed by hand."""
from __future__ import annotations

import numpy as np
from PIL import Image

from pipeline.nl2 import nl2_of_images, normalized_l2, pixels


def test_normalized_l2_by_hand():
    q = np.zeros(4)
    a = np.array([1.0, 0, 0, 0])  # l2 = 1
    b = np.array([1.0, 1, 1, 1])  # l2 = 2
    c = np.array([3.0, 0, 4, 0])  # l2 = 5
    # S(g) = {a, b}: mean l2 1.5, times alpha 0.5 = 0.75
    got = normalized_l2(q, np.stack([a, b, c]), np.stack([a, b]))
    np.testing.assert_allclose(got, [1 / 0.75, 2 / 0.75, 5 / 0.75])
    # alpha 1 and the whole set as reference: mean (1 + 2 + 5) / 3
    np.testing.assert_allclose(normalized_l2(q, np.stack([a]), np.stack([a, b, c]), alpha=1.0), [3 / 8])
    # every reference an exact copy: 0 for a copy, infinity otherwise
    np.testing.assert_array_equal(normalized_l2(q, np.stack([q, a]), np.stack([q, q])), [0.0, np.inf])


def test_nl2_on_pixels_by_hand():
    black = Image.new("RGB", (100, 80), (0, 0, 0))
    grey = Image.new("RGB", (30, 30), (51, 51, 51))  # 0.2 in every channel
    white = Image.new("RGB", (64, 200), (255, 255, 255))
    assert pixels(black).shape == (64 * 64 * 3,) and pixels(white).max() == 1.0
    np.testing.assert_allclose(pixels(grey), 0.2, atol=1e-6)
    # l2(black, grey) = 0.2 * sqrt(d), l2(black, white) = sqrt(d); S = both: mean 0.6 sqrt(d), times 0.5
    scores, used = nl2_of_images(black, [grey, white], n=50)
    assert used == 2
    np.testing.assert_allclose(scores, [0.2 / 0.3, 1 / 0.3], rtol=1e-5)
    # n = 1: only the best candidate (grey) stands for the neighbours
    scores, used = nl2_of_images(black, [grey, white], n=1)
    assert used == 1
    np.testing.assert_allclose(scores, [2.0, 10.0], rtol=1e-5)


def test_nl2_of_rows_fetches_the_candidates_from_their_tar(tmp_path):
    import io
    import tarfile

    from pipeline.nl2 import nl2_of_rows

    colours = [(0, 0, 0), (51, 51, 51), (255, 255, 255)]
    tar_path = tmp_path / "000000.tar"
    with tarfile.open(tar_path, "w") as tf:
        for i, colour in enumerate(colours):
            buf = io.BytesIO()
            Image.new("RGB", (80, 80), colour).save(buf, format="PNG")
            info = tarfile.TarInfo(f"{i:04d}.png")
            info.size = len(buf.getvalue())
            tf.addfile(info, io.BytesIO(buf.getvalue()))
    with tarfile.open(tar_path) as tf:
        rows = [{"tar_url": str(tar_path), "tar_offset": m.offset_data, "tar_size": m.size} for m in tf.getmembers()]
    query = Image.new("RGB", (64, 64), (0, 0, 0))
    # references grey and white; the nL2 of grey, and of black, an exact copy outside the references
    scores, used = nl2_of_rows(query, rows[1:], [rows[1], rows[0]], None)
    assert used == 2
    np.testing.assert_allclose(scores, [0.2 / 0.3, 0.0], atol=1e-6)


def test_nl2_leaves_out_images_without_pixels(tmp_path):
    from pipeline.nl2 import nl2_of_rows

    tar_path = tmp_path / "000000.tar"
    import io
    import tarfile

    with tarfile.open(tar_path, "w") as tf:
        for name, data in (("0000.png", None), ("0001.jpg", b"not an image")):
            if data is None:
                buf = io.BytesIO()
                Image.new("RGB", (64, 64), (51, 51, 51)).save(buf, format="PNG")
                data = buf.getvalue()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with tarfile.open(tar_path) as tf:
        grey, junk = [{"tar_url": str(tar_path), "tar_offset": m.offset_data, "tar_size": m.size}
                      for m in tf.getmembers()]
    imported = {"tar_url": None, "tar_offset": None, "tar_size": None}  # released embeddings: no pixels
    missing = {"tar_url": str(tmp_path / "gone.tar"), "tar_offset": 0, "tar_size": 10}
    query = Image.new("RGB", (64, 64), (0, 0, 0))
    scores, used = nl2_of_rows(query, [grey, junk, imported, missing], [grey, imported, junk], None)
    assert used == 1 and scores[1] is None and scores[2] is None
    np.testing.assert_allclose(scores[0], 1 / 0.5, rtol=1e-5)  # the only reference: l2 / (0.5 * l2)
    assert nl2_of_rows(query, [imported], [imported], None) == ([None], 0)
