#!/usr/bin/env python3
"""Chaos run: one EmbeddingJob of many shards while workers, the operator, Redis and the S3 server are
killed and restarted (and S3 paused) at random, from a seed; then a check that nothing was lost,
nothing partial is visible and no shard was committed twice.

    .venv/bin/python scripts/chaos.py                        # 100 shards, ~2 minutes of chaos, seed from time
    .venv/bin/python scripts/chaos.py --seed 7 --chaos-seconds 600 --shards 400 --budget 1800

Everything runs on 127.0.0.1: a kube-apiserver + etcd (built by scripts/build-apiserver.sh), Redis with
AOF (appendfsync always), SeaweedFS with authentication behind a fault-injecting proxy, the operator and
Celery workers as subprocesses. The run is bounded by ``--budget`` seconds and stops by itself.

Verdict (one line, with the seed): PASS when the job Succeeded and
- every shard's outputs are present and consistent: .npy rows = metadata rows = the manifest's count,
  keys in tar order;
- nothing but complete shards under final names (temporary keys only under ``out/_tmp/``; leftovers
  there are reported: a worker killed between its temporary upload and the copy leaves one, see
  docs/operations.md);
- no shard was committed twice (the workers' commit counter in Redis is at most 1 for every shard; a
  shard whose worker died after its manifest was written and before recording it shows 0 and is
  counted done from its manifest by the operator; those are reported).
Exit code 0 on PASS, 1 on FAIL. ``--json FILE`` writes the faults injected and the recovery times.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# For the shared fault harness in tests/. Appended, not prepended: the repository's embedjob/ folder
# must not shadow the installed package (embedjob.operator / embedjob.worker exist only there).
sys.path.append(str(REPO))

from embedjob.dev.cluster import DevCluster  # noqa: E402
from embedjob.worker.model.random_weights import save_random_clip  # noqa: E402
from tests.e2e.faults import FaultStack  # noqa: E402


def _kill_worker(stack: FaultStack, rng: random.Random) -> str:
    stack.workers.ensure()
    victim = rng.choice(stack.workers.procs)
    stack.workers.kill(victim)
    return f"SIGKILL worker pid {victim.pid}"


def _flaky_s3(stack: FaultStack, rng: random.Random) -> str:
    stack.proxy.fail_fraction, stack.proxy.reset_fraction = 0.2, 0.02
    return "S3 answers 20% 503 and resets 2% of traffic"


def _steady_s3(stack: FaultStack) -> None:
    stack.proxy.fail_fraction = stack.proxy.reset_fraction = 0.0


# fault -> (break it, bring it back, outage range in seconds)
FAULTS: dict[str, tuple[Callable[[FaultStack, random.Random], str], Callable[[FaultStack], None],
                        tuple[float, float]]] = {
    "kill-worker": (_kill_worker, lambda s: s.workers.ensure(), (0, 3)),
    "kill-operator": (lambda s, _: (s.operator.kill(), "SIGKILL operator")[1], lambda s: s.operator.start(), (0, 5)),
    "restart-redis": (lambda s, _: (s.kill_redis(), "SIGKILL redis (restarted with its AOF)")[1],
                      lambda s: s.start_redis(), (1, 6)),
    "restart-s3": (lambda s, _: (s.kill_s3(), "SIGKILL SeaweedFS")[1], lambda s: s.start_s3(), (2, 8)),
    "pause-s3": (lambda s, _: (s.pause_s3(), "SIGSTOP SeaweedFS")[1], lambda s: s.resume_s3(), (2, 10)),
    "flaky-s3": (_flaky_s3, _steady_s3, (3, 10)),
}


def progress(stack: FaultStack, name: str) -> int:
    try:
        return int((stack.status(name).get("shards") or {}).get("succeeded") or 0)
    except Exception:  # noqa: BLE001 - the apiserver is fine, but be tolerant while things restart
        return -1


def inject(stack: FaultStack, fault: str, rng: random.Random) -> str:
    """Break one component, wait a random outage, bring it back. Returns what was done."""
    breaker, restore, (low, high) = FAULTS[fault]
    what = breaker(stack, rng)
    down = rng.uniform(low, high)
    time.sleep(down)
    restore(stack)
    return f"{what}, {down:.1f}s"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--shards", type=int, default=100)
    ap.add_argument("--images", type=int, default=8, help="images per shard")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--chaos-seconds", type=float, default=120, help="how long faults are injected")
    ap.add_argument("--budget", type=float, default=420, help="hard limit for the whole run, seconds")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else int(time.time()) % 100000
    rng = random.Random(seed)
    t_start = time.monotonic()
    deadline = t_start + args.budget
    base = Path(tempfile.mkdtemp(prefix="embedjob-chaos-"))
    cluster = DevCluster(base / "kube").start()
    cluster.apply_crds()
    model = save_random_clip(base / "model")
    stack = FaultStack(cluster, base / "stack", str(model), workers=args.workers, namespace="chaos")
    report: dict = {"seed": seed, "shards": args.shards, "images": args.images, "faults": [], "recovery": []}
    verdict, problems = "FAIL", []
    try:
        bucket = stack.bucket()
        shards = stack.put_shards(bucket, args.shards, args.images, size=(64, 48))
        stack.apply("chaos", bucket, args.shards, retries={"perShard": 3, "backoffSeconds": 1})
        print(f"chaos: seed {seed}, {args.shards} shards x {args.images} images, {args.workers} workers; "
              f"logs and data in {base}", flush=True)
        chaos_end = time.monotonic() + args.chaos_seconds
        phase = ""
        while time.monotonic() < min(chaos_end, deadline - 60):
            phase = (stack.status("chaos") or {}).get("phase", "")
            if phase in ("Succeeded", "Failed"):
                break
            time.sleep(rng.uniform(1, 5))
            fault = rng.choice(list(FAULTS))
            before = progress(stack, "chaos")
            t0 = time.monotonic()
            what = inject(stack, fault, rng)
            restored = time.monotonic()
            # recovery: the first progress after the component came back (bounded wait)
            recovered = None
            while time.monotonic() < restored + 60 and time.monotonic() < deadline - 60:
                p = progress(stack, "chaos")
                if p > max(before, 0) or p == args.shards:
                    recovered = time.monotonic() - restored
                    break
                time.sleep(0.5)
            entry = {"at": round(t0 - t_start, 1), "fault": fault, "what": what,
                     "progressAfterSeconds": None if recovered is None else round(recovered, 1)}
            report["faults"].append(entry)
            print(f"  t={entry['at']:6.1f}s {what}; progress again after "
                  f"{entry['progressAfterSeconds']}s", flush=True)
        stack.operator.ensure()
        stack.workers.ensure()
        remaining = max(10.0, deadline - time.monotonic())
        try:
            status = stack.wait("chaos", lambda s: s.get("phase") in ("Succeeded", "Failed"), remaining, "the end")
        except AssertionError as e:
            status = {}
            problems.append(f"not finished within the budget: {str(e)[:300]}")
        report["status"] = {k: status.get(k) for k in ("phase", "shards", "images", "attempts")}
        if status.get("phase") != "Succeeded":
            problems.append(f"phase {status.get('phase')!r}")
        else:
            try:
                stack.verify(bucket, shards)
            except AssertionError as e:
                problems.append(f"outputs: {e}")
            store = stack.store("chaos")
            commits = store.commits()
            twice = {s: n for s, n in commits.items() if n > 1}
            if twice:
                problems.append(f"committed more than once: {twice}")
            from_manifest = sorted(set(shards) - set(commits))
            tmp = list(stack.storage.list(f"s3://{bucket}/out/_tmp/"))
            report.update(committedOnce=sum(1 for n in commits.values() if n == 1), countedFromManifest=from_manifest,
                          tmpLeftovers=len(tmp), executions=sum(store.executions().values()))
        verdict = "PASS" if not problems else "FAIL"
    finally:
        stack.close()
        cluster.stop()
    counts = {f: sum(1 for e in report["faults"] if e["fault"] == f) for f in FAULTS}
    elapsed = time.monotonic() - t_start
    report.update(verdict=verdict, problems=problems, seconds=round(elapsed, 1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    faults = ", ".join(f"{k} {v}" for k, v in counts.items() if v)
    st = report.get("status") or {}
    print(f"chaos: {verdict} seed={seed} shards={args.shards} faults={len(report['faults'])} ({faults or 'none'}) "
          f"phase={st.get('phase')} images={(st.get('images') or {}).get('embedded')} "
          f"attempts={st.get('attempts')} committed-once={report.get('committedOnce')} "
          f"from-manifest={len(report.get('countedFromManifest') or [])} tmp-leftovers={report.get('tmpLeftovers')} "
          f"in {elapsed:.0f}s" + (f"; problems: {problems}" if problems else ""), flush=True)
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
