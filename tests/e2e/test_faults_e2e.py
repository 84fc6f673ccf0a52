"""Fault tests: real Redis, SeaweedFS (with authentication), Celery workers and the operator on the real
apiserver, each fault injected for real (SIGKILL, restart with and without data, a fault-injecting
proxy in front of S3, a message deleted from the broker). Every test checks the outcome a user would:
the phase, exact outputs, each shard committed exactly once, and the counters.

The stack is this module's own (its own Redis, S3, operator watching only the ``faults`` namespace,
workers on its own queue), so killing its parts never disturbs the other end-to-end tests.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import boto3
import numpy as np
import pytest

from embedjob.progress import ProgressStore, redis_client
from embedjob.results import read_shard
from embedjob.services import RedisServer, SeaweedS3
from embedjob.storage import Storage, StorageOptions
from tests.conftest import S3_KEY, S3_SECRET
from tests.e2e.conftest import Operator, ShardContent, Workers, jpeg, tar_of
from tests.fault_proxy import FaultProxy

pytestmark = pytest.mark.e2e

NS = "faults"
IDENTITIES = {"identities": [{"name": "admin", "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}],
                              "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
TIMINGS: dict[str, float] = {}  # fault -> seconds to recovery (printed at the end of the module)


class FaultStack:
    def __init__(self, cluster, base: Path, model: str) -> None:  # noqa: ANN001
        self.cluster, self.base, self.model = cluster, base, model
        self.redis = RedisServer(base / "redis", appendonly=True).start()
        self._durable()
        self.s3 = SeaweedS3(base / "s3", config=IDENTITIES).start()
        self.proxy = FaultProxy(self.s3.s3_port, seed=6)
        self.queue = f"faults-{uuid.uuid4().hex[:6]}"
        self.env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET,
            "AWS_ENDPOINT_URL": self.proxy.endpoint, "AWS_REGION": "us-east-1",
            "EMBEDJOB_REDIS_URL": self.redis.url, "KUBECONFIG": str(cluster.kubeconfig),
            "EMBEDJOB_LEASE_SECONDS": "3", "EMBEDJOB_OPERATOR_INTERVAL": "1", "EMBEDJOB_VISIBILITY_TIMEOUT": "120",
            "EMBEDJOB_LOST_MESSAGE_GRACE": "3", "EMBEDJOB_S3_MAX_ATTEMPTS": "3", "EMBEDJOB_REDIS_WAIT_SECONDS": "120",
            "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
        }
        self.logs = base / "logs"
        self.logs.mkdir()
        cluster.kubectl("create", "namespace", NS, check=False)
        self.operator = Operator(self.env, self.logs, namespaces=(NS,))
        self.operator.start()
        self.workers = Workers(self.env, self.queue, self.logs, count=2)
        self.workers.ensure()
        self.s3_direct = boto3.client("s3", endpoint_url=self.s3.endpoint, region_name="us-east-1",
                                      aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET)
        self.storage = Storage(StorageOptions(endpoint=self.s3.endpoint, region="us-east-1"))

    # -- faults ------------------------------------------------------------------------------------
    def _durable(self) -> None:
        r = redis_client(self.redis.url)
        r.config_set("appendfsync", "always")  # a SIGKILL loses nothing that was acknowledged
        r.close()

    def kill_redis(self) -> None:
        os.killpg(self.redis.proc.pid, signal.SIGKILL)
        self.redis.proc.wait(10)
        self.redis.log.close()

    def start_redis(self, wipe: bool = False) -> None:
        if wipe:
            shutil.rmtree(self.redis.dir)
        self.redis.start()
        self._durable()

    def kill_s3(self) -> None:
        os.killpg(self.s3.proc.pid, signal.SIGKILL)
        self.s3.proc.wait(10)
        self.s3.log.close()

    def start_s3(self) -> None:
        self.s3.start()

    # -- jobs --------------------------------------------------------------------------------------
    def bucket(self) -> str:
        name = f"f-{uuid.uuid4().hex[:12]}"
        self.s3_direct.create_bucket(Bucket=name)
        return name

    def put_shards(self, bucket: str, n: int, images: int, size: tuple[int, int] = (96, 72)) -> dict[str, ShardContent]:
        out = {}
        for i in range(n):
            stem = f"{i:04d}"
            content = ShardContent(good=[f"s{i:04d}_{j:03d}" for j in range(images)])
            members = [(f"{k}.jpg", jpeg(i * 1000 + j, size)) for j, k in enumerate(content.good)]
            self.s3_direct.put_object(Bucket=bucket, Key=f"in/{stem}.tar", Body=tar_of(members))
            out[stem] = content
        return out

    def apply(self, name: str, bucket: str, n: int, queue: str | None = None, **spec) -> None:  # noqa: ANN003
        doc = {"apiVersion": "embedjob.io/v1alpha1", "kind": "EmbeddingJob",
               "metadata": {"name": name, "namespace": NS},
               "spec": {"input": {"uri": f"s3://{bucket}/in/{{0000..{n - 1:04d}}}.tar"},
                        "output": {"uri": f"s3://{bucket}/out/"},
                        "model": {"path": self.model},
                        "inference": {"device": "cpu", "batchSize": 16, "numThreads": 1},
                        "storage": {"endpoint": self.proxy.endpoint, "region": "us-east-1"},
                        "queue": queue or self.queue,
                        "retries": {"perShard": 2, "backoffSeconds": 1}, **spec}}
        self.cluster.kubectl("apply", "-f", "-", input=json.dumps(doc))

    def get(self, name: str) -> dict:
        r = self.cluster.kubectl("get", "embeddingjob", name, "-n", NS, "-o", "json")
        return json.loads(r.stdout)

    def status(self, name: str) -> dict:
        return self.get(name).get("status", {})

    def wait(self, name: str, pred, timeout: float, what: str) -> dict:  # noqa: ANN001
        deadline = time.monotonic() + timeout
        status: dict = {}
        while time.monotonic() < deadline:
            try:
                status = self.status(name)
            except subprocess.CalledProcessError:
                status = {}
            if pred(status):
                return status
            time.sleep(0.5)
        raise AssertionError(f"{name}: {what} not reached in {timeout}s; status {json.dumps(status, indent=1)}\n"
                             f"operator log tail:\n{self.operator_log()[-3000:]}")

    def wait_phase(self, name: str, phase: str, timeout: float = 180) -> dict:
        return self.wait(name, lambda s: s.get("phase") == phase, timeout, f"phase {phase}")

    def events(self, name: str) -> list[dict]:
        r = self.cluster.kubectl("get", "events", "-n", NS, "--field-selector", f"involvedObject.name={name}",
                                 "-o", "json")
        return json.loads(r.stdout)["items"]

    def store(self, name: str) -> ProgressStore:
        return ProgressStore(redis_client(self.redis.url), self.get(name)["metadata"]["uid"])

    def operator_log(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.logs.glob("operator-*.log")))

    def verify(self, bucket: str, shards: dict[str, ShardContent]) -> None:
        """Exact outputs: rows = metadata rows = the manifest's count, keys in tar order, and nothing
        under a final name but complete shards (temporary keys live only under out/_tmp/)."""
        out = f"s3://{bucket}/out"
        keys = [u[len(f"s3://{bucket}/"):] for u in self.storage.list(out + "/")]
        finals = {k for k in keys if not k.startswith("out/_tmp/")}
        expected = {"out/_job.json"} | {f"out/{d}/{s}.{e}" for s in shards
                                         for d, e in (("img_emb", "npy"), ("metadata", "parquet"),
                                                      ("_manifests", "json"))}
        assert finals == expected
        for stem, content in shards.items():
            s = read_shard(out, stem, self.storage)
            assert s.keys == content.good and s.embeddings.shape == (len(content.good), 32)
            assert s.manifest["counts"]["embedded"] == len(content.good)
            np.testing.assert_allclose(np.linalg.norm(s.embeddings.astype(np.float32), axis=1), 1.0, atol=2e-3)

    def close(self) -> None:
        self.workers.stop()
        self.operator.stop()
        self.proxy.close()
        self.s3.stop(grace=3)
        self.redis.stop()


@pytest.fixture(scope="module")
def faults(cluster, tiny_clip_dir, tmp_path_factory):
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update(AWS_ACCESS_KEY_ID=S3_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET)  # this process's own reads
    stack = FaultStack(cluster, tmp_path_factory.mktemp("faults"), str(tiny_clip_dir))
    yield stack
    stack.close()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    if TIMINGS:
        print("\nfault -> recovery (s):", json.dumps({k: round(v, 1) for k, v in TIMINGS.items()}))


@pytest.fixture()
def healthy(faults):
    """Every test starts with a healthy stack and a clean proxy."""
    faults.proxy.fail_fraction = faults.proxy.reset_fraction = 0.0
    faults.proxy.down_until = 0.0
    faults.operator.ensure()
    faults.workers.ensure()
    return faults


def shards_done(status: dict) -> int:
    return int((status.get("shards") or {}).get("succeeded") or 0)


def test_worker_with_wrong_credentials_fails_the_job_fast_with_the_403(healthy):
    f = healthy
    bucket = f.bucket()
    f.put_shards(bucket, 6, 4)
    queue = f"badcreds-{uuid.uuid4().hex[:6]}"
    bad = Workers({**f.env, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}, queue, f.logs, count=1)
    bad.ensure()
    try:
        t0 = time.monotonic()
        f.apply("bad-creds", bucket, 6, queue=queue, retries={"perShard": 3, "backoffSeconds": 30})
        status = f.wait_phase("bad-creds", "Failed", timeout=60)
        TIMINGS["wrong credentials -> Failed"] = time.monotonic() - t0
    finally:
        bad.stop()
    cond = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert cond["status"] == "True" and cond["reason"] == "StorageAccessFailed"
    assert "HeadObject s3://" in cond["message"] and "403" in cond["message"], cond
    complete = next(c for c in status["conditions"] if c["type"] == "Complete")
    assert complete["status"] == "False" and complete["reason"] == "Failed"
    assert any(e["reason"] == "Failed" and "403" in e["message"] for e in f.events("bad-creds"))
    assert list(f.storage.list(f"s3://{bucket}/out/")) == []  # nothing written anywhere


def test_s3_killed_and_restarted_mid_job_succeeds(healthy):
    f = healthy
    bucket = f.bucket()
    shards = f.put_shards(bucket, 16, 40)
    f.apply("s3-restart", bucket, 16)
    f.wait("s3-restart", lambda s: shards_done(s) >= 2, 120, "2 shards done")
    f.kill_s3()
    time.sleep(10)
    f.start_s3()
    t_back = time.monotonic()
    status = f.wait_phase("s3-restart", "Succeeded", timeout=240)
    TIMINGS["S3 killed 10 s -> Succeeded after restart"] = time.monotonic() - t_back
    f.verify(bucket, shards)
    store = f.store("s3-restart")
    assert store.commits() == dict.fromkeys(shards, 1)
    assert status["attempts"]["failures"] == 0 and status["shards"]["failed"] == 0  # transient only
    assert status["images"]["embedded"] == 16 * 40


def test_s3_answering_503_and_resetting_connections_succeeds(healthy):
    f = healthy
    bucket = f.bucket()
    shards = f.put_shards(bucket, 16, 40)
    f.proxy.fail_fraction, f.proxy.reset_fraction = 0.15, 0.02
    f.apply("s3-flaky", bucket, 16)
    f.wait("s3-flaky", lambda s: shards_done(s) >= 2, 120, "2 shards done")
    f.proxy.down_for(12)  # and then nothing at all for 12 s
    time.sleep(12)
    f.proxy.fail_fraction = f.proxy.reset_fraction = 0.0
    t0 = time.monotonic()
    status = f.wait_phase("s3-flaky", "Succeeded", timeout=240)
    TIMINGS["S3 flaky, then down 12 s -> Succeeded after it recovers"] = time.monotonic() - t0
    injected = dict(f.proxy.injected)
    assert injected["503"] > 0 and injected["reset"] > 0, injected
    f.verify(bucket, shards)
    assert f.store("s3-flaky").commits() == dict.fromkeys(shards, 1)
    assert status["attempts"]["failures"] == 0 and status["shards"]["failed"] == 0


def test_redis_killed_and_restarted_with_its_data_no_false_lease_expiries(healthy):
    f = healthy
    bucket = f.bucket()
    shards = f.put_shards(bucket, 16, 40)
    f.apply("redis-aof", bucket, 16)
    f.wait("redis-aof", lambda s: shards_done(s) >= 2, 120, "2 shards done")
    f.kill_redis()
    time.sleep(6)  # longer than a shard and than the 3 s lease: shards finish during the outage
    frozen = shards_done(f.status("redis-aof"))
    f.start_redis()
    t_back = time.monotonic()
    f.wait("redis-aof", lambda s: shards_done(s) > frozen, 30, "progress after the restart")
    TIMINGS["Redis restarted (AOF) -> status moves"] = time.monotonic() - t_back
    status = f.wait_phase("redis-aof", "Succeeded", timeout=240)
    f.verify(bucket, shards)
    assert f.store("redis-aof").commits() == dict.fromkeys(shards, 1)
    assert status["attempts"]["leaseExpiries"] == 0, status["attempts"]  # nobody's worker was lost
    assert status["attempts"]["failures"] == 0
    assert not any(e["reason"] == "LeaseExpired" for e in f.events("redis-aof"))
    assert "will try again in 60 seconds" not in f.operator_log()


def test_redis_restarted_without_its_data_rebuilds_and_succeeds(healthy):
    f = healthy
    bucket = f.bucket()
    shards = f.put_shards(bucket, 16, 40)
    f.apply("redis-wiped", bucket, 16)
    f.wait("redis-wiped", lambda s: shards_done(s) >= 2, 120, "2 shards done")
    f.kill_redis()
    time.sleep(2)
    f.start_redis(wipe=True)
    t_back = time.monotonic()
    status = f.wait_phase("redis-wiped", "Succeeded", timeout=240)
    TIMINGS["Redis restarted empty -> Succeeded"] = time.monotonic() - t_back
    f.verify(bucket, shards)
    assert status["images"]["embedded"] == 16 * 40 and status["shards"]["succeeded"] == 16
    assert any(e["reason"] == "ProgressRebuilt" for e in f.events("redis-wiped"))


def test_message_deleted_from_the_broker_is_reenqueued_by_the_safety_net(healthy):
    f = healthy
    bucket = f.bucket()
    shards = f.put_shards(bucket, 3, 5)
    queue = f"nobody-{uuid.uuid4().hex[:6]}"  # no worker yet: the messages wait in the list
    f.apply("lost-message", bucket, 3, queue=queue)
    r = redis_client(f.redis.url)
    deadline = time.monotonic() + 30
    while r.llen(queue) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert r.llen(queue) == 3
    victim = r.lrange(queue, 0, 0)[0]
    assert r.lrem(queue, 1, victim) == 1
    t0 = time.monotonic()
    f.wait("lost-message", lambda s: (s.get("attempts") or {}).get("messagesLost") == 1, 30, "message re-enqueued")
    TIMINGS["message deleted -> re-enqueued"] = time.monotonic() - t0
    assert r.llen(queue) == 3
    assert any(e["reason"] == "MessageLost" for e in f.events("lost-message"))
    rescuer = Workers(f.env, queue, f.logs, count=1)
    rescuer.ensure()
    try:
        status = f.wait_phase("lost-message", "Succeeded", timeout=120)
    finally:
        rescuer.stop()
    f.verify(bucket, shards)
    assert f.store("lost-message").commits() == dict.fromkeys(shards, 1)
    assert status["attempts"]["messagesLost"] == 1
