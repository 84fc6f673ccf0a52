"""Metrics end to end, scraped by a REAL Prometheus (Debian's binary, 1 s scrape interval): the operator
(session subprocess) and a dedicated pool of worker subprocesses on their own queue, so the workers'
counters hold exactly this module's jobs. Totals read back through Prometheus' HTTP API must equal the
job's status counters and its manifests exactly; a failed shard and a lease expiry move their metrics;
the KEDA demand never reads 0 while a worker is busy; every PromQL expression of the chart's Grafana
dashboard returns data."""

from __future__ import annotations

import json
import math
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from embedjob.progress import ProgressStore, redis_client
from embedjob.results import read_manifest
from embedjob.storage import s3_client
from tests.e2e.conftest import Workers, put_shards
from tests.e2e.prom import Prometheus

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def metrics_queue() -> str:
    return f"metrics-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def metrics_workers(e2e_env, metrics_queue, tmp_path_factory):
    # JSON logs (EMBEDJOB_LOG_FORMAT=json): each line of a shard's work names the job, shard and worker.
    w = Workers({**e2e_env, "EMBEDJOB_LOG_FORMAT": "json"}, metrics_queue,
                tmp_path_factory.mktemp("metrics-worker-logs"), count=2)
    w.ensure()
    yield w
    w.stop()


@pytest.fixture(scope="module")
def prometheus(operator_process, worker_pool, metrics_workers, tmp_path_factory):
    operator_process.ensure()
    p = Prometheus(tmp_path_factory.mktemp("prometheus"), {
        "embedjob-operator": [operator_process.metrics_port],
        "embedjob-worker": metrics_workers.metrics_ports + worker_pool.metrics_ports,
    }).start()
    p.started = time.time()
    want = 1 + len(metrics_workers.metrics_ports) + len(worker_pool.metrics_ports)
    p.wait_for(lambda: list(p.targets_up().values()).count("up") == want, 120, "every target up")
    yield p
    p.stop()


@pytest.fixture()
def bucket(stack):
    name = f"metrics-{uuid.uuid4().hex[:12]}"
    s3_client().create_bucket(Bucket=name)
    return name


def worker_sel(workers: Workers) -> str:
    return 'instance=~"' + "|".join(f"127.0.0.1:{p}" for p in workers.metrics_ports) + '"'


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def test_totals_equal_status_and_manifests(stack, bucket, prometheus, metrics_workers, metrics_queue):
    prom, ws = prometheus, worker_sel(metrics_workers)
    shards = put_shards(bucket, "in", n=4, images=6, corrupt={1: 2})
    s3_client().put_object(Bucket=bucket, Key="in/0009.tar", Body=b"this is not a tar archive" * 40)
    name = "metrics-totals"
    t0 = time.time()
    stack.apply(stack.job_doc(name, {"input": {"uri": f"s3://{bucket}/in/"}, "output": {"uri": f"s3://{bucket}/out/"},
                                     "queue": metrics_queue, "maxFailedShards": 1,
                                     "retries": {"perShard": 1, "backoffSeconds": 1}}))
    obj = stack.wait_phase(name, "Succeeded", timeout=240)
    st = obj["status"]
    manifests = [read_manifest(f"s3://{bucket}/out", stem) for stem in shards]
    embedded = sum(m["counts"]["embedded"] for m in manifests)
    skipped = sum(m["counts"]["failed"] for m in manifests)
    assert (embedded, skipped) == (22, 2)
    assert (st["images"]["embedded"], st["images"]["failed"]) == (embedded, skipped)
    assert st["shards"]["succeeded"] == 4 and st["shards"]["failed"] == 1
    assert st["attempts"]["failures"] == 1  # the broken shard (not a tar): a permanent failure, not retried

    job = f'namespace="default",name="{name}"'

    def settled():
        # The last scrape of each target has landed once the worker totals and the status agree.
        got = (prom.value(f"embedjob_job_images_embedded_total{{{job}}}"),
               prom.value(f"sum(embedjob_worker_images_embedded_total{{{ws}}})"),
               prom.value(f'embedjob_job_phase{{{job},phase="Succeeded"}}'),
               prom.value(f'sum(embedjob_worker_shards_total{{{ws},outcome="failed"}})'))
        return got == (embedded, embedded, 1, 1) or (assert_false(got))

    prom.wait_for(settled, 60, "the final scrape")
    # operator: exactly the status
    assert prom.value(f"embedjob_job_images_skipped_total{{{job}}}") == skipped
    assert prom.by(f"embedjob_job_shards{{{job}}}", "state") == {
        "queued": 0, "running": 0, "succeeded": 4, "failed": 1}
    assert prom.value(f"embedjob_job_planned_shards{{{job}}}") == 5
    assert prom.value(f"embedjob_job_truncated_shards{{{job}}}") == 0
    assert prom.value(f"embedjob_job_shard_failures_total{{{job}}}") == 1
    assert prom.value(f"embedjob_job_shard_transient_failures_total{{{job}}}") == st["attempts"]["transientFailures"]
    assert prom.value(f"embedjob_job_lease_expiries_total{{{job}}}") == st["attempts"]["leaseExpiries"]
    assert prom.value(f"embedjob_job_messages_lost_total{{{job}}}") == st["attempts"]["messagesLost"]
    # 5 first sends, no retry of the permanent failure (+ any re-enqueue the safety nets did)
    assert prom.value(f"embedjob_job_shards_dispatched_total{{{job}}}") == \
        5 + st["attempts"]["leaseExpiries"] + st["attempts"]["messagesLost"]
    assert prom.value(f'embedjob_job_info{{{job},queue="{metrics_queue}",uid="{obj["metadata"]["uid"]}"}}') == 1
    assert prom.value(f'embedjob_queue_demand_shards{{queue="{metrics_queue}"}}') == 0
    assert prom.value(f'embedjob_queue_messages{{queue="{metrics_queue}"}}') == 0
    assert prom.value("sum(embedjob_operator_reconcile_duration_seconds_count)") > 0
    # workers: exactly the manifests
    assert prom.by(f"sum by (reason) (embedjob_worker_images_failed_total{{{ws}}})", "reason") == {"decode": 2}
    assert prom.value(f'sum(embedjob_worker_shards_total{{{ws},outcome="succeeded"}})') == 4
    assert prom.value(f"sum(embedjob_worker_shard_duration_seconds_count{{{ws}}})") == 4
    stages = prom.by(f"sum by (stage) (embedjob_worker_stage_seconds_total{{{ws}}})", "stage")
    assert {"read", "decode", "preprocess", "inference", "write"} <= set(stages), stages
    assert prom.value(f"max(embedjob_worker_batch_size{{{ws}}})") == 16
    assert prom.value(f"sum(embedjob_worker_model_load_seconds_count{{{ws}}})") >= 1
    assert prom.value(f"sum(embedjob_worker_shards_running{{{ws}}})") == 0
    assert not prom.query(f"embedjob_worker_cuda_memory_allocated_bytes{{{ws}}}"), "no CUDA here: no CUDA series"

    # KEDA's number: it rose while the job ran, it is 0 now, and it never read 0 while a worker of this
    # queue was busy from 1 s before that reading to 2 s after it. Both sides are scraped every second,
    # each at its own moment: when the last shards finish, the operator's 0 can be scraped before the
    # workers' 0 (a worker's latest sample is up to ~2 s older), so a reading is a violation only if the
    # workers' later samples still say busy. Evaluated at E: demand as scraped at E - 2 s, workers
    # over [E - 3 s, E].
    end = time.time()
    demand = prom.query_range(f'embedjob_queue_demand_shards{{queue="{metrics_queue}"}}', t0, end, 0.5)
    assert demand and max(float(v) for _, v in demand[0]["values"]) >= 1, demand
    violations = prom.query_range(
        f"(min_over_time(sum(embedjob_worker_shards_running{{{ws}}})[3s:250ms]) > 0) and on() "
        f'(sum(embedjob_queue_demand_shards{{queue="{metrics_queue}"}} offset 2s) == 0)', t0 + 2, end, 0.25)
    assert violations == [], f"demand read 0 while a worker was busy: {violations}"
    # ... and the check could fail: the workers were busy for 3 s on end at least once
    spans = prom.query_range(f"min_over_time(sum(embedjob_worker_shards_running{{{ws}}})[3s:250ms])", t0, end, 0.5)
    assert spans and max(float(v) for _, v in spans[0]["values"]) >= 1, "no worker was busy for 3 s"
    busy = prom.query_range(f"sum(embedjob_worker_shards_running{{{ws}}})", t0, end, 0.5)
    assert busy and max(float(v) for _, v in busy[0]["values"]) >= 1, "no scrape saw a worker busy"

    # JSON logs carry the broken shard's context: its one attempt (a permanent failure, not retried).
    lines = [json.loads(line) for f in sorted(metrics_workers.logdir.glob("worker-*.log"))
             for line in f.read_text(errors="replace").splitlines() if line.startswith("{")]
    failed = [x for x in lines if x.get("job") == obj["metadata"]["uid"] and x.get("stem") == "0009"
              and x["level"] == "ERROR"]
    assert sorted(x["attempt"] for x in failed) == [1], failed
    assert "failed (permanent, not retried): TarOpenError" in failed[0]["message"]
    assert all(x["shard"] == f"s3://{bucket}/in/0009.tar" and x["worker"] for x in failed)

    # A deleted job's series disappear.
    stack.delete(name)
    assert f'name="{name}"' not in scrape(stack.operator.metrics_port)


def assert_false(got):
    raise AssertionError(got)


def test_lease_expiry_moves_its_metric(stack, bucket, prometheus, metrics_workers, metrics_queue):
    prom = prometheus
    put_shards(bucket, "in", n=3, images=60, size=(160, 120))
    name = "metrics-lease"
    stack.apply(stack.job_doc(name, {"input": {"uri": f"s3://{bucket}/in/"}, "output": {"uri": f"s3://{bucket}/out/"},
                                     "queue": metrics_queue}))
    obj = stack.wait(name, lambda o: o.get("metadata", {}).get("uid") is not None, 10)
    store = ProgressStore(redis_client(), obj["metadata"]["uid"])
    job = f'namespace="default",name="{name}"'
    deadline, victim = time.monotonic() + 90, None
    while time.monotonic() < deadline and victim is None:
        for stem, state in store.states().items():
            owner = store.lease_owner(stem) if state == "running" else None
            if owner:
                victim = metrics_workers.by_pid(int(owner.split(":")[1]))
                break
        time.sleep(0.05)
    assert victim is not None, "no shard was seen running on the metrics workers"
    before = prom.value(f"embedjob_job_lease_expiries_total{{{job}}}") or 0
    metrics_workers.kill(victim)
    metrics_workers.start_one()  # takes the dead worker's metrics port
    obj = stack.wait_phase(name, "Succeeded", timeout=240)
    st = obj["status"]
    assert st["attempts"]["leaseExpiries"] >= 1, st["attempts"]
    prom.wait_for(lambda: prom.value(f"embedjob_job_lease_expiries_total{{{job}}}") == st["attempts"]["leaseExpiries"]
                  and prom.value(f'embedjob_job_phase{{{job},phase="Succeeded"}}') == 1, 60, "lease expiry scraped")
    assert before == 0
    assert prom.value(f"embedjob_job_images_embedded_total{{{job}}}") == st["images"]["embedded"] == 180
    # the re-enqueue after the expiry is a dispatch of its own
    assert prom.value(f"embedjob_job_shards_dispatched_total{{{job}}}") >= 3 + st["attempts"]["leaseExpiries"]
    stack.delete(name)


DASHBOARD = Path(__file__).resolve().parents[2] / "charts" / "embedjob" / "dashboards" / "embedjob.json"


def dashboard_exprs() -> list[tuple[str, str]]:
    doc = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in doc["panels"] for t in p.get("targets", [])]


def test_every_dashboard_expression_returns_data(prometheus, metrics_workers):
    """Runs after the jobs above: each expression, over this module's time range, has at least one real
    (non-NaN) value. EXEMPT on a machine without CUDA: the GPU memory panel, whose series exist only on
    CUDA workers (its absence here is asserted in test_totals_equal_status_and_manifests)."""
    prom = prometheus
    exprs = dashboard_exprs()
    assert len(exprs) >= 15
    cuda = bool(prom.query("embedjob_worker_cuda_memory_allocated_bytes"))
    empty = []
    for title, expr in exprs:
        if "cuda_memory" in expr and not cuda:
            continue  # exempt: CPU-only workers export no CUDA series (by design)
        result = prom.query_range(expr, prometheus.started, time.time(), 1.0)
        values = [float(v) for series in result for _, v in series["values"]]
        if not any(not math.isnan(v) for v in values):
            empty.append((title, expr))
    assert not empty, f"dashboard expressions without data: {empty}"
