"""The Helm chart (charts/embedjob): real `helm lint` / `helm template`, then `helm install` into a REAL
kube-apiserver (embedjob.dev.cluster) whose static tokens act as the chart's ServiceAccounts, so
RBAC is checked as the apiserver enforces it, and the operator is run under its ServiceAccount's rights to
show that they are enough to reconcile a job.

There is no scheduler or kubelet: installed Deployments are stored, no pod runs. The operator runs as a
local process with the command line and settings the chart renders for its container.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from embedjob.dev.cluster import DevCluster, cache_dir
from embedjob.dev.services import embedjob_command, free_port, stop_process, wait_for_port
from tests.conftest import subprocess_env

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "embedjob"
CRD_NAME = "embeddingjobs.embedjob.io"

# Two releases: one watching every namespace (ClusterRole), one watching only TEAM_NS (Role).
NS, RELEASE = "embedjob", "ej"
SCOPED_NS, SCOPED_RELEASE, TEAM_NS = "embedjob-scoped", "scoped", "team-a"
OPERATOR_SA, WORKER_SA = f"{RELEASE}-embedjob-operator", f"{RELEASE}-embedjob-worker"
SCOPED_OPERATOR_SA = f"{SCOPED_RELEASE}-embedjob-operator"
SECRET_VALUES = ("AKIA-NEVER-RENDERED", "very-secret-never-rendered")
# Watching every namespace needs a storage policy (the chart fails closed): the renders and installs
# here use the explicit opt-out unless a test names a policy (or one namespace) itself.
POLICY = "storageAllowList.\\*[0]=*"


def with_policy(sets: tuple[str, ...] | list[str]) -> list[str]:
    named = any(s.startswith("storage") or s.startswith("operator.watchNamespace=") for s in sets)
    return list(sets) if named else [POLICY, *sets]


def helm_binary() -> str:
    found = shutil.which("helm") or str(cache_dir() / "bin" / "helm")
    if not Path(found).exists():
        pytest.skip("helm not found (scripts/setup.sh installs it into ~/.cache/embedjob/bin)")
    return found


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([helm_binary(), *args], capture_output=True, text=True, timeout=120)
    if check and r.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def render(*sets: str, namespace: str = NS, release: str = RELEASE) -> list[dict[str, Any]]:
    args = ["template", release, str(CHART), "--namespace", namespace]
    for s in with_policy(sets):
        args += ["--set", s]
    return [d for d in yaml.safe_load_all(helm(*args).stdout) if d]


def kinds(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def pod_specs(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in kinds(docs, "Deployment")}


def containers(docs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(pod, c) for pod in pod_specs(docs).values() for c in pod.get("initContainers", []) + pod["containers"]]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


# Value sets the security checks run over: defaults, external Redis, scoped, dev Secret, PVC cache.
VALUE_SETS = [
    (),
    ("keda.enabled=true", "keda.minReplicas=0", "metrics.serviceMonitor.enabled=true",
     "metrics.podMonitor.enabled=true", "metrics.dashboard.enabled=true", "metrics.scrapeAnnotations=true"),
    ("redis.enabled=false", "redis.existingSecret=redis-url"),
    ("operator.watchNamespace=team-a", "worker.shm.enabled=false"),
    ("s3.accessKeyId=dev", "s3.secretAccessKey=devsecret", "worker.modelCache.existingClaim=models"),
]
VALUE_SET_IDS = ["defaults", "observe-and-scale", "external-redis", "scoped", "dev-secret"]


# -- static checks: no cluster ------------------------------------------------------------------------------
def test_chart_crd_is_byte_identical_to_the_canonical_crd():
    assert (CHART / "crds" / f"{CRD_NAME}.yaml").read_bytes() == (REPO / "crds" / f"{CRD_NAME}.yaml").read_bytes()


@pytest.mark.parametrize("sets", VALUE_SETS, ids=VALUE_SET_IDS)
def test_helm_lint_passes_strict(sets):
    args = ["lint", "--strict", str(CHART)]
    for s in with_policy(sets):
        args += ["--set", s]
    r = helm(*args)
    assert "0 chart(s) failed" in r.stdout


def test_worker_requests_one_gpu_as_a_string_and_runs_the_worker_command():
    docs = render("worker.replicas=3", "worker.queue=gpu-a100")
    worker = next(d for d in kinds(docs, "Deployment") if d["metadata"]["name"] == f"{RELEASE}-embedjob-worker")
    assert worker["spec"]["replicas"] == 3
    (c,) = worker["spec"]["template"]["spec"]["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"  # a string: Helm 4 server-side apply needs it
    assert c["args"][:3] == ["worker", "--queue=gpu-a100", "--concurrency=1"]
    env = env_of(c)
    assert env["EMBEDJOB_MODEL_DIR"] == "/models"
    assert env["EMBEDJOB_REDIS_URL"] == f"redis://{RELEASE}-embedjob-redis:6379/0"
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["model-cache"] == "/models" and mounts["dshm"] == "/dev/shm" and mounts["tmp"] == "/tmp"
    vols = {v["name"]: v for v in worker["spec"]["template"]["spec"]["volumes"]}
    assert vols["dshm"]["emptyDir"]["medium"] == "Memory" and "emptyDir" in vols["model-cache"]
    # every quantity anywhere is a string, also ones given as numbers on the command line
    docs = render("worker.resources.limits.cpu=8", "worker.resources.limits.nvidia\\.com/gpu=2")
    for _, c in containers(docs):
        for section in c["resources"].values():
            assert all(isinstance(q, str) for q in section.values()), section


def _worker_container(*sets: str) -> dict[str, Any]:
    docs = render(*sets)
    worker = next(d for d in kinds(docs, "Deployment") if d["metadata"]["name"] == f"{RELEASE}-embedjob-worker")
    (c,) = worker["spec"]["template"]["spec"]["containers"]
    return c


def test_multi_gpu_pods_run_one_pinned_process_per_gpu_and_request_them_all():
    c = _worker_container("worker.gpusPerPod=4", "worker.resources.limits.cpu=16")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "4" and c["resources"]["limits"]["cpu"] == "16"
    assert c["args"][:4] == ["worker", "--queue=embedjob", "--concurrency=4", "--gpus=4"]
    c = _worker_container()
    assert "--gpus=4" not in c["args"] and "--concurrency=1" in c["args"]
    assert not any(a.startswith(("--gpus", "--processes-per-gpu")) for a in c["args"])


def test_processes_per_gpu_multiply_the_pool_and_request_only_the_gpus():
    c = _worker_container("worker.gpusPerPod=2", "worker.processesPerGpu=3")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert c["args"][:5] == ["worker", "--queue=embedjob", "--concurrency=6", "--gpus=2", "--processes-per-gpu=3"]
    c = _worker_container("worker.processesPerGpu=2")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert c["args"][:4] == ["worker", "--queue=embedjob", "--concurrency=2", "--processes-per-gpu=2"]


def test_worker_probes_and_shutdown_deadline_below_the_grace_period():
    c = _worker_container("worker.terminationGracePeriodSeconds=1800", "worker.preloadModel=/models/clip")
    env = env_of(c)
    assert env["EMBEDJOB_SHUTDOWN_DEADLINE"] == "1770" and env["EMBEDJOB_PRELOAD_MODEL"] == "/models/clip"
    assert env["EMBEDJOB_HEALTH_PORT"] == "8081" and env["EMBEDJOB_HEALTH_DIR"].startswith("/tmp/")
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert {"name": "health", "containerPort": 8081, "protocol": "TCP"} in c["ports"]
    assert env_of(_worker_container("worker.terminationGracePeriodSeconds=40"))["EMBEDJOB_SHUTDOWN_DEADLINE"] == "20"
    env = env_of(_worker_container("worker.shutdownDeadlineSeconds=100"))
    assert env["EMBEDJOB_SHUTDOWN_DEADLINE"] == "100" and "EMBEDJOB_PRELOAD_MODEL" not in env


def test_worker_options_nodeselector_tolerations_pvc_cache():
    docs = render("worker.nodeSelector.gpu=a100", "worker.tolerations[0].key=nvidia.com/gpu",
                  "worker.tolerations[0].operator=Exists", "worker.tolerations[0].effect=NoSchedule",
                  "worker.modelCache.existingClaim=clip-models", "worker.modelCache.readOnly=true",
                  "worker.shm.enabled=false")
    pod = pod_specs(docs)[f"{RELEASE}-embedjob-worker"]
    assert pod["nodeSelector"] == {"gpu": "a100"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["model-cache"] == {"name": "model-cache",
                                   "persistentVolumeClaim": {"claimName": "clip-models", "readOnly": True}}
    assert "dshm" not in vols


@pytest.mark.parametrize("sets", VALUE_SETS, ids=VALUE_SET_IDS)
def test_every_container_runs_non_root_without_privilege_escalation(sets):
    docs = render(*sets)
    assert len(containers(docs)) >= 2
    for pod, c in containers(docs):
        psc, sc = pod["securityContext"], c["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 10001
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001
        assert sc["allowPrivilegeEscalation"] is False and sc.get("privileged", False) is False
        assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
        assert sc["readOnlyRootFilesystem"] is True
        # a read-only root needs a writable /tmp (HOME points there for the Python processes)
        if c["name"] != "redis":
            assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"] and env_of(c)["HOME"] == "/tmp"


def test_existing_secrets_keep_every_credential_out_of_the_manifests():
    sets = ("s3.existingSecret=s3-creds", "redis.enabled=false", "redis.existingSecret=redis-creds",
            f"s3.accessKeyId={SECRET_VALUES[0]}", f"s3.secretAccessKey={SECRET_VALUES[1]}",
            "s3.endpoint=http://seaweedfs-s3:8333", "s3.region=eu-west-1")
    args = ["template", RELEASE, str(CHART), "--namespace", NS]
    for s in with_policy(sets):
        args += ["--set", s]
    text = helm(*args).stdout
    for v in SECRET_VALUES:
        assert v not in text and base64.b64encode(v.encode()).decode() not in text
    docs = [d for d in yaml.safe_load_all(text) if d]
    assert not kinds(docs, "Secret")
    for _, c in containers(docs):
        env = env_of(c)
        assert env["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"}}
        assert env["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "s3-creds", "key": "AWS_SECRET_ACCESS_KEY"}}
        assert env["EMBEDJOB_REDIS_URL"] == {"secretKeyRef": {"name": "redis-creds", "key": "url"}}
        assert env["AWS_ENDPOINT_URL"] == "http://seaweedfs-s3:8333" and env["AWS_REGION"] == "eu-west-1"
    assert {d["metadata"]["name"] for d in kinds(docs, "Deployment")} == {f"{RELEASE}-embedjob-operator",
                                                                         f"{RELEASE}-embedjob-worker"}


def test_dev_credentials_from_values_go_into_a_chart_secret_not_into_pod_specs():
    docs = render("s3.accessKeyId=devkey", "s3.secretAccessKey=devsecret")
    (secret,) = [d for d in kinds(docs, "Secret") if d["metadata"]["name"] == f"{RELEASE}-embedjob-s3"]
    assert base64.b64decode(secret["data"]["AWS_SECRET_ACCESS_KEY"]).decode() == "devsecret"
    assert "devsecret" not in json.dumps(kinds(docs, "Deployment"))
    for _, c in containers(docs):
        if c["name"] != "redis":
            assert env_of(c)["AWS_SECRET_ACCESS_KEY"]["secretKeyRef"]["name"] == secret["metadata"]["name"]


def test_missing_broker_settings_fail_with_a_clear_message():
    r = helm("template", RELEASE, str(CHART), "--set", POLICY, "--set", "redis.enabled=false", check=False)
    assert r.returncode != 0 and "redis.url or redis.existingSecret is required" in r.stderr


def test_workers_get_no_kubernetes_api_access():
    docs = render()
    (worker_sa,) = [d for d in kinds(docs, "ServiceAccount") if d["metadata"]["name"] == WORKER_SA]
    assert worker_sa["automountServiceAccountToken"] is False
    pods = pod_specs(docs)
    worker = pods[f"{RELEASE}-embedjob-worker"]
    assert worker["serviceAccountName"] == WORKER_SA and worker["automountServiceAccountToken"] is False
    assert pods[f"{RELEASE}-embedjob-redis"]["automountServiceAccountToken"] is False
    for binding in kinds(docs, "RoleBinding") + kinds(docs, "ClusterRoleBinding"):
        assert [s["name"] for s in binding["subjects"]] == [OPERATOR_SA]


def test_operator_runs_standalone_with_liveness_probe_and_one_replica():
    docs = render("operator.watchNamespace=team-a")
    op = next(d for d in kinds(docs, "Deployment") if d["metadata"]["name"] == f"{RELEASE}-embedjob-operator")
    assert op["spec"]["replicas"] == 1 and op["spec"]["strategy"] == {"type": "Recreate"}
    (c,) = op["spec"]["template"]["spec"]["containers"]
    assert c["args"] == ["operator", "--liveness=http://0.0.0.0:8080/healthz", "--loglevel=info",
                         "--namespace=team-a"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "liveness"}
    assert {"name": "liveness", "containerPort": 8080, "protocol": "TCP"} in c["ports"]


def test_metrics_ports_env_and_operator_metrics_service():
    docs = render("metrics.scrapeAnnotations=true")
    deps = {d["metadata"]["name"]: d for d in kinds(docs, "Deployment")}
    for component in ("operator", "worker"):
        pod = deps[f"{RELEASE}-embedjob-{component}"]["spec"]["template"]
        (c,) = pod["spec"]["containers"]
        assert {"name": "metrics", "containerPort": 9100, "protocol": "TCP"} in c["ports"]
        assert env_of(c)["EMBEDJOB_METRICS_PORT"] == "9100"
        assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == "9100"
    (worker_c,) = deps[f"{RELEASE}-embedjob-worker"]["spec"]["template"]["spec"]["containers"]
    assert env_of(worker_c)["EMBEDJOB_METRICS_DIR"].startswith("/tmp/")  # the writable emptyDir
    (svc,) = [d for d in kinds(docs, "Service") if d["metadata"]["name"] == f"{RELEASE}-embedjob-operator-metrics"]
    assert svc["spec"]["selector"]["app.kubernetes.io/component"] == "operator"
    assert svc["spec"]["ports"] == [{"name": "metrics", "port": 9100, "targetPort": "metrics", "protocol": "TCP"}]
    # off by default: no KEDA, no prometheus-operator objects, no dashboard, no scrape annotations
    defaults = render()
    assert not [d for d in defaults if d["kind"] in ("ScaledObject", "TriggerAuthentication", "ServiceMonitor",
                                                       "PodMonitor")]
    assert not [d for d in kinds(defaults, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    worker = pod_specs(defaults)[f"{RELEASE}-embedjob-worker"]
    assert "prometheus.io/scrape" not in str(worker)
    off = render("metrics.enabled=false")
    assert all("EMBEDJOB_METRICS_PORT" not in env_of(c) for _, c in containers(off))


def test_keda_scales_workers_from_zero_on_the_operator_demand_metric():
    docs = render("keda.enabled=true", "keda.minReplicas=0", "keda.maxReplicas=8", "worker.queue=gpu-a100",
                  "keda.cooldownPeriod=900", "worker.replicas=3")
    (so,) = kinds(docs, "ScaledObject")
    spec = so["spec"]
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                      "name": f"{RELEASE}-embedjob-worker"}
    assert spec["minReplicaCount"] == 0 and spec["maxReplicaCount"] == 8 and spec["cooldownPeriod"] == 900
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    query = trigger["metadata"]["query"]
    assert 'embedjob_queue_demand_shards{queue="gpu-a100"}' in query  # waiting + running, from the operator
    assert "llen" not in query.lower() and "embedjob_queue_messages" not in query  # never the raw list length
    assert trigger["metadata"]["threshold"] == "1" and trigger["metadata"]["activationThreshold"] == "0"
    assert trigger["metadata"]["ignoreNullValues"] == "false"  # no data (operator down) never reads as 0
    assert "authenticationRef" not in trigger and not kinds(docs, "TriggerAuthentication")
    assert "fallback" not in spec
    with_fallback = kinds(render("keda.enabled=true", "keda.fallbackReplicas=2"), "ScaledObject")[0]["spec"]
    assert with_fallback["fallback"] == {"failureThreshold": 3, "replicas": 2}
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert behavior["stabilizationWindowSeconds"] == 300
    # the HPA owns the replica count: an upgrade must not reset it
    worker = next(d for d in kinds(docs, "Deployment") if d["metadata"]["name"] == f"{RELEASE}-embedjob-worker")
    assert "replicas" not in worker["spec"]


def test_keda_credentials_come_from_an_existing_secret_through_a_trigger_authentication():
    docs = render("keda.enabled=true", "keda.prometheus.authModes=bearer", "keda.prometheus.authSecret=prom-token",
                  "keda.prometheus.authSecretKeys.bearerToken=token")
    (ta,) = kinds(docs, "TriggerAuthentication")
    assert ta["spec"]["secretTargetRef"] == [{"parameter": "bearerToken", "name": "prom-token", "key": "token"}]
    (trigger,) = kinds(docs, "ScaledObject")[0]["spec"]["triggers"]
    assert trigger["authenticationRef"] == {"name": ta["metadata"]["name"]}
    assert trigger["metadata"]["authModes"] == "bearer"
    r = helm("template", RELEASE, str(CHART), "--set", POLICY, "--set", "keda.enabled=true",
             "--set", "keda.prometheus.authModes=basic", check=False)
    assert r.returncode != 0 and "TriggerAuthentication" in r.stderr
    r = helm("template", RELEASE, str(CHART), "--set", POLICY, "--set", "keda.enabled=true",
             "--set", "metrics.enabled=false", check=False)
    assert r.returncode != 0 and "keda.enabled needs metrics.enabled" in r.stderr


def test_values_schema_refuses_bad_scaling_values_and_typos():
    for bad, message in (("keda.minReplicas=-1", "minReplicas"), ("keda.maxReplicas=0", "maxReplicas"),
                         ("metrics.workerPort=70000", "workerPort"), ("kedaa.enabled=true", "kedaa"),
                         ("worker.concurrency=0", "concurrency"), ("worker.processesPerGpu=0", "processesPerGpu")):
        r = helm("template", RELEASE, str(CHART), "--set", POLICY, "--set", bad, check=False)
        assert r.returncode != 0 and message in r.stderr, (bad, r.stderr)
    r = helm("template", RELEASE, str(CHART), "--set", POLICY, "--set", "keda.enabled=true",
             "--set", "keda.minReplicas=5", "--set", "keda.maxReplicas=2", check=False)
    assert r.returncode != 0 and "minReplicas must not exceed" in r.stderr


def test_prometheus_operator_monitors_and_the_dashboard_configmap():
    docs = render("metrics.serviceMonitor.enabled=true", "metrics.podMonitor.enabled=true",
                  "metrics.dashboard.enabled=true", "metrics.serviceMonitor.labels.release=kps")
    (sm,) = kinds(docs, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "kps"
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    assert sm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "operator"
    (pm,) = kinds(docs, "PodMonitor")
    assert pm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "worker"
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    (cm,) = [d for d in kinds(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["embedjob.json"])
    assert dashboard == json.loads((CHART / "dashboards" / "embedjob.json").read_text())


def test_rbac_is_namespaced_when_one_namespace_is_watched():
    def job_rules(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
        return [d for d in kinds(docs, kind)
                if any("embeddingjobs" in r["resources"] for r in d["rules"])]

    scoped = render("operator.watchNamespace=team-a")
    (role,) = job_rules(scoped, "Role")
    assert role["metadata"]["namespace"] == "team-a" and not job_rules(scoped, "ClusterRole")
    (rb,) = kinds(scoped, "RoleBinding")
    assert rb["metadata"]["namespace"] == "team-a" and rb["subjects"][0]["namespace"] == NS
    everywhere = render()
    assert len(job_rules(everywhere, "ClusterRole")) == 1 and not kinds(everywhere, "Role")
    # nothing in the chart grants access to Secrets, Pods or wildcards
    for d in kinds(scoped, "Role") + kinds(scoped, "ClusterRole") + kinds(everywhere, "ClusterRole"):
        for rule in d["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
            assert not {"secrets", "pods", "configmaps"} & set(rule["resources"])


# -- against a real kube-apiserver ------------------------------------------------------------------------
def _sa_line(ns: str, name: str) -> str:
    return f'system:serviceaccount:{ns}:{name},{uuid.uuid4()},"system:serviceaccounts,system:serviceaccounts:{ns}"'


TOKENS = {
    "operator": (uuid.uuid4().hex, _sa_line(NS, OPERATOR_SA)),
    "worker": (uuid.uuid4().hex, _sa_line(NS, WORKER_SA)),
    "scoped-operator": (uuid.uuid4().hex, _sa_line(SCOPED_NS, SCOPED_OPERATOR_SA)),
}


@pytest.fixture(scope="module")
def kube(tmp_path_factory):
    """A real apiserver with static tokens for the chart's ServiceAccounts (no CRD applied: helm does it)."""
    helm_binary()
    c = DevCluster(tmp_path_factory.mktemp("helm-kube"), extra_tokens=dict(TOKENS.values())).start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def installed(kube):
    kc = f"--kubeconfig={kube.kubeconfig}"
    helm("install", RELEASE, str(CHART), "--namespace", NS, "--create-namespace", kc,
         "--set", "s3.existingSecret=s3-creds", "--set", "worker.replicas=2", "--set", POLICY)
    kube.kubectl("create", "namespace", TEAM_NS)
    helm("install", SCOPED_RELEASE, str(CHART), "--namespace", SCOPED_NS, "--create-namespace", kc,
         "--set", f"operator.watchNamespace={TEAM_NS}", "--set", "redis.enabled=false",
         "--set", "redis.url=redis://redis.example:6379/0")
    kube.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s", timeout=70)


def as_token(kube: DevCluster, who: str, *args: str, check: bool = True,
             input: str | None = None) -> subprocess.CompletedProcess:
    return kube.kubectl(f"--token={TOKENS[who][0]}", *args, check=check, input=input)


def can(kube: DevCluster, who: str, verb: str, resource: str, namespace: str | None = None,
        subresource: str | None = None) -> bool:
    args = ["auth", "can-i", verb, resource]
    args += [f"--namespace={namespace}"] if namespace else ["--all-namespaces"]
    if subresource:
        args.append(f"--subresource={subresource}")
    r = as_token(kube, who, *args, check=False)
    assert r.stdout.strip() in ("yes", "no"), r.stderr
    return r.stdout.strip() == "yes"


@pytest.mark.e2e
def test_helm_install_stores_the_objects_and_establishes_the_crd(kube, installed):
    deploys = json.loads(kube.kubectl("get", "deployments", "-n", NS, "-o", "json").stdout)["items"]
    by_name = {d["metadata"]["name"]: d for d in deploys}
    assert set(by_name) == {f"{RELEASE}-embedjob-{x}" for x in ("operator", "worker", "redis")}
    worker = by_name[f"{RELEASE}-embedjob-worker"]
    assert worker["spec"]["replicas"] == 2
    assert worker["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert kube.kubectl("get", "service", f"{RELEASE}-embedjob-redis", "-n", NS).returncode == 0
    sas = kube.kubectl("get", "serviceaccounts", "-n", NS, "-o", "name").stdout.split()
    assert {f"serviceaccount/{OPERATOR_SA}", f"serviceaccount/{WORKER_SA}"} <= set(sas)
    crd = json.loads(kube.kubectl("get", "crd", CRD_NAME, "-o", "json").stdout)
    conds = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conds["Established"] == "True" and conds["NamesAccepted"] == "True"
    releases = helm("list", "-A", "-o", "json", f"--kubeconfig={kube.kubeconfig}").stdout
    assert {(r["name"], r["status"]) for r in json.loads(releases)} == {(RELEASE, "deployed"),
                                                                       (SCOPED_RELEASE, "deployed")}
    # the scoped release put its Role in the watched namespace, and no Redis
    assert kube.kubectl("get", "role", f"{SCOPED_RELEASE}-embedjob-operator", "-n", TEAM_NS).returncode == 0
    assert "redis" not in kube.kubectl("get", "deployments", "-n", SCOPED_NS, "-o", "name").stdout


@pytest.mark.e2e
def test_the_rendered_network_policies_are_accepted_by_the_apiserver(kube, installed):
    names = set(kube.kubectl("get", "networkpolicies", "-n", NS, "-o", "name").stdout.split())
    assert {f"networkpolicy.networking.k8s.io/{RELEASE}-embedjob-{c}" for c in ("operator", "worker", "redis")} <= names
    # every option's shape too: node CIDRs, an external Redis, narrowed DNS and S3 peers, extra egress
    docs = render("networkPolicy.nodeCIDRs[0]=10.1.0.0/16", "redis.enabled=false", "redis.url=redis://r:6380/0",
                  "networkPolicy.worker.redis.to[0].ipBlock.cidr=10.2.0.0/16",
                  "networkPolicy.worker.dns.to[0].namespaceSelector.matchLabels.name=kube-system",
                  "networkPolicy.worker.s3.to[0].ipBlock.cidr=10.3.0.0/16", "s3.endpoint=https://s3.internal:9000",
                  "networkPolicy.worker.extraEgress[0].ports[0].port=8443", namespace=NS, release="np-shapes")
    policies = kinds(docs, "NetworkPolicy")
    assert len(policies) == 2
    r = kube.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                                               "items": policies}))
    assert r.stdout.count("created (server dry run)") == 2, r.stdout


def rules(kube: DevCluster, who: str, namespace: str) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) the apiserver lets ``who`` use in ``namespace`` (a SelfSubjectRulesReview)."""
    review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectRulesReview",
              "spec": {"namespace": namespace}}
    r = as_token(kube, who, "create", "-f", "-", "-o", "json", input=json.dumps(review))
    out = json.loads(r.stdout)["status"]
    assert not out.get("incomplete"), out
    return {(g, res, v) for rule in out["resourceRules"] for g in rule.get("apiGroups", [""])
            for res in rule["resources"] for v in rule["verbs"]}


# What every authenticated user may do (ask the apiserver what it may do); nothing else is expected.
SELF_REVIEW = {("authorization.k8s.io", f"selfsubject{kind}reviews", "create") for kind in ("access", "rules")}
OPERATOR_RULES = (
    {("embedjob.io", "embeddingjobs", v) for v in ("get", "list", "watch", "patch", "delete")}
    | {("embedjob.io", "embeddingjobs/status", v) for v in ("get", "patch")}
    | {("", "events", "create")}
)
KOPF_OBSERVE = {("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("list", "watch")}


@pytest.mark.e2e
def test_operator_service_account_has_exactly_what_it_needs(kube, installed):
    for ns in ("default", TEAM_NS, NS):
        assert rules(kube, "operator", ns) == OPERATOR_RULES | KOPF_OBSERVE | SELF_REVIEW, ns
    # spot checks through the access review API, and a real request refused by the apiserver
    assert can(kube, "operator", "patch", "embeddingjobs.embedjob.io", "default", subresource="status")
    assert can(kube, "operator", "watch", "embeddingjobs.embedjob.io")  # cluster-wide
    for verb, resource, ns in [("get", "secrets", NS), ("create", "pods", NS), ("list", "namespaces", None),
                               ("update", "embeddingjobs.embedjob.io", "default")]:
        assert not can(kube, "operator", verb, resource, ns), (verb, resource)
    r = as_token(kube, "operator", "get", "secrets", "-n", NS, check=False)
    assert r.returncode != 0 and "forbidden" in r.stderr.lower()


@pytest.mark.e2e
def test_scoped_operator_is_confined_to_its_namespace(kube, installed):
    namespaces = {("", "namespaces", v) for v in ("list", "watch")}  # kopf checks its namespace exists
    assert rules(kube, "scoped-operator", TEAM_NS) == OPERATOR_RULES | KOPF_OBSERVE | namespaces | SELF_REVIEW
    for ns in ("default", SCOPED_NS, NS):
        assert rules(kube, "scoped-operator", ns) == KOPF_OBSERVE | namespaces | SELF_REVIEW, ns
    assert not can(kube, "scoped-operator", "list", "embeddingjobs.embedjob.io")  # cluster-wide
    assert can(kube, "scoped-operator", "list", "embeddingjobs.embedjob.io", TEAM_NS)


@pytest.mark.e2e
def test_worker_service_account_can_do_nothing(kube, installed):
    for ns in (NS, "default", TEAM_NS):
        assert rules(kube, "worker", ns) == SELF_REVIEW, ns
    for verb, resource in [("get", "embeddingjobs.embedjob.io"), ("list", "secrets"), ("create", "pods")]:
        assert not can(kube, "worker", verb, resource, NS) and not can(kube, "worker", verb, resource)
    r = as_token(kube, "worker", "get", "embeddingjobs", "-n", NS, check=False)
    assert r.returncode != 0 and "forbidden" in r.stderr.lower()


# -- the operator itself, with nothing but its ServiceAccount's rights -------------------------------------
def sa_kubeconfig(kube: DevCluster, who: str, path: Path) -> Path:
    cfg = json.loads(kube.kubeconfig.read_text())
    cfg["users"] = [{"name": "admin", "user": {"token": TOKENS[who][0]}}]
    path.write_text(json.dumps(cfg))
    path.chmod(0o600)
    return path


def operator_command(kube: DevCluster, namespace: str, release: str, port: int) -> tuple[list[str], dict[str, str]]:
    """The stored operator Deployment's container args and plain env values, for a local process."""
    deploy = json.loads(kube.kubectl("get", "deployment", f"{release}-embedjob-operator", "-n", namespace,
                                     "-o", "json").stdout)
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    args = [f"--liveness=http://127.0.0.1:{port}/healthz" if a.startswith("--liveness=") else a for a in c["args"]]
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e and e["name"] not in ("HOME",)}
    return args, env


@pytest.fixture()
def job_input(s3_env, redis_url):
    """A bucket with two small shards; returns (bucket, stems)."""
    from embedjob.storage import s3_client
    from tests.shards import encode, rgb, tar_bytes

    bucket = f"helm-{uuid.uuid4().hex[:12]}"
    client = s3_client()
    client.create_bucket(Bucket=bucket)
    for i in range(2):
        members = [(f"k{i}_{j}.jpg", encode(rgb(32, 24, seed=i * 10 + j), "JPEG")) for j in range(2)]
        client.put_object(Bucket=bucket, Key=f"in/{i:04d}.tar", Body=tar_bytes(members))
    return bucket


@pytest.mark.e2e
@pytest.mark.parametrize("who,release,ns,job_ns", [("operator", RELEASE, NS, "default"),
                                                   ("scoped-operator", SCOPED_RELEASE, SCOPED_NS, TEAM_NS)],
                         ids=["cluster-wide", "one-namespace"])
def test_operator_reconciles_a_job_with_only_its_service_account(kube, installed, job_input, s3_env, redis_url,
                                                                 tmp_path, who, release, ns, job_ns):
    port = free_port()
    args, chart_env = operator_command(kube, ns, release, port)
    env = {**subprocess_env({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}), **chart_env, **s3_env,
           "EMBEDJOB_REDIS_URL": redis_url,
           "KUBECONFIG": str(sa_kubeconfig(kube, who, tmp_path / "kubeconfig")),
           "EMBEDJOB_OPERATOR_INTERVAL": "1", "EMBEDJOB_LOGLEVEL": "INFO"}
    log_path = tmp_path / "operator.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(embedjob_command(*args), env=env, cwd=tmp_path,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    name = f"helm-{who}"
    try:
        wait_for_port(port, 60, proc, "operator")
        job = {"apiVersion": "embedjob.io/v1alpha1", "kind": "EmbeddingJob",
               "metadata": {"name": name, "namespace": job_ns},
               "spec": {"input": {"uri": f"s3://{job_input}/in/"}, "output": {"uri": f"s3://{job_input}/out/"},
                        "storage": {"endpoint": s3_env["AWS_ENDPOINT_URL"]}, "queue": f"helm-{uuid.uuid4().hex[:8]}"}}
        kube.kubectl("apply", "-f", "-", input=json.dumps(job))
        obj, deadline = None, time.monotonic() + 30
        while time.monotonic() < deadline:
            obj = json.loads(kube.kubectl("get", "embeddingjob", name, "-n", job_ns, "-o", "json").stdout)
            if obj.get("status", {}).get("phase") == "Running":
                break
            time.sleep(0.5)
        status = (obj or {}).get("status", {})
        assert status.get("phase") == "Running", f"status: {status}\n{log_path.read_text()[-3000:]}"
        assert status["shards"]["total"] == 2 and status["shards"]["queued"] == 2
        assert obj["metadata"]["finalizers"] == ["embedjob.io/cleanup"]  # patched the object itself
        events = json.loads(kube.kubectl("get", "events", "-n", job_ns, "--field-selector",
                                         f"involvedObject.name={name}", "-o", "json").stdout)["items"]
        assert {"Planned", "Started"} <= {e["reason"] for e in events}
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
            assert resp.status == 200 and json.loads(resp.read()) == {"redis": True}
        # deletion goes through the operator's finalizer (a patch under the same rights)
        kube.kubectl("delete", "embeddingjob", name, "-n", job_ns, "--timeout=30s", timeout=40)
    finally:
        stop_process(proc, grace=10)
    log = log_path.read_text()
    for refused in ("forbidden", "not enough permissions"):
        assert refused not in log.lower(), f"the operator was refused something ({refused}):\n{log[-3000:]}"


def test_cpu_only_profile_asks_for_no_gpu():
    """The documented CPU-only profile (README: -f charts/embedjob/values-cpu.yaml, with a storage
    policy: the chart fails closed without one, the profile does not change that)."""
    profile = ["-f", str(CHART / "values-cpu.yaml")]
    bare = helm("template", RELEASE, str(CHART), "--namespace", NS, *profile, check=False)
    assert bare.returncode != 0 and "a storage policy is required" in bare.stderr
    args = ["template", RELEASE, str(CHART), "--namespace", NS, *profile,
            "--set", "storageNamespaceBuckets={tenant-data}"]
    docs = [d for d in yaml.safe_load_all(helm(*args).stdout) if d]
    worker = next(d for d in kinds(docs, "Deployment") if d["metadata"]["name"] == f"{RELEASE}-embedjob-worker")
    (c,) = worker["spec"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in c["resources"]["limits"] and "nvidia.com/gpu" not in c["resources"]["requests"]
    assert c["resources"]["limits"]["memory"] == "8Gi" and c["resources"]["requests"]["cpu"] == "2"
    helm("lint", str(CHART), *profile, "--set", "storageNamespaceBuckets={tenant-data}")
