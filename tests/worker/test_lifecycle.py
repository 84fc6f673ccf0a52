"""Worker probes, shutdown flag and GPU assignment: the folder logic as units, then a REAL `embedjob
worker` subprocess whose /readyz turns ready once its model is loaded and whose /healthz reports a
shard stuck on a storage endpoint that never answers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid

import pytest

from embedjob.broker import make_app
from embedjob.contract import TASK_NAME, EmbedOptions, ShardTask, task_id
from embedjob.dev.services import embedjob_command, free_port
from embedjob.worker.runtime import lifecycle


@pytest.fixture()
def health_dir(tmp_path):
    d = lifecycle.prepare(str(tmp_path / "health"), processes=1)
    yield d
    lifecycle.configure(None)


def test_live_and_ready_from_the_folder(health_dir):
    started = time.time()
    h = lifecycle.check(health_dir, stall_seconds=60, started=started)
    assert h.live and not h.ready  # starting: not dead yet, not ready
    lifecycle.consumer_beat()
    h = lifecycle.check(health_dir, stall_seconds=60, started=started)
    assert h.live and not h.ready and "0 of 1 pool process(es) ready (model loading)" in h.problems
    lifecycle.mark_ready("some/model")
    assert lifecycle.check(health_dir, stall_seconds=60, started=started).ready


def test_a_silent_consumer_loop_or_a_stuck_shard_is_not_live(health_dir):
    started = time.time()
    lifecycle.consumer_beat()
    lifecycle.mark_ready()
    later = time.time() + lifecycle.CONSUMER_STALE + 1
    h = lifecycle.check(health_dir, stall_seconds=1e9, started=started, now=later)
    assert not h.live and not h.ready and h.problems[0].startswith("consumer loop silent for")

    with lifecycle.TaskMarker("00042") as marker:
        now = time.time()
        assert lifecycle.check(health_dir, stall_seconds=5, started=started, now=now).live
        h = lifecycle.check(health_dir, stall_seconds=5, started=started, now=now + 6)
        assert not h.live and "shard '00042'" in h.problems[0] and h.tasks[0]["stem"] == "00042"
        marker._last = 0.0
        marker.progress()  # a step forward makes it live again
        assert lifecycle.check(health_dir, stall_seconds=5, started=started, now=time.time() + 4).live
    assert lifecycle.check(health_dir, stall_seconds=5, started=started, now=time.time()).tasks == []


def test_shutdown_deadline_gives_shards_back_only_after_it(health_dir):
    lifecycle.check_give_back()  # no shutdown: nothing happens
    lifecycle.begin_shutdown(3600)
    assert lifecycle.shutting_down()
    lifecycle.check_give_back()  # before the deadline: the shard may still finish
    lifecycle.configure(health_dir)  # a pool child learns it from the folder
    assert lifecycle.shutting_down()
    lifecycle.begin_shutdown(0)
    with pytest.raises(lifecycle.GiveBack):
        lifecycle.check_give_back()
    lifecycle.mark_ready()
    lifecycle.consumer_beat()
    h = lifecycle.check(health_dir, stall_seconds=60, started=time.time())
    assert h.live and not h.ready and "shutting down" in h.problems
    # The warm shutdown stops the consumer loop: that alone does not make the worker dead meanwhile.
    h = lifecycle.check(health_dir, stall_seconds=1e9, started=time.time(), now=time.time() + 300)
    assert h.live and not h.ready


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _wait_for(fn, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = fn()
            if last:
                return last
        except OSError as e:
            last = e
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout}s (last: {last})")


def test_real_worker_ready_after_model_load_and_unhealthy_when_a_shard_is_stuck(
        redis_url, s3_env, tiny_clip_dir, tmp_path):
    queue, port = f"q-{uuid.uuid4().hex[:8]}", free_port()
    env = {**os.environ, **s3_env, "EMBEDJOB_REDIS_URL": redis_url, "EMBEDJOB_HEALTH_PORT": str(port),
           "EMBEDJOB_METRICS_ADDR": "127.0.0.1", "EMBEDJOB_PRELOAD_MODEL": str(tiny_clip_dir),
           "EMBEDJOB_STALL_SECONDS": "4", "EMBEDJOB_S3_MAX_ATTEMPTS": "1", "OMP_NUM_THREADS": "1"}
    # An S3 endpoint that accepts connections and never answers: the task hangs in its first request.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(embedjob_command("worker", "--queue", queue, "--hostname", "probe@%h"), env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        code, body = _wait_for(lambda: (lambda r: r if r[0] == 200 else None)(_get(f"{base}/readyz")), 120,
                               "ready")
        assert body["readyProcesses"] == 1 and body["live"]
        assert "model" in (tmp_path / "worker.log").read_text() and "loaded" in (tmp_path / "worker.log").read_text()
        assert _get(f"{base}/healthz")[0] == 200

        task = ShardTask(job=f"job-{uuid.uuid4().hex[:6]}", shard="s3://b/in/000.tar", stem="000",
                         output="s3://b/out", model={"name": "x", "revision": None, "path": str(tiny_clip_dir)},
                         options={**EmbedOptions().__dict__, "device": "cpu"},
                         storage={"endpoint": f"http://127.0.0.1:{silent.getsockname()[1]}", "region": "us-east-1"})
        make_app(redis_url).send_task(TASK_NAME, kwargs={"task": task.to_dict()}, task_id=task_id(task.job, "000", 1),
                                      queue=queue)
        code, body = _wait_for(lambda: (lambda r: r if r[0] == 503 else None)(_get(f"{base}/healthz")), 60,
                               "unhealthy")
        assert body["live"] is False and body["tasks"][0]["stem"] == "000"
        assert any("shard '000'" in p and "no progress" in p for p in body["problems"])
        assert _get(f"{base}/readyz")[0] == 503
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        silent.close()


def test_gpu_assignment_gives_each_pool_process_its_own_device():
    assert [lifecycle.assign_gpu(i, 4, None) for i in range(4)] == ["0", "1", "2", "3"]
    assert [lifecycle.assign_gpu(i, 2, "") for i in range(2)] == ["0", "1"]
    # The pod's own list (device plugin ids or UUIDs): the index-th of it, never "1" of a different GPU.
    assert [lifecycle.assign_gpu(i, 2, "GPU-aa, GPU-bb") for i in range(2)] == ["GPU-aa", "GPU-bb"]
    assert lifecycle.assign_gpu(1, 2, "3,5,7") == "5"
    with pytest.raises(ValueError, match="2 GPU.s. for 2 processes but only 1 visible device"):
        lifecycle.assign_gpu(1, 2, "0")
    with pytest.raises(ValueError, match="out of range"):
        lifecycle.assign_gpu(2, 2, None)


def test_processes_per_gpu_share_their_gpu_and_split_the_cpus():
    # 2 GPUs x 2 processes: processes 0, 1 on the first GPU, 2, 3 on the second.
    assert [lifecycle.assign_gpu(i, 4, "6,7", per_gpu=2) for i in range(4)] == ["6", "6", "7", "7"]
    assert [lifecycle.assign_gpu(i, 3, None, per_gpu=3) for i in range(3)] == ["0", "0", "0"]
    with pytest.raises(ValueError, match="cannot be split 2 to a GPU"):
        lifecycle.assign_gpu(0, 3, None, per_gpu=2)
    with pytest.raises(ValueError, match="2 GPU.s. for 4 processes but only 1 visible"):
        lifecycle.assign_gpu(0, 4, "0", per_gpu=2)
    # 16 CPUs for 4 processes: 4 each, disjoint, all of them used.
    shares = [lifecycle.cpu_share(i, 4, list(range(16))) for i in range(4)]
    assert shares == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    # 10 CPUs for 4: 3, 3, 2, 2 and still disjoint and complete.
    shares = [lifecycle.cpu_share(i, 4, list(range(10))) for i in range(4)]
    assert [len(s) for s in shares] == [3, 3, 2, 2] and sorted(sum(shares, [])) == list(range(10))
    # Fewer CPUs than processes: shared round-robin, never empty.
    assert [lifecycle.cpu_share(i, 3, [0, 1]) for i in range(3)] == [[0], [1], [0]]
    assert lifecycle.cpu_share(0, 2, None) == []


def _pinned_worker_run(worker_args: list[str], visible: str, redis_url: str, s3_env: dict, bucket: str,
                       tiny_clip_dir, tmp_path, options: dict) -> tuple[str, object, list[str]]:
    """A real `embedjob worker` with ``worker_args`` and CUDA_VISIBLE_DEVICES=``visible`` embeds six
    shards; returns its log, the job's ProgressStore and the stems, once every shard succeeded and the
    worker stopped."""
    from embedjob.progress import ProgressStore, redis_client
    from embedjob.storage import Storage, s3_client
    from tests.shards import simple_shard

    queue = f"q-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, **s3_env, "EMBEDJOB_REDIS_URL": redis_url, "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": visible}
    log_path = tmp_path / "worker.log"
    log = open(log_path, "wb")  # noqa: SIM115
    proc = subprocess.Popen(embedjob_command("worker", "--queue", queue, *worker_args, "--hostname", "pinned@%h"),
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    job = f"job-{uuid.uuid4().hex[:6]}"
    store = ProgressStore(redis_client(redis_url), job)
    stems = [f"{i:03d}" for i in range(6)]
    try:
        app = make_app(redis_url)
        for i, stem in enumerate(stems):
            s3_client().put_object(Bucket=bucket, Key=f"in/{stem}.tar",
                                   Body=simple_shard(150, size=(320, 240), seed=i).tar_bytes())
            task = ShardTask(job=job, shard=f"s3://{bucket}/in/{stem}.tar", stem=stem, output=f"s3://{bucket}/out",
                             model={"name": "x", "revision": None, "path": str(tiny_clip_dir)},
                             options={**EmbedOptions().__dict__, "device": "cpu", "batch_size": 8, **options})
            app.send_task(TASK_NAME, kwargs={"task": task.to_dict()}, task_id=task_id(job, stem, 1), queue=queue)
        _wait_for(lambda: all(store.state(s) == "succeeded" for s in stems), 240, "all shards done")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    storage = Storage()
    assert all(storage.exists(f"s3://{bucket}/out/_manifests/{s}.json") for s in stems)
    return log_path.read_text(errors="replace"), store, stems


def test_real_worker_with_two_processes_on_one_device_embeds_each_shard_once(
        redis_url, s3_env, bucket, tiny_clip_dir, tmp_path):
    """`embedjob worker --processes-per-gpu 2` (on CPU here, one device): two pool processes, both
    pinned to the pod's one GPU, each with its own half of the CPUs; every shard is embedded and
    committed exactly once, and both processes take shards."""
    text, store, stems = _pinned_worker_run(["--processes-per-gpu", "2"], "3", redis_url, s3_env, bucket,
                                            tiny_clip_dir, tmp_path, {})
    for i in (0, 1):
        assert f"pool process {i}" in text and "pinned to GPU 3 (CUDA_VISIBLE_DEVICES=3), 2 process(es) per GPU" in text
    cpus = [line.rsplit("CPUs ", 1)[1].strip() for line in text.splitlines() if "process(es) per GPU, CPUs" in line]
    n = len(os.sched_getaffinity(0))
    assert len(cpus) == 2 and (n < 2 or len(set(cpus)) == 2), cpus  # disjoint shares when there are 2+ CPUs
    assert store.executions() == dict.fromkeys(stems, 1)
    assert store.commits() == dict.fromkeys(stems, 1)
    workers = {store.info(s).get("worker") for s in stems}
    assert len(workers) == 2, workers  # both processes took shards


def test_real_worker_with_two_gpus_pins_each_process_and_records_the_device(
        redis_url, s3_env, bucket, tiny_clip_dir, tmp_path):
    """`embedjob worker --gpus 2` (on CPU here): two pool processes, process i with
    CUDA_VISIBLE_DEVICES=<the pod's i-th GPU> before anything starts CUDA; each shard records the GPU
    that embedded it, and every shard is embedded once."""
    text, store, stems = _pinned_worker_run(["--gpus", "2"], "6,7", redis_url, s3_env, bucket, tiny_clip_dir,
                                            tmp_path, {"num_threads": 1})
    assert "pool process 0" in text and "pinned to GPU 6 (CUDA_VISIBLE_DEVICES=6)" in text
    assert "pool process 1" in text and "pinned to GPU 7 (CUDA_VISIBLE_DEVICES=7)" in text
    gpus = {s: store.info(s).get("gpu") for s in stems}
    assert set(gpus.values()) <= {"6", "7"} and None not in gpus.values(), gpus
    assert store.executions() == dict.fromkeys(stems, 1)


def test_a_second_worker_on_the_same_probe_folder_is_refused_and_the_first_keeps_its_state(
        redis_url, s3_env, tmp_path):
    """Two workers on one EMBEDJOB_HEALTH_DIR would wipe each other's files and read each other's
    SIGTERM: the second would give back every shard it takes. The second refuses to start instead,
    naming the variable, and leaves the first's folder alone."""
    health = tmp_path / "health"
    env = {**os.environ, **s3_env, "EMBEDJOB_REDIS_URL": redis_url, "EMBEDJOB_HEALTH_DIR": str(health),
           "OMP_NUM_THREADS": "1"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    queue = f"q-{uuid.uuid4().hex[:8]}"
    log = open(tmp_path / "first.log", "wb")  # noqa: SIM115
    first = subprocess.Popen(embedjob_command("worker", "--queue", queue, "--hostname", "first@%h"), env=env,
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(lambda: (health / "consumer").exists() or None, 120, "the first worker's consumer loop")
        second = subprocess.run(embedjob_command("worker", "--queue", queue, "--hostname", "second@%h"), env=env,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"EMBEDJOB_HEALTH_DIR={health} is in use by another worker (pid {first.pid})" in second.stderr
        assert (health / "consumer").exists() and (health / "expect").exists()
        assert first.poll() is None
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(10)
    # Its owner gone, the folder is free again.
    from embedjob.procs import claim_folder

    claim_folder(health, "EMBEDJOB_HEALTH_DIR")
