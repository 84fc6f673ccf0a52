"""The measurement scripts the README and the closing notes quote still run (one of them had stopped
importing after a move, unnoticed): each at its smallest size, with what it prints checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: int = 240, env: dict[str, str] | None = None) -> str:
    r = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                       env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_operator_scale_bench_plans_fresh_and_finished_jobs():
    """With AWS credentials in the caller's environment too: weed turned S3 auth on with them and the
    bench's private SeaweedFS never became ready (the clean-clone run failed so, after a test had left
    credentials in the environment)."""
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "from-the-shell", "AWS_SECRET_ACCESS_KEY": "from-the-shell"}
    out = _run("scripts/bench_operator_scale.py", "--sizes", "20,40", "--ticks", "1", "--done", "--scores", env=env)
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [(r["shards"], r["progress"], r["phase"]) for r in rows] == [(20, "20/20", "Succeeded"),
                                                                        (40, "40/40", "Succeeded")]


def test_operator_memory_bench_finishes_its_jobs():
    out = _run("scripts/bench_operator_memory.py", "--sizes", "30,60")
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [(r["shards"], r["phase"]) for r in rows] == [(30, "Succeeded"), (60, "Succeeded")]
    assert all(r["held_mib"] > 0 and r["peak_mib"] >= r["held_mib"] for r in rows)


def test_report_scale_measures_both_commands():
    lines = _run("scripts/report_scale.py", "--shards", "2", "--rows", "50").splitlines()
    assert [line.split()[:2] for line in lines[1:]] == [["report", "100"], ["filter", "100"]]


def test_tokenizer_cost_checks_its_ids_against_open_clip():
    out = _run("scripts/tokenizer_cost.py", "--lengths", "300,2000", "--reference-max", "2000", "--captions", "50")
    assert "per caption, cache warm" in out and out.splitlines()[-1].startswith("2000")
