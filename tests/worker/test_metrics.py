"""The worker's metrics (embedjob.worker.runtime.metrics): reason classes, OOM back-offs, and
prometheus_client's multiprocess mode summing a forked pool the way ``embedjob worker`` sets it up."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_failure_reasons_fall_into_classes():
    from embedjob.worker.runtime.metrics import reason_class

    assert reason_class("not a supported image (unrecognised data)") == "decode"
    assert reason_class("corrupt image header: SyntaxError: x") == "decode"
    assert reason_class("cannot decode JPEG: OSError: image file is truncated") == "decode"
    assert reason_class("too many pixels: 10x10 = 100 > limit 50") == "too_large"
    assert reason_class("decompression bomb: ...") == "too_large"
    assert reason_class("member too large (9 > 8 bytes)") == "too_large"
    assert reason_class("empty file (0 bytes)") == "empty"
    assert reason_class("preprocess: ValueError: x") == "preprocess"
    assert reason_class("something new") == "other"


def test_oom_backoffs():  # the batch size in use after a back-off: test_embedder, resolve_batch_size
    from embedjob.worker.runtime import metrics

    start = metrics.OOM_BACKOFFS._value.get()
    metrics.record_backoff(None, None)
    metrics.record_backoff(8, 8)
    assert metrics.OOM_BACKOFFS._value.get() == start
    metrics.record_backoff(None, 16)
    metrics.record_backoff(16, 8)
    assert metrics.OOM_BACKOFFS._value.get() == start + 2


def test_multiprocess_mode_sums_forked_children_and_drops_dead_gauges(tmp_path):
    """What ``embedjob worker`` does: prepare the folder before prometheus_client is imported, children
    count, the main process serves the sum; a dead child's live gauge goes, its counters stay."""
    (tmp_path / "stale.db").write_bytes(b"left over from a previous run")
    code = textwrap.dedent(f"""
        import os
        from embedjob.worker.runtime import multiproc
        multiproc.prepare({str(tmp_path)!r})
        assert not os.path.exists({str(tmp_path / "stale.db")!r})
        from embedjob.worker.runtime import metrics
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector
        pids = []
        for i in range(3):
            pid = os.fork()
            if pid == 0:
                metrics.record_success(10, ["empty file (0 bytes)", "preprocess: x"], 2.0,
                                       {{"read": 1.0, "inference": 0.5, "total": 2.0}}, 16)
                metrics.SHARDS_RUNNING.inc()
                os._exit(0)
            os.waitpid(pid, 0)
            pids.append(pid)
        metrics.child_exited(pids[0])
        reg = CollectorRegistry()
        MultiProcessCollector(reg)
        print(generate_latest(reg).decode())
    """)
    r = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    lines = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in out.splitlines()
             if line and not line.startswith("#")}
    assert lines["embedjob_worker_images_embedded_total"] == 30
    assert lines["embedjob_worker_model_busy_ratio"] == 0.25  # 0.5 s of inference in a 2 s shard
    assert lines['embedjob_worker_images_failed_total{reason="empty"}'] == 3
    assert lines['embedjob_worker_images_failed_total{reason="preprocess"}'] == 3
    assert lines['embedjob_worker_stage_seconds_total{stage="read"}'] == 3
    assert 'embedjob_worker_stage_seconds_total{stage="total"}' not in lines
    assert lines['embedjob_worker_shards_total{outcome="succeeded"}'] == 3
    assert lines["embedjob_worker_shard_duration_seconds_count"] == 3
    assert lines["embedjob_worker_batch_size"] == 16
    assert lines["embedjob_worker_shards_running"] == 2  # the first child was marked dead
    assert not [k for k in lines if k.startswith("embedjob_worker_cuda")]  # no CUDA here
