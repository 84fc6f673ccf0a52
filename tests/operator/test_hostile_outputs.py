"""The output prefix is the job owner's to write, and the shared operator reads it: shard manifests a
tenant planted there (not JSON, nested past the parser's depth, a list, counts that are not counts, a
3 MB model id, a sketch of 20,000 points sized 10**9) never raise out of a step, never reach the status, and only make
that shard's counts unknown. Real Redis and SeaweedFS (tests/operator/conftest.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from embedjob.contract import ShardTask
from embedjob.layout import job_manifest_uri, shard_outputs
from embedjob.operator.leases import committed
from embedjob.results import MAX_MANIFEST_VALUES, ManifestUnreadable, read_shard_record, read_shard_records
from embedjob.sketch import QuantileSketch
from embedjob.spec import parse_spec
from embedjob.storage import Storage
from embedjob.worker.runtime.shard_run import committed_counts
from tests.operator.jobs import raw_spec, started, worker_finishes


def _doc(**fields) -> bytes:
    return json.dumps({"counts": {"embedded": 1, "failed": 0}, **fields}).encode()


HOSTILE = {
    "nested": b"[" * 200_000,
    "nested-object": b'{"counts": ' * 100_000,
    "not-json": b"\xff\xfe not json",
    "a-list": b"[1, 2]",
    "count-a-string": json.dumps({"counts": {"embedded": "many"}}).encode(),
    "count-huge": json.dumps({"counts": {"embedded": 10**30}}).encode(),
    "count-negative": json.dumps({"counts": {"embedded": -5}}).encode(),
    "count-a-bool": json.dumps({"counts": {"embedded": True}}).encode(),
    "counts-a-list": json.dumps({"counts": [1]}).encode(),
    "tar-error-an-object": _doc(tar_error={"x": 1}),
    "model-3mb-id": _doc(model={"id": "x" * 3_000_000}),
    "model-nested": _doc(model={"id": "m", "dim": [[[1]]]}),
    "too-many-values": b"[" + b"0," * MAX_MANIFEST_VALUES + b"0]",
}


def _plant(bucket: str, stem: str, body: bytes) -> None:
    Storage().put_atomic(shard_outputs(f"s3://{bucket}/out/", stem).manifest, body)


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_planted_manifest_is_unreadable_and_committed(env, name):
    """Each one: ManifestUnreadable (no other error), read_shard_records marks it unread with zero counts,
    and the lease check takes the shard as committed (never "cannot tell", which would hold it forever)."""
    _r, _app, store, bucket = env
    _plant(bucket, "0000", HOSTILE[name])
    out = f"s3://{bucket}/out/"
    with pytest.raises(ManifestUnreadable):
        read_shard_record(out, "0000", Storage())
    assert read_shard_records(out, ["0000"], Storage())["0000"] == {
        "images": 0, "failedImages": 0, "tarError": None, "model": None, "unread": True}
    assert committed(parse_spec(raw_spec(bucket, n=1)), "0000", store.job) == (0, 0, None)
    task = ShardTask(job=store.job, stem="0000", shard=f"s3://{bucket}/in/0000.tar", output=out, attempt=1)
    assert committed_counts(task, Storage()) == (0, 0, None)  # the worker's check agrees (no failed shard)


@pytest.mark.parametrize("name", ["nested", "a-list", "count-huge", "model-3mb-id"])
def test_a_job_planned_over_planted_manifests_is_accepted_with_true_counts(env, name):
    """Planted before the job: the job is accepted (before: accept raised RecursionError, AttributeError,
    or wrote 10**30 images into the status), and its first tick (which reads the counts of shards found
    done) counts the shard with a worker's manifest, takes the planted one as done with its counts
    unknown, warns once, and queues the rest."""
    r, app, store, bucket = env
    _plant(bucket, "0000", HOSTILE[name])
    _plant(bucket, "0001", _doc(counts={"embedded": 7, "failed": 2}))
    spec = raw_spec(bucket, n=3)
    status, rec = started(r, app, store, spec)
    assert status["shards"]["succeeded"] == 2 and status["shards"]["queued"] == 1
    res = rec.tick(spec, status, 1)
    assert res.status["shards"]["succeeded"] == 2 and res.status["shards"]["queued"] == 1
    assert (res.status["images"]["embedded"], res.status["images"]["failed"]) == (7, 2)
    assert res.status["images"]["countsPending"] == 0
    assert len(json.dumps(res.status)) < 4096
    warned = [e for e in res.events if e.reason == "ManifestUnreadable"]
    assert len(warned) == 1 and "1 shard manifest(s)" in warned[0].message and "0000" in warned[0].message
    assert not [e for e in rec.tick(spec, res.status, 1).events if e.reason == "ManifestUnreadable"]  # once


def test_a_job_whose_manifests_are_replaced_finishes_without_the_planted_model_or_sketches(env):
    """Replaced while the job runs (the worker recorded its counts in Redis): the job succeeds; the
    status's model is the worker's, not a 3 MB planted one (from the next finished shard's manifest when
    the first one's is planted); the planted sketches (20,000 points sized
    10**9, NaN points) add nothing to status.scores, the worker's do; the status stays small."""
    r, app, store, bucket = env
    spec = raw_spec(bucket, n=4, scores={"aesthetic": {"name": "laion/aesthetic", "revision": "r1"}})
    status, rec = started(r, app, store, spec)
    status = rec.tick(spec, status, 1).status
    good = QuantileSketch.of(np.linspace(1.0, 9.0, 200)).to_json()
    model = {"id": "openai/clip-vit-base-patch32", "revision": "r1", "dim": 512}
    planted = {
        "0000": _doc(model={"id": "x" * 3_000_000}),
        "0001": _doc(model=model, score_sketches={"aesthetic": good}),
        "0002": _doc(model=model, score_sketches={"aesthetic": {
            **good, "size": 10**9, "values": [5.0] * 20_000, "weights": 1.0, "count": 20_000}}),
        "0003": _doc(model=model, score_sketches={"aesthetic": {**good, "values": [float("nan")] * 3,
                                                                "weights": [1, 1, 1], "count": 3}}),
    }
    for stem, body in planted.items():
        _plant(bucket, stem, body)
        worker_finishes(store, stem, 1)
    res = rec.tick(spec, status, 1)
    assert res.status["phase"] == "Succeeded"
    assert res.status["model"] == model  # the first finished shard's manifest names none: the next one's
    assert res.status["scores"]["aesthetic"]["count"] == 200
    assert len(json.dumps(res.status)) < 16_384
    job = json.loads(Storage().read_bytes(job_manifest_uri(f"s3://{bucket}/out/")))
    assert job["scores"] == res.status["scores"] and len(json.dumps(job)) < 16_384


def test_an_oversized_manifest_is_refused_by_its_size_before_any_byte_is_read(env):
    """S3 says the object's size (ContentLength): a manifest over the cap is refused from it."""
    from embedjob.results import ManifestTooLarge, read_manifest

    _r, _app, _store, bucket = env
    _plant(bucket, "0000", _doc(pad="x" * (2 << 20)))
    storage = Storage()
    with storage.open_read(shard_outputs(f"s3://{bucket}/out/", "0000").manifest) as f:
        assert Storage.size_of(f) == len(_doc(pad="x" * (2 << 20)))
    with pytest.raises(ManifestTooLarge):
        read_manifest(f"s3://{bucket}/out/", "0000", storage, max_bytes=1 << 20)


def test_many_large_manifests_are_parsed_within_one_budget_for_the_process(tmp_path):
    """24 manifests of 16 MiB (the cap) read 16 at a time, as planning a job over them does: every
    thread's reads and parses together stay within PARSE_BUDGET (96 MiB). Without it this peaked at
    ~300 MiB of Python memory per job planning, several jobs plan at once, and the operator's limit is
    1 GiB."""
    import tracemalloc

    from embedjob import results

    out = str(tmp_path / "out")
    body = _doc(pad="x" * ((16 << 20) - 200))
    stems = [f"{i:04d}" for i in range(24)]
    for stem in stems:
        path = tmp_path / "out" / "_manifests" / f"{stem}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
    assert shard_outputs(out, stems[0]).manifest.endswith("_manifests/0000.json")
    tracemalloc.start()
    try:
        records = read_shard_records(out, stems, Storage())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert all(r["images"] == 1 and not r.get("unread") for r in records.values())
    assert peak < 128 << 20, peak >> 20
    assert results.PARSE_BUDGET.free == results.PARSE_BUDGET.total  # every hold given back


def test_more_planted_manifests_than_a_job_plans_fail_the_plan_naming_the_field(env):
    """Listed, not read: past the most shards one job plans, accept stops the listing and fails the
    plan (it would otherwise hold every planted stem), nothing recorded in Redis."""
    from embedjob.operator.accept import accept
    from embedjob.operator.status import get_condition
    from embedjob.settings import Settings

    r, _app, store, bucket = env
    for i in range(4):
        _plant(bucket, f"p{i:03d}", _doc())
    acc = accept(store, raw_spec(bucket, n=2), {}, 1, settings=Settings(max_shards=3))
    cond = get_condition(acc.status["conditions"], "Failed")
    assert not acc.ok and cond["reason"] == "PlanFailed"
    assert cond["message"].startswith("spec.output.uri: more than 3 shard manifests under"), cond["message"]
    assert store.plan() is None and store.states() == {}
