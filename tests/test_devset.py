"""The development benchmark's data rules, on images made here (the real packages are fetched
by the bench, never by the tests): near-duplicates dropped, splits by source, the manifest."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline import devset
from pipeline import synthetic_images as synthetic


def _item(name: str, image: Image.Image, group: str, category: str = "photo") -> devset.Item:
    return devset.Item(name, category, "pkg", "1.0", group, lambda image=image: image)


def test_splits_follow_sources_and_near_duplicates_are_dropped(tmp_path):
    items = []
    for s in range(60):
        scene = synthetic.scene(s, (200, 160))
        items.append(_item(f"pkg:scene{s}", scene, f"scene{s}"))
        if s % 10 == 0:  # the same picture elsewhere in the package, at another size
            items.append(_item(f"pkg:resized{s}", synthetic.apply_edit("resize", scene, s), f"other{s}"))
    for piece in range(6):  # pieces of one painting: distinct pictures, one split
        items.append(_item(f"pkg:painting_{piece}", synthetic.scene(1000 + piece, (200, 160)), "painting:x", "art"))
    out = devset.assign(items)
    ids = {it.id for it in out}
    assert not any(i.startswith("pkg:resized") for i in ids)  # near-duplicates of kept images
    assert {it.split for it in out if it.group == "painting:x"} and len({it.split for it in out
                                                                       if it.group == "painting:x"}) == 1
    assert {it.split for it in out} == set(devset.SPLITS)
    assert {it.role for it in out} == {"reference", "other", "distractor"}
    assert devset.assign(items)[0].split == out[0].split  # deterministic (hash of names)
    lines = devset.manifest_lines(out)
    assert lines[0] == devset.MANIFEST_HEADER and len(lines) == len(out) + 1
    path = tmp_path / "manifest.tsv"
    path.write_text("\n".join(lines) + "\n")
    assert devset.check_manifest(out, path) == []
    assert devset.check_manifest(out[1:], path) == [f"missing: {out[0].id}"]


def test_text_renderings_are_deterministic_and_distinct():
    font = next(Path("/usr/share/fonts").rglob("*.ttf"), None)
    if font is None:
        import pytest

        pytest.skip("no TrueType font installed")
    a = devset.render_text("The rider crossed the river at dawn. " * 20, font, 4)
    b = devset.render_text("The rider crossed the river at dawn. " * 20, font, 4)
    c = devset.render_text("Elves guard the forest paths by night. " * 20, font, 4)
    assert a.tobytes() == b.tobytes()
    assert np.abs(np.asarray(a, float) - np.asarray(c, float)).mean() > 1


def test_corpus_distractors_come_from_the_fit_split_and_each_from_its_own_seed():
    """bench/corpus_distractors.py: image i is the same whether made first or after others, the
    images differ from each other, they decode as JPEG, and only fit-split images feed them."""
    import importlib.util
    import io

    path = Path(__file__).parent.parent / "bench" / "corpus_distractors.py"
    spec = importlib.util.spec_from_file_location("corpus_distractors", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    items = []
    for s in range(6):
        split = "fit" if s < 4 else "test"
        # test-split images are pure red: none of their pixels may reach a distractor
        image = synthetic.scene(s, (240, 180)) if split == "fit" else Image.new("RGB", (240, 180), (255, 0, 0))
        items.append(devset.Item(f"pkg:{s}", "photo", "pkg", "1.0", f"g{s}", lambda image=image: image, split=split))
    made = module.CorpusDistractors(items, 40)
    assert len(made) == 40 and len(made.sources) == 4
    after_others = [made.jpeg(i) for i in range(8)][7]
    assert module.CorpusDistractors(items, 40).jpeg(7) == after_others  # the same image, made alone
    thumbs = [np.asarray(Image.open(io.BytesIO(made.jpeg(i))).convert("L").resize((16, 16)), np.float32)
              for i in range(40)]
    assert len({t.tobytes() for t in thumbs}) == 40
    assert all(max(made.image(i).size) <= module.SIDE for i in range(40))
    red = np.array([255, 0, 0], np.float32)
    assert not any((np.abs(np.asarray(made.image(i), np.float32) - red).sum(-1) < 30).mean() > 0.5
                   for i in range(40))  # no test-split pixels
