"""Local-feature verification: finds pasted objects and their boxes, survives edits and flips,
rejects unrelated pairs, and reads candidates from tars with one ranged read."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipeline import synthetic_images as synthetic
from pipeline.verify import Features, Verifier, load_candidate, verify


def _iou(a, b) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0, x1 - x0) * max(0, y1 - y0)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


#: Photographs with texture: local features need some (a blurred cell or a clear sky has
#: none to match, see docs/BENCHMARKS.md).
TEXTURED = ("astronaut", "coffee", "chelsea", "motorcycle_left", "china", "grace_hopper")


def _photos(n: int) -> list[Image.Image]:
    tiles = synthetic.photo_tiles(128, 3, 0)
    if not tiles:
        pytest.skip("no package with sample photographs installed (dev extra)")
    out = []
    for photo in TEXTURED:
        out += [im for name, im in tiles if name.split(":")[1].split("/")[0] == photo][:1]
    return out[:n]


@pytest.fixture(scope="module")
def verifier() -> Verifier:
    return Verifier()


@pytest.mark.parametrize("kind", ["photos", "flat shapes"])
def test_pasted_object_is_verified_with_its_box(verifier, kind):
    """Photographs with the default keypoints (SIFT); flat procedural shapes, whose few corners
    SIFT misses, with ORB (docs/BENCHMARKS.md compares the methods on real images)."""
    rng = np.random.default_rng(3)
    srcs = _photos(4) if kind == "photos" else [synthetic.scene(s, (380, 300)) for s in (31, 32)]
    verifier = verifier if kind == "photos" else Verifier(method="orb")
    for i, src in enumerate(srcs):
        query, box = synthetic.paste_object(src, synthetic.scene(500 + i + (4 if kind != "photos" else 0), (448, 336)),
                                            rng)
        r = verifier.verify(query, src)
        assert r.verified and r.inliers >= verifier.min_inliers, f"pair {i}: {r}"
        assert _iou(r.query_box, box) >= 0.5, f"pair {i}: found {r.query_box}, pasted {box}"
        cx0, cy0, cx1, cy1 = r.candidate_box
        assert 0 <= cx0 < cx1 <= src.width and 0 <= cy0 < cy1 <= src.height
        assert not r.flipped
        assert 0 < r.score < 1


def test_edited_copies_are_verified(verifier):
    src = _photos(1)[0]
    for k, edit in enumerate(("jpeg", "rotate", "crop", "resize", "colour", "greyscale", "combo")):
        copy = synthetic.apply_edit(edit, src, seed=50 + k)
        r = verifier.verify(copy, src)
        assert r.verified, f"{edit}: {r}"


def test_flipped_copy_is_verified_through_the_mirrored_query(verifier):
    src = _photos(2)[1]
    copy = synthetic.apply_edit("flip", src, seed=0)
    r = verifier.verify(copy, src)
    assert r.verified and r.flipped
    # The transform maps candidate pixels to query pixels, mirror included.
    m = r.transform
    x, y = 40.0, 70.0
    qx, qy = m[0, 0] * x + m[0, 1] * y + m[0, 2], m[1, 0] * x + m[1, 1] * y + m[1, 2]
    assert abs(qx - (copy.width - x)) < 4 and abs(qy - y) < 4
    no_flip = Verifier(try_flip=False).verify(copy, src)
    assert not no_flip.verified


def test_unrelated_pairs_are_rejected(verifier):
    photos = _photos(6)
    scenes = [synthetic.scene(s, (400, 300)) for s in range(60, 66)]
    pairs = [(photos[i], photos[(i + 1) % 6]) for i in range(6)]
    pairs += [(scenes[i], scenes[(i + 1) % 6]) for i in range(6)]
    pairs += [(photos[i], scenes[i]) for i in range(6)]
    # Two tiles of the same photograph (same look, different pixels) are not copies either.
    tiles = [im for name, im in synthetic.photo_tiles(128, 3, 0) if name.startswith("skimage:retina")]
    if len(tiles) >= 2:
        pairs.append((tiles[0], tiles[1]))
    for q, c in pairs:
        r = verifier.verify(q, c)
        assert not r.verified and r.score == 0 and r.query_box is None, r


def test_work_per_pair_is_bounded():
    v = Verifier(n_features=300, n_query_features=600, max_side=320, candidate_max_side=256)
    big = synthetic.scene(7, (1600, 1200))
    f = v.features(big)
    q = v.features(big, query=True)
    assert len(f) <= 300 and len(q) <= 600 and len(q.mirrored) <= 600
    assert f.scale == pytest.approx(256 / 1600) and q.scale == pytest.approx(320 / 1600)
    assert f.points[:, 0].max() < 1600 and f.points[:, 1].max() < 1200  # original pixels
    # small images are enlarged to 256 px, or to a smaller working side when one is asked for
    small = synthetic.scene(8, (100, 80))
    assert v.features(small).scale == pytest.approx(256 / 100)
    assert Verifier(candidate_max_side=192).features(small).scale == pytest.approx(192 / 100)


def test_verify_many_and_precomputed_features(verifier):
    src = _photos(3)[2]
    others = [synthetic.scene(s) for s in (70, 71)]
    query = synthetic.apply_edit("combo", src, seed=9)
    results = verifier.verify_many(query, [others[0], src, verifier.features(others[1])])
    assert [r.verified for r in results] == [False, True, False]
    qf = verifier.features(query, query=True)
    assert isinstance(qf, Features)
    again = verifier.verify(qf, src)
    assert again.inliers == results[1].inliers


def test_a_hue_rotation_that_inverts_luma_contrast_is_verified_on_the_value_channel():
    """Flat colour scenes rotated in hue: on luma the shapes' contrast flips and too few
    keypoints match; the retry on the value channel (max of R, G, B) finds the copy, and an
    unrelated scene tried first stays unverified. Only candidates whose value thumbnails
    correlate with the query's are retried."""
    from pipeline.verify import value_thumbnail

    luma_only, never_similar = Verifier(colour_retries=0), Verifier(colour_retry_min_corr=1.01)
    for seed in (4, 11):
        src = synthetic.scene(1000 + seed)
        query = synthetic.apply_edit("colour", src, seed=seed)
        assert not luma_only.verify_many(query, [src])[0].verified
        assert not never_similar.verify_many(query, [src])[0].verified
        unrelated, copied = Verifier().verify_many(query, [synthetic.scene(5), src])
        assert not unrelated.verified and copied.verified
        assert value_thumbnail(query) @ value_thumbnail(src) > 0.7 > value_thumbnail(query) @ value_thumbnail(
            synthetic.scene(5))


def _small_paste():
    """scikit-image's coffee photograph pasted at 15-20% of the width of its rocket photograph
    (1024 x 768): the source, the query, the pasted box, and a window around it."""
    photos = dict(synthetic.real_photos())
    if not {"skimage:coffee", "skimage:rocket"} <= photos.keys():
        pytest.skip("scikit-image's sample photographs are not installed (dev extra)")
    src, scene = photos["skimage:coffee"], photos["skimage:rocket"].resize((1024, 768))
    query, box = synthetic.paste_object(src, scene, np.random.default_rng(0), min_width=0.15, max_width=0.2)
    window = (max(0, box[0] - 40), max(0, box[1] - 30), min(query.width, box[2] + 40), min(query.height, box[3] + 30))
    return src, query, box, window


def _tar_rows(tmp_path, images) -> tuple[list[dict], list[bytes]]:
    """The images as JPEGs in one tar: embedding-row columns (tar_url, tar_offset, tar_size) and bytes."""
    tar_path, blobs = tmp_path / "00000.tar", []
    with tarfile.open(tar_path, "w") as tar:
        for k, im in enumerate(images):
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=92)
            blobs.append(buf.getvalue())
            info = tarfile.TarInfo(f"{k:09d}.jpg")
            info.size = len(blobs[-1])
            tar.addfile(info, io.BytesIO(blobs[-1]))
    with tarfile.open(tar_path) as tar:
        rows = [{"tar_url": str(tar_path), "tar_offset": m.offset_data, "tar_size": m.size} for m in tar.getmembers()]
    return rows, blobs


def test_a_small_pasted_object_is_verified_on_the_window_that_found_it():
    """A photograph pasted at 15-20% of a busy scene's width: the whole query's keypoints drown
    its matches, the query cropped to the window that found it verifies it, with the box and
    transform in whole-query pixels. A whole-image window, no window, ``window_retries=0`` or a
    retry spent on an earlier failure leave it unverified."""
    src, query, box, window = _small_paste()
    v = Verifier()
    assert not v.verify(query, src).verified
    unrelated, copied = v.verify_many(query, [synthetic.scene(5), src], [window, window])
    assert not unrelated.verified and copied.verified and copied.inliers >= 3 * v.min_inliers
    assert _iou(copied.query_box, box) >= 0.5, (copied.query_box, box)
    cx0, cy0, cx1, cy1 = copied.candidate_box
    centre = copied.transform @ np.array([(cx0 + cx1) / 2, (cy0 + cy1) / 2, 1.0])
    assert box[0] <= centre[0] <= box[2] and box[1] <= centre[1] <= box[3], (centre, box)
    assert not v.verify_many(query, [src], [(0, 0, *query.size)])[0].verified
    assert not v.verify_many(query, [src])[0].verified
    assert not Verifier(window_retries=0).verify_many(query, [src], [window])[0].verified
    assert not Verifier(window_retries=1).verify_many(query, [synthetic.scene(5), src], [window, window])[1].verified


def test_module_level_verify_and_tiny_images():
    src = synthetic.scene(80, (300, 240))
    assert verify(synthetic.apply_edit("jpeg", src, seed=1), src).verified
    tiny = Image.new("RGB", (8, 8), (120, 30, 30))
    assert not verify(tiny, src).verified  # no keypoints: a clean "no", not an error
    assert not verify(src, tiny).verified


def test_load_candidate_with_one_ranged_read(tmp_path):
    rows, blobs = _tar_rows(tmp_path, [synthetic.scene(s, (200, 150)) for s in (90, 91)])
    got = load_candidate(rows[1]["tar_url"], rows[1]["tar_offset"], rows[1]["tar_size"])
    assert got.size == (200, 150)
    assert np.array_equal(np.asarray(got), np.asarray(Image.open(io.BytesIO(blobs[1])).convert("RGB")))


def test_search_verification_retries_each_candidate_on_its_own_window(tmp_path, ray_local):
    """Search's verification stage (Ray tasks, candidates read from a tar) gives each candidate
    the box of the region that found it: ``Candidate.region`` numbers the regions of the whole
    batch, so the second query's window is found past the first query's regions."""
    from collections import Counter

    from pipeline.config import SearchConfig
    from pipeline.search import Candidate, verify_stage

    src, query, box, window = _small_paste()
    other = synthetic.scene(7, (400, 300))
    rows, _ = _tar_rows(tmp_path, [src, synthetic.scene(5)])
    boxes = [(0, 0, *other.size), (0, 0, 200, 150), (0, 0, *query.size), window]  # regions 0-1, then 2-3

    def candidates(region: int) -> list[list[Candidate]]:
        return [[Candidate(1, 0.5, 0.5, 1, row=rows[1])],
                [Candidate(0, 0.5, 0.5, region, row=rows[0]), Candidate(1, 0.4, 0.4, region, row=rows[1])]]

    found = candidates(3)
    counters = Counter()
    verify_stage([other, query], found, boxes, SearchConfig(), counters)
    copied, unrelated = found[1]
    assert copied.verify_score > 0 and _iou(copied.query_box, box) >= 0.5, (copied, box)
    assert copied.candidate_size == src.size
    assert unrelated.verify_score == 0 and found[0][0].verify_score == 0
    assert counters["pixels_fetched"] == 3
    whole = candidates(2)  # found by the whole query: nothing to retry
    verify_stage([other, query], whole, boxes, SearchConfig(), Counter())
    assert whole[1][0].verify_score == 0


@pytest.mark.parametrize("method", ["orb", "rootsift", "akaze"])
def test_every_keypoint_method_verifies_a_copy_and_rejects_another_image(method):
    """The methods docs/BENCHMARKS.md compares (the default, SIFT, runs in the tests above)."""
    v = Verifier(method=method)
    src, other = _photos(2)
    assert v.verify(synthetic.apply_edit("jpeg", src, seed=3), src).verified
    assert not v.verify(synthetic.apply_edit("jpeg", src, seed=3), other).verified
    with pytest.raises(ValueError, match="method"):
        Verifier(method="surf")
