"""The README's quick start, run as written: its lines, in order, in one bash shell, in a fresh copy of
the repository (the files git knows, no .venv, no build/), with a PATH that holds none of the
project's commands. Each line's time is printed (the walkthrough's timings)."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.test_wheel import REPO, clean_copy

pytestmark = pytest.mark.slow


def quick_start_lines(readme: Path = REPO / "README.md") -> list[str]:
    """The commands between the README's quick-start markers, exactly as a user would paste them."""
    text = readme.read_text()
    block = re.search(r"<!-- quick-start -->\s*```bash\n(.*?)```\s*<!-- /quick-start -->", text, re.S)
    assert block, "README.md has no <!-- quick-start --> bash block"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_quick_start_is_at_the_top_and_names_the_path_line():
    text = (REPO / "README.md").read_text()
    assert text.startswith("# embedjob\n")  # the title first, not a code block
    lines = quick_start_lines()
    assert lines[0].startswith("scripts/setup.sh") and lines[1].startswith(". scripts/env.sh")


def clean_path() -> str:
    """PATH without the project's commands (a fresh shell on a fresh clone)."""
    cache_bin = str(Path(os.environ.get("EMBEDJOB_CACHE", Path.home() / ".cache" / "embedjob")) / "bin")
    keep = [p for p in os.environ.get("PATH", "").split(":")
            if p and not p.endswith("/.venv/bin") and p != cache_bin]
    return ":".join(keep)


def test_readme_quick_start_runs_as_written(tmp_path):
    clone = clean_copy(tmp_path / "embedjob")
    lines = quick_start_lines()
    script = ["set -eo pipefail",
              # whatever happens, leave no dev stack running
              "trap '[ -x .venv/bin/embedjob ] && .venv/bin/embedjob dev down >/dev/null 2>&1 || true' EXIT"]
    for i, line in enumerate(lines):
        script += [f"echo \"::step {i} $(date +%s.%N)\" >&2", line]
    script.append("echo \"::end $(date +%s.%N)\" >&2")
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "KUBECONFIG") and not k.startswith(("AWS_", "EMBEDJOB_"))}
    env.update(PATH=clean_path(), OMP_NUM_THREADS="1")
    assert subprocess.run(["bash", "-c", "command -v embedjob"], env=env, capture_output=True).returncode != 0
    t0 = time.monotonic()
    r = subprocess.run(["bash", "-c", "\n".join(script)], cwd=clone, env=env, capture_output=True, text=True,
                       timeout=2400)
    marks = [(int(m.group(1)) if m.group(1) else None, float(m.group(2)))
             for m in re.finditer(r"::(?:step (\d+)|end) ([\d.]+)", r.stderr)]
    for (i, t), (_, t_next) in zip(marks, marks[1:], strict=False):
        print(f"{t_next - t:7.1f} s  {lines[i]}")
    print(f"total {time.monotonic() - t0:.0f} s")
    where = lines[marks[-1][0]] if marks and marks[-1][0] is not None else "?"
    assert r.returncode == 0, f"failed at: {where}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    assert marks[-1][0] is None  # the end mark: every line ran
    # what the lines promise
    assert (clone / "out/demo/_job.json").exists() and (clone / "out/local/_job.json").exists()
    assert re.search(r"^mine\s+Succeeded\s+3/3\s+\d+", r.stdout, re.M), r.stdout
    assert "http://127.0.0.1:" in r.stdout and "/metrics" in r.stdout  # dev up printed the metrics URLs
    assert "stopping seaweedfs" in r.stdout and "stopped" in r.stdout  # dev down said what it waited for
