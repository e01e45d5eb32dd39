"""One typed config for every stage, loaded from YAML/TOML and/or CLI flags (same field names).

Sections map to dataclasses; unknown keys and wrong types are errors, so a typo fails before
any work starts. Stage modules add their own semantic checks (paths exist, models known...).
"""
from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import ConfigError
from pipeline.io import Storage


@dataclass
class EmbedderConfig:
    """Which descriptor makes the vectors."""

    #: "default" (weight-free copy descriptor), "open_clip" or "sscd"
    name: str = "default"
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
    device: str = "auto"


@dataclass
class RayConfig:
    #: Ray address ("auto", "ray://host:10001"); empty = RAY_ADDRESS or a local Ray
    address: str | None = None
    #: embedding actors; 0 = one per GPU, or 1 on a CPU-only cluster
    num_actors: int = 0
    #: GPUs per embedding actor; -1 = 1 when the cluster has GPUs, else 0
    gpus_per_actor: float = -1
    cpus_per_actor: float = 1
    #: input tars decoded at once; 0 = the cluster's CPU count
    max_tars_in_flight: int = 0


@dataclass
class EmbedConfig:
    #: tar URL(s): a path, glob or brace list, local or s3://
    input: list[str] = field(default_factory=list)
    #: output folder; shards land in {output}/{shard}.parquet
    output: str = ""
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    storage: Storage = field(default_factory=Storage)
    ray: RayConfig = field(default_factory=RayConfig)
    #: images per model call
    batch_size: int = 64
    #: rows per Parquet row group (small groups make single-row reads cheap)
    row_group_size: int = 1024


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
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown setting {where + '.' if where else ''}{unknown[0]}; known: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{where + '.' if where else ''}{name}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else build(tp, value, where)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType")):
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
        try:
            return tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a number, got {value!r}") from None
    if tp is str:
        return str(value)
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
