"""The on-disk formats: one module per kind of folder, each the only place that names its files.

* :mod:`pipeline.layout.embeddings` -- an embeddings folder (``_replica.json``, one Parquet file
  and one stats file per shard, the Parquet schema, the one shard writer);
* :mod:`pipeline.layout.index` -- an index folder (registry, trained index, parts and their
  ledger, fp16 side files, index shards, manifest);
* :mod:`pipeline.layout.devset` -- the development benchmark's package cache (downloaded and
  unpacked Debian packages) and the committed manifest of its images;
* :mod:`pipeline.layout.runs` -- a results folder of hive-partitioned runs (``run_id=...``) and
  the files of one run (run record, queries, matches, baseline, summary, histogram, gallery).

docs/ARCHITECTURE.md lists every file these modules define.
"""
