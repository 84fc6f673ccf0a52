"""Two tenants on one cluster (issue 16), with real components: the real kube-apiserver, the real
operator subprocess, real ``embedjob worker`` subprocesses, Redis and SeaweedFS. The storage policy is
the chart's built-in default, each namespace its own folder of one bucket
(``{"*": ["s3://<bucket>/{namespace}/"]}``), local paths refused, the model from the workers' cache.

Tenant A tries every route to tenant B's prefix: the spec's URI, a brace pattern, an explicit shard
list, ``..`` segments (in the URI and inside a pattern's alternative), an output there, a status patch
carrying a forged plan and spec hash, and an endpoint override at a recording HTTP server. Each ends
``Failed`` with a condition naming the field; nothing is written under B's prefix, nothing of B's is
read into A's outputs, and the decoy endpoint gets no request. A's own job succeeds on the same stack.
The brace bomb is refused in under a second while the operator's RSS stays under 150 MB."""

from __future__ import annotations

import http.server
import json
import threading
import time
import uuid

import pytest

from embedjob.operator.changes import spec_hash
from embedjob.spec import parse_spec
from embedjob.storage import s3_client
from tests.e2e.conftest import Operator, Workers, put_shards

pytestmark = pytest.mark.e2e

A, B = "tenant-a", "tenant-b"


def _rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM: the peak) of a process, in MB."""
    fields = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status").read().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list[str] = []

    def _any(self) -> None:
        type(self).seen.append(f"{self.command} {self.path}")
        self.send_response(500)
        self.end_headers()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any  # noqa: N815

    def log_message(self, *args) -> None:  # noqa: ANN002
        pass


def test_tenant_a_cannot_reach_tenant_bs_prefix_by_any_route(cluster, e2e_env, tiny_clip_dir, tmp_path):
    bucket = f"tn-{uuid.uuid4().hex[:12]}"
    client = s3_client()
    client.create_bucket(Bucket=bucket)
    put_shards(bucket, f"{A}/in", 2, 3)
    put_shards(bucket, f"{B}/in", 2, 3)
    b_keys_before = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=f"{B}/")["Contents"])
    for ns in (A, B):
        cluster.kubectl("create", "namespace", ns, check=False)

    decoy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=decoy.serve_forever, daemon=True).start()
    queue = f"tn-{uuid.uuid4().hex[:6]}"
    env = {**e2e_env, "EMBEDJOB_STORAGE_ALLOW_LIST": json.dumps({"*": [f"s3://{bucket}/{{namespace}}/"]}),
           "EMBEDJOB_ALLOW_LOCAL_PATHS": "false", "EMBEDJOB_MODEL_DIR": str(tiny_clip_dir)}
    logs = tmp_path / "logs"
    logs.mkdir()
    operator = Operator(env, logs, namespaces=(A, B))
    workers = Workers(env, queue, logs, count=1)

    def apply(name: str, spec: dict) -> None:
        base = {"output": {"uri": f"s3://{bucket}/{A}/out-{name}/"}, "model": {"path": str(tiny_clip_dir)},
                "inference": {"device": "cpu", "batchSize": 8, "numThreads": 1}, "queue": queue,
                "retries": {"perShard": 0, "backoffSeconds": 1}}
        doc = {"apiVersion": "embedjob.io/v1alpha1", "kind": "EmbeddingJob",
               "metadata": {"name": name, "namespace": A}, "spec": {**base, **spec}}
        cluster.kubectl("apply", "-f", "-", input=json.dumps(doc))

    def get(name: str) -> dict:
        return json.loads(cluster.kubectl("get", "embeddingjob", name, "-n", A, "-o", "json").stdout)

    def wait(name: str, phases: tuple[str, ...], timeout: float = 60, every: float = 0.2) -> dict:
        deadline, obj = time.monotonic() + timeout, {}
        while time.monotonic() < deadline:
            obj = get(name)
            if (obj.get("status") or {}).get("phase") in phases:
                return obj
            time.sleep(every)
        raise AssertionError(f"{name} never reached {phases}: {obj.get('status')}")

    def failed(name: str) -> dict:
        obj = wait(name, ("Failed",))
        return next(c for c in obj["status"]["conditions"] if c["type"] == "Failed")

    src_b, src_a = f"s3://{bucket}/{B}/in", f"s3://{bucket}/{A}/in"
    attacks = {  # name: (spec, field named, reason)
        "uri": ({"input": {"uri": f"{src_b}/"}}, "spec.input.uri", "StorageNotAllowed"),
        "brace": ({"input": {"uri": f"s3://{bucket}/tenant-{{a,b}}/in/0000.tar"}}, "spec.input.uri",
                  "StorageNotAllowed"),
        "shards": ({"input": {"shards": [f"{src_a}/0000.tar", f"{src_b}/0000.tar"]}}, "spec.input.shards[1]",
                   "StorageNotAllowed"),
        "dotdot": ({"input": {"uri": f"{src_a}/../../{B}/in/"}}, "spec.input.uri", "InvalidSpec"),
        "dotdot-in-pattern": ({"input": {"uri": f"{src_a}/{{0000,../../{B}/in/0000}}.tar"}},
                              "spec.input.uri", "InvalidSpec"),  # the pattern's text has a '..' segment
        # ... and one whose '..' appears only once expanded (in/../../tenant-b/in/0000.tar)
        "dotdot-expanded": ({"input": {"uri": f"{src_a}/{{.,0}}./{{.,0}}./{B}/in/0000.tar"}},
                            "spec.input.uri", "PlanFailed"),
        "write-b": ({"input": {"uri": f"{src_a}/"}, "output": {"uri": f"s3://{bucket}/{B}/out/"}},
                    "spec.output.uri", "StorageNotAllowed"),
        "write-b-dotdot": ({"input": {"uri": f"{src_a}/"}, "output": {"uri": f"s3://{bucket}/{A}/../{B}/out/"}},
                           "spec.output.uri", "InvalidSpec"),
        "endpoint": ({"input": {"uri": f"{src_a}/"},
                      "storage": {"endpoint": f"http://127.0.0.1:{decoy.server_address[1]}"}},
                     "spec.storage.endpoint", "StorageNotAllowed"),
    }
    try:
        operator.start()
        workers.ensure()
        apply("own", {"input": {"uri": f"{src_a}/"}})
        for name, (spec, _field, _reason) in attacks.items():
            apply(name, spec)
        got = {}
        for name, (_spec, field, reason) in attacks.items():
            cond = failed(name)
            got[name] = (cond["reason"], cond["message"])
            assert cond["reason"] == reason and cond["message"].startswith(f"{field}: "), (name, cond)

        # The status patch: the refused "uri" job gets a plan and the hash of its own (forbidden) spec.
        forged_hash = spec_hash(parse_spec(get("uri")["spec"], allow_local=False))
        patch = {"status": {"phase": "Running", "conditions": [],
                            "plan": {"total": 2, "doneAtStart": 0, "specHash": forged_hash}}}
        cluster.kubectl("patch", "embeddingjob", "uri", "-n", A, "--subresource=status", "--type=merge",
                        "-p", json.dumps(patch))
        cond = failed("uri")
        got["forged-status"] = (cond["reason"], cond["message"])
        assert cond["reason"] == "StorageNotAllowed" and cond["message"].startswith("spec.input.uri: "), cond

        # The brace bomb: refused at once, and the operator stays small.
        apply("bomb", {"input": {"uri": f"s3://{bucket}/{A}/in/{{0..999999999}}/{{0..999999999}}.tar"}})
        started = time.monotonic()  # the resource exists from here on (kubectl apply returned)
        cond = wait("bomb", ("Failed",), timeout=10, every=0.05)["status"]["conditions"]
        refused_in = time.monotonic() - started
        cond = next(c for c in cond if c["type"] == "Failed")
        rss, peak = _rss_mb(operator.proc.pid)
        print(f"\nbrace bomb refused in {refused_in:.2f} s (created -> Failed seen by kubectl get); operator RSS "
              f"{rss:.0f} MB, peak {peak:.0f} MB; reason {cond['reason']}: {cond['message']}")
        assert cond["reason"] == "PlanFailed" and cond["message"].startswith("spec.input.uri: ")
        assert "1,000,000,000,000,000,000 shards" in cond["message"]
        assert refused_in < 1.0 and peak < 150, (refused_in, peak)

        own = wait("own", ("Succeeded",), timeout=180, every=0.5)
        assert own["status"]["shards"]["succeeded"] == 2 and own["status"]["images"]["embedded"] == 6
        for name, (reason, message) in sorted(got.items()):
            print(f"attack {name}: {reason}: {message[:160]}")
    finally:
        for name in ("own", "bomb", *attacks):
            cluster.kubectl("delete", "embeddingjob", name, "-n", A, "--wait=false", check=False)
        time.sleep(2)
        workers.stop()
        operator.stop()
        decoy.shutdown()

    b_keys_after = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=f"{B}/")["Contents"])
    assert b_keys_after == b_keys_before  # nothing written under B's prefix
    a_outputs = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=f"{A}/").get("Contents", [])
                 if not o["Key"].startswith((f"{A}/in/", f"{A}/out-own/"))]
    assert a_outputs == []  # nothing of B's was read into A's outputs by any refused job
    assert _Recorder.seen == []  # no request (signed or not) ever went to the decoy endpoint
