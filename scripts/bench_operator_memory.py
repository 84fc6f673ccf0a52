#!/usr/bin/env python
"""Operator memory for one job whose shards all succeeded (the finishing ticks: counts gathered from
Redis, status built, ``_job.json`` written), against REAL Redis and SeaweedFS started here. Each
shard's Redis info is what a worker leaves (attempt, worker, times, counts). Prints, per size, the
Python memory the operator holds for the job after its finishing ticks and the peak during them
(tracemalloc; the ticks' seconds are under tracemalloc, slower than without), and before that the
seconds of each steady tick while one shard still runs (the job's cost every interval, 5 s).

    .venv/bin/python scripts/bench_operator_memory.py [--sizes 10000,100000]

The operator's pod limit is 1 GiB (charts/embedjob/values.yaml) and a job may plan up to
EMBEDJOB_MAX_SHARDS (1,000,000) shards: the held and peak figures scale linearly with the shards.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import tracemalloc
import uuid
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000")
    args = ap.parse_args()

    from embedjob.broker import make_app
    from embedjob.dev.services import bench_stack
    from embedjob.operator.accept import accept
    from embedjob.operator.events import JobMemory
    from embedjob.operator.reconcile import Reconciler
    from embedjob.progress import ProgressStore, redis_client

    with bench_stack() as redis_url:
        r = redis_client(redis_url)
        app = make_app(redis_url)
        for n in [int(x) for x in args.sizes.split(",")]:
            r.flushall()
            store = ProgressStore(r, str(uuid.uuid4()))
            spec = {"input": {"uri": f"s3://bench-data/ds/{{000000..{n - 1:06d}}}.tar"},
                    "output": {"uri": f"s3://bench-data/out-{n}/"}, "queue": "bench"}
            acc = accept(store, spec, {}, 1)
            assert acc.ok, acc.status
            _workers_finish(r, store, n)
            # Steady ticks while one shard still runs (a leased worker): the job's every-5-s cost.
            r.hset(store.key("state"), "000000", "running")
            r.set(store.key("lease:000000"), "bench-worker", px=600_000)
            rec = Reconciler(store, app, JobMemory())
            status = rec.tick(spec, acc.status, 1).status
            steady = []
            for _ in range(3):
                t0 = time.perf_counter()
                status = rec.tick(spec, status, 1).status
                steady.append(round(time.perf_counter() - t0, 3))
            assert status["phase"] == "Running", status
            r.hset(store.key("state"), "000000", "succeeded")
            r.delete(store.key("lease:000000"))
            gc.collect()
            tracemalloc.start()
            rec = Reconciler(store, app, JobMemory())  # (a fresh operator process: memory measured from zero)
            t0 = time.perf_counter()
            for _ in range(2):
                status = rec.tick(spec, status, 1).status
            seconds = time.perf_counter() - t0
            held, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            assert status["phase"] == "Succeeded" and status["images"]["embedded"] == 1000 * n, status
            print(json.dumps({"shards": n, "phase": status["phase"], "held_mib": round(held / 2**20, 1),
                              "peak_mib": round(peak / 2**20, 1), "held_bytes_per_shard": round(held / n),
                              "finishing_ticks_s": round(seconds, 2), "steady_tick_s": steady}), flush=True)
            del rec
    return 0


def _workers_finish(r, store, n: int) -> None:  # noqa: ANN001
    """Every shard succeeded, with the info a worker leaves in Redis."""
    now = time.time()
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        stem = f"{i:06d}"
        pipe.hset(store.key("state"), stem, "succeeded")
        pipe.hset(store.key("info"), stem, json.dumps({
            "dispatch": 1, "attempt": 1, "worker": f"embedjob-worker-7d9f8c6b5-x2x9q-{i % 64}", "startedAt": now,
            "error": None, "imagesSoFar": 1000, "gpu": "0", "images": 1000, "failedImages": 2, "tarError": None,
            "finishedAt": now, "updated": now}))
        if i % 10_000 == 9_999:
            pipe.execute()
    pipe.execute()


if __name__ == "__main__":
    sys.exit(main())
