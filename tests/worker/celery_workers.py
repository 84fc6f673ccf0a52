"""Real `embedjob worker` subprocesses and the messages they get (shared by the worker tests and
tests/test_storage_allow_list.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from embedjob.broker import make_app
from embedjob.contract import TASK_NAME, ShardTask, task_id
from embedjob.dev.services import embedjob_command
from embedjob.progress import ProgressStore
from embedjob.storage import s3_client
from tests.shards import ShardSpec


def put_shard(bucket: str, key: str, shard: ShardSpec) -> str:
    s3_client().put_object(Bucket=bucket, Key=key, Body=shard.tar_bytes())
    return f"s3://{bucket}/{key}"


class Workers:
    """`embedjob worker` subprocesses, each in its own process group (so SIGKILL takes the whole
    worker: the main process and its pool child)."""

    def __init__(self, env: dict, queue: str, tmp_path) -> None:
        self.env, self.queue, self.tmp = env, queue, tmp_path
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            embedjob_command("worker", "--queue", self.queue, "--hostname", f"{name}@%h", "--loglevel", "info"),
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen) -> None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def send_task(env: dict, queue: str, task: ShardTask) -> None:
    app = make_app(env["EMBEDJOB_REDIS_URL"])
    app.send_task(TASK_NAME, kwargs={"task": task.to_dict()}, task_id=task_id(task.job, task.stem, task.attempt),
                  queue=queue)


def wait_state(store: ProgressStore, stem: str, want: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if store.state(stem) == want:
            return
        time.sleep(0.2)
    raise AssertionError(f"shard {stem} did not reach {want} in {timeout}s (state {store.state(stem)!r}, "
                         f"info {store.info(stem)})")
