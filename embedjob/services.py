"""Real local services on 127.0.0.1 for the dev stack and the tests: Redis and SeaweedFS S3
(the kube-apiserver and etcd live in embedjob.operator.devcluster). Each picks free ports and its
own data folder, so several instances run side by side, and stops cleanly.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


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


def _binary(name: str) -> str:
    """Find a binary on PATH or next to the running interpreter (venv ``bin/``)."""
    found = shutil.which(name) or shutil.which(name, path=os.path.dirname(sys.executable))
    if not found:
        raise FileNotFoundError(f"{name} not found on PATH or in {os.path.dirname(sys.executable)}")
    return found


class RedisServer:
    def __init__(self, workdir: Path, port: int | None = None, appendonly: bool = False) -> None:
        self.dir = Path(workdir)
        self.port = port or free_port()
        self.appendonly = appendonly
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.dir.mkdir(parents=True, exist_ok=True)
        cmd = [_binary("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
               "--save", "", "--appendonly", "yes" if self.appendonly else "no", "--protected-mode", "yes"]
        self.log = open(self.dir / "redis.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for_port(self.port, 20, self.proc, "redis-server")
        return self

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()


class SeaweedS3:
    """``weed server -s3`` with every port named (gRPC at +10000, Iceberg and Lance ports), so
    instances never collide."""

    def __init__(self, workdir: Path, config: dict | None = None) -> None:
        self.dir = Path(workdir)
        self.config = config
        self.proc: subprocess.Popen | None = None
        (self.s3_port, self.master_port, self.volume_port, self.filer_port, self.iceberg_port,
         self.lance_port) = free_ports(6, spread=10000)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def start(self, timeout: float = 60) -> SeaweedS3:
        import json

        data = self.dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        cmd = [
            _binary("weed"), "server", f"-dir={data}", "-s3", f"-s3.port={self.s3_port}",
            f"-s3.port.iceberg={self.iceberg_port}", f"-s3.port.lance={self.lance_port}",
            f"-master.port={self.master_port}", f"-volume.port={self.volume_port}",
            f"-filer.port={self.filer_port}", "-master.telemetry=false", "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1", "-master.volumeSizeLimitMB=256", "-volume.max=0",
        ]
        if self.config is not None:
            cfg = self.dir / "s3.json"
            cfg.write_text(json.dumps(self.config))
            cmd.append(f"-s3.config={cfg}")
        self.log = open(self.dir / "weed.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     cwd=self.dir)
        wait_for_port(self.s3_port, timeout, self.proc, "weed s3")
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        """The S3 port opens before the filer can store objects: probe with a real bucket write."""
        import boto3
        from botocore.config import Config

        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
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
                if self.config is not None and any(
                        code in str(e) for code in ("AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId")):
                    return  # authenticated server answering: ready
                last = e
                time.sleep(0.5)
        raise TimeoutError(f"SeaweedFS S3 not ready within {timeout}s: {last}")

    def stop(self, grace: float = 20) -> None:
        stop_process(self.proc, grace=grace)
        self.log.close()
