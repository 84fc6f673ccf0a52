"""End-to-end fixtures: a REAL kube-apiserver + etcd (embedjob.dev.cluster), the session's
real Redis and SeaweedFS (tests/conftest.py), the operator as a subprocess, Celery worker
subprocesses, and kubectl. Short lease / tick values come in through the environment."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from embedjob import settings
from embedjob.dev.cluster import DevCluster
from embedjob.dev.services import embedjob_command, free_port, stop_process, wait_for_port
from embedjob.storage import s3_client
from tests.conftest import S3_KEY, S3_SECRET
from tests.shards import encode, rgb, tar_bytes


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    c = DevCluster(tmp_path_factory.mktemp("kube")).start()
    c.apply_crds()
    yield c
    c.stop()


@pytest.fixture(scope="session")
def e2e_env(cluster, redis_server, s3_server) -> dict[str, str]:
    """The environment of the operator, the workers and this test process (credentials only here)."""
    extra = {
        "AWS_ACCESS_KEY_ID": S3_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_ENDPOINT_URL": s3_server.endpoint,
        "AWS_REGION": "us-east-1",
        "EMBEDJOB_REDIS_URL": redis_server.url,
        "KUBECONFIG": str(cluster.kubeconfig),
        "EMBEDJOB_LEASE_SECONDS": "3",
        "EMBEDJOB_VISIBILITY_TIMEOUT": "120",
        "EMBEDJOB_OPERATOR_INTERVAL": "1",
        "EMBEDJOB_LOGLEVEL": os.environ.get("EMBEDJOB_LOGLEVEL", "INFO"),
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    settings.reload()  # this process's settings follow the environment the stack runs with
    yield {**os.environ, **extra}
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    settings.reload()


@pytest.fixture(scope="session")
def queue() -> str:
    return f"e2e-{uuid.uuid4().hex[:8]}"


class Operator:
    """``embedjob operator`` as a subprocess that tests can kill and restart. Its ``/metrics`` stays on
    one port across restarts (``metrics_port``), so a Prometheus scrape config holds."""

    def __init__(self, env: dict[str, str], logdir: Path, namespaces: tuple[str, ...] = ("default",)) -> None:
        self.metrics_port = free_port()
        self.env = {**env, "EMBEDJOB_METRICS_PORT": str(self.metrics_port), "EMBEDJOB_METRICS_ADDR": "127.0.0.1"}
        self.logdir, self.namespaces = logdir, namespaces
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        port = free_port()
        log = open(self.logdir / f"operator-{self.starts}.log", "wb")  # noqa: SIM115
        watch = [arg for ns in self.namespaces for arg in ("--namespace", ns)]
        self.proc = subprocess.Popen(
            embedjob_command("operator", "--liveness", f"http://127.0.0.1:{port}/healthz", *watch),
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.logdir)
        log.close()
        wait_for_port(port, 60, self.proc, "operator")
        wait_for_port(self.metrics_port, 30, self.proc, "operator metrics")
        self.liveness = f"http://127.0.0.1:{port}/healthz"

    def ensure(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.start()

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        stop_process(self.proc, grace=10)


class Workers:
    """``embedjob worker`` subprocesses (each its own process group, so SIGKILL takes the whole
    worker: main process and pool child, like a pod dying). Each serves ``/metrics`` on a port of a
    fixed set (``metrics_ports``): a replacement takes the port of the worker it replaces."""

    def __init__(self, env: dict[str, str], queue: str, logdir: Path, count: int) -> None:
        self.env, self.queue, self.logdir, self.count = env, queue, logdir, count
        self.procs: list[subprocess.Popen] = []
        self.ports: dict[int, int] = {}  # pid -> metrics port
        self.metrics_ports = [free_port() for _ in range(count)]
        self.started = 0

    def start_one(self) -> subprocess.Popen:
        self.started += 1
        name = f"w{self.started}"
        live = {self.ports.get(p.pid) for p in self.procs if p.poll() is None}
        port = next((p for p in self.metrics_ports if p not in live), None) or free_port()
        env = {**self.env, "EMBEDJOB_METRICS_PORT": str(port), "EMBEDJOB_METRICS_ADDR": "127.0.0.1"}
        log = open(self.logdir / f"worker-{name}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            embedjob_command("worker", "--queue", self.queue, "--hostname", f"{name}@%h", "--concurrency", "1",
                             "--loglevel", "info"),
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.logdir)
        log.close()
        self.procs.append(proc)
        self.ports[proc.pid] = port
        return proc

    def ensure(self) -> None:
        self.procs = [p for p in self.procs if p.poll() is None]
        while len(self.procs) < self.count:
            self.start_one()

    def by_pid(self, pid: int) -> subprocess.Popen | None:
        return next((p for p in self.procs if p.pid == pid), None)

    def kill(self, proc: subprocess.Popen) -> None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        self.procs.remove(proc)

    def stop(self) -> None:
        for p in self.procs:
            stop_process(p, grace=10)


@pytest.fixture(scope="session")
def operator_process(e2e_env, tmp_path_factory):
    op = Operator(e2e_env, tmp_path_factory.mktemp("operator-logs"))
    op.start()
    yield op
    op.stop()


@pytest.fixture(scope="session")
def worker_pool(e2e_env, queue, tmp_path_factory):
    w = Workers(e2e_env, queue, tmp_path_factory.mktemp("worker-logs"), count=2)
    w.ensure()
    yield w
    w.stop()


@pytest.fixture()
def stack(cluster, e2e_env, operator_process, worker_pool, queue, tiny_clip_dir, s3_server):
    """Everything running (restarted if a previous test killed part of it)."""
    operator_process.ensure()
    worker_pool.ensure()
    return Stack(cluster, e2e_env, operator_process, worker_pool, queue, str(tiny_clip_dir), s3_server.endpoint)


# -- helpers ----------------------------------------------------------------------------------------------
@dataclass
class ShardContent:
    good: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def jpeg(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    return encode(rgb(size[0], size[1], seed=seed), "JPEG", quality=85)


def tar_of(members: list[tuple[str, bytes]]) -> bytes:
    return tar_bytes(members)


def put_shards(bucket: str, prefix: str, n: int, images: int, corrupt: dict[int, int] | None = None,
               size: tuple[int, int] = (48, 40)) -> dict[str, ShardContent]:
    """``n`` shards ``<prefix>/<i:04d>.tar`` with ``images`` JPEGs each; ``corrupt`` maps a shard index
    to how many of its samples are garbage bytes (skipped and recorded, not failing the shard)."""
    corrupt = corrupt or {}
    out: dict[str, ShardContent] = {}
    bodies: dict[str, bytes] = {}
    for i in range(n):
        stem = f"{i:04d}"
        content = ShardContent()
        members = []
        for j in range(images):
            key = f"s{i:04d}_{j:03d}"
            if j < corrupt.get(i, 0):
                members.append((f"{key}.jpg", b"\xff\xd8 not really a jpeg"))
                content.failed.append(key)
            else:
                members.append((f"{key}.jpg", jpeg(i * 1000 + j, size)))
                members.append((f"{key}.txt", f"caption {key}".encode()))
                content.good.append(key)
        out[stem] = content
        bodies[f"{prefix}/{stem}.tar"] = tar_of(members)
    client = s3_client()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda kv: client.put_object(Bucket=bucket, Key=kv[0], Body=kv[1]), bodies.items()))
    return out


class Stack:
    def __init__(self, cluster: DevCluster, env: dict[str, str], operator: Operator, workers: Workers, queue: str,
                 model_path: str, endpoint: str) -> None:
        self.cluster, self.env, self.operator, self.workers = cluster, env, operator, workers
        self.queue, self.model_path, self.endpoint = queue, model_path, endpoint

    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
        return self.cluster.kubectl(*args, check=check, input=input)

    def job_doc(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        base = {
            "model": {"path": self.model_path},
            "inference": {"device": "cpu", "batchSize": 16, "numThreads": 2},
            "storage": {"endpoint": self.endpoint},
            "queue": self.queue,
            "retries": {"perShard": 1, "backoffSeconds": 1},
        }
        base.update(spec)
        return {"apiVersion": "embedjob.io/v1alpha1", "kind": "EmbeddingJob",
                "metadata": {"name": name, "namespace": "default"}, "spec": base}

    def apply(self, doc: dict[str, Any], check: bool = True) -> subprocess.CompletedProcess:
        return self.kubectl("apply", "-f", "-", input=json.dumps(doc), check=check)

    def get(self, name: str) -> dict[str, Any] | None:
        r = self.kubectl("get", "embeddingjob", name, "-o", "json", check=False)
        if r.returncode != 0:
            if "NotFound" in r.stderr:
                return None
            raise RuntimeError(r.stderr)
        return json.loads(r.stdout)

    def wait(self, name: str, pred: Callable[[dict[str, Any]], bool], timeout: float, what: str = "",
             interval: float = 0.5) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        obj = None
        while time.monotonic() < deadline:
            obj = self.get(name)
            if obj is not None and pred(obj):
                return obj
            time.sleep(interval)
        raise AssertionError(f"{name}: {what or 'condition'} not reached in {timeout}s; last status: "
                             f"{json.dumps((obj or {}).get('status'), indent=1)}")

    def wait_phase(self, name: str, phase: str, timeout: float = 120) -> dict[str, Any]:
        return self.wait(name, lambda o: o.get("status", {}).get("phase") == phase, timeout, f"phase {phase}")

    def events(self, name: str) -> list[dict[str, Any]]:
        r = self.kubectl("get", "events", "--field-selector", f"involvedObject.name={name}", "-o", "json")
        return json.loads(r.stdout)["items"]

    def delete(self, name: str, timeout: int = 60) -> subprocess.CompletedProcess:
        return self.kubectl("delete", "embeddingjob", name, f"--timeout={timeout}s", "--ignore-not-found")
