"""The development benchmark's images: real pictures that pinned Debian packages ship.

Nothing here is committed but the manifest (``bench/devset.sha256``, the sha256 of every image
used): the packages are fetched with ``apt-get download`` at a pinned version into a cache
folder (:mod:`pipeline.layout.devset`) and unpacked with ``dpkg-deb``. Categories:

* ``photo``: photographs of the GCompris educational suite (words, monuments, animals, musical
  instruments, landscapes, fishes; stored inside its Qt resource files);
* ``clipart``: the Oxygen icon theme's 256 px icons (flat colours, transparency);
* ``art``: Battle for Wesnoth's painted portraits and story paintings, and the pieces of the
  classical paintings of the GCompris puzzle;
* ``text``: pages, posters and listings of Wesnoth's campaign texts rendered with the DejaVu
  and Liberation fonts (a rendering depends on the FreeType build: the manifest says so).

Openclipart, tuxpaint stamps and desktop-wallpaper packages are never used: they are reserved
for an independent check.

Splits are made by *source*: near-duplicate images (same picture in two activities, an icon in
several colours) form one cluster, of which one image is kept; clusters (and all pieces of one
painting) are assigned to ``fit`` / ``validation`` / ``test`` by a hash of their name, then each
image to a role: ``reference`` (in the corpus, copied by queries), ``other`` (in the corpus,
never copied) or ``distractor`` (not in the corpus; its edits are queries that copy nothing).
No image, and no edit of one, is in two splits.
"""
from __future__ import annotations

import hashlib
import io
import re
import shutil
import struct
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.errors import ConfigError
from pipeline.layout.devset import DevsetCache

#: (package, pinned version): the only sources of the benchmark's pixels.
PACKAGES = (
    ("gcompris-qt-data", "3.1-2"),
    ("oxygen-icon-theme", "5:5.103.0-1"),
    ("wesnoth-1.16-data", "1:1.16.9-1"),
    ("fonts-dejavu-core", "2.37-6"),
    ("fonts-liberation2", "2.1.5-1"),
)
CATEGORIES = ("photo", "clipart", "art", "text")
SPLITS = ("fit", "validation", "test")
#: Share of clusters per split (by hash), and of images per role inside a split.
SPLIT_SHARES = (0.4, 0.3, 0.3)
ROLE_SHARES = (("reference", 0.35), ("other", 0.45), ("distractor", 0.20))
#: Longest side of an image as stored in the benchmark corpus (LAION-like sizes).
MAX_SIDE = 512
TEXT_RENDERINGS = 320

_GCOMPRIS_PHOTOS = ("lang/", "explore_monuments/", "erase/", "categorization/", "explore_world_animals/",
                    "explore_farm_animals/", "explore_world_music/")


@dataclass
class Item:
    """One benchmark image: where it comes from and how to load it."""

    id: str  # package:member (a rendering: text:{n})
    category: str
    package: str
    version: str
    group: str  # split unit: images of one group always share a split
    load: Callable[[], Image.Image]  # RGBA or RGB, as shipped
    split: str = ""
    role: str = ""
    sha256: str = ""

    def image(self) -> Image.Image:
        """The image as the benchmark uses it: RGBA (alpha kept for pasting), longest side <= MAX_SIDE."""
        im = self.load()
        im = im.convert("RGBA") if im.mode in ("RGBA", "LA", "P", "PA") else im.convert("RGB")
        if max(im.size) > MAX_SIDE:
            f = MAX_SIDE / max(im.size)
            im = im.resize((max(1, round(im.width * f)), max(1, round(im.height * f))), Image.LANCZOS)
        return im


def flatten(image: Image.Image) -> Image.Image:
    """RGB on white, as img2dataset stores images with transparency."""
    from pipeline.embedders.base import to_rgb

    return to_rgb(image)


# --------------------------------------------------------------------------- fetching


def fetch(cache: DevsetCache) -> None:
    """Download (``apt-get download``, pinned versions) and unpack every package once."""
    for name, version in PACKAGES:
        target = cache.unpacked(name)
        if target.is_dir():
            continue
        debs = cache.debs()
        debs.mkdir(parents=True, exist_ok=True)
        if not any(debs.glob(f"{name}_*.deb")):
            if not shutil.which("apt-get"):
                raise ConfigError("the development benchmark needs apt-get (Debian) to fetch its image packages")
            subprocess.run(["apt-get", "download", f"{name}={version}"], cwd=debs, check=True,
                           stdout=subprocess.DEVNULL)
        deb = next(debs.glob(f"{name}_*.deb"))
        tmp = target.with_name(target.name + ".tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
        tmp.rename(target)


def qt_resources(data: bytes) -> list[tuple[str, bytes | None]]:
    """Files of a Qt ``.rcc`` resource archive: (path, bytes; None when zstd-compressed)."""
    if data[:4] != b"qres":
        raise ValueError("not a Qt resource file")
    version, tree, payload, names = struct.unpack(">iiii", data[4:20])
    node = 14 if version == 1 else 22

    def name(offset: int) -> str:
        (n,) = struct.unpack(">H", data[names + offset:names + offset + 2])
        return data[names + offset + 6:names + offset + 6 + 2 * n].decode("utf-16-be")

    out: list[tuple[str, bytes | None]] = []
    stack = [(0, "")]
    while stack:
        index, parent = stack.pop()
        base = tree + index * node
        name_offset, flags = struct.unpack(">iH", data[base:base + 6])
        path = f"{parent}/{name(name_offset)}" if index else ""
        if flags & 2:  # directory
            count, first = struct.unpack(">ii", data[base + 6:base + 14])
            stack.extend((c, path) for c in range(first + count - 1, first - 1, -1))
            continue
        (offset,) = struct.unpack(">i", data[base + 10:base + 14])
        (size,) = struct.unpack(">I", data[payload + offset:payload + offset + 4])
        blob = data[payload + offset + 4:payload + offset + 4 + size]
        out.append((path, zlib.decompress(blob[4:]) if flags & 1 else None if flags & 4 else blob))
    return out


# --------------------------------------------------------------------------- collecting


def _open(data: bytes) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        im = Image.open(io.BytesIO(data))
        im.load()
        return im
    return load


def _gcompris(cache: DevsetCache, version: str) -> list[Item]:
    items = []
    for rcc in sorted((cache.unpacked("gcompris-qt-data") / "usr/share/gcompris-qt/rcc").glob("*.rcc")):
        for path, blob in qt_resources(rcc.read_bytes()):
            if blob is None or not path.lower().endswith((".webp", ".jpg", ".jpeg", ".png")):
                continue
            activity = path.split("/activities/", 1)[-1]
            if activity.startswith(_GCOMPRIS_PHOTOS):
                category, group = "photo", path
            elif activity.startswith("paintings/resource/image/"):
                # Puzzle pieces: one painting per painter prefix; all its pieces share a split.
                category, group = "art", "painting:" + Path(path).stem.rsplit("_", 1)[0]
            else:
                continue
            items.append(Item(f"gcompris-qt-data:{rcc.name}:{path}", category, "gcompris-qt-data", version, group,
                              _open(blob)))
    return items


def _files(cache: DevsetCache, package: str, version: str, pattern: str, category: str) -> list[Item]:
    root = cache.unpacked(package)
    return [Item(f"{package}:{p.relative_to(root)}", category, package, version, str(p.relative_to(root)),
                 _open(p.read_bytes()))
            for p in sorted(root.glob(pattern)) if p.suffix.lower() in (".png", ".jpg", ".webp")]


def wesnoth_texts(cache: DevsetCache) -> list[str]:
    """English prose of Wesnoth (unit descriptions, help, campaigns: translatable strings of its .cfg files)."""
    root = cache.unpacked("wesnoth-1.16-data") / "usr/share/games/wesnoth/1.16/data"
    texts = []
    for cfg in sorted(root.glob("**/*.cfg")):
        for m in re.finditer(r'_\s*"((?:[^"]|"")+)"', cfg.read_text(errors="replace")):
            t = " ".join(m.group(1).replace('""', '"').split())
            if len(t) >= 60 and "{" not in t and "<" not in t:
                texts.append(t)
    return texts


def _fonts(cache: DevsetCache) -> list[Path]:
    return (sorted((cache.unpacked("fonts-dejavu-core") / "usr/share/fonts/truetype/dejavu").glob("*.ttf"))
            + sorted((cache.unpacked("fonts-liberation2") / "usr/share/fonts/truetype/liberation2").glob("*.ttf")))


def render_text(text: str, font_path: Path, seed: int) -> Image.Image:
    """One text-heavy image: a page, a poster or a listing, deterministic for (text, font, seed)."""
    rng = np.random.default_rng(seed)
    layout = ("page", "poster", "listing")[seed % 3]
    w, h = int(rng.integers(360, 640)), int(rng.integers(300, 560))
    dark = rng.random() < 0.25
    bg = tuple(int(c) for c in (rng.integers(0, 60, 3) if dark else rng.integers(200, 256, 3)))
    fg = tuple(int(c) for c in (rng.integers(190, 256, 3) if dark else rng.integers(0, 90, 3)))
    im = Image.new("RGB", (w, h), bg)
    draw = ImageDraw.Draw(im)
    size = {"page": int(rng.integers(13, 20)), "poster": int(rng.integers(30, 56)), "listing": int(rng.integers(12, 16))}[layout]
    font = ImageFont.truetype(str(font_path), size)
    words, lines, line = text.split(), [], ""
    margin = int(rng.integers(10, 40))
    for word in words:
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) > w - 2 * margin and line:
            lines.append(line)
            line = word
        else:
            line = trial
    lines.append(line)
    y = margin
    if layout == "poster":
        band = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.rectangle([0, 0, w, int(h * rng.uniform(0.15, 0.3))], fill=band)
    for i, line in enumerate(lines):
        if y > h - size - margin:
            break
        x = margin + (int(rng.integers(0, 3)) * size if layout == "listing" and i else 0)
        draw.text((x, y), line, fill=fg, font=font)
        y += int(size * (1.25 if layout != "poster" else 1.1))
    return im


def _texts(cache: DevsetCache, version: str) -> list[Item]:
    texts, fonts = wesnoth_texts(cache), _fonts(cache)
    rng = np.random.default_rng(2024)
    # Each rendering has its own passage of 3 strings: no two images share a sentence.
    passages = rng.permutation(len(texts) // 3)[:TEXT_RENDERINGS]
    items = []
    for n, p in enumerate(passages):
        body = " ".join(texts[3 * int(p):3 * int(p) + 3])
        font = fonts[int(rng.integers(len(fonts)))]

        def load(body=body, font=font, n=n) -> Image.Image:
            return render_text(body, font, n)
        items.append(Item(f"text:{n}:{font.name}:{3 * int(p)}", "text", "wesnoth-1.16-data+fonts", version,
                          f"text:{n}", load))
    return items


def collect(cache: DevsetCache) -> list[Item]:
    """Every candidate image of every category, in a deterministic order."""
    versions = dict(PACKAGES)
    items = _gcompris(cache, versions["gcompris-qt-data"])
    items += _files(cache, "oxygen-icon-theme", versions["oxygen-icon-theme"],
                    "usr/share/icons/oxygen/base/256x256/**/*", "clipart")
    core = "usr/share/games/wesnoth/1.16/data/core/images"
    for pattern in (f"{core}/portraits/**/*", f"{core}/story/*"):
        items += _files(cache, "wesnoth-1.16-data", versions["wesnoth-1.16-data"], pattern, "art")
    items += _texts(cache, versions["wesnoth-1.16-data"])
    return items


# --------------------------------------------------------------------------- clusters and splits


def _signature(image: Image.Image) -> np.ndarray:
    """Grey 16x16 squash, standardised: near-duplicates (recolourings, resized copies) agree."""
    g = np.asarray(flatten(image).convert("L").resize((16, 16), Image.BILINEAR), dtype=np.float32).reshape(-1)
    g = g - g.mean()
    return g / (np.linalg.norm(g) + 1e-6)


def _unit(name: str) -> float:
    return int(hashlib.sha256(name.encode()).hexdigest()[:12], 16) / float(1 << 48)


def _union_find(n: int):
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def join(a: int, b: int) -> None:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return root, join


def assign(items: list[Item], near_duplicate: float = 0.95) -> list[Item]:
    """Drop near-duplicates (one image per cluster), then give each image a split and a role.

    Clusters join images whose grey signatures correlate above ``near_duplicate`` (the same
    photo in two activities, an icon in several colours); a split unit joins clusters and groups
    (the pieces of one painting, one text passage), so related images never straddle splits.
    """
    images, kept = [], []
    for it in items:
        try:
            im = it.image()
        except Exception:  # noqa: BLE001 - a file that does not decode is not used
            continue
        if min(im.size) < 48:
            continue
        images.append(im)
        kept.append(it)
    sig = np.stack([_signature(im) for im in images])
    dup_root, dup_join = _union_find(len(kept))
    unit_root, unit_join = _union_find(len(kept))
    # Renderings are distinct by construction (and pages of text all look alike at 16 px).
    same = np.array([it.category for it in kept])
    close = np.triu(sig @ sig.T, 1) > near_duplicate
    close &= (same[:, None] == same[None, :]) & (same != "text")[:, None]
    for i, j in zip(*np.nonzero(close)):
        dup_join(int(i), int(j))
        unit_join(int(i), int(j))
    first_of_group: dict[str, int] = {}
    for i, it in enumerate(kept):
        unit_join(first_of_group.setdefault(it.group, i), i)
    out = []
    for i, it in enumerate(kept):
        if dup_root(i) != i:
            continue  # a near-duplicate of an image already kept
        u = _unit("split:" + kept[unit_root(i)].id)
        it.split = SPLITS[min(len(SPLITS) - 1, int(np.searchsorted(np.cumsum(SPLIT_SHARES), u, side="right")))]
        v = _unit("role:" + it.id)
        bounds = np.cumsum([share for _, share in ROLE_SHARES])
        it.role = ROLE_SHARES[min(len(ROLE_SHARES) - 1, int(np.searchsorted(bounds, v, side="right")))][0]
        it.sha256 = hashlib.sha256(images[i].tobytes()).hexdigest()
        out.append(it)
    return out


# --------------------------------------------------------------------------- the manifest


MANIFEST_HEADER = "sha256\tsplit\trole\tcategory\tpackage\tversion\tid"


def manifest_lines(items: list[Item]) -> list[str]:
    """One line per image used; ``sha256`` is of the decoded pixels (RGBA/RGB, as used)."""
    return [MANIFEST_HEADER] + [f"{it.sha256}\t{it.split}\t{it.role}\t{it.category}\t{it.package}\t{it.version}\t{it.id}"
                                for it in items]


def check_manifest(items: list[Item], path: Path) -> list[str]:
    """Differences between ``items`` and a committed manifest (empty: the same images)."""
    want = {line.split("\t")[-1]: line for line in path.read_text().splitlines()[1:] if line}
    have = {line.split("\t")[-1]: line for line in manifest_lines(items)[1:]}
    problems = [f"missing: {k}" for k in sorted(set(want) - set(have))]
    problems += [f"not in the manifest: {k}" for k in sorted(set(have) - set(want))]
    problems += [f"differs: {k}" for k in sorted(set(want) & set(have)) if want[k] != have[k]]
    return problems


def load(cache_dir: str | Path, manifest: Path | None = None, strict: bool = False) -> list[Item]:
    """Fetch (once), collect, cluster and split; checked against ``manifest`` when given."""
    cache = DevsetCache(Path(cache_dir))
    fetch(cache)
    items = assign(collect(cache))
    if manifest is not None and manifest.exists():
        problems = check_manifest(items, manifest)
        if problems:
            text_only = all(":text:" in p or p.split(": ", 1)[1].startswith("text:") for p in problems)
            message = (f"{len(problems)} image(s) differ from {manifest}: {problems[:3]}"
                       + (" (text renderings only: another FreeType build renders glyphs differently)" if text_only else ""))
            if strict or not text_only:
                raise ConfigError(message)
            print("warning:", message)
    return items
