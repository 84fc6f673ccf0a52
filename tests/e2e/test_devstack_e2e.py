"""`embedjob dev up` -> fault drills (`dev stop/start seaweedfs`, `dev restart redis operator worker-0`)
-> kubectl apply the sample job -> Succeeded -> `embedjob dev down` stops all."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest

from embedjob.dev.services import embedjob_command
from embedjob.dev.stack import DevStack, is_running
from embedjob.procs import process_alive

pytestmark = pytest.mark.e2e


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def scrape(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def test_dev_up_survives_component_restarts_and_dev_down_stops_everything(tmp_path):
    d = tmp_path / "dev"
    # Short leases and ticks, so a worker restarted mid-shard costs seconds; a restarted component
    # must keep them (stack.json records the EMBEDJOB_* settings in force at `dev up`).
    # EMBEDJOB_METRICS_PORT set: every process gets its own /metrics port from it up (not all the same one).
    from embedjob.dev.services import free_port

    base = free_port()
    env = {**os.environ, "EMBEDJOB_LEASE_SECONDS": "5", "EMBEDJOB_OPERATOR_INTERVAL": "1", "OMP_NUM_THREADS": "1",
           "EMBEDJOB_METRICS_PORT": str(base)}

    def dev(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run(embedjob_command("dev", *args, "--dir", str(d)), capture_output=True, text=True,
                              timeout=timeout, env=env, cwd=tmp_path)

    up = dev("up", "--workers", "2", timeout=300)
    stack = DevStack(d)
    pids_seen: set[int] = set()
    try:
        assert up.returncode == 0, up.stderr
        state = stack.state()
        pids_seen.update(p["pid"] for p in state["processes"])
        names = [p["name"] for p in state["processes"]]
        assert names == ["etcd", "kube-apiserver", "redis", "seaweedfs", "operator", "worker-0", "worker-1"]
        kubeconfig = state["env"]["KUBECONFIG"]
        assert f"kubeconfig: {kubeconfig}" in up.stdout and "env.sh" in up.stdout
        assert "AWS_SECRET_ACCESS_KEY" not in up.stdout  # the secret stays in env.sh and stack.json (mode 600)
        assert oct((d / "env.sh").stat().st_mode & 0o777) == "0o600"
        assert oct((d / "stack.json").stat().st_mode & 0o777) == "0o600"

        # /metrics: one port per process, every one serving, every URL printed
        metrics = dict(stack.metrics_urls())
        assert sorted(metrics) == ["operator", "worker-0", "worker-1"]
        assert len(set(metrics.values())) == 3 and metrics["operator"] == f"http://127.0.0.1:{base}/metrics"
        for name, url in metrics.items():
            assert f"{name:<15} {url}" in up.stdout
            body = scrape(url)
            assert ("embedjob_jobs" if name == "operator" else "embedjob_worker_shards_running") in body, name
        for i in (0, 1):
            assert "Address already in use" not in (d / "logs" / f"worker-{i}.log").read_text()

        def kubectl(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(["kubectl", f"--kubeconfig={kubeconfig}", *args], capture_output=True,
                                  text=True, timeout=60, check=True)

        # Fault drill: S3 away, then back on the same port with the same data (the sample shards).
        s3 = stack._component("seaweedfs")
        stopped = dev("stop", "s3")
        assert stopped.returncode == 0 and "seaweedfs: stopped" in stopped.stdout, stopped.stderr
        assert not is_running(stack._component("seaweedfs")) and not listening(s3["ready"]["port"])
        status = dev("status")
        assert "STOPPED" in status.stdout and status.returncode == 0  # the rest still runs
        started = dev("start", "seaweedfs")
        assert started.returncode == 0, started.stderr
        assert listening(s3["ready"]["port"]) and stack._component("seaweedfs")["cmd"] == s3["cmd"]

        kubectl("apply", "-f", state["sampleJob"])
        before = {p["name"]: p for p in stack.components()}
        restarted = dev("restart", "redis", "operator", "worker-0")
        assert restarted.returncode == 0, restarted.stderr
        after = {p["name"]: p for p in stack.components()}
        for name in ("redis", "operator", "worker-0"):
            assert after[name]["pid"] != before[name]["pid"] and is_running(after[name]), name
            assert not process_alive(before[name]["pid"]), name
            assert after[name]["cmd"] == before[name]["cmd"] and after[name]["log"] == before[name]["log"]
        assert after["worker-1"]["pid"] == before["worker-1"]["pid"]  # the others are left alone
        assert after["operator"]["env"]["EMBEDJOB_LEASE_SECONDS"] == "5"
        assert listening(after["redis"]["ready"]["port"]) and listening(after["operator"]["ready"]["port"])
        assert "embedjob_worker_shards_running" in scrape(metrics["worker-0"])  # the same port after a restart
        pids_seen.update(p["pid"] for p in stack.components())

        deadline = time.monotonic() + 240
        status_obj: dict = {}
        while time.monotonic() < deadline and status_obj.get("phase") not in ("Succeeded", "Failed"):
            time.sleep(1)
            status_obj = json.loads(kubectl("get", "ej", "sample", "-o", "json").stdout).get("status", {})
        assert status_obj.get("phase") == "Succeeded", status_obj
        assert status_obj["progress"] == "3/3" and status_obj["images"]["embedded"] > 0
        # the sample job's model is a local folder: recorded as such, not as the default hub id
        assert "id" not in status_obj["model"] and status_obj["model"]["path"].endswith("RANDOM-WEIGHTS-tiny-clip")
        assert "Succeeded" in kubectl("get", "ej").stdout
        unknown = dev("restart", "nope")
        assert unknown.returncode == 1 and "components: etcd, kube-apiserver" in unknown.stderr
    finally:
        pids_seen.update(p["pid"] for p in stack.components())
        down = dev("down")
    assert down.returncode == 0, down.stderr
    assert "stopping seaweedfs (SeaweedFS waits about 15 s" in down.stdout and "stopped in" in down.stdout
    assert pids_seen and not any(process_alive(p) for p in pids_seen)
    assert not stack.running() and not (d / "stack.json").exists()
