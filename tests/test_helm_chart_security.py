"""The chart's Redis security and durability, the storage allow-list and disruption settings: real
`helm template` renders, the rendered Redis start script run for real with redis-server, and
`helm install` + `helm upgrade` into a real kube-apiserver keeping the generated password."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import redis

from embedjob.dev.services import free_port, stop_process, wait_for_port
from tests.test_helm_chart import CHART, POLICY, RELEASE, containers, env_of, helm, kinds, pod_specs, render

REDIS = f"{RELEASE}-embedjob-redis"
AUTH_SECRET = f"{RELEASE}-embedjob-redis-auth"


def redis_pod(docs):  # noqa: ANN001, ANN201
    return pod_specs(docs)[REDIS]


def app_containers(docs):  # noqa: ANN001, ANN201
    return [c for _, c in containers(docs) if c["name"] in ("operator", "worker")]


# -- password ---------------------------------------------------------------------------------------------
def test_default_generates_a_password_secret_and_every_component_uses_it():
    docs = render()
    (secret,) = [d for d in kinds(docs, "Secret") if d["metadata"]["name"] == AUTH_SECRET]
    password = base64.b64decode(secret["data"]["redis-password"]).decode()
    assert len(password) == 40 and password.isalnum()
    assert password not in json.dumps(kinds(docs, "Deployment"))  # only a reference in the pods
    for c in app_containers(docs):
        env = env_of(c)
        assert env["EMBEDJOB_REDIS_PASSWORD"] == {"secretKeyRef": {"name": AUTH_SECRET, "key": "redis-password"}}
        assert env["EMBEDJOB_REDIS_URL"] == f"redis://{REDIS}:6379/0"  # no password in the URL
    pod = redis_pod(docs)
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["auth"]["secret"] == {"secretName": AUTH_SECRET, "defaultMode": 0o440,
                                      "items": [{"key": "redis-password", "path": "password"}]}
    assert vols["run"]["emptyDir"]["medium"] == "Memory"  # the config with the password never hits a disk
    (c,) = pod["containers"]
    assert "requirepass" in c["args"][0] and "/etc/redis-auth/password" in c["args"][0]
    assert "env" not in c  # not in the environment either
    assert "REDISCLI_AUTH" in " ".join(c["readinessProbe"]["exec"]["command"])


def test_existing_secret_is_used_and_nothing_is_generated():
    docs = render("redis.auth.existingSecret=my-redis", "redis.auth.existingSecretPasswordKey=pw")
    assert not [d for d in kinds(docs, "Secret") if d["metadata"]["name"] == AUTH_SECRET]
    for c in app_containers(docs):
        assert env_of(c)["EMBEDJOB_REDIS_PASSWORD"] == {"secretKeyRef": {"name": "my-redis", "key": "pw"}}
    vols = {v["name"]: v for v in redis_pod(docs)["volumes"]}
    assert vols["auth"]["secret"]["secretName"] == "my-redis"
    assert vols["auth"]["secret"]["items"] == [{"key": "pw", "path": "password"}]


def test_auth_can_be_turned_off_explicitly():
    docs = render("redis.auth.enabled=false")
    assert not [d for d in kinds(docs, "Secret") if d["metadata"]["name"] == AUTH_SECRET]
    assert all("EMBEDJOB_REDIS_PASSWORD" not in env_of(c) for c in app_containers(docs))
    assert "auth" not in {v["name"] for v in redis_pod(docs)["volumes"]}


def test_external_redis_with_a_password_secret_and_a_tls_ca():
    docs = render("redis.enabled=false", "redis.url=rediss://redis.example:6380/0", "redis.auth.existingSecret=ext",
                  "redis.tls.caConfigMap=redis-ca", "redis.tls.caKey=ca.pem")
    assert REDIS not in pod_specs(docs) and not kinds(docs, "Secret")
    assert REDIS not in {d["metadata"]["name"] for d in kinds(docs, "NetworkPolicy")}
    for pod_name in (f"{RELEASE}-embedjob-operator", f"{RELEASE}-embedjob-worker"):
        pod = pod_specs(docs)[pod_name]
        (c,) = pod["containers"]
        env = env_of(c)
        assert env["EMBEDJOB_REDIS_URL"] == "rediss://redis.example:6380/0"
        assert env["EMBEDJOB_REDIS_PASSWORD"] == {"secretKeyRef": {"name": "ext", "key": "redis-password"}}
        assert env["EMBEDJOB_REDIS_CA_FILE"] == "/etc/embedjob/redis-ca/ca.pem"
        assert {"name": "redis-ca", "mountPath": "/etc/embedjob/redis-ca", "readOnly": True} in c["volumeMounts"]
        vols = {v["name"]: v for v in pod["volumes"]}
        assert vols["redis-ca"]["configMap"] == {"name": "redis-ca", "items": [{"key": "ca.pem", "path": "ca.pem"}]}
    # an external Redis without a password Secret: none is invented
    docs = render("redis.enabled=false", "redis.url=redis://r:6379/0")
    assert all("EMBEDJOB_REDIS_PASSWORD" not in env_of(c) for c in app_containers(docs))


# -- durability -------------------------------------------------------------------------------------------
def test_aof_noeviction_always_and_a_pvc_when_persistence_is_on():
    docs = render()
    script = redis_pod(docs)["containers"][0]["args"][0]
    for opt in ("--appendonly yes", "--maxmemory-policy noeviction", "--dir /data"):
        assert opt in script
    assert {"name": "data", "emptyDir": {"sizeLimit": "8Gi"}} in redis_pod(docs)["volumes"]
    assert not kinds(docs, "PersistentVolumeClaim")

    docs = render("redis.persistence.enabled=true", "redis.persistence.size=20Gi",
                  "redis.persistence.storageClass=fast-ssd", "redis.maxmemory=1536mb")
    (pvc,) = kinds(docs, "PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == REDIS and pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert pvc["spec"] == {"accessModes": ["ReadWriteOnce"], "storageClassName": "fast-ssd",
                           "resources": {"requests": {"storage": "20Gi"}}}
    assert {"name": "data", "persistentVolumeClaim": {"claimName": REDIS}} in redis_pod(docs)["volumes"]
    assert "--maxmemory 1536mb" in redis_pod(docs)["containers"][0]["args"][0]
    redis_deploy = next(d for d in kinds(docs, "Deployment") if d["metadata"]["name"] == REDIS)
    assert redis_deploy["spec"]["strategy"] == {"type": "Recreate"}  # never two Redis on one AOF

    docs = render("redis.persistence.enabled=true", "redis.persistence.existingClaim=my-aof")
    assert not kinds(docs, "PersistentVolumeClaim")
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "my-aof"}} in redis_pod(docs)["volumes"]


def _run_start_script(script: str, base: Path, password: str | None, port: int) -> subprocess.Popen:
    """The chart's Redis container command, run here: its fixed paths mapped into ``base``."""
    (base / "data").mkdir(parents=True)
    (base / "run").mkdir()
    (base / "auth").mkdir()
    if password is not None:
        (base / "auth" / "password").write_text(password)
    local = (script.replace("/etc/redis-auth/", f"{base}/auth/").replace("/run/redis/", f"{base}/run/")
             .replace("--dir /data", f"--dir {base}/data").replace(f"--port {6379}", f"--port {port} --bind 127.0.0.1"))
    return subprocess.Popen(["/bin/sh", "-c", local], stdout=open(base / "log", "wb"),  # noqa: SIM115
                            stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.skipif(not shutil.which("redis-server"), reason="redis-server not found")
def test_the_rendered_redis_start_script_requires_the_password_and_keeps_it_off_the_command_line(tmp_path):
    script = redis_pod(render())["containers"][0]["args"][0]
    password = 'tricky "pass\\word" $x'  # a user's existingSecret may hold anything
    port = free_port()
    proc = _run_start_script(script, tmp_path, password, port)
    try:
        wait_for_port(port, 20, proc, "redis-server")
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(port=port).set("k", "v")
        r = redis.Redis(port=port, password=password)
        assert r.set("k", "v")
        assert r.config_get("appendonly") == {"appendonly": "yes"}
        assert r.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()  # exec'd: the shell became redis-server
        assert b"redis-server" in cmdline and b"tricky" not in cmdline
        assert oct((tmp_path / "run" / "redis.conf").stat().st_mode & 0o777) == "0o600"
        # the readiness probe's command, with the same mapping, says ready
        probe = redis_pod(render())["containers"][0]["readinessProbe"]["exec"]["command"][2]
        probe = probe.replace("/etc/redis-auth/", f"{tmp_path}/auth/").replace("-p 6379", f"-p {port}")
        if shutil.which("redis-cli"):
            assert subprocess.run(["/bin/sh", "-c", probe], timeout=10).returncode == 0
    finally:
        stop_process(proc, grace=5)


# -- network policy ---------------------------------------------------------------------------------------
def test_network_policy_admits_only_the_operator_and_workers_to_the_redis_port():
    docs = render()
    (np_,) = [d for d in kinds(docs, "NetworkPolicy") if d["metadata"]["name"] == f"{RELEASE}-embedjob-redis"]
    base = {"app.kubernetes.io/name": "embedjob", "app.kubernetes.io/instance": RELEASE}
    assert np_["spec"]["podSelector"] == {"matchLabels": {**base, "app.kubernetes.io/component": "redis"}}
    assert np_["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = np_["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]
    assert rule["from"] == [{"podSelector": {"matchLabels": {**base, "app.kubernetes.io/component": c}}}
                            for c in ("operator", "worker")]
    # the selectors match the pods' own labels
    for d in kinds(docs, "Deployment"):
        labels = d["spec"]["template"]["metadata"]["labels"]
        comp = labels["app.kubernetes.io/component"]
        selector = np_["spec"]["podSelector"] if comp == "redis" else next(
            f["podSelector"] for f in rule["from"] if f["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
            == comp)
        assert selector["matchLabels"].items() <= labels.items()
    assert not [d for d in kinds(render("redis.networkPolicy.enabled=false"), "NetworkPolicy")
                if d["metadata"]["name"] == f"{RELEASE}-embedjob-redis"]


def _policy(docs, component: str):  # noqa: ANN001, ANN202
    (np_,) = [d for d in kinds(docs, "NetworkPolicy") if d["metadata"]["name"] == f"{RELEASE}-embedjob-{component}"]
    return np_["spec"]


def test_operator_and_worker_policies_admit_metrics_from_prometheus_only_and_limit_worker_egress():
    docs = render("s3.endpoint=http://seaweedfs-s3:8333")
    prometheus = [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}]
    base = {"app.kubernetes.io/name": "embedjob", "app.kubernetes.io/instance": RELEASE}
    op, worker = _policy(docs, "operator"), _policy(docs, "worker")
    assert op["podSelector"] == {"matchLabels": {**base, "app.kubernetes.io/component": "operator"}}
    assert op["policyTypes"] == ["Ingress"] and worker["policyTypes"] == ["Ingress", "Egress"]
    for spec in (op, worker):
        assert spec["ingress"] == [{"from": prometheus, "ports": [{"protocol": "TCP", "port": 9100}]}]
    dns, to_redis, s3 = worker["egress"]
    assert dns == {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}
    assert to_redis == {"to": [{"podSelector": {"matchLabels": {**base, "app.kubernetes.io/component": "redis"}}}],
                        "ports": [{"protocol": "TCP", "port": 6379}]}
    assert s3 == {"ports": [{"protocol": "TCP", "port": 8333}, {"protocol": "TCP", "port": 443}]}  # + the hub
    # offline: the S3 port only; probes from listed node CIDRs; an external Redis; a narrowed S3 peer
    docs = render("s3.endpoint=https://s3.internal", "models.offline=true", "networkPolicy.nodeCIDRs[0]=10.1.0.0/16",
                  "redis.enabled=false", "redis.url=redis://r.example:6380/0",
                  "networkPolicy.worker.redis.ports[0].port=6380",
                  "networkPolicy.worker.s3.to[0].ipBlock.cidr=10.9.0.0/16", "metrics.enabled=false")
    worker = _policy(docs, "worker")
    assert worker["ingress"] == [{"from": [{"ipBlock": {"cidr": "10.1.0.0/16"}}],
                                  "ports": [{"protocol": "TCP", "port": 8081}]}]
    _, to_redis, s3 = worker["egress"]
    assert to_redis == {"ports": [{"port": 6380}]}
    assert s3 == {"ports": [{"protocol": "TCP", "port": 443}], "to": [{"ipBlock": {"cidr": "10.9.0.0/16"}}]}
    assert _policy(render("metrics.enabled=false"), "operator")["ingress"] == []  # nothing may connect
    assert not [d for d in kinds(render("networkPolicy.enabled=false"), "NetworkPolicy")
                if d["metadata"]["name"] != f"{RELEASE}-embedjob-redis"]


def test_every_emptydir_has_a_size_limit_and_metrics_bind_where_told():
    for sets in ((), ("worker.modelCache.sizeLimit=", "worker.shm.sizeLimit=", "metrics.bindAddress=10.0.0.1")):
        docs = render(*sets)
        for name, pod in pod_specs(docs).items():
            for v in pod["volumes"]:
                if "emptyDir" in v:
                    assert v["emptyDir"].get("sizeLimit"), (name, v)
        for c in app_containers(docs):
            assert env_of(c)["EMBEDJOB_METRICS_ADDR"] == ("10.0.0.1" if sets else "0.0.0.0")


def test_workers_never_fetch_hub_kernels_and_offline_mode_sets_the_hub_offline():
    (worker,) = [c for c in app_containers(render()) if c["name"] == "worker"]
    assert env_of(worker)["USE_HUB_KERNELS"] == "0" and "HF_HUB_OFFLINE" not in env_of(worker)
    (worker,) = [c for c in app_containers(render("models.offline=true")) if c["name"] == "worker"]
    assert env_of(worker)["HF_HUB_OFFLINE"] == "1"


# -- storage allow-list -----------------------------------------------------------------------------------
def test_storage_allow_list_goes_to_operator_and_workers_as_json_and_local_paths_are_refused():
    docs = render("storageAllowList.team-a[0]=s3://team-a/", "storageAllowList.\\*[0]=s3://shared-datasets/")
    for c in app_containers(docs):
        env = env_of(c)
        assert json.loads(env["EMBEDJOB_STORAGE_ALLOW_LIST"]) == {"*": ["s3://shared-datasets/"],
                                                                   "team-a": ["s3://team-a/"]}
        assert env["EMBEDJOB_ALLOW_LOCAL_PATHS"] == "false"
        assert env["EMBEDJOB_MODEL_DIR"] == "/models"  # model.path may name a folder of the model cache
    r = helm("template", RELEASE, str(CHART), "--set", "storageAllowList.team-a[0]=/data/", check=False)
    assert r.returncode != 0 and "storageAllowList" in r.stderr


def test_watching_every_namespace_without_a_storage_policy_does_not_render():
    r = helm("template", RELEASE, str(CHART), check=False)
    assert r.returncode != 0
    for words in ("a storage policy is required", "storageNamespaceBuckets", "storageAllowList",
                  '{"*":["*"]}'):
        assert words in r.stderr, r.stderr
    r = helm("lint", "--strict", str(CHART), check=False)
    assert "a storage policy is required" in r.stdout + r.stderr
    # one watched namespace (one tenant): the opt-out, endpoint still pinned
    for c in app_containers(render("operator.watchNamespace=team-a")):
        assert json.loads(env_of(c)["EMBEDJOB_STORAGE_ALLOW_LIST"]) == {"*": ["*"]}


def test_namespace_buckets_give_each_namespace_its_own_folder_and_the_programs_agree():
    from embedjob.access import AccessPolicy, StorageNotAllowed
    from embedjob.settings import Settings

    docs = render("storageNamespaceBuckets[0]=tenants", "storageNamespaceBuckets[1]=scratch",
                  "storageAllowList.\\*[0]=s3://shared/", "storageEndpoints[0]=https://s3.other.example",
                  "models.allowList[0]=openai/clip-vit-large-patch14@32bd64288804d66eefd0ccbe215aa642df71cc41",
                  "limits.maxImagePixels=150000000", "worker.resources.requests.cpu=3500m")
    for c in app_containers(docs):
        env = {k: v for k, v in env_of(c).items() if isinstance(v, str)}
        assert json.loads(env["EMBEDJOB_STORAGE_ALLOW_LIST"]) == {
            "*": ["s3://shared/", "s3://tenants/{namespace}/", "s3://scratch/{namespace}/"]}
        s = Settings.from_env(env)
        assert (s.max_image_pixels, s.max_num_threads, s.max_shards) == (150_000_000, 3, 1_000_000)
        assert (s.max_tar_header_bytes, s.max_sidecar_bytes, s.max_metadata_bytes) == (64 << 10, 1 << 20, 64 << 20)
        assert s.model_allow_list == (("openai/clip-vit-large-patch14", "32bd64288804d66eefd0ccbe215aa642df71cc41"),)
        p = AccessPolicy.from_settings(s)
        p.check("spec.input.uri", "s3://tenants/team-a/in/", "team-a")
        p.check("spec.output.uri", "s3://scratch/team-a/out/", "team-a")
        with pytest.raises(StorageNotAllowed):
            p.check("spec.input.uri", "s3://tenants/team-b/in/", "team-a")
        p.check_endpoint("spec.storage.endpoint", "https://s3.other.example")
        with pytest.raises(StorageNotAllowed):
            p.check_endpoint("spec.storage.endpoint", "http://attacker.example:9000")


def test_the_rendered_env_is_what_the_programs_accept():
    """The operator's and workers' settings parse the chart's values (a bad JSON would stop them)."""
    from embedjob.settings import Settings

    docs = render("storageAllowList.team-a[0]=s3://team-a/")
    for c in app_containers(docs):
        env = {k: v for k, v in env_of(c).items() if isinstance(v, str)}
        s = Settings.from_env(env)
        assert s.storage_allow_list == (("team-a", ("s3://team-a/",)),) and s.allow_local_paths is False


# -- disruption -------------------------------------------------------------------------------------------
def test_worker_pdb_option_and_the_operator_never_runs_twice():
    assert not kinds(render(), "PodDisruptionBudget")
    (pdb,) = kinds(render("worker.pdb.enabled=true"), "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "worker"
    (pdb,) = kinds(render("worker.pdb.enabled=true", "worker.pdb.minAvailable=50%", "worker.pdb.maxUnavailable="),
                   "PodDisruptionBudget")
    assert pdb["spec"] == {"minAvailable": "50%", "selector": pdb["spec"]["selector"]}
    r = helm("template", RELEASE, str(CHART), "--set", POLICY, "--set", "worker.pdb.enabled=true", "--set",
             "worker.pdb.minAvailable=1", check=False)
    assert r.returncode != 0 and "not both" in r.stderr
    op = next(d for d in kinds(render(), "Deployment") if d["metadata"]["name"] == f"{RELEASE}-embedjob-operator")
    assert op["spec"]["replicas"] == 1 and op["spec"]["strategy"] == {"type": "Recreate"}


# -- the generated password survives `helm upgrade` (real apiserver) --------------------------------------------
@pytest.mark.e2e
def test_generated_password_is_kept_across_helm_upgrade(tmp_path):
    from embedjob.dev.cluster import DevCluster

    kube = DevCluster(tmp_path / "kube").start()
    try:
        kc = f"--kubeconfig={kube.kubeconfig}"
        ns = "pw-upgrade"

        def password() -> str:
            out = kube.kubectl("get", "secret", AUTH_SECRET, "-n", ns, "-o", "json").stdout
            return base64.b64decode(json.loads(out)["data"]["redis-password"]).decode()

        helm("install", RELEASE, str(CHART), "--namespace", ns, "--create-namespace", kc, "--skip-crds",
             "--set", POLICY)
        first = password()
        helm("upgrade", RELEASE, str(CHART), "--namespace", ns, kc, "--set", "worker.replicas=3", "--skip-crds",
             "--set", POLICY)
        assert password() == first and len(first) == 40
        deploy = json.loads(kube.kubectl("get", "deployment", f"{RELEASE}-embedjob-worker", "-n", ns, "-o",
                                         "json").stdout)
        assert deploy["spec"]["replicas"] == 3  # the upgrade really happened
        np_ = json.loads(kube.kubectl("get", "networkpolicy", REDIS, "-n", ns, "-o", "json").stdout)
        assert np_["spec"]["policyTypes"] == ["Ingress"]  # the apiserver accepts the policy as rendered
    finally:
        kube.stop()


