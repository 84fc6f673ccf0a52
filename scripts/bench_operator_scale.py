#!/usr/bin/env python
"""Operator scale benchmark: plan + record + first ticks of jobs of 1,000 / 10,000 / 100,000 shards
against REAL Redis and SeaweedFS (started here on free ports), no workers. The 1,000-shard job is
the baseline: per-shard costs should stay flat as the job grows.

    .venv/bin/python scripts/bench_operator_scale.py [--sizes 1000,10000,100000] [--done [--scores]]

Prints, per size: seconds to accept (validate, plan, list the output's manifests, record the plan),
seconds per tick (aggregate states, dispatch up to the backlog cap, build status), Redis memory for
the job, and the size of the status patch (it must not grow with the job: failedShards is bounded).
With ``--done`` (every shard already has its manifest) it ticks on until the job succeeds (each tick
reads manifests for up to embedjob.operator.done_before.READ_SECONDS): how many ticks, the longest
one and their sum, the job's total images checked against the planted manifests; ``--scores`` adds a
score head, a sketch in each manifest, and checks the merged count.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path

# For tests/ helpers. Appended, not prepended: the repository's embedjob/ folder must not shadow the
# installed package (embedjob.operator / embedjob.worker exist only there).
sys.path.append(str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--ticks", type=int, default=3)
    ap.add_argument("--done", action="store_true",
                    help="every shard already has its manifest (a job run again over a finished output): "
                         "the ticks read them all for their counts")
    ap.add_argument("--scores", action="store_true",
                    help="the job has a score head and each manifest carries its sketch: the ticks merge them")
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
        rows = []
        for n in [int(x) for x in args.sizes.split(",")]:
            r.flushall()
            store = ProgressStore(r, str(uuid.uuid4()))
            if args.done:
                _plant_manifests(f"s3://bench-data/out-{n}/", n, args.scores)
            spec = {"input": {"uri": f"s3://bench-data/ds/{{000000..{n - 1:06d}}}.tar"},
                    "output": {"uri": f"s3://bench-data/out-{n}/"}, "queue": "bench",
                    **({"scores": {"aesthetic": {"name": "laion/aesthetic", "revision": "r1"}}} if args.scores else {})}
            t0 = time.perf_counter()
            acc = accept(store, spec, {}, 1)
            t_accept = time.perf_counter() - t0
            assert acc.ok, acc.status
            rec = Reconciler(store, app, JobMemory())
            status, tick_s = acc.status, []
            for _ in range(args.ticks):
                t0 = time.perf_counter()
                res = rec.tick(spec, status, 1)
                tick_s.append(time.perf_counter() - t0)
                status = res.status
            row: dict = {}
            if args.done:  # every shard is done: tick on until the job succeeds
                ticks = len(tick_s)
                while status.get("phase") != "Succeeded" and ticks < 100_000:
                    t0 = time.perf_counter()
                    status = rec.tick(spec, status, 1).status
                    tick_s.append(time.perf_counter() - t0)
                    ticks += 1
                row = {"succeeded_after_ticks": ticks, "longest_tick_s": round(max(tick_s), 2),
                       "ticks_total_s": round(sum(tick_s), 2)}
                assert status["images"]["embedded"] == 1000 * n, status["images"]
                if args.scores:
                    assert status["scores"]["aesthetic"]["count"] == 1000 * n, status["scores"]
            mem = sum(r.memory_usage(k) or 0 for k in r.scan_iter(store.prefix + "*"))
            rows.append({"shards": n, "accept_s": round(t_accept, 3), "tick_s": [round(x, 3) for x in tick_s],
                         "queued_messages": r.llen("bench"), "redis_job_mib": round(mem / 2**20, 2),
                         "status_bytes": len(json.dumps(status)), "phase": status.get("phase"),
                         "progress": status.get("progress"), **row})
            print(json.dumps(rows[-1]), flush=True)
        base = rows[0]
        for row in rows[1:]:
            k = row["shards"] / base["shards"]
            def ratio(a: float, b: float) -> str:
                return f"x{a / b:.1f}" if b > 0 else "n/a (baseline under 1 ms)"

            print(f"{row['shards']} shards vs {base['shards']}: accept {ratio(row['accept_s'], base['accept_s'])}, "
                  f"first tick {ratio(row['tick_s'][0], base['tick_s'][0])}, later ticks "
                  f"{ratio(row['tick_s'][-1], base['tick_s'][-1])} (size x{k:.0f})")
    return 0


def _plant_manifests(output: str, n: int, scores: bool = False) -> None:
    """A worker-sized manifest (~2 KB: counts, model, files; with ``scores``, a score's sketch of 1,000
    values) for each of the ``n`` shards."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from embedjob.layout import shard_outputs
    from embedjob.sketch import QuantileSketch
    from embedjob.storage import Storage

    storage = Storage()
    body = json.dumps({"counts": {"embedded": 1000, "failed": 2}, "tar_error": None,
                       "model": {"id": "openai/clip-vit-large-patch14", "revision": "0" * 40, "dim": 768,
                                 "family": "clip", "weightsSha256": "0" * 64},
                       "failed": [{"key": "k", "member": "k.jpg", "reason": "broken image"}] * 2,
                       "files": {name: {"uri": "s3://x/" + name, "bytes": 1, "sha256": "0" * 64}
                                 for name in ("embeddings", "metadata")},
                       **({"score_sketches": {"aesthetic": QuantileSketch.of(
                           np.random.default_rng(0).normal(5, 1, 1000)).to_json()}} if scores else {})},
                      indent=2).encode()
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda i: storage.put_atomic(shard_outputs(output, f"{i:06d}").manifest, body), range(n)))


if __name__ == "__main__":
    sys.exit(main())
