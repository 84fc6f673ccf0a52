"""What `embedjob report` and `embedjob filter` cost on a large output: peak memory and time for a
synthetic output of ``--shards`` x ``--rows`` rows with the aesthetic and nsfw score columns (their
input shards are absent, so no thumbnail is read: this measures the scores' side). The filter keeps
every row (``nsfw >= 0``): its worst case.

Each command runs in a fresh process; the peak RSS over the process's baseline (Python, numpy, pyarrow
imported) is what its data cost.

    .venv/bin/python scripts/report_scale.py [--shards 100] [--rows 10000,100000]

It measures the installed embedjob; to measure another checkout (a baseline in a git worktree), run it
there with ``PYTHONPATH=$PWD``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(out: Path, shards: int, rows: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    (out / "metadata").mkdir(parents=True)
    (out / "_manifests").mkdir()
    rng = np.random.default_rng(0)
    keys = pa.array([f"{i:09d}" for i in range(rows)])
    for s in range(shards):
        stem = f"{s:05d}"
        table = pa.table({"key": keys, "shard": pa.array([f"/absent/{stem}.tar"] * rows),
                          "member": keys, "aesthetic": rng.normal(5.0, 1.0, rows).astype(np.float32),
                          "nsfw": rng.random(rows, dtype=np.float32)})
        pq.write_table(table, out / "metadata" / f"{stem}.parquet")
        (out / "_manifests" / f"{stem}.json").write_text(json.dumps({"counts": {"embedded": rows, "failed": 0}}))


def measure(out: str, command: str) -> None:
    """In a child process: the command's peak RSS over the imports, and its time."""
    import numpy  # noqa: F401
    import pyarrow.parquet  # noqa: F401

    from embedjob.cli.main import main as cli
    from embedjob.storage import Storage  # noqa: F401

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        args = (["report", out, "--html", f"{tmp}/r.html"] if command == "report"
                else ["filter", out, "--where", "nsfw >= 0", "--keys", f"{tmp}/k.parquet"])
        if cli(args) not in (0, None):
            raise SystemExit(f"embedjob {command} failed")
    took = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": took, "peak_mib": (peak - base) / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=100)
    parser.add_argument("--rows", default="10000,100000", help="rows per shard, comma-separated")
    parser.add_argument("--commands", default="report,filter")
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(*args.measure)
        return
    print(f"{'command':>8} {'rows':>12} {'seconds':>9} {'peak MiB':>9} {'bytes/row':>10}")
    for rows in (int(x) for x in args.rows.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out"
            build(out, args.shards, rows)
            for command in args.commands.split(","):
                r = subprocess.run([sys.executable, __file__, "--measure", str(out), command], capture_output=True,
                                   text=True, cwd=ROOT, check=True)
                m = json.loads(r.stdout.strip().splitlines()[-1])
                total = args.shards * rows
                print(f"{command:>8} {total:>12,} {m['seconds']:>9.2f} {m['peak_mib']:>9.0f} "
                      f"{m['peak_mib'] * 2**20 / total:>10.1f}")


if __name__ == "__main__":
    main()
