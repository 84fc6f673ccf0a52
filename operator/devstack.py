"""``embedjob dev up|down|status``: the whole system as local processes on 127.0.0.1.

etcd + kube-apiserver (embedjob.operator.devcluster), Redis and SeaweedFS S3 (embedjob.services),
the CRD, the operator and N workers. Every process runs in its own session so it outlives the
command that started it; their pids and the env to use are kept in ``<dir>/stack.json`` and
``<dir>/env.sh``, and ``dev down`` stops them all.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from embedjob.operator.devcluster import REPO_ROOT, DevCluster
from embedjob.services import RedisServer, SeaweedS3, free_port, wait_for_port

QUEUE = "embedjob"
BUCKETS = ("datasets", "embeddings")
# Stop order: consumers first, the API and its store last.
STOP_ORDER = ("worker", "operator", "seaweedfs", "redis", "kube-apiserver", "etcd")


class DevStack:
    def __init__(self, directory: str | Path = ".dev") -> None:
        self.dir = Path(directory).resolve()
        self.state_file = self.dir / "stack.json"

    # -- state ---------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}

    def _save(self, state: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps(state, indent=1))

    def running(self) -> bool:
        return any(process_alive(p["pid"]) for p in self.state().get("processes", []))

    # -- up --------------------------------------------------------------------------------------------
    def up(self, workers: int = 1, operator: bool = True) -> dict[str, Any]:
        self.dir.mkdir(parents=True, exist_ok=True)
        state: dict[str, Any] = {"processes": []}
        procs = state["processes"]

        def record(name: str, proc: subprocess.Popen | None) -> None:
            if proc is not None:
                procs.append({"name": name, "pid": proc.pid})
                self._save(state)

        cluster = DevCluster(self.dir / "kube")
        try:
            cluster.start()
        finally:
            record("etcd", cluster.etcd)
            record("kube-apiserver", cluster.apiserver)
        cluster.apply_crds()

        redis = RedisServer(self.dir / "redis", appendonly=True)
        try:
            redis.start()
        finally:
            record("redis", redis.proc)

        key, secret = "embedjob-dev", secrets.token_hex(16)
        s3 = SeaweedS3(self.dir / "s3", config={"identities": [{
            "name": "admin", "credentials": [{"accessKey": key, "secretKey": secret}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]})
        try:
            s3.start()
        finally:
            record("seaweedfs", s3.proc)

        env = {
            "KUBECONFIG": str(cluster.kubeconfig),
            "EMBEDJOB_REDIS_URL": redis.url,
            "AWS_ACCESS_KEY_ID": key,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_ENDPOINT_URL": s3.endpoint,
            "AWS_REGION": "us-east-1",
        }
        state["env"] = env
        self._save(state)
        self._write_env(env)
        full_env = {**os.environ, **env}
        self._make_buckets(env)
        model = self._random_model(full_env)
        state["sampleJob"] = self._sample_job(env, model)
        self._save(state)

        logs = self.dir / "logs"
        logs.mkdir(exist_ok=True)
        if operator:
            port = free_port()
            proc = _spawn([sys.executable, "-m", "embedjob.cli", "operator",
                           "--liveness", f"http://127.0.0.1:{port}/healthz"], full_env, logs / "operator.log")
            record("operator", proc)
            state["liveness"] = f"http://127.0.0.1:{port}/healthz"
            wait_for_port(port, 60, proc, "operator")
        for i in range(workers):
            proc = _spawn([sys.executable, "-m", "embedjob.cli", "worker", "--queue", QUEUE,
                           "--hostname", f"dev{i}@%h", "--concurrency", "1"], full_env, logs / f"worker-{i}.log")
            record("worker", proc)
        self._save(state)
        return state

    def _write_env(self, env: dict[str, str]) -> None:
        lines = [f"export {k}={v}" for k, v in env.items()]
        path = self.dir / "env.sh"
        path.write_text("\n".join(lines) + "\n")
        path.chmod(0o600)

    def _make_buckets(self, env: dict[str, str]) -> None:
        import boto3

        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_REGION"],
                              aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
        for b in BUCKETS:
            try:
                client.create_bucket(Bucket=b)
            except client.exceptions.BucketAlreadyOwnedByYou:
                pass
        samples = REPO_ROOT / "examples" / "shards"
        if samples.is_dir():
            for tar in sorted(samples.rglob("*.tar")):
                client.upload_file(str(tar), "datasets", f"sample/{tar.relative_to(samples)}")

    def _random_model(self, env: dict[str, str]) -> str | None:
        """The hub is often unreachable on dev machines: save the small random-weight CLIP (in a
        subprocess, so this command never imports torch) for the sample job."""
        path = self.dir / "models" / "RANDOM-WEIGHTS-tiny-clip"
        if (path / "config.json").exists():
            return str(path)
        code = ("import sys; from embedjob.worker.random_model import save_random_clip; "
                "save_random_clip(sys.argv[1])")
        r = subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True, text=True)
        return str(path) if r.returncode == 0 else None

    def _sample_job(self, env: dict[str, str], model: str | None) -> str:
        spec: dict[str, Any] = {
            "input": {"uri": "s3://datasets/sample/"},
            "output": {"uri": "s3://embeddings/sample/"},
            "storage": {"endpoint": env["AWS_ENDPOINT_URL"]},
            "inference": {"device": "cpu", "batchSize": 16},
            "retries": {"perShard": 2, "backoffSeconds": 5},
        }
        if model:
            spec["model"] = {"path": model}
        doc = {"apiVersion": "embedjob.io/v1alpha1", "kind": "EmbeddingJob", "metadata": {"name": "sample"},
               "spec": spec}
        path = self.dir / "sample-job.yaml"
        path.write_text(json.dumps(doc, indent=1) + "\n")
        return str(path)

    # -- down / describe -------------------------------------------------------------------------------
    def down(self, grace: float = 20) -> int:
        procs = self.state().get("processes", [])
        stopped = 0
        for name in STOP_ORDER:
            group = [p for p in procs if p["name"] == name and process_alive(p["pid"])]
            for p in group:
                _signal(p["pid"], signal.SIGTERM)
            deadline = time.monotonic() + grace
            for p in group:
                while process_alive(p["pid"]) and time.monotonic() < deadline:
                    time.sleep(0.2)
                if process_alive(p["pid"]):
                    _signal(p["pid"], signal.SIGKILL)
                stopped += 1
        if self.state_file.exists():
            self.state_file.unlink()
        return stopped

    def describe(self) -> str:
        state = self.state()
        if not state:
            return f"no dev stack in {self.dir}"
        lines = ["processes:"]
        for p in state.get("processes", []):
            lines.append(f"  {p['name']:<15} pid {p['pid']:<8} {'running' if process_alive(p['pid']) else 'STOPPED'}")
        env = state.get("env", {})
        lines += [
            f"kubeconfig: {env.get('KUBECONFIG')}",
            f"env:        source {self.dir / 'env.sh'}",
            *(f"  {k}={v}" for k, v in env.items() if k != "AWS_SECRET_ACCESS_KEY"),
            "try:",
            f"  kubectl apply -f {state.get('sampleJob', 'examples/job.yaml')}",
            "  kubectl get ej -w",
            f"logs:       {self.dir / 'logs'}",
            "stop:       embedjob dev down",
        ]
        return "\n".join(lines)


def _spawn(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    out = open(log, "ab")  # noqa: SIM115 - the child keeps its copy
    try:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=REPO_ROOT)
    finally:
        out.close()


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as stopped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of this very process counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _signal(pid: int, sig: int) -> None:
    """Signal the process group (each process leads its own session), else the process."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
