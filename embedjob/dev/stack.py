"""``embedjob dev ...``: the whole system as local processes on 127.0.0.1.

etcd + kube-apiserver (:mod:`embedjob.dev.cluster`), Redis and SeaweedFS S3
(:mod:`embedjob.dev.services`), the CRD, the operator and N workers. Every process runs in its own
session, so it outlives the command that started it.

``<dir>/stack.json`` keeps one record per component (``etcd``, ``kube-apiserver``, ``redis``,
``seaweedfs``, ``operator``, ``worker-0`` ..): its pid and the pid's start time, its command line,
the environment the stack gives it (applied over the caller's), its working folder, log file and
how to tell it is ready. That is enough to stop one component and start it again on the same ports
and data folder (``dev restart redis``, or ``dev stop seaweedfs`` ... ``dev start seaweedfs`` for a
fault drill). A process is found by its recorded pid, checked against the recorded start time so a
reused pid is never signalled; never by name (``redis-server`` rewrites its process title).
``<dir>/env.sh`` holds the env to use with the stack; ``dev down`` stops everything.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3

from embedjob.bundled import sample_shards, sample_shards_dir
from embedjob.dev.cluster import DevCluster, wait_apiserver_ready
from embedjob.dev.services import (
    RedisServer,
    SeaweedS3,
    embedjob_command,
    free_port,
    spawn,
    wait_for_port,
    wait_for_s3,
)
from embedjob.procs import process_alive

QUEUE = "embedjob"
BUCKETS = ("datasets", "embeddings")
# Stop order: consumers first, the API and its store last (start order is the reverse).
KINDS = ("worker", "operator", "seaweedfs", "redis", "kube-apiserver", "etcd")
ALIASES = {"s3": "seaweedfs", "weed": "seaweedfs", "apiserver": "kube-apiserver"}
# The operator's and the workers' settings come from the environment: those set when `dev up` ran
# are recorded with each component, so a restarted one runs with the same settings.
KEPT_ENV_PREFIX = "EMBEDJOB_"
STOP_GRACE = 20.0
# What `dev down` says while it waits for a component known to take a while.
SLOW_STOPS = {"seaweedfs": " (SeaweedFS waits about 15 s for its gRPC servers to stop)",
              "worker": " (a worker finishes the shard it is embedding)"}


def metrics_ports(base: str | None, count: int, wanted: bool) -> list[int]:
    """One ``/metrics`` port per process when metrics are wanted (``EMBEDJOB_METRICS_PORT`` set and not
    0, or ``--metrics``): from the given port up, skipping ports in use; free ones with no base."""
    start = int(base) if base and base.strip() not in ("", "0") else 0
    if not start and not wanted:
        return []
    if not start:
        return [free_port() for _ in range(count)]
    out: list[int] = []
    port = start
    while len(out) < count:
        if port_free(port):
            out.append(port)
        port += 1
    return out


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _metrics_ready(ports: list[int], i: int) -> dict[str, Any]:
    return {"metricsPort": ports[i], "metrics": f"http://127.0.0.1:{ports[i]}/metrics"} if ports else {}


class StackError(Exception):
    """A dev command that cannot be done (unknown component, already running, ...)."""


def kind_of(name: str) -> str:
    return "worker" if name.startswith("worker-") else name


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
        # The records hold the S3 secret (in the operator's and workers' env): owner only.
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.chmod(0o600)
        tmp.replace(self.state_file)

    def components(self) -> list[dict[str, Any]]:
        return self.state().get("processes", [])

    def running(self) -> bool:
        return any(is_running(p) for p in self.components())

    # -- up --------------------------------------------------------------------------------------------
    def up(self, workers: int = 1, operator: bool = True, metrics: bool = False) -> dict[str, Any]:
        """Start everything. Metrics (``metrics`` or ``EMBEDJOB_METRICS_PORT`` set): every process gets
        its own ``/metrics`` port (the given one for the first, the next free ones after it), recorded
        with it (a restart keeps it) and printed by :meth:`describe`."""
        self.dir.mkdir(parents=True, exist_ok=True)
        logs = self.dir / "logs"
        state: dict[str, Any] = {"processes": []}

        def record(name: str, proc: subprocess.Popen | None, cwd: Path, log: Path, env: dict[str, str] | None = None,
                   **ready: Any) -> None:
            if proc is None:
                return
            state["processes"].append({
                "name": name, "pid": proc.pid, "started": process_start_time(proc.pid), "cmd": list(proc.args),
                "env": env or {}, "cwd": str(cwd), "log": str(log), "ready": ready})
            self._save(state)

        cluster = DevCluster(self.dir / "kube")
        try:
            cluster.start()
        finally:
            record("etcd", cluster.etcd, cluster.dir, cluster.etcd_log, port=cluster.etcd_port)
            record("kube-apiserver", cluster.apiserver, cluster.dir, cluster.apiserver_log,
                   port=cluster.secure_port, apiserver=cluster.server)
        cluster.apply_crds()

        redis = RedisServer(self.dir / "redis", appendonly=True)
        try:
            redis.start()
        finally:
            record("redis", redis.proc, redis.dir, redis.log_path, port=redis.port)

        key, secret = "embedjob-dev", secrets.token_hex(16)
        s3 = SeaweedS3(self.dir / "s3", config={"identities": [{
            "name": "admin", "credentials": [{"accessKey": key, "secretKey": secret}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]})
        try:
            s3.start()
        finally:
            record("seaweedfs", s3.proc, s3.dir, s3.log_path, port=s3.s3_port, s3=s3.endpoint)

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
        # What the operator and workers get: the stack's env plus the EMBEDJOB_* settings in force now.
        program_env = {**{k: v for k, v in os.environ.items() if k.startswith(KEPT_ENV_PREFIX)}, **env}
        ports = metrics_ports(program_env.get("EMBEDJOB_METRICS_PORT"), workers + int(operator), metrics)
        program_env.pop("EMBEDJOB_METRICS_PORT", None)  # each process gets its own, below

        def own_env(i: int) -> dict[str, str]:
            if not ports:
                return program_env
            return {**program_env, "EMBEDJOB_METRICS_PORT": str(ports[i]), "EMBEDJOB_METRICS_ADDR": "127.0.0.1"}
        self._make_buckets(env)
        model = self._random_model({**os.environ, **program_env})
        state["sampleJob"] = self._sample_job(env, model)
        self._save(state)

        started: list[tuple[str, subprocess.Popen, int | None]] = []  # (name, process, metrics port)
        if operator:
            port = free_port()
            log = logs / "operator.log"
            penv = own_env(0)
            proc = spawn(embedjob_command("operator", "--liveness", f"http://127.0.0.1:{port}/healthz"), log, self.dir,
                         {**os.environ, **penv})
            record("operator", proc, self.dir, log, penv, port=port, **_metrics_ready(ports, 0))
            state["liveness"] = f"http://127.0.0.1:{port}/healthz"
            self._save(state)
            wait_for_port(port, 60, proc, "operator")
            started.append(("operator", proc, ports[0] if ports else None))
        for i in range(workers):
            log = logs / f"worker-{i}.log"
            k = i + int(operator)
            wenv = own_env(k)
            proc = spawn(embedjob_command("worker", "--queue", QUEUE, "--hostname", f"dev{i}@%h", "--concurrency", "1"),
                         log, self.dir,
                         {**os.environ, **wenv})
            record(f"worker-{i}", proc, self.dir, log, wenv, **_metrics_ready(ports, k))
            started.append((f"worker-{i}", proc, ports[k] if ports else None))
        for name, proc, mport in started:  # a process whose /metrics does not answer is not "running" well
            if mport is not None:
                wait_for_port(mport, 120, proc, f"{name} /metrics")
        return state

    def metrics_urls(self) -> list[tuple[str, str]]:
        return [(p["name"], p["ready"]["metrics"]) for p in self.components() if p.get("ready", {}).get("metrics")]

    def _write_env(self, env: dict[str, str]) -> None:
        lines = [f"export {k}={v}" for k, v in env.items()]
        path = self.dir / "env.sh"
        path.write_text("\n".join(lines) + "\n")
        path.chmod(0o600)

    def _make_buckets(self, env: dict[str, str]) -> None:
        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_REGION"],
                              aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
        for b in BUCKETS:
            try:
                client.create_bucket(Bucket=b)
            except client.exceptions.BucketAlreadyOwnedByYou:
                pass
        root = sample_shards_dir()
        for tar in sample_shards():
            client.upload_file(str(tar), "datasets", f"sample/{tar.relative_to(root)}")

    def _random_model(self, env: dict[str, str]) -> str | None:
        """The hub is often unreachable on dev machines: save the small random-weight CLIP (in a
        subprocess, so this command never imports torch) for the sample job."""
        path = self.dir / "models" / "RANDOM-WEIGHTS-tiny-clip"
        if (path / "config.json").exists():
            return str(path)
        code = ("import sys; from embedjob.worker.model.random_weights import save_random_clip; "
                "save_random_clip(sys.argv[1])")
        r = subprocess.run([sys.executable, "-P", "-c", code, str(path)], env=env, cwd=self.dir, capture_output=True,
                           text=True)
        return str(path) if r.returncode == 0 else None

    def upload(self, source: str | Path, name: str) -> tuple[int, str]:
        """Upload the ``.tar`` shards under ``source`` (a folder, searched recursively, or one file) to
        ``s3://datasets/<name>/`` of the running stack, sub-folders kept, and write a job file for them
        (``<dir>/<name>-job.yaml``, output ``s3://embeddings/<name>/``, the sample job's model). Returns
        (shards uploaded, the job file)."""
        state = self.state()
        if not state.get("env"):
            raise StackError(f"no dev stack in {self.dir}: `embedjob dev up` first")
        src = Path(source)
        tars = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.suffix.lower() == ".tar")
        if not tars:
            raise StackError(f"no .tar shards under {src}")
        env = state["env"]
        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_REGION"],
                              aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
        for tar in tars:
            rel = tar.name if src.is_file() else tar.relative_to(src).as_posix()
            client.upload_file(str(tar), "datasets", f"{name}/{rel}")
        model = self.dir / "models" / "RANDOM-WEIGHTS-tiny-clip"
        return len(tars), self._sample_job(env, str(model) if (model / "config.json").exists() else None, name)

    def _sample_job(self, env: dict[str, str], model: str | None, name: str = "sample") -> str:
        spec: dict[str, Any] = {
            "input": {"uri": f"s3://datasets/{name}/"},
            "output": {"uri": f"s3://embeddings/{name}/"},
            "storage": {"endpoint": env["AWS_ENDPOINT_URL"]},
            "inference": {"device": "cpu", "batchSize": 16},
            "retries": {"perShard": 2, "backoffSeconds": 5},
        }
        if model:
            spec["model"] = {"path": model}
        doc = {"apiVersion": "embedjob.io/v1alpha1", "kind": "EmbeddingJob", "metadata": {"name": name},
               "spec": spec}
        path = self.dir / f"{name}-job.yaml"
        path.write_text(json.dumps(doc, indent=1) + "\n")
        return str(path)

    # -- one component -----------------------------------------------------------------------------------
    def resolve(self, name: str) -> str:
        """The component's name in stack.json (``s3`` and ``apiserver`` are accepted too)."""
        names = [p["name"] for p in self.components()]
        if not names:
            raise StackError(f"no dev stack in {self.dir}")
        name = ALIASES.get(name, name)
        if name not in names:
            raise StackError(f"no component {name!r} in the dev stack; components: {', '.join(names)}")
        return name

    def _component(self, name: str) -> dict[str, Any]:
        return next(p for p in self.components() if p["name"] == name)

    def stop(self, name: str, grace: float = STOP_GRACE) -> bool:
        """Stop one component (SIGTERM to its process group, SIGKILL after ``grace``); its record
        stays, so :meth:`start` brings it back. False when it was not running."""
        rec = self._component(self.resolve(name))
        if not is_running(rec):
            return False
        terminate(rec["pid"], grace)
        return True

    def start(self, name: str, timeout: float = 60) -> int:
        """Start a stopped component again with its recorded command line, environment, working
        folder and log (appended), and wait until it is ready. Returns the new pid."""
        name = self.resolve(name)
        rec = self._component(name)
        if is_running(rec):
            raise StackError(f"{name} is already running (pid {rec['pid']})")
        proc = spawn(rec["cmd"], Path(rec["log"]), Path(rec["cwd"]), {**os.environ, **rec["env"]})
        state = self.state()
        for p in state["processes"]:
            if p["name"] == name:
                p["pid"], p["started"] = proc.pid, process_start_time(proc.pid)
        self._save(state)
        self._wait_ready(name, rec, proc, timeout)
        return proc.pid

    def restart(self, name: str, timeout: float = 60) -> int:
        self.stop(name)
        return self.start(name, timeout)

    def _wait_ready(self, name: str, rec: dict[str, Any], proc: subprocess.Popen, timeout: float) -> None:
        ready = rec.get("ready", {})
        if "port" in ready:
            wait_for_port(ready["port"], timeout, proc, name)
        if "s3" in ready:
            wait_for_s3(ready["s3"], timeout, authenticated=True)
        if "apiserver" in ready:
            wait_apiserver_ready(ready["apiserver"], self._token(), timeout, proc, Path(rec["log"]))
        if "metricsPort" in ready:
            wait_for_port(ready["metricsPort"], timeout, proc, f"{name} /metrics")
        if not ready:  # a worker: no port; it must at least survive its start-up
            time.sleep(1)
            if proc.poll() is not None:
                raise StackError(f"{name} exited with code {proc.returncode}; see {rec['log']}")

    def _token(self) -> str:
        kubeconfig = json.loads(Path(self.state()["env"]["KUBECONFIG"]).read_text())
        return kubeconfig["users"][0]["user"]["token"]

    # -- down / describe -------------------------------------------------------------------------------
    def down(self, grace: float = STOP_GRACE, say: Callable[[str], None] | None = None) -> int:
        """Stop every component, consumers first; ``say`` is told what is being waited for."""
        procs = self.components()
        stopped = 0
        for kind in KINDS:
            group = [p for p in procs if kind_of(p["name"]) == kind and is_running(p)]
            if not group:
                continue
            t = time.monotonic()
            if say is not None:
                names = ", ".join(p["name"] for p in group)
                say(f"stopping {names}{SLOW_STOPS.get(kind, '')} ...")
            for p in group:
                signal_group(p["pid"], signal.SIGTERM)
            deadline = time.monotonic() + grace
            for p in group:
                while process_alive(p["pid"]) and time.monotonic() < deadline:
                    time.sleep(0.2)
                if process_alive(p["pid"]):
                    signal_group(p["pid"], signal.SIGKILL)
                stopped += 1
            if say is not None:
                say(f"  stopped in {time.monotonic() - t:.1f} s")
        if self.state_file.exists():
            self.state_file.unlink()
        return stopped

    def describe(self) -> str:
        state = self.state()
        if not state:
            return f"no dev stack in {self.dir}"
        lines = ["components:"]
        for p in state.get("processes", []):
            status = "running" if is_running(p) else "STOPPED"
            lines.append(f"  {p['name']:<15} pid {p['pid']:<8} {status:<8} {p['log']}")
        env = state.get("env", {})
        metrics = self.metrics_urls()
        if metrics:
            lines.append("metrics:")
            lines += [f"  {name:<15} {url}" for name, url in metrics]
        lines += [
            f"kubeconfig: {env.get('KUBECONFIG')}",
            f"env:        source {self.dir / 'env.sh'}",
            *(f"  {k}={v}" for k, v in env.items() if k != "AWS_SECRET_ACCESS_KEY"),
            "try:",
            f"  kubectl apply -f {state.get('sampleJob', 'examples/job.yaml')}",
            "  kubectl get ej -w",
            "own shards: embedjob dev upload ./my-shards/ --name mine   (then kubectl apply -f the job file it writes)",
            "drills:     embedjob dev restart|stop|start NAME   (NAME from the list above; s3, apiserver work too)",
            "stop:       embedjob dev down",
        ]
        return "\n".join(lines)


def process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux ``/proc``), or None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def is_running(rec: dict[str, Any]) -> bool:
    """Whether the process a stack.json record names still runs: same pid and, where the start time
    is known, the same start time (not another process that got the pid later)."""
    if not process_alive(rec["pid"]):
        return False
    recorded, now = rec.get("started"), process_start_time(rec["pid"])
    return recorded is None or now is None or recorded == now


def signal_group(pid: int, sig: int) -> None:
    """Signal the process group (each component leads its own session), else the process."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def terminate(pid: int, grace: float) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL."""
    signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if process_alive(pid):
        signal_group(pid, signal.SIGKILL)
        while process_alive(pid) and time.monotonic() < deadline + 5:
            time.sleep(0.1)
