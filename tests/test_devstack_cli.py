"""`embedjob dev` without a running stack, or without the kube-apiserver: clear messages, nothing
started. The stack itself runs in tests/e2e/test_devstack_e2e.py."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from embedjob.dev.services import embedjob_command
from embedjob.dev.stack import DevStack, is_running, process_start_time


def dev(tmp_path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(embedjob_command("dev", *args, "--dir", str(tmp_path / "dev")), capture_output=True,
                          text=True, timeout=60, cwd=tmp_path, env={**os.environ, **(env or {})})


def test_dev_up_without_an_apiserver_says_what_to_run_and_starts_nothing(tmp_path):
    path = "/usr/bin:/bin"
    if shutil.which("kube-apiserver", path=path):
        pytest.skip("this machine has a kube-apiserver in /usr/bin")
    env = {"EMBEDJOB_CACHE": str(tmp_path / "cache"), "KUBEBUILDER_ASSETS": "", "PATH": path}
    r = dev(tmp_path, "up", env=env)
    assert r.returncode == 1
    assert "kube-apiserver not found" in r.stderr and "scripts/build-apiserver.sh" in r.stderr
    assert not (tmp_path / "dev" / "stack.json").exists()


def test_component_commands_without_a_stack(tmp_path):
    r = dev(tmp_path, "restart", "redis")
    assert r.returncode == 1 and "no dev stack in" in r.stderr
    assert dev(tmp_path, "status").returncode == 1


def test_a_reused_pid_is_not_taken_for_the_recorded_process():
    me = os.getpid()
    started = process_start_time(me)
    assert started is not None
    assert is_running({"pid": me, "started": started})
    assert not is_running({"pid": me, "started": started + 1})  # same pid, another process


def test_components_resolve_by_name_and_alias(tmp_path):
    stack = DevStack(tmp_path)
    stack._save({"processes": [{"name": n, "pid": 0} for n in ("etcd", "kube-apiserver", "redis", "seaweedfs",
                                                               "operator", "worker-0")]})
    assert stack.resolve("s3") == "seaweedfs" and stack.resolve("apiserver") == "kube-apiserver"
    assert stack.resolve("worker-0") == "worker-0"
    assert oct(stack.state_file.stat().st_mode & 0o777) == "0o600"
