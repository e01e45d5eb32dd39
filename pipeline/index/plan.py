"""The index steps' shared plan: settings checked and folders bound before any work."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import IndexConfig
from pipeline.errors import ConfigError
from pipeline.index.factory import metric_of
from pipeline.layout.embeddings import EmbeddingsFolder
from pipeline.layout.index import IndexFolder


@dataclass
class IndexPlan:
    cfg: IndexConfig
    index: IndexFolder
    embeddings: EmbeddingsFolder | None

    def lock(self, command: str):
        """The index folder's lock, held while a step writes it."""
        from pipeline.layout.lock import OutputLock

        return OutputLock(self.index, command, break_lock=self.cfg.break_lock,
                          stale_after_s=self.cfg.lock_stale_after_s)


def plan_index(cfg: IndexConfig, needs_embeddings: bool = True) -> IndexPlan:
    """Check the settings every index step relies on; raise ConfigError before any work."""
    if needs_embeddings and not cfg.embeddings:
        raise ConfigError("index.embeddings is required (the folder written by `replica embed`)")
    if not cfg.index:
        raise ConfigError("index.index is required (where the index is written)")
    if cfg.train_device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"index.train_device must be auto, cpu or cuda, got {cfg.train_device!r}")
    metric_of(cfg.metric)
    for name in ("group_size", "train_max_shards", "tune_queries"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"index.{name} must be >= 1, got {getattr(cfg, name)}")
    if not 0 < cfg.target_recall <= 1:
        raise ConfigError(f"index.target_recall must be in (0, 1], got {cfg.target_recall}")
    if cfg.merge_fanin < 2:  # a fan-in of 1 would re-merge single parts forever
        raise ConfigError(f"index.merge_fanin must be >= 2, got {cfg.merge_fanin}")
    if cfg.shard_memory_gb <= 0:
        raise ConfigError("index.shard_memory_gb must be > 0")
    if cfg.cpus_per_task <= 0:
        raise ConfigError("index.cpus_per_task must be > 0")
    embeddings = EmbeddingsFolder(cfg.embeddings, cfg.s3) if cfg.embeddings else None
    return IndexPlan(cfg, IndexFolder(cfg.index, cfg.s3), embeddings)
