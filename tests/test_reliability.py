"""Unattended runs: storage faults are infrastructure (retried, never recorded as data), permanent
errors fail fast, locks keep two runs apart, failure limits set the exit code, a full disk
publishes nothing partial. Real Ray, real tars, the local S3 server behind a fault-injecting proxy."""
from __future__ import annotations

import collections
import errno
import io
import json
import os
import subprocess
import tarfile
import threading

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline.cli import app
from pipeline.config import EmbedConfig
from pipeline.embed import run_embed
from pipeline.errors import EXIT_LOCKED, EXIT_TOO_MANY_FAILURES, OutputLocked, RunIncomplete
from pipeline.layout.embeddings import EmbeddingsFolder
from pipeline.layout.lock import OutputLock
from pipeline.sample import make_sample_tars
from pipeline.storage import Folder, Storage
from pipeline.testing.faults import ZeroStream
from s3proxy import Fault, S3Proxy


@pytest.fixture(scope="module")
def proxied(s3_server):
    proxy = S3Proxy(s3_server.endpoint_url).start()
    # one attempt inside the client: replica's own retries are what is under test, and quick
    yield proxy, Storage(endpoint_url=proxy.url, region=s3_server.region, retries=1)
    proxy.stop()


def keys_of(folder: EmbeddingsFolder) -> list[str]:
    keys = []
    for shard in folder.complete_shards():
        with folder.open(folder.parquet_name(shard)) as f:
            keys += pq.read_table(f, columns=["key"]).column("key").to_pylist()
    return keys


def test_throttling_and_cut_bodies_are_retried_not_recorded(ray_local, proxied):
    """503 SlowDown, 500s and bodies cut mid-way on one tar: the run completes, every key once,
    no error recorded; the same faults on the object store never count as a truncated tar."""
    proxy, storage = proxied
    root = "s3://replica-test/faults-transient"
    make_sample_tars(f"{root}/tars", tars=3, per_tar=20, storage=storage)
    hits = collections.Counter()

    def fault(req):
        if req.method == "GET" and req.path.endswith("/00001.tar"):
            hits[req.path] += 1
            n = hits[req.path]
            if n <= 3:
                return Fault(status=503, code="SlowDown")
            if n == 4:
                return Fault(status=500, code="InternalError")
            if n == 5:
                return Fault(cut_after=5000)
        return None

    proxy.fault = fault
    try:
        out = EmbeddingsFolder(f"{root}/emb", storage)
        s = run_embed(EmbedConfig(input=[f"{root}/tars/*.tar"], output=out.url, s3=storage, batch_size=16))
    finally:
        proxy.fault = None
    assert proxy.faults_injected >= 5
    assert (s.shards_done, s.images, s.embedded, s.shard_errors, s.shards_failed) == (3, 60, 60, {}, {})
    keys = keys_of(out)
    assert len(keys) == len(set(keys)) == 60
    assert out.read_stats("00001").shard_error is None and out.failed_shards() == []


def test_a_tar_that_keeps_failing_stays_incomplete_and_the_rerun_finishes(ray_local, proxied):
    """503 on every GET of one tar: the others complete, that tar gets a failure record and no
    stats file (exit 1); after the outage --retry-failed embeds exactly it; nothing lost or doubled."""
    proxy, storage = proxied
    root = "s3://replica-test/faults-outage"
    make_sample_tars(f"{root}/tars", tars=3, per_tar=20, storage=storage)
    out = EmbeddingsFolder(f"{root}/emb", storage)
    cfg = EmbedConfig(input=[f"{root}/tars/*.tar"], output=out.url, s3=storage, batch_size=16, shard_attempts=2)
    proxy.fault = lambda req: Fault(status=503, code="SlowDown") if req.method == "GET" and req.path.endswith(
        "/00002.tar") else None
    try:
        s = run_embed(cfg)
    finally:
        proxy.fault = None
    assert s.shards_done == 2 and list(s.shards_failed) == ["00002"] and "Errno 16" in s.shards_failed["00002"]
    with pytest.raises(RunIncomplete, match="kept failing"):
        s.raise_for_failures(cfg.max_failed_fraction, cfg.max_failed_shards)
    assert out.complete_shards() == ["00000", "00001"] and out.failed_shards() == ["00002"]
    record = out.read_failure("00002")
    assert record.input.endswith("/00002.tar") and not record.permanent

    cfg.retry_failed = True
    again = run_embed(cfg)
    assert (again.shards_done, again.shards_skipped, again.embedded) == (1, 2, 20)
    assert out.failed_shards() == [] and out.complete_shards() == ["00000", "00001", "00002"]
    keys = keys_of(out)
    assert len(keys) == len(set(keys)) == 60


def test_access_denied_fails_fast_and_marks_nothing(ray_local, proxied):
    proxy, storage = proxied
    root = "s3://replica-test/faults-denied"
    make_sample_tars(f"{root}/tars", tars=4, per_tar=5, storage=storage)
    out = EmbeddingsFolder(f"{root}/emb", storage)
    proxy.fault = lambda req: Fault(status=403, code="AccessDenied") if req.method in ("GET", "HEAD") and \
        req.path.endswith(".tar") else None
    try:
        with pytest.raises(RunIncomplete, match="access denied"):
            run_embed(EmbedConfig(input=[f"{root}/tars/*.tar"], output=out.url, s3=storage, max_tars_in_flight=1))
    finally:
        proxy.fault = None
    assert out.complete_shards() == []  # nothing marked complete
    # a missing bucket is refused before any work, in one line
    r = CliRunner().invoke(app, ["embed", "-i", "s3://no-such-bucket-x/*.tar", "-o", f"{root}/emb2",
                                 "--s3-endpoint-url", storage.endpoint_url, "--s3-region", storage.region])
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: no input tar"), r.output


def test_a_truncated_tar_object_is_data(ray_local, tmp_path):
    """The object itself ends early: rows up to the break, a read_error row, a shard error; exit 3."""
    make_sample_tars(str(tmp_path / "tars"), tars=2, per_tar=10)
    cut = tmp_path / "tars" / "00001.tar"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    out = tmp_path / "emb"
    r = CliRunner().invoke(app, ["embed", "-i", str(tmp_path / "tars" / "*.tar"), "-o", str(out), "-q"])
    assert r.exit_code == EXIT_TOO_MANY_FAILURES, r.output
    assert "damaged" in r.output and "max-failed-shards" in r.output
    stats = EmbeddingsFolder(str(out)).read_stats("00001")
    assert "end" in stats.shard_error and stats.failed.get("read_error") == 1 and stats.seen < 10
    r = CliRunner().invoke(app, ["embed", "-i", str(tmp_path / "tars" / "*.tar"), "-o", str(out), "-q",
                                 "--max-failed-shards", "1", "--max-failed-fraction", "0.2"])
    assert r.exit_code == 0 and "(2 already complete)" in r.output


def test_failure_limits_set_the_exit_code(ray_local, tmp_path):
    from pipeline.sample import laion_sample, write_tar
    from pipeline.synthetic_images import scene

    good = [laion_sample(f"g{i}", scene(i), "ok", f"https://x/{i}") for i in range(18)]
    bad = [(f"b{i}", {"jpg": b"not an image", "txt": b"broken"}) for i in range(2)]
    write_tar(str(tmp_path / "tars" / "00000.tar"), good + bad)
    args = ["embed", "-i", str(tmp_path / "tars" / "*.tar"), "-o", str(tmp_path / "emb"), "-q"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == EXIT_TOO_MANY_FAILURES and "2 of 20 images failed" in r.output, r.output
    r = CliRunner().invoke(app, [*args, "--max-failed-fraction", "0.1"])
    assert r.exit_code == 0, r.output


def test_a_second_run_on_the_same_output_is_refused(tmp_path):
    folder = Folder(str(tmp_path / "out"))
    with OutputLock(folder, "replica embed"):
        with pytest.raises(OutputLocked, match="locked by `replica embed`"):
            OutputLock(folder, "replica index add").acquire()
        r = CliRunner().invoke(app, ["embed", "-i", str(tmp_path / "none.tar"), "-o", str(tmp_path / "out")])
        assert r.exit_code in (2, EXIT_LOCKED)  # no input is checked first; both refuse before work
    OutputLock(folder, "again").acquire().release()  # released: free again


def test_a_killed_writer_s_temporaries_are_removed_by_the_lock_holder(tmp_path):
    folder = Folder(str(tmp_path / "out"))
    folder.write_bytes("00000.parquet", b"done")
    orphan = tmp_path / "out" / "sub" / ".tmp-0123-00001.parquet"  # what a SIGKILL mid-write leaves
    orphan.parent.mkdir()
    orphan.write_bytes(b"half")
    with OutputLock(folder, "replica embed"):
        assert not orphan.exists()
        orphan.write_bytes(b"half")  # a writer of this run killed mid-write
    assert not orphan.exists() and (tmp_path / "out" / "00000.parquet").read_bytes() == b"done"


def test_a_stale_lock_is_broken_only_when_asked(tmp_path):
    folder = Folder(str(tmp_path / "out"))
    folder.write_json("_lock.json", {"owner": "x", "host": "another-host", "pid": 1, "command": "replica embed",
                                     "started_at": 0, "heartbeat_at": 0})
    with pytest.raises(OutputLocked, match="looks dead"):
        OutputLock(folder, "replica embed").acquire()
    lock = OutputLock(folder, "replica embed", break_lock=True).acquire()
    assert json.loads((tmp_path / "out" / "_lock.json").read_text())["owner"] == lock.info.owner
    lock.release()
    # a fresh heartbeat is never broken, even when asked
    live = OutputLock(folder, "replica embed", heartbeat_s=0.2).acquire()
    with pytest.raises(OutputLocked, match="wait for it"):
        OutputLock(folder, "other", break_lock=True).acquire()
    live.release()


def test_on_s3_exactly_one_of_two_concurrent_runs_gets_the_lock(s3_server):
    folder = Folder("s3://replica-test/lock-race", s3_server)
    barrier, won, refused = threading.Barrier(8), [], []

    def contend(i: int) -> None:
        barrier.wait()
        try:
            won.append(OutputLock(folder, f"run {i}", heartbeat_s=0.3).acquire())
        except OutputLocked:
            refused.append(i)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 7
    import time

    time.sleep(0.8)  # heartbeats rewrite it conditionally on its ETag
    assert not won[0].lost
    won[0].release()
    assert not folder.exists("_lock.json")


def test_a_write_that_fails_part_way_publishes_nothing(tmp_path, monkeypatch):
    """ENOSPC after a few bytes: no Parquet file, no temporary left, no completion marker; then it works."""
    import fsspec.implementations.local as local

    from pipeline.layout.embeddings import ShardStats
    from pipeline.testing.vectors import MixtureSource, identity, shard_table

    folder = EmbeddingsFolder(str(tmp_path / "emb"))
    table = shard_table("s", MixtureSource(16, latent=4, clusters=3).batch(0, 500), identity(16))
    real_write = local.LocalFileOpener.write
    written = collections.Counter()

    def full_disk(self, data):
        written[self.path] += len(data)
        if written[self.path] > 2000:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(local.LocalFileOpener, "write", full_disk)
    with pytest.raises(OSError, match="No space left"):
        folder.write_shard(table, ShardStats(shard="s", seen=500, embedded=500))
    assert sorted(p.name for p in (tmp_path / "emb").iterdir()) == []  # no partial file, no marker
    monkeypatch.setattr(local.LocalFileOpener, "write", real_write)
    folder.write_shard(table, ShardStats(shard="s", seen=500, embedded=500))
    assert folder.complete_shards() == ["s"] and pq.read_table(folder.parquet_url("s")).num_rows == 500


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_disk_leaves_shards_incomplete_and_the_rerun_finishes(ray_local, tmp_path):
    """A real 96 KiB tmpfs as the output: some shards do not fit, none is half-written or marked."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        make_sample_tars(str(tmp_path / "tars"), tars=6, per_tar=25)
        cfg = EmbedConfig(input=[str(tmp_path / "tars" / "*.tar")], output=str(mount / "emb"), shard_attempts=1)
        s = run_embed(cfg)
        assert s.shards_failed and any("No space left" in e for e in s.shards_failed.values())
        folder = EmbeddingsFolder(str(mount / "emb"))
        done = folder.complete_shards()
        assert not [p for p in (mount / "emb").iterdir() if p.name.startswith(".tmp-")]
        for name in (p.name for p in (mount / "emb").glob("*.parquet")):
            assert name[: -len(".parquet")] in done  # every published Parquet file is complete
    finally:
        subprocess.run(["umount", str(mount)])
    cfg.output = str(tmp_path / "emb")  # "more space": the same run, elsewhere, completes
    assert run_embed(cfg).embedded == 150


def test_an_oversize_member_is_a_row_and_never_read_into_memory(tmp_path):
    """A 256 MiB member with max_member_bytes 1 MiB: an error row; allocations stay small."""
    import tracemalloc

    from pipeline.tars import TarReadResult, iter_samples

    path = tmp_path / "big.tar"
    with tarfile.open(path, "w") as tf:
        info = tarfile.TarInfo("huge.jpg")
        info.size = 256 << 20
        tf.addfile(info, ZeroStream(info.size))
        small = tarfile.TarInfo("after.txt")
        small.size = 5
        tf.addfile(small, io.BytesIO(b"hello"))
    result = TarReadResult()
    tracemalloc.start()
    samples = list(iter_samples(str(path), result=result, max_member_bytes=1 << 20))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert [s.key for s in samples] == ["huge", "after"] and samples[0].members["jpg"].data is None
    assert samples[1].caption() == "hello" and result.skipped == {"oversize_image": 1} and result.error is None
    assert peak < 32 << 20, peak  # the stream skipped it block by block


