"""The on-disk formats: one module per kind of folder, each the only place that names its files.

* :mod:`pipeline.layout.embeddings` -- an embeddings folder (``_replica.json``, one Parquet file
  and one stats file per shard, the Parquet schema, the one shard writer);
* :mod:`pipeline.layout.index` -- an index folder (registry, trained index, parts and their
  ledger, fp16 side files, index shards, manifest);
* :mod:`pipeline.layout.devset` -- the development benchmark's package cache (downloaded and
  unpacked Debian packages) and the committed manifest of its images;
* :mod:`pipeline.layout.runs` -- a results folder of hive-partitioned runs (``run_id=...``) and
  the files of one run (run record, queries, matches, baseline, summary, histogram, gallery, a
  pipeline run's record and query inputs);
* :mod:`pipeline.layout.ingest` -- a tar folder written by ingest (img2dataset's tars, per-URL
  tables and stats, replica's ledger of URL lists);
* :mod:`pipeline.layout.captions` -- a caption-counts folder (counts per hash bucket, the partial
  counts of groups of embedding shards, the record written last);
* :mod:`pipeline.layout.lock` -- the lock of an output folder.

docs/ARCHITECTURE.md lists every file these modules define.
"""
from __future__ import annotations

from dataclasses import fields
from typing import Any


def known_fields(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    """The keys of ``d`` that are fields of dataclass ``cls``: records written by newer versions still load."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}
