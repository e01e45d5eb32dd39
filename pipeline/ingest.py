"""Ingest stage: LAION-style URL lists -> WebDataset tars that ``replica embed`` reads, by img2dataset.

img2dataset does the work of each shard: its reader splits a URL list into shards of
``samples_per_shard`` URLs, its downloader fetches them (``threads`` at once, ``timeout`` per
connection or read), resizes with its resizer, hashes the downloaded bytes and writes one
WebDataset tar (``{key}.jpg``, ``{key}.txt``, ``{key}.json``), one Parquet row per URL and a
``{shard}_stats.json`` (pipeline/layout/ingest.py). A dead link, an error status, a timeout, a
body that is not an image are rows with a status and counts in the stats, never a failed shard.

What replica adds around it:

* **Shard numbers that last.** img2dataset numbers shards by position in the lists it is given,
  so adding a list that sorts first would renumber every shard after it. replica gives each URL
  list a range of shard numbers once and records it in ``_replica/ingest.json``; a list added on
  a later run gets the next numbers, and a list that changed under the same name is refused.
* **Resume.** A shard is complete when its stats file exists (img2dataset's own incremental
  rule); a rerun skips complete lists without reading them and downloads only missing shards.
* **Ray, bounded and retried.** Each shard is a Ray task driven by :func:`pipeline.ray_util.run_bounded`
  (img2dataset's ``ray_distributor`` submits every shard at once, retries none and ignores a
  shard's failure; its multiprocessing distributor stays on one machine). A shard whose task
  fails on storage errors is retried, then left incomplete for the next run (exit code 1).
* **Settings checked before work**, the output locked, stats surfaced (downloaded, failed by
  reason, bytes, rate) and the offline settings img2dataset needs set here, not by the user.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import io
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from pipeline.config import IngestConfig
from pipeline.errors import ConfigError, ReplicaError, RunIncomplete, TooManyFailures
from pipeline.layout.ingest import (
    IngestFolder,
    IngestInfo,
    ShardCounts,
    UrlList,
    check_same_settings,
    list_fingerprint,
    list_urls,
)
from pipeline.progress import NullProgress, Progress
from pipeline.storage import Folder, basename, filesystem, fsspec_defaults, is_local, local_path

#: list formats img2dataset reads, by file name ending (longest first)
FORMATS = {".csv.gz": "csv.gz", ".tsv.gz": "tsv.gz", ".jsonl.gz": "jsonl.gz", ".json.gz": "json.gz",
           ".txt.gz": "txt.gz", ".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl",
           ".json": "json", ".txt": "txt"}
#: settings that shape the tars: a folder holds tars made with one value of each
SHAPING = ("image_size", "resize_mode", "resize_only_if_bigger", "skip_reencode", "encode_format", "encode_quality",
           "min_image_size", "compute_hash", "samples_per_shard", "shard_digits")


def img2dataset():
    """img2dataset's modules, imported with the settings an offline batch job needs."""
    # albumentations (imported by img2dataset's resizer) asks PyPI for a newer version on import;
    # img2dataset imports wandb, which replica never logs to (download()'s enable_wandb is not used)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    import img2dataset.downloader as downloader
    import img2dataset.reader as reader
    import img2dataset.resizer as resizer
    import img2dataset.writer as writer

    return downloader, reader, resizer, writer


def img2dataset_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("img2dataset")
    except PackageNotFoundError:
        return None


# --------------------------------------------------------------------------- plan


@dataclass
class ListPlan:
    url: str
    input_format: str
    size: int
    etag: str | None
    #: the ledger's entry when the list was ingested before
    recorded: UrlList | None


@dataclass
class IngestPlan:
    cfg: IngestConfig
    output: IngestFolder
    lists: list[ListPlan]
    settings: dict[str, Any]


def format_of_name(url: str) -> str | None:
    name = basename(url).lower()
    return next((fmt for suffix, fmt in FORMATS.items() if name.endswith(suffix)), None)


def list_format(url: str, wanted: str) -> str:
    if wanted != "auto":
        return wanted
    fmt = format_of_name(url)
    if fmt is not None:
        return fmt
    raise ConfigError(f"cannot tell the format of URL list {url!r} from its name: set --input-format "
                      f"({', '.join(sorted(set(FORMATS.values())))})")


def list_columns(url: str, fmt: str, storage) -> list[str] | None:
    """Column names of a URL list, reading only its header (None: not checkable cheaply)."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    fs, path = filesystem(url, storage)
    gz = "gzip" if fmt.endswith(".gz") else None
    base = fmt.removesuffix(".gz")
    if base == "txt":
        return ["url"]
    if base == "parquet":
        with fs.open(path, "rb") as f:
            return pq.read_schema(f).names
    if base in ("csv", "tsv"):
        with fs.open(path, "rb", compression=gz) as f:
            parse = pcsv.ParseOptions(delimiter="\t" if base == "tsv" else ",")
            return pcsv.open_csv(f, parse_options=parse).schema.names
    if base == "jsonl":
        import json

        with fs.open(path, "rb", compression=gz) as f:
            first = f.readline()
        try:
            row = json.loads(first) if first.strip() else {}
        except ValueError:
            raise ConfigError(f"URL list {url!r} is not JSON Lines: its first line does not parse") from None
        return list(row) if isinstance(row, dict) else None
    return None


def settings_of(cfg: IngestConfig) -> dict[str, Any]:
    return {name: getattr(cfg, name) for name in SHAPING}


def _absolute(url: str) -> str:
    """Local paths made absolute: Ray workers run in another directory than the driver."""
    return os.path.abspath(local_path(url)) if is_local(url) else url


def plan(cfg: IngestConfig) -> IngestPlan:
    """Check everything that can be checked before a single URL is fetched; raise ConfigError if not."""
    if not cfg.input:
        raise ConfigError("no input given: pass --input with URL list files (Parquet/CSV/TSV/JSONL/TXT), a glob or a folder")
    if not cfg.output:
        raise ConfigError("no output given: pass --output with a folder URL for the tars")
    for name in ("image_size", "samples_per_shard", "threads", "shard_attempts"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if not 1 <= cfg.shard_digits <= 12:
        raise ConfigError(f"shard_digits must be between 1 and 12, got {cfg.shard_digits}")
    if cfg.timeout <= 0:
        raise ConfigError(f"timeout must be > 0 seconds, got {cfg.timeout}: an unbounded wait would hold a shard forever")
    if cfg.retries < 0 or cfg.min_image_size < 0 or cfg.max_shards_in_flight < 0 or cfg.cpus_per_task <= 0:
        raise ConfigError("retries, min_image_size and max_shards_in_flight must be >= 0 and cpus_per_task > 0")
    top = 9 if cfg.encode_format == "png" else 100
    if not 0 <= cfg.encode_quality <= top:
        raise ConfigError(f"encode_quality must lie in [0, {top}] for {cfg.encode_format}, got {cfg.encode_quality}")
    if not 0 <= cfg.max_failed_fraction <= 1:
        raise ConfigError(f"max_failed_fraction must lie in [0, 1], got {cfg.max_failed_fraction}")
    if "/" in cfg.url_column or not cfg.url_column:
        raise ConfigError("url_column must name a column of the URL lists")

    output = IngestFolder(_absolute(cfg.output), cfg.s3, cfg.shard_digits)
    try:
        info = output.read_info()
    except ReplicaError:
        raise
    except Exception as exc:  # noqa: BLE001 - unreadable output: the user must look at it
        raise ConfigError(f"cannot read {output.url!r}: {type(exc).__name__}: {exc}") from exc
    settings = settings_of(cfg)
    if info is not None:
        check_same_settings(info.settings, settings, f"output {output.url!r}")
    elif output.complete_shards():
        raise ConfigError(f"{output.url!r} holds tars that `replica ingest` did not write (no ledger): "
                          "use a new output folder")

    try:
        # in a folder, files of other formats (a README, a manifest) are not lists
        wanted = (lambda u: format_of_name(u) is not None) if cfg.input_format == "auto" else \
            (lambda u: basename(u).lower().endswith("." + cfg.input_format))
        urls = list_urls([_absolute(u) for u in cfg.input], cfg.s3, wanted)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot list input {cfg.input}: {exc}") from exc
    if not urls:
        raise ConfigError(f"no URL list at {', '.join(cfg.input)!r}: check --input")
    lists = []
    for url in urls:
        fmt = list_format(url, cfg.input_format)
        size, etag = list_fingerprint(url, cfg.s3)
        recorded = info.find(url) if info else None
        if recorded is not None:
            if recorded.size != size or (recorded.etag and etag and recorded.etag != etag):
                raise ConfigError(f"URL list {url!r} changed since it was ingested ({recorded.size:,} -> {size:,} bytes): "
                                  "its shard numbers would no longer match; give the new list a new name")
        else:
            _check_columns(url, fmt, cfg)
        lists.append(ListPlan(url, fmt, size, etag, recorded))
    try:
        output.check_writable()
    except Exception as exc:  # noqa: BLE001 - any failure to write means the same to the user
        raise ConfigError(f"cannot write to output {cfg.output!r}: {type(exc).__name__}: {exc}") from exc
    return IngestPlan(cfg, output, lists, settings)


def _check_columns(url: str, fmt: str, cfg: IngestConfig) -> None:
    try:
        names = list_columns(url, fmt, cfg.s3)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - a list that cannot be read is a config error
        raise ConfigError(f"cannot read URL list {url!r} as {fmt}: {type(exc).__name__}: {exc}") from exc
    if names is None or fmt.startswith("txt"):
        return
    wanted = [("url_column", cfg.url_column)] + ([("caption_column", cfg.caption_column)] if cfg.caption_column else [])
    wanted += [("columns", c) for c in cfg.columns]
    for setting, column in wanted:
        if column not in names:
            hint = " (or --caption-column '' for no captions)" if setting == "caption_column" else ""
            raise ConfigError(f"URL list {url!r} has no column {column!r} for {setting} (its columns: "
                              f"{', '.join(names)}){hint}")


# --------------------------------------------------------------------------- per-shard work


@dataclass(frozen=True)
class ShardJob:
    """What a shard task needs to build img2dataset's downloader in the worker."""

    folder: IngestFolder
    cfg: IngestConfig
    column_list: tuple[str, ...]


@dataclass
class ShardResult:
    number: int
    counts: ShardCounts
    tar_bytes: int


def build_downloader(job: ShardJob):
    """img2dataset's resizer and downloader for one folder's settings."""
    downloader, _, resizer, writer = img2dataset()
    cfg = job.cfg
    resize = resizer.Resizer(
        image_size=cfg.image_size, resize_mode=cfg.resize_mode, resize_only_if_bigger=cfg.resize_only_if_bigger,
        encode_quality=cfg.encode_quality, encode_format=cfg.encode_format, skip_reencode=cfg.skip_reencode,
        min_image_size=cfg.min_image_size)
    return downloader.Downloader(
        sample_writer_class=writer.WebDatasetSampleWriter, resizer=resize, thread_count=cfg.threads,
        save_caption=bool(cfg.caption_column),
        # EXIF is not read downstream and would bloat every sample's json
        extract_exif=False, output_folder=job.folder.url, column_list=list(job.column_list), timeout=cfg.timeout,
        number_sample_per_shard=cfg.samples_per_shard, oom_shard_count=cfg.shard_digits,
        compute_hash=None if cfg.compute_hash == "none" else cfg.compute_hash, verify_hash_type=None,
        encode_format=cfg.encode_format, retries=cfg.retries, user_agent_token=cfg.user_agent_name or None,
        disallowed_header_directives=list(cfg.disallowed_header_directives))


def download_shard(job: ShardJob, number: int, pending: str) -> ShardResult:
    """Download one shard with img2dataset (a Ray task). Raises only on infrastructure errors."""
    with fsspec_defaults(job.folder.storage):
        # download_shard, not __call__: __call__ swallows the error, and the driver must see it to retry
        build_downloader(job).download_shard((number, pending))
        return ShardResult(number, job.folder.read_counts(number), job.folder.tar_bytes(number))


# --------------------------------------------------------------------------- failure reasons

_REASONS: list[tuple[str, str]] = [
    (r"infinite loop", "redirect_loop"),
    (r"x-robots-tag", "opted_out"),
    (r"incompleteread|incomplete read", "incomplete_body"),
    (r"timed out|timeout", "timeout"),
    (r"name or service not known|nodename nor servname|name resolution|getaddrinfo", "dns"),
    (r"certificate|ssl", "ssl"),
    (r"connection refused|connection reset|connection aborted|remote end closed|broken pipe", "connection"),
    (r"unknown url type|no host given", "bad_url"),
    (r"image decoding error|cannot identify image", "decode_error"),
    (r"image too small", "too_small"),
    (r"aspect ratio too large", "aspect_ratio"),
    (r"image area too large", "too_large"),
    (r"hash mismatch", "hash_mismatch"),
]


def failure_reason(message: str) -> str:
    """img2dataset's error message for a URL -> a reason to count by ("http_404", "timeout", ...)."""
    low = message.lower()
    for pattern, reason in _REASONS[:2]:  # before the status code: both come as HTTP errors
        if re.search(pattern, low):
            return reason
    m = re.match(r"http error (\d{3})", low)
    if m:
        return f"http_{m.group(1)}"
    for pattern, reason in _REASONS[2:]:
        if re.search(pattern, low):
            return reason
    return "other"


# --------------------------------------------------------------------------- driver


@dataclass
class IngestSummary:
    lists: int
    lists_skipped: int = 0
    shards_total: int = 0
    shards_skipped: int = 0
    shards_done: int = 0
    #: URLs tried this run, images stored, and URLs that failed
    urls: int = 0
    downloaded: int = 0
    failed_to_download: int = 0
    failed_to_resize: int = 0
    #: failed URLs by reason ("http_404": 3, "timeout": 1, "not_an_image": 2, ...)
    failed: dict[str, int] = field(default_factory=dict)
    #: bytes of the tars written this run
    bytes: int = 0
    seconds: float = 0.0
    #: shards that kept failing for infrastructure reasons: incomplete, a rerun redoes them
    shards_failed: dict[str, str] = field(default_factory=dict)
    #: the tars written this run
    new_tars: list[str] = field(default_factory=list)

    @property
    def urls_per_s(self) -> float:
        return self.urls / self.seconds if self.seconds else 0.0

    @property
    def images_per_s(self) -> float:
        return self.downloaded / self.seconds if self.seconds else 0.0

    @property
    def bytes_per_s(self) -> float:
        return self.bytes / self.seconds if self.seconds else 0.0

    @property
    def failed_fraction(self) -> float:
        return (self.failed_to_download + self.failed_to_resize) / self.urls if self.urls else 0.0

    def to_json(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {**asdict(self), "urls_per_s": round(self.urls_per_s, 2), "images_per_s": round(self.images_per_s, 2),
                "bytes_per_s": round(self.bytes_per_s, 1)}

    def raise_for_failures(self, max_failed_fraction: float) -> None:
        """Exit code 1 when shards are left incomplete, 3 when failed URLs exceed the limit."""
        if self.shards_failed:
            first, why = next(iter(sorted(self.shards_failed.items())))
            raise RunIncomplete(f"{len(self.shards_failed)} shard(s) kept failing and stay incomplete (first: {first}: "
                                f"{why}); rerun the same command to download them")
        if self.failed_fraction > max_failed_fraction:
            top = ", ".join(f"{k}={v}" for k, v in Counter(self.failed).most_common(4))
            raise TooManyFailures(f"{self.failed_to_download + self.failed_to_resize} of {self.urls} URLs failed "
                                  f"({self.failed_fraction:.1%}, limit {max_failed_fraction:.1%}; {top}): see the "
                                  "shards' stats; raise --max-failed-fraction to accept them")


def run_ingest(cfg: IngestConfig, progress: Progress | None = None,
               on_shard_done: Callable[[ShardResult], None] | None = None) -> IngestSummary:
    """Validate, lock the output, download every missing shard of every list, return the totals.

    Call :meth:`IngestSummary.raise_for_failures` afterwards for the exit-code verdict.
    """
    from pipeline.layout.lock import OutputLock

    progress = progress or NullProgress()
    p = plan(cfg)
    with OutputLock(p.output.own(), "replica ingest", break_lock=cfg.break_lock, stale_after_s=cfg.lock_stale_after_s):
        return _ingest_locked(p, progress, on_shard_done)


def _split(p: IngestPlan, lp: ListPlan, start: int, done: set[int]) -> tuple[list[tuple[int, str]], list[str]]:
    """img2dataset's reader: the list's missing shards written as pending URL files, (number, file) each,
    and the columns each shard carries."""
    _, reader, _, _ = img2dataset()
    cfg = p.cfg
    r = reader.Reader(
        lp.url, lp.input_format, cfg.url_column, cfg.caption_column or None, None, None, list(cfg.columns) or None,
        cfg.samples_per_shard, done, p.output.pending_url(), start_shard_id=start)
    with contextlib.redirect_stdout(io.StringIO()):  # its prints are written for a terminal; progress says it here
        return list(r), r.column_list


def _ingest_locked(p: IngestPlan, progress: Progress, on_shard_done) -> IngestSummary:
    from pipeline.ray_util import connect

    cfg, out = p.cfg, p.output
    ray = connect(cfg.ray.address)
    started = time.time()
    info = out.read_info()
    if info is None:  # a new folder: its settings are fixed from now on
        info = IngestInfo(settings=p.settings, img2dataset=img2dataset_version())
        out.write_info(info)
    pending = Folder(out.pending_url(), cfg.s3)
    pending.fs.makedirs(pending.path, exist_ok=True)  # img2dataset's reader writes into it without creating it
    done = out.complete_shards()
    summary = IngestSummary(lists=len(p.lists))
    for lp in p.lists:
        rec = lp.recorded
        if rec is not None and all(n in done for n in rec.shard_range):
            summary.lists_skipped += 1
            summary.shards_total += rec.shards
            summary.shards_skipped += rec.shards
            continue
        with fsspec_defaults(cfg.s3), progress.step(f"splitting {basename(lp.url)} into shards of "
                                                      f"{cfg.samples_per_shard:,} URLs"):
            if rec is None:
                start = max(info.next_shard(), max(done, default=-1) + 1)
                shards, columns = _split(p, lp, start, set())
                if [n for n, _ in shards] != list(range(start, start + len(shards))):
                    raise ReplicaError(f"img2dataset numbered the shards of {lp.url} unexpectedly")
                if start + len(shards) > 10 ** cfg.shard_digits:
                    raise ConfigError(f"shard numbers would pass {10 ** cfg.shard_digits - 1}: use a new output with a "
                                      "larger --shard-digits")
                rec = UrlList(url=lp.url, size=lp.size, etag=lp.etag, input_format=lp.input_format, first_shard=start,
                              shards=len(shards), url_column=cfg.url_column, caption_column=cfg.caption_column,
                              columns=list(cfg.columns), added_at=dt.datetime.now(dt.timezone.utc).isoformat())
                info.lists.append(rec)
                out.write_info(info)  # the range is the list's from now on, whatever happens next
            else:
                shards, columns = _split(p, lp, rec.first_shard, done)
                if any(n not in rec.shard_range for n, _ in shards):
                    raise ReplicaError(f"img2dataset numbered the shards of {lp.url} outside its range {rec.shard_range}")
        summary.shards_total += rec.shards
        summary.shards_skipped += rec.shards - len(shards)
        _download(ray, p, ShardJob(out, cfg, tuple(columns)), shards, summary, progress, on_shard_done)
        done |= {n for n, _ in shards} - {int(s) for s in summary.shards_failed}
        summary.seconds = time.time() - started
    if not summary.shards_failed and pending.local:  # every pending URL file was consumed
        with contextlib.suppress(OSError):
            os.rmdir(pending.path)
    summary.seconds = time.time() - started
    return summary


def _download(ray, p: IngestPlan, job: ShardJob, shards: list[tuple[int, str]], summary: IngestSummary,
              progress: Progress, on_shard_done) -> None:
    from pipeline.metrics import StageMetrics
    from pipeline.ray_util import (
        CachedValue,
        RetryPolicy,
        cluster_cpus,
        is_infrastructure,
        run_bounded,
        task_error_message,
    )

    cfg = p.cfg
    task = ray.remote(download_shard).options(num_cpus=cfg.cpus_per_task)
    failed: Counter = Counter(summary.failed)
    metrics = StageMetrics("ingest")
    started = time.time()
    urls_before, images_before = summary.urls, summary.downloaded
    slots = CachedValue(lambda: max(1, int(cluster_cpus() // cfg.cpus_per_task)))

    with progress.task("ingest", len(shards), "shards") as bar:
        def note() -> str:
            rate = (summary.downloaded - images_before) / max(1e-9, time.time() - started)
            return (f"{rate:,.0f} img/s, {summary.downloaded:,} stored, "
                    f"{summary.failed_to_download + summary.failed_to_resize:,} URLs failed")

        def record(shard: tuple[int, str], result: ShardResult) -> None:
            c = result.counts
            summary.shards_done += 1
            summary.urls += c.count
            summary.downloaded += c.successes
            summary.failed_to_download += c.failed_to_download
            summary.failed_to_resize += c.failed_to_resize
            reasons: Counter = Counter()
            for message, n in c.status_dict.items():
                if message != "success":
                    reasons[failure_reason(message)] += n
            failed.update(reasons)
            summary.failed = dict(failed)
            summary.bytes += result.tar_bytes
            summary.new_tars.append(job.folder.tar_url(result.number))
            metrics.unit_done(c.count, dict(reasons), result.tar_bytes,
                              (summary.urls - urls_before) / max(1e-9, time.time() - started))
            bar.advance(note=note())
            if on_shard_done:
                on_shard_done(result)

        def give_up(shard: tuple[int, str], exc: BaseException) -> None:
            message = task_error_message(exc)
            summary.shards_failed[job.folder.shard_name(shard[0])] = message
            metrics.failure("shard_failed")
            bar.advance(note=note())
            if isinstance(getattr(exc, "cause", None) or exc, PermissionError):  # run-wide: every shard would fail
                raise RunIncomplete(f"access denied writing shard {job.folder.shard_name(shard[0])} to "
                                    f"{job.folder.url}: {message}; check the credentials")

        run_bounded(
            shards,
            lambda shard, _actor: task.remote(job, shard[0], shard[1]),
            record,
            window=lambda: cfg.max_shards_in_flight or slots(),
            retry=RetryPolicy(max_attempts=cfg.shard_attempts, retry_if=is_infrastructure, backoff_s=2.0),
            on_failure=give_up,
        )
