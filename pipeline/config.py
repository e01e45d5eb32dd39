"""One typed config for every stage, loaded from a YAML/TOML file and/or CLI flags.

A config file has one section per command (``ingest``, ``embed``, ``index``, ``import``, ``captions``,
``search``, ``report``, ``pipeline``): the same file serves every command and ``replica pipeline``. Sections map to
dataclasses; unknown keys and wrong types are errors, so a typo fails before any work starts.

Flags are made from the fields (pipeline/cli/options.py), one rule for all: a field ``f`` of the
section is ``--f``; a field ``f`` of a nested section ``s`` is ``--s-f``, and its ``name`` is
``--s`` (``embedder.model`` is ``--embedder-model``, ``embedder.name`` is ``--embedder``,
``s3.endpoint_url`` is ``--s3-endpoint-url``, ``ray.address`` is ``--ray-address``).
Fields with a fixed set of values name it in ``metadata={"choices": ...}``.
"""
from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import ConfigError
from pipeline.storage import Storage


def choice(default: Any, *choices: Any) -> Any:
    """A field whose value must be one of ``choices``."""
    return field(default=default, metadata={"choices": choices})


@dataclass
class EmbedderConfig:
    """Which descriptor makes the vectors."""

    #: "default" (weight-free copy descriptor), "open_clip", "sscd" or "dino" (DINO/DINOv2 ViTs via timm)
    name: str = choice("default", "default", "open_clip", "sscd", "dino")
    #: open_clip architecture, e.g. "ViT-B-32"; dino: a timm ViT, e.g. "vit_small_patch16_224.dino"
    model: str | None = None
    #: open_clip pretrained tag (downloaded by open_clip on a networked cluster)
    pretrained: str | None = None
    #: local path or fsspec URL of weights: open_clip checkpoint, SSCD TorchScript file, or a DINO
    #: state_dict (.pth) / .safetensors file
    checkpoint: str | None = None
    #: the sha256 the checkpoint file must have (pins weights fetched from a URL); empty = not checked
    checkpoint_sha256: str | None = None
    #: JSON file of an open_clip model config to register (custom architectures); dino: timm
    #: create_model arguments changing the architecture (embed_dim, depth, num_heads, patch_size, img_size)
    model_config: str | None = None
    #: preprocessing: resize short side to this many pixels, then centre-crop a square
    image_size: int | None = None
    #: "auto" (CUDA when present), "cpu" or "cuda"
    device: str = choice("auto", "auto", "cpu", "cuda")
    #: turn each image upright by its EXIF Orientation tag before anything else, as viewers show it
    #: (corpus and queries alike); corpora embedded before this setting existed record false
    exif_orientation: bool = True
    #: default embedder, query side: sizes (fractions of the query's width and height) of the
    #: windows embedded besides the whole image, so a copied object inside a new scene is found
    #: (see docs/BENCHMARKS.md), and with them the whole image as its value channel, which a hue
    #: rotation keeps; empty = whole image only
    query_region_scales: list[float] = field(default_factory=lambda: [0.75, 0.6, 0.5, 0.4])
    #: default embedder, query side: window stride as a fraction of the window size
    query_region_step: float = 0.33
    #: default embedder, query side: windows centred on objects embedded besides the grid, half whose four
    #: sides run along edges, half whose colours differ from their surroundings; 0 = grid only
    query_object_regions: int = 16


@dataclass
class DescriptorWeights:
    """The weights of a second-stage descriptor (its name comes from `search.rerank`)."""

    #: architecture: open_clip's (e.g. "ViT-L-14") or a timm ViT for dino (e.g. "vit_base_patch16_224.dino")
    model: str | None = None
    #: open_clip pretrained tag (downloaded by open_clip on a networked cluster)
    pretrained: str | None = None
    #: local path or fsspec URL of the weights (SSCD TorchScript, DINO state_dict/.safetensors, open_clip checkpoint)
    checkpoint: str | None = None
    #: the sha256 the checkpoint file must have; empty = not checked
    checkpoint_sha256: str | None = None
    #: JSON of a custom architecture (open_clip model config; dino: timm create_model arguments)
    model_config: str | None = None
    #: preprocessing: resize short side to this many pixels, then centre-crop a square; empty = the model's
    image_size: int | None = None
    #: "auto" (CUDA when present), "cpu" or "cuda"
    device: str = choice("auto", "auto", "cpu", "cuda")

    def embedder(self, name: str) -> EmbedderConfig:
        """The embedder settings of descriptor ``name`` with these weights."""
        return EmbedderConfig(name=name, **dataclasses.asdict(self))


@dataclass
class RayConfig:
    #: Ray address ("auto", "ray://host:10001"); empty = RAY_ADDRESS or a local Ray
    address: str | None = None


@dataclass
class IngestConfig:
    """`replica ingest`: LAION-style URL lists -> WebDataset tars (img2dataset) that `replica embed` reads."""

    #: URL list file(s): Parquet, CSV, TSV, JSON Lines or text (one URL a line, .gz too); a path,
    #: glob, brace list or folder, local or s3://. New files are added to the folder on later runs
    input: list[str] = field(default_factory=list)
    #: tar folder: {output}/{shard}.tar, img2dataset's {shard}.parquet and {shard}_stats.json
    output: str = ""
    s3: Storage = field(default_factory=Storage)
    ray: RayConfig = field(default_factory=RayConfig)
    #: list format; "auto" = from each file's name
    input_format: str = choice("auto", "auto", "parquet", "csv", "csv.gz", "tsv", "tsv.gz", "jsonl", "jsonl.gz",
                               "json", "json.gz", "txt", "txt.gz")
    #: list column holding the image URL (LAION's Parquet files: URL)
    url_column: str = "url"
    #: list column holding the caption (LAION: TEXT); empty = no captions
    caption_column: str = "caption"
    #: other list columns kept in each sample's json (e.g. LAION's similarity, punsafe, pwatermark)
    columns: list[str] = field(default_factory=list)
    #: pixels of the side that resize_mode sets; 288 = SSCD's short side (docs: README "Ingest")
    image_size: int = 288
    #: "keep_ratio": short side = image_size, nothing cropped or padded; "no": keep the originals;
    #: "keep_ratio_largest": long side = image_size; "center_crop" and "border" (img2dataset's
    #: default) crop or pad to a square, which changes what a copy detector sees
    resize_mode: str = choice("keep_ratio", "keep_ratio", "no", "keep_ratio_largest", "center_crop", "border")
    #: never upscale: images smaller than image_size are kept at their size
    resize_only_if_bigger: bool = True
    #: keep the downloaded bytes of images that need no resize and are already in encode_format
    skip_reencode: bool = True
    #: format of the stored images
    encode_format: str = choice("jpg", "jpg", "png", "webp")
    #: JPEG/WebP quality (0-100), or PNG compression (0-9)
    encode_quality: int = 95
    #: drop images whose short side is below this many pixels (0 = keep all)
    min_image_size: int = 0
    #: hash of the downloaded bytes kept in each sample's json (matches published hash lists); "none" = off
    compute_hash: str = choice("sha256", "sha256", "md5", "sha512", "none")
    #: URLs per tar (img2dataset's number_sample_per_shard)
    samples_per_shard: int = 10000
    #: digits of the shard numbers in tar names (6: up to 1M tars, LAION-5B at 10,000 per tar)
    shard_digits: int = 6
    #: parallel downloads inside one shard task (img2dataset's thread_count)
    threads: int = 64
    #: seconds a connection or a read may stall before the URL counts as failed ("timeout")
    timeout: float = 10
    #: extra attempts per URL after a failed download
    retries: int = 0
    #: X-Robots-Tag directives that exclude an image (img2dataset's default); empty = download all
    disallowed_header_directives: list[str] = field(default_factory=lambda: ["noai", "noimageai", "noindex",
                                                                              "noimageindex"])
    #: name added to the User-Agent ("compatible; NAME; +img2dataset's URL"), so site owners can tell
    #: this crawl apart and opt out of it with X-Robots-Tag "NAME: noai" (img2dataset's user_agent_token)
    user_agent_name: str = ""
    #: CPUs reserved per shard task (downloads are network-bound; resizing uses one core)
    cpus_per_task: float = 1
    #: shard tasks in flight at once; 0 = cluster CPUs / cpus_per_task, followed as the cluster changes
    max_shards_in_flight: int = 0
    #: attempts per shard before it is left incomplete (storage errors only; a dead URL is a counted failure)
    shard_attempts: int = 3
    #: end with exit code 3 when more than this share of the URLs failed (dead links are normal on LAION)
    max_failed_fraction: float = 0.5
    #: take over the output's lock when its holder's heartbeat is older than lock_stale_after_s
    break_lock: bool = False
    #: seconds without a heartbeat after which a lock is stale (its run is presumed dead)
    lock_stale_after_s: float = 600


@dataclass
class EmbedConfig:
    """`replica embed`: WebDataset tars -> one Parquet file of embeddings per tar."""

    #: tar URL(s): a path, glob or brace list, local or s3://
    input: list[str] = field(default_factory=list)
    #: output folder; shards land in {output}/{shard}.parquet
    output: str = ""
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    s3: Storage = field(default_factory=Storage)
    ray: RayConfig = field(default_factory=RayConfig)
    #: images per model call
    batch_size: int = 64
    #: rows per Parquet row group (small groups make single-row reads cheap)
    row_group_size: int = 1024
    #: embedding actors; 0 = one per GPU, or 1 on a CPU-only cluster
    num_actors: int = 0
    #: GPUs per embedding actor; -1 = 1 when the cluster has GPUs, else 0
    gpus_per_actor: float = -1
    #: CPUs reserved per embedding actor
    cpus_per_actor: float = 1
    #: input tars decoded at once; 0 = the cluster's CPUs, followed as the cluster grows or shrinks
    max_tars_in_flight: int = 0
    #: attempts per tar before it is recorded as failed (infrastructure errors only; bad data is rows)
    shard_attempts: int = 4
    #: image members larger than this become an error row without being read into memory
    max_member_bytes: int = 64 << 20
    #: end with exit code 3 when more than this share of the images seen failed (decode, read, embed)
    max_failed_fraction: float = 0.01
    #: end with exit code 3 when more than this many tars are damaged (a truncated or unreadable tar)
    max_failed_shards: int = 0
    #: redo only the tars recorded as failed by an earlier run
    retry_failed: bool = False
    #: take over the output's lock when its holder's heartbeat is older than lock_stale_after_s
    break_lock: bool = False
    #: seconds without a heartbeat after which a lock is stale (its run is presumed dead)
    lock_stale_after_s: float = 600


@dataclass
class IndexConfig:
    """`replica index train|add|merge|build`: the sharded IVF-PQ index over embedding shards."""

    #: embedding folder ({shard}.parquet + {shard}.stats.json + _replica.json), local or s3://
    embeddings: str = ""
    #: index folder: registry, trained index, parts, ledger, index shards, manifest
    index: str = ""
    s3: Storage = field(default_factory=Storage)
    ray: RayConfig = field(default_factory=RayConfig)
    #: faiss factory string; empty = chosen from memory_budget_gb and the corpus size
    factory: str = ""
    #: RAM for the whole index's inverted lists (codes + ids), used to choose the factory
    memory_budget_gb: float = 0.0
    #: "ip" (cosine on L2-normalised vectors) or "l2"
    metric: str = choice("ip", "ip", "l2")
    #: IVF lists when choosing the factory; 0 = ~4*sqrt(n), capped at max_nlist
    nlist: int = 0
    #: upper bound on automatically chosen IVF lists
    max_nlist: int = 131072
    #: from this many lists on, the coarse k-means runs in two levels (sqrt(nlist) clusters, then
    #: each split): minutes instead of days at 2^20 lists; 0 = always one level
    two_level_from_nlist: int = 65536
    #: training sample size; 0 = from nlist (64 per list, >= 65536, <= train_cap)
    train_size: int = 0
    #: upper bound on the automatic training sample
    train_cap: int = 2_000_000
    #: training reads at most this many shards (chosen uniformly at random)
    train_max_shards: int = 2048
    #: seed of the training sample
    seed: int = 0
    #: where k-means runs: "cuda" = a Ray task that asks for a GPU (the autoscaler adds one if needed);
    #: "auto" = such a task when the cluster has a GPU now, else this process; "cpu" = this process
    train_device: str = choice("auto", "auto", "cpu", "cuda")
    #: embedding shards per add task (one index part each)
    group_size: int = 100
    #: CPUs per add task (faiss threads inside it)
    cpus_per_task: float = 1
    #: add tasks in flight at once; 0 = cluster CPUs / cpus_per_task
    max_tasks_in_flight: int = 0
    #: also write each shard's vectors as a raw fp16 side file for exact rerank by byte range
    write_vectors: bool = True
    #: RAM of one serving actor for its index shard(s); decides how many index shards
    shard_memory_gb: float = 8.0
    #: parts merged at once (>= 2); more parts are merged in stages
    merge_fanin: int = 64
    #: after a build, measure recall against cost on sampled corpus vectors and record the cheapest
    #: (nprobe, rerank depth) reaching target_recall in the manifest; search uses them by default
    tune: bool = True
    #: corpus vectors drawn as tuning queries (their exact top-10 is a scan of every stored vector)
    tune_queries: int = 1000
    #: recall@10 after the exact rerank that the tuned settings must reach, with two standard
    #: errors of the tuning sample to spare (so queries the tuning never saw reach it too)
    target_recall: float = 0.95
    #: a build retunes when the index grew by more than this fraction since the last tuning
    retune_growth: float = 0.10
    #: search actors; 0 = one per index shard, at most the cluster's CPUs
    num_actors: int = 0
    #: faiss threads per search actor / driver step; 0 = all cores
    threads: int = 0
    #: take over the index's lock when its holder's heartbeat is older than lock_stale_after_s
    break_lock: bool = False
    #: seconds without a heartbeat after which a lock is stale (its run is presumed dead)
    lock_stale_after_s: float = 600


@dataclass
class ImportConfig:
    """`replica import-embeddings`: clip-retrieval / LAION release layout -> embedding Parquet."""

    #: folder holding img_emb/img_emb_{i}.npy and metadata/metadata_{i}.parquet
    input: str = ""
    #: embedding folder to write ({shard}.parquet, {shard}.stats.json, _replica.json)
    output: str = ""
    s3: Storage = field(default_factory=Storage)
    #: embedder identity of the released vectors: name (e.g. open_clip)
    embedder: str = ""
    #: embedder identity: model (e.g. ViT-L-14)
    model: str = ""
    #: embedder identity: weights tag or file (e.g. openai)
    weights: str = ""
    #: embedder identity: preprocessing the release used (e.g. resize224-centercrop)
    preprocess: str = ""
    #: expected dim; 0 = take it from the .npy files
    dim: int = 0
    #: rows per output shard (a released .npy of ~1M rows becomes several shards)
    rows_per_shard: int = 100_000
    #: rows per Parquet row group (small groups keep row lookups cheap)
    row_group_size: int = 1024
    #: output shard names are {prefix}{file index:06d}_{chunk:04d}
    prefix: str = "emb-"
    #: metadata column holding each row's key (missing columns become null)
    key_column: str = "key"
    #: metadata column holding the image URL
    url_column: str = "url"
    #: metadata column holding the caption
    caption_column: str = "caption"
    #: end with exit code 3 when more than this share of the vectors is unusable (non-finite)
    max_failed_fraction: float = 0.01
    #: take over the output's lock when its holder's heartbeat is older than lock_stale_after_s
    break_lock: bool = False
    #: seconds without a heartbeat after which a lock is stale (its run is presumed dead)
    lock_stale_after_s: float = 600


@dataclass
class SearchConfig:
    """`replica search`: generated images against the index, then the report."""

    #: generated images: a folder (images + optional {stem}.txt prompts), tar URL(s)/glob, or a Parquet file
    queries: str = ""
    #: a built index folder (holds manifest.json)
    index: str = ""
    #: results root; this run lands in {output}/run_id={run_id}/
    output: str = ""
    #: run name; empty = a UTC timestamp
    run_id: str = ""
    #: what this run measures (model, prompt set or mitigation setting): `replica compare` shows it
    label: str = ""
    #: query embedder; empty name = the settings the corpus was embedded with (from the index)
    embedder: EmbedderConfig = field(default_factory=lambda: EmbedderConfig(name=""))
    s3: Storage = field(default_factory=Storage)
    ray: RayConfig = field(default_factory=RayConfig)
    #: matches kept per query
    top_k: int = 10
    #: ANN candidates per query region (per query without regions: at least rerank_depth)
    candidates: int = 100
    #: corpus images per query rescored exactly on their stored vectors (after merging the query's
    #: regions); 0 = what the index's tuning measured (index tune), else 400
    rerank_depth: int = 0
    #: IVF lists probed; 0 = what the index's tuning measured, else 64
    nprobe: int = 0
    #: exact rerank inside the index shard actors, on local copies of their fp16 side files (copied once
    #: per node); false = candidates' vectors read by byte range, which is quicker for one search on a
    #: fresh cluster than copying every side file (docs/SCALING.md)
    rerank_in_shards: bool = True
    #: also search several regions of each query (when the embedder offers it)
    regions: bool = True
    #: second-stage descriptors computed on the pixels of each query's best rerank_top candidates, each
    #: writing score_<name>: sscd, dino, dino-split (DCR's split-product of DINO tokens), open_clip, default.
    #: The first one's similarity is the one thresholds and the final score read; empty = off
    rerank: list[str] = field(default_factory=list)
    #: candidates per query given to the second stage (fetched by ranged reads)
    rerank_top: int = 20
    #: dino-split: pieces the flattened, L2-normalised tokens are cut into; 0 = one per token (DCR's default)
    rerank_chunks: int = 0
    #: dino-split: compare every pair of pieces (DCR's "cross" variant) instead of corresponding pieces
    rerank_cross: bool = False
    #: weights of the sscd descriptor (a TorchScript file) when `rerank` lists it
    sscd: DescriptorWeights = field(default_factory=DescriptorWeights)
    #: weights of the dino and dino-split descriptors (a timm ViT name and its checkpoint)
    dino: DescriptorWeights = field(default_factory=DescriptorWeights)
    #: weights of the open_clip descriptor (an architecture and a pretrained tag or checkpoint)
    clip: DescriptorWeights = field(default_factory=DescriptorWeights)
    #: nL2 (Carlini et al.) of each match: this many of the query's best candidates are fetched and stand
    #: for its nearest training images (docs/RESULTS.md); 0 = off
    nl2_neighbours: int = 50
    #: caption-counts folder written by `replica captions` on the index's embeddings; each match gets
    #: how many training images carry its caption; empty = not counted
    captions: str = ""
    #: local-feature verification: the best N candidates per query, N/2 more by the whole image's
    #: similarity, and heads of single windows' lists, 3.5 N in all; 0 = off
    verify_top: int = 12
    #: final-score model (JSON from bench/copy_detection.py --fit) for the descriptor whose similarity
    #: is scored; empty = the shipped model when it was fitted for that descriptor, else fixed weights
    score_model: str = ""
    #: files of keys, URLs or sha256 hashes never to show or fetch (Parquet/CSV/TXT)
    blocklist: list[str] = field(default_factory=list)
    #: Parquet/CSV/TXT of keys or URLs forming "the subset" (e.g. LAION Aesthetics 6+)
    subset: str | None = None
    #: the paper's replication threshold, applied to the descriptor similarity (SSCD's cosine when SSCD
    #: is the embedder or the rerank); the calibrated threshold applies to the final score
    replication_threshold: float = 0.5
    #: near-duplicate threshold on the descriptor similarity: matches and baseline neighbours at or above
    #: it are copies of one picture
    duplicate_threshold: float = 0.95
    #: false-positive rate at which a threshold is calibrated on the baseline
    fpr: float = 0.01
    #: corpus images sampled for the self-similarity baseline
    baseline_size: int = 1000
    #: neighbours looked at when counting near-duplicates of a match or baseline sample
    dup_neighbours: int = 50
    #: seed of the baseline sample
    seed: int = 0
    #: queries read, searched and written per unit of work: a killed run resumes with the batches
    #: it had not finished, and the driver holds one batch of images at a time
    query_batch_size: int = 256
    #: Ray actors that embed query regions and run the second-stage descriptor: -1 = one per GPU
    #: of the cluster (in the driver when it has none), 0 = in the driver, N = N actors (GPU ones
    #: when the cluster has GPUs and the embedder's device is not cpu)
    embed_actors: int = -1
    #: take over the run folder's lock when its holder's heartbeat is older than lock_stale_after_s
    break_lock: bool = False
    #: seconds without a heartbeat after which a lock is stale (its run is presumed dead)
    lock_stale_after_s: float = 600


@dataclass
class CaptionsConfig:
    """`replica captions`: how many training images carry each caption (exact and normalised), counted by Ray
    tasks over the embedding Parquet; search joins the counts to its matches by hash."""

    #: embedding folder whose rows' captions are counted ({shard}.parquet + {shard}.stats.json + _replica.json)
    embeddings: str = ""
    #: caption-counts folder: counts/part-*.parquet (one row per distinct caption) and _captions.json
    output: str = ""
    s3: Storage = field(default_factory=Storage)
    ray: RayConfig = field(default_factory=RayConfig)
    #: hash buckets of the counts: reduce tasks and output files (fixed for an output folder)
    partitions: int = 16
    #: embedding shards per counting task
    group_size: int = 100
    #: CPUs per task
    cpus_per_task: float = 1
    #: tasks in flight at once; 0 = cluster CPUs / cpus_per_task
    max_tasks_in_flight: int = 0
    #: take over the output's lock when its holder's heartbeat is older than lock_stale_after_s
    break_lock: bool = False
    #: seconds without a heartbeat after which a lock is stale (its run is presumed dead)
    lock_stale_after_s: float = 600


@dataclass
class ReportConfig:
    """`replica report`: summary, histogram and gallery of one search run."""

    #: the run folder: {results}/run_id={run_id} (local path or s3://...)
    run: str = ""
    s3: Storage = field(default_factory=Storage)
    #: matches shown per query in the gallery
    top: int = 5
    #: queries in the gallery, best-scoring first; 0 = all of them
    max_queries: int = 200


@dataclass
class PipelineConfig:
    """`replica pipeline`: the stages chained for scheduled runs (sections ingest, import, embed, index, search)."""

    #: Ray address for every stage (else each section's ray.address, RAY_ADDRESS, or a local Ray)
    ray: RayConfig = field(default_factory=RayConfig)
    #: run name; empty = search.run_id, else the UTC start time. The run's record and results land in
    #: {search.output}/run_id={run_id}/
    run_id: str = ""
    #: "new": search only the query images no earlier run in search.output searched; "all": search
    #: every query image again (against the corpus as it is now)
    search_queries: str = choice("new", "new", "all")


#: The config sections a file may hold, by the command that reads them.
SECTIONS = {"ingest": IngestConfig, "embed": EmbedConfig, "index": IndexConfig, "import": ImportConfig,
            "captions": CaptionsConfig, "search": SearchConfig, "report": ReportConfig, "pipeline": PipelineConfig}
#: The command each section belongs to (docs/CONFIG.md headings).
COMMANDS = {"ingest": "replica ingest", "embed": "replica embed", "index": "replica index train|add|merge|build",
            "import": "replica import-embeddings", "captions": "replica captions", "search": "replica search",
            "report": "replica report", "pipeline": "replica pipeline"}


# --------------------------------------------------------------------------- names of the last release

#: Config keys renamed in this release; the old names are accepted, with a warning, until the next.
#: keys no longer read, with what replaced them
REMOVED_KEYS = {
    "index": {"nprobe": "search uses the nprobe the index's tuning measured (`replica index tune`), or search.nprobe"},
}

RENAMED_KEYS = {
    "*": {"storage": "s3", "ray_address": "ray.address"},
    "embed": {"ray.num_actors": "num_actors", "ray.gpus_per_actor": "gpus_per_actor",
              "ray.cpus_per_actor": "cpus_per_actor", "ray.max_tars_in_flight": "max_tars_in_flight"},
}


#: the section of `search` holding the weights of each second-stage embedder
RERANK_WEIGHTS = {"sscd": "sscd", "dino": "dino", "open_clip": "clip", "default": None}


def upgrade_rerank(data: dict[str, Any]) -> list[str]:
    """Last release's `search.rerank` (one embedder section) as today's list and weights section, in place."""
    old = data.get("rerank")
    if not isinstance(old, dict):
        return []
    name = str(old.get("name") or "")
    data["rerank"] = [name] if name else []
    if not name:
        return []
    if name not in RERANK_WEIGHTS:
        raise ConfigError(f"search.rerank names embedder {name!r}; second-stage descriptors are "
                          f"{', '.join(RERANK_WEIGHTS)}, dino-split")
    weights = {k: v for k, v in old.items() if k not in ("name", "query_region_scales", "query_region_step",
                                                          "query_object_regions")}
    if RERANK_WEIGHTS[name] and weights:
        data[RERANK_WEIGHTS[name]] = {**weights, **(data.get(RERANK_WEIGHTS[name]) or {})}
    where = f" and its weights under `{RERANK_WEIGHTS[name]}:`" if RERANK_WEIGHTS[name] else ""
    return [f"search.rerank as one embedder section is deprecated; use `rerank: [{name}]`{where} "
            "(accepted until the next release)"]


def upgrade_names(section: str, data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Rename last release's keys of one section to today's; returns the data and a warning per rename."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    notes: list[str] = upgrade_rerank(data) if section == "search" else []
    for old, why in REMOVED_KEYS.get(section, {}).items():
        if data.pop(old, None) is not None:
            notes.append(f"config key {section}.{old} is no longer read and was ignored: {why}")
    renames = {**RENAMED_KEYS["*"], **RENAMED_KEYS.get(section, {})}
    for old, new in renames.items():
        head, _, tail = old.partition(".")
        if head not in data:
            continue
        if tail:
            if not isinstance(data[head], dict) or tail not in data[head]:
                continue
            value = data[head].pop(tail)
        else:
            value = data.pop(head)
        if head == "storage" and isinstance(value, dict) and ({"key", "secret"} & set(value)):
            raise ConfigError(f"{section}.storage.key/secret are no longer read from config files: set "
                              "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or use an instance role, and remove them")
        nhead, _, ntail = new.partition(".")
        if ntail:
            data.setdefault(nhead, {})
            data[nhead] = {**(data[nhead] or {}), ntail: value}
        else:
            data[nhead] = value if not isinstance(value, dict) else {**(data.get(nhead) or {}), **value}
        notes.append(f"config key {section}.{old} is deprecated; use {section}.{new} (accepted until the next release)")
    return data, notes


# --------------------------------------------------------------------------- files


def load_file(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path!r} does not exist")
    text = p.read_text()
    try:
        data = tomllib.loads(text) if p.suffix == ".toml" else yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - any parse error becomes a config error
        detail = " ".join(line.strip() for line in str(exc).splitlines() if line.strip() and line.strip() != "^")
        raise ConfigError(f"config file {path!r} cannot be parsed: {detail}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of settings")
    return data


def file_section(path: str | None, section: str) -> tuple[dict[str, Any], list[str]]:
    """One section of a config file, upgraded to today's names; plus warnings.

    A file whose top-level keys are not section names is last release's flat form of one
    command's config: it is read as that section, with a warning.
    """
    data = load_file(path)
    if not data:
        return {}, []
    notes: list[str] = []
    fields = {f.name for f in dataclasses.fields(SECTIONS[section])}
    if not set(data) & set(SECTIONS) and set(data) & (fields | {"storage", "ray_address"}):
        notes.append(f"config file {path} has no sections; put its settings under `{section}:` "
                     "(flat files are accepted until the next release)")
        body = data
    else:
        unknown = sorted(set(data) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"unknown section {unknown[0]!r} in {path}; sections are {', '.join(SECTIONS)}")
        body = data.get(section) or {}
    if not isinstance(body, dict):
        raise ConfigError(f"section {section} of {path} must be a mapping")
    body, more = upgrade_names(section, body)
    return body, notes + more


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``overrides`` (CLI flags, None = not given) over ``base`` (file)."""
    out = dict(base)
    for k, v in overrides.items():
        if v is None:
            continue
        if isinstance(v, dict):
            out[k] = merge(out.get(k) or {}, v)
        else:
            out[k] = v
    return out


def build(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys, wrong types and values off the choices."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown setting {where + '.' if where else ''}{unknown[0]}; known: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        path = f"{where + '.' if where else ''}{name}"
        kwargs[name] = _coerce(hints[name], value, path)
        choices = fields[name].metadata.get("choices")
        if choices and kwargs[name] not in choices and not (kwargs[name] == "" and _empty_allowed(cls, name)):
            raise ConfigError(f"{path} must be one of {', '.join(map(str, choices))}, got {kwargs[name]!r}")
    return cls(**kwargs)


def _empty_allowed(cls: type, name: str) -> bool:
    """An embedder section whose name may be left empty (search: from the index; rerank: off)."""
    return cls is EmbedderConfig and name == "name"


def _coerce(tp: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else build(tp, value, where)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(non_none[0], value, where)
    if origin is list:
        items = value if isinstance(value, (list, tuple)) else [value]
        return [_coerce(args[0], v, where) for v in items]
    if tp is bool:
        if isinstance(value, str):
            return value.lower() in ("1", "true", "yes", "on")
        return bool(value)
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        try:
            return tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a number, got {value!r}") from None
    if tp is str:
        return "" if value is None else str(value)
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# --------------------------------------------------------------------------- documentation


def field_docs(cls: type) -> dict[str, str]:
    """The ``#:`` comment above each field of a config dataclass, read from its source."""
    import inspect

    docs: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#:"):
            pending.append(stripped[2:].strip())
        elif ":" in stripped and not stripped.startswith(("#", '"', "class", "@")):
            docs[stripped.split(":", 1)[0].strip()] = " ".join(pending)
            pending = []
        else:
            pending = []
    return docs


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def template(cfg: Any, indent: int = 0) -> list[str]:
    """A commented YAML template of a config (class: its defaults): what ``replica config`` prints."""
    cfg = cfg() if isinstance(cfg, type) else cfg
    pad = " " * indent
    docs = field_docs(type(cfg))
    lines = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if docs.get(f.name):
            lines.append(f"{pad}# {docs[f.name]}")
        if dataclasses.is_dataclass(value):
            lines.append(f"{pad}{f.name}:")
            lines.extend(template(value, indent + 2))
        else:
            lines.append(f"{pad}{f.name}: {_yaml_value(value)}")
    return lines


def section_template(name: str) -> list[str]:
    """A section of a config file, as it sits in the file (``name:`` then its fields)."""
    return [f"{name}:", *template(SECTIONS[name], 2)]
