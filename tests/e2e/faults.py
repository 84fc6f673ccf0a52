"""The fault-injection harness shared by the e2e fault tests and ``scripts/chaos.py``: a complete
stack of its own (Redis with AOF, SeaweedFS with authentication behind a fault-injecting proxy, the
operator watching one namespace, Celery workers), on a given kube-apiserver, with methods that kill,
restart, pause and break each component for real."""

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

from embedjob.dev.services import RedisServer, SeaweedS3
from embedjob.progress import ProgressStore, redis_client
from embedjob.results import read_shard
from embedjob.storage import Storage, StorageOptions
from tests.conftest import S3_KEY, S3_SECRET
from tests.e2e.conftest import Operator, ShardContent, Workers, jpeg, tar_of
from tests.fault_proxy import FaultProxy

NS = "faults"
IDENTITIES = {"identities": [{"name": "admin", "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}],
                              "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}


class FaultStack:
    def __init__(self, cluster, base: Path, model: str, workers: int = 2,  # noqa: ANN001
                 namespace: str = NS) -> None:
        self.cluster, self.base, self.model, self.ns = cluster, base, model, namespace
        # This process reads the outputs back with the same credentials (restored in close()).
        self._saved_env = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
        os.environ.update(AWS_ACCESS_KEY_ID=S3_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET)
        # Password-protected like the chart's Redis: every component gets it through EMBEDJOB_REDIS_PASSWORD.
        self.redis = RedisServer(base / "redis", appendonly=True, password=f"pw-{uuid.uuid4().hex}").start()
        self._durable()
        self.s3 = SeaweedS3(base / "s3", config=IDENTITIES).start()
        self.proxy = FaultProxy(self.s3.s3_port, seed=6)
        self.queue = f"faults-{uuid.uuid4().hex[:6]}"
        self.env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET,
            "AWS_ENDPOINT_URL": self.proxy.endpoint, "AWS_REGION": "us-east-1",
            "EMBEDJOB_REDIS_URL": self.redis.url, "EMBEDJOB_REDIS_PASSWORD": self.redis.password,
            "KUBECONFIG": str(cluster.kubeconfig),
            "EMBEDJOB_LEASE_SECONDS": "3", "EMBEDJOB_OPERATOR_INTERVAL": "1", "EMBEDJOB_VISIBILITY_TIMEOUT": "120",
            "EMBEDJOB_LOST_MESSAGE_GRACE": "3", "EMBEDJOB_S3_MAX_ATTEMPTS": "3", "EMBEDJOB_REDIS_WAIT_SECONDS": "120",
            "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
        }
        self.logs = base / "logs"
        self.logs.mkdir()
        cluster.kubectl("create", "namespace", self.ns, check=False)
        self.operator = Operator(self.env, self.logs, namespaces=(self.ns,))
        self.operator.start()
        self.workers = Workers(self.env, self.queue, self.logs, count=workers)
        self.workers.ensure()
        self.s3_direct = boto3.client("s3", endpoint_url=self.s3.endpoint, region_name="us-east-1",
                                      aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET)
        self.storage = Storage(StorageOptions(endpoint=self.s3.endpoint, region="us-east-1"))

    # -- faults ------------------------------------------------------------------------------------
    def _durable(self) -> None:
        r = redis_client(self.redis.authed_url)
        r.config_set("appendfsync", "always")  # a SIGKILL loses nothing that was acknowledged
        r.close()

    def kill_redis(self) -> None:
        os.killpg(self.redis.proc.pid, signal.SIGKILL)
        self.redis.proc.wait(10)

    def start_redis(self, wipe: bool = False) -> None:
        if wipe:
            shutil.rmtree(self.redis.dir)
        self.redis.start()
        self._durable()

    def pause_s3(self) -> None:
        os.killpg(self.s3.proc.pid, signal.SIGSTOP)

    def resume_s3(self) -> None:
        os.killpg(self.s3.proc.pid, signal.SIGCONT)

    def kill_s3(self) -> None:
        os.killpg(self.s3.proc.pid, signal.SIGKILL)
        self.s3.proc.wait(10)

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
               "metadata": {"name": name, "namespace": self.ns},
               "spec": {"input": {"uri": f"s3://{bucket}/in/{{0000..{n - 1:04d}}}.tar"},
                        "output": {"uri": f"s3://{bucket}/out/"},
                        "model": {"path": self.model},
                        "inference": {"device": "cpu", "batchSize": 16, "numThreads": 1},
                        "storage": {"endpoint": self.proxy.endpoint, "region": "us-east-1"},
                        "queue": queue or self.queue,
                        "retries": {"perShard": 2, "backoffSeconds": 1}, **spec}}
        self.cluster.kubectl("apply", "-f", "-", input=json.dumps(doc))

    def get(self, name: str) -> dict:
        r = self.cluster.kubectl("get", "embeddingjob", name, "-n", self.ns, "-o", "json")
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
        r = self.cluster.kubectl("get", "events", "-n", self.ns, "--field-selector", f"involvedObject.name={name}",
                                 "-o", "json")
        return json.loads(r.stdout)["items"]

    def store(self, name: str) -> ProgressStore:
        return ProgressStore(redis_client(self.redis.authed_url), self.get(name)["metadata"]["uid"])

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
        assert finals == expected, sorted(finals ^ expected)[:10]
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
        for k, v in self._saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
