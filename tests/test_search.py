"""Search end to end on a small planted corpus: real tars, real Ray, real faiss, real report."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline.layout import embeddings as schema
from pipeline.layout import runs
from pipeline.cli import app
from pipeline.config import SearchConfig
from pipeline.search import run_search

GLOBAL_EDITS = {"resize", "crop", "jpeg", "colour", "brightness_contrast", "greyscale", "flip", "rotate", "combo"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory, ray_local):
    """`replica demo` on a small corpus, through the CLI users run."""
    work = tmp_path_factory.mktemp("demo")
    result = CliRunner().invoke(app, ["demo", "--workdir", str(work), "--corpus-size", "400", "--copies-per-edit", "2",
                                      "--pasted", "4", "--novel", "8", "--baseline-size", "20", "--quiet"])
    assert result.exit_code == 0, result.output
    run = work / "results" / "run_id=demo"
    return {"work": work, "run": run, "output": result.output,
            "truth": json.loads((work / "truth.json").read_text())}


def table(run: Path, name: str):
    return pq.read_table(run / name)


def test_demo_prints_its_figures(demo):
    out = demo["output"]
    assert "recall@1 of planted copies, per edit:" in out
    assert "false positives at the calibrated threshold" in out
    assert f"report: {demo['run'] / 'report.html'}" in out
    scores = json.loads((demo["work"] / "demo_scores.json").read_text())
    assert set(scores["recall_at_1"]) == GLOBAL_EDITS | {"paste"}


def test_every_output_exists_and_parses(demo):
    run = demo["run"]
    assert table(run, "matches.parquet").schema.equals(runs.matches_schema(), check_metadata=False)
    assert table(run, "queries.parquet").schema.equals(runs.queries_schema(), check_metadata=False)
    assert table(run, "baseline.parquet").schema.equals(runs.baseline_schema(), check_metadata=False)
    summary = json.loads((run / "summary.json").read_text())
    info = json.loads((run / "run.json").read_text())
    assert info["run_id"] == summary["run_id"] == "demo"
    assert 0 < info["index"]["estimated_recall"] <= 1
    assert info["coverage"]["samples_attempted"] == info["coverage"]["vectors_indexed"] == 400
    # where the time went: every stage the demo runs, for the queries and for the baseline
    for part, stages in (("queries", {"read", "embed", "candidates", "rows", "verification", "nl2", "duplicates",
                                      "result_rows"}),
                         ("baseline", {"read", "embed", "candidates", "rows", "verification", "duplicates"})):
        seconds = info["stage_seconds"][part]
        assert set(seconds) == stages and all(v >= 0 for v in seconds.values()), (part, seconds)
        assert sum(seconds.values()) < info["seconds"]
    assert (run / "histogram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (run / "report.html").read_text()
    assert "novel-0" in html and "data:image/jpeg;base64," in html
    assert table(run, "queries.parquet").num_rows == len(demo["truth"])


def test_planted_copies_are_found_and_attributed(demo):
    matches = table(demo["run"], "matches.parquet").to_pylist()
    top1 = {m["query_key"]: m for m in matches if m["rank"] == 1}
    copies = [t for t in demo["truth"] if t["edit"] in GLOBAL_EDITS]
    hits = [top1[t["query_key"]]["match_key"] == t["source_key"] for t in copies]
    assert np.mean(hits) >= 0.9, [t["query_key"] for t, h in zip(copies, hits) if not h]
    for t in copies:  # the source is among the matches, and its subset flag is the planted one
        found = [m for m in matches if m["query_key"] == t["query_key"] and m["match_key"] == t["source_key"]]
        assert found and found[0]["in_subset"] == t["source_in_subset"]
    subset = set(pq.read_table(demo["work"] / "subset.parquet").column("key").to_pylist())
    assert all(m["in_subset"] == (m["match_key"] in subset) for m in matches)


def test_rank_order_is_the_final_score_and_the_best_match_is_rank_1(demo):
    """One final score per match: ranks follow it, queries name the rank-1 match and its score,
    and it carries the evidence (verified matches score above unverified ones of equal similarity)."""
    matches = table(demo["run"], "matches.parquet").to_pylist()
    queries = {q["query_key"]: q for q in table(demo["run"], "queries.parquet").to_pylist()}
    by_query: dict[str, list] = {}
    for m in matches:
        by_query.setdefault(m["query_key"], []).append(m)
    for key, ms in by_query.items():
        ms.sort(key=lambda m: m["rank"])
        scores = [m["score"] for m in ms]
        assert scores == sorted(scores, reverse=True), key
        assert queries[key]["best_match_key"] == ms[0]["match_key"]
        assert queries[key]["best_score"] == ms[0]["score"]
        assert all(0 < m["score"] < 1 for m in ms)
        assert all(m["similarity"] == (m["score_rerank"] if m["score_rerank"] is not None else m["score_exact"])
                   for m in ms)
    verified = [m for m in matches if m["verify_score"]]
    assert verified and all(m["inliers"] >= 1 and m["tentative_matches"] >= m["inliers"] for m in verified)
    info = json.loads((demo["run"] / "run.json").read_text())
    assert info["score_model"]["fitted"] and len(info["score_model"]["sha256"]) == 64
    # The baseline went through the same scoring: final scores, not similarities.
    base = table(demo["run"], "baseline.parquet").to_pylist()
    assert all(0 < b["top1_score"] < 1 for b in base if b["top1_score"] is not None)
    assert any(b["top1_score"] != b["top1_similarity"] for b in base)


def test_scores_and_summary_match_brute_force(demo):
    """Best similarities equal an exhaustive search over every stored vector with the same query regions."""
    from pipeline.config import EmbedderConfig
    from pipeline.embedders import build_embedder
    from pipeline.queries import load_queries
    from pipeline.report import calibrate_threshold

    emb = pq.ParquetDataset(sorted(str(p) for p in (demo["work"] / "embeddings").glob("*.parquet"))).read()
    emb = emb.filter(emb.column("status").to_numpy(zero_copy_only=False) == "ok")
    corpus, keys = schema.vectors_of(emb), emb.column("key").to_pylist()
    embedder = build_embedder(EmbedderConfig())
    queries = {q["query_key"]: q for q in table(demo["run"], "queries.parquet").to_pylist()}
    for q in load_queries(str(demo["work"] / "generated")).queries:
        vecs, _ = embedder.embed_regions(q.image)
        best = float((vecs @ corpus.T).max())
        assert queries[q.key]["best_similarity"] == pytest.approx(best, abs=2e-3), q.key

    summary = json.loads((demo["run"] / "summary.json").read_text())
    # The paper's threshold reads the similarity, the calibrated one the final score.
    best = np.array([queries[k]["best_similarity"] for k in queries])
    rate = summary["replication"]["replication"]["all"]
    assert rate["count"] == int((best >= 0.5).sum()) and rate["n"] == len(best)
    base = table(demo["run"], "baseline.parquet").column("top1_score_no_dups").to_numpy()
    assert summary["thresholds"]["calibrated"] == pytest.approx(calibrate_threshold(base, 0.01))
    final = np.array([queries[k]["best_score"] for k in queries])
    assert summary["replication"]["calibrated"]["all"]["count"] == int((final >= summary["thresholds"]["calibrated"]).sum())
    # The baseline is scored like the queries: regions of the fetched image, itself excluded.
    from pipeline.verify import load_candidate

    rows = {r["key"]: r for r in emb.to_pylist()}
    index_of = {k: i for i, k in enumerate(keys)}
    for row in table(demo["run"], "baseline.parquet").to_pylist()[:30]:
        r = rows[row["sample_key"]]
        vecs, _ = embedder.embed_regions(load_candidate(r["tar_url"], r["tar_offset"], r["tar_size"]))
        scores = (vecs @ corpus.T).max(axis=0)
        scores[index_of[row["sample_key"]]] = -np.inf
        assert row["top1_similarity"] == pytest.approx(float(scores.max()), abs=2e-3)


@pytest.fixture(scope="module")
def s3_corpus(ray_local, s3_server, tmp_path_factory):
    """A small corpus whose tars live on the local S3 server, reached through a recording proxy:
    every byte any process fetches (driver, verification tasks, gallery) is seen there."""
    from pipeline.config import EmbedConfig, IndexConfig
    from pipeline.embed import run_embed
    from pipeline.index.build import run_build
    from pipeline.layout.embeddings import EmbeddingsFolder
    from pipeline.sample import make_sample_tars
    from pipeline.storage import Storage
    from pipeline.synthetic_images import apply_edit
    from pipeline.verify import load_candidate
    from s3proxy import S3Proxy

    proxy = S3Proxy(s3_server.endpoint_url).start()
    storage = Storage(endpoint_url=proxy.url, region=s3_server.region)
    root, local = "s3://replica-test/blocklist", tmp_path_factory.mktemp("blocklist")
    make_sample_tars(f"{root}/tars", tars=2, per_tar=40, seed=7, storage=storage)
    run_embed(EmbedConfig(input=[f"{root}/tars/*.tar"], output=f"{root}/emb", s3=storage))
    run_build(IndexConfig(embeddings=f"{root}/emb", index=str(local / "index"), s3=storage, factory="IVF8,Flat",
                          tune=False))  # search's default nprobe (64) then probes all 8 lists
    folder, emb = EmbeddingsFolder(f"{root}/emb", storage), []
    for shard in folder.complete_shards():
        with folder.open(folder.parquet_name(shard)) as f:
            emb += pq.read_table(f).to_pylist()
    generated = local / "generated"
    generated.mkdir()
    sources = [emb[i] for i in (3, 17, 44, 61, 70)]
    for j, row in enumerate(sources):
        image = load_candidate(row["tar_url"], row["tar_offset"], row["tar_size"], storage)
        apply_edit("resize", image, j).save(generated / f"copy-{j}.png")
    yield {"proxy": proxy, "storage": storage, "local": local, "emb": emb, "sources": sources}
    proxy.stop()


def test_blocklisted_images_are_never_fetched_or_shown(s3_corpus):
    proxy, sources, local = s3_corpus["proxy"], s3_corpus["sources"], s3_corpus["local"]
    blocked_rows = [sources[0], sources[1], sources[2]]
    blocklist = local / "blocklist.txt"  # two by key, one by URL
    blocklist.write_text("\n".join([sources[0]["key"], sources[1]["key"], sources[2]["url"]]) + "\n")
    blocked = {r["key"] for r in blocked_rows}
    blocked_ranges = {(r["tar_url"].rsplit("/", 1)[-1], f"bytes={r['tar_offset']}-{r['tar_offset'] + r['tar_size'] - 1}")
                      for r in blocked_rows}

    proxy.clear()
    cfg = SearchConfig(queries=str(local / "generated"), index=str(local / "index"), output=str(local / "results"),
                       run_id="blocked", blocklist=[str(blocklist)], baseline_size=10, verify_top=5,
                       s3=s3_corpus["storage"])
    run = Path(run_search(cfg).run_url)
    fetched = {(r.path.rsplit("/", 1)[-1], r.range) for r in proxy.requests
               if r.method == "GET" and r.range and r.path.endswith(".tar")}
    assert len(fetched) >= 10, "verification, the baseline and the gallery fetch candidate pixels"
    assert not blocked_ranges & fetched
    matches = table(run, "matches.parquet").column("match_key").to_pylist()
    assert matches and not blocked & set(matches)
    info = json.loads((run / "run.json").read_text())
    assert info["blocklist"]["entries"] == 3 and info["blocklist"]["dropped_matches"] >= 3
    html = (run / "report.html").read_text()
    assert not any(k in html for k in blocked)
    # the unblocked copies are found, through the same proxy
    top1 = {m["query_key"]: m["match_key"] for m in table(run, "matches.parquet").to_pylist() if m["rank"] == 1}
    assert top1["copy-3"] == sources[3]["key"] and top1["copy-4"] == sources[4]["key"]


def test_query_embedder_must_match_the_index(demo, tmp_path):
    import torch

    from pipeline.config import EmbedderConfig
    from pipeline.errors import MismatchError

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 8, stride=8), torch.nn.Flatten(), torch.nn.Linear(256, 256))
    path = tmp_path / "other.torchscript.pt"
    torch.jit.save(torch.jit.script(net.eval()), str(path))
    cfg = SearchConfig(queries=str(demo["work"] / "generated"), index=str(demo["work"] / "index"),
                       output=str(tmp_path / "results"),
                       embedder=EmbedderConfig(name="sscd", checkpoint=str(path), image_size=64))
    with pytest.raises(MismatchError, match="other parameters"):
        run_search(cfg)
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").glob("run_id=*"))


def test_second_stage_rerank_rescores_candidates_on_their_pixels(demo, tmp_path, request):
    """A second descriptor (a TorchScript model on the SSCD path) rescoring fetched candidates."""
    import torch

    from pipeline.config import DescriptorWeights, EmbedderConfig
    from pipeline.embedders import build_embedder
    from pipeline.queries import load_queries
    from pipeline.split_product import split_product
    from pipeline.verify import load_candidate

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 8, stride=8), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 8 * 8, 32)).eval()
    path = tmp_path / "rerank.torchscript.pt"
    torch.jit.save(torch.jit.script(net), str(path))
    rerank = EmbedderConfig(name="sscd", checkpoint=str(path), image_size=64)
    from test_dino import ARCH, tiny_dino

    # tiny models on a shared 2-core machine: torch's thread pool waits longer than it computes
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    dino_config, dino_ckpt, _ = tiny_dino(tmp_path)
    cfg = SearchConfig(queries=str(demo["work"] / "generated"), index=str(demo["work"] / "index"),
                       output=str(tmp_path / "results"), run_id="rerank", rerank=["sscd", "dino-split"],
                       sscd=DescriptorWeights(checkpoint=str(path), image_size=64),
                       dino=DescriptorWeights(model=ARCH, checkpoint=str(dino_ckpt), model_config=str(dino_config)),
                       rerank_chunks=4, rerank_top=5, verify_top=0, top_k=5, baseline_size=50, nl2_neighbours=0,
                       embed_actors=1)  # the query embedder and both descriptors in a Ray actor
    run_search_url = run_search(cfg).run_url
    matches = table(Path(run_search_url), "matches.parquet").to_pylist()
    assert all(m["score_rerank"] is not None and m["similarity"] == m["score_rerank"] for m in matches)
    # every descriptor its own column; the first one is the similarity
    assert all(m["score_sscd"] == m["score_rerank"] and m["score_dino_split"] is not None for m in matches)
    assert all(m["score_dino"] is None and m["score_default"] is None and m["nl2"] is None for m in matches)
    assert all(m["inliers"] is None for m in matches)  # verification was off
    # No score model was fitted for this descriptor: the fixed weights, said so in run.json.
    info = json.loads((Path(run_search_url) / "run.json").read_text())
    assert info["score_model"]["fitted"] is False
    assert [d["name"] for d in info["rerank"]["descriptors"]] == ["sscd", "dino-split"]
    assert info["rerank"]["descriptors"][1]["identity"]["chunks"] == 4
    assert info["rerank"]["descriptors"][0]["column"] == "score_sscd" and info["score_version"] == 2

    model = build_embedder(rerank)
    query = next(q for q in load_queries(str(demo["work"] / "generated")).queries if q.key == "copy-crop-0")
    qv = model.embed_images([query.image])
    dino = build_embedder(cfg.dino.embedder("dino"))
    for m in [m for m in matches if m["query_key"] == "copy-crop-0"]:
        candidate = load_candidate(m["tar_url"], m["tar_offset"], m["tar_size"])
        cv = model.embed_images([candidate])
        assert m["score_rerank"] == pytest.approx(float((cv @ qv.T)[0, 0]), abs=1e-4)
        split = split_product(dino.token_images([query.image]), dino.token_images([candidate]), chunks=4)
        assert m["score_dino_split"] == pytest.approx(float(split[0, 0]), abs=1e-5)
    ranks = [m["score"] for m in matches if m["query_key"] == "copy-crop-0"]
    assert ranks == sorted(ranks, reverse=True)

    # the demo's run beside this one: the index's descriptor is shared, their similarities are not
    from pipeline.compare import compare_runs, load_runs

    c = compare_runs(load_runs([str(demo["run"]), run_search_url]))
    assert c.descriptors == ["exact"] and [r["label"] for r in c.rows] == ["demo: default descriptor", "rerank"]
    assert all(r["top1_exact_max"] is not None and r["share_paper"] is None for r in c.rows)
    assert any(n.startswith("sscd: only in run(s) rerank") for n in c.notes)
    assert any(n.startswith("share >= 0.5: the runs' similarities come from different descriptors") for n in c.notes)


def test_demo_planted_captions_and_prompts_reach_the_report(demo):
    """Shared captions counted exact and normalised, prompts equal to captions, nL2 per match,
    and the summary's sections filled with them."""
    from pipeline.captions import normalize

    run = demo["run"]
    matches = table(run, "matches.parquet").to_pylist()
    truth = {t["query_key"]: t for t in demo["truth"]}
    top1 = {m["query_key"]: m for m in matches if m["rank"] == 1}
    # every match has both counts; spellings of one planted caption: exact counts below normalised
    assert all(m["caption_count"] is not None and m["caption_count"] <= m["caption_count_normalized"] for m in matches)
    assert any(m["caption_count"] < m["caption_count_normalized"] for m in matches)
    hits = [t for t in demo["truth"] if t.get("caption_shared") and top1[t["query_key"]]["match_key"] == t["source_key"]]
    assert hits and all(top1[t["query_key"]]["caption_count_normalized"] >= 2 for t in hits)
    # a prompt that is its source's caption matches that caption once found
    for key, t in truth.items():
        m = top1.get(key)
        if t.get("prompt_is_caption") and m and m["match_key"] == t["source_key"]:
            assert m["prompt_caption_exact"] and m["prompt_caption_overlap"] == 1.0
            assert normalize(m["prompt"]) == normalize(m["caption"])
    assert all(m["prompt_caption_clip"] is None for m in matches)  # the default descriptor has no text tower
    # nL2: a found JPEG or resize copy is far closer in pixels than the generation's other candidates
    close = [top1[k]["nl2"] for k, t in truth.items() if t["edit"] in ("jpeg", "resize")
             and top1[k]["match_key"] == t["source_key"]]
    assert close and max(close) < 0.5 and all(m["nl2_references"] >= 10 for m in matches)
    summary = json.loads((run / "summary.json").read_text())
    mem = summary["memorisation"]
    groups = {e["group"]: e for e in mem["by_caption_duplication"]}
    assert groups["1"]["n"] > 0 and (groups.get("2-9") or groups.get("10-99"))["n"] > 0
    assert {e["group"] for e in mem["by_prompt_caption"]} >= {"prompt = caption", "different"}
    assert mem["most_copied"] and summary["nl2"]["min"] < 0.5 and summary["nl2"]["neighbours"] == 50
    info = json.loads((run / "run.json").read_text())
    assert info["captions"]["shards"] == info["captions"]["corpus_shards"] and info["label"] == "demo: default descriptor"


def test_a_killed_search_resumes_with_the_batches_it_had_not_finished(demo, tmp_path, monkeypatch):
    """Queries are searched and written a batch at a time; a rerun after a crash redoes only the
    unfinished batches and ends with the tables an uninterrupted run writes."""
    import shutil

    import pipeline.search as search
    from pipeline.errors import ConfigError

    generated = tmp_path / "generated"
    generated.mkdir()
    for name in sorted(p.name for p in (demo["work"] / "generated").iterdir())[:20]:  # 10 images and their prompts
        shutil.copy(demo["work"] / "generated" / name, generated / name)
    common = dict(queries=str(generated), index=str(demo["work"] / "index"), output=str(tmp_path / "results"),
                  verify_top=2, top_k=3, baseline_size=8, nl2_neighbours=5)
    whole = Path(run_search(SearchConfig(run_id="whole", **common)).run_url)

    real, calls = search.search_batch, []

    def crash_after_two(plan, n, *args):
        calls.append(n)
        if len(calls) > 2:
            raise KeyboardInterrupt("killed")
        return real(plan, n, *args)

    monkeypatch.setattr(search, "search_batch", crash_after_two)
    cfg = SearchConfig(run_id="resumed", query_batch_size=3, **common)
    with pytest.raises(KeyboardInterrupt):
        run_search(cfg)
    run = tmp_path / "results" / "run_id=resumed"
    assert sorted(p.name for p in (run / "_batches").glob("*.json")) == ["000000.json", "000001.json", "baseline.json",
                                                                         "plan.json"]
    assert not (run / "matches.parquet").exists()
    with pytest.raises(ConfigError, match="other settings"):  # never mixed with batches made otherwise
        run_search(SearchConfig(run_id="resumed", query_batch_size=3, **{**common, "top_k": 2}))

    calls.clear()
    monkeypatch.setattr(search, "search_batch", lambda plan, n, *args: (calls.append(n), real(plan, n, *args)))
    resumed = Path(run_search(cfg).run_url)
    assert calls == [2, 3] and not (run / "_batches").exists()  # 10 queries in batches of 3: 2 left
    for name in ("matches.parquet", "queries.parquet", "baseline.parquet"):
        a, b = pq.read_table(whole / name).drop(["run_id"]), pq.read_table(resumed / name).drop(["run_id"])
        assert a.equals(b), name
    assert json.loads((resumed / "run.json").read_text())["queries"] == 10


def test_an_exif_rotated_query_is_searched_upright(demo, tmp_path):
    """A query stored sideways with an Orientation tag finds its source as the upright query does,
    with the same similarity; its pixels without the tag (how it looks unturned) score far lower."""
    from image_helpers import encode, sideways_jpeg
    from PIL import Image

    copy = next(t for t in demo["truth"] if t["edit"] == "resize")
    with Image.open(demo["work"] / "generated" / f"{copy['query_key']}.png") as im:
        image = im.convert("RGB")
    queries = tmp_path / "queries"
    queries.mkdir()
    (queries / "upright.jpg").write_bytes(encode(image, "JPEG", quality=95))
    (queries / "turned.jpg").write_bytes(sideways_jpeg(image))
    image.transpose(Image.Transpose.ROTATE_90).save(queries / "sideways.jpg", quality=95)
    # through the command line, which also says where the time went
    r = CliRunner().invoke(app, ["search", "--queries", str(queries), "--index", str(demo["work"] / "index"),
                                 "--output", str(tmp_path), "--run-id", "exif", "--verify-top", "2", "--top-k", "3",
                                 "--baseline-size", "8", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "time by stage (queries): " in r.output and "time by stage (baseline): " in r.output, r.output
    run = tmp_path / "run_id=exif"
    top1 = {m["query_key"]: m for m in table(run, "matches.parquet").to_pylist() if m["rank"] == 1}
    assert top1["upright"]["match_key"] == top1["turned"]["match_key"] == copy["source_key"]
    assert abs(top1["upright"]["similarity"] - top1["turned"]["similarity"]) < 0.02
    assert top1["sideways"]["match_key"] != copy["source_key"] or \
        top1["sideways"]["similarity"] < top1["turned"]["similarity"] - 0.1


def test_the_exact_rerank_by_ranged_reads_equals_the_rerank_in_the_shards(demo, tmp_path):
    """`rerank_in_shards: false` (the driver reads candidates' vectors by byte range) writes the same
    matches as the shard actors' rerank on their local side files."""
    import shutil

    queries = tmp_path / "queries"
    queries.mkdir()
    for name in sorted(p.name for p in (demo["work"] / "generated").glob("*.png"))[:4]:
        shutil.copy(demo["work"] / "generated" / name, queries / name)
    common = dict(queries=str(queries), index=str(demo["work"] / "index"), output=str(tmp_path), verify_top=2,
                  top_k=3, baseline_size=8)
    runs = [Path(run_search(SearchConfig(run_id=str(local), rerank_in_shards=local, **common)).run_url)
            for local in (True, False)]
    a, b = (table(run, "matches.parquet").drop(["run_id"]) for run in runs)
    assert a.num_rows == 12 and a.equals(b)

