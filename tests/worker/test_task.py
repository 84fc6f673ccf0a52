"""The Celery task (embedjob.worker.runtime.task) against REAL Redis, REAL SeaweedFS and REAL
`embedjob worker` subprocesses: the shard run, its leases and heartbeat, shutdown and redelivery."""

from __future__ import annotations

import io
import json
import os
import signal
import time
import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest

from embedjob.contract import EmbedOptions, ShardTask
from embedjob.layout import shard_outputs
from embedjob.progress import ProgressStore, redis_client
from embedjob.storage import Storage
from tests.shards import ShardSpec, simple_shard
from tests.worker.celery_workers import Workers, put_shard, send_task, wait_state


@pytest.fixture()
def env(redis_url, s3_env):
    e = dict(os.environ)
    e.update(s3_env)
    e.update(EMBEDJOB_REDIS_URL=redis_url, EMBEDJOB_LEASE_SECONDS="3", EMBEDJOB_VISIBILITY_TIMEOUT="12",
             EMBEDJOB_RESTORE_INTERVAL="1", OMP_NUM_THREADS="1")
    return e


@pytest.fixture()
def workers(env, tmp_path):
    w = Workers(env, f"q-{uuid.uuid4().hex[:8]}", tmp_path)
    yield w
    w.stop_all()


def test_worker_embeds_good_and_corrupt_images(bucket, env, workers, tiny_clip_dir, redis_url):
    spec = simple_shard(7, size=(120, 90), prefix="s/")
    spec.members.insert(4, ("s/bad1.jpg", b"not an image at all"))
    spec.members.insert(9, ("s/bad2.png", b""))
    shard = put_shard(bucket, "in/000.tar", spec)
    job = f"job-{uuid.uuid4().hex[:6]}"
    task = ShardTask(job=job, shard=shard, stem="000", output=f"s3://{bucket}/out",
                     model={"name": "x", "revision": None, "path": str(tiny_clip_dir)},
                     options={**EmbedOptions().__dict__, "device": "cpu", "dtype": "float32"})
    workers.start("w1")
    send_task(env, workers.queue, task)
    store = ProgressStore(redis_client(redis_url), job)
    wait_state(store, "000", "succeeded", 120)

    storage = Storage()
    out = shard_outputs(task.output, "000")
    emb = np.load(io.BytesIO(storage.read_bytes(out.embeddings)))
    keys = pq.read_table(io.BytesIO(storage.read_bytes(out.metadata))).column("key").to_pylist()
    manifest = json.loads(storage.read_bytes(out.manifest))
    assert emb.shape == (7, 32) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert keys == spec.good_keys
    failed = {f["key"]: f["reason"] for f in manifest["failed"]}
    assert set(failed) == {"s/bad1", "s/bad2"} and all(failed.values())
    info = store.info("000")
    assert (info["images"], info["failedImages"]) == (7, 2)
    assert store.executions() == {"000": 1}
    # Credentials never travel in the message.
    assert "AWS_SECRET_ACCESS_KEY" not in json.dumps(task.to_dict()) and env["AWS_SECRET_ACCESS_KEY"] not in json.dumps(
        task.to_dict())

    # A duplicate delivery of a finished shard does no work.
    send_task(env, workers.queue, ShardTask(**{**task.to_dict(), "attempt": 2}))
    time.sleep(3)
    assert store.executions() == {"000": 1}
    assert json.loads(storage.read_bytes(out.manifest))["created"] == manifest["created"]
    assert (store.state("000"), store.info("000")["images"]) == ("succeeded", 7)


def test_sigkilled_worker_shard_redelivered_and_completed_once(bucket, env, workers, tiny_clip_dir, redis_url):
    n = 600
    spec = simple_shard(n, size=(320, 240))
    shard = put_shard(bucket, "in/big.tar", spec)
    job = f"job-{uuid.uuid4().hex[:6]}"
    task = ShardTask(job=job, shard=shard, stem="big", output=f"s3://{bucket}/out",
                     model={"name": "x", "revision": None, "path": str(tiny_clip_dir)},
                     options={**EmbedOptions().__dict__, "device": "cpu", "batch_size": 8, "num_threads": 1})
    store = ProgressStore(redis_client(redis_url), job)
    storage = Storage()
    out = shard_outputs(task.output, "big")

    first = workers.start("victim")
    send_task(env, workers.queue, task)
    wait_state(store, "big", "running", 120)
    deadline = time.monotonic() + 60
    while store.info("big").get("imagesSoFar", 0) == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert store.info("big").get("imagesSoFar", 0) > 0, "the worker never got into the shard"
    workers.kill(first)
    assert not storage.exists(out.manifest)
    assert not storage.exists(out.embeddings) and not storage.exists(out.metadata)

    workers.start("rescuer")
    seen_partial = []
    deadline = time.monotonic() + 180
    while store.state("big") != "succeeded" and time.monotonic() < deadline:
        # Whatever is visible under a final name must be complete.
        if storage.exists(out.embeddings):
            arr = np.load(io.BytesIO(storage.read_bytes(out.embeddings)))
            if arr.shape[0] != n:
                seen_partial.append(arr.shape)
        time.sleep(0.3)
    assert store.state("big") == "succeeded", store.info("big")
    assert not seen_partial
    emb = np.load(io.BytesIO(storage.read_bytes(out.embeddings)))
    keys = pq.read_table(io.BytesIO(storage.read_bytes(out.metadata))).column("key").to_pylist()
    assert emb.shape == (n, 32) and emb.dtype == np.float16
    assert keys == spec.good_keys
    # Started twice (the killed run and the redo), completed once: exactly one manifest.
    assert store.executions() == {"big": 2}
    assert list(storage.list(f"s3://{bucket}/out/_manifests/")) == [out.manifest]
    assert json.loads(storage.read_bytes(out.manifest))["counts"]["embedded"] == n


def test_storage_error_before_embedding_is_recorded_not_lost(bucket, env, workers, tiny_clip_dir, redis_url):
    """The manifest check fails (the S3 endpoint is down): the outcome is recorded as a transient
    failure naming the operation and the URI, instead of an acknowledged message and a shard that
    stays "queued" forever."""
    from embedjob.dev.services import free_port

    workers.env = {**env, "EMBEDJOB_S3_MAX_ATTEMPTS": "1"}
    job = f"job-{uuid.uuid4().hex[:6]}"
    task = ShardTask(job=job, shard=f"s3://{bucket}/in/000.tar", stem="000", output=f"s3://{bucket}/out",
                     model={"name": "x", "revision": None, "path": str(tiny_clip_dir)},
                     options={**EmbedOptions().__dict__, "device": "cpu"},
                     storage={"endpoint": f"http://127.0.0.1:{free_port()}", "region": "us-east-1"})
    workers.start("w1")
    send_task(env, workers.queue, task)
    store = ProgressStore(redis_client(redis_url), job)
    wait_state(store, "000", "failed", 120)
    info = store.info("000")
    assert info["transient"] is True and info["errorCode"] == "EndpointConnectionError"
    assert info["error"].startswith(f"StorageError: HeadObject s3://{bucket}/out/_manifests/000.json: ")
    assert store.executions() == {}  # nothing was embedded


def test_two_shards_in_flight_share_one_worker_and_survive_its_sigkill(bucket, env, workers, tiny_clip_dir,
                                                                       redis_url):
    """`embedjob worker` works on two shards at once (one model, one decode pool): while one finishes
    and uploads, the other is decoding. Both run at the same time; killed mid-shard, both are redone by
    another worker and committed exactly once, with the rows of a shard embedded on its own."""
    n = 300
    specs = {stem: simple_shard(n, size=(320, 240), seed=i) for i, stem in enumerate(("a", "b"))}
    job = f"job-{uuid.uuid4().hex[:6]}"
    tasks = [ShardTask(job=job, shard=put_shard(bucket, f"in/{stem}.tar", spec), stem=stem,
                       output=f"s3://{bucket}/out", model={"name": "x", "revision": None, "path": str(tiny_clip_dir)},
                       options={**EmbedOptions().__dict__, "device": "cpu", "batch_size": 8, "num_threads": 1})
             for stem, spec in specs.items()]
    store = ProgressStore(redis_client(redis_url), job)
    storage = Storage()

    victim = workers.start("victim")
    for t in tasks:
        send_task(env, workers.queue, t)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not all(store.info(s).get("imagesSoFar", 0) > 0 for s in specs):
        time.sleep(0.1)
    assert all(store.info(s).get("imagesSoFar", 0) > 0 for s in specs), "the two shards were not in flight at once"
    workers.kill(victim)
    assert not any(storage.exists(shard_outputs(tasks[0].output, s).manifest) for s in specs)

    workers.start("rescuer")
    for s in specs:
        wait_state(store, s, "succeeded", 240)
    assert store.executions() == {"a": 2, "b": 2}
    assert sorted(storage.list(f"s3://{bucket}/out/_manifests/")) == [
        shard_outputs(tasks[0].output, s).manifest for s in ("a", "b")]

    # Each shard's rows are those of the shard embedded alone (no batch of one shard mixed into the other).
    from embedjob.worker.datapath.shard import embed_shard
    from embedjob.worker.model.load import clear_cache, load_embedder

    clear_cache()
    alone = load_embedder(str(tiny_clip_dir), device="cpu", precision="fp32")
    for stem, spec in specs.items():
        out = shard_outputs(tasks[0].output, stem)
        emb = np.load(io.BytesIO(storage.read_bytes(out.embeddings))).astype(np.float32)
        keys = pq.read_table(io.BytesIO(storage.read_bytes(out.metadata))).column("key").to_pylist()
        assert keys == spec.good_keys and emb.shape == (n, 32)
        embed_shard(tasks[0].shard.replace("/a.tar", f"/{stem}.tar"), f"s3://{bucket}/alone", alone,
                    EmbedOptions(batch_size=8, num_threads=1, dtype="float32"), stem=stem)
        ref = np.load(io.BytesIO(storage.read_bytes(shard_outputs(f"s3://{bucket}/alone", stem).embeddings)))
        assert (emb * ref).sum(1).min() > 0.999


def _big_task(bucket: str, tiny_clip_dir, n: int, stem: str = "big") -> tuple[ShardTask, ShardSpec]:
    spec = simple_shard(n, size=(320, 240))
    shard = put_shard(bucket, f"in/{stem}.tar", spec)
    task = ShardTask(job=f"job-{uuid.uuid4().hex[:6]}", shard=shard, stem=stem, output=f"s3://{bucket}/out",
                     model={"name": "x", "revision": None, "path": str(tiny_clip_dir)},
                     options={**EmbedOptions().__dict__, "device": "cpu", "batch_size": 8, "num_threads": 1})
    return task, spec


def _wait_into_shard(store: ProgressStore, stem: str) -> None:
    wait_state(store, stem, "running", 120)
    time.sleep(1.0)
    assert store.state(stem) == "running", "the shard was over too soon for this test"


def _wait_log(path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not in {path}")


def test_sigterm_past_the_deadline_gives_the_shard_back_and_another_worker_redoes_it_at_once(
        bucket, env, workers, tiny_clip_dir, redis_url, tmp_path):
    """SIGTERM mid-shard with EMBEDJOB_SHUTDOWN_DEADLINE=0 (the shard cannot finish within the grace
    period): the worker aborts it (nothing committed), records it queued again, releases its lease
    and requeues the message. Another worker starts it far sooner than the lease (30 s) would have
    allowed; exactly one manifest, full rows, no partial object ever visible."""
    n = 4000  # about 17 s of CPU here: long enough to start the rescuer meanwhile
    workers.env = {**env, "EMBEDJOB_LEASE_SECONDS": "30", "EMBEDJOB_SHUTDOWN_DEADLINE": "0",
                   "EMBEDJOB_VISIBILITY_TIMEOUT": "600"}
    task, spec = _big_task(bucket, tiny_clip_dir, n)
    store = ProgressStore(redis_client(redis_url), task.job, lease_seconds=30)
    storage = Storage()
    out = shard_outputs(task.output, "big")

    victim = workers.start("victim")
    send_task(env, workers.queue, task)
    _wait_into_shard(store, "big")
    victim_id = store.info("big")["worker"]
    workers.start("rescuer")
    _wait_log(tmp_path / "rescuer.log", "rescuer@", 60)
    _wait_log(tmp_path / "rescuer.log", " ready.", 60)
    assert store.state("big") == "running", "the shard was over too soon for this test"

    t_term = time.monotonic()
    os.killpg(victim.pid, signal.SIGTERM)
    redo_at = None
    seen_partial = []
    deadline = time.monotonic() + 180
    while store.state("big") != "succeeded" and time.monotonic() < deadline:
        info = store.info("big")
        if redo_at is None and store.state("big") == "running" and info.get("worker") != victim_id:
            redo_at = time.monotonic()
        if storage.exists(out.embeddings) and np.load(io.BytesIO(storage.read_bytes(out.embeddings))).shape[0] != n:
            seen_partial.append(1)
        time.sleep(0.05)
    assert store.state("big") == "succeeded", store.info("big")
    assert victim.wait(30) == 0  # a clean, prompt exit
    assert redo_at is not None
    redo_delay = redo_at - t_term
    print(f"redo delay after SIGTERM: {redo_delay:.2f}s (lease 30s)")
    assert redo_delay < 30 / 3, f"redone {redo_delay:.1f}s after SIGTERM: no faster than the lease"
    info = store.info("big")
    assert info["givenBack"] == 1 and info["worker"] != victim_id and "leaseExpiries" not in info
    assert not seen_partial
    assert store.executions() == {"big": 2} and store.commits() == {"big": 1}
    assert list(storage.list(f"s3://{bucket}/out/_manifests/")) == [out.manifest]
    assert not list(storage.list(f"s3://{bucket}/out/_tmp/"))
    emb = np.load(io.BytesIO(storage.read_bytes(out.embeddings)))
    keys = pq.read_table(io.BytesIO(storage.read_bytes(out.metadata))).column("key").to_pylist()
    assert emb.shape == (n, 32) and keys == spec.good_keys
    assert "given back" in (tmp_path / "victim.log").read_text(errors="replace")


def test_sigterm_within_the_deadline_finishes_the_shard_then_exits(bucket, env, workers, tiny_clip_dir, redis_url):
    """Celery's warm shutdown: with time left before the deadline the shard in flight is finished and
    committed once by the same worker, which then exits; nothing is redone."""
    workers.env = {**env, "EMBEDJOB_LEASE_SECONDS": "30", "EMBEDJOB_SHUTDOWN_DEADLINE": "120",
                   "EMBEDJOB_VISIBILITY_TIMEOUT": "600"}
    task, spec = _big_task(bucket, tiny_clip_dir, 1500)
    store = ProgressStore(redis_client(redis_url), task.job, lease_seconds=30)
    victim = workers.start("victim")
    send_task(env, workers.queue, task)
    _wait_into_shard(store, "big")
    os.killpg(victim.pid, signal.SIGTERM)
    assert victim.wait(120) == 0
    assert store.state("big") == "succeeded", store.info("big")
    assert store.executions() == {"big": 1} and store.commits() == {"big": 1}
    assert "givenBack" not in store.info("big")
    out = shard_outputs(task.output, "big")
    assert np.load(io.BytesIO(Storage().read_bytes(out.embeddings))).shape == (1500, 32)

def test_worker_survives_a_redis_restart_with_shards_in_flight(bucket, s3_env, tiny_clip_dir, tmp_path):
    """Redis is SIGKILLed while the worker holds unacknowledged shards, then restarts from its AOF.
    The worker process stays up (Celery 5.7 + kombu used to stop it: "Unrecoverable error:
    AttributeError('NoneType' object has no attribute 'hostname')"), finishes the shards and takes
    new ones; each shard is committed once."""
    from embedjob.dev.services import RedisServer

    redis_server = RedisServer(tmp_path / "redis", appendonly=True).start()
    env = {**os.environ, **s3_env, "EMBEDJOB_REDIS_URL": redis_server.url, "EMBEDJOB_LEASE_SECONDS": "30",
           "EMBEDJOB_VISIBILITY_TIMEOUT": "120", "OMP_NUM_THREADS": "1"}
    workers = Workers(env, f"q-{uuid.uuid4().hex[:8]}", tmp_path)
    job = f"job-{uuid.uuid4().hex[:6]}"

    def task(stem: str, images: int) -> ShardTask:
        return ShardTask(job=job, shard=put_shard(bucket, f"in/{stem}.tar", simple_shard(images, size=(640, 480))),
                         stem=stem, output=f"s3://{bucket}/out",
                         model={"name": "x", "revision": None, "path": str(tiny_clip_dir)},
                         options={**EmbedOptions().__dict__, "device": "cpu", "num_threads": 1})
    try:
        proc = workers.start("w1")
        store = ProgressStore(redis_client(redis_server.url), job)
        tasks = {stem: task(stem, images) for stem, images in (("a", 400), ("b", 400), ("c", 4))}
        for stem in ("a", "b"):
            send_task(env, workers.queue, tasks[stem])
        deadline = time.monotonic() + 120
        while store.state("a") != "running" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store.state("a") == "running", store.info("a")
        time.sleep(1)  # both messages delivered, unacknowledged
        redis_server.proc.kill()
        redis_server.proc.wait(10)
        time.sleep(2)
        redis_server.start()
        send_task(env, workers.queue, tasks["c"])
        for stem in ("a", "b", "c"):
            wait_state(store, stem, "succeeded", 240)
        assert proc.poll() is None, (tmp_path / "w1.log").read_text()[-3000:]
        assert "Unrecoverable error" not in (tmp_path / "w1.log").read_text()
        assert store.commits() == {"a": 1, "b": 1, "c": 1}
    finally:
        workers.stop_all()
        redis_server.stop()
