"""scripts/gpu-check.sh, dry run on the CPU: every step but the CUDA-only calls runs here, so the
script a GPU machine gets has already worked end to end; and a failing step neither stops the steps
after it nor passes unnoticed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["environment", "CUDA tests", "bench 500x375, 1 x 8, exact + fast", "e2e 500x375, 1 x 8, 2 processes per GPU",
         "e2e 500x375 under torch.profiler, 2 x 8", "model limit, compile none", "bench 1mp, 1 x 8, exact + fast",
         "summary"]


def _python() -> str:
    python = os.environ.get("PYTHON", str(ROOT / ".venv/bin/python"))
    return python if Path(python).exists() else sys.executable


def _gpu_check(out: Path, python: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "GPU_CHECK_DRY_RUN": "1", "PYTHON": python}
    return subprocess.run([str(ROOT / "scripts" / "gpu-check.sh"), str(out)], capture_output=True, text=True,
                          env=env, timeout=600)


def test_gpu_check_dry_run_writes_every_result(tmp_path):
    out = tmp_path / "gpu-check"
    proc = _gpu_check(out, _python())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch" in (out / "env.txt").read_text()
    assert "skipped" in (out / "pytest-cuda.txt").read_text()  # no CUDA here: said so, not failed
    for size in ("500x375", "1mp"):
        report = json.loads((out / f"bench-{size}.json").read_text())
        assert set(report["limits"]) == {"exact", "fast"}
        e2e = report["measurements"]["e2e_fast"]
        assert e2e["images"] == 8 and e2e["processes"] == 1
        assert e2e["startup_seconds"] > 0 and e2e["main_cpu_ms_per_image"] > 0
        assert "e2e/limit" in (out / f"bench-{size}.txt").read_text()
    procs = json.loads((out / "bench-500x375-p2.json").read_text())
    assert set(procs["measurements"]) == {"e2e_exact", "e2e_fast"}
    assert procs["measurements"]["e2e_fast"]["processes"] == 2 and procs["measurements"]["e2e_fast"]["images"] == 8
    for mode in ("exact", "fast"):  # where the e2e's time went, operator by operator
        assert "by self CPU time" in (out / "profile" / f"profile-{mode}.txt").read_text()
    model = json.loads((out / "model-none.json").read_text())
    assert set(model["measurements"]) == {"model_limit"} and model["measurements"]["model_limit"]["images"] > 0
    steps = json.loads((out / "steps.json").read_text())
    assert [s["step"] for s in steps] == STEPS and {s["status"] for s in steps} == {"ok"}
    summary = (out / "summary.md").read_text()
    assert summary.count("| 500x375 |") == 2 and summary.count("| 1mp |") == 2
    assert "fast vs exact at 1mp (cpu-draft" in summary
    assert "| none |" in summary  # the compile table
    assert "e2e fast at 500x375 with 2 processes per GPU" in summary
    assert "e2e exact under torch.profiler (16 images" in summary
    assert "| model limit, compile none | ok |" in summary and "| summary | ok |" in proc.stdout


def test_gpu_check_runs_every_step_past_a_failure_and_exits_non_zero(tmp_path):
    out = tmp_path / "gpu-check"
    proc = _gpu_check(out, "/bin/false")  # every Python step fails at once
    assert proc.returncode == 1
    for step in STEPS:
        assert f"| {step} | FAILED (exit 1) |" in proc.stdout, step
    assert "did not pass" in proc.stderr


def test_gpu_check_graphs_step_dry_run(tmp_path):
    """The step a GPU session adds to see whether the e2e cap is the forward thread's Python (on the CPU
    with compile none: the script's path, not CUDA graphs)."""
    out = tmp_path / "gpu-check"
    env = {**os.environ, "GPU_CHECK_DRY_RUN": "1", "PYTHON": _python(), "GPU_CHECK_STEPS": "graphs"}
    proc = subprocess.run([str(ROOT / "scripts" / "gpu-check.sh"), str(out)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "bench-500x375-graphs.json").read_text())
    assert set(report["measurements"]) == {"e2e_exact"} and report["measurements"]["e2e_exact"]["images"] == 8
    steps = json.loads((out / "steps.json").read_text())
    assert [s["step"] for s in steps] == ["environment", "e2e 500x375 exact, 1 x 8, compile none", "summary"]
    assert {s["status"] for s in steps} == {"ok"}
    assert "e2e exact at 500x375 with compile none (the forward as one launch per batch)" in (
        out / "summary.md").read_text()
