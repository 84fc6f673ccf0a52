"""The benchmark's end-to-end measurement: the real worker path, the Celery task's body
``ShardRunner.run`` (lease, heartbeat, model load, pipeline, outputs written), over every shard, from a
cold start (no model loaded, no decode pool).

One worker process runs ``in_flight`` shards at a time on threads, as ``embedjob worker`` does. With
``processes`` > 1 (``--processes-per-gpu``), that many worker processes run side by side on the same
device, each loading its own model and taking its share of the decode CPUs; they pull shards from
one queue as workers pull them from the broker.

Besides the overall rate it reports what a user pays for:

- **start-up**: from the start until the first batch is written (model load, batch-size tuning,
  compile, decode pool start, the first decodes);
- **steady state**: the rate from the moment every process has written its first batch to the last
  batch written;
- **main-process CPU per image**: the CPU time of the process(es) that run the task, decode
  processes (their children) excluded.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from embedjob.bench.measure import measurement
from embedjob.bench.monitor import TreeMonitor, own_cpu_seconds
from embedjob.contract import EmbedOptions, ShardTask
from embedjob.storage import Storage, StorageOptions

NO_REDIS = ("no Redis: the task body keeps its leases and progress there (embedjob bench starts a private "
            "redis-server when one is installed: apt-get install redis-server)")


@contextmanager
def batch_writes() -> Iterator[list[tuple[float, int]]]:
    """Records ``(time.time(), rows)`` of every batch a shard writer of this process takes, while the
    block runs: the bench's probe for the first batch written (nothing in the worker changes; the
    method is restored on exit)."""
    from embedjob.worker.datapath.write import ShardWriter

    writes: list[tuple[float, int]] = []
    lock = threading.Lock()
    original = ShardWriter.add

    def add(self: ShardWriter, embeddings: Any, rows: list, *args: Any, **kwargs: Any) -> None:
        original(self, embeddings, rows, *args, **kwargs)
        with lock:
            writes.append((time.time(), len(rows)))

    ShardWriter.add = add  # type: ignore[method-assign]
    try:
        yield writes
    finally:
        ShardWriter.add = original  # type: ignore[method-assign]


def timeline(start: float, writes_per_process: list[list[tuple[float, int]]]) -> dict[str, Any]:
    """Start-up and steady state from the batch writes of each process (``time.time()`` stamps)."""
    firsts = [min(t for t, _ in w) for w in writes_per_process if w]
    if not firsts:
        return {"startup_seconds": None, "steady_images_per_s": None, "steady_seconds": None}
    ready = max(firsts)  # every process is producing
    last = max(t for w in writes_per_process for t, _ in w)
    after = sum(n for w in writes_per_process for t, n in w if t > ready)
    steady = after / (last - ready) if last > ready and after else None
    return {"startup_seconds": round(min(firsts) - start, 3),
            "all_started_seconds": round(ready - start, 3),
            "steady_seconds": round(last - ready, 3), "steady_images": after,
            "steady_images_per_s": round(steady, 2) if steady else None}


def _run_tasks(take: Callable[[], tuple[str, str] | None], job: str, output: str, model: dict[str, Any],
               options: EmbedOptions, storage_options: StorageOptions, in_flight: int) -> list[dict[str, Any]]:
    """``in_flight`` threads run the task body (``ShardRunner.run``, one runner and Redis client for all, as
    in a worker) on the shards ``take`` hands out until none is left."""
    from embedjob.worker.runtime.shard_run import ShardRunner

    runner = ShardRunner()

    results: list[dict[str, Any]] = []
    errors: list[BaseException] = []

    def worker() -> None:
        while not errors and (item := take()) is not None:
            shard, stem = item
            task = ShardTask(job=job, shard=shard, stem=stem, output=output, model=model,
                             options=asdict(options), storage=storage_options.to_dict())
            try:
                result = runner.run(task)
                if result.get("status") != "done":
                    raise RuntimeError(f"shard {stem}: {result}")
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)
                return
            results.append(result)

    threads = [threading.Thread(target=worker, name=f"bench-task-{i}") for i in range(max(1, in_flight))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def _gpu_memory(options: EmbedOptions, reset: bool = False) -> float | None:
    from embedjob.worker.model.torch_env import resolve_device, torch

    device = resolve_device(options.device)
    if device.type != "cuda":
        return None
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
        return None
    return round(torch.cuda.max_memory_reserved(device) / 2**20, 1)


def _worker_process(index: int, work: Any, replies: Any, go: Any, job: str, output: str, model: dict[str, Any],
                    options: EmbedOptions, storage_options: StorageOptions, in_flight: int,
                    pool_kind: str | None) -> None:
    """One worker process of a ``processes`` > 1 e2e (spawned): imports first, then waits for the
    start so that every process starts at once, then runs shards until the queue is empty."""
    try:
        from embedjob.worker.datapath.batch import decode_workers
        from embedjob.worker.datapath.decode_pool import shared_decode_pool
        from embedjob.worker.model.load import load_embedder
        from embedjob.worker.runtime import shard_run as _shard_run  # noqa: F401 - imported before the start

        replies.put(("ready", index, None))
        go.wait()
        cpu0 = own_cpu_seconds()

        def take() -> tuple[str, str] | None:
            try:
                return work.get_nowait()
            except queue.Empty:
                return None

        with batch_writes() as writes, TreeMonitor() as mon:
            if pool_kind:
                shared_decode_pool(decode_workers(options), pool_kind)
            results = _run_tasks(take, job, output, model, options, storage_options, in_flight)
        embedder = load_embedder(model, device=options.device, precision=options.precision, compile=options.compile)
        replies.put(("done", index, {"results": results, "writes": writes, "main_cpu_seconds": own_cpu_seconds() - cpu0,
                                     "main_cpu_seconds_by_thread": mon.report()["main_cpu_seconds_by_thread"],
                                     "model_busy_seconds": embedder.busy_seconds(),
                                     "gpu_memory_mib": _gpu_memory(options)}))
    except BaseException as e:  # noqa: BLE001 - reported to the bench
        replies.put(("error", index, f"{type(e).__name__}: {e}"))


def _in_processes(pairs: list[tuple[str, str]], processes: int, job: str, output: str, model: dict[str, Any],
                  options: EmbedOptions, storage_options: StorageOptions, in_flight: int,
                  pool_kind: str | None) -> tuple[float, float, list[dict[str, Any]]]:
    """Runs the shards in ``processes`` spawned worker processes; returns the ``time.time()`` of the
    start (every process imported and waiting), of the end, and each process's outcome."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no CUDA state, no threads inherited
    work, replies, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    for pair in pairs:
        work.put(pair)
    procs = [ctx.Process(target=_worker_process, name=f"bench-e2e-{i}", daemon=True,
                         args=(i, work, replies, go, job, output, model, options, storage_options, in_flight,
                               pool_kind)) for i in range(processes)]
    for p in procs:
        p.start()
    try:
        outcomes: dict[int, dict[str, Any]] = {}
        ready = 0
        start = 0.0
        while len(outcomes) < processes:
            try:
                kind, index, payload = replies.get(timeout=5)
            except queue.Empty:
                if any(not p.is_alive() and p.exitcode not in (0, None) for p in procs):
                    raise RuntimeError("an e2e worker process died") from None
                continue
            if kind == "error":
                raise RuntimeError(f"e2e worker process {index}: {payload}")
            if kind == "ready":
                ready += 1
                if ready == processes:
                    start = time.time()
                    go.set()
            else:
                outcomes[index] = payload
        return start, time.time(), [outcomes[i] for i in range(processes)]
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()


def measure_e2e(shards: list[str], stems: list[str], output: str, model: dict[str, Any], options: EmbedOptions,
                storage_options: StorageOptions, redis_url: str | None, in_flight: int = 2, processes: int = 1,
                pool_kind: str | None = None, decode_cpus: int = 0) -> dict[str, Any]:
    """The real worker path (module docstring), outputs written and checked. With ``processes`` > 1
    each worker process gets ``decode_cpus // processes`` decode workers."""
    if redis_url is None:
        return {"skipped": NO_REDIS}
    from embedjob import settings

    if settings.load().redis_url != redis_url:  # the task body reads its Redis from the process settings
        raise RuntimeError(f"e2e needs EMBEDJOB_REDIS_URL={redis_url} in the process settings "
                           "(embedjob.bench.entry sets it to its private Redis)")

    from embedjob.results import read_manifest
    from embedjob.worker.datapath.batch import decode_workers
    from embedjob.worker.datapath.decode_pool import discard_decode_pool, shared_decode_pool
    from embedjob.worker.model.load import clear_cache, load_embedder

    processes = max(1, processes)
    if processes > 1:
        options = replace(options, num_threads=max(1, (decode_cpus or decode_workers(options)) // processes))
    clear_cache()
    discard_decode_pool()
    _gpu_memory(options, reset=True)
    job = f"bench-{uuid.uuid4().hex[:8]}"
    storage = Storage(storage_options)
    pairs = list(zip(shards, stems, strict=True))
    with TreeMonitor() as mon:
        t0 = time.perf_counter()
        if processes == 1:
            start = time.time()
            todo = iter(pairs)
            lock = threading.Lock()

            def take() -> tuple[str, str] | None:
                with lock:
                    return next(todo, None)

            with batch_writes() as writes:
                if pool_kind:  # the kind asked for; embed_shard keeps the shared pool's kind
                    shared_decode_pool(decode_workers(options), pool_kind)
                results = _run_tasks(take, job, output, model, options, storage_options, in_flight)
            outcomes = None
        else:
            spawned = time.time()
            start, end, outcomes = _in_processes(pairs, processes, job, output, model, options, storage_options,
                                                 in_flight, pool_kind)
            results = [r for o in outcomes for r in o["results"]]
        seconds = time.perf_counter() - t0
        if outcomes is not None:  # from the start, as in one process (whose imports are done by then)
            seconds, spawn_seconds = end - start, start - spawned
    images = sum(r["images"] for r in results)
    timings: dict[str, float] = {}
    for r in results:
        for k, v in r["timings"].items():
            timings[k] = timings.get(k, 0.0) + v
    manifests = [read_manifest(output, stem, storage) for stem in stems]
    written = sum(m["counts"]["embedded"] for m in manifests)
    if written != images:
        raise RuntimeError(f"manifests record {written} images, the task results {images}")
    # Included in ``seconds`` (the first task loads the model, tunes the batch and compiles), and
    # shown on its own: a long job pays it once per worker.
    warmup = max(float(m["model"].get("compileWarmupSeconds") or 0) for m in manifests)
    extra: dict[str, Any] = {}
    if outcomes is None:
        embedder = load_embedder(model, device=options.device, precision=options.precision, compile=options.compile)
        extra.update(timeline(start, [writes]), model_busy_seconds=round(embedder.busy_seconds(), 3),
                     gpu_memory_mib=_gpu_memory(options))
        if embedder.text is not None and options.text:
            extra["text_busy_seconds"] = round(embedder.text.busy_seconds, 3)
    else:
        extra.update(timeline(start, [o["writes"] for o in outcomes]),
                     model_busy_seconds=round(sum(o["model_busy_seconds"] for o in outcomes), 3),
                     gpu_memory_mib_per_process=[o["gpu_memory_mib"] for o in outcomes],
                     main_cpu_seconds_per_process=[round(o["main_cpu_seconds"], 3) for o in outcomes],
                     process_spawn_seconds=round(spawn_seconds, 3))
    row = measurement(images, seconds, mon, failed=sum(r["failed"] for r in results), shards=len(shards),
                      shards_in_flight=in_flight, processes=processes, decode_workers=decode_workers(options),
                      decode_pool=pool_kind or "process",
                      stage_seconds={k: round(v, 3) for k, v in sorted(timings.items())},
                      preprocessing_paths=_sum_paths(manifests), batch_size=manifests[0]["options"]["batch_size"],
                      compile_warmup_seconds=round(warmup, 3), **extra)
    if outcomes is not None:  # the processes that ran the task, not the bench's own
        main = sum(o["main_cpu_seconds"] for o in outcomes)
        row["main_cpu_seconds"] = round(main, 3)
        by_thread: dict[str, float] = {}
        for o in outcomes:
            for name, sec in o["main_cpu_seconds_by_thread"].items():
                by_thread[name] = round(by_thread.get(name, 0.0) + sec, 3)
        row["main_cpu_seconds_by_thread"] = dict(sorted(by_thread.items(), key=lambda kv: -kv[1]))
        row["main_cpu_ms_per_image"] = round(1000 * main / images, 3) if images else None
    return row


def _sum_paths(manifests: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for m in manifests:
        for k, v in (m.get("preprocessing_paths") or {}).items():
            out[k] = out.get(k, 0) + v
    return out


def profile_e2e(out: Path, shards: list[str], stems: list[str], output: str, model: dict[str, Any],
                options: EmbedOptions, storage_options: StorageOptions, redis_url: str | None, in_flight: int,
                device: Any) -> dict[str, Any]:
    """One more e2e (one process) under ``torch.profiler``, CPU and, on CUDA, device activity: ``out``
    gets the operators and kernels by self device time and by self CPU time, and the report gets
    where the device time went. Slower than the measured e2e (the profiler's own cost); for the
    question of what the rate is spent on, not for the rate."""
    from torch.profiler import ProfilerActivity, profile

    if redis_url is None:
        return {"skipped": NO_REDIS}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:  # every thread (the forward and decode threads, not only this one), and the CUDA syncs
        from torch._C._profiler import _ExperimentalConfig

        extra = {"experimental_config": _ExperimentalConfig(profile_all_threads=True,
                                                            enable_cuda_sync_events=device.type == "cuda")}
    except (ImportError, TypeError):  # an older torch: this thread's operators only
        extra = {}
    with profile(activities=activities, **extra) as prof:
        row = measure_e2e(shards, stems, output, model, options, storage_options, redis_url, in_flight)
    averages = prof.key_averages()
    sections = []
    if device.type == "cuda":
        sections.append(("by self device time", averages.table(sort_by="self_cuda_time_total", row_limit=30)))
    sections.append(("by self CPU time", averages.table(sort_by="self_cpu_time_total", row_limit=30)))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(f"## e2e under torch.profiler, {title} ({row['images']} images, {row['seconds']} s)\n\n"
                           f"{table}\n\n" for title, table in sections))
    device_us = sum(getattr(e, "self_device_time_total", 0) or 0 for e in averages)
    return {"file": str(out), "images": row["images"], "seconds": row["seconds"],
            "device_busy_fraction": round(device_us / 1e6 / row["seconds"], 3) if device.type == "cuda" else None}
