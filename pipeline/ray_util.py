"""Connecting to Ray: a cluster address when given, else a local Ray on this machine."""
from __future__ import annotations

import os


def connect(address: str | None = None, **local_kwargs):
    """Join ``address`` (or RAY_ADDRESS); with neither, start a local Ray.

    Returns the ray module. Calling it twice in one process is harmless.
    """
    import ray

    if ray.is_initialized():
        return ray
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs = {"ignore_reinit_error": True, "log_to_driver": True}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(include_dashboard=False, **kwargs, **local_kwargs)
    return ray


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1))
