"""Money and time of a LAION-5B pass, from a prices file the user edits (bench/prices.yaml).

    python bench/costs.py [--prices bench/prices.yaml] [--nodes 16]

Prints the Markdown tables of docs/SCALING.md ("Money and time"). Every rate comes from the
prices file: CPU rates measured on the benchmark machine, GPU rates marked as estimates, prices
marked as assumptions. Nothing here is measured by this script; it only multiplies.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
MODELS = {"default": "default descriptor", "sscd": "SSCD (ResNet-50, 288 px)",
          "clip-vit-l-14": "CLIP ViT-L/14 (224 px)"}


def money(x: float) -> str:
    return f"${x:,.0f}" if x >= 10 else f"${x:,.2f}"


def hours(h: float) -> str:
    if h >= 1:
        return f"{h:,.1f} h"
    return f"{h * 60:,.0f} min" if h * 60 >= 1 else f"{h * 3600:,.0f} s"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


class Plan:
    def __init__(self, p: dict, nodes: int):
        self.p, self.nodes = p, nodes
        self.images = float(p["corpus"]["images"])
        self.tars = math.ceil(self.images / p["corpus"]["per_tar"])
        self.m = p["measured"]

    def price(self, instance: str, node_hours: float) -> tuple[float, float]:
        od = self.p["instances"][instance]["on_demand"] * node_hours
        return od, od * self.p["spot_fraction"]

    def embed_rows(self) -> list[list[str]]:
        """(model, node type): rate per node = min(GPU forward, CPU decode); CPU-only for the default."""
        rows = []
        combos = [("default", "c6i.16xlarge")] + [(m, t) for m in ("sscd", "clip-vit-l-14")
                                                   for t in ("g5.12xlarge", "p4d.24xlarge")]
        for model, itype in combos:
            inst = self.p["instances"][itype]
            if model == "default":
                rate, bound = inst["vcpus"] * self.m["default_pipeline_img_s_per_vcpu"], "CPU (measured)"
            else:
                gpu = inst["gpus"] * self.p["gpu_img_s_estimate"][model][inst["gpu"]]
                decode = inst["vcpus"] * self.m["decode_224_img_s_per_vcpu"]
                rate, bound = (gpu, "GPU (estimate)") if gpu <= decode else (decode, "decode (measured)")
            node_h = self.images / rate / 3600
            od, spot = self.price(itype, node_h)
            gpu_h = node_h * inst["gpus"]
            rows.append([MODELS[model], itype, f"{rate:,.0f}", bound, f"{node_h:,.0f}",
                         f"{gpu_h:,.0f}" if gpu_h else "-", money(od), money(spot), hours(node_h / self.nodes)])
        return rows

    def index_rows(self) -> list[list[str]]:
        itype = "c6i.16xlarge"
        vcpus = self.p["instances"][itype]["vcpus"]
        plan = self.p["plan"]
        side_bytes = self.images * plan["index_side_file_bytes_per_vector"]
        read_h = side_bytes / (self.m["train_sample_read_mb_s_per_vcpu"] * 1e6) / vcpus / 3600
        add_h = self.images / self.m["index_add_vec_s_per_vcpu"] / vcpus / 3600
        shard_bytes = plan["shard_memory_gb"] * 2**30
        merge_h = (plan["index_shards"] * shard_bytes / (self.m["merge_mb_s"] * 1e6)
                   + plan["parts"] * self.m["merge_list_scan_s_per_part"]) / 3600
        train_h = self.m["train_hours_one_64_vcpu_node"]
        rows = []
        for step, node_h, wall in (
                (f"read the training sample ({plan['train_size'] / 1e6:,.1f}M rows; nearly every row group)",
                 read_h, read_h / self.nodes),
                (f"train (OPQ, two-level k-means to {plan['nlist']:,} lists, 1 node)", train_h, train_h),
                (f"add ({self.images:.3g} vectors)", add_h, add_h / self.nodes),
                (f"merge in RAM ({plan['index_shards']} shards of {plan['shard_memory_gb']} GiB)", merge_h,
                 merge_h / plan["index_shards"])):
            od, spot = self.price(itype, node_h)
            rows.append([step, itype, f"{node_h:,.1f}", money(od), money(spot), hours(wall)])
        return rows

    def search_nodes(self) -> tuple[str, int, int]:
        """(node type, nodes, index shards per node): a node holds as many shard actors as its RAM
        and its local disk (the shard's lists and its fp16 side files) allow."""
        plan = self.p["plan"]
        itype = plan["search_node"]
        inst = self.p["instances"][itype]
        shards = plan["index_shards"]
        side_gb = self.images * plan["index_side_file_bytes_per_vector"] / shards / 1e9
        by_ram = int(inst["memory_gib"] // (plan["shard_memory_gb"] * 1.25))  # a quarter for queries and the OS
        by_disk = int(inst["local_disk_gb"] // (side_gb + plan["shard_memory_gb"] * 2**30 / 1e9))
        per_node = max(1, min(by_ram, by_disk))
        return itype, math.ceil(shards / per_node), per_node

    def search_rows(self) -> list[list[str]]:
        plan, m = self.p["plan"], self.m
        itype, nodes, per_node = self.search_nodes()
        cores = nodes * self.p["instances"][itype]["vcpus"]
        queries = 1e4
        regions = queries * plan["regions_per_query"]
        index_bytes = self.images * (plan["index_list_bytes_per_vector"] + plan["index_side_file_bytes_per_vector"])
        codes = plan["nprobe"] * self.images / plan["nlist"]  # per region vector
        steps = [("start nodes, pull the image (assumption)", plan["node_start_minutes"] * 60),
                 ("copy index shards and their fp16 side files to local disk",
                  index_bytes / 1e9 / (nodes * plan["s3_gb_s_per_node"])),
                 (f"embed {queries:,.0f} queries, {plan['regions_per_query']} regions each (head, 32 vCPU)",
                  queries * m["query_embed_ms_per_query"] / 1e3 / 32),
                 (f"ANN scan, nprobe {plan['nprobe']}: {codes:,.0f} codes per region vector",
                  regions * codes * m["scan_ns_per_code"] / 1e9 / cores),
                 (f"exact rerank of {plan['rerank_depth']} per query in the shard actors",
                  queries * m["rerank_ms_per_query"] / 1e3 / cores),
                 (f"verification (pool of {plan['verify_pool']} per query)", queries * m["verify_cpu_s_per_query"] / cores)]
        rows = [[s, hours(sec / 3600)] for s, sec in steps]
        wall_h = sum(sec for _, sec in steps) / 3600
        od, spot = self.price(itype, nodes * wall_h)
        head_od, head_spot = self.price("m6i.8xlarge", wall_h)
        rows.append([f"**total**: {nodes} x {itype} ({per_node} index shards each) + head m6i.8xlarge",
                     f"{hours(wall_h)}; {money(od + head_od)} on demand, {money(spot + head_od)} with spot workers"])
        return rows

    def s3_rows(self) -> list[list[str]]:
        s3, plan = self.p["s3"], self.p["plan"]
        gets_per_tar = math.ceil(self.p["corpus"]["tar_mb"] / plan["read_block_mb"])
        shards = self.tars
        lists_bytes = self.images * plan["index_list_bytes_per_vector"]
        side_bytes = self.images * plan["index_side_file_bytes_per_vector"]
        rows = []
        ops = [("embed: read tars", gets_per_tar * self.tars, 0),
               ("embed: write shards (Parquet + stats)", 0, 2 * shards),
               ("index: read embeddings (footer + column, per shard)", 2 * shards, 0),
               ("index: write parts and fp16 side files", 0, 2 * plan["parts"]),
               ("index: merge (read parts, write shards)", plan["parts"], 2 * plan["index_shards"]),
               ("search of 10,000: copy shards and side files to local disk",
                math.ceil((lists_bytes + side_bytes) / (plan["read_block_mb"] << 20)), 0),
               ("search of 10,000: candidate pixels for verification", int(1e4 * plan["verify_pool"]), 0),
               ("search of 10,000: exact rerank by ranged reads instead (no local side files)",
                int(1e4 * plan["rerank_depth"]), 0)]
        for what, gets, puts in ops:
            cost = gets / 1000 * s3["get_per_1000"] + puts / 1000 * s3["put_per_1000"]
            rows.append([what, f"{gets:,}", f"{puts:,}", money(cost)])
        return rows

    def storage_rows(self) -> list[list[str]]:
        s3, plan = self.p["s3"], self.p["plan"]
        rows = []
        items = [(f"embeddings, {MODELS[m]}", self.images * b) for m, b in plan["embedding_bytes"].items()]
        items += [("index inverted lists", self.images * plan["index_list_bytes_per_vector"]),
                  ("index fp16 side files (exact rerank)", self.images * plan["index_side_file_bytes_per_vector"])]
        for what, nbytes in items:
            gb = nbytes / 1e9
            rows.append([what, f"{gb / 1000:,.1f} TB", money(gb * s3["storage_gb_month"]),
                         money(gb * s3["inter_region_gb"]), money(gb * s3["egress_internet_gb"])])
        return rows


def render(prices: dict, nodes: int) -> str:
    plan = Plan(prices, nodes)
    spot = f"{prices['spot_fraction']:.0%} of on-demand"
    out = [
        f"Prices: {prices['region']}, {prices['currency']}, example prices (assumptions); spot = {spot}.",
        "",
        f"**Embed pass** over {plan.images:.3g} images ({plan.tars:,} tars); wall time on {nodes} nodes:",
        "",
        table(["model", "node", "images/s per node", "bound by", "node-hours", "GPU-hours", "on-demand",
               "spot", f"wall, {nodes} nodes"], plan.embed_rows()),
        "",
        f"**Index build** ({prices['plan']['index_dim']}-d, `{prices['plan']['factory']}`), CPU figures derived "
        f"from measurements; wall time of the sample read and add on {nodes} nodes, merge shards in parallel:",
        "",
        table(["step", "node", "node-hours", "on-demand", "spot", "wall"], plan.index_rows()),
        "",
        "**One search of 10,000 generations** on a fresh cluster (index already built; every CPU step "
        "spread over the search nodes' cores):",
        "",
        table(["step", "time"], plan.search_rows()),
        "",
        "**S3 requests** (a pass = embed + index build; S3 to EC2 in the same region carries no "
        "transfer charge):",
        "",
        table(["what", "GET", "PUT", "cost"], plan.s3_rows()),
        "",
        "**S3 storage and moving it** (per month stored; once if copied to another region or downloaded "
        "to the internet):",
        "",
        table(["what", "size", "per month", "to another region", "to the internet"], plan.storage_rows()),
    ]
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prices", default=str(HERE / "prices.yaml"), help="prices and rates (YAML)")
    ap.add_argument("--nodes", type=int, default=16, help="worker nodes for the wall-time columns")
    args = ap.parse_args()
    print(render(yaml.safe_load(Path(args.prices).read_text()), args.nodes), end="")


if __name__ == "__main__":
    main()
