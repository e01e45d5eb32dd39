"""One typed config for every stage, loaded from a YAML/TOML file and/or CLI flags.

A config file has one section per command (``embed``, ``index``, ``import``, ``search``,
``report``): the same file serves every command and ``replica pipeline``. Sections map to
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

    #: "default" (weight-free copy descriptor), "open_clip" or "sscd"
    name: str = choice("default", "default", "open_clip", "sscd")
    #: open_clip architecture, e.g. "ViT-B-32"
    model: str | None = None
    #: open_clip pretrained tag (downloaded by open_clip on a networked cluster)
    pretrained: str | None = None
    #: local path or fsspec URL of weights: open_clip checkpoint or SSCD TorchScript file
    checkpoint: str | None = None
    #: JSON file of an open_clip model config to register (custom architectures)
    model_config: str | None = None
    #: preprocessing: resize short side to this many pixels, then centre-crop a square
    image_size: int | None = None
    #: "auto" (CUDA when present), "cpu" or "cuda"
    device: str = choice("auto", "auto", "cpu", "cuda")
    #: default embedder, query side: sizes (fractions of the query's width and height) of the
    #: windows embedded besides the whole image, so a copied object inside a new scene is found
    #: (see docs/BENCHMARKS.md); empty = whole image only
    query_region_scales: list[float] = field(default_factory=lambda: [0.75, 0.6, 0.5, 0.4])
    #: default embedder, query side: window stride as a fraction of the window size
    query_region_step: float = 0.33
    #: default embedder, query side: windows centred on objects (regions whose colours differ from their
    #: surroundings) embedded besides the grid; 0 = grid only
    query_object_regions: int = 0


@dataclass
class RayConfig:
    #: Ray address ("auto", "ray://host:10001"); empty = RAY_ADDRESS or a local Ray
    address: str | None = None


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
    #: input tars decoded at once; 0 = the cluster's CPU count
    max_tars_in_flight: int = 0


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
    #: training sample size; 0 = from nlist (64 per list, >= 65536, <= train_cap)
    train_size: int = 0
    #: upper bound on the automatic training sample
    train_cap: int = 2_000_000
    #: training reads at most this many shards (chosen uniformly at random)
    train_max_shards: int = 2048
    #: seed of the training sample
    seed: int = 0
    #: "auto" = faiss-gpu when it is installed and CUDA is present; "cpu"; "cuda"
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
    #: default lists probed at search time
    nprobe: int = 64
    #: search actors; 0 = one per index shard, at most the cluster's CPUs
    num_actors: int = 0
    #: faiss threads per search actor / driver step; 0 = all cores
    threads: int = 0


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
    #: query embedder; empty name = the settings the corpus was embedded with (from the index)
    embedder: EmbedderConfig = field(default_factory=lambda: EmbedderConfig(name=""))
    s3: Storage = field(default_factory=Storage)
    ray: RayConfig = field(default_factory=RayConfig)
    #: matches kept per query
    top_k: int = 10
    #: ANN candidates per query region before the exact rerank
    candidates: int = 100
    #: IVF lists probed; 0 = the index's default
    nprobe: int = 0
    #: also search several regions of each query (when the embedder offers it)
    regions: bool = True
    #: optional second-stage descriptor computed on candidate pixels (e.g. sscd); empty name = off
    rerank: EmbedderConfig = field(default_factory=lambda: EmbedderConfig(name=""))
    #: candidates per query given to the second stage (fetched by ranged reads)
    rerank_top: int = 20
    #: local-feature verification of the best N candidates per query; 0 = off
    verify_top: int = 10
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


#: The config sections a file may hold, by the command that reads them.
SECTIONS = {"embed": EmbedConfig, "index": IndexConfig, "import": ImportConfig, "search": SearchConfig,
            "report": ReportConfig}
#: The command each section belongs to (docs/CONFIG.md headings).
COMMANDS = {"embed": "replica embed", "index": "replica index train|add|merge|build",
            "import": "replica import-embeddings", "search": "replica search", "report": "replica report"}


# --------------------------------------------------------------------------- names of the last release

#: Config keys renamed in this release; the old names are accepted, with a warning, until the next.
RENAMED_KEYS = {
    "*": {"storage": "s3", "ray_address": "ray.address"},
    "embed": {"ray.num_actors": "num_actors", "ray.gpus_per_actor": "gpus_per_actor",
              "ray.cpus_per_actor": "cpus_per_actor", "ray.max_tars_in_flight": "max_tars_in_flight"},
}


def upgrade_names(section: str, data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Rename last release's keys of one section to today's; returns the data and a warning per rename."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    notes: list[str] = []
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
        raise ConfigError(f"config file {path!r} cannot be parsed: {exc}") from exc
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
        unknown = sorted(set(data) - set(SECTIONS) - {"pipeline"})
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
