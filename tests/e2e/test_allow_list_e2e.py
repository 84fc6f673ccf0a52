"""The real operator (kopf, on the real apiserver) with the chart's security settings: a
password-protected redis-server reached only through EMBEDJOB_REDIS_PASSWORD, and a storage
allow-list per namespace. A job outside its namespace's prefixes is Failed with a condition naming
the field; the same bucket in the namespace that may use it is planned and dispatched."""

from __future__ import annotations

import json
import time
import urllib.request
import uuid

import pytest
import redis

from embedjob.dev.services import RedisServer
from embedjob.storage import s3_client
from tests.e2e.conftest import Operator
from tests.shards import encode, rgb, tar_bytes

pytestmark = pytest.mark.e2e

ALLOWED_NS, OTHER_NS = "allow-a", "allow-b"


def _get(cluster, ns: str, name: str) -> dict:  # noqa: ANN001
    return json.loads(cluster.kubectl("get", "embeddingjob", name, "-n", ns, "-o", "json").stdout)


def _wait_phase(cluster, ns: str, name: str, phases: tuple[str, ...], timeout: float = 40) -> dict:  # noqa: ANN001
    deadline, obj = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        obj = _get(cluster, ns, name)
        if (obj.get("status") or {}).get("phase") in phases:
            return obj
        time.sleep(0.5)
    raise AssertionError(f"{ns}/{name} never reached {phases}: {obj.get('status')}")


def test_operator_with_redis_password_enforces_the_namespace_allow_list(cluster, e2e_env, tmp_path):
    bucket, other = f"al-{uuid.uuid4().hex[:12]}", f"ao-{uuid.uuid4().hex[:12]}"
    client = s3_client()
    for b in (bucket, other):
        client.create_bucket(Bucket=b)
    for i in range(2):
        members = [(f"k{i}_{j}.jpg", encode(rgb(32, 24, seed=i * 10 + j), "JPEG")) for j in range(2)]
        client.put_object(Bucket=bucket, Key=f"in/{i:04d}.tar", Body=tar_bytes(members))
    for ns in (ALLOWED_NS, OTHER_NS):
        cluster.kubectl("create", "namespace", ns, check=False)

    server = RedisServer(tmp_path / "redis", password=f"pw-{uuid.uuid4().hex}").start()
    env = {**e2e_env, "EMBEDJOB_REDIS_URL": server.url, "EMBEDJOB_REDIS_PASSWORD": server.password,
           "EMBEDJOB_STORAGE_ALLOW_LIST": json.dumps({ALLOWED_NS: [f"s3://{bucket}/"], "*": ["s3://shared-only/"]}),
           "EMBEDJOB_ALLOW_LOCAL_PATHS": "false"}
    (tmp_path / "logs").mkdir()
    operator = Operator(env, tmp_path / "logs", namespaces=(ALLOWED_NS, OTHER_NS))
    queue = f"al-{uuid.uuid4().hex[:6]}"

    def job(ns: str, name: str, out: str) -> None:
        doc = {"apiVersion": "embedjob.io/v1alpha1", "kind": "EmbeddingJob",
               "metadata": {"name": name, "namespace": ns},
               "spec": {"input": {"uri": f"s3://{bucket}/in/"}, "output": {"uri": out}, "queue": queue}}
        cluster.kubectl("apply", "-f", "-", input=json.dumps(doc))

    try:
        operator.start()
        with urllib.request.urlopen(operator.liveness, timeout=5) as resp:
            assert json.loads(resp.read()) == {"redis": True}  # connected with the password
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis.from_url(server.url).keys("*")

        job(OTHER_NS, "not-yours", f"s3://{bucket}/out/")
        job(ALLOWED_NS, "out-elsewhere", f"s3://{other}/out/")
        job(ALLOWED_NS, "allowed", f"s3://{bucket}/out/")

        for ns, name, field in ((OTHER_NS, "not-yours", "spec.input.uri"),
                                (ALLOWED_NS, "out-elsewhere", "spec.output.uri")):
            obj = _wait_phase(cluster, ns, name, ("Failed",))
            cond = next(c for c in obj["status"]["conditions"] if c["type"] == "Failed")
            assert cond["status"] == "True" and cond["reason"] == "StorageNotAllowed", cond
            assert cond["message"].startswith(f"{field}: ") and f"namespace '{ns}'" in cond["message"], cond
            assert "plan" not in obj["status"]

        obj = _wait_phase(cluster, ALLOWED_NS, "allowed", ("Running",))
        assert obj["status"]["shards"]["total"] == 2
        authed = redis.Redis.from_url(server.authed_url, decode_responses=True)
        assert authed.llen(queue) == 2  # dispatched through the password-protected broker
        log = "".join(p.read_text() for p in (tmp_path / "logs").glob("operator-*.log"))
        assert server.password not in log
    finally:
        for ns, name in ((OTHER_NS, "not-yours"), (ALLOWED_NS, "out-elsewhere"), (ALLOWED_NS, "allowed")):
            cluster.kubectl("delete", "embeddingjob", name, "-n", ns, "--wait=false", check=False)
        time.sleep(2)  # let the finalizer run while the operator is up
        operator.stop()
        server.stop()
