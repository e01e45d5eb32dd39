"""Search stage: generated images against the whole corpus index, then the report.

For each query (a generated image):
  1. embed it with the index's embedder, whole image and several regions when the embedder
     offers them, so an object copied into a new scene is still found;
  2. fan the region vectors out to the index shard actors and keep ``candidates`` per region;
  3. rescore every candidate exactly on its stored vector; a corpus image's score is its best
     over the query's regions;
  4. drop blocklisted candidates (by key, URL or image hash) before any pixels are fetched;
  5. optionally rescore the best ``rerank_top`` with second-stage descriptors on their pixels
     (fetched by ranged reads from the corpus tars; pipeline/second_stage.py: SSCD, DINO, DCR's
     split-product...), and verify the best ``verify_top`` (plus
     each region's own best) with local features, keeping the matched boxes;
  6. give every candidate one final score from all that evidence (:mod:`pipeline.scoring`) and
     rank by it;
  7. mark each match inside/outside the subset and count its near-duplicates in the corpus;
  8. the nL2 of each match on pixels (pipeline/nl2.py), and, when the corpus's captions were
     counted (``replica captions``), how many training images carry the match's caption; the
     prompt against that caption (pipeline/prompts.py).

A baseline (corpus images searched against the corpus, themselves excluded, through the same
regions, rerank, verification and final score) calibrates a threshold at a fixed
false-positive rate. :mod:`pipeline.results` turns the outcome into the run's
tables in ``{output}/run_id={run}/`` (pipeline/layout/runs.py), then the report is built.
"""
from __future__ import annotations

import datetime as dt
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.config import EmbedderConfig, SearchConfig, build
from pipeline.errors import ConfigError
from pipeline.layout.embeddings import ROW_COLUMNS, EmbeddingsFolder
from pipeline.layout.index import IndexFolder, Manifest
from pipeline.layout.runs import ResultsFolder, RunFolder, RunSummary
from pipeline.progress import NullProgress, Progress

#: used when neither the config nor the index's tuning says otherwise
DEFAULT_NPROBE = 64
DEFAULT_RERANK_DEPTH = 400


@dataclass
class Candidate:
    id: int
    score_index: float
    score_exact: float
    region: int
    row: dict[str, Any] = field(default_factory=dict)
    score_rerank: float | None = None
    #: each second-stage descriptor's similarity, by name (score_rerank is the first's)
    scores: dict[str, float] = field(default_factory=dict)
    #: normalised L2 on pixels (pipeline.nl2) and the number of references it was normalised by
    nl2: float | None = None
    nl2_references: int | None = None
    inliers: int | None = None
    #: verification's tentative (ratio-test) matches
    matches: int | None = None
    verify_score: float | None = None
    query_box: tuple | None = None
    match_box: tuple | None = None
    #: (width, height) of the corpus image, known once its pixels were fetched
    candidate_size: tuple | None = None
    #: best rank of this corpus image in any one query region's list (1 = some region's best)
    region_rank: int = 1 << 30
    #: exact score against the whole query image (score_exact is the best region's); the same
    #: when the query was searched whole
    score_whole: float = float("nan")
    #: the final score (pipeline.scoring), set once all evidence is in
    score: float = float("nan")

    @property
    def similarity(self) -> float:
        """The descriptor similarity: the second stage's when it ran, else the exact cosine."""
        return self.score_rerank if self.score_rerank is not None else self.score_exact


# --------------------------------------------------------------------------- plan


@dataclass
class SearchPlan:
    """A search's settings resolved and checked before any work."""

    cfg: SearchConfig
    index: IndexFolder
    manifest: Manifest
    #: the query embedder: the config's, or the one the corpus was embedded with
    embedder: EmbedderConfig
    run_id: str
    run: RunFolder
    #: lists probed and images rescored per query: the config's, or what the index's tuning measured
    nprobe: int
    rerank_depth: int
    #: where they came from ("config", "index tuning", "default")
    settings_from: str
    #: the corpus's caption counts (`replica captions`), when the search joins them
    captions: Any = None


@dataclass
class SearchResult:
    summary: RunSummary
    run_url: str
    nprobe: int
    #: wall seconds per stage, {"queries": {...}, "baseline": {...}} (run.json's stage_seconds)
    stage_seconds: dict[str, dict[str, float]] = field(default_factory=dict)


def corpus_embedder_config(manifest: Manifest, index: IndexFolder) -> EmbedderConfig:
    """The embedder settings the corpus was embedded with (recorded by the embed stage)."""
    info = EmbeddingsFolder(manifest.embeddings, index.storage).read_info()
    if info.embedder_config is None:
        raise ConfigError("the index's embeddings do not record their embedder settings: pass --embedder explicitly")
    cfg = build(EmbedderConfig, info.embedder_config)
    if "exif_orientation" not in info.embedder_config:  # embedded before images were turned upright
        cfg.exif_orientation = False
    if cfg.name == "default" and not cfg.checkpoint:  # embedded with a whitening shipped before this one
        from pipeline.embedders.default import shipped_whitening_for

        cfg.checkpoint = shipped_whitening_for(info.identity)
    return cfg


def plan_search(cfg: SearchConfig) -> SearchPlan:
    """Fail before any work: index readable, output writable, settings possible."""
    from pipeline.embedders import validate as validate_embedder
    from pipeline.layout.runs import check_run_id
    from pipeline.second_stage import validate as validate_second_stage

    if not cfg.index:
        raise ConfigError("no index given: pass --index with a built index folder")
    if not cfg.output:
        raise ConfigError("no output given: pass --output with a results folder")
    if cfg.top_k < 1 or cfg.candidates < cfg.top_k:
        raise ConfigError(f"need 1 <= top_k <= candidates, got top_k={cfg.top_k}, candidates={cfg.candidates}")
    if not 0 < cfg.fpr < 1:
        raise ConfigError(f"fpr must be between 0 and 1, got {cfg.fpr}")
    if cfg.nl2_neighbours < 0:
        raise ConfigError(f"nl2_neighbours must be >= 0 (0 = no nL2), got {cfg.nl2_neighbours}")
    validate_second_stage(cfg)
    index = IndexFolder(cfg.index, cfg.s3)
    manifest = index.read_manifest()
    embedder = cfg.embedder if cfg.embedder.name else corpus_embedder_config(manifest, index)
    run_id = cfg.run_id or dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    check_run_id(run_id)
    validate_embedder(embedder, cfg.s3)
    captions = caption_counts(cfg, manifest) if cfg.captions else None
    results = ResultsFolder(cfg.output, cfg.s3)
    try:
        results.check_writable()
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"cannot write to output {cfg.output!r}: {type(exc).__name__}: {exc}") from exc
    tuned = manifest.tuned or {}
    nprobe = cfg.nprobe or int(tuned.get("nprobe") or DEFAULT_NPROBE)
    depth = cfg.rerank_depth or int(tuned.get("rerank_depth") or DEFAULT_RERANK_DEPTH)
    source = "config" if cfg.nprobe and cfg.rerank_depth else ("index tuning" if tuned else "default")
    if depth < cfg.top_k:
        raise ConfigError(f"rerank_depth {depth} is smaller than top_k {cfg.top_k}")
    if cfg.query_batch_size < 1:
        raise ConfigError(f"query_batch_size must be >= 1, got {cfg.query_batch_size}")
    return SearchPlan(cfg, index, manifest, embedder, run_id, results.run(run_id), nprobe, depth, source, captions)


def caption_counts(cfg: SearchConfig, manifest: Manifest):
    """The caption-counts folder, refused unless it counted the index's own embeddings."""
    from pipeline.captions import NORMALIZATION
    from pipeline.errors import MismatchError
    from pipeline.layout.captions import CaptionsFolder

    folder = CaptionsFolder(cfg.captions, cfg.s3)
    info = folder.read_info()
    if info.embeddings.rstrip("/") != manifest.embeddings.rstrip("/"):
        raise MismatchError(f"caption counts {cfg.captions!r} were made from {info.embeddings!r}, but the index "
                            f"holds {manifest.embeddings!r}: run `replica captions` on the index's embeddings")
    if info.normalization != NORMALIZATION:
        raise MismatchError(f"caption counts {cfg.captions!r} were normalised as {info.normalization!r}, this "
                            f"version as {NORMALIZATION!r}: count them again into a new folder")
    return folder


# --------------------------------------------------------------------------- the search


@contextmanager
def timed(counters: dict, stage: str):
    """Add the block's wall seconds to ``counters["seconds"][stage]``."""
    t = time.perf_counter()
    try:
        yield
    finally:
        seconds = counters.setdefault("seconds", {})
        seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - t


def embed_queries(embedder, images, regions: bool) -> tuple[np.ndarray, np.ndarray, list[tuple]]:
    """All region vectors of all images, the image each belongs to, and each region's box."""
    vecs, owner, boxes = [], [], []
    for qi, image in enumerate(images):
        if regions:
            v, b = embedder.embed_regions(image)
        else:
            v, b = embedder.embed_images([image]), [(0, 0, image.width, image.height)]
        vecs.append(v)
        owner.extend([qi] * len(v))
        boxes.extend(b)
    return np.concatenate(vecs).astype(np.float32), np.array(owner), boxes


def merge_regions(owner, n_owners: int, scores: np.ndarray, ids: np.ndarray) -> list[dict[int, list]]:
    """Per query: corpus id -> [its best score over the query's regions, its best rank in any
    one region's list]. Row ``r`` of ``scores``/``ids`` is region ``r``, of query ``owner[r]``."""
    per_query: list[dict[int, list]] = [dict() for _ in range(n_owners)]
    for r in range(len(owner)):
        found = per_query[owner[r]]
        for rank, (s, i) in enumerate(zip(scores[r].tolist(), ids[r].tolist()), 1):
            if i < 0:
                continue
            seen = found.get(i)
            if seen is None:
                found[i] = [s, rank]
            else:
                seen[0], seen[1] = max(seen[0], s), min(seen[1], rank)
    return per_query


#: the whole image's own nearest neighbours that reach the exact rescoring whatever its regions bring
WHOLE_IMAGE_CANDIDATES = 10


def candidate_search(vecs, owner, n_owners, searcher, source, cfg: SearchConfig, depth: int) -> list[dict[int, Candidate]]:
    """Per query: its best ``depth`` corpus images, rescored exactly.

    Every query vector (region) brings its ANN candidates; a corpus image keeps its best ANN score
    over the query's regions and its best rank in any one region's list; the whole image's own
    best ``WHOLE_IMAGE_CANDIDATES`` (at most a tenth of ``depth``) and then the best by that
    score, ``depth`` in all, go to the
    exact rescoring next to the index shards, which scores each against all the query's regions
    (the best one wins). ``depth`` counts images per query, not per region.
    """
    k = cfg.candidates if len(owner) > n_owners else max(cfg.candidates, depth)
    ann_scores, ann_ids = searcher.search(vecs, k)
    per_query = merge_regions(owner, n_owners, ann_scores, ann_ids)
    # A recoloured or rotated copy can score lower as a whole than regions of other images do,
    # and fall past the depth; its own list keeps it (the verification pool takes it from there).
    first_row = {int(q): r for r, q in reversed(list(enumerate(owner)))}
    n_whole = min(WHOLE_IMAGE_CANDIDATES, max(1, depth // 10))
    cand = []
    for q, found in enumerate(per_query):
        whole = [i for i in ann_ids[first_row[q]][:n_whole].tolist() if i >= 0] if q in first_row else []
        ranked = sorted(found, key=lambda i: (-found[i][0], i))
        cand.append(np.array(list(dict.fromkeys(whole + ranked))[:depth], np.int64))
    exact = searcher.rescore(vecs, owner, cand, fallback=source)
    return [{int(i): Candidate(int(i), float(found[int(i)][0]), float(s), int(r), region_rank=found[int(i)][1],
                               score_whole=float(w))
             for i, s, r, w in zip(ids, scores, rows, whole)}
            for found, ids, (scores, rows, whole) in zip(per_query, cand, exact)]


def blocked(row: dict[str, Any], blocklist: set[str]) -> bool:
    return any(row.get(c) in blocklist for c in ("key", "url", "sha256") if row.get(c))


def fetch_image(row: dict[str, Any], storage):
    from pipeline.verify import load_candidate

    return load_candidate(row["tar_url"], row["tar_offset"], row["tar_size"], storage)


def second_stage(images, picks: list[list[Candidate]], cfg: SearchConfig, counters, pool: "EmbedPool") -> None:
    """Rescore each query's best candidates with every second-stage descriptor on their fetched pixels."""
    # a query whose candidates include rows without pixels (imported embeddings) keeps its similarities
    tops = [cands[: cfg.rerank_top] if all(has_pixels(c.row) for c in cands[: cfg.rerank_top]) else []
            for cands in picks]
    found = pool.rescore(images, [[c.row for c in top] for top in tops], cfg.regions, cfg.s3)
    primary = pool.stage.primary.name
    for cands, top, scores in zip(picks, tops, found):
        for i, c in enumerate(top):
            c.scores = {name: float(values[i]) for name, values in scores.items()}
            c.score_rerank = c.scores[primary]
        counters["pixels_fetched"] += len(top)
        cands[: len(top)] = sorted(top, key=lambda c: -c.similarity)


def stage_scores(stage, images, rows: list[list[dict[str, Any]]], regions: bool, storage) -> list[dict[str, list]]:
    """Each query's similarities to its candidates' fetched pixels, per second-stage descriptor."""
    out = []
    for image, found in zip(images, rows):
        if not found:
            out.append({d.name: [] for d in stage.descriptors})
            continue
        scores = stage.scores(image, [fetch_image(r, storage) for r in found], regions)
        out.append({name: np.asarray(values).tolist() for name, values in scores.items()})
    return out


class EmbedActor:
    """The query embedder, and the second-stage descriptors when there are any, in a Ray actor (on
    a GPU when the pool asks for one)."""

    def __init__(self, query: EmbedderConfig, cfg: SearchConfig, storage):
        from pipeline.embedders import build_embedder
        from pipeline.second_stage import from_search

        self.query = build_embedder(query, storage)
        self.stage = from_search(cfg)

    def ready(self) -> bool:
        return True

    def embed(self, images, regions: bool):
        return embed_queries(self.query, images, regions)

    def rescore(self, images, rows, regions: bool, storage):
        return stage_scores(self.stage, images, rows, regions, storage)


class EmbedPool:
    """Query-side embedding: the query regions, and the second-stage descriptors on fetched pixels.

    In the driver, or spread over Ray actors (``start``): ``actors`` < 0 means one GPU actor per GPU
    of the cluster, or the driver when it has none; N means N actors (GPU ones when the cluster has
    GPUs), each holding all the descriptors.
    """

    #: seconds to wait for the actors to be placed (a GPU node may have to be started first)
    PLACE_TIMEOUT_S = {"cpu": 120, "gpu": 900}

    def __init__(self, query: EmbedderConfig, cfg: SearchConfig, storage):
        from pipeline.embedders import build_embedder
        from pipeline.second_stage import from_search

        self.cfgs, self.storage = (query, cfg), storage
        # the driver's copies: their identities, or the work itself
        self.query = build_embedder(query, storage)
        self.stage = from_search(cfg)
        self.actors: list = []

    def start(self, actors: int) -> "EmbedPool":
        """Start the actors (Ray connected); ``actors`` 0 keeps the work in the driver."""
        if actors == 0:
            return self
        import ray

        gpus = int(ray.cluster_resources().get("GPU", 0))
        count = gpus if actors < 0 else actors
        use_gpu = gpus > 0 and self.cfgs[0].device != "cpu"
        options = {"num_gpus": 1, "num_cpus": 1} if use_gpu else {"num_cpus": 1}
        remote = ray.remote(EmbedActor).options(max_restarts=-1, max_task_retries=3, **options)
        self.actors = [remote.remote(*self.cfgs, self.storage) for _ in range(count)]
        timeout = self.PLACE_TIMEOUT_S["gpu" if use_gpu else "cpu"]
        ready, _ = ray.wait([a.ready.remote() for a in self.actors], num_returns=len(self.actors), timeout=timeout)
        if len(ready) < len(self.actors):
            self.close()
            raise ConfigError(f"only {len(ready)} of {count} query-embedding actors ({options}) could be placed in "
                              f"{timeout} s: the cluster has {ray.cluster_resources().get('CPU', 0):g} CPUs and "
                              f"{gpus} GPUs, and the index shards hold some; lower search.embed_actors")
        return self

    def identity(self) -> dict[str, Any]:
        return self.query.identity()

    def _spread(self, method: str, columns: list[list], *args) -> tuple[list, list[int]]:
        """Contiguous slices of the rows of ``columns`` to the actors: their answers in order, and
        the first row of each slice."""
        import ray

        n, rows = len(self.actors), len(columns[0])
        cuts = [rows * a // n for a in range(n + 1)]
        busy = [a for a in range(n) if cuts[a + 1] > cuts[a]]
        refs = [getattr(self.actors[a], method).remote(*(c[cuts[a]:cuts[a + 1]] for c in columns), *args) for a in busy]
        return ray.get(refs), [cuts[a] for a in busy]

    def embed(self, images, regions: bool) -> tuple[np.ndarray, np.ndarray, list[tuple]]:
        if not self.actors:
            return embed_queries(self.query, images, regions)
        answers, firsts = self._spread("embed", [images], regions)
        boxes = [b for _, _, found in answers for b in found]
        return (np.concatenate([v for v, _, _ in answers]),
                np.concatenate([o + first for (_, o, _), first in zip(answers, firsts)]), boxes)

    def rescore(self, images, rows, regions: bool, storage) -> list[dict[str, list]]:
        if not self.actors:
            return stage_scores(self.stage, images, rows, regions, storage)
        answers, _ = self._spread("rescore", [images, rows], regions, storage)
        return [found for answer in answers for found in answer]

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


def nl2_stage(images, picks: list[list[Candidate]], cfg: SearchConfig, counters) -> None:
    """nL2 of each query's ``top_k`` matches, its best ``nl2_neighbours`` candidates by similarity
    standing for its nearest training images (pixels fetched in one Ray task per query)."""
    import ray

    from pipeline.nl2 import nl2_of_rows
    from pipeline.ray_util import RetryPolicy, cluster_cpus, run_bounded

    task = ray.remote(nl2_of_rows).options(num_cpus=1)
    refs = [sorted(c, key=lambda c: -c.similarity)[: cfg.nl2_neighbours] for c in picks]
    tops = [c[: cfg.top_k] for c in picks]

    def record(qi: int, result: tuple[list[float | None], int]) -> None:
        scores, used = result
        for c, s in zip(tops[qi], scores):
            c.nl2, c.nl2_references = s, (used if s is not None else None)
        counters["pixels_fetched"] += len({c.id for c in refs[qi] + tops[qi]})

    run_bounded([qi for qi, top in enumerate(tops) if top],
                lambda qi, _actor: task.remote(images[qi], [c.row for c in refs[qi]], [c.row for c in tops[qi]], cfg.s3),
                record, window=lambda: max(2, 2 * int(cluster_cpus())),
                retry=RetryPolicy(max_attempts=4, retry_on=(OSError, ray.exceptions.WorkerCrashedError)))


def pool_size(top: int) -> int:
    """How many candidates a query's verification looks at, at most: 3.5 x ``verify_top``."""
    return (7 * top) // 2


def verification_pool(cands: list[Candidate], top: int, region_rank: int = 3,
                      size: int | None = None) -> list[Candidate]:
    """What verification looks at, ``size`` candidates at most (default ``pool_size(top)``: 1.7 s
    of CPU a query on average at the default 12, retries included, docs/BENCHMARKS.md): the best
    ``top`` by similarity (the best region's); then the best by the whole image's similarity (a
    crop or a rotated copy can score higher whole than any region of another image does, yet rank
    below images that one region resembles); then candidates near the head of some single
    region's list (an object pasted into a new scene ranks high in its own region but may score
    low overall). Those take the most places, twice ``top``: with a hundred windows, many heads of
    lists compete, and a pasted object's source often heads one window's list at a lower
    similarity than chance matches head others'."""
    pool = cands[:top]
    pool += sorted((c for c in cands[top:] if np.isfinite(c.score_whole)), key=lambda c: -c.score_whole)[: top // 2]
    taken = {c.id for c in pool}
    rest = sorted((c for c in cands[top:] if c.region_rank <= region_rank and c.id not in taken),
                  key=lambda c: (c.region_rank, -c.similarity))
    return pool + rest[: (size or pool_size(top)) - len(pool)]


def verify_query(image, rows: list[dict[str, Any]], windows: list[tuple], storage) -> list[tuple]:
    """One query against its candidates (pixels fetched by ranged reads), each with the query
    window that found it: a Ray task."""
    from pipeline.verify import Verifier

    images = [fetch_image(r, storage) for r in rows]
    return [(int(v.inliers), int(v.matches), float(v.score), v.query_box, v.candidate_box, im.size)
            for v, im in zip(Verifier().verify_many(image, images, windows), images)]


def verify_stage(images, picks: list[list[Candidate]], boxes: list[tuple], cfg: SearchConfig, counters) -> None:
    """Local-feature verification fanned out as one Ray task per query. ``boxes`` are the
    queries' region boxes (``Candidate.region`` indexes them): a candidate that fails on the
    whole query is retried on the window that found it."""
    import ray

    from pipeline.ray_util import RetryPolicy, cluster_cpus, run_bounded

    task = ray.remote(verify_query).options(num_cpus=1)
    pools = [[c for c in verification_pool(cands, cfg.verify_top) if has_pixels(c.row)] for cands in picks]

    def record(qi: int, results: list[tuple]) -> None:
        for c, (inliers, matches, score, qbox, cbox, size) in zip(pools[qi], results):
            c.inliers, c.matches, c.verify_score, c.query_box, c.match_box = inliers, matches, score, qbox, cbox
            c.candidate_size = size
        counters["pixels_fetched"] += len(pools[qi])

    # bounded: query images wait in the object store
    run_bounded([qi for qi, pool in enumerate(pools) if pool],
                lambda qi, _actor: task.remote(images[qi], [c.row for c in pools[qi]],
                                              [boxes[c.region] for c in pools[qi]], cfg.s3), record,
                window=lambda: max(2, 2 * int(cluster_cpus())),
                retry=RetryPolicy(max_attempts=4, retry_on=(OSError, ray.exceptions.WorkerCrashedError)))


def match_images(images, cfg: SearchConfig, depth: int, embedder, searcher, source, registry, blocklist: set[str], counters,
                 model, rerank=None, exclude: list[set[int]] | None = None,
                 vectors: np.ndarray | None = None) -> tuple[list[list[Candidate]], list[tuple]]:
    """Every stage of the search for a list of images (queries, or baseline samples with their
    own ids in ``exclude``): regions, candidates, blocklist, rerank, verification, final score.
    Returns each image's candidates, best final score first, and each image's region boxes
    (``Candidate.region`` numbers the image's own regions).

    ``vectors`` instead of images: stored vectors of corpus rows that have no pixels (imported
    embeddings), searched whole, without the stages that need the query's pixels."""
    from pipeline.scoring import rank

    if vectors is None:
        with timed(counters, "embed"):
            vecs, owner, boxes = embedder.embed(images, cfg.regions)
        sizes = [im.size for im in images]
    else:
        vecs, owner = vectors, np.arange(len(vectors))
        boxes, sizes = [(0, 0, 1, 1)] * len(vectors), [(1, 1)] * len(vectors)
    with timed(counters, "candidates"):
        per_query = candidate_search(vecs, owner, len(sizes), searcher, source, cfg, depth)
    with timed(counters, "rows"):
        by_id = rows_by_id(sorted({i for found in per_query for i in found}), registry)
    picks: list[list[Candidate]] = []
    for qi, found in enumerate(per_query):
        kept = []
        for c in sorted(found.values(), key=lambda c: (-c.score_exact, c.id)):
            if exclude and c.id in exclude[qi]:
                continue
            c.row = by_id[c.id]
            if blocklist and blocked(c.row, blocklist):
                counters["blocked"] += 1
                continue
            kept.append(c)
        picks.append(kept)
    if rerank is not None and vectors is None:
        with timed(counters, "second_stage"):
            second_stage(images, picks, cfg, counters, rerank)
        # The matches are what the second descriptor looked at: one similarity scale for all.
        picks = [p[: cfg.rerank_top] for p in picks]
    if cfg.verify_top and vectors is None:
        with timed(counters, "verification"):
            verify_stage(images, picks, boxes, cfg, counters)
    ranked = [rank(p, model, size, boxes) for p, size in zip(picks, sizes)]
    # Region numbers and boxes per query from here on (a query's rows never depend on its batch).
    first = np.searchsorted(owner, np.arange(len(sizes) + 1))
    for qi, cands in enumerate(ranked):
        for c in cands:
            c.region -= int(first[qi])
    return ranked, [boxes[first[qi]:first[qi + 1]] for qi in range(len(sizes))]


def has_pixels(row: dict[str, Any]) -> bool:
    """Whether a corpus row says where its image is (imported embeddings do not)."""
    return bool(row.get("tar_url")) and row.get("tar_offset") is not None


def score_model(cfg: SearchConfig, identity: dict[str, Any]):
    """The final-score model for the descriptor whose similarity it reads (``identity``: the
    second stage's when there is one): ``cfg.score_model`` (checked against it), else the
    shipped one fitted for it, else the unfitted fallback."""
    from pipeline.errors import MismatchError
    from pipeline.scoring import fitted_for, load_model, shipped_model
    from pipeline.verify import DEFAULT_METHOD

    if not cfg.score_model:
        return shipped_model(identity, DEFAULT_METHOD)
    model = load_model(cfg.score_model, cfg.s3)
    want = fitted_for(identity, DEFAULT_METHOD)
    if model.fitted_for and model.fitted_for != want:
        raise MismatchError(f"score model {cfg.score_model!r} was fitted for {model.fitted_for}; this search scores "
                            f"with {want}: fit one for it with bench/copy_detection.py --fit")
    return model


def neighbours(ids: list[int], searcher, source, cfg: SearchConfig) -> dict[int, list[tuple[float, int]]]:
    """Each corpus id's nearest corpus images, itself included: [(exact score, id)], best first."""
    if not ids:
        return {}
    vecs = source.fetch(np.asarray(ids, dtype=np.int64))
    _, ann_ids = searcher.search(vecs, cfg.dup_neighbours + 1)
    cand = [row[row >= 0] for row in ann_ids]
    exact = searcher.rescore(vecs, np.arange(len(ids)), cand, fallback=source)
    return {i: sorted(((float(s), int(n)) for s, n in zip(scores, c)), key=lambda p: (-p[0], p[1]))
            for i, c, (scores, _, _) in zip(ids, cand, exact)}


def sample_baseline_ids(registry, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` corpus ids drawn uniformly from embedded rows, touching few shards."""
    from pipeline.index.registry import encode_ids, fetch_rows

    if not len(registry) or n <= 0:
        return np.zeros(0, np.int64)
    shards = rng.choice(range(len(registry)), size=min(len(registry), max(1, n // 20)), replace=False)
    ids = []
    for s in shards:
        seen = registry.embeddings.read_stats(registry.name(int(s))).seen
        take = min(seen, int(np.ceil(n / len(shards))))
        ids.extend(encode_ids(int(s), rng.choice(seen, size=take, replace=False)).tolist())
    ids = np.array(sorted(ids), dtype=np.int64)
    status = fetch_rows(ids, registry, columns=["status"]).column("status").to_pylist()
    ok = ids[np.array([st == "ok" for st in status], dtype=bool)]
    return rng.permutation(ok)[:n]


def rows_by_id(ids, registry, columns=ROW_COLUMNS) -> dict[int, dict[str, Any]]:
    from pipeline.index.registry import fetch_rows

    return {r["id"]: r for r in fetch_rows(ids, registry, columns=columns).to_pylist()} if len(ids) else {}


def run_search(cfg: SearchConfig, progress: Progress | None = None) -> SearchResult:
    """Run one search (holding the run folder's lock); returns the report's summary."""
    from pipeline.layout.lock import OutputLock

    progress = progress or NullProgress()
    plan = plan_search(cfg)
    with OutputLock(plan.run, "replica search", break_lock=cfg.break_lock, stale_after_s=cfg.lock_stale_after_s):
        return _search_locked(plan, progress)


def settings_digest(plan: SearchPlan, blocklist: set[str], subset: set[str] | None) -> str:
    """What decides a batch's rows: a resumed run must match it (the lock, Ray address, storage
    options and where the exact rerank runs do not)."""
    import hashlib
    import json

    from pipeline.config import to_dict

    settings = {k: v for k, v in to_dict(plan.cfg).items() if k not in ("ray", "s3", "break_lock", "lock_stale_after_s",
                                                                           "rerank_in_shards")}
    settings.update(embedder=to_dict(plan.embedder), nprobe=plan.nprobe, rerank_depth=plan.rerank_depth,
                    index_ntotal=plan.manifest.ntotal, blocklist=sorted(blocklist),
                    subset=sorted(subset) if subset is not None else None)
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def _search_locked(plan: SearchPlan, progress: Progress) -> SearchResult:
    from pipeline.index.registry import Registry
    from pipeline.index.rerank import source_for
    from pipeline.index.serve import IndexSearcher
    from pipeline.layout.runs import BASELINE, BASELINE_UNIT, BatchPlan, BatchRecord, batch_unit
    from pipeline.queries import list_queries, load_key_set, no_queries
    from pipeline.report import calibrate_threshold, run_report
    from pipeline.results import run_record

    cfg = plan.cfg
    started = time.time()
    storage = cfg.s3
    listed = list_queries(cfg.queries, storage)
    for source, why in listed.unreadable[:5]:
        progress.log(f"skipping unreadable query {source}: {why}")
    blocklist: set[str] = set()
    for spec in cfg.blocklist:
        blocklist |= load_key_set(spec, storage)
    subset = load_key_set(cfg.subset, storage) if cfg.subset else None
    embedder = EmbedPool(plan.embedder, cfg, storage)
    rerank = embedder if embedder.stage is not None else None  # the pool's second stage
    plan.manifest.check(identity=embedder.identity(), where=f"index {plan.index.url!r}")  # before anything is written
    size = cfg.query_batch_size
    batches = [listed.refs[a:a + size] for a in range(0, len(listed.refs), size)]
    done = plan.run.start_batches(BatchPlan(batch_size=size, queries=len(listed.refs), batches=len(batches),
                                            digest=settings_digest(plan, blocklist, subset)))
    if done:
        progress.log(f"resuming run {plan.run_id}: {done} of {len(batches)} query batches already done")

    with IndexSearcher(plan.index, identity=embedder.identity(), ray_address=cfg.ray.address,
                       nprobe=plan.nprobe, rerank_in_shards=cfg.rerank_in_shards) as searcher:
        embedder.start(cfg.embed_actors)
        model = score_model(cfg, embedder.stage.primary.identity() if embedder.stage else embedder.identity())
        identity = embedder.identity()
        source = source_for(plan.index, plan.manifest)
        registry = Registry.load(plan.index)
        try:
            if plan.run.batch_record(BASELINE_UNIT) is None:
                with progress.step(f"baseline: {cfg.baseline_size} corpus images searched like the queries"):
                    t, counters = time.time(), {"pixels_fetched": 0, "blocked": 0, "seconds": {}}
                    baseline, self_recall = run_baseline(cfg, plan.run_id, plan.rerank_depth, embedder, searcher,
                                                         source, registry, blocklist, counters, model, rerank)
                    plan.run.write_table(BASELINE, baseline)
                    plan.run.write_batch(BatchRecord(BASELINE_UNIT, pixels_fetched=counters["pixels_fetched"],
                                                     seconds=round(time.time() - t, 2), self_recall=self_recall,
                                                     stage_seconds=rounded(counters["seconds"])), {})
            stages = f"regions, candidates, rerank, verification of up to {pool_size(cfg.verify_top)} each, final score"
            with progress.task("search", len(batches), f"query batches of {size} ({stages})") as bar:
                for n, refs in enumerate(batches):
                    if plan.run.batch_record(batch_unit(n)) is None:
                        search_batch(plan, n, refs, embedder, rerank, searcher, source, registry, blocklist, subset,
                                     model, identity)
                    bar.advance()
        finally:
            embedder.close()
        nprobe = searcher.nprobe

    records = [plan.run.batch_record(batch_unit(n)) for n in range(len(batches))]
    base = plan.run.batch_record(BASELINE_UNIT)
    unreadable = listed.unreadable + [tuple(u) for r in records for u in r.unreadable]
    n_queries = sum(r.queries for r in records)
    if not n_queries:
        raise no_queries(cfg.queries, unreadable)
    counters = {"pixels_fetched": base.pixels_fetched + sum(r.pixels_fetched for r in records),
                "blocked": sum(r.blocked for r in records), "unreadable_queries": unreadable,
                "stage_seconds": {"queries": rounded(summed([r.stage_seconds for r in records])),
                                  "baseline": rounded(base.stage_seconds)}}
    baseline = plan.run.read_table(BASELINE)
    scored = [s for s in baseline.column("top1_score_no_dups").to_pylist() if s is not None]
    calibrated = calibrate_threshold(scored, cfg.fpr) if scored else None
    with progress.step(f"writing results to {plan.run.url}"):
        plan.run.assemble_batches(len(batches))
        plan.run.write_record(run_record(plan, identity, n_queries, counters, blocklist, subset, calibrated,
                                         base.self_recall, nprobe, time.time() - started, model.identity(),
                                         embedder.stage))
        plan.run.remove_batches()
    with progress.step("writing the report"):
        summary = run_report(plan.run)
    return SearchResult(summary=summary, run_url=plan.run.url, nprobe=nprobe, stage_seconds=counters["stage_seconds"])


def search_batch(plan: SearchPlan, n: int, refs, embedder, rerank, searcher, source, registry, blocklist, subset,
                 model, identity) -> None:
    """One batch of queries, start to finish: read, match, count duplicates, write (record last)."""
    from pipeline.embedders.base import upright
    from pipeline.layout.runs import BatchRecord, batch_unit
    from pipeline.queries import read_queries
    from pipeline.results import result_rows

    cfg, t = plan.cfg, time.time()
    counters = {"pixels_fetched": 0, "blocked": 0, "seconds": {}}
    with timed(counters, "read"):
        found = read_queries(refs, cfg.s3)
        queries = found.queries
        if plan.embedder.exif_orientation:  # as the corpus was embedded: vectors, boxes and pixels agree
            for q in queries:
                q.image = upright(q.image)
    picks, boxes, groups = [], [], {}
    if queries:
        picks, boxes = match_images([q.image for q in queries], cfg, plan.rerank_depth, embedder, searcher, source,
                                    registry, blocklist, counters, model, rerank)
        if cfg.nl2_neighbours:
            with timed(counters, "nl2"):
                nl2_stage([q.image for q in queries], picks, cfg, counters)
        with timed(counters, "duplicates"):
            groups = neighbours(sorted({c.id for p in picks for c in p[: cfg.top_k]}), searcher, source, cfg)
    with timed(counters, "result_rows"):
        tables = result_rows(plan, queries, picks, groups, boxes, identity, subset, registry, embedder.query)
    plan.run.write_batch(BatchRecord(batch_unit(n), queries=len(queries), pixels_fetched=counters["pixels_fetched"],
                                     blocked=counters["blocked"], seconds=round(time.time() - t, 2),
                                     unreadable=[list(u) for u in found.unreadable],
                                     stage_seconds=rounded(counters["seconds"])), tables)


def summed(parts: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in parts:
        for k, v in part.items():
            out[k] = out.get(k, 0.0) + v
    return out


def rounded(seconds: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 3) for k, v in seconds.items()}


def run_baseline(cfg: SearchConfig, run_id: str, depth: int, embedder, searcher, source, registry, blocklist, counters, model,
                 rerank=None):
    """The corpus's self-similarity, measured the way queries are scored.

    Sampled corpus images are fetched and go through every stage a query does (regions,
    candidates, blocklist, rerank, verification, final score) with themselves excluded; for the
    ``_no_dups`` columns their near-duplicates (stored vectors scoring >= the duplicate
    threshold) are excluded too. Also returns the share of samples whose own stored vector comes
    back when searched for: the index's recall for exact copies at this nprobe.
    """
    rng = np.random.default_rng(cfg.seed)
    ids = sample_baseline_ids(registry, cfg.baseline_size, rng).tolist()
    rows = rows_by_id(ids, registry)
    ids = [i for i in ids if not (blocklist and blocked(rows[i], blocklist))]
    with timed(counters, "duplicates"):
        stored = neighbours(ids, searcher, source, cfg)
    self_recall = float(np.mean([any(n == i for _, n in stored[i]) for i in ids])) if ids else None
    dups = {i: {n for s, n in stored[i] if s >= cfg.duplicate_threshold and n != i} for i in ids}
    ranked: list[list[Candidate]] = []
    # the samples' own stages are timed; their candidates' fetches are not counted as pixels fetched
    inner = {"pixels_fetched": 0, "blocked": 0, "seconds": counters.setdefault("seconds", {})}
    if ids and all(has_pixels(rows[i]) for i in ids):
        with timed(counters, "read"):
            images = [fetch_image(rows[i], cfg.s3) for i in ids]
        counters["pixels_fetched"] += len(images)
        ranked, _ = match_images(images, cfg, depth, embedder, searcher, source, registry, blocklist,
                                 inner, model, rerank, exclude=[{i} for i in ids])
    elif ids:  # imported embeddings: no pixels to search with, so their stored vectors, whole
        ranked, _ = match_images(None, cfg, depth, embedder, searcher, source, registry, blocklist,
                                 inner, model, exclude=[{i} for i in ids],
                                 vectors=source.fetch(np.asarray(ids, np.int64)))
    top_keys = {i: r["key"] for i, r in rows_by_id(sorted({o[0].id for o in ranked if o}), registry, ["key"]).items()}
    out: dict[str, list] = {k: [] for k in ("run_id", "sample_key", "top1_score", "top1_key", "top1_score_no_dups",
                                            "top1_similarity", "top1_similarity_no_dups", "near_dup_count")}
    for i, found in zip(ids, ranked):
        no_dups = [c for c in found if c.id not in dups[i]]
        out["run_id"].append(run_id)
        out["sample_key"].append(rows[i]["key"])
        out["top1_score"].append(found[0].score if found else None)
        out["top1_key"].append(top_keys[found[0].id] if found else None)
        out["top1_score_no_dups"].append(no_dups[0].score if no_dups else None)
        out["top1_similarity"].append(max((c.similarity for c in found), default=None))
        out["top1_similarity_no_dups"].append(max((c.similarity for c in no_dups), default=None))
        out["near_dup_count"].append(len(dups[i]))
    return out, self_recall
