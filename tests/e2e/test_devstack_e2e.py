"""`embedjob dev up` -> kubectl apply the sample job -> Succeeded -> `embedjob dev down` stops all."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from embedjob.dev.stack import DevStack, process_alive

pytestmark = pytest.mark.e2e


def test_dev_up_runs_the_sample_job_and_dev_down_stops_everything(tmp_path):
    d = tmp_path / "dev"
    cli = [sys.executable, "-m", "embedjob.cli", "dev"]
    up = subprocess.run([*cli, "up", "--dir", str(d), "--workers", "1"], capture_output=True, text=True, timeout=300)
    stack = DevStack(d)
    try:
        assert up.returncode == 0, up.stderr
        state = stack.state()
        kubeconfig = state["env"]["KUBECONFIG"]
        assert f"kubeconfig: {kubeconfig}" in up.stdout and "env.sh" in up.stdout
        assert "AWS_SECRET_ACCESS_KEY" not in up.stdout  # the secret stays in env.sh (mode 600)
        assert oct((d / "env.sh").stat().st_mode & 0o777) == "0o600"

        def kubectl(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(["kubectl", f"--kubeconfig={kubeconfig}", *args], capture_output=True,
                                  text=True, timeout=60, check=True)

        kubectl("apply", "-f", state["sampleJob"])
        deadline = time.monotonic() + 180
        status: dict = {}
        while time.monotonic() < deadline and status.get("phase") not in ("Succeeded", "Failed"):
            time.sleep(1)
            status = json.loads(kubectl("get", "ej", "sample", "-o", "json").stdout).get("status", {})
        assert status.get("phase") == "Succeeded", status
        assert status["progress"] == "3/3" and status["images"]["embedded"] > 0
        assert "Succeeded" in kubectl("get", "ej").stdout
    finally:
        pids = [p["pid"] for p in stack.state().get("processes", [])]
        down = subprocess.run([*cli, "down", "--dir", str(d)], capture_output=True, text=True, timeout=180)
    assert down.returncode == 0, down.stderr
    assert pids and not any(process_alive(p) for p in pids)
    assert not stack.running()

