"""Runs on a multi-node Ray cluster on this machine (ray.cluster_utils.Cluster), one scenario per
process (a process joins one Ray cluster); prints one JSON line. Used by tests/test_cluster.py."""
from __future__ import annotations

import json
import sys
import tempfile
import time

import ray
from ray.cluster_utils import Cluster


def widen(work: str) -> dict:
    """A node joins mid-run: the embed window (tars decoding at once) grows with the cluster."""
    from pipeline.config import EmbedConfig
    from pipeline.embed import run_embed
    from pipeline.sample import make_sample_tars

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    ray.init(address=cluster.address)
    make_sample_tars(f"{work}/tars", tars=16, per_tar=60)
    joined = {}

    def on_shard(stats) -> None:
        if len(joined) == 0 and stats.decoded_by:
            joined["at"] = time.time()
            joined["node"] = cluster.add_node(num_cpus=3).node_id
    # the actor holds no CPU: the head's one CPU decodes, one tar at a time, until the node joins
    s = run_embed(EmbedConfig(input=[f"{work}/tars/*.tar"], output=f"{work}/emb", cpus_per_actor=0, batch_size=16),
                  on_shard_done=on_shard)
    from pipeline.layout.embeddings import EmbeddingsFolder

    folder = EmbeddingsFolder(f"{work}/emb")
    spans = [(st.decoded_by["started"], st.decoded_by["finished"]) for st in map(folder.read_stats, folder.complete_shards())]

    def peak(lo: float, hi: float) -> int:
        points = sorted({t for span in spans for t in span if lo <= t <= hi})
        return max((sum(1 for a, b in spans if a <= t < b) for t in points), default=0)

    result = {"embedded": s.embedded, "before": peak(0, joined["at"]), "after": peak(joined["at"] + 2, 1e12)}
    ray.shutdown()
    cluster.shutdown()
    return result


def gpu_train(work: str) -> dict:
    """train_device cuda asks for a GPU: the task waits, then runs on the node that brings one."""
    from pipeline.config import IndexConfig
    from pipeline.index.train import run_train
    from pipeline.layout.embeddings import EmbeddingsFolder
    from pipeline.testing.vectors import MixtureSource, write_folder

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    ray.init(address=cluster.address)
    list(write_folder(EmbeddingsFolder(f"{work}/emb"), MixtureSource(16, latent=4, clusters=8), 2, 300))
    trained = {}

    def train() -> None:  # waits for a GPU; the node that brings one joins from the main thread
        trained["info"] = run_train(IndexConfig(embeddings=f"{work}/emb", index=f"{work}/index",
                                                factory="IVF8,Flat", train_device="cuda"))

    import threading

    worker = threading.Thread(target=train)
    worker.start()
    time.sleep(4)
    assert "info" not in trained, "the GPU task ran before any node had a GPU"
    node = cluster.add_node(num_cpus=1, num_gpus=1).node_id
    worker.join(timeout=300)
    info = trained["info"]
    result = {"device": info.device, "gpu_node": node[:12]}
    ray.shutdown()
    cluster.shutdown()
    return result


if __name__ == "__main__":
    print(json.dumps({"widen": widen, "gpu_train": gpu_train}[sys.argv[1]](sys.argv[2] if len(sys.argv) > 2
                                                                             else tempfile.mkdtemp())))
