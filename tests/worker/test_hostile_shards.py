"""Hostile shards and forged options against a REAL ``embedjob worker`` subprocess (Redis, SeaweedFS):
a shard whose first member has a 400 MiB GNU long name, and one with four 250 MiB captions (both
about 2 MB gzipped, decompressed by the worker into its spool, junk dropped unstored) are embedded: their good
samples are rows, the bad ones recorded in the manifest, and the worker's peak RSS grows by less
than 200 MiB (``/proc/<pid>/status``: VmHWM after them minus VmHWM after a normal shard). Before
the caps, tarfile read a long name whole (803 MiB for this one, measured in-process) and every
caption was kept (1,256 MiB)."""

from __future__ import annotations

import json
import os
import tarfile
import time
import uuid
import zlib
from collections.abc import Iterator

import pytest

from embedjob.contract import EmbedOptions, ShardTask
from embedjob.progress import ProgressStore, redis_client
from embedjob.storage import Storage, s3_client
from tests.shards import encode, rgb
from tests.worker.celery_workers import Workers, send_task, wait_state


def _header(name: str, size: int, type_: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.mtime = size, type_, 0
    return info.tobuf(format=tarfile.GNU_FORMAT)


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 512)


def _filled(byte: bytes, n: int) -> Iterator[bytes]:
    block = byte * (1 << 20)
    while n > 0:
        yield block[: min(n, len(block))]
        n -= len(block)


def _member(name: str, data: bytes) -> Iterator[bytes]:
    yield _header(name, len(data))
    yield data + _pad(len(data))


def _gzip(chunks: Iterator[bytes]) -> bytes:
    """One gzip stream (what tarfile's "r|*" detects), compressed as it is made: the test never holds
    the tar itself."""
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    return b"".join([*(c.compress(ch) for ch in chunks), c.flush()])


def _jpeg(seed: int) -> bytes:
    return encode(rgb(40, 32, seed=seed), "JPEG")


def long_name_shard() -> bytes:
    def chunks() -> Iterator[bytes]:
        name = 400 << 20
        yield _header("././@LongLink", name, tarfile.GNUTYPE_LONGNAME)  # GNU tar's long-name record
        yield from _filled(b"a", name)
        yield _pad(name)
        yield from _member("bad0.jpg", _jpeg(0))  # the member that long name belongs to
        for i in range(1, 4):
            yield from _member(f"good{i}.jpg", _jpeg(i))
            yield from _member(f"good{i}.txt", f"caption {i}".encode())
        yield b"\0" * 1024

    return _gzip(chunks())


def big_captions_shard() -> bytes:
    def chunks() -> Iterator[bytes]:
        for i in range(4):
            yield from _member(f"big{i}.jpg", _jpeg(10 + i))
            yield _header(f"big{i}.txt", 250 << 20)
            yield from _filled(b"c", 250 << 20)
            yield _pad(250 << 20)
        for i in range(2):
            yield from _member(f"good{i}.jpg", _jpeg(20 + i))
            yield from _member(f"good{i}.json", json.dumps({"i": i}).encode())
        yield b"\0" * 1024

    return _gzip(chunks())


def _peak_rss_mib(pid: int) -> float:
    status = open(f"/proc/{pid}/status").read()
    line = next(x for x in status.splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


@pytest.mark.slow  # about 50 s: 1.4 GB of tar through the worker
def test_hostile_shards_are_embedded_and_recorded_with_bounded_worker_memory(redis_url, s3_env, bucket,
                                                                             tiny_clip_dir, tmp_path):
    client = s3_client()
    t0 = time.monotonic()
    bodies = {"hostile/long.tar": long_name_shard(), "hostile/captions.tar": big_captions_shard()}
    normal = [(f"n{i}.jpg", _jpeg(30 + i)) for i in range(3)]
    bodies["hostile/normal.tar"] = _gzip(c for name, data in normal for c in _member(name, data))
    print(f"\nshards made in {time.monotonic() - t0:.1f} s")
    for key, body in bodies.items():
        assert len(body) < 2 << 20, (key, len(body))  # what an attacker uploads: about 1 MB each
        client.put_object(Bucket=bucket, Key=key, Body=body)
    env = {**os.environ, **s3_env, "EMBEDJOB_REDIS_URL": redis_url, "EMBEDJOB_LEASE_SECONDS": "10",
           "OMP_NUM_THREADS": "1"}
    job = f"job-{uuid.uuid4().hex[:6]}"
    out = f"s3://{bucket}/hostile/out"
    model = {"name": "x", "revision": None, "path": str(tiny_clip_dir)}
    options = {**EmbedOptions().__dict__, "device": "cpu", "dtype": "float32", "num_threads": 1}

    def task(stem: str) -> ShardTask:
        return ShardTask(job=job, shard=f"s3://{bucket}/hostile/{stem}.tar", stem=stem, output=out, model=model,
                         options=options)

    workers = Workers(env, f"q-{uuid.uuid4().hex[:8]}", tmp_path)
    store = ProgressStore(redis_client(redis_url), job)
    try:
        proc = workers.start("w1")
        send_task(env, workers.queue, task("normal"))
        wait_state(store, "normal", "succeeded", 180)
        before = _peak_rss_mib(proc.pid)
        for stem in ("long", "captions"):
            started = time.monotonic()
            send_task(env, workers.queue, task(stem))
            wait_state(store, stem, "succeeded", 180)
            print(f"{stem}: {time.monotonic() - started:.1f} s in the worker")
        after = _peak_rss_mib(proc.pid)
    finally:
        workers.stop_all()
    storage = Storage()
    long_m = json.loads(storage.read_bytes(f"{out}/_manifests/long.json"))
    caps_m = json.loads(storage.read_bytes(f"{out}/_manifests/captions.json"))
    print(f"\nworker peak RSS {before:.0f} MiB after a normal shard, {after:.0f} MiB after the hostile ones "
          f"(+{after - before:.0f} MiB); long-name shard {len(bodies['hostile/long.tar']):,} bytes gzipped, "
          f"captions shard {len(bodies['hostile/captions.tar']):,}")
    assert after - before < 200, (before, after)
    assert long_m["counts"]["embedded"] == 3 and caps_m["counts"]["embedded"] == 2, (long_m["counts"], caps_m["counts"])
    text = json.dumps(long_m)
    assert "GNU long name of 419430400 bytes" in text and "bad0" in text
    text = json.dumps(caps_m)
    assert text.count("too large (262144000 > 1048576 bytes") == 4
