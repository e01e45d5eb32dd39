"""The weight-free `default` descriptor: invariance to each edit, determinism, the saved
whitening, float16 safety, query-side regions, and the synthetic edit/photo API it relies on."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pipeline import synthetic_images as synthetic
from pipeline.config import EmbedderConfig
from pipeline.embedders import build_embedder
from pipeline.embedders.default import (
    INPUT_SIZE,
    SHIPPED_WHITENING,
    VERSION,
    DefaultDescriptor,
    Whitening,
    load_whitening,
    raw_dim,
    raw_features,
    region_boxes,
    value_view,
)
from pipeline.errors import ConfigError


@pytest.fixture(scope="module")
def emb() -> DefaultDescriptor:
    return DefaultDescriptor()


def _references() -> list[Image.Image]:
    """Photo tiles of the benchmark's corpus part when the dev extra is installed, plus scenes."""
    photos = [im for _, im in synthetic.photo_tiles(128, 3, 0)][::6][:5]
    return photos + [synthetic.scene(s, (360, 280)) for s in range(11, 16)]


def _others() -> list[Image.Image]:
    """100 images that are not the references: other scenes and photo tiles of another part."""
    photos = [im for _, im in synthetic.photo_tiles(128, 3, 1)][:40]
    return photos + [synthetic.scene(40_000 + s, (340, 260)) for s in range(100 - len(photos))]


@pytest.fixture(scope="module")
def bank(emb):
    refs, others = _references(), _others()
    assert len(others) == 100
    return refs, emb.embed_images(refs), emb.embed_images(others)


@pytest.mark.parametrize("edit", list(synthetic.EDITS))
def test_copy_scores_higher_with_its_reference_than_with_100_others(emb, bank, edit):
    refs, ref_vecs, other_vecs = bank
    for i, ref in enumerate(refs):
        copy = synthetic.apply_edit(edit, ref, seed=1000 + i)
        q = emb.embed_images([copy])[0]
        own = float(q @ ref_vecs[i])
        best_other = float((other_vecs @ q).max())
        assert own > best_other, f"{edit} copy of reference {i}: {own:.3f} vs other image {best_other:.3f}"


def test_pasted_object_is_found_by_the_query_regions(emb, bank):
    refs, ref_vecs, other_vecs = bank
    rng = np.random.default_rng(7)
    found = 0
    for i, ref in enumerate(refs):
        query, _ = synthetic.paste_object(ref, synthetic.scene(90_000 + i, (448, 336)), rng)
        vecs, boxes = emb.embed_regions(query)
        own = float((vecs @ ref_vecs[i]).max())
        best_other = float((vecs @ other_vecs.T).max())
        found += own > best_other
    # Region search narrows the list; local-feature verification (test_verify) finishes the job.
    assert found >= 0.7 * len(refs), f"only {found}/{len(refs)} pasted objects ranked first"


def _luma_levelled(image: Image.Image) -> Image.Image:
    """A recolouring that keeps every edge in the value channel and none in luma: each pixel
    becomes a blue-green of constant luma (35) whose value (blue) follows the source's luma."""
    luma = np.asarray(image.convert("L"), np.float32)
    blue = 60 + luma * 195 / 255
    green = (35 - 0.114 * blue) / 0.587
    return Image.fromarray(np.stack([np.zeros_like(blue), green, blue], -1).round().astype(np.uint8))


def test_a_copy_recoloured_to_flat_luma_is_found_through_the_value_view(emb, bank):
    refs, ref_vecs, other_vecs = bank
    for i, ref in list(enumerate(refs))[-3:]:  # procedural scenes: flat colours
        vecs, boxes = emb.embed_regions(_luma_levelled(ref))
        whole, value = vecs[0], vecs[-1]
        assert float(whole @ ref_vecs[i]) < float((other_vecs @ whole).max())  # lost on luma
        assert float(value @ ref_vecs[i]) > float((other_vecs @ value).max())  # found on value


def test_vectors_are_normalised_and_float16_safe(emb, bank):
    _, ref_vecs, other_vecs = bank
    v = np.concatenate([ref_vecs, other_vecs])
    assert v.dtype == np.float32 and v.shape[1] == emb.dim
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    h = v.astype(np.float16)
    assert np.isfinite(h).all()
    back = h.astype(np.float32)
    cos = (back * v).sum(axis=1) / np.linalg.norm(back, axis=1)
    assert cos.min() > 0.9999
    # Rankings survive the float16 round trip.
    assert ((back[:5] @ back.T).argmax(axis=1) == np.arange(5)).all()


def test_exact_flip_invariance(emb):
    batch = np.stack([emb.preprocess(synthetic.scene(s)) for s in range(3)])
    np.testing.assert_allclose(raw_features(batch[:, :, ::-1]), raw_features(batch), rtol=1e-4, atol=1e-5)


def test_preprocess_fixed_shape_for_any_mode_and_lazy_jpeg(emb):
    im = synthetic.scene(3, (400, 300))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    lazy = Image.open(io.BytesIO(buf.getvalue()))  # not loaded: decoded at reduced size (draft)
    inputs = [im, im.convert("L"), im.convert("RGBA"), im.convert("P"), lazy, im.resize((20, 900))]
    for x in inputs:
        arr = emb.preprocess(x)
        assert arr.shape == (INPUT_SIZE, INPUT_SIZE, 3) and arr.dtype == np.uint8
    full = emb.embed(np.stack([emb.preprocess(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))]))
    drafted = emb.embed(np.stack([emb.preprocess(Image.open(io.BytesIO(buf.getvalue())))]))
    assert float(full[0] @ drafted[0]) > 0.98


def test_same_vector_in_another_process(emb, tmp_path):
    images = [synthetic.scene(5), synthetic.scene(6, (200, 500))]
    here = emb.embed_images(images)
    script = (
        "import sys, numpy as np\n"
        "from pipeline import synthetic_images as synthetic\n"
        "from pipeline.embedders.default import DefaultDescriptor\n"
        "v = DefaultDescriptor().embed_images([synthetic.scene(5), synthetic.scene(6, (200, 500))])\n"
        f"np.save({str(tmp_path / 'v.npy')!r}, v)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    there = np.load(tmp_path / "v.npy")
    assert there.tobytes() == here.tobytes()


def test_identity_names_the_shipped_whitening(emb):
    import hashlib

    ident = emb.identity()
    assert set(ident) == {"embedder", "model", "weights", "dim", "preprocess"}
    assert ident["embedder"] == "default" and ident["model"] == VERSION and ident["dim"] == emb.dim
    assert ident["weights"] == "sha256:" + hashlib.sha256(SHIPPED_WHITENING.read_bytes()).hexdigest()
    json.dumps(ident)


def test_saved_whitening_reloads_bit_identically(emb, tmp_path):
    w, _ = load_whitening()
    path = tmp_path / "w.npz"
    sha = w.save(path)
    again, sha2 = load_whitening(str(path))
    assert sha == sha2
    assert again.mean.tobytes() == w.mean.tobytes() and again.proj.tobytes() == w.proj.tobytes()
    assert again.meta == w.meta and again.version == w.version
    assert again.to_bytes() == path.read_bytes()  # deterministic file: same arrays, same sha256
    # The shipped file round-trips to the same bytes too.
    assert w.to_bytes() == SHIPPED_WHITENING.read_bytes()


def test_the_previous_whitening_still_searches_corpora_embedded_with_it(emb):
    """Release 0.2's whitening ships beside the new one: embedder.checkpoint selects it and the
    identity (its sha256) is the one those corpora recorded."""
    import hashlib

    from pipeline.embedders.default import PREVIOUS_WHITENING

    old = build_embedder(EmbedderConfig(name="default", checkpoint=str(PREVIOUS_WHITENING)))
    assert old.identity()["weights"] == "sha256:" + hashlib.sha256(PREVIOUS_WHITENING.read_bytes()).hexdigest()
    assert old.identity()["weights"] != emb.identity()["weights"]
    img = synthetic.scene(4)
    assert float(old.embed_images([img])[0] @ old.embed_images([synthetic.apply_edit("jpeg", img, 1)])[0]) > 0.8


def test_checkpoint_points_to_an_alternative_whitening(emb, tmp_path):
    w, _ = load_whitening()
    rng = np.random.default_rng(0)
    alt = Whitening(mean=w.mean, proj=w.proj[:, :64] + rng.normal(0, 1e-3, (w.proj.shape[0], 64)).astype(np.float32),
                    meta={"note": "test"})
    path = tmp_path / "alt.npz"
    alt.save(path)
    other = build_embedder(EmbedderConfig(name="default", checkpoint=str(path)))
    assert other.dim == 64 and other.identity()["dim"] == 64
    assert other.identity()["weights"] != emb.identity()["weights"]
    assert other.embed_images([synthetic.scene(1)]).shape == (1, 64)


def test_bad_settings_fail_up_front(tmp_path):
    with pytest.raises(ConfigError, match="image_size"):
        DefaultDescriptor(EmbedderConfig(image_size=224))
    with pytest.raises(ConfigError, match="query_region_scales"):
        DefaultDescriptor(EmbedderConfig(query_region_scales=[1.5]))
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="whitening"):
        DefaultDescriptor(EmbedderConfig(checkpoint=str(bad)))
    w, _ = load_whitening()
    old = Whitening(mean=w.mean, proj=w.proj, version="some-old-version")
    old.save(tmp_path / "old.npz")
    with pytest.raises(ConfigError, match="refit"):
        DefaultDescriptor(EmbedderConfig(checkpoint=str(tmp_path / "old.npz")))


def test_embed_regions_boxes_and_vectors(emb):
    img = synthetic.scene(8, (448, 336))
    vecs, boxes = emb.embed_regions(img)
    assert boxes[0] == (0, 0, 448, 336)
    grid = region_boxes(448, 336)
    assert boxes[:len(grid)] == grid and len(boxes) == len(set(boxes)) + 1 == len(vecs) <= len(grid) + 17
    assert all(0 <= x0 < x1 <= 448 and 0 <= y0 < y1 <= 336 for x0, y0, x1, y1 in boxes)
    # last, the whole image's value channel
    assert boxes[-1] == boxes[0] and float(vecs[-1] @ emb.embed_images([value_view(img)])[0]) > 0.99
    grid_only = DefaultDescriptor(EmbedderConfig(query_object_regions=0))
    assert grid_only.embed_regions(img)[1] == grid + [grid[0]]
    assert float(vecs[0] @ emb.embed_images([img])[0]) > 0.99  # the whole image, resampled once more
    whole_only = DefaultDescriptor(EmbedderConfig(query_region_scales=[]))
    v1, b1 = whole_only.embed_regions(img)
    assert b1 == [(0, 0, 448, 336)] and v1.shape == (1, emb.dim)


def test_empty_batch(emb):
    assert emb.embed(np.zeros((0, INPUT_SIZE, INPUT_SIZE, 3), np.uint8)).shape == (0, emb.dim)
    assert raw_features(np.zeros((2, INPUT_SIZE, INPUT_SIZE, 3), np.uint8)).shape == (2, raw_dim())


def test_fit_is_reproducible_on_a_small_sample(tmp_path):
    from pipeline.embedders import default_fit

    a = default_fit.fit(n_scenes=40, copies_per_image=1, dim=16, verbose=False, devset_cache=None)
    b = default_fit.fit(n_scenes=40, copies_per_image=1, dim=16, verbose=False, devset_cache=None)
    assert a.to_bytes() == b.to_bytes()
    assert a.proj.shape == (raw_dim(), 16) and a.meta["procedural_scenes"] == 40
    a.save(tmp_path / "small.npz")
    small = DefaultDescriptor(EmbedderConfig(checkpoint=str(tmp_path / "small.npz")))
    assert small.embed_images([synthetic.scene(2)]).shape == (1, 16)


# --- synthetic: the public edit API -----------------------------------------------------------


def test_edits_are_deterministic_and_change_the_image():
    img = synthetic.scene(21)
    for name in synthetic.EDITS:
        a = synthetic.apply_edit(name, img, seed=3)
        b = synthetic.apply_edit(name, img, seed=3)
        assert a.mode == "RGB" and np.array_equal(np.asarray(a), np.asarray(b)), name
        same_size = a.size == img.size
        assert not (same_size and np.array_equal(np.asarray(a), np.asarray(img))), name


def test_paste_object_returns_the_pasted_box():
    src, dst = synthetic.scene(1, (300, 240)), synthetic.scene(2, (448, 336))
    out, (x0, y0, x1, y1) = synthetic.paste_object(src, dst, np.random.default_rng(0))
    assert out.size == dst.size
    assert 0 <= x0 < x1 <= 448 and 0 <= y0 < y1 <= 336
    assert 0.3 * 448 <= x1 - x0 <= 0.65 * 448
    a, d = np.asarray(out).astype(int), np.asarray(dst).astype(int)
    outside = np.ones(a.shape[:2], bool)
    outside[y0:y1, x0:x1] = False
    assert np.array_equal(a[outside], d[outside])  # only the box changed
    assert np.abs(a[y0:y1, x0:x1] - d[y0:y1, x0:x1]).mean() > 5


def test_photo_tiles_are_distinct_and_parts_disjoint():
    files = synthetic.real_photo_files()
    if not files:
        pytest.skip("no package with sample photographs installed (dev extra)")
    parts = [synthetic.photo_tiles(128, 3, p, out_short=None) for p in range(3)]
    names = [{n for n, _ in part} for part in parts]
    assert all(len(n) > 20 for n in names)
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    for _, im in parts[0][:5]:
        assert im.size == (128, 128) and im.mode == "RGB"


def test_scene_and_caption_stay_deterministic():
    assert np.array_equal(np.asarray(synthetic.scene(4)), np.asarray(synthetic.scene(4)))
    assert synthetic.caption(4) == synthetic.caption(4)


def test_object_windows_find_an_object_pasted_through_its_alpha():
    from pipeline.embedders.regions import object_boxes

    rng = np.random.default_rng(5)
    hits = 0
    for k in range(6):
        icon = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
        from PIL import ImageDraw

        d = ImageDraw.Draw(icon)
        d.ellipse([10, 10, 150, 150], fill=(230, 40 + 30 * k, 20, 255))
        d.rectangle([60, 30, 100, 130], fill=(20, 20, 200, 255))
        query, box = synthetic.paste_object(icon, synthetic.scene(700 + k, (448, 336)), rng)
        boxes = object_boxes(query, 8)
        assert 0 < len(boxes) <= 8
        iou = max(_iou(b, box) for b in boxes)
        hits += iou >= 0.5
    assert hits >= 4, hits


def test_boundary_windows_fit_a_pasted_picture_tightly():
    """A rectangular picture pasted into a scene (a framed painting, a page, a screen): one of
    the boundary cue's windows fits it with IoU >= 0.85, where the grid's best window does not."""
    from pipeline.embedders.regions import boundary_boxes, object_boxes

    rng = np.random.default_rng(11)
    tight, grid_tight = 0, 0
    for k in range(6):
        picture = synthetic.scene(900 + k, (300, 220))
        query, box = synthetic.paste_object(picture, synthetic.scene(800 + k, (448, 336)), rng)
        boxes = boundary_boxes(query, 4)
        assert 0 < len(boxes) <= 4 and all(0 <= b[0] < b[2] <= 448 and 0 <= b[1] < b[3] <= 336 for b in boxes)
        tight += max(_iou(b, box) for b in boxes) >= 0.85
        grid_tight += max(_iou(b, box) for b in region_boxes(448, 336)) >= 0.85
        both = object_boxes(query, 8)
        assert boxes == both[:4] and len(both) == len(set(both)) <= 8
    assert tight >= 5 and grid_tight <= 2, (tight, grid_tight)


def _iou(a, b) -> float:
    x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0, x1 - x0) * max(0, y1 - y0)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_transparency_is_composited_on_white():
    from pipeline.embedders.base import to_rgb

    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    rgb = to_rgb(rgba)
    assert rgb.mode == "RGB" and rgb.getpixel((5, 5)) == (255, 255, 255) and rgb.getpixel((0, 0)) == (10, 20, 30)
    with_regions = DefaultDescriptor(EmbedderConfig(query_object_regions=4))
    vecs, boxes = with_regions.embed_regions(synthetic.scene(3, (400, 300)))
    assert len(boxes) > len(region_boxes(400, 300)) + 1 and len(vecs) == len(boxes)
