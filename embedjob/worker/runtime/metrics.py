"""The worker's Prometheus metrics, correct under Celery's prefork pool.

A Celery worker is a main process that forks pool children; the tasks, and so the counters, live in
the children. prometheus_client's multiprocess mode handles that: every process writes its values to
files in ``PROMETHEUS_MULTIPROC_DIR``, and the main process serves ``/metrics`` from a fresh
registry with a ``MultiProcessCollector`` that sums them. ``embedjob worker`` sets it up
(:func:`embedjob.worker.runtime.multiproc.prepare` before anything imports prometheus_client, :func:`serve` once the
pool is up); a child that exits has its live gauges dropped (``mark_process_dead``), while its
counters stay counted. See docs/operations.md, "Metrics".

Labels are bounded: a failure reason *class*, a pipeline stage, a shard outcome; never a job, a
shard or an image (per-job numbers come from the operator).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from prometheus_client import Counter, Gauge, Histogram

from embedjob.settings import library_env

log = logging.getLogger("embedjob.worker")

ENV = "PROMETHEUS_MULTIPROC_DIR"

# -- the metrics (module import = creation; multiprocess-aware when ENV is set) ---------------------------
IMAGES_EMBEDDED = Counter("embedjob_worker_images_embedded", "Images embedded (rows written to .npy files).")
IMAGES_FAILED = Counter("embedjob_worker_images_failed", "Images skipped and recorded in shard manifests, by "
                        "reason class.", ["reason"])
SHARDS = Counter("embedjob_worker_shards", "Shard tasks by outcome: succeeded, failed, skipped (manifest "
                 "existed), duplicate (another worker holds it), cancelled (job stopped).", ["outcome"])
SHARD_SECONDS = Histogram("embedjob_worker_shard_duration_seconds", "Wall time of one embedded shard, "
                          "read to manifest.", buckets=(1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600,
                                                        7200, float("inf")))
STAGE_SECONDS = Counter("embedjob_worker_stage_seconds", "Seconds spent per pipeline stage (read, decode, "
                        "preprocess, inference, write, wait); decode and preprocess are summed over threads.",
                        ["stage"])
SHARDS_RUNNING = Gauge("embedjob_worker_shards_running", "Shards this worker is embedding now.",
                       multiprocess_mode="livesum")
BATCH_SIZE = Gauge("embedjob_worker_batch_size", "Images per forward pass of the latest shard.",
                   multiprocess_mode="livemax")
MODEL_BUSY = Gauge("embedjob_worker_model_busy_ratio", "Fraction of the latest shard's wall time the model "
                   "was running forwards (inference seconds / shard seconds; on CUDA, the GPU busy fraction "
                   "as the worker sees it: low means decode or I/O starves the GPU).", multiprocess_mode="livemax")
OOM_BACKOFFS = Counter("embedjob_worker_oom_backoffs", "Shards during which the batch size was lowered after "
                       "a CUDA out-of-memory error (the model keeps the smaller size).")
MODEL_LOAD_SECONDS = Histogram("embedjob_worker_model_load_seconds", "Time to load the CLIP model into a "
                               "worker process (once per process and model).",
                               buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, float("inf")))
CUDA_ALLOCATED = Gauge("embedjob_worker_cuda_memory_allocated_bytes", "torch.cuda.memory_allocated (CUDA only).",
                       ["device"], multiprocess_mode="livesum")
CUDA_RESERVED = Gauge("embedjob_worker_cuda_memory_reserved_bytes", "torch.cuda.memory_reserved (CUDA only).",
                      ["device"], multiprocess_mode="livesum")

# Reason classes, from the reason strings the pipeline writes into a manifest's "failed" list.
_REASONS = (
    ("too many pixels", "too_large"), ("decompression bomb", "too_large"), ("member too large", "too_large"),
    ("empty file", "empty"),
    ("preprocess:", "preprocess"),
    ("not a supported image", "decode"), ("corrupt image", "decode"), ("cannot decode", "decode"),
    ("invalid image size", "decode"),
    ("already has an image", "duplicate_key"),
)


def reason_class(reason: str) -> str:
    low = (reason or "").lower()
    for needle, cls in _REASONS:
        if needle in low:
            return cls
    return "other"


def record_backoff(before: int | None, after: int | None) -> None:
    """Counts a shard whose embedder lowered its largest batch (``Embedder.max_batch``)."""
    if after is not None and (before is None or after < before):
        OOM_BACKOFFS.inc()


def record_success(images: int, failed_reasons: Iterable[str], seconds: float, timings: Mapping[str, float],
                   batch_size: int) -> None:
    """A shard embedded and committed."""
    SHARDS.labels("succeeded").inc()
    IMAGES_EMBEDDED.inc(images)
    for r in failed_reasons:
        IMAGES_FAILED.labels(reason_class(r)).inc()
    SHARD_SECONDS.observe(seconds)
    for stage, s in timings.items():
        if stage != "total" and s > 0:
            STAGE_SECONDS.labels(stage).inc(s)
    BATCH_SIZE.set(batch_size)
    if seconds > 0:
        MODEL_BUSY.set(min(1.0, timings.get("inference", 0.0) / seconds))
    record_cuda()


def record_cuda() -> None:
    """CUDA memory of this process's devices; nothing at all on a machine without CUDA."""
    try:
        import torch

        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return
        for i in range(torch.cuda.device_count()):
            CUDA_ALLOCATED.labels(str(i)).set(torch.cuda.memory_allocated(i))
            CUDA_RESERVED.labels(str(i)).set(torch.cuda.memory_reserved(i))
    except Exception as e:  # noqa: BLE001 - metrics never fail a shard
        log.debug("cuda metrics: %s", e)


# -- serving (main process) ---------------------------------------------------------------------------------
def serve(port: int, addr: str = "0.0.0.0") -> None:
    """``/metrics`` of all the worker's processes, from the main process."""
    from prometheus_client import REGISTRY, CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    if not library_env(ENV):
        # Started without `embedjob worker` (e.g. `celery -A ... worker`) and no folder set before
        # start: only this process's values can be shown, and pool children's are not among them.
        log.warning("%s is not set: /metrics shows the main process only (start with `embedjob worker`)", ENV)
        start_http_server(port, addr=addr, registry=REGISTRY)
        return
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    start_http_server(port, addr=addr, registry=registry)
    log.info("worker metrics on http://%s:%d/metrics (multiprocess folder %s)", addr, port, library_env(ENV))


def child_exited(pid: int) -> None:
    """A pool child is gone: drop its live gauges (its counters stay in the totals)."""
    if library_env(ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
