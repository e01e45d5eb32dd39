"""The report stage: turn one search run into figures an analyst can trust and a gallery to look at.

Reads, from one run directory ``{results}/run_id={run_id}/`` (layout in docs/RESULTS.md),
``run.json``, ``queries.parquet``, ``matches.parquet`` and (when present) ``baseline.parquet``,
and writes beside them:

- ``histogram.png``: top-1 score histograms of the generations against the corpus
  self-similarity baseline, thresholds drawn as vertical lines (as in Somepalli et al. 2023);
- ``report.html``: a self-contained gallery (every image inlined as a data URI, plain inline
  JS, opens offline): each query beside its best matches, boxes drawn, sorted by best score;
- ``summary.json`` (written last, so its presence means the report is complete): replication
  rates with 95% Wilson intervals at the paper's thresholds and at a threshold calibrated on
  the baseline, top-1 score statistics, the inside/outside-subset split, the baseline's
  figures, coverage and index recall.

Heavy imports (pyarrow, PIL, matplotlib) stay inside functions: the CLI imports this module
at startup.
"""
from __future__ import annotations

import base64
import html
import io
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Annotated, Any, Iterable, Sequence

import numpy as np
import typer

from pipeline.errors import ConfigError, MismatchError, ReplicaError
from pipeline.io import Storage, filesystem, join, read_json, read_range, write_bytes, write_json

if TYPE_CHECKING:
    import pyarrow as pa

RUN_JSON = "run.json"
QUERIES = "queries.parquet"
MATCHES = "matches.parquet"
BASELINE = "baseline.parquet"
SUMMARY = "summary.json"
HISTOGRAM = "histogram.png"
GALLERY = "report.html"

#: Two-sided 95% normal quantile, for Wilson score intervals.
Z95 = 1.959963984540054
#: The paper's thresholds (SSCD descriptor), used when run.json does not name its own.
DEFAULT_THRESHOLDS = {"replication": 0.5, "duplicate": 0.95}
DEFAULT_FPR = 0.01
#: Longest side of the match thumbnails embedded in the gallery.
THUMB_SIDE = 256
#: Parallel ranged reads when fetching match images (object-store latency, not CPU, bounds it).
FETCH_THREADS = 8
#: Box and border colours, one per rank.
RANK_COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324"]

LOWER_BOUND_NOTE = (
    "Measured replication rates are lower bounds: only the indexed vectors were searched "
    "(samples that failed to download, decode or embed are missing), and the approximate "
    "index finds a true nearest neighbour with the estimated recall, not always."
)


# --------------------------------------------------------------------------- statistics


def calibrate_threshold(baseline_scores: Iterable[float], fpr: float) -> float:
    """The score that a fraction ``1 - fpr`` of the baseline scores stays below.

    Returns the smallest threshold ``t`` such that the share of baseline scores ``>= t`` is at
    most ``fpr`` (so at least ``1 - fpr`` of them are ``< t``), choosing ``t`` among the scores
    themselves. When even the baseline maximum would flag more than ``fpr`` of the baseline
    (fewer than ``1 / fpr`` samples), the result is the next float above that maximum, so the
    implied false-positive rate is 0. Null/NaN scores are ignored.

    Feed it ``top1_score_no_dups`` (best match of a training image excluding itself and its
    near-duplicates): the score an unrelated image reaches by chance.
    """
    if not 0.0 < fpr < 1.0:
        raise ConfigError(f"fpr must lie strictly between 0 and 1, got {fpr!r}")
    scores = np.asarray([s for s in baseline_scores if s is not None], dtype=np.float64)
    scores = np.sort(scores[~np.isnan(scores)])
    n = len(scores)
    if n == 0:
        raise ConfigError("cannot calibrate a threshold without baseline scores: run search with a baseline sample")
    allowed = math.floor(fpr * n + 1e-9)  # how many baseline scores may reach the threshold
    if allowed == 0:
        return float(np.nextafter(scores[-1], np.inf))
    candidate = scores[n - allowed]
    # Ties: every score equal to the candidate would count; step up to the next distinct value.
    if n - np.searchsorted(scores, candidate, side="left") > allowed:
        above = scores[scores > candidate]
        return float(above[0]) if len(above) else float(np.nextafter(scores[-1], np.inf))
    return float(candidate)


def exceedance_rate(scores: Iterable[float], threshold: float) -> float | None:
    """Share of the (non-null) scores that are ``>= threshold``; None when there are none."""
    arr = _finite(scores)
    return float(np.mean(arr >= threshold)) if len(arr) else None


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval for a binomial proportion (95% by default); None when ``n == 0``."""
    if n <= 0:
        return None
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion(flags: Sequence[bool] | np.ndarray) -> dict[str, Any]:
    """``{"count", "n", "rate", "ci95": [low, high]}`` of a boolean vector."""
    arr = np.asarray(flags, dtype=bool)
    n, k = int(arr.size), int(arr.sum())
    ci = wilson_interval(k, n)
    return {"count": k, "n": n, "rate": (k / n) if n else None, "ci95": list(ci) if ci else None}


def score_stats(scores: Iterable[float]) -> dict[str, Any]:
    """``{"n", "mean", "p95", "max"}`` of the non-null scores (p95: linear interpolation)."""
    arr = _finite(scores)
    if not len(arr):
        return {"n": 0, "mean": None, "p95": None, "max": None}
    return {
        "n": int(arr.size),
        "mean": float(arr.mean()),
        "p95": float(np.percentile(arr, 95)),
        "max": float(arr.max()),
    }


def _finite(scores: Iterable[float] | None) -> np.ndarray:
    if scores is None:
        return np.zeros(0)
    arr = np.asarray([np.nan if s is None else s for s in scores], dtype=np.float64)
    return arr[~np.isnan(arr)]


def _at_least(scores: Sequence[float | None], threshold: float) -> np.ndarray:
    """Per-row ``score >= threshold``, a null score counting as no copy."""
    arr = np.asarray([np.nan if s is None else s for s in scores], dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.nan_to_num(arr, nan=-np.inf) >= threshold


# --------------------------------------------------------------------------- loading


@dataclass
class RunData:
    """One run directory, read and checked against the schemas."""

    url: str
    run: dict[str, Any]
    queries: "pa.Table"
    matches: "pa.Table"
    baseline: "pa.Table | None"

    @property
    def run_id(self) -> str:
        return str(self.run.get("run_id") or "")


def _read_table(url: str, schema: "pa.Schema", storage: Storage | None, required: bool) -> "pa.Table | None":
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = filesystem(url, storage)
    if not fs.exists(path):
        if required:
            raise ConfigError(f"{url} does not exist: is this a run directory written by `replica search`?")
        return None
    # A file object, not a path: pyarrow would otherwise add run_id from the hive directory name.
    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    missing = [name for name in schema.names if name not in table.column_names]
    if missing:
        raise MismatchError(
            f"{url} lacks column(s) {', '.join(missing)}: not written with this version's schema (see docs/RESULTS.md)"
        )
    try:
        return table.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise MismatchError(f"{url} does not fit its schema (see docs/RESULTS.md): {exc}") from exc


def load_run(run_url: str, storage: Storage | None = None) -> RunData:
    from pipeline.schema import baseline_schema, matches_schema, queries_schema

    run_url = run_url.rstrip("/")
    run_json_url = join(run_url, RUN_JSON)
    fs, path = filesystem(run_json_url, storage)
    if not fs.exists(path):
        raise ConfigError(f"{run_json_url} does not exist: give the run directory ({{results}}/run_id={{run_id}})")
    run = read_json(run_json_url, storage)
    if not isinstance(run, dict):
        raise MismatchError(f"{run_json_url} must hold a JSON object")
    data = RunData(
        url=run_url,
        run=run,
        queries=_read_table(join(run_url, QUERIES), queries_schema(), storage, required=True),
        matches=_read_table(join(run_url, MATCHES), matches_schema(), storage, required=True),
        baseline=_read_table(join(run_url, BASELINE), baseline_schema(), storage, required=False),
    )
    folder = run_url.rsplit("/", 1)[-1]
    if folder.startswith("run_id=") and data.run_id and folder != f"run_id={data.run_id}":
        raise MismatchError(
            f"{run_url} is named for run {folder[len('run_id='):]!r} but its run.json says {data.run_id!r}:"
            " hive readers would attribute its rows to the wrong run"
        )
    for name, table in ((QUERIES, data.queries), (MATCHES, data.matches), (BASELINE, data.baseline)):
        if table is None or not data.run_id:
            continue
        ids = set(table.column("run_id").to_pylist())
        if ids - {data.run_id}:
            raise MismatchError(
                f"{join(run_url, name)} holds run_id {sorted(ids - {data.run_id})} but run.json says {data.run_id!r}:"
                " files of different runs are mixed in one directory"
            )
    return data


# --------------------------------------------------------------------------- summary


def _thresholds(run: dict[str, Any], warnings: list[str]) -> dict[str, float]:
    given = run.get("thresholds") or {}
    out = {}
    for name, default in DEFAULT_THRESHOLDS.items():
        if given.get(name) is None:
            warnings.append(f"run.json names no {name} threshold; using the paper's {default}")
            out[name] = float(default)
        else:
            out[name] = float(given[name])
    for name, value in given.items():
        if name not in out and value is not None:
            out[str(name)] = float(value)
    return out


def summarize(data: RunData) -> dict[str, Any]:
    """Every figure of ``summary.json``, computed from the loaded run."""
    run = data.run
    warnings: list[str] = []
    thresholds = _thresholds(run, warnings)
    fpr = float(run.get("fpr") if run.get("fpr") is not None else DEFAULT_FPR)

    q = data.queries
    best = q.column("best_score").to_pylist()
    best_in = q.column("best_score_in_subset").to_pylist()
    best_out = q.column("best_score_outside_subset").to_pylist()

    baseline: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    b_top1: list[float | None] = []
    b_nodup: list[float | None] = []
    if data.baseline is not None and data.baseline.num_rows:
        b_top1 = data.baseline.column("top1_score").to_pylist()
        b_nodup = data.baseline.column("top1_score_no_dups").to_pylist()
        near = _finite(data.baseline.column("near_dup_count").to_pylist())
        baseline = {
            "samples": data.baseline.num_rows,
            "top1": score_stats(b_top1),
            "top1_no_dups": score_stats(b_nodup),
            "samples_with_near_duplicates": int((near > 0).sum()),
            "near_dup_count_mean": float(near.mean()) if len(near) else None,
        }
        if len(_finite(b_nodup)):
            t = calibrate_threshold(b_nodup, fpr)
            n_cal = len(_finite(b_nodup))
            calibration = {
                "fpr_target": fpr,
                "threshold": t,
                "implied_fpr": exceedance_rate(b_nodup, t),
                "baseline_samples": n_cal,
                "method": "smallest baseline top1_score_no_dups value t with share(score >= t) <= fpr",
            }
            if n_cal * fpr < 10:
                warnings.append(
                    f"the calibrated threshold rests on {n_cal} baseline samples, fewer than 10/fpr = {10 / fpr:.0f}:"
                    " sample more of the corpus for a stable estimate"
                )
        else:
            warnings.append("baseline.parquet has no top1_score_no_dups values: no calibrated threshold")
    else:
        warnings.append("no baseline.parquet in the run: no calibrated threshold and no false-positive rates")
    if calibration is not None:
        thresholds["calibrated"] = calibration["threshold"]

    replication: dict[str, Any] = {}
    for name, t in thresholds.items():
        hit_in, hit_out = _at_least(best_in, t), _at_least(best_out, t)
        entry: dict[str, Any] = {
            "threshold": t,
            "all": proportion(_at_least(best, t)),
            "in_subset": proportion(hit_in),
            "outside_subset": proportion(hit_out),
            "outside_subset_only": proportion(hit_out & ~hit_in),
        }
        if baseline is not None:
            entry["baseline_fpr"] = proportion(_at_least(b_nodup, t)) if len(_finite(b_nodup)) else None
            entry["baseline_fpr_with_dups"] = proportion(_at_least(b_top1, t)) if len(_finite(b_top1)) else None
            baseline.setdefault("rates", {})[name] = {
                "threshold": t,
                "top1": entry["baseline_fpr_with_dups"],
                "top1_no_dups": entry["baseline_fpr"],
            }
        replication[name] = entry

    if data.matches.num_rows:
        dup_sizes = _finite(data.matches.column("dup_group_size").to_pylist())
    else:
        dup_sizes = np.zeros(0)
    queries = {
        "count": q.num_rows,
        "with_matches": int(sum(s is not None for s in best)),
        "top1": {"all": score_stats(best), "in_subset": score_stats(best_in), "outside_subset": score_stats(best_out)},
        "near_duplicates": int(_at_least(best, thresholds["duplicate"]).sum()),
        "near_duplicates_in_subset": int(_at_least(best_in, thresholds["duplicate"]).sum()),
        "near_duplicates_outside_subset": int(_at_least(best_out, thresholds["duplicate"]).sum()),
        "matched_images_with_training_copies": int((dup_sizes > 1).sum()),
    }

    embedder = run.get("embedder") or {}
    embedder_name = (
        str(embedder.get("embedder") or embedder.get("name") or "") if isinstance(embedder, dict) else str(embedder)
    )
    if "sscd" not in embedder_name.lower():
        warnings.append(
            f"the paper's thresholds (0.5, 0.95) are meaningful for SSCD descriptors; this run used "
            f"{embedder_name or 'an unnamed embedder'}: read rates at the calibrated threshold"
        )

    coverage = dict(run.get("coverage") or {})
    attempted, indexed = coverage.get("samples_attempted"), coverage.get("vectors_indexed")
    coverage["indexed_fraction"] = (indexed / attempted) if attempted and indexed is not None else None
    coverage["lower_bound"] = True
    coverage["note"] = LOWER_BOUND_NOTE
    index = dict(run.get("index") or {})
    if index.get("estimated_recall") is None:
        warnings.append("run.json gives no estimated index recall: the search's miss rate is unknown")

    return {
        "run_id": data.run_id,
        "run_url": data.url,
        "created_at": run.get("created_at"),
        "reported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "embedder": embedder,
        "rerank": run.get("rerank"),
        "verify": run.get("verify"),
        "thresholds": thresholds,
        "fpr": fpr,
        "calibration": calibration,
        "queries": queries,
        "replication": replication,
        "baseline": baseline,
        "coverage": coverage,
        "index": index,
        "blocklist": run.get("blocklist"),
        "subset": run.get("subset"),
        "warnings": warnings,
    }


# --------------------------------------------------------------------------- histogram


def render_histogram(
    generation_scores: Iterable[float],
    baseline_scores: Iterable[float] | None,
    thresholds: dict[str, float],
    baseline_scores_no_dups: Iterable[float] | None = None,
    title: str = "",
) -> bytes:
    """PNG of top-1 score densities, generations vs corpus baseline, thresholds as vertical lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    gen = _finite(generation_scores)
    base = _finite(baseline_scores)
    nodup = _finite(baseline_scores_no_dups)
    everything = np.concatenate([gen, base, nodup, np.asarray(list(thresholds.values()), dtype=np.float64)])
    lo = min(0.0, float(everything.min())) if len(everything) else 0.0
    hi = max(1.0, float(everything.max())) if len(everything) else 1.0
    bins = np.linspace(lo, hi, 61)

    fig = Figure(figsize=(9, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if len(base):
        ax.hist(base, bins=bins, density=True, alpha=0.5, color="#7f7f7f", label=f"training set self-similarity (n={len(base)})")
    if len(nodup):
        ax.hist(nodup, bins=bins, density=True, histtype="step", linewidth=1.5, color="#333333",
                label=f"training set, near-duplicates excluded (n={len(nodup)})")
    if len(gen):
        ax.hist(gen, bins=bins, density=True, alpha=0.55, color="#1f77b4", label=f"generations (n={len(gen)})")
    styles = {"replication": ("#d62728", "--"), "duplicate": ("#9467bd", ":"), "calibrated": ("#2ca02c", "-.")}
    for name, t in thresholds.items():
        colour, style = styles.get(name, ("#ff7f0e", "--"))
        ax.axvline(t, color=colour, linestyle=style, linewidth=1.5, label=f"{name} threshold {t:.3f}")
    ax.set_xlabel("top-1 similarity score")
    ax.set_ylabel("density")
    ax.set_xlim(lo, hi)
    ax.set_title(title or "Top-1 similarity: generations vs training set")
    ax.legend(loc="best", fontsize=8, framealpha=0.85)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# --------------------------------------------------------------------------- gallery


def thumbnail_jpeg(data: bytes, max_side: int = THUMB_SIDE) -> tuple[bytes, int, int]:
    """Decode an image, shrink it to ``max_side`` and re-encode as JPEG; returns (jpeg, width, height)
    where width/height are the *original* size (boxes are given in original pixels)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        width, height = im.size
        rgb = im.convert("RGB")
    rgb.thumbnail((max_side, max_side))
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=82)
    return out.getvalue(), width, height


def _fetch_thumbnail(tar_url: str | None, offset: int | None, size: int | None, storage: Storage | None) -> dict[str, Any]:
    if not tar_url or offset is None or not size:
        return {"error": "no byte range recorded for this image"}
    try:
        jpeg, w, h = thumbnail_jpeg(read_range(tar_url, int(offset), int(size), storage))
    except Exception as exc:  # noqa: BLE001 - a missing or corrupt image is shown as such, not a crash
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return {"uri": _data_uri(jpeg, "image/jpeg"), "width": w, "height": h}


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _esc(value: Any) -> str:
    return "" if value is None else html.escape(str(value), quote=True)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _pct(entry: dict[str, Any] | None) -> str:
    if not entry or entry.get("rate") is None:
        return "–"
    lo, hi = entry["ci95"]
    return f"{100 * entry['rate']:.2f}% <span class=ci>[{100 * lo:.2f}, {100 * hi:.2f}]</span> <span class=n>({entry['count']}/{entry['n']})</span>"


def _safe_href(url: str | None) -> str | None:
    if not url:
        return None
    lowered = url.strip().lower()
    return url.strip() if lowered.startswith(("http://", "https://")) else None


def _box_svg(boxes: list[tuple[list[int], str, bool, str]], width: int, height: int) -> str:
    """Inline SVG over an image: its viewBox is the image's original pixel grid, so boxes scale with it."""
    if not boxes or not width or not height:
        return ""
    rects = []
    for box, colour, dashed, label in boxes:
        if box is None or len(box) != 4 or any(v is None for v in box):
            continue
        x0, y0, x1, y1 = (int(v) for v in box)
        dash = ' stroke-dasharray="6 4"' if dashed else ""
        rects.append(
            f'<rect x="{x0}" y="{y0}" width="{max(x1 - x0, 1)}" height="{max(y1 - y0, 1)}" fill="none" '
            f'stroke="{colour}" stroke-width="3" vector-effect="non-scaling-stroke"{dash}><title>{_esc(label)}</title></rect>'
        )
    return f'<svg class=boxes viewBox="0 0 {int(width)} {int(height)}" preserveAspectRatio="none">{"".join(rects)}</svg>'


def _picture(uri: str | None, width: int, height: int, boxes: list, alt: str, error: str | None = None) -> str:
    if not uri:
        return f'<div class="pic missing">image unavailable<br><small>{_esc(error)}</small></div>'
    return f'<div class=pic><img src="{uri}" alt="{_esc(alt)}">{_box_svg(boxes, width, height)}</div>'


_CSS = """
body{font-family:system-ui,-apple-system,"DejaVu Sans",sans-serif;margin:16px;background:#fafafa;color:#222}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:18px 0 6px}
.sub{color:#555;font-size:13px} code{background:#eee;padding:0 3px;border-radius:3px}
table.fig{border-collapse:collapse;font-size:13px;margin:6px 0} table.fig td,table.fig th{border:1px solid #ccc;padding:3px 8px;text-align:right}
table.fig th:first-child,table.fig td:first-child{text-align:left}
.ci,.n{color:#666;font-size:11px} .warn{color:#8a4b00;font-size:13px} .note{font-size:13px;color:#444;max-width:1100px}
.hist{max-width:860px;width:100%;border:1px solid #ddd;background:#fff}
.controls{position:sticky;top:0;background:#fafafa;padding:8px 0;border-bottom:1px solid #ddd;z-index:5;font-size:14px}
.controls label{margin-right:18px}
.query{display:flex;gap:10px;align-items:flex-start;padding:10px 0;border-bottom:1px solid #e3e3e3;overflow-x:auto}
.card{width:220px;flex:0 0 220px;background:#fff;border:1px solid #ddd;border-radius:4px;padding:6px;font-size:12px}
.qcard{border:2px solid #333}
.pic{position:relative;width:100%;line-height:0}
.pic img{width:100%;height:auto;display:block}
.pic svg.boxes{position:absolute;left:0;top:0;width:100%;height:100%;overflow:hidden;pointer-events:none}
.pic.missing{height:140px;line-height:1.3;background:#eee;color:#777;display:flex;flex-direction:column;justify-content:center;text-align:center;overflow:hidden}
.meta{margin-top:5px;line-height:1.35;word-break:break-word}
.score{font-weight:bold;font-size:14px}
.badge{display:inline-block;padding:0 5px;border-radius:3px;font-size:11px;color:#fff;margin-left:4px}
.badge.in{background:#2e7d32} .badge.out{background:#c62828} .badge.rep{background:#6a1b9a} .badge.dup{background:#455a64}
.caption{color:#333} .url a{color:#1565c0} .key{color:#777;font-family:monospace;font-size:11px}
"""

_JS = """
(function(){
  var rep=document.getElementById('f-replicated'), out=document.getElementById('f-outside'),
      only=document.getElementById('f-outside-only'), shown=document.getElementById('shown');
  function apply(){
    var qs=document.querySelectorAll('.query'), n=0;
    for(var i=0;i<qs.length;i++){
      var q=qs[i], show=(!rep.checked||q.getAttribute('data-replicated')==='1')&&
                        (!only.checked||q.getAttribute('data-outside-only')==='1');
      var ms=q.querySelectorAll('.mcard'), visible=0;
      for(var j=0;j<ms.length;j++){
        var keep=!out.checked||ms[j].getAttribute('data-in-subset')!=='1';
        ms[j].style.display=keep?'':'none'; if(keep) visible++;
      }
      if(out.checked&&visible===0) show=false;
      q.style.display=show?'':'none'; if(show) n++;
    }
    shown.textContent=n+' of '+qs.length+' queries shown';
  }
  // Filters can be preset by the link: report.html#replicated,outside,outside-only
  var preset=(location.hash||'').replace(/^#/,'').split(',');
  rep.checked=rep.checked||preset.indexOf('replicated')>=0;
  out.checked=out.checked||preset.indexOf('outside')>=0;
  only.checked=only.checked||preset.indexOf('outside-only')>=0;
  [rep,out,only].forEach(function(c){c.addEventListener('change',apply);});
  apply();
})();
"""


def _summary_html(summary: dict[str, Any], histogram_png: bytes | None) -> str:
    rows = []
    for name, entry in summary["replication"].items():
        rows.append(
            f"<tr><td>{_esc(name)}</td><td>{_fmt(entry['threshold'])}</td><td>{_pct(entry['all'])}</td>"
            f"<td>{_pct(entry['in_subset'])}</td><td>{_pct(entry['outside_subset'])}</td>"
            f"<td>{_pct(entry['outside_subset_only'])}</td><td>{_pct(entry.get('baseline_fpr'))}</td></tr>"
        )
    stats_rows = []
    top1 = summary["queries"]["top1"]
    for label, st in (("generations, all", top1["all"]), ("generations, best in subset", top1["in_subset"]),
                      ("generations, best outside subset", top1["outside_subset"])):
        stats_rows.append(f"<tr><td>{label}</td><td>{st['n']}</td><td>{_fmt(st['mean'])}</td><td>{_fmt(st['p95'])}</td><td>{_fmt(st['max'])}</td></tr>")
    b = summary.get("baseline")
    if b:
        for label, st in (("training set self-similarity", b["top1"]), ("training set, near-duplicates excluded", b["top1_no_dups"])):
            stats_rows.append(f"<tr><td>{label}</td><td>{st['n']}</td><td>{_fmt(st['mean'])}</td><td>{_fmt(st['p95'])}</td><td>{_fmt(st['max'])}</td></tr>")
    cov, idx = summary.get("coverage") or {}, summary.get("index") or {}
    frac = cov.get("indexed_fraction")
    failures = cov.get("failures_by_reason") or {}
    fail_txt = ", ".join(f"{_esc(k)}: {_esc(v)}" for k, v in sorted(failures.items())) or "none recorded"
    cal = summary.get("calibration")
    cal_txt = (
        f"Calibrated threshold {_fmt(cal['threshold'])}: {100 * (1 - cal['fpr_target']):.1f}% of {cal['baseline_samples']} "
        f"training images score below it against the rest of the corpus (near-duplicates excluded); implied false-positive rate "
        f"{100 * cal['implied_fpr']:.2f}%."
        if cal else "No calibrated threshold (no baseline)."
    )
    warnings = "".join(f"<div class=warn>⚠ {_esc(w)}</div>" for w in summary.get("warnings") or [])
    hist = f'<img class=hist alt="top-1 score histogram" src="{_data_uri(histogram_png, "image/png")}">' if histogram_png else ""
    q = summary["queries"]
    return f"""
<section class=summary>
<h2>Replication rate (95% Wilson interval)</h2>
<table class=fig><tr><th>threshold</th><th>value</th><th>all queries</th><th>best match in subset</th>
<th>best match outside subset</th><th>copy only outside subset</th><th>baseline false-positive rate</th></tr>{''.join(rows)}</table>
<div class=note>{_esc(q['count'])} queries, {_esc(q['with_matches'])} with matches; {_esc(q['near_duplicates'])} near-duplicate(s)
(score &ge; {_fmt(summary['thresholds']['duplicate'])}). {cal_txt}</div>
<h2>Top-1 scores</h2>
<table class=fig><tr><th></th><th>n</th><th>mean</th><th>p95</th><th>max</th></tr>{''.join(stats_rows)}</table>
<h2>Coverage</h2>
<div class=note>Vectors indexed: {_esc(cov.get('vectors_indexed'))} of {_esc(cov.get('samples_attempted'))} samples attempted
({'–' if frac is None else f'{100 * frac:.2f}%'}); failures: {fail_txt}. Index: {_esc(idx.get('ntotal'))} vectors,
nprobe {_esc(idx.get('nprobe'))}, estimated recall {_fmt(idx.get('estimated_recall'))}.<br>{_esc(LOWER_BOUND_NOTE)}</div>
{warnings}
{hist}
</section>"""


def render_gallery(
    data: RunData,
    summary: dict[str, Any],
    histogram_png: bytes | None = None,
    top: int = 5,
    max_queries: int = 200,
    storage: Storage | None = None,
) -> str:
    """The self-contained HTML gallery: queries sorted by best score, each beside its top matches."""
    thresholds = summary["thresholds"]
    queries = data.queries.to_pylist()
    queries.sort(key=lambda r: (r["best_score"] is None, -(r["best_score"] or 0.0), r["query_key"]))
    total = len(queries)
    if max_queries > 0:
        queries = queries[:max_queries]
    wanted = {r["query_key"] for r in queries}
    by_query: dict[str, list[dict[str, Any]]] = {}
    for m in data.matches.to_pylist():
        if m["query_key"] in wanted and m["rank"] <= top:
            by_query.setdefault(m["query_key"], []).append(m)
    for ms in by_query.values():
        ms.sort(key=lambda m: m["rank"])

    ranges = sorted({(m["tar_url"], m["tar_offset"], m["tar_size"]) for ms in by_query.values() for m in ms},
                    key=lambda r: tuple("" if v is None else str(v) for v in r))
    with ThreadPoolExecutor(max_workers=FETCH_THREADS) as pool:
        fetched = dict(zip(ranges, pool.map(lambda r: _fetch_thumbnail(*r, storage), ranges)))

    blocks = []
    for qrow in queries:
        matches = by_query.get(qrow["query_key"], [])
        qw, qh = qrow["width"], qrow["height"]
        q_uri = None
        if qrow["thumbnail"]:
            q_uri = _data_uri(qrow["thumbnail"], "image/jpeg")
            if not qw or not qh:
                _, qw, qh = thumbnail_jpeg(qrow["thumbnail"])
        q_boxes = []
        for m in matches:
            colour = RANK_COLOURS[(m["rank"] - 1) % len(RANK_COLOURS)]
            if m["query_box"] is not None:
                q_boxes.append((m["query_box"], colour, False, f"#{m['rank']} verified region"))
            elif m["region_box"] is not None and qw and qh and list(m["region_box"]) != [0, 0, qw, qh]:
                q_boxes.append((m["region_box"], colour, True, f"#{m['rank']} query region {m['region']}"))
        badges = ""
        if qrow["replicated"]:
            badges += "<span class='badge rep'>replicated</span>"
        if qrow["copy_outside_subset_only"]:
            badges += "<span class='badge out'>copy only outside subset</span>"
        qcard = (
            f"<div class='card qcard'>{_picture(q_uri, qw or 0, qh or 0, q_boxes, 'query ' + str(qrow['query_key']))}"
            f"<div class=meta><div class=score>best {_fmt(qrow['best_score'])}{badges}</div>"
            f"<div class=caption>{_esc(qrow['prompt'])}</div>"
            f"<div class=key>{_esc(qrow['query_key'])}</div><div class=key>{_esc(qrow['source'])}</div></div></div>"
        )
        mcards = []
        for m in matches:
            colour = RANK_COLOURS[(m["rank"] - 1) % len(RANK_COLOURS)]
            img = fetched.get((m["tar_url"], m["tar_offset"], m["tar_size"]), {})
            m_boxes = [(m["match_box"], colour, False, f"#{m['rank']} matched region")] if m["match_box"] is not None else []
            inside = bool(m["in_subset"])
            badge = "<span class='badge in'>in subset</span>" if inside else "<span class='badge out'>outside subset</span>"
            if m["score"] is not None and m["score"] >= thresholds["duplicate"]:
                badge += "<span class='badge dup'>near-duplicate</span>"
            href = _safe_href(m["url"])
            url_html = (f"<a href=\"{_esc(href)}\" rel=\"noopener noreferrer nofollow\" target=_blank>{_esc(m['url'][:90])}</a>"
                        if href else _esc((m["url"] or "")[:90]))
            extra = []
            if m["dup_group_size"] and m["dup_group_size"] > 1:
                extra.append(f"{_esc(m['dup_group_size'])} copies in training set")
            if m["inliers"] is not None:
                extra.append(f"{_esc(m['inliers'])} inliers")
            if m["verify_score"] is not None:
                extra.append(f"verify {_fmt(m['verify_score'])}")
            mcards.append(
                f"<div class='card mcard' data-in-subset='{1 if inside else 0}' style='border-color:{colour}'>"
                f"{_picture(img.get('uri'), img.get('width', 0), img.get('height', 0), m_boxes, 'match ' + str(m['match_key']), img.get('error'))}"
                f"<div class=meta><div class=score>#{m['rank']} {_fmt(m['score'])}{badge}</div>"
                f"<div class=caption>{_esc(m['caption'])}</div><div class=url>{url_html}</div>"
                f"<div class=key>{_esc(m['match_key'])}</div>"
                f"<div class=key>{' · '.join(extra)}</div></div></div>"
            )
        blocks.append(
            f"<div class=query data-replicated='{1 if qrow['replicated'] else 0}' "
            f"data-outside-only='{1 if qrow['copy_outside_subset_only'] else 0}'>{qcard}{''.join(mcards)}</div>"
        )

    emb = summary.get("embedder") or {}
    emb_txt = ", ".join(f"{k}={v}" for k, v in sorted(emb.items())) if isinstance(emb, dict) else str(emb)
    cut = f" (the {len(queries)} best-scoring of {total})" if len(queries) < total else ""
    return f"""<!doctype html>
<html lang=en><head><meta charset="utf-8"><title>replica report: run {_esc(summary['run_id'])}</title>
<meta name=viewport content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>
<body>
<h1>Replication report: run <code>{_esc(summary['run_id'])}</code></h1>
<div class=sub>created {_esc(summary.get('created_at'))} · embedder {_esc(emb_txt)} · reported {_esc(summary.get('reported_at'))}</div>
{_summary_html(summary, histogram_png)}
<h2>Gallery{_esc(cut)}: each query beside its top {int(top)} matches</h2>
<div class=controls>
<label><input type=checkbox id=f-replicated> replicated only</label>
<label><input type=checkbox id=f-outside> matches outside the subset only</label>
<label><input type=checkbox id=f-outside-only> copies found only outside the subset</label>
<span id=shown></span></div>
<div id=gallery>{''.join(blocks)}</div>
<script>{_JS}</script>
</body></html>
"""


# --------------------------------------------------------------------------- stage


def run_report(
    run_url: str,
    storage: Storage | None = None,
    top: int = 5,
    max_queries: int = 200,
) -> dict[str, Any]:
    """Read a run directory and write ``histogram.png``, ``report.html`` and ``summary.json`` into it.

    Returns the summary (the content of ``summary.json``). ``top`` matches are shown per query;
    the gallery holds the ``max_queries`` best-scoring queries (0 = all of them).
    """
    if top < 1:
        raise ConfigError(f"--top must be at least 1, got {top}")
    if max_queries < 0:
        raise ConfigError(f"--max-queries must be 0 (all) or more, got {max_queries}")
    data = load_run(run_url, storage)
    summary = summarize(data)
    baseline = data.baseline
    png = render_histogram(
        data.queries.column("best_score").to_pylist(),
        baseline.column("top1_score").to_pylist() if baseline is not None else None,
        summary["thresholds"],
        baseline.column("top1_score_no_dups").to_pylist() if baseline is not None else None,
        title=f"Top-1 similarity, run {summary['run_id']}",
    )
    page = render_gallery(data, summary, png, top=top, max_queries=max_queries, storage=storage)
    outputs = {name: join(data.url, name) for name in (HISTOGRAM, GALLERY, SUMMARY)}
    summary["outputs"] = outputs
    write_bytes(outputs[HISTOGRAM], png, storage)
    write_bytes(outputs[GALLERY], page.encode("utf-8"), storage)
    # Last: its presence says the report of this run is complete.
    write_json(outputs[SUMMARY], summary, storage)
    return summary


def report_command(
    run: Annotated[str, typer.Option("--run", "-r", help="Run directory URL: {results}/run_id={run_id} (local path or s3://...).")],
    top: Annotated[int, typer.Option("--top", help="Matches shown per query in the gallery.")] = 5,
    max_queries: Annotated[int, typer.Option("--max-queries", help="Queries in the gallery, best-scoring first (0 = all).")] = 200,
    s3_endpoint_url: Annotated[str | None, typer.Option("--s3-endpoint-url", help="S3-compatible endpoint (else AWS_ENDPOINT_URL).")] = None,
    s3_region: Annotated[str | None, typer.Option("--s3-region", help="S3 region (else AWS_REGION).")] = None,
    s3_anon: Annotated[bool, typer.Option("--s3-anon", help="Anonymous S3 access (public buckets).")] = False,
) -> None:
    """Summarise a search run: replication rates with intervals, histogram PNG, HTML gallery."""
    storage = Storage(endpoint_url=s3_endpoint_url, region=s3_region, anon=s3_anon)
    try:
        summary = run_report(run, storage, top=top, max_queries=max_queries)
    except ReplicaError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    for line in summary_lines(summary):
        typer.echo(line)


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The headline figures of a summary, as the CLI prints them."""
    q = summary["queries"]
    lines = [f"run {summary['run_id']}: {q['count']} queries"]
    for name, entry in summary["replication"].items():
        r = entry["all"]
        if r["rate"] is None:
            continue
        lo, hi = r["ci95"]
        lines.append(
            f"  {name:<12} >= {entry['threshold']:.3f}: {100 * r['rate']:.2f}% [{100 * lo:.2f}, {100 * hi:.2f}]"
            f" ({r['count']}/{r['n']}), copy only outside subset {100 * entry['outside_subset_only']['rate']:.2f}%"
        )
    lines.extend(f"  warning: {w}" for w in summary["warnings"])
    lines.extend(f"  wrote {url}" for url in summary["outputs"].values())
    return lines
