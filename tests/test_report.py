"""The report stage on real run directories: real images in real WebDataset tars, real Parquet
files in the result schemas, figures checked against a brute-force recomputation."""
from __future__ import annotations

import io
import json
import math
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import storage as rio
from pipeline.errors import ConfigError, MismatchError
from pipeline.layout.runs import RunFolder, baseline_schema, matches_schema, queries_schema
from pipeline.report import calibrate_threshold, run_report, wilson_interval
from pipeline.synthetic_images import caption as synth_caption
from pipeline.synthetic_images import scene

ROOT = Path(__file__).resolve().parents[1]
EVIL_CAPTION = '<script>alert("pwned")</script> a cat & "dog"'
N_CORPUS = 12
PER_TAR = 6
TOP_K = 3
THRESHOLDS = {"replication": 0.5, "duplicate": 0.95}


# --------------------------------------------------------------------------- building runs


def corpus_image(i: int) -> Image.Image:
    return scene(100 + i, (320, 256) if i % 2 == 0 else (256, 320))


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_corpus(folder: Path) -> dict[int, dict]:
    """Two WebDataset tars of N_CORPUS images; returns each image's record (byte range included)."""
    folder.mkdir(parents=True, exist_ok=True)
    records: dict[int, dict] = {}
    for t in range(N_CORPUS // PER_TAR):
        tar_path = folder / f"{t:05d}.tar"
        with tarfile.open(tar_path, "w") as tf:
            for j in range(PER_TAR):
                i = t * PER_TAR + j
                key = f"{t:05d}{j:04d}"
                cap = EVIL_CAPTION if i == 0 else synth_caption(i)
                url = "javascript:alert(1)" if i == 1 else f"https://example.com/img/{i}.jpg"
                for ext, data in (("jpg", jpeg(corpus_image(i))), ("txt", cap.encode()),
                                  ("json", json.dumps({"url": url, "caption": cap}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
                records[i] = {"key": key, "url": url, "caption": cap, "shard": f"{t:05d}", "row": j}
        with tarfile.open(tar_path) as tf:
            for member in tf.getmembers():
                if member.name.endswith(".jpg"):
                    i = int(member.name[:5]) * PER_TAR + int(member.name[5:9])
                    records[i].update(tar_url=str(tar_path), tar_offset=member.offset_data, tar_size=member.size)
    return records


def in_subset(i: int) -> bool:
    return i % 3 == 0


def caption_rows(i: int) -> int:
    """How many training rows carry corpus image i's caption (as `replica captions` would count)."""
    return (1, 3, 12, 150)[i % 4]


def dup_group(i: int) -> tuple[str, int]:
    # Images 2 and 3 are copies of each other in the training set; the rest are unique.
    return ("g2", 2) if i in (2, 3) else (f"g{i}", 1)


def final(similarity: float) -> float:
    """The final score the synthetic runs carry: monotone in the similarity, on another scale."""
    return float(similarity) ** 2


def build_run(results: Path, run_id: str, seed: int, records: dict[int, dict], n_queries: int = 40,
              n_baseline: int = 300, tar_url_of=None) -> Path:
    """A run directory as search writes it, with random but known content."""
    rng = np.random.default_rng(seed)
    run_dir = results / f"run_id={run_id}"
    run_dir.mkdir(parents=True)
    qrows, mrows = [], []
    for qi in range(n_queries):
        qkey = f"{run_id}-q{qi:03d}"
        prompt = f"prompt {qi} of {run_id}"
        thumb = scene(5000 + seed * 100 + qi, (256, 192))
        best = bestin = bestout = None
        sim = simin = simout = None
        best_key = None
        matches = []
        if qi != n_queries - 1:  # the last query has no match at all (everything blocklisted, say)
            top = float(rng.uniform(0.15, 1.0))
            scores = sorted([top] + list(rng.uniform(0.05, top, TOP_K - 1)), reverse=True)
            corpus_ids = rng.choice(N_CORPUS, TOP_K, replace=False)
            for rank, (s, ci) in enumerate(zip(scores, corpus_ids), start=1):
                rec = records[int(ci)]
                group, size = dup_group(int(ci))
                verified = rank == 1 and s > 0.6
                mrows.append({
                    "run_id": run_id, "query_key": qkey, "prompt": prompt, "rank": rank,
                    "match_key": rec["key"], "shard": rec["shard"], "row": rec["row"],
                    "url": rec["url"], "caption": rec["caption"],
                    "tar_url": tar_url_of(rec) if tar_url_of else rec["tar_url"],
                    "tar_offset": rec["tar_offset"], "tar_size": rec["tar_size"],
                    # The final score is another (monotone) scale than the similarity.
                    "score_index": s - 0.01, "score_exact": s, "score_rerank": None, "similarity": s,
                    "score": final(s),
                    "region": 0 if rank == 1 else 1,
                    "region_box": [0, 0, 512, 384] if rank == 1 else [128, 96, 384, 288],
                    "in_subset": in_subset(int(ci)),
                    "inliers": 40 if verified else None, "tentative_matches": 60 if verified else None,
                    "verify_score": 0.8 if verified else None,
                    "query_box": [64, 48, 320, 240] if verified else None,
                    "match_box": [40, 30, 200, 160] if verified else None,
                    "dup_group": group, "dup_group_size": size,
                    "caption_count": caption_rows(int(ci)), "caption_count_normalized": caption_rows(int(ci)),
                    "nl2": float(1.6 - s), "nl2_references": 50,
                    "prompt_caption_exact": rank == 1 and qi % 5 == 0, "prompt_caption_overlap": 0.6 if qi % 3 else 0.1,
                    "embedder": "default", "preprocess": "resize256-crop224",
                })
                matches.append((s, int(ci)))
            sim, best, best_key = scores[0], final(scores[0]), records[int(corpus_ids[0])]["key"]
            ins = [s for s, ci in matches if in_subset(ci)]
            outs = [s for s, ci in matches if not in_subset(ci)]
            simin = max(ins) if ins else None
            simout = max(outs) if outs else None
            bestin = final(simin) if ins else None
            bestout = final(simout) if outs else None
        thr = THRESHOLDS["replication"]
        qrows.append({
            "run_id": run_id, "query_key": qkey, "prompt": prompt, "source": f"file:///gen/{qkey}.png",
            "thumbnail": jpeg(thumb, 85), "width": 512, "height": 384,
            "best_score": best, "best_match_key": best_key,
            "best_score_in_subset": bestin, "best_score_outside_subset": bestout,
            "best_similarity": sim, "best_similarity_in_subset": simin, "best_similarity_outside_subset": simout,
            "replicated": sim is not None and sim >= thr,
            "copy_outside_subset_only": (simout is not None and simout >= thr)
            and not (simin is not None and simin >= thr),
        })
    top1 = rng.beta(2, 5, n_baseline)
    near = rng.integers(0, 3, n_baseline) * (rng.uniform(size=n_baseline) < 0.2)
    brows = [{
        "run_id": run_id, "sample_key": f"s{i:05d}", "top1_score": final(float(top1[i]) if near[i] == 0 else 0.97),
        "top1_key": f"k{i}", "top1_score_no_dups": final(float(top1[i])), "near_dup_count": int(near[i]),
        "top1_similarity": float(top1[i]) if near[i] == 0 else 0.97, "top1_similarity_no_dups": float(top1[i]),
    } for i in range(n_baseline)]
    pq.write_table(pa.Table.from_pylist(qrows, schema=queries_schema()), run_dir / "queries.parquet")
    pq.write_table(pa.Table.from_pylist(mrows, schema=matches_schema()), run_dir / "matches.parquet")
    pq.write_table(pa.Table.from_pylist(brows, schema=baseline_schema()), run_dir / "baseline.parquet")
    (run_dir / "run.json").write_text(json.dumps({
        "run_id": run_id, "created_at": "2024-06-01T00:00:00+00:00",
        "embedder": {"name": "default", "dim": 256}, "rerank": None, "verify": {"enabled": True},
        "thresholds": THRESHOLDS, "fpr": 0.01,
        "index": {"ntotal": 5000, "nprobe": 16, "estimated_recall": 0.93},
        "coverage": {"samples_attempted": 6000, "vectors_indexed": 5000,
                     "failures_by_reason": {"decode_error": 600, "download_error": 400}},
        "blocklist": {"entries": 3, "dropped_matches": 1},
        "subset": {"source": "laion-aesthetics-6plus", "size": 4},
    }))
    return run_dir


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def results(tmp_path_factory, corpus):
    """Two runs under one results folder, reported once for the whole module."""
    root = tmp_path_factory.mktemp("res") / "results"
    dirs = [build_run(root, "run-a", 1, corpus), build_run(root, "run-b", 2, corpus, n_queries=25)]
    summaries = [run_report(RunFolder(str(d)), top=TOP_K) for d in dirs]
    return root, dirs, summaries


# --------------------------------------------------------------------------- brute force


def test_memorisation_figures_equal_brute_force(results):
    """nL2 tails, replication by caption duplication and by prompt, the most copied images."""
    _, dirs, summaries = results
    for run_dir, summary in zip(dirs, summaries):
        matches = pq.read_table(run_dir / "matches.parquet").to_pylist()
        queries = pq.read_table(run_dir / "queries.parquet").to_pylist()
        smallest: dict[str, float] = {}
        best: dict[str, dict] = {}
        for m in matches:
            smallest[m["query_key"]] = min(smallest.get(m["query_key"], 9.0), m["nl2"])
            if m["query_key"] not in best or m["similarity"] > best[m["query_key"]]["similarity"]:
                best[m["query_key"]] = m
        values = np.array(list(smallest.values()))
        n = summary.nl2
        assert n["n"] == len(values) and n["min"] == pytest.approx(values.min())
        assert n["p5"] == pytest.approx(np.percentile(values, 5)) and n["p95"] == pytest.approx(np.percentile(values, 95))
        assert n["max"] == pytest.approx(values.max())

        tau = summary.thresholds["replication"]
        dup: dict[str, list[bool]] = {}
        prompt: dict[str, list[bool]] = {}
        for q in queries:
            m = best.get(q["query_key"])
            if m is None:
                continue
            hit = q["best_similarity"] >= tau
            rows = m["caption_count_normalized"]
            dup.setdefault("1" if rows == 1 else "2-9" if rows < 10 else "10-99" if rows < 100 else "100+", []).append(hit)
            group = ("prompt = caption" if m["prompt_caption_exact"] else
                     "shares >= 50% of words" if m["prompt_caption_overlap"] >= 0.5 else "different")
            prompt.setdefault(group, []).append(hit)
        mem = summary.memorisation
        for got, want in ((mem["by_caption_duplication"], dup), (mem["by_prompt_caption"], prompt)):
            assert {e["group"]: (e["count"], e["n"]) for e in got} == {g: (sum(v), len(v)) for g, v in want.items()}
            for e in got:
                assert e["ci95"] == pytest.approx(list(wilson_interval(e["count"], e["n"])))

        copiers: dict[str, set] = {}
        for m in matches:
            if m["similarity"] >= tau:
                copiers.setdefault(m["dup_group"], set()).add(m["query_key"])
        top = sorted(copiers, key=lambda g: -len(copiers[g]))
        assert [c["copying_generations"] for c in mem["most_copied"]] == [len(copiers[g]) for g in top][:12]
        assert mem["most_copied"][0]["image"] in {g for g in top if len(copiers[g]) == len(copiers[top[0]])}


def brute_wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Invert the score test on a fine grid: every p with |k/n - p| <= z * sqrt(p(1-p)/n)."""
    p = np.linspace(0, 1, 2_000_001)
    with np.errstate(divide="ignore", invalid="ignore"):
        inside = np.abs(k / n - p) <= z * np.sqrt(p * (1 - p) / n)
    inside |= (p == k / n)
    return float(p[inside].min()), float(p[inside].max())


def brute_calibrate(scores: list[float], fpr: float) -> float:
    arr = np.array(scores, dtype=np.float64)
    candidates = sorted(set(arr.tolist())) + [float(np.nextafter(arr.max(), np.inf))]
    return min(c for c in candidates if np.mean(arr >= c) <= fpr)


def col(run_dir: Path, name: str, column: str) -> list:
    return pq.read_table(run_dir / name).column(column).to_pylist()


def rate_at(values: list, t: float) -> tuple[int, int]:
    hits = sum(1 for v in values if v is not None and v >= t)
    return hits, len(values)


# --------------------------------------------------------------------------- tests


def test_wilson_matches_inverted_score_test():
    for k, n in [(0, 10), (1, 50), (7, 40), (40, 40), (13, 1000)]:
        lo, hi = wilson_interval(k, n)
        blo, bhi = brute_wilson(k, n)
        assert lo == pytest.approx(blo, abs=2e-6) and hi == pytest.approx(bhi, abs=2e-6), (k, n)
    assert wilson_interval(0, 0) is None


def test_calibrate_threshold_definition():
    rng = np.random.default_rng(0)
    for n, fpr in [(1000, 0.01), (300, 0.05), (57, 0.1), (50, 0.01), (10, 0.5)]:
        scores = rng.uniform(size=n).round(2).tolist()  # rounding makes ties
        t = calibrate_threshold(scores, fpr)
        assert t == brute_calibrate(scores, fpr)
        assert np.mean(np.array(scores) >= t) <= fpr
        assert np.mean(np.array(scores) < t) >= 1 - fpr
    # Fewer than 1/fpr samples: nothing of the baseline may reach the threshold.
    assert calibrate_threshold([0.1, 0.3, 0.2], 0.01) > 0.3
    assert calibrate_threshold([0.5] * 10 + [0.9], 0.1) == 0.9
    with pytest.raises(ConfigError):
        calibrate_threshold([0.1, 0.2], 0.0)
    with pytest.raises(ConfigError):
        calibrate_threshold([], 0.01)


def test_summary_equals_brute_force(results):
    _, dirs, summaries = results
    for run_dir, summary in zip(dirs, summaries):
        on_disk = json.loads((run_dir / "summary.json").read_text())
        assert on_disk["run_id"] == summary.run_id == run_dir.name.split("=", 1)[1]
        best = col(run_dir, "queries.parquet", "best_score")
        best_in = col(run_dir, "queries.parquet", "best_score_in_subset")
        best_out = col(run_dir, "queries.parquet", "best_score_outside_subset")
        nodup = col(run_dir, "baseline.parquet", "top1_score_no_dups")
        withdup = col(run_dir, "baseline.parquet", "top1_score")
        # The paper's thresholds read the similarity columns, the calibrated one the final score.
        on_similarity = {"all": col(run_dir, "queries.parquet", "best_similarity"),
                         "in_subset": col(run_dir, "queries.parquet", "best_similarity_in_subset"),
                         "outside_subset": col(run_dir, "queries.parquet", "best_similarity_outside_subset"),
                         "baseline_fpr": col(run_dir, "baseline.parquet", "top1_similarity_no_dups"),
                         "baseline_fpr_with_dups": col(run_dir, "baseline.parquet", "top1_similarity")}
        on_score = {"all": best, "in_subset": best_in, "outside_subset": best_out, "baseline_fpr": nodup,
                    "baseline_fpr_with_dups": withdup}

        t_cal = brute_calibrate(nodup, 0.01)
        assert on_disk["calibration"]["threshold"] == t_cal
        assert on_disk["calibration"]["implied_fpr"] == np.mean(np.array(nodup) >= t_cal)
        assert on_disk["thresholds"] == {**THRESHOLDS, "calibrated": t_cal}

        for name, t in on_disk["thresholds"].items():
            entry = on_disk["replication"][name]
            columns = on_score if name == "calibrated" else on_similarity
            assert entry["applies_to"] == ("score" if name == "calibrated" else "similarity")
            for part, values in columns.items():
                k, n = rate_at(values, t)
                assert (entry[part]["count"], entry[part]["n"]) == (k, n), (name, part)
                assert entry[part]["rate"] == pytest.approx(k / n)
                lo, hi = brute_wilson(k, n)
                assert entry[part]["ci95"] == pytest.approx([lo, hi], abs=2e-6), (name, part)
            only = sum(1 for i, o in zip(columns["in_subset"], columns["outside_subset"])
                       if o is not None and o >= t and not (i is not None and i >= t))
            assert entry["outside_subset_only"]["count"] == only
        # The run's own flags agree with the replication threshold.
        k, _ = rate_at(on_similarity["all"], 0.5)
        assert k == sum(col(run_dir, "queries.parquet", "replicated"))
        assert on_disk["replication"]["replication"]["outside_subset_only"]["count"] == sum(
            col(run_dir, "queries.parquet", "copy_outside_subset_only"))

        for stats, values in ((on_disk["queries"]["top1"]["all"], best),
                              (on_disk["queries"]["top1"]["in_subset"], best_in),
                              (on_disk["queries"]["top1"]["outside_subset"], best_out),
                              (on_disk["baseline"]["top1"], withdup),
                              (on_disk["baseline"]["top1_no_dups"], nodup)):
            arr = np.array([v for v in values if v is not None], dtype=np.float64)
            srt = np.sort(arr)
            pos = 0.95 * (len(srt) - 1)
            p95 = srt[math.floor(pos)] + (pos - math.floor(pos)) * (srt[math.ceil(pos)] - srt[math.floor(pos)])
            assert stats["n"] == len(arr)
            assert stats["mean"] == pytest.approx(arr.sum() / len(arr))
            assert stats["p95"] == pytest.approx(p95)
            assert stats["max"] == pytest.approx(arr.max())
        assert on_disk["queries"]["count"] == len(best)
        assert on_disk["queries"]["with_matches"] == len(best) - 1
        assert on_disk["queries"]["near_duplicates"] == rate_at(on_similarity["all"], 0.95)[0]
        near = col(run_dir, "baseline.parquet", "near_dup_count")
        assert on_disk["baseline"]["samples_with_near_duplicates"] == sum(1 for c in near if c > 0)

        cov = on_disk["coverage"]
        assert cov["indexed_fraction"] == pytest.approx(5000 / 6000)
        assert cov["lower_bound"] is True and "lower bound" in cov["note"]
        assert cov["failures_by_reason"] == {"decode_error": 600, "download_error": 400}
        assert on_disk["index"]["estimated_recall"] == 0.93 and on_disk["index"]["nprobe"] == 16
        # The default descriptor is not SSCD: the summary says to read the calibrated rates.
        assert any("calibrated" in w for w in on_disk["warnings"])


def test_outputs_exist_and_parse(results):
    _, dirs, _ = results
    for run_dir in dirs:
        with Image.open(run_dir / "histogram.png") as im:
            assert im.format == "PNG" and im.size[0] > 400 and im.size[1] > 300
            pixels = np.asarray(im.convert("RGB"))
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # bars, lines and text, not blank
        page = (run_dir / "report.html").read_text(encoding="utf-8")
        n_queries = len(col(run_dir, "queries.parquet", "query_key"))
        n_matches = len(col(run_dir, "matches.parquet", "match_key"))
        assert page.count("class=query ") == n_queries
        assert page.count("class='card mcard'") == n_matches
        # Self-contained: every image is a data URI; no external resource is referenced.
        srcs = re.findall(r'<img [^>]*src="([^"]+)"', page)
        copied = json.loads((run_dir / "summary.json").read_text())["memorisation"]["most_copied"]
        assert copied and page.count("generation(s) · similarity") == len(copied)
        assert len(srcs) == n_queries + n_matches + 1 + len(copied)  # + the histogram, the most copied images
        assert all(s.startswith(("data:image/jpeg;base64,", "data:image/png;base64,")) for s in srcs)
        assert "image unavailable" not in page
        assert not re.search(r'(src|href)="(?!data:|https://example\.com/)', page)
        for src in srcs:
            Image.open(io.BytesIO(__import__("base64").b64decode(src.split(",", 1)[1]))).verify()


def test_gallery_sorted_and_shows_ranged_reads(results, corpus):
    _, dirs, _ = results
    run_dir = dirs[0]
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    shown = re.findall(r"<div class=key>(run-a-q\d+)</div>", page)
    queries = pq.read_table(run_dir / "queries.parquet").to_pylist()
    expected = sorted(queries, key=lambda r: (r["best_score"] is None, -(r["best_score"] or 0), r["query_key"]))
    assert shown == [r["query_key"] for r in expected]
    # Each match card shows the image at its byte range: the thumbnail is that corpus image.
    by_key = {rec["key"]: i for i, rec in corpus.items()}
    cards = re.findall(r"<div class='card mcard'.*?<img src=\"data:image/jpeg;base64,([^\"]+)\".*?<div class=key>(\d{9})</div>", page)
    assert len(cards) == len(col(run_dir, "matches.parquet", "match_key"))
    for b64, key in cards[:12]:
        thumb = Image.open(io.BytesIO(__import__("base64").b64decode(b64))).convert("RGB")
        original = corpus_image(by_key[key])
        assert max(thumb.size) == 256 and thumb.size[0] / thumb.size[1] == pytest.approx(original.size[0] / original.size[1], rel=0.02)
        ref = np.asarray(original.resize(thumb.size, Image.BILINEAR), dtype=np.float32)
        other = np.asarray(corpus_image((by_key[key] + 1) % N_CORPUS).resize(thumb.size, Image.BILINEAR), dtype=np.float32)
        err = np.abs(np.asarray(thumb, dtype=np.float32) - ref).mean()
        assert err < np.abs(np.asarray(thumb, dtype=np.float32) - other).mean() / 3
    # Boxes are drawn in the original pixel grid of each image (the SVG scales them to the thumbnail).
    assert '<svg class=boxes viewBox="0 0 512 384"' in page
    assert '<rect x="64" y="48" width="256" height="192"' in page  # query_box
    assert '<rect x="40" y="30" width="160" height="130"' in page  # match_box
    assert re.search(r'viewBox="0 0 (320 256|256 320)"', page)


def test_html_escapes_untrusted_text(results):
    _, dirs, _ = results
    page = (dirs[0] / "report.html").read_text(encoding="utf-8")
    matches = pq.read_table(dirs[0] / "matches.parquet").to_pylist()
    assert any(m["caption"] == EVIL_CAPTION for m in matches), "fixture must show the hostile caption"
    assert "&lt;script&gt;alert(&#34;pwned&#34;)&lt;/script&gt; a cat &amp; &#34;dog&#34;" in page
    assert "alert(\"pwned\")" not in page
    assert page.count("<script") == 1  # only the filter script of the page itself
    assert 'href="javascript:' not in page and "javascript:alert(1)" in page  # shown as text, not a link


# Columns a newer version of the run writer added: an older run's files lack them.
NEWER_QUERY_COLUMNS = ["copy_outside_subset_only"]
NEWER_MATCH_COLUMNS = ["inliers", "verify_score", "query_box", "match_box"]


@pytest.fixture(scope="module")
def dated_results(tmp_path_factory, corpus):
    """Two scheduled runs with ISO-date ids; the older one written before NEWER_*_COLUMNS existed."""
    root = tmp_path_factory.mktemp("dated") / "results"
    old = build_run(root, "2025-12-01", 3, corpus, n_queries=20, n_baseline=10)
    new = build_run(root, "2025-12-08", 4, corpus, n_queries=30, n_baseline=10)
    for name, dropped in (("queries.parquet", NEWER_QUERY_COLUMNS), ("matches.parquet", NEWER_MATCH_COLUMNS)):
        table = pq.read_table(old / name)
        pq.write_table(table.drop_columns(dropped), old / name)
    return root, [old, new]


def test_duckdb_queries_from_docs(dated_results, monkeypatch):
    root, dirs = dated_results
    doc = (ROOT / "docs" / "RESULTS.md").read_text()
    sql = re.findall(r"```sql\n(.*?)```", doc, re.S)
    assert len(sql) == 4
    monkeypatch.chdir(root.parent)
    con = duckdb.connect()
    # every row of both runs, the older run's missing columns read as None
    queries = [{**dict.fromkeys(NEWER_QUERY_COLUMNS), **r} for d in dirs for r in pq.read_table(d / "queries.parquet").to_pylist()]
    matches = [{**dict.fromkeys(NEWER_MATCH_COLUMNS), **r} for d in dirs for r in pq.read_table(d / "matches.parquet").to_pylist()]
    assert all(q["copy_outside_subset_only"] is None for q in queries if q["run_id"] == "2025-12-01")

    per_run = con.execute(sql[0]).fetchall()
    expected = []
    for run_id in ("2025-12-01", "2025-12-08"):
        rows = [q for q in queries if q["run_id"] == run_id]
        flags = [q["copy_outside_subset_only"] for q in rows if q["copy_outside_subset_only"] is not None]
        expected.append((run_id, len(rows), sum(q["replicated"] for q in rows) / len(rows),
                         sum(flags) if flags else None))
    assert [(r[0], r[1], pytest.approx(r[2]), r[3]) for r in per_run] == expected
    assert expected[1][3], "the newer run should hold copies found only outside the subset"

    top = con.execute(sql[1]).fetchall()
    groups: dict[str, set] = {}
    for m in matches:
        if m["similarity"] >= 0.5:
            groups.setdefault(m["dup_group"], set()).add((m["run_id"], m["query_key"]))
    assert {r[0]: r[4] for r in top} == {g: len(v) for g, v in groups.items()}
    assert [r[4] for r in top] == sorted((r[4] for r in top), reverse=True)
    assert max(r[5] for r in top) == 2  # an image copied in both runs

    outside = con.execute(sql[2]).fetchall()
    want = sorted((q["run_id"], q["query_key"]) for q in queries if q["copy_outside_subset_only"])
    assert sorted((r[0], r[1]) for r in outside) == want and want
    best_match = {(m["run_id"], m["query_key"]): m for m in matches if m["rank"] == 1}
    for r in outside:
        m = best_match[(r[0], r[1])]
        assert r[5] == m["match_key"] and not m["in_subset"] and r[3] >= 0.5

    # replication by caption duplication: each generation's most similar match, bucketed
    by_dup = con.execute(sql[3]).fetchall()
    best: dict[tuple, dict] = {}
    for m in matches:
        k = (m["run_id"], m["query_key"])
        if k not in best or m["similarity"] > best[k]["similarity"]:
            best[k] = m
    want: dict[tuple, list] = {}
    for q in queries:
        m = best.get((q["run_id"], q["query_key"]))
        if m is None:
            continue
        rows = m["caption_count_normalized"]
        bucket = "1" if rows == 1 else "2-9" if rows < 10 else "10-99" if rows < 100 else "100+"
        want.setdefault((q["run_id"], bucket), []).append(q["replicated"])
    assert {(r[0], r[1]): (r[2], pytest.approx(r[3])) for r in by_dup} == \
        {k: (len(v), sum(v) / len(v)) for k, v in want.items()}
    assert {r[1] for r in by_dup} == {"1", "2-9", "10-99", "100+"}

    # Each documented option is needed: without union_by_name the older run's columns win and the
    # newer column is not found; without hive_types the date-like ids come back as dates.
    options = ", hive_types = {'run_id': 'VARCHAR'}, union_by_name = true"
    assert sql[0].count(options) == 1
    with pytest.raises(duckdb.BinderException, match="copy_outside_subset_only"):
        con.execute(sql[0].replace(options, ""))
    dated = con.execute(sql[0].replace(options, ", union_by_name = true")).fetchall()
    assert [type(r[0]).__name__ for r in dated] == ["date", "date"]

    # The README shows shortened copies of the same three queries: they agree.
    readme = re.findall(r"```sql\n(.*?)```", (ROOT / "README.md").read_text(), re.S)[0]
    short = [con.execute(q).fetchall() for q in readme.split(";") if q.strip()]
    assert len(short) == 3
    assert short[0] == per_run
    assert [(r[0], r[3]) for r in short[1]] == [(r[0], r[4]) for r in top]
    assert [(r[0], r[1]) for r in short[2]] == [(r[0], r[1]) for r in outside]

    # The pyarrow snippet keeps the newer column, None for the older run.
    python = re.findall(r"```python\n(.*?)```", doc, re.S)
    assert len(python) == 1
    scope: dict = {}
    exec(python[0], scope)
    table = scope["queries"]
    assert sorted(zip(table.column("run_id").to_pylist(), table.column("copy_outside_subset_only").to_pylist())) \
        == sorted((q["run_id"], q["copy_outside_subset_only"]) for q in queries)


def test_report_over_s3(s3_server, corpus, tmp_path):
    """The same stage on an S3 API: parquet, run.json and the tars' ranged reads go through fsspec."""
    storage = s3_server
    bucket = "s3://replica-test/report-test"
    for path in {rec["tar_url"] for rec in corpus.values()}:
        rio.write_bytes(f"{bucket}/corpus/{Path(path).name}", Path(path).read_bytes(), storage)
    local = build_run(tmp_path / "results", "s3run", 3, corpus, n_queries=8, n_baseline=120,
                      tar_url_of=lambda rec: f"{bucket}/corpus/{Path(rec['tar_url']).name}")
    run_url = f"{bucket}/results/run_id=s3run"
    for f in local.iterdir():
        rio.write_bytes(f"{run_url}/{f.name}", f.read_bytes(), storage)
    summary = run_report(RunFolder(run_url, storage), top=2)
    assert summary.outputs["report.html"] == f"{run_url}/report.html"
    on_s3 = json.loads(rio.read_bytes(f"{run_url}/summary.json", storage))
    assert on_s3["calibration"]["threshold"] == brute_calibrate(col(local, "baseline.parquet", "top1_score_no_dups"), 0.01)
    assert on_s3["calibration"]["baseline_samples"] == 120
    # 120 samples cannot support fpr 0.01 on their own: the summary says so.
    assert any("baseline samples" in w for w in on_s3["warnings"])
    page = rio.read_bytes(f"{run_url}/report.html", storage).decode()
    assert page.count("class='card mcard'") == 2 * 7 and "image unavailable" not in page
    Image.open(io.BytesIO(rio.read_bytes(f"{run_url}/histogram.png", storage))).verify()


def test_missing_images_and_baseline_are_reported_not_fatal(corpus, tmp_path):
    run_dir = build_run(tmp_path / "results", "broken", 4, corpus, n_queries=6,
                        tar_url_of=lambda rec: rec["tar_url"] + ".missing")
    (run_dir / "baseline.parquet").unlink()
    summary = run_report(RunFolder(str(run_dir)))
    assert "calibrated" not in summary.thresholds and summary.calibration is None
    assert any("no baseline" in w for w in summary.warnings)
    page = (run_dir / "report.html").read_text()
    copied = len(summary.memorisation["most_copied"])
    assert page.count("image unavailable") == len(col(run_dir, "matches.parquet", "match_key")) + copied
    assert page.count("FileNotFoundError") >= 1


def test_bad_run_directories_fail_with_a_message(corpus, tmp_path):
    with pytest.raises(ConfigError, match="run.json"):
        run_report(RunFolder(str(tmp_path / "nowhere")))
    run_dir = build_run(tmp_path / "results", "r1", 5, corpus, n_queries=4)
    table = pq.read_table(run_dir / "matches.parquet").drop_columns(["score"])
    pq.write_table(table, run_dir / "matches.parquet")
    with pytest.raises(MismatchError, match="score"):
        run_report(RunFolder(str(run_dir)))
    other = build_run(tmp_path / "results", "r2", 6, corpus, n_queries=4)
    shutil.copy(other / "queries.parquet", run_dir / "queries.parquet")
    shutil.copy(other / "matches.parquet", run_dir / "matches.parquet")
    with pytest.raises(MismatchError, match="different runs"):
        run_report(RunFolder(str(run_dir)))
    renamed = other.parent / "run_id=r3"
    shutil.copytree(other, renamed)
    with pytest.raises(MismatchError, match="named for run 'r3'"):
        run_report(RunFolder(str(renamed)))
    with pytest.raises(ConfigError, match="--top"):
        run_report(RunFolder(str(other)), top=0)
    assert not (run_dir / "summary.json").exists()


def test_cli_report(corpus, tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import app

    run_dir = build_run(tmp_path / "results", "cli", 7, corpus, n_queries=5)
    result = CliRunner().invoke(app, ["report", "--run", str(run_dir), "--top", "1"])
    assert result.exit_code == 0, result.output
    assert "replication" in result.output and "wrote" in result.output
    page = (run_dir / "report.html").read_text()
    assert page.count("class='card mcard'") == 4  # one match for each of the 4 matched queries
    result = CliRunner().invoke(app, ["report", "--run", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "run.json" in result.output


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium: run .ci/install-browser.sh (Debian chromium)")
def test_gallery_renders_in_headless_chromium(results, tmp_path):
    _, dirs, _ = results
    page = dirs[0] / "report.html"
    shot = tmp_path / "shot.png"
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,1600",
           "--hide-scrollbars", page.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert shot.exists(), proc.stderr[-2000:]
    shutil.copy(shot, dirs[0] / "screenshot.png")  # kept beside the report for a look
    rgb = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    assert rgb.shape[:2] == (1600, 1200)
    # Photographic thumbnails bring thousands of colours; a page of text and tables brings few.
    colours = len(np.unique(rgb.reshape(-1, 3), axis=0))
    assert colours > 5000, colours
    # The lower half of the window is the gallery: most of it must be image pixels, not page background.
    lower = rgb[900:1500, :1000]
    background = (np.abs(lower - np.array([250, 250, 250])).sum(axis=-1) < 12) | (lower.min(axis=-1) > 245)
    assert background.mean() < 0.6, background.mean()


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium: run .ci/install-browser.sh (Debian chromium)")
@pytest.mark.parametrize("preset", ["", "replicated", "outside", "outside-only", "replicated,outside"])
def test_gallery_filters_run_in_chromium(results, tmp_path, preset):
    """The inline filter script runs in a real browser; presets in the link tick the checkboxes."""
    _, dirs, _ = results
    run_dir = dirs[0]
    url = (run_dir / "report.html").as_uri() + (f"#{preset}" if preset else "")
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", url]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=180).stdout
    queries = pq.read_table(run_dir / "queries.parquet").to_pylist()
    matches = pq.read_table(run_dir / "matches.parquet").to_pylist()
    flags = set(preset.split(",")) - {""}
    outside_keys = {m["query_key"] for m in matches if not m["in_subset"]}
    expected = [q for q in queries
                if ("replicated" not in flags or q["replicated"])
                and ("outside-only" not in flags or q["copy_outside_subset_only"])
                and ("outside" not in flags or q["query_key"] in outside_keys)]
    assert f'<span id="shown">{len(expected)} of {len(queries)} queries shown</span>' in dom, dom[-500:]
    hidden_cards = len(re.findall(r'class="card mcard" data-in-subset="1" style="[^"]*display: none', dom))
    assert hidden_cards == (sum(m["in_subset"] for m in matches) if "outside" in flags else 0)


HOSTILE = ['<img src=x onerror=alert("caption")>', '" onmouseover="alert(\'attr\')" x="',
           "' onmouseover='alert(\"attr2\")' x='", "</div><script>alert('script')</script>"]


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium: run .ci/install-browser.sh (Debian chromium)")
def test_hostile_text_opens_no_dialog_in_chromium(corpus, tmp_path):
    """Captions, URLs, keys and prompts from the web cannot run script, in text or in attributes:
    the page is loaded in Chromium and the mouse passes over every element; no dialog opens.
    A page that does embed the same payload raw opens one (the check can see dialogs)."""
    from browser import Browser

    evil = {i: dict(rec) for i, rec in corpus.items()}
    for i, rec in evil.items():
        payload = HOSTILE[i % len(HOSTILE)]
        rec.update(key=f"{payload}{i}", caption=payload, url=f'https://example.com/{i}"onmouseover="alert(1)')
    evil[1]["url"] = "javascript:alert('link')"
    run_dir = build_run(tmp_path / "results", "hostile", 8, evil, n_queries=6)
    for name, column in (("queries.parquet", "prompt"), ("matches.parquet", "prompt")):
        table = pq.read_table(run_dir / name)
        prompts = [HOSTILE[j % len(HOSTILE)] for j in range(table.num_rows)]
        pq.write_table(table.set_column(table.schema.get_field_index(column), column, pa.array(prompts)), run_dir / name)
    run_report(RunFolder(str(run_dir)), top=TOP_K)
    control = tmp_path / "control.html"
    control.write_text(f"<!doctype html><body><div>{HOSTILE[0]}</div></body>")

    browser = Browser()
    try:
        browser.open(control.as_uri())
        assert browser.dialogs, "the harness must see the dialog a raw payload opens"
        browser.dialogs.clear()
        browser.open((run_dir / "report.html").as_uri())
        hovered = browser.hover_everything()
        assert hovered > 100
        shown = browser.evaluate("document.querySelectorAll('.mcard .caption').length")
        assert shown == len(col(run_dir, "matches.parquet", "match_key"))
        assert browser.evaluate("document.querySelectorAll('.caption img, .key img, .meta script').length") == 0
        assert browser.dialogs == []
    finally:
        browser.close()
