"""Status as a pure function of observed counts: phases, counters, conditions, patch-on-change."""

from __future__ import annotations

import datetime as dt

from embedjob.operator import status as st
from tests.operator.jobs import is_true

T0 = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.UTC)


def test_condition_shape_and_transition_time_kept_while_status_unchanged():
    c1 = st.make_condition("Complete", False, "InProgress", "1/3", 2, T0)
    assert set(c1) == {"type", "status", "lastTransitionTime", "reason", "message", "observedGeneration"}
    assert c1["status"] == "False" and c1["lastTransitionTime"] == "2026-01-01T12:00:00Z"
    later = T0 + dt.timedelta(minutes=5)
    conds = st.set_condition([c1], st.make_condition("Complete", False, "InProgress", "2/3", 2, later))
    assert conds[0]["lastTransitionTime"] == "2026-01-01T12:00:00Z" and conds[0]["message"] == "2/3"
    conds = st.set_condition(conds, st.make_condition("Complete", True, "AllShardsDone", "3/3", 2, later))
    assert conds[0]["lastTransitionTime"] == "2026-01-01T12:05:00Z" and conds[0]["status"] == "True"
    assert len(conds) == 1


def test_phases_from_counts():
    policy = st.Policy(max_failed_shards=1)
    assert st.decide_phase(st.Observed(total=4, queued=4), policy, dispatched=False)[0] == st.PENDING
    assert st.decide_phase(st.Observed(total=4, queued=3, running=1), policy, True)[0] == st.RUNNING
    assert st.decide_phase(st.Observed(total=4, succeeded=3, failed=1), policy, True)[0] == st.SUCCEEDED
    phase, reason, msg = st.decide_phase(st.Observed(total=4, succeeded=1, failed=2, queued=1), policy, True)
    assert (phase, reason) == (st.FAILED, "TooManyFailedShards") and "maxFailedShards=1" in msg
    assert st.decide_phase(st.Observed(total=4, queued=4), st.Policy(suspend=True), True)[0] == st.SUSPENDED


def test_build_status_counters_progress_and_conditions():
    obs = st.Observed(total=10, queued=5, running=2, succeeded=3, images=300, failed_images=4,
                      images_this_run=300, images_in_flight=17)
    s = st.build_status({"startTime": "2026-01-01T11:59:00Z"}, obs, st.Policy(), generation=3,
                        now=T0, rate=12.5)
    assert s["phase"] == st.RUNNING and s["progress"] == "3/10"
    assert s["shards"] == {"total": 10, "queued": 5, "running": 2, "succeeded": 3, "failed": 0}
    # soFar (the IMAGES column) moves within a shard: the running shards' heartbeat counts
    assert s["images"] == {"embedded": 300, "failed": 4, "soFar": 317, "embeddedThisRun": 300, "countsPending": 0}
    assert s["imagesPerSecond"] == 12.5 and s["observedGeneration"] == 3
    assert not is_true(s["conditions"], st.COMPLETE) and not is_true(s["conditions"], st.FAILED_COND)
    assert "estimatedCompletionTime" in s and "completionTime" not in s

    done = st.Observed(total=10, succeeded=10, images=1000, images_this_run=1000)
    s2 = st.build_status(s, done, st.Policy(), generation=3, now=T0 + dt.timedelta(seconds=30))
    assert s2["phase"] == st.SUCCEEDED and is_true(s2["conditions"], st.COMPLETE)
    assert s2["completionTime"] == "2026-01-01T12:00:30Z" and "estimatedCompletionTime" not in s2
    assert s2["imagesPerSecond"] == round(1000 / 90, 1)  # the average over the run, start to completion
    # terminal phases are sticky, and a second evaluation changes nothing: no patch
    s3 = st.build_status(s2, done, st.Policy(), generation=3, now=T0 + dt.timedelta(seconds=90))
    assert st.status_patch(s2, s3) == {}


def test_rate_of_a_finished_job_counts_only_what_this_run_embedded():
    """3 shards found done at planning (300 images), nothing embedded now: 0 images/s, not 300 / elapsed."""
    start = {"startTime": "2026-01-01T11:59:50Z", "plan": {"doneAtStart": 3}}
    nothing = st.Observed(total=3, succeeded=3, images=300, images_this_run=0)
    s = st.build_status(start, nothing, st.Policy(), generation=1, now=T0)
    assert s["phase"] == st.SUCCEEDED and s["imagesPerSecond"] == 0.0
    assert s["images"]["embedded"] == 300 and s["images"]["embeddedThisRun"] == 0
    half = st.Observed(total=3, succeeded=3, images=300, images_this_run=100)
    assert st.build_status(start, half, st.Policy(), generation=1, now=T0)["imagesPerSecond"] == 10.0


def test_truncated_shards_are_a_counter_and_a_condition():
    obs = st.Observed(total=4, succeeded=4, images=40, truncated=[("00002", "tar truncated or corrupt after x.jpg")],
                      model={"path": "/m", "dim": 32, "weightsSha256": "ab"})
    s = st.build_status({}, obs, st.Policy(), generation=1, now=T0)
    assert s["phase"] == st.SUCCEEDED  # recorded (spec.onTruncatedShard: record), but never silent:
    assert s["dataLoss"] == {"truncatedShards": 1,
                             "shards": [{"stem": "00002", "error": "tar truncated or corrupt after x.jpg"}]}
    loss = st.get_condition(s["conditions"], st.DATA_LOSS)
    assert loss["status"] == "True" and loss["reason"] == "TruncatedShards" and "00002" in loss["message"]
    assert s["model"] == {"path": "/m", "dim": 32, "weightsSha256": "ab"}
    clean = st.build_status({}, st.Observed(total=1, succeeded=1), st.Policy(), generation=1, now=T0)
    assert clean["dataLoss"]["truncatedShards"] == 0 and not is_true(clean["conditions"], st.DATA_LOSS)


def test_failed_shards_list_is_bounded():
    fs = [st.FailedShard(stem=f"{i:05d}", shard=f"s3://b/{i:05d}.tar", attempts=4, error="x" * 2000)
          for i in range(st.MAX_FAILED_SHARDS_LISTED + 7)]
    obs = st.Observed(total=100, failed=len(fs), failed_shards=fs, succeeded=100 - len(fs))
    s = st.build_status({}, obs, st.Policy(max_failed_shards=1000), generation=1, now=T0)
    assert len(s["failedShards"]) == st.MAX_FAILED_SHARDS_LISTED
    assert s["failedShardsTruncated"] == 7
    assert len(s["failedShards"][0]["error"]) == st.MAX_ERROR_CHARS
    assert s["shards"]["failed"] == len(fs) and s["phase"] == st.SUCCEEDED


def test_status_patch_only_differences_and_deletions():
    cur = {"phase": "Running", "progress": "1/2", "estimatedCompletionTime": "x", "kopf": {"a": 1}}
    des = {"phase": "Running", "progress": "2/2"}
    assert st.status_patch(cur, des) == {"progress": "2/2", "estimatedCompletionTime": None}


def test_rate_and_eta():
    samples = [(0.0, 0), (10.0, 100), (20.0, 300)]
    assert st.images_per_second(samples) == 15.0
    assert st.images_per_second([(0.0, 5)]) == 0.0
    obs = st.Observed(total=10, succeeded=5)
    eta = st.estimate_completion(obs, T0, T0 + dt.timedelta(seconds=100))
    assert eta == "2026-01-01T12:03:20Z"
    assert st.estimate_completion(st.Observed(total=10, succeeded=2), T0, T0 + dt.timedelta(seconds=5),
                                  done_at_start=2) is None


def test_invalid_status_names_the_reason():
    s = st.invalid_status({}, "InvalidSpec", "spec.output.uri: must not be inside the input", 1, T0)
    assert s["phase"] == st.FAILED
    c = st.get_condition(s["conditions"], st.FAILED_COND)
    assert c["reason"] == "InvalidSpec" and "spec.output.uri" in c["message"]


def test_terminal_conditions_agree_with_the_phase():
    """A job that fails mid-run must not keep Complete=False/InProgress, and a succeeded one must not
    keep Failed=False/InProgress."""
    running = st.build_status({}, st.Observed(total=16, queued=16), st.Policy(), generation=1, now=T0)
    assert st.get_condition(running["conditions"], "Complete")["reason"] == "InProgress"
    failed = st.build_status(running, st.Observed(total=16, queued=15, failed=1), st.Policy(), generation=1, now=T0)
    assert failed["phase"] == st.FAILED
    complete = st.get_condition(failed["conditions"], "Complete")
    assert (complete["status"], complete["reason"]) == ("False", "Failed") and "failed" in complete["message"]
    assert st.get_condition(failed["conditions"], "Failed")["status"] == "True"

    done = st.build_status(running, st.Observed(total=16, succeeded=16), st.Policy(), generation=1, now=T0)
    failed_cond = st.get_condition(done["conditions"], "Failed")
    assert (failed_cond["status"], failed_cond["reason"]) == ("False", "Succeeded")
    assert st.get_condition(done["conditions"], "Complete")["status"] == "True"


def test_fatal_error_fails_the_job_with_its_message():
    obs = st.Observed(total=16, queued=13, failed=0, fatal="HeadObject s3://b/k: 403 (HTTP 403): Forbidden")
    phase, reason, message = st.decide_phase(obs, st.Policy(max_failed_shards=5), dispatched=True)
    assert (phase, reason) == (st.FAILED, "StorageAccessFailed") and "HTTP 403" in message
