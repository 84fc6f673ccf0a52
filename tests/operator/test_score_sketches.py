"""A job's score summaries merged while it runs (embedjob.operator.score_sketches): each finished
shard's sketches are read once, in plan order, a slice a tick; the job finishes once all are merged,
with the summaries a merge of every shard in plan order gives, whichever ticks, restarts or finishing
order got there. Real Redis and SeaweedFS (tests/operator/conftest.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from embedjob.layout import job_manifest_uri, shard_outputs
from embedjob.operator import done_before, score_sketches
from embedjob.operator import status as st
from embedjob.operator.events import JobMemory
from embedjob.operator.reconcile import Reconciler
from embedjob.results import read_score_summaries
from embedjob.settings import Settings
from embedjob.sketch import QuantileSketch
from embedjob.storage import Storage
from tests.operator.jobs import raw_spec, started, worker_finishes

SCORES = {"aesthetic": {"name": "laion/aesthetic", "revision": "r1"}, "nsfw": {"name": "laion/nsfw", "revision": "r1"}}


@pytest.fixture()
def reads(monkeypatch):
    """The manifests read for their score sketches; two manifests a tick."""
    seen: list[str] = []
    real = score_sketches.read_score_sketches

    def counting(output_uri, stem, storage=None):
        seen.append(stem)
        return real(output_uri, stem, storage)

    monkeypatch.setattr(score_sketches, "read_score_sketches", counting)
    monkeypatch.setattr(done_before, "CHUNK", 2)
    monkeypatch.setattr(done_before, "READ_SECONDS", 0.0)
    return seen


def finishes(bucket: str, store, stem: str) -> None:
    """The worker's part: the shard's manifest with its sketches (values that differ per shard), then
    its state."""
    rng = np.random.default_rng(int(stem))
    values = {"aesthetic": rng.normal(5.0 + int(stem) / 4, 1.0, 150 + 10 * int(stem)),
              "nsfw": rng.uniform(0.0, 1.0, 150 + 10 * int(stem))}
    manifest = {"counts": {"embedded": values["nsfw"].size, "failed": 0},
                "score_sketches": {name: QuantileSketch.of(v).to_json() for name, v in values.items()}}
    Storage().put_atomic(shard_outputs(f"s3://{bucket}/out/", stem).manifest, json.dumps(manifest).encode())
    worker_finishes(store, stem, values["nsfw"].size)


def _until_finished(rec, spec, status, ticks: int = 20) -> tuple[dict, list[str]]:
    phases = []
    for _ in range(ticks):
        status = rec.tick(spec, status, 1).status
        phases.append(status["phase"])
        if status["phase"] in st.TERMINAL:
            break
    return status, phases


def _six_finished(env) -> tuple[dict, dict, Reconciler]:
    """A job of 6 shards with score heads, all finished by the workers, and the tick that saw them."""
    r, app, store, bucket = env
    spec = raw_spec(bucket, n=6, scores=SCORES)
    status, rec = started(r, app, store, spec)
    status = rec.tick(spec, status, 1).status
    for i in range(6):
        finishes(bucket, store, f"{i:04d}")
    return spec, rec.tick(spec, status, 1).status, rec


def test_the_sketches_are_merged_a_slice_a_tick_and_the_job_finishes_when_all_are(env, reads):
    bucket = env[3]
    spec, status, rec = _six_finished(env)
    assert status["phase"] == "Running" and reads == ["0000", "0001"]
    message = st.get_condition(status["conditions"], "Complete")["message"]
    assert message == "6/6 shards done; reading the score sketches of 4 shard(s)"
    assert not Storage().exists(job_manifest_uri(f"s3://{bucket}/out/"))
    status, phases = _until_finished(rec, spec, status)
    assert phases == ["Running", "Succeeded"] and reads == [f"{i:04d}" for i in range(6)]  # each once, in order
    stems = [f"{i:04d}" for i in range(6)]
    reads.clear()
    assert status["scores"] == read_score_summaries(f"s3://{bucket}/out/", stems, Storage())  # all at once
    job = json.loads(Storage().read_bytes(job_manifest_uri(f"s3://{bucket}/out/")))
    assert job["scores"] == status["scores"] and status["scores"]["nsfw"]["count"] == sum(150 + 10 * i
                                                                                         for i in range(6))


def test_shards_finishing_out_of_order_are_merged_in_plan_order_and_each_read_once(env, reads):
    r, app, store, bucket = env
    spec = raw_spec(bucket, n=5, scores=SCORES)
    status, rec = started(r, app, store, spec)
    status = rec.tick(spec, status, 1).status
    for stem in ("0001", "0002", "0004"):
        finishes(bucket, store, stem)
    status = rec.tick(spec, status, 1).status
    assert reads == []  # 0000 is not finished: nothing after it is merged yet
    finishes(bucket, store, "0000")
    status = rec.tick(spec, status, 1).status
    assert reads == ["0000", "0001"]
    status = rec.tick(spec, status, 1).status
    assert reads == ["0000", "0001", "0002"]  # stops before 0003 (running)
    finishes(bucket, store, "0003")
    status, _ = _until_finished(rec, spec, status)
    assert status["phase"] == "Succeeded" and reads == [f"{i:04d}" for i in range(5)]
    stems = [f"{i:04d}" for i in range(5)]
    assert status["scores"] == read_score_summaries(f"s3://{bucket}/out/", stems, Storage())


def test_an_operator_restart_mid_merge_gives_the_same_summaries(env, reads):
    r, app, store, bucket = env
    spec, status, rec = _six_finished(env)
    status = rec.tick(spec, status, 1).status
    assert status["phase"] == "Running" and len(reads) == 4
    other = Reconciler(store, app, JobMemory(), Settings(min_queued=10_000))  # the operator restarted
    status, _ = _until_finished(other, spec, status)
    assert status["phase"] == "Succeeded"
    stems = [f"{i:04d}" for i in range(6)]
    assert status["scores"] == read_score_summaries(f"s3://{bucket}/out/", stems, Storage())


def test_a_shard_failed_for_good_and_a_manifest_gone_are_passed_over(env, reads):
    """Before, a succeeded shard whose manifest someone deleted made the finishing tick raise on every
    try: the job never finished."""
    r, app, store, bucket = env
    spec = raw_spec(bucket, n=4, scores=SCORES, maxFailedShards=1)
    status, rec = started(r, app, store, spec)
    status = rec.tick(spec, status, 1).status
    store.set_state("0000", "failed", error="ValueError: not a tar", errorCode="ValueError", transient=False,
                    permanent=True)
    for stem in ("0001", "0002", "0003"):
        finishes(bucket, store, stem)
    Storage().delete(shard_outputs(f"s3://{bucket}/out/", "0002").manifest)
    status, _ = _until_finished(rec, spec, status)
    assert status["phase"] == "Succeeded" and status["shards"]["failed"] == 1
    assert status["scores"] == read_score_summaries(f"s3://{bucket}/out/", ["0001", "0003"], Storage())
    assert status["scores"]["nsfw"]["count"] == 160 + 180


def test_a_job_over_a_finished_output_merges_after_counting(env, reads):
    r, app, store, bucket = env
    stems = [f"{i:04d}" for i in range(4)]
    for stem in stems:
        finishes(bucket, store, stem)
    r.delete(store.key("state"), store.key("info"))  # (the earlier job's progress)
    spec = raw_spec(bucket, n=4, scores=SCORES)
    status, rec = started(r, app, store, spec)
    assert status["images"]["countsPending"] == 4
    status, phases = _until_finished(rec, spec, status)
    assert phases[0] == "Running" and phases[-1] == "Succeeded"  # 2 or 3 ticks (which counts come first varies)
    assert status["images"]["embedded"] == sum(150 + 10 * i for i in range(4))
    assert status["scores"] == read_score_summaries(f"s3://{bucket}/out/", stems, Storage())
