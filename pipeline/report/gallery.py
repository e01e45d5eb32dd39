"""``report.html``: a self-contained gallery (images inlined as data URIs, plain inline JS, opens offline).

Each query sits beside its best matches, boxes drawn, queries sorted by best score. The page
is rendered from ``templates/gallery.html.j2`` with autoescape on: captions, URLs, keys and
prompts are untrusted text from the web. Links are kept only for http(s) URLs.
"""
from __future__ import annotations

import base64
import io
import math
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from importlib.resources import files
from typing import Any

from pipeline.layout.runs import RunData, RunSummary
from pipeline.report.summary import LOWER_BOUND_NOTE
from pipeline.storage import Storage, read_range

#: Longest side of the match thumbnails embedded in the gallery.
THUMB_SIDE = 256
#: Parallel ranged reads when fetching match images (object-store latency, not CPU, bounds it).
FETCH_THREADS = 8
#: Box and border colours, one per rank.
RANK_COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324"]


def thumbnail_jpeg(data: bytes, max_side: int = THUMB_SIDE) -> tuple[bytes, int, int]:
    """Decode an image, shrink it to ``max_side`` and re-encode as JPEG; returns (jpeg, width, height)
    where width/height are the *original* size (boxes are given in original pixels), upright as
    viewers show it (the orientation verification compares)."""
    from PIL import Image

    from pipeline.embedders.base import upright

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        turned = upright(im)
        width, height = turned.size
        rgb = turned.convert("RGB")
    rgb.thumbnail((max_side, max_side))
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=82)
    return out.getvalue(), width, height


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def fetch_thumbnail(tar_url: str | None, offset: int | None, size: int | None, storage: Storage | None) -> dict[str, Any]:
    if not tar_url or offset is None or not size:
        return {"error": "no byte range recorded for this image"}
    try:
        jpeg, w, h = thumbnail_jpeg(read_range(tar_url, int(offset), int(size), storage))
    except Exception as exc:  # noqa: BLE001 - a missing or corrupt image is shown as such, not a crash
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return {"uri": data_uri(jpeg, "image/jpeg"), "width": w, "height": h}


def fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def safe_href(url: str | None) -> str | None:
    """The URL when it is http(s); None otherwise (a ``javascript:`` link survives HTML escaping)."""
    if not url:
        return None
    return url.strip() if url.strip().lower().startswith(("http://", "https://")) else None


def _boxes(items: list[tuple[Any, str, bool, str]]) -> list[dict[str, Any]]:
    out = []
    for box, colour, dashed, label in items:
        if box is None or len(box) != 4 or any(v is None for v in box):
            continue
        x0, y0, x1, y1 = (int(v) for v in box)
        out.append({"x": x0, "y": y0, "w": max(x1 - x0, 1), "h": max(y1 - y0, 1), "colour": colour,
                    "dashed": dashed, "label": label})
    return out


@lru_cache(maxsize=1)
def _environment():
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    env = Environment(loader=PackageLoader("pipeline.report", "templates"),
                      autoescape=select_autoescape(default=True, default_for_string=True),
                      undefined=StrictUndefined, trim_blocks=False)
    env.globals["fmt"] = fmt
    return env


def _static(name: str):
    from markupsafe import Markup

    # our own package data, not user input: inlined as is
    return Markup(files("pipeline.report").joinpath("static", name).read_text())


def render_gallery(data: RunData, summary: RunSummary, histogram_png: bytes | None = None, top: int = 5,
                   max_queries: int = 200, storage: Storage | None = None) -> str:
    """The self-contained HTML gallery: queries sorted by best score, each beside its top matches."""
    thresholds = summary.thresholds
    rows = data.queries.to_pylist()
    rows.sort(key=lambda r: (r["best_score"] is None, -(r["best_score"] or 0.0), r["query_key"]))
    total = len(rows)
    if max_queries > 0:
        rows = rows[:max_queries]
    wanted = {r["query_key"] for r in rows}
    by_query: dict[str, list[dict[str, Any]]] = {}
    for m in data.matches.to_pylist():
        if m["query_key"] in wanted and m["rank"] <= top:
            by_query.setdefault(m["query_key"], []).append(m)
    for ms in by_query.values():
        ms.sort(key=lambda m: m["rank"])

    copied = (summary.memorisation or {}).get("most_copied", [])
    ranges = sorted({(m["tar_url"], m["tar_offset"], m["tar_size"]) for ms in by_query.values() for m in ms}
                    | {(c["tar_url"], c["tar_offset"], c["tar_size"]) for c in copied},
                    key=lambda r: tuple("" if v is None else str(v) for v in r))
    with ThreadPoolExecutor(max_workers=FETCH_THREADS) as pool:
        fetched = dict(zip(ranges, pool.map(lambda r: fetch_thumbnail(*r, storage), ranges)))

    queries = []
    for q in rows:
        matches = by_query.get(q["query_key"], [])
        qw, qh = q["width"], q["height"]
        uri = None
        if q["thumbnail"]:
            uri = data_uri(q["thumbnail"], "image/jpeg")
            if not qw or not qh:
                _, qw, qh = thumbnail_jpeg(q["thumbnail"])
        q_boxes = []
        view = []
        for m in matches:
            colour = RANK_COLOURS[(m["rank"] - 1) % len(RANK_COLOURS)]
            if m["query_box"] is not None:
                q_boxes.append((m["query_box"], colour, False, f"#{m['rank']} verified region"))
            elif m["region_box"] is not None and qw and qh and list(m["region_box"]) != [0, 0, qw, qh]:
                q_boxes.append((m["region_box"], colour, True, f"#{m['rank']} query region {m['region']}"))
            img = fetched.get((m["tar_url"], m["tar_offset"], m["tar_size"]), {})
            extra = []
            if m["dup_group_size"] and m["dup_group_size"] > 1:
                extra.append(f"{m['dup_group_size']} copies in training set")
            if m["inliers"] is not None:
                extra.append(f"{m['inliers']} inliers")
            if m["verify_score"] is not None:
                extra.append(f"verify {fmt(m['verify_score'])}")
            if m["similarity"] is not None:
                extra.append(f"similarity {fmt(m['similarity'])}")
            view.append({
                "rank": m["rank"], "key": m["match_key"], "score": m["score"], "colour": colour,
                "in_subset": bool(m["in_subset"]),
                "duplicate": m["similarity"] is not None and m["similarity"] >= thresholds["duplicate"],
                "caption": m["caption"], "href": safe_href(m["url"]), "url_text": (m["url"] or "")[:90],
                "extra": extra,
                "pic": {"uri": img.get("uri"), "width": img.get("width", 0), "height": img.get("height", 0),
                        "error": img.get("error"),
                        "boxes": _boxes([(m["match_box"], colour, False, f"#{m['rank']} matched region")])},
            })
        queries.append({
            "key": q["query_key"], "prompt": q["prompt"], "source": q["source"], "best_score": q["best_score"],
            "replicated": bool(q["replicated"]), "outside_only": bool(q["copy_outside_subset_only"]),
            "pic": {"uri": uri, "width": qw or 0, "height": qh or 0, "error": None, "boxes": _boxes(q_boxes)},
            "matches": view,
        })

    score_rows = [(label, summary.queries["top1"][key]) for label, key in
                  (("generations, all", "all"), ("generations, best in subset", "in_subset"),
                   ("generations, best outside subset", "outside_subset"))]
    if summary.baseline:
        score_rows += [("training set self-similarity", summary.baseline["top1"]),
                       ("training set, near-duplicates excluded", summary.baseline["top1_no_dups"])]
    most_copied = [{**c, "href": safe_href(c["url"]), "url_text": (c["url"] or "")[:90],
                    "pic": {**{"uri": None, "width": 0, "height": 0, "error": None},
                            **fetched.get((c["tar_url"], c["tar_offset"], c["tar_size"]), {}), "boxes": []}}
                   for c in copied]
    failures = summary.coverage.get("failures_by_reason") or {}
    emb = summary.embedder
    return _environment().get_template("gallery.html.j2").render(
        s=summary,
        embedder=", ".join(f"{k}={v}" for k, v in sorted(emb.items())) if isinstance(emb, dict) else str(emb),
        score_rows=score_rows,
        failures=", ".join(f"{k}: {v}" for k, v in sorted(failures.items())),
        lower_bound_note=LOWER_BOUND_NOTE,
        histogram_uri=data_uri(histogram_png, "image/png") if histogram_png else None,
        cut=f" (the {len(rows)} best-scoring of {total})" if len(rows) < total else "",
        top=int(top),
        queries=queries,
        most_copied=most_copied,
        css=_static("report.css"),
        js=_static("report.js"),
    )
