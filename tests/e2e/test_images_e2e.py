"""The container images, run the way the Helm chart runs them.

``scripts/build-images.sh`` (run by ``scripts/test.sh``) builds ``localhost/embedjob-operator:<tag>`` and
``localhost/embedjob-worker:<tag>`` from the Dockerfile; ``<tag>`` hashes the sources, so these tests
always run the images of the sources under test. Here the chart is rendered with ``helm template``
(image = those local images, ``pullPolicy: Never``, Redis/S3 = the session's test services on
127.0.0.1) and every rendered Deployment runs with ``podman kube play --network host``: the chart's
args, env, volumes, securityContext (uid 10001, read-only root filesystem, no capabilities) and
resources, unchanged. What the cluster itself would add is added the same way here:

- the kubelet's ServiceAccount mount: the operator pod has ``automountServiceAccountToken: true``, so
  it gets ``/var/run/secrets/kubernetes.io/serviceaccount/{token,ca.crt,namespace}`` (a hostPath
  volume) and ``KUBERNETES_SERVICE_HOST``/``_PORT`` pointing at the test kube-apiserver. The token is a
  static token of the chart's operator ServiceAccount, whose rendered RBAC is applied first: the
  operator reaches the API with in-cluster credentials and only the chart's permissions;
- each rendered Secret becomes a podman secret (podman 4.3's kube play resolves ``secretKeyRef`` from
  its secret store but cannot play a Secret document);
- a PersistentVolumeClaim named by ``worker.modelCache.existingClaim`` is a podman named volume: it
  holds the tiny random-weight CLIP, owned by 10001 (the ``fsGroup`` step Kubernetes does);
- each emptyDir becomes a fresh tmpfs volume of its pod with the kubelet's mode 0777 (``Podman.empty_dirs``
  says what podman 4.3 does instead); ``ports`` and probes are left out of the played copy
  (``Podman.own_ports``, ``Podman.play`` say why), the tests query the endpoints themselves.

The worker Deployment's replicas (``worker.replicas=2``) are played one pod at a time, each under its
own name and with its own free host ports for its declared containerPorts (``Podman.own_ports``), as
each pod has its own IP in a cluster; podman's own replicas would share one set of host ports.

Set ``EMBEDJOB_SKIP_IMAGE_TESTS=1`` to skip these tests on a machine without podman. Otherwise missing
images are a failure that says what to run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from embedjob.dev.cluster import DevCluster, cache_dir
from embedjob.dev.services import free_port
from embedjob.storage import s3_client
from tests.conftest import S3_KEY, S3_SECRET
from tests.e2e.conftest import put_shards
from tests.e2e.test_operator_e2e import assert_outputs_complete

pytestmark = [pytest.mark.e2e, pytest.mark.images]

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "embedjob"
OPT_OUT = "EMBEDJOB_SKIP_IMAGE_TESTS"
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
WORKERS = 2


def _opted_out() -> bool:
    return os.environ.get(OPT_OUT, "").lower() not in ("", "0", "false", "no")


# -- podman and helm ----------------------------------------------------------------------------------
def podman(*args: str, check: bool = True, input: str | None = None,
           timeout: float = 180) -> subprocess.CompletedProcess:
    # scripts/build-images.sh writes this containers.conf (no default ulimits: runc cannot raise
    # RLIMIT_NOFILE to podman's default on every machine); runc, as Debian's crun refuses hybrid cgroups.
    conf = cache_dir() / "images" / "containers.conf"
    env = {**os.environ, **({"CONTAINERS_CONF": str(conf)} if conf.exists() else {})}
    r = subprocess.run(["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs", *args], input=input,
                       text=True, capture_output=True, timeout=timeout, env=env)
    if check and r.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def helm(*args: str, input: str | None = None) -> str:
    binary = shutil.which("helm") or str(cache_dir() / "bin" / "helm")
    if not os.access(binary, os.X_OK):
        pytest.fail("helm not found: scripts/setup.sh installs it into ~/.cache/embedjob/bin")
    r = subprocess.run([binary, *args], input=input, text=True, capture_output=True, timeout=60)
    if r.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({r.returncode}):\n{r.stderr}")
    return r.stdout


@pytest.fixture(scope="module")
def images() -> dict[str, str]:
    """The two images built from the current sources; a failure (not a skip) when they are missing."""
    if _opted_out():
        pytest.skip(f"{OPT_OUT} is set: container image tests skipped")
    if shutil.which("podman") is None:
        pytest.fail(f"podman not found: run scripts/build-images.sh (installs it and builds the images; "
                    f"scripts/test.sh runs it), or set {OPT_OUT}=1 to skip the image tests")
    tag = subprocess.run([str(REPO / "scripts" / "build-images.sh"), "--tag"], text=True, capture_output=True,
                         check=True).stdout.strip()
    refs = {"operator": f"localhost/embedjob-operator:{tag}", "worker": f"localhost/embedjob-worker:{tag}"}
    missing = [ref for ref in refs.values() if podman("image", "exists", ref, check=False).returncode != 0]
    if missing:
        pytest.fail(f"images of the current sources not built: {', '.join(missing)}. Run scripts/build-images.sh "
                    f"(scripts/test.sh does), or set {OPT_OUT}=1 to skip the image tests")
    return refs


# -- rendering and playing the chart --------------------------------------------------------------------
def render(release: str, namespace: str, images: dict[str, str], values: dict[str, Any]) -> list[dict[str, Any]]:
    repo_tag = {k: v.rsplit(":", 1) for k, v in images.items()}
    base = {
        "operator": {"image": {"repository": repo_tag["operator"][0], "tag": repo_tag["operator"][1],
                               "pullPolicy": "Never"}},
        "worker": {"image": {"repository": repo_tag["worker"][0], "tag": repo_tag["worker"][1], "pullPolicy": "Never"}},
        "storageAllowList": {"*": ["*"]},  # the explicit opt-out (watching every namespace needs a policy)
    }
    out = helm("template", release, str(CHART), "--namespace", namespace, "--values", "-",
               input=json.dumps(_merge(base, values)))
    return [d for d in yaml.safe_load_all(out) if d]


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


def deployment(docs: list[dict[str, Any]], component: str) -> dict[str, Any]:
    found = [d for d in of_kind(docs, "Deployment")
             if d["metadata"]["labels"].get("app.kubernetes.io/component") == component]
    assert len(found) == 1, f"{len(found)} {component} Deployments rendered"
    return found[0]


class Played:
    """What one ``podman kube play`` started; ``down`` removes it."""

    def __init__(self, path: Path, pod: str, container: str, ports: dict[str, int]) -> None:
        self.path, self.pod, self.container = path, pod, container
        self.ports = ports  # the rendered containerPort's name -> the host port this pod got instead

    def exec(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return podman("exec", self.container, *cmd, check=check, timeout=60)

    def logs(self) -> str:
        r = podman("logs", "--tail", "80", self.container, check=False)
        return r.stdout + r.stderr

    def running(self) -> bool:
        r = podman("inspect", "--format", "{{.State.Running}}", self.container, check=False)
        return r.stdout.strip() == "true"


class Podman:
    """Plays rendered documents; remembers what to remove."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.played: list[Played] = []
        self.pods: list[str] = []
        self.secrets: list[str] = []
        self.volumes: list[str] = []

    def secret(self, doc: dict[str, Any]) -> None:
        """A rendered Secret as a podman secret: a JSON object of base64 values (the Secret's ``data``)."""
        import base64

        data = dict(doc.get("data") or {})
        data.update({k: base64.b64encode(v.encode()).decode() for k, v in (doc.get("stringData") or {}).items()})
        name = doc["metadata"]["name"]
        podman("secret", "rm", name, check=False)
        podman("secret", "create", name, "-", input=json.dumps(data))
        self.secrets.append(name)

    def volume(self, name: str, content: Path | None = None, uid: int = 10001) -> Path:
        podman("volume", "rm", "-f", name, check=False)
        podman("volume", "create", name)
        self.volumes.append(name)
        mountpoint = Path(podman("volume", "inspect", "--format", "{{.Mountpoint}}", name).stdout.strip())
        if content is not None:
            shutil.copytree(content, mountpoint / content.name)
        for p in [mountpoint, *mountpoint.rglob("*")]:
            os.chown(p, uid, uid)
        return mountpoint

    def empty_dirs(self, doc: dict[str, Any], prefix: str) -> None:
        """Every emptyDir of a Deployment becomes a fresh volume of its own pod, writable by any user like
        the kubelet's (mode 0777). podman 4.3 makes an emptyDir a volume named like the pod's volume
        ("tmp"), shared by every pod that names one so, and owned by root with the mode of the image's
        folder (a read-only /dev/shm for uid 10001). Each becomes a tmpfs volume (mode=0777), mounted
        once first so that podman does not copy the image folder's mode onto it, and is claimed by name."""
        pod = doc["spec"]["template"]["spec"]
        image = pod["containers"][0]["image"]
        for vol in pod.get("volumes", []):
            if "emptyDir" not in vol:
                continue
            name = f"{prefix}-{vol['name']}"
            podman("volume", "rm", "-f", name, check=False)
            podman("volume", "create", "--opt", "type=tmpfs", "--opt", "device=tmpfs", "--opt", "o=mode=0777", name)
            self.volumes.append(name)
            podman("run", "--rm", "--network", "none", "--pull", "never", "-v", f"{name}:/mnt/volume",
                   "--entrypoint", "true", image)
            del vol["emptyDir"]
            vol["persistentVolumeClaim"] = {"claimName": name}

    @staticmethod
    def own_ports(doc: dict[str, Any]) -> dict[str, int]:
        """In Kubernetes every pod has its own IP and port space; here every pod shares the host's.
        So each declared containerPort gets a free host port, put where the rendered container carries
        the number (an env value equal to it, ``:PORT`` in an argument). ``ports`` themselves are left
        out: podman 4.3 would publish them, which ``--network host`` refuses."""
        mapped: dict[str, int] = {}
        for c in doc["spec"]["template"]["spec"]["containers"]:
            remap = {}
            for p in c.pop("ports", None) or []:
                remap[int(p["containerPort"])] = mapped[p.get("name") or str(p["containerPort"])] = free_port()
            for e in c.get("env", []):
                if "value" in e and str(e["value"]).isdigit() and int(e["value"]) in remap:
                    e["value"] = str(remap[int(e["value"])])
            c["args"] = [re.sub(r":(\d+)\b", lambda m, r=remap: f":{r.get(int(m[1]), m[1])}", a)
                         for a in c.get("args", [])]
        return mapped

    def play(self, docs: list[dict[str, Any]], name: str) -> Played:
        """One pod of the Deployment in ``docs``, named ``name`` (as a ReplicaSet names each of its pods)."""
        for doc in of_kind(docs, "Secret"):
            self.secret(doc)
        docs = json.loads(json.dumps(docs))  # the caller's documents stay as rendered
        ports: dict[str, int] = {}
        for doc in of_kind(docs, "Deployment"):
            doc["metadata"]["name"] = name
            doc["spec"]["replicas"] = 1  # the caller plays each replica: its own name and ports
            self.empty_dirs(doc, name)
            ports |= self.own_ports(doc)
            # Probes are the kubelet's; podman 4.3 turns them into healthchecks run by systemd timers with
            # curl inside the image (neither exists here). The tests query the endpoints themselves.
            for c in doc["spec"]["template"]["spec"]["containers"]:
                for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                    c.pop(probe, None)
        playable = [d for d in docs if d.get("kind") in ("Deployment", "Pod", "ConfigMap", "PersistentVolumeClaim")]
        path = self.workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump_all(playable, sort_keys=False))
        r = podman("kube", "play", "--network", "host", "--start", str(path), timeout=300)
        ids: dict[str, list[str]] = {"Pod": [], "Container": []}
        section = ""
        for line in map(str.strip, r.stdout.splitlines()):
            if line.endswith(":"):
                section = line[:-1]
            elif line and section in ids:
                ids[section].append(line)
        self.pods += ids["Pod"]
        assert len(ids["Pod"]) == 1 and len(ids["Container"]) == 1, f"{path}: {r.stdout}{r.stderr}"
        container = podman("inspect", "--format", "{{.Name}}", ids["Container"][0]).stdout.strip()
        played = Played(path, ids["Pod"][0], container, ports)
        self.played.append(played)
        return played

    def close(self) -> None:
        for pod in self.pods:
            podman("pod", "rm", "--force", "--time", "5", pod, check=False, timeout=120)
        for s in self.secrets:
            podman("secret", "rm", s, check=False)
        for v in self.volumes:
            podman("volume", "rm", "--force", v, check=False, timeout=120)


def add_service_account_mount(op: dict[str, Any], sa_dir: Path, server_port: int) -> None:
    """What the kubelet adds to a pod with ``automountServiceAccountToken: true``: the token volume at
    the well-known path and the API's address in the environment."""
    pod = op["spec"]["template"]["spec"]
    assert pod.get("automountServiceAccountToken") is True, "the operator pod should get an API token"
    pod.setdefault("volumes", []).append({"name": "kube-api-access",
                                          "hostPath": {"path": str(sa_dir), "type": "Directory"}})
    for c in pod["containers"]:
        c.setdefault("volumeMounts", []).append({"name": "kube-api-access", "mountPath": SA_DIR, "readOnly": True})
        c.setdefault("env", []).extend([{"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"},
                                        {"name": "KUBERNETES_SERVICE_PORT", "value": str(server_port)}])


def _sa_line(ns: str, name: str) -> str:
    return f'system:serviceaccount:{ns}:{name},{uuid.uuid4()},"system:serviceaccounts,system:serviceaccounts:{ns}"'


# -- the stack ------------------------------------------------------------------------------------------
class ImageStack:
    def __init__(self, kube: DevCluster, operator: Played, workers: list[Played], queue: str, model_path: str,
                 endpoint: str, liveness_port: int, rendered: list[dict[str, Any]]) -> None:
        self.kube, self.operator, self.workers, self.queue = kube, operator, workers, queue
        self.model_path, self.endpoint, self.liveness_port = model_path, endpoint, liveness_port
        self.rendered = rendered

    def diagnostics(self) -> str:
        return "\n".join(f"--- {p.container} (running={p.running()})\n{p.logs()}"
                         for p in [self.operator, *self.workers])


@pytest.fixture(scope="module")
def image_stack(images, redis_server, s3_server, tiny_clip_dir, tmp_path_factory) -> Iterator[ImageStack]:
    suffix = uuid.uuid4().hex[:6]
    ns, release = f"embedjob-img-{suffix}", f"img{suffix}"
    operator_sa = f"{release}-embedjob-operator"
    token = uuid.uuid4().hex
    kube = DevCluster(tmp_path_factory.mktemp("images-kube"), extra_tokens={token: _sa_line(ns, operator_sa)}).start()
    pm = Podman(tmp_path_factory.mktemp("images-play"))
    try:
        kube.apply_crds()
        kube.kubectl("create", "namespace", ns)
        queue = f"img-{suffix}"
        claim = f"{release}-models"
        values = {
            "redis": {"enabled": False, "url": redis_server.url},
            # Development-mode credentials: the chart renders a Secret, the pods read it via secretKeyRef.
            "s3": {"endpoint": s3_server.endpoint, "region": "us-east-1", "accessKeyId": S3_KEY,
                   "secretAccessKey": S3_SECRET},
            "operator": {"interval": 1},
            "worker": {"queue": queue, "replicas": WORKERS, "concurrency": 1, "leaseSeconds": 10,
                       "visibilityTimeout": 120, "modelCache": {"existingClaim": claim},
                       # No GPU here: a CPU pod's requests and limits.
                       "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "4Gi"}}},
        }
        docs = render(release, ns, images, values)
        # The chart's RBAC objects go into the API; the operator then acts as its ServiceAccount.
        rbac = [d for d in docs if d["kind"] in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role",
                                                 "RoleBinding")]
        kube.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": rbac}))

        sa_dir = tmp_path_factory.mktemp("service-account")
        (sa_dir / "token").write_text(token)
        (sa_dir / "namespace").write_text(ns)
        shutil.copy(kube.dir / "certs" / "apiserver.crt", sa_dir / "ca.crt")
        sa_dir.chmod(0o755)
        for f in sa_dir.iterdir():
            f.chmod(0o644)
        pm.volume(claim, tiny_clip_dir)

        op_doc = deployment(docs, "operator")
        add_service_account_mount(op_doc, sa_dir, kube.secure_port)
        # Each pod with the Secrets and ConfigMaps of the render (whatever the chart makes of them).
        config = [*of_kind(docs, "Secret"), *of_kind(docs, "ConfigMap")]
        operator = pm.play([*config, op_doc], op_doc["metadata"]["name"])
        worker_doc = deployment(docs, "worker")
        replicas = int(worker_doc["spec"]["replicas"])
        workers = [pm.play([*config, worker_doc], f"{worker_doc['metadata']['name']}-{i}") for i in range(replicas)]
        liveness = op_doc["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["port"]
        stack = ImageStack(kube, operator, workers, queue, f"/models/{tiny_clip_dir.name}", s3_server.endpoint,
                           operator.ports[liveness], docs)
        yield stack
    finally:
        pm.close()
        kube.stop()


def wait_for(pred, timeout: float, what: str, stack: ImageStack, interval: float = 0.5):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what} not reached in {timeout}s\n{stack.diagnostics()}")


def healthz(stack: ImageStack) -> bool:
    script = (f"import urllib.request; r = urllib.request.urlopen('http://127.0.0.1:{stack.liveness_port}/healthz', "
              f"timeout=5); print(r.status)")
    r = stack.operator.exec("python", "-c", script, check=False)
    return r.returncode == 0 and r.stdout.strip() == "200"


# -- tests ----------------------------------------------------------------------------------------------
def test_operator_liveness_endpoint_answers_inside_the_container(image_stack):
    wait_for(lambda: healthz(image_stack), 90, "operator /healthz answering 200", image_stack)
    # The chart's probe names the same port and path.
    op = deployment(image_stack.rendered, "operator")["spec"]["template"]["spec"]["containers"][0]
    probe = op["livenessProbe"]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in op["ports"]}
    assert probe["path"] == "/healthz" and probe["port"] in ports
    # The operator listens where the chart's args put it (on this pod's own port, see Podman.own_ports).
    args = op["args"]
    assert f"--liveness=http://0.0.0.0:{ports[probe['port']]}/healthz" in args


def test_worker_probes_answer_inside_the_containers(image_stack):
    """The chart's worker probes (httpGet on the named port): /healthz live, /readyz ready, served by
    the worker container itself."""
    worker = deployment(image_stack.rendered, "worker")["spec"]["template"]["spec"]["containers"][0]
    live, ready = worker["livenessProbe"]["httpGet"], worker["readinessProbe"]["httpGet"]
    assert (live["path"], ready["path"]) == ("/healthz", "/readyz") and live["port"] == ready["port"]

    def answers(played: Played, path: str) -> bool:
        port = played.ports[live["port"]]
        script = (f"import json, urllib.request; r = urllib.request.urlopen('http://127.0.0.1:{port}{path}', "
                  "timeout=5); print(r.status, json.loads(r.read()).get('problems'))")
        r = played.exec("python", "-c", script, check=False)
        return r.returncode == 0 and r.stdout.split()[0] == "200"

    for played in image_stack.workers:
        wait_for(lambda p=played: answers(p, "/healthz") and answers(p, "/readyz"), 120,
                 f"{played.container}: /healthz and /readyz answering 200", image_stack)


def test_containers_run_as_10001_with_a_read_only_root_and_writable_mounts(image_stack):
    for played in [image_stack.operator, *image_stack.workers]:
        assert played.running(), played.logs()
        status = played.exec("cat", "/proc/1/status").stdout
        uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
        gids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Gid:"))
        assert set(uids) == {"10001"} and set(gids) == {"10001"}, status
        assert "embedjob" in played.exec("cat", "/proc/1/cmdline").stdout
        assert played.exec("id", "-u").stdout.strip() == "10001"
        capeff = next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff:"))
        assert int(capeff, 16) == 0, f"effective capabilities {capeff}"
        nnp = next(line.split()[1] for line in status.splitlines() if line.startswith("NoNewPrivs:"))
        assert nnp == "1"
        r = played.exec("sh", "-c", "echo x > /written-to-root", check=False)
        assert r.returncode != 0 and "Read-only file system" in r.stderr, r
        r = played.exec("sh", "-c", "echo x > /usr/local/lib/written", check=False)
        assert r.returncode != 0 and "Read-only file system" in r.stderr, r
        played.exec("sh", "-c", "echo x > /tmp/writable && rm /tmp/writable")
    for worker in image_stack.workers:
        # The model cache (EMBEDJOB_MODEL_DIR, HF_HOME under it) and the memory-backed /dev/shm.
        env = dict(line.split("=", 1) for line in worker.exec("env").stdout.splitlines() if "=" in line)
        assert env["EMBEDJOB_MODEL_DIR"] == "/models" and env["HF_HOME"] == "/models/huggingface"
        worker.exec("sh", "-c", "mkdir -p /models/huggingface && echo x > /models/huggingface/w && "
                                "rm /models/huggingface/w && echo x > /dev/shm/w && rm /dev/shm/w")
        # Celery's metrics folder on the /tmp emptyDir exists and is the worker's.
        assert worker.exec("stat", "-c", "%u", env["EMBEDJOB_METRICS_DIR"]).stdout.strip() == "10001"


def test_operator_image_has_no_torch_and_worker_image_has_the_cpu_build(image_stack):
    for module in ("torch", "pyarrow"):  # the operator reads JSON manifests, never parquet
        r = image_stack.operator.exec("python", "-c", f"import {module}", check=False)
        assert r.returncode != 0 and f"No module named '{module}'" in r.stderr, r
    r = image_stack.workers[0].exec("python", "-c", "import torch; print(torch.__version__)")
    assert "+cpu" in r.stdout


def test_job_applied_with_kubectl_is_embedded_by_the_worker_containers(image_stack, s3_env):
    stack = image_stack
    wait_for(lambda: healthz(stack), 90, "operator /healthz answering 200", stack)
    bucket = f"img-{uuid.uuid4().hex[:12]}"
    s3_client().create_bucket(Bucket=bucket)
    shards = put_shards(bucket, "in", n=4, images=5, corrupt={2: 2})
    job = {"apiVersion": "embedjob.io/v1alpha1", "kind": "EmbeddingJob",
           "metadata": {"name": "images", "namespace": "default"},
           "spec": {"model": {"path": stack.model_path},
                    "inference": {"device": "cpu", "batchSize": 16, "numThreads": 1},
                    "storage": {"endpoint": stack.endpoint},
                    "input": {"uri": f"s3://{bucket}/in/{{0000..0003}}.tar"},
                    "output": {"uri": f"s3://{bucket}/out/"},
                    "queue": stack.queue, "retries": {"perShard": 1, "backoffSeconds": 1}}}
    stack.kube.kubectl("apply", "-f", "-", input=json.dumps(job))

    def phase() -> dict[str, Any] | None:
        obj = json.loads(stack.kube.kubectl("get", "embeddingjob", "images", "-o", "json").stdout)
        return obj if obj.get("status", {}).get("phase") in ("Succeeded", "Failed") else None

    obj = wait_for(phase, 300, "phase Succeeded", stack, interval=1)
    st = obj["status"]
    assert st["phase"] == "Succeeded", f"{json.dumps(st, indent=1)}\n{stack.diagnostics()}"
    assert st["progress"] == "4/4"
    assert st["shards"] == {"total": 4, "queued": 0, "running": 0, "succeeded": 4, "failed": 0}
    assert (st["images"]["embedded"], st["images"]["failed"]) == (18, 2)
    assert st["failedShards"] == []
    assert_outputs_complete(bucket, shards)
    # Only the worker containers consume this queue (its name is unique to this module), and they say so.
    assert any("succeeded" in w.logs().lower() for w in stack.workers), stack.diagnostics()


def test_containers_stop_on_sigterm_within_the_grace_period(image_stack):
    """Last in this module: it stops the containers. The kubelet sends SIGTERM to the container's PID 1
    (here ``embedjob`` itself) and SIGKILLs it after terminationGracePeriodSeconds (30 s by default)."""
    for played, component in [(image_stack.operator, "operator"), *((w, "worker") for w in image_stack.workers)]:
        pod = deployment(image_stack.rendered, component)["spec"]["template"]["spec"]
        grace = int(pod.get("terminationGracePeriodSeconds", 30))
        start = time.monotonic()
        podman("stop", "--time", str(grace + 30), played.container, timeout=grace + 90)
        took = time.monotonic() - start
        state = json.loads(podman("inspect", "--format", "{{json .State}}", played.container).stdout)
        assert took < grace and state["ExitCode"] != 137, (
            f"{played.container}: stopped {took:.1f}s after SIGTERM (grace {grace}s), exit code {state['ExitCode']}\n"
            f"{played.logs()}")
