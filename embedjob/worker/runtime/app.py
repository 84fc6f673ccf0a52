"""The worker's Celery app: the shared app (embedjob.broker) with the worker's own consumer and
bootstep, and the signal handlers that drive the worker's life (metrics endpoint, model preload and
readiness, GPU pinning of pool children, warm shutdown). Importing this module makes those changes;
the Celery task module (embedjob.worker.runtime.task) imports it."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from celery.signals import worker_process_init, worker_process_shutdown, worker_ready, worker_shutting_down

from embedjob import settings as settings_module
from embedjob.broker import app
from embedjob.worker.runtime import lifecycle, metrics
from embedjob.worker.runtime.announce import workers_registry
from embedjob.worker.runtime.consumer import ConsumerBeat

log = logging.getLogger("embedjob.worker")

app.steps["consumer"].add(ConsumerBeat)
# Survives a broker connection loss with shards in flight (a Celery 5.7 + kombu cleanup error stopped
# the worker on Redis restarts; see embedjob.worker.runtime.consumer).
app.conf.worker_consumer = "embedjob.worker.runtime.consumer:Consumer"


@worker_ready.connect
def _serve_metrics(sender: Any = None, **_: Any) -> None:
    """The worker's ``/metrics`` (all its processes), from the main process once the pool is up; the
    model preload of the threads pool (``embedjob worker`` serves the probes from its start)."""
    s = settings_module.load()
    if s.metrics_port:
        metrics.serve(s.metrics_port, s.metrics_addr)
    if not lifecycle.pool_processes():  # threads pool: this process runs the shards
        _preload_then_ready()


@worker_process_shutdown.connect
def _child_exited(pid: int | None = None, **_: Any) -> None:
    metrics.child_exited(pid or os.getpid())
    lifecycle.process_exited(pid or os.getpid())


@worker_shutting_down.connect
def _shutting_down(**_: Any) -> None:
    """SIGTERM (Celery's warm shutdown): no new shard starts; a shard still running
    ``EMBEDJOB_SHUTDOWN_DEADLINE`` seconds later is given back (pool children read it from the
    health folder). Size the deadline below the pod's terminationGracePeriodSeconds."""
    lifecycle.begin_shutdown(settings_module.load().shutdown_deadline)
    workers_registry.leave()


@worker_process_init.connect
def _pool_process_started(**_: Any) -> None:
    """A prefork pool child (one per GPU): pin it to its own GPU before anything initialises CUDA,
    then load the model (ready once loaded)."""
    from billiard.process import current_process

    lifecycle.pin_gpu(int(getattr(current_process(), "index", 0) or 0))
    _preload_then_ready()


def _preload_then_ready() -> None:
    """Load ``EMBEDJOB_PRELOAD_MODEL`` in the background (Celery must not wait for it), then mark this
    process ready. Tasks that arrive meanwhile wait for the same load (the model cache is locked)."""
    name = settings_module.load().preload_model

    def load() -> None:
        if name:
            from embedjob.worker.model.load import load_embedder

            t0 = time.perf_counter()
            try:
                load_embedder(name)
            except Exception as e:  # noqa: BLE001 - not ready; the probe says why
                log.error("preloading the model %s failed: %s", name, e)
                return
            metrics.MODEL_LOAD_SECONDS.observe(time.perf_counter() - t0)
            log.info("model %s loaded in %.1fs", name, time.perf_counter() - t0)
        lifecycle.mark_ready(name)

    threading.Thread(target=load, daemon=True, name="preload-model").start()


__all__ = ["app"]
