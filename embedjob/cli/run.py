"""``embedjob run job.yaml``: the same EmbeddingJob on one machine, no cluster, no Redis.

Plans the shards, skips the finished ones (manifest present: the plan owns that decision here, as
the operator's does in a cluster), runs the rest in local processes (each loads the model once),
retries failures with the same policy as the operator (embedjob.policy), shows a live progress bar,
writes the job manifest on success and returns an exit code from the failure policy. Torch is
imported only inside the worker processes.
"""

from __future__ import annotations

import heapq
import itertools
import multiprocessing as mp
import queue as queue_mod
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from embedjob import policy
from embedjob.contract import ShardTask
from embedjob.planning import Shard, plan_shards
from embedjob.results import done_stems, read_score_summaries, read_shard_records, write_job_manifest
from embedjob.settings import set_library_env
from embedjob.spec import Job
from embedjob.storage import Storage, StorageOptions


@dataclass
class RunSummary:
    """What ``embedjob run`` reports. The totals describe the whole output, whatever run wrote it
    (shards done before count with their manifests' numbers); the rate counts this run only."""

    job: str
    shards_total: int
    shards_done_before: int = 0
    shards_succeeded: int = 0  # embedded by this run
    shards_failed: int = 0
    images: int = 0  # embedded by this run
    failed_images: int = 0  # skipped by this run
    images_before: int = 0  # in the shards an earlier run finished
    failed_images_before: int = 0
    truncated: dict[str, str] = field(default_factory=dict)  # stem -> tar error, over every finished shard
    seconds: float = 0.0
    failed: dict[str, str] = field(default_factory=dict)  # stem -> last error
    ok: bool = False

    @property
    def images_per_second(self) -> float:
        """Images this run embedded per second of this run."""
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def images_total(self) -> int:
        return self.images_before + self.images

    @property
    def failed_images_total(self) -> int:
        return self.failed_images_before + self.failed_images


# -- worker process side ------------------------------------------------------------------------------
_progress_queue: Any = None


def _init_worker(progress_queue: Any, torch_threads: int | None, placement: dict | None = None) -> None:
    global _progress_queue
    _progress_queue = progress_queue
    if placement:
        _place_worker(**placement)
    if torch_threads:
        # The model loader sizes torch's thread pool from OMP_NUM_THREADS when set (else from every
        # CPU); setting it here makes several workers share the CPUs instead of each taking all.
        set_library_env("OMP_NUM_THREADS", str(torch_threads))
        from embedjob.worker.model.torch_env import torch  # after torch's OpenMP policy is set

        torch.set_num_threads(torch_threads)


def _place_worker(counter: Any, workers: int, per_gpu: int, gpus: list[str], cpus: list[int]) -> None:
    """Before anything starts CUDA in a new worker process: take the next index; pin the process to
    GPU ``index // per_gpu`` of ``gpus`` (CUDA_VISIBLE_DEVICES, so ``cuda`` is that GPU) and to its
    share of ``cpus``, where its decode workers run. The same placement as `embedjob worker`'s pool."""
    import os

    from embedjob.worker.runtime.lifecycle import cpu_share

    with counter.get_lock():
        index = counter.value % workers
        counter.value += 1
    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[(index // per_gpu) % len(gpus)]
    share = cpu_share(index, workers, cpus)
    if share and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, share)


def _run_one(task: dict) -> dict:
    """One shard in a worker process: the Celery task's own shard run, without the Redis parts
    (embedjob.worker.runtime.shard_run.embed_task). A failure comes back classified
    (policy.describe_failure), as plain data: an exception's cause chain does not survive the trip
    between processes."""
    from embedjob.worker.runtime.shard_run import embed_task, task_inputs

    shard_task = ShardTask.from_dict(task)
    try:
        options, storage = task_inputs(shard_task)
        last = [0.0]

        def on_progress(n: int) -> None:
            now = time.monotonic()
            if _progress_queue is not None and now - last[0] > 0.2:
                last[0] = now
                _progress_queue.put((shard_task.stem, n))

        result = embed_task(shard_task, options, storage, on_progress=on_progress)
    except Exception as e:  # noqa: BLE001 - a shard-level failure, retried per policy
        return {"status": "failed", **policy.describe_failure(e)}
    return result.to_dict()


# -- main process side --------------------------------------------------------------------------------
def check_model(model: dict) -> str:
    """Fail fast, before any work starts, when the model cannot be resolved (a folder, the model cache
    or a reachable hub: :class:`~embedjob.worker.model.resolve.ModelUnavailable`, one message naming
    the field and what to set), or is not a CLIP checkpoint (the same config read the worker's loader
    does: :class:`~embedjob.worker.model.resolve.ModelUnavailable` too). Returns where it loads from."""
    from embedjob.worker.model.load import ModelLoadError, ModelRef, default_model_dir, vision_config
    from embedjob.worker.model.resolve import ModelUnavailable, resolve_model

    cache_dir = default_model_dir()
    where = resolve_model(model, cache_dir)
    try:
        vision_config(ModelRef.of(model), cache_dir, where.local_only)
    except ModelLoadError as e:
        raise ModelUnavailable("spec.model.path" if model.get("path") else "spec.model.name", str(e)) from e
    return where.describe(model.get("name"), model.get("revision"))


def visible_gpus(device: str) -> list[str]:
    """The GPUs the local workers spread over: CUDA_VISIBLE_DEVICES's entries (ids or UUIDs), else
    0..N-1; none when the job runs on the CPU or torch sees no GPU."""
    import os

    if device not in ("auto", "cuda"):
        return []
    try:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return []
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return (visible or [str(i) for i in range(count)])[:count]


def default_workers(device: str, processes_per_gpu: int = 1) -> int:
    """One worker process per GPU times ``processes_per_gpu`` (on the CPU: ``processes_per_gpu``)."""
    return max(1, len(visible_gpus(device))) * max(1, processes_per_gpu)


def run_job(
    job: Job,
    workers: int | None = None,
    show_progress: bool = True,
    processes_per_gpu: int = 1,
    out: Any = None,
    extra_manifest: dict[str, Any] | None = None,
    retry_truncated: bool = False,
) -> RunSummary:
    """Run every unfinished shard of ``job`` locally, in ``workers`` processes (default: one per GPU
    times ``processes_per_gpu``, each pinned to its GPU and its share of the CPUs). Never raises for
    shard failures: they are in the summary, whose ``ok`` follows ``spec.maxFailedShards``.
    ``retry_truncated``: shards finished as truncated or partly unreadable tars (their manifest
    records a tar error) are redone."""
    out = out or sys.stderr
    spec = job.spec
    storage = Storage(StorageOptions.from_spec(spec))
    shards = plan_shards(spec.input, storage)
    check_model(asdict(spec.model))
    done = set() if spec.output.overwrite else done_stems(spec.output.uri, storage) & {s.stem for s in shards}
    # What the earlier runs left: the totals count them (from their manifests), the rate does not.
    before = read_shard_records(spec.output.uri, sorted(done), storage)
    redo = {stem for stem, r in before.items() if r["tarError"]} if retry_truncated else set()
    done -= redo
    todo = [s for s in shards if s.stem not in done]
    summary = RunSummary(job=job.name, shards_total=len(shards), shards_done_before=len(done))
    again = f" ({len(redo)} truncated, retried)" if redo else ""
    print(f"embedjob: {job.name}: {len(shards)} shards, {len(done)} already done, {len(todo)} to run{again} "
          f"-> {spec.output.uri}", file=out)

    started = time.time()
    states: dict[str, dict[str, Any]] = {}
    for stem in sorted(done):
        r = before[stem]
        states[stem] = {"state": "succeeded", "previousRun": True, **r}
        summary.images_before += r["images"]
        summary.failed_images_before += r["failedImages"]
    if todo:
        workers = workers or default_workers(spec.inference.device, processes_per_gpu)
        _execute(job, todo, workers, show_progress, summary, states, out, per_gpu=max(1, processes_per_gpu))
    # This run's shards: their tar errors and model from the manifests they just wrote.
    now_done = [stem for stem, st in states.items() if st["state"] == "succeeded" and not st.get("previousRun")]
    for stem, r in read_shard_records(spec.output.uri, now_done, storage).items():
        states[stem].update(tarError=r["tarError"], model=r["model"])
    summary.truncated = {stem: st["tarError"] for stem, st in sorted(states.items()) if st.get("tarError")}
    summary.seconds = time.time() - started
    summary.ok = not policy.job_failed(summary.shards_failed, spec.maxFailedShards)
    if summary.ok:
        scores = None
        if spec.scores.heads():  # merged from the shards' sketches, earlier runs' included
            done_now = sorted(stem for stem, st in states.items() if st["state"] == "succeeded")
            scores = read_score_summaries(spec.output.uri, done_now, storage)
        write_job_manifest(storage, spec.output.uri, job=job.name, spec=spec.to_dict(), shards=states,
                           started_at=started, extra=extra_manifest, scores=scores)
        if spec.output.report:
            _write_report(spec.output.uri, storage, {s.uri for s in shards}, out)
    return summary


def _write_report(output: str, storage: Storage, inputs: set[str], out: Any) -> None:
    """``output.report``: `embedjob report`'s page as report.html under the output (thumbnails from the
    job's own shards only). A failure is said, not raised: the embeddings are complete."""
    from embedjob.report import write_report

    try:
        print(f"embedjob: report: {write_report(output, storage, inputs.__contains__)}", file=out)
    except Exception as e:  # noqa: BLE001
        print(f"embedjob: warning: the report could not be written: {e}", file=out)


def _execute(job: Job, todo: list[Shard], workers: int, show_progress: bool, summary: RunSummary,
             states: dict[str, dict[str, Any]], out: Any, per_gpu: int = 1) -> None:
    from tqdm import tqdm

    spec = job.spec
    ctx = mp.get_context("spawn")
    progress_q = ctx.Queue()
    from embedjob.worker.host import available_cpus

    threads = max(1, available_cpus() // workers) if workers > 1 else None

    def shard_task(shard: Shard, attempt: int) -> dict[str, Any]:
        """The shard's task message, as the operator would send it (ShardTask.build)."""
        task = ShardTask.build(job.name, spec, shard.uri, shard.stem, attempt=attempt)
        if threads and not task.options["num_threads"]:
            # each worker decodes on its share of the CPUs, not on all of them
            task = replace(task, options={**task.options, "num_threads": threads})
        return task.to_dict()

    import os

    gpus = visible_gpus(spec.inference.device)
    placement = None
    if workers > 1:  # each worker on its GPU (per_gpu to a GPU) and its share of the CPUs
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        placement = {"workers": workers, "per_gpu": per_gpu, "gpus": gpus, "cpus": cpus}

    def new_pool() -> ProcessPoolExecutor:
        args = dict(placement, counter=ctx.Value("i", 0)) if placement else None
        return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                   initargs=(progress_q, threads, args))

    pool = new_pool()
    attempts: dict[str, int] = {}
    failures: dict[str, policy.Decision] = {}
    retry_heap: list[tuple[float, int, Shard]] = []  # (due, sequence, shard): the sequence breaks ties
    sequence = itertools.count()
    pending = list(reversed(todo))  # pop() from the end keeps plan order
    running: dict[Future, Shard] = {}
    in_shard: dict[str, int] = {}
    t0 = time.monotonic()
    bar = tqdm(total=len(todo), unit="shard", desc=job.name, file=out, disable=not show_progress,
               dynamic_ncols=True, smoothing=0.1, mininterval=0.5)

    def postfix() -> None:
        images = summary.images + sum(in_shard.values())
        rate = images / max(time.monotonic() - t0, 1e-9)
        bar.set_postfix_str(f"images={images} {rate:.1f} img/s failed={summary.shards_failed}", refresh=False)

    def fail(shard: Shard, error: str, transient: bool = False, permanent: bool = False) -> None:
        in_shard.pop(shard.stem, None)
        n = attempts[shard.stem]
        before = failures.get(shard.stem)
        d = policy.on_failure(transient=transient, failures=before.failures if before else 0,
                              transient_failures=before.transient_failures if before else 0,
                              per_shard=spec.retries.perShard, backoff_base=spec.retries.backoffSeconds,
                              permanent=permanent)
        failures[shard.stem] = d
        if not d.final:
            kind = "transient error" if d.transient_failures else "failed"
            bar.write(f"shard {shard.stem} {kind} (attempt {n}): {error}; retrying in {d.delay:.0f}s", file=out)
            heapq.heappush(retry_heap, (time.monotonic() + d.delay, next(sequence), shard))
        elif permanent:
            bar.write(f"shard {shard.stem} FAILED (permanent error, not retried): {error}", file=out)
            summary.shards_failed += 1
            summary.failed[shard.stem] = error
            states[shard.stem] = {"state": "failed", "error": error, "attempts": n, "permanent": True}
            bar.update(1)
        else:
            bar.write(f"shard {shard.stem} FAILED after {n} attempts: {error}", file=out)
            summary.shards_failed += 1
            summary.failed[shard.stem] = error
            states[shard.stem] = {"state": "failed", "error": error, "attempts": n}
            bar.update(1)

    try:
        while pending or running or retry_heap:
            now = time.monotonic()
            while retry_heap and retry_heap[0][0] <= now:
                pending.append(heapq.heappop(retry_heap)[2])
            while pending and len(running) < workers:
                shard = pending.pop()
                attempts[shard.stem] = attempts.get(shard.stem, 0) + 1
                fut = pool.submit(_run_one, shard_task(shard, attempts[shard.stem]))
                running[fut] = shard
            if not running:
                time.sleep(min(0.5, max(0.0, retry_heap[0][0] - now)) if retry_heap else 0.05)
                continue
            finished, _ = wait(list(running), timeout=0.25, return_when=FIRST_COMPLETED)
            while True:
                try:
                    stem, n = progress_q.get_nowait()
                    in_shard[stem] = n
                except queue_mod.Empty:
                    break
            broken = False
            for fut in finished:
                shard = running.pop(fut)
                try:
                    res = fut.result()
                except BrokenProcessPool:
                    broken = True
                    fail(shard, "worker process died")
                    continue
                except Exception as e:  # noqa: BLE001 - a shard-level failure, retried per policy
                    fail(shard, f"{type(e).__name__}: {e}")
                    continue
                if res.get("status") == "failed":
                    fail(shard, res["error"], transient=bool(res.get("transient")),
                         permanent=bool(res.get("permanent")))
                    continue
                in_shard.pop(shard.stem, None)
                summary.shards_succeeded += 1
                summary.images += res["images"]
                summary.failed_images += res["failed"]
                states[shard.stem] = {"state": "succeeded", "images": res["images"],
                                      "failedImages": res["failed"], "seconds": res["seconds"]}
                bar.update(1)
            if broken:
                # Every shard in the broken pool is lost with it: fail them all (they are retried) and
                # start a fresh pool.
                for fut, shard in list(running.items()):
                    running.pop(fut)
                    fail(shard, "worker process died")
                pool.shutdown(wait=False, cancel_futures=True)
                pool = new_pool()
            postfix()
    finally:
        bar.close()
        pool.shutdown(wait=True, cancel_futures=True)
        progress_q.close()


def format_summary(s: RunSummary, output: str) -> str:
    """The closing summary: the output's totals (every shard present, earlier runs included), what
    this run did and its rate, and any data loss (never an unqualified OK over a truncated shard)."""
    verdict = "OK" if s.ok else "FAILED"
    if s.ok and s.truncated:
        verdict = f"OK WITH DATA LOSS ({len(s.truncated)} truncated shard{'s' if len(s.truncated) > 1 else ''})"
    lines = [
        f"job {s.job}: {verdict}",
        f"  shards:  {s.shards_total} total, {s.shards_done_before} already done, {s.shards_succeeded} embedded now, "
        f"{s.shards_failed} failed",
        f"  images:  {s.images_total} embedded, {s.failed_images_total} skipped (recorded in the manifests"
        + (f"; {s.images} embedded by this run)" if s.shards_done_before else ")"),
        f"  time:    {s.seconds:.1f} s, {s.images_per_second:.2f} images/s (this run's images)",
        f"  output:  {output}",
    ]
    if s.truncated:
        lines.append(f"  data loss: {len(s.truncated)} shard(s) are truncated or partly unreadable tars: the samples "
                     "after the damage are lost (rerun with --retry-truncated once the source is fixed; "
                     "spec.onTruncatedShard: fail refuses them)")
        for stem, err in list(s.truncated.items())[:20]:
            lines.append(f"  truncated shard {stem}: {err}")
    for stem, err in sorted(s.failed.items())[:20]:
        lines.append(f"  failed shard {stem}: {err}")
    return "\n".join(lines)
