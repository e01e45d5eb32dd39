"""Ray custom metrics of a run: what the Ray dashboard and Prometheus show while it works.

Exported by each node's Ray metrics agent (Prometheus format, prefixed ``ray_``) on the
``--metrics-export-port`` of ``ray start``; names and tags in docs/RELIABILITY.md. Recording
never fails a run: without a Ray connection, or if the metrics agent is absent, it does nothing.
"""
from __future__ import annotations

from typing import Any


class StageMetrics:
    """Counters of one stage (``stage`` tag): units done, records, failures by reason, bytes read."""

    def __init__(self, stage: str):
        self.stage = stage
        self._m: dict[str, Any] | None = None
        try:
            from ray.util import metrics

            tags = ("stage",)
            self._m = {
                "units": metrics.Counter("replica_units_done", "units of work finished (shards, parts, batches)",
                                         tag_keys=tags),
                "records": metrics.Counter("replica_records", "records processed (images, vectors, queries)",
                                           tag_keys=tags),
                "failures": metrics.Counter("replica_failures", "records or units that failed, by reason",
                                            tag_keys=("stage", "reason")),
                "bytes": metrics.Counter("replica_bytes_read", "bytes of input read", tag_keys=tags),
                "rate": metrics.Gauge("replica_records_per_second", "records per second since the run started",
                                      tag_keys=tags),
            }
        except Exception:  # noqa: BLE001 - metrics are an aid, never a reason to fail
            self._m = None

    def unit_done(self, records: int, failures: dict[str, int] | None = None, bytes_read: int = 0,
                  rate: float | None = None) -> None:
        if self._m is None:
            return
        try:
            tags = {"stage": self.stage}
            self._m["units"].inc(1, tags)
            if records:
                self._m["records"].inc(records, tags)
            for reason, n in (failures or {}).items():
                if n:
                    self._m["failures"].inc(n, {"stage": self.stage, "reason": reason})
            if bytes_read:
                self._m["bytes"].inc(bytes_read, tags)
            if rate is not None:
                self._m["rate"].set(rate, tags)
        except Exception:  # noqa: BLE001
            pass

    def failure(self, reason: str, n: int = 1) -> None:
        if self._m is not None:
            try:
                self._m["failures"].inc(n, {"stage": self.stage, "reason": reason})
            except Exception:  # noqa: BLE001
                pass
