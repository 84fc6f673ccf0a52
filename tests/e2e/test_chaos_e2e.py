"""scripts/chaos.py with a short budget, as CI runs it: a 100-shard job under random kills and restarts
of workers, the operator, Redis and S3 must end Succeeded with exact outputs and no double commit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


def test_short_chaos_run_passes(tmp_path):
    report = tmp_path / "chaos.json"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "chaos.py"), "--seed", "11", "--shards", "100",
                        "--chaos-seconds", "50", "--budget", "300", "--json", str(report)],
                       capture_output=True, text=True, timeout=420, cwd=REPO)
    verdict = [line for line in r.stdout.splitlines() if line.startswith("chaos: PASS") or
               line.startswith("chaos: FAIL")]
    print(r.stdout[-4000:])
    assert r.returncode == 0 and verdict and verdict[-1].startswith("chaos: PASS seed=11"), r.stdout[-3000:] + \
        r.stderr[-3000:]
    data = json.loads(report.read_text())
    assert data["status"]["phase"] == "Succeeded" and data["status"]["images"]["embedded"] == 100 * 8
    assert data["faults"], "no fault was injected"
    assert data["committedOnce"] + len(data["countedFromManifest"]) == 100
