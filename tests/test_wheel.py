"""The installed product, away from the source checkout: a wheel built from the repository, installed
with its `worker` extra into a fresh venv in a temp folder, runs `embedjob --help` and `embedjob demo`
there. Everything the commands need (the sample shards, the CRD) must come from the wheel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from embedjob.bundled import CRD_FILENAME

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def clean_copy(dest: Path) -> Path:
    """The files git knows (tracked, or new and not ignored): no stale build/ or .venv leaks into the wheel."""
    if (REPO / ".git").exists():
        listing = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                                 capture_output=True).stdout.decode()
        for rel in filter(None, listing.split("\0")):
            if (REPO / rel).is_file():
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / rel, dest / rel)
    else:
        shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(".venv", "build", "dist", "out", ".dev",
                                                                  "__pycache__", "*.egg-info"), dirs_exist_ok=True)
    return dest


def test_wheel_in_a_fresh_venv_runs_help_and_the_demo(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", EMBEDJOB_MODEL_DIR=str(tmp_path / "models"), OMP_NUM_THREADS="1")

    src = clean_copy(tmp_path / "src")
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"), str(src)],
        tmp_path, env)
    wheel = next((tmp_path / "dist").glob("embedjob-*.whl"))

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], tmp_path, env)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    run([*pip, "torch==2.13.0"], tmp_path, env)  # the CPU build, from a file on these machines
    run([*pip, f"{wheel}[worker]"], tmp_path, env)

    work = tmp_path / "work"
    work.mkdir()
    where = run([str(venv / "bin" / "python"), "-c",
                 "import json, embedjob, embedjob.operator.cli, embedjob.worker.datapath.shard, embedjob.bundled as b; "
                 "print(json.dumps([embedjob.__file__, embedjob.operator.cli.__file__, "
                 "embedjob.worker.datapath.shard.__file__, str(b.crd_manifest())]))"], work, env)
    for path in json.loads(where.stdout):
        assert Path(path).resolve().is_relative_to(venv.resolve()), path
    installed_crd = Path(json.loads(where.stdout)[3])
    assert installed_crd.read_bytes() == (REPO / "crds" / CRD_FILENAME).read_bytes()

    embedjob = str(venv / "bin" / "embedjob")
    helped = run([embedjob, "--help"], work, env)
    for command in ("run", "demo", "validate", "worker", "operator", "dev"):
        assert command in helped.stdout

    demo = run([embedjob, "demo", "--no-progress", "--workers", "1"], work, env)
    assert "RANDOM-WEIGHT" in demo.stdout  # offline here: said plainly
    out = work / "out" / "demo"
    stems = sorted(p.stem for p in (out / "img_emb").glob("*.npy"))
    assert stems == ["00000", "00001", "00002"]
    for stem in stems:
        emb = np.load(out / "img_emb" / f"{stem}.npy")
        meta = pq.read_table(out / "metadata" / f"{stem}.parquet")
        manifest = json.loads((out / "_manifests" / f"{stem}.json").read_text())
        assert emb.shape[0] == meta.num_rows > 0
        assert np.allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1, atol=1e-2)
        assert manifest  # written last: the shard is done
    job = json.loads((out / "_job.json").read_text())
    assert job["randomWeights"] is True
