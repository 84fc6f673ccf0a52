"""EmbeddingJob end to end: kubectl apply -> real kube-apiserver -> the operator (subprocess) ->
Celery tasks on real Redis -> worker subprocesses -> outputs in real SeaweedFS S3 -> status."""

from __future__ import annotations

import json
import os
import time
import uuid

import numpy as np
import pytest

from embedjob.contract import task_id_prefix
from embedjob.layout import job_manifest_uri
from embedjob.progress import ProgressStore, redis_client
from embedjob.results import read_shard
from embedjob.storage import Storage, s3_client
from tests.e2e.conftest import put_shards

pytestmark = pytest.mark.e2e


@pytest.fixture()
def bucket(stack):
    name = f"e2e-{uuid.uuid4().hex[:12]}"
    s3_client().create_bucket(Bucket=name)
    return name


def store_of(obj) -> ProgressStore:
    return ProgressStore(redis_client(), obj["metadata"]["uid"])


def queued_task_ids(queue: str) -> list[str]:
    r = redis_client()
    return [json.loads(m)["headers"]["id"] for m in r.lrange(queue, 0, -1)]


def succeeded_count(obj) -> int:
    return obj.get("status", {}).get("shards", {}).get("succeeded", 0)


def assert_outputs_complete(bucket: str, shards: dict, dim: int = 32) -> None:
    """Every shard's outputs are complete and aligned: keys in tar order, L2-normalised rows, and
    nothing under a final name without its manifest."""
    out = f"s3://{bucket}/out"
    keys = [u[len(f"s3://{bucket}/"):] for u in Storage().list(out + "/")]
    finals = [k for k in keys if not k.startswith("out/_tmp/")]
    expected = {"out/_job.json"}
    for stem in shards:
        expected |= {f"out/img_emb/{stem}.npy", f"out/metadata/{stem}.parquet", f"out/_manifests/{stem}.json"}
    assert set(finals) == expected
    for stem, content in shards.items():
        s = read_shard(out, stem)
        assert s.keys == content.good
        assert s.embeddings.shape == (len(content.good), dim)
        np.testing.assert_allclose(np.linalg.norm(s.embeddings.astype(np.float32), axis=1), 1.0, atol=2e-3)
        assert s.manifest["counts"]["embedded"] == len(content.good)
        assert s.manifest["counts"]["failed"] == len(content.failed)


def test_apply_job_succeeds_with_exact_counters_and_verified_outputs(stack, bucket):
    shards = put_shards(bucket, "in", n=4, images=5, corrupt={2: 2})
    stack.apply(stack.job_doc("basic", {"input": {"uri": f"s3://{bucket}/in/{{0000..0003}}.tar"},
                                        "output": {"uri": f"s3://{bucket}/out/"}}))
    obj = stack.wait_phase("basic", "Succeeded", timeout=120)
    st = obj["status"]
    assert st["progress"] == "4/4"
    assert st["shards"] == {"total": 4, "queued": 0, "running": 0, "succeeded": 4, "failed": 0}
    assert st["images"] == {"embedded": 18, "failed": 2, "soFar": 18, "embeddedThisRun": 18, "countsPending": 0}
    # the model as loaded: the folder and its weights' hash, never the default hub id it was not loaded from
    assert st["model"]["path"] == os.path.realpath(stack.model_path) and len(st["model"]["weightsSha256"]) == 64
    assert "id" not in st["model"] and "clip-vit-large" not in json.dumps(st)
    assert st["dataLoss"]["truncatedShards"] == 0
    assert st["observedGeneration"] == obj["metadata"]["generation"]
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["Complete"]["status"] == "True" and conds["Failed"]["status"] == "False"
    assert all({"type", "status", "lastTransitionTime", "reason", "message"} <= set(c) for c in conds.values())
    assert st["startTime"] <= st["completionTime"] and st["failedShards"] == []
    assert_outputs_complete(bucket, shards)
    job = json.loads(Storage().read_bytes(job_manifest_uri(f"s3://{bucket}/out/")))
    assert job["totals"] == {"shards": 4, "succeeded": 4, "failed": 0, "images": 18, "failedImages": 2,
                             "truncatedShards": 0, "imagesThisRun": 18, "shardsThisRun": 4}
    assert job["model"] == st["model"]  # the status and _job.json say the same
    assert store_of(obj).executions() == {s: 1 for s in shards}
    table = stack.kubectl("get", "ej", "basic").stdout
    assert "Succeeded" in table and "4/4" in table and "18" in table
    reasons = {e["reason"] for e in stack.events("basic")}
    assert {"Planned", "Started", "Succeeded"} <= reasons
    # liveness endpoint answers, with the Redis probe
    import urllib.request

    with urllib.request.urlopen(stack.operator.liveness, timeout=5) as resp:
        assert resp.status == 200 and json.loads(resp.read()) == {"redis": True}
    # finalizer and kopf state under our own names
    assert obj["metadata"]["finalizers"] == ["embedjob.io/cleanup"]
    assert not [a for a in obj["metadata"].get("annotations", {}) if a.startswith("kopf.zalando.org")]
    stack.delete("basic")


def test_text_outputs_through_the_operator(stack, bucket, text_clip_dir):
    """spec.outputs: [image, text] through kubectl apply, the operator and the Celery workers: text_emb/
    aligned with img_emb/ and the metadata, and the manifest's caption counts. With output.report, a
    worker writes report.html (with the clip_score histogram) and the status says it is written."""
    import time

    from tests.shards import caption_shard

    caps = caption_shard()
    s3_client().put_object(Bucket=bucket, Key="in/0000.tar", Body=caps.tar_bytes())
    stack.apply(stack.job_doc("text", {"input": {"uri": f"s3://{bucket}/in/0000.tar"},
                                       "output": {"uri": f"s3://{bucket}/out/", "report": True},
                                       "model": {"path": str(text_clip_dir)}, "outputs": ["image", "text"]}))
    obj = stack.wait_phase("text", "Succeeded", timeout=180)
    assert obj["spec"]["outputs"] == ["image", "text"]  # kept by the apiserver (in the CRD schema)
    image, text = read_shard(f"s3://{bucket}/out", "0000"), read_shard(f"s3://{bucket}/out", "0000", kind="text")
    assert image.keys == text.keys == caps.good_keys and text.embeddings.shape == image.embeddings.shape
    assert (text.manifest["text"]["captions"], text.manifest["text"]["truncated"]) == (5, 1)
    deadline = time.monotonic() + 90
    while (report := (stack.get("text") or {}).get("status", {}).get("report", {})).get("state") == "Requested" \
            and time.monotonic() < deadline:
        time.sleep(1)
    assert report == {"uri": f"s3://{bucket}/out/report.html", "state": "Written",
                      "message": "open it in a browser (one self-contained file)"}, report
    page = s3_client().get_object(Bucket=bucket, Key="out/report.html")["Body"].read().decode()
    assert "clip_score" in page and "<script src=" not in page
    stack.delete("text")


def test_invalid_specs_are_rejected_naming_the_field(stack, bucket):
    doc = stack.job_doc("bad", {"input": {"uri": f"s3://{bucket}/in/"}, "output": {"uri": f"s3://{bucket}/out/"}})
    doc["spec"]["inference"]["batchSize"] = 5000
    r = stack.apply(doc, check=False)
    assert r.returncode != 0 and "spec.inference.batchSize" in r.stderr
    doc = stack.job_doc("bad", {"input": {"uri": "http://example.com/x"}, "output": {"uri": f"s3://{bucket}/o/"}})
    r = stack.apply(doc, check=False)
    assert r.returncode != 0 and "spec.input.uri" in r.stderr
    doc = stack.job_doc("bad", {"input": {"uri": f"s3://{bucket}/in/"}, "output": {"uri": f"s3://{bucket}/o/"},
                                "retries": {"perShard": -1}})
    r = stack.apply(doc, check=False)
    assert r.returncode != 0 and "spec.retries.perShard" in r.stderr
    doc = stack.job_doc("bad", {"input": {"uri": f"s3://{bucket}/in/"}, "output": {"uri": f"s3://{bucket}/o/",
                                                                                    "dtype": "int8"}})
    r = stack.apply(doc, check=False)
    assert r.returncode != 0 and "spec.output.dtype" in r.stderr
    assert stack.get("bad") is None

    # What the schema cannot see, the operator refuses with a Failed condition naming the field.
    doc = stack.job_doc("semantic", {"input": {"uri": f"s3://{bucket}/in/"},
                                     "output": {"uri": f"s3://{bucket}/in/emb/"}})
    stack.apply(doc)
    obj = stack.wait_phase("semantic", "Failed", timeout=30)
    cond = next(c for c in obj["status"]["conditions"] if c["type"] == "Failed")
    assert cond["status"] == "True" and cond["reason"] == "InvalidSpec" and "spec.output.uri" in cond["message"]
    stack.delete("semantic")


def test_operator_killed_mid_job_completes_and_each_shard_runs_once(stack, bucket):
    shards = put_shards(bucket, "in", n=12, images=12, size=(128, 96))
    stack.apply(stack.job_doc("restart", {"input": {"uri": f"s3://{bucket}/in/"},
                                          "output": {"uri": f"s3://{bucket}/out/"}, "parallelism": 3}))
    obj = stack.wait("restart", lambda o: succeeded_count(o) >= 2, 90, "2 shards done")
    stack.operator.kill()
    assert succeeded_count(obj) < 12, "the job finished before the operator was killed"
    time.sleep(3)  # workers go on; nothing is dispatched meanwhile
    stack.operator.start()
    obj = stack.wait_phase("restart", "Succeeded", timeout=150)
    assert obj["status"]["images"]["embedded"] == 144 and obj["status"]["progress"] == "12/12"
    assert store_of(obj).executions() == {s: 1 for s in shards}
    assert_outputs_complete(bucket, shards)
    stack.delete("restart")


def test_worker_sigkilled_mid_shard_job_completes_without_partial_outputs(stack, bucket):
    shards = put_shards(bucket, "in", n=4, images=60, size=(160, 120))
    stack.apply(stack.job_doc("killw", {"input": {"uri": f"s3://{bucket}/in/"},
                                        "output": {"uri": f"s3://{bucket}/out/"}}))
    obj = stack.wait("killw", lambda o: o.get("metadata", {}).get("uid") is not None, 10)
    store = store_of(obj)
    deadline = time.monotonic() + 90
    victim = None
    while time.monotonic() < deadline and victim is None:
        for stem, state in store.states().items():
            owner = store.lease_owner(stem) if state == "running" else None
            if owner:
                victim = (stem, int(owner.split(":")[1]))
                break
        time.sleep(0.05)
    assert victim, "no shard was seen running"
    stem, pid = victim
    proc = stack.workers.by_pid(pid)
    assert proc is not None, f"lease owner pid {pid} is not one of the workers"
    stack.workers.kill(proc)
    stack.workers.start_one()
    obj = stack.wait_phase("killw", "Succeeded", timeout=180)
    st = obj["status"]
    assert st["images"]["embedded"] == 240 and st["attempts"]["failures"] == 0
    assert st["attempts"]["leaseExpiries"] >= 1 or store.executions()[stem] == 2
    assert store.info(stem).get("leaseExpiries", 0) >= 1 or store.executions()[stem] == 2
    assert_outputs_complete(bucket, shards)
    stack.delete("killw")


def test_suspend_stops_dispatch_and_resume_finishes(stack, bucket):
    shards = put_shards(bucket, "in", n=8, images=16, size=(128, 96))
    stack.apply(stack.job_doc("pause", {"input": {"uri": f"s3://{bucket}/in/"},
                                        "output": {"uri": f"s3://{bucket}/out/"}, "parallelism": 1}))
    stack.wait("pause", lambda o: succeeded_count(o) >= 1, 90, "1 shard done")
    stack.kubectl("patch", "ej", "pause", "--type=merge", "-p", '{"spec":{"suspend":true}}')
    obj = stack.wait_phase("pause", "Suspended", timeout=30)
    prefix = task_id_prefix(obj["metadata"]["uid"])
    assert not [t for t in queued_task_ids(stack.queue) if t.startswith(prefix)]
    cond = next(c for c in obj["status"]["conditions"] if c["type"] == "Suspended")
    assert cond["status"] == "True"
    time.sleep(3)  # an in-flight shard may finish; nothing new starts
    before = succeeded_count(stack.get("pause"))
    time.sleep(3)
    assert succeeded_count(stack.get("pause")) == before < 8

    # Immutable fields are refused (reported in a condition, not applied); reverting clears it.
    stack.kubectl("patch", "ej", "pause", "--type=merge", "-p",
                  json.dumps({"spec": {"output": {"uri": f"s3://{bucket}/elsewhere/"}}}))
    obj = stack.wait("pause", lambda o: any(c["type"] == "SpecChangeRefused" and c["status"] == "True"
                                            for c in o["status"].get("conditions", [])), 30, "change refused")
    cond = next(c for c in obj["status"]["conditions"] if c["type"] == "SpecChangeRefused")
    assert "spec.output.uri" in cond["message"]
    stack.kubectl("patch", "ej", "pause", "--type=merge", "-p",
                  json.dumps({"spec": {"output": {"uri": f"s3://{bucket}/out/"}, "suspend": False}}))
    obj = stack.wait_phase("pause", "Succeeded", timeout=120)
    assert obj["status"]["images"]["embedded"] == 128
    assert not list(Storage().list(f"s3://{bucket}/elsewhere/"))
    cond = next(c for c in obj["status"]["conditions"] if c["type"] == "SpecChangeRefused")
    assert cond["status"] == "False"
    assert store_of(obj).executions() == {s: 1 for s in shards}
    reasons = {e["reason"] for e in stack.events("pause")}
    assert {"Suspended", "Resumed"} <= reasons
    stack.delete("pause")


def test_delete_mid_job_releases_finalizer_and_removes_queued_tasks(stack, bucket):
    put_shards(bucket, "in", n=24, images=120, size=(160, 120))  # slow enough to delete mid-job
    stack.apply(stack.job_doc("gone", {"input": {"uri": f"s3://{bucket}/in/"},
                                       "output": {"uri": f"s3://{bucket}/out/"}}))

    def mid_job(o) -> bool:  # one shard done and others still waiting in the broker
        uid = o["metadata"]["uid"]
        return succeeded_count(o) >= 1 and any(t.startswith(task_id_prefix(uid))
                                               for t in queued_task_ids(stack.queue))

    obj = stack.wait("gone", mid_job, 90, "1 shard done with tasks still queued", interval=0.2)
    uid = obj["metadata"]["uid"]
    prefix = task_id_prefix(uid)
    t0 = time.monotonic()
    stack.delete("gone", timeout=30)
    assert stack.get("gone") is None and time.monotonic() - t0 < 30
    assert not [t for t in queued_task_ids(stack.queue) if t.startswith(prefix)]
    store = ProgressStore(redis_client(), uid)
    time.sleep(2)  # a shard in flight at deletion ends; the worker drops anything else
    assert set(redis_client().keys(store.prefix + "*")) <= {store.key("control"), store.key("state"),
                                                             store.key("info"), store.key("executions")}
    assert store.control() == "deleted"
    assert list(Storage().list(f"s3://{bucket}/out/_manifests/")), "outputs are kept"
    reasons = {e["reason"] for e in stack.events("gone")}
    assert "Cleaned" in reasons


def test_always_failing_shard_is_retried_then_fails_or_is_tolerated(stack, bucket):
    # Shard 0001 does not exist (NoSuchKey): a permanent failure, failed at once whatever retries are left.
    put_shards(bucket, "in", n=3, images=2)
    s3_client().delete_object(Bucket=bucket, Key="in/0001.tar")
    for name, max_failed in (("strict", 0), ("tolerant", 1)):
        stack.apply(stack.job_doc(name, {"input": {"uri": f"s3://{bucket}/in/{{0000..0002}}.tar"},
                                         "output": {"uri": f"s3://{bucket}/out-{name}/"},
                                         "retries": {"perShard": 2, "backoffSeconds": 30},
                                         "maxFailedShards": max_failed,
                                         **({"ttlSecondsAfterFinished": 3} if name == "strict" else {})}))
    strict = stack.wait_phase("strict", "Failed", timeout=120)
    tolerant = stack.wait_phase("tolerant", "Succeeded", timeout=120)
    for obj in (strict, tolerant):
        st = obj["status"]
        assert st["shards"]["failed"] == 1
        [failed] = st["failedShards"]
        assert failed["stem"] == "0001" and failed["attempts"] == 1 and "NoSuch" in failed["error"]
        assert store_of(obj).executions()["0001"] == 1  # not retried: retrying cannot make it exist
    cond = next(c for c in strict["status"]["conditions"] if c["type"] == "Failed")
    assert cond["status"] == "True" and cond["reason"] == "TooManyFailedShards"
    assert tolerant["status"]["progress"] == "2/3" and tolerant["status"]["images"]["embedded"] == 4
    assert Storage().exists(job_manifest_uri(f"s3://{bucket}/out-tolerant/"))
    assert "ShardFailed" in {e["reason"] for e in stack.events("strict")}
    # ttlSecondsAfterFinished: the finished job deletes itself
    deadline = time.monotonic() + 30
    while stack.get("strict") is not None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert stack.get("strict") is None, "ttlSecondsAfterFinished did not delete the job"
    stack.delete("tolerant")


def test_truncated_shard_is_counted_in_kubectl_and_a_rerun_reports_no_false_rate(stack, bucket):
    """record: the job succeeds, and kubectl shows the loss (the Truncated column, a DataLoss
    condition, status.dataLoss); fail: the shard fails at once. A job over an output that is already
    complete embeds nothing and reports 0 images/s, not the old images over its few seconds."""
    put_shards(bucket, "in", n=3, images=6)
    client = s3_client()
    whole = client.get_object(Bucket=bucket, Key="in/0001.tar")["Body"].read()
    client.put_object(Bucket=bucket, Key="in/0001.tar", Body=whole[: len(whole) // 2])
    spec = {"input": {"uri": f"s3://{bucket}/in/"}, "output": {"uri": f"s3://{bucket}/out/"}}
    stack.apply(stack.job_doc("trunc", spec))
    obj = stack.wait_phase("trunc", "Succeeded", timeout=120)
    st = obj["status"]
    assert st["dataLoss"]["truncatedShards"] == 1 and st["dataLoss"]["shards"][0]["stem"] == "0001"
    assert 6 <= st["images"]["embedded"] < 18
    wide = stack.kubectl("get", "ej", "trunc", "-o", "wide").stdout.splitlines()
    assert "TRUNCATED" in wide[0] and wide[1].split()[wide[0].split().index("TRUNCATED")] == "1"
    described = stack.kubectl("describe", "ej", "trunc").stdout
    assert "DataLoss" in described and "TruncatedShards" in described
    job = json.loads(Storage().read_bytes(job_manifest_uri(f"s3://{bucket}/out/")))
    assert job["totals"]["truncatedShards"] == 1 and job["dataLoss"] == {"truncatedShards": ["0001"]}

    stack.apply(stack.job_doc("again", {**spec, "retries": {"perShard": 3, "backoffSeconds": 30}}))
    again = stack.wait_phase("again", "Succeeded", timeout=60)["status"]
    assert again["plan"]["doneAtStart"] == 3 and again["imagesPerSecond"] == 0
    assert again["images"]["embedded"] == st["images"]["embedded"] and again["images"]["embeddedThisRun"] == 0
    # The counts of the shards found done were read by the ticks (accept said 3 pending); the resource's
    # status is merge-patched, so a key left out of the desired status would stay stale: it reads 0.
    assert again["images"].get("countsPending", "absent") == 0, again["images"]
    row = stack.kubectl("get", "ej", "again").stdout.splitlines()
    assert row[1].split()[row[0].split().index("IMAGES/S")] == "0"

    stack.apply(stack.job_doc("strict-trunc", {**spec, "output": {"uri": f"s3://{bucket}/out-strict/"},
                                               "onTruncatedShard": "fail",
                                               "retries": {"perShard": 3, "backoffSeconds": 30}}))
    strict = stack.wait_phase("strict-trunc", "Failed", timeout=60)["status"]
    [failed] = strict["failedShards"]
    assert failed["stem"] == "0001" and failed["attempts"] == 1 and "onTruncatedShard: fail" in failed["error"]
    assert not Storage().exists(f"s3://{bucket}/out-strict/_manifests/0001.json")
    for name in ("trunc", "again", "strict-trunc"):
        stack.delete(name)


def test_two_hundred_small_shards_exact_counters(stack, bucket):
    n = int(os.environ.get("EMBEDJOB_E2E_MANY_SHARDS", "200"))
    shards = put_shards(bucket, "many", n=n, images=2, corrupt={7: 1}, size=(32, 32))
    t0 = time.monotonic()
    stack.apply(stack.job_doc("many", {"input": {"uri": f"s3://{bucket}/many/"},
                                       "output": {"uri": f"s3://{bucket}/out/"}}))
    obj = stack.wait_phase("many", "Succeeded", timeout=480, )
    wall = time.monotonic() - t0
    st = obj["status"]
    assert st["shards"] == {"total": n, "queued": 0, "running": 0, "succeeded": n, "failed": 0}
    assert (st["images"]["embedded"], st["images"]["failed"]) == (2 * n - 1, 1)
    assert store_of(obj).executions() == {s: 1 for s in shards}
    job = json.loads(Storage().read_bytes(job_manifest_uri(f"s3://{bucket}/out/")))
    assert job["totals"]["shards"] == n and job["totals"]["images"] == 2 * n - 1
    print(f"\n{n}-shard job: kubectl apply -> Succeeded in {wall:.1f}s "
          f"({n / wall:.2f} shards/s, 2 workers, 2 cores)")
    stack.delete("many")


def test_kubectl_get_watch_prints_no_blank_rows(stack, bucket):
    """`kubectl get ej -w` from before the job exists until it succeeds: every row has a phase and an
    images count (the schema's status default until the operator's first status)."""
    import subprocess

    put_shards(bucket, "in", n=2, images=3)
    watch = subprocess.Popen(["kubectl", f"--kubeconfig={stack.cluster.kubeconfig}", "get", "ej", "-w"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(1)
        stack.apply(stack.job_doc("watched", {"input": {"uri": f"s3://{bucket}/in/"},
                                              "output": {"uri": f"s3://{bucket}/out/"}}))
        stack.wait_phase("watched", "Succeeded", timeout=120)
        time.sleep(2)
    finally:
        watch.terminate()
    lines = [line for line in watch.communicate(timeout=10)[0].splitlines() if line.strip()]
    rows = [line.split() for line in lines if line.startswith("watched")]
    assert rows, lines
    phases = {"Pending", "Running", "Succeeded"}
    for row in rows:  # NAME PHASE PROGRESS IMAGES IMAGES/S AGE: nothing blank between the name and the age
        assert row[1] in phases and len(row) == 6, lines
    stack.delete("watched")


def test_images_column_moves_within_a_shard(stack, bucket):
    """One large shard: `kubectl get ej` shows images embedded so far (the worker's heartbeat) before
    the shard finishes, not only when it does. The shard must outlast several heartbeats (0.75 s) and
    operator ticks (1 s) on an idle machine too: 400 thumbnails took 2 s, too short to see it move."""
    put_shards(bucket, "big", n=1, images=1200, size=(320, 240))
    stack.apply(stack.job_doc("big", {"input": {"uri": f"s3://{bucket}/big/"}, "output": {"uri": f"s3://{bucket}/o/"},
                                      "inference": {"device": "cpu", "batchSize": 8, "numThreads": 1}}))
    obj = stack.wait(
        "big", lambda o: (o.get("status", {}).get("images", {}).get("soFar") or 0) > 0
        and o["status"]["shards"]["succeeded"] == 0, timeout=120, what="images so far within the shard")
    row = stack.kubectl("get", "ej", "big").stdout.splitlines()
    images = row[1].split()[row[0].split().index("IMAGES")]
    assert obj["status"]["shards"]["succeeded"] == 0 and int(images) > 0 or stack.get("big")["status"]["shards"][
        "succeeded"] == 1
    done = stack.wait_phase("big", "Succeeded", timeout=180)["status"]
    assert done["images"]["soFar"] == done["images"]["embedded"] == 1200
    stack.delete("big")
