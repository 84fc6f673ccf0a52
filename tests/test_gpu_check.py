"""scripts/gpu-check.sh, dry run on the CPU: every step but the CUDA-only calls runs here, so the
script a GPU machine gets has already worked end to end."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_writes_every_result(tmp_path):
    out = tmp_path / "gpu-check"
    env = {**os.environ, "GPU_CHECK_DRY_RUN": "1", "PYTHON": os.environ.get("PYTHON", str(ROOT / ".venv/bin/python"))}
    if not Path(env["PYTHON"]).exists():
        import sys

        env["PYTHON"] = sys.executable
    proc = subprocess.run([str(ROOT / "scripts" / "gpu-check.sh"), str(out)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch" in (out / "env.txt").read_text()
    assert "skipped" in (out / "pytest-cuda.txt").read_text()  # no CUDA here: said so, not failed
    for size in ("500x375", "1mp"):
        report = json.loads((out / f"bench-{size}.json").read_text())
        assert set(report["limits"]) == {"exact", "fast"}
        assert report["measurements"]["e2e_fast"]["images"] == 8
        assert "e2e/limit" in (out / f"bench-{size}.txt").read_text()
    scaling = json.loads((out / "bench-500x375.json").read_text())["decode_scaling"]
    assert [s["workers"] for s in scaling][0] == 1 and all(s["images_per_s"] > 0 for s in scaling)
    summary = (out / "summary.md").read_text()
    assert summary.count("| 500x375 |") == 2 and summary.count("| 1mp |") == 2
    assert "fast vs exact at 1mp (cpu-draft" in summary and "decode scaling" in summary
