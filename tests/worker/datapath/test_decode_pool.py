"""The decode pool: worker processes that give the same crops as the reference, in order, survive
nothing they should not (a dead worker fails the shard, not the next one; a dead parent takes its
decoders with it)."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from PIL import Image

from embedjob.contract import EmbedOptions
from embedjob.worker.datapath.crop import Crop, Rejected
from embedjob.worker.datapath.decode_pool import DecodePool, DecodePoolBroken, discard_decode_pool, shared_decode_pool
from embedjob.worker.datapath.preprocess import reference_crop
from embedjob.worker.datapath.shard import embed_shard
from tests import shards


@pytest.fixture()
def pool():
    p = DecodePool(2, "process")
    yield p
    p.shutdown()


def _jpeg(width: int, height: int, seed: int = 0, quality: int = 90) -> bytes:
    return shards.encode(shards.rgb(width, height, seed), "JPEG", quality=quality)


def test_process_pool_gives_the_reference_crops_in_order(pool):
    datas = [_jpeg(300 + 7 * i, 200 + 5 * i, seed=i) for i in range(6)] + [b"", b"garbage"]
    results = pool.submit(datas, 10**8).result(timeout=60)
    assert [type(r) for r in results] == [Crop] * 6 + [Rejected, Rejected]
    for data, r in zip(datas, results, strict=False):
        if isinstance(r, Crop):
            img = Image.open(io.BytesIO(data))
            assert (r.width, r.height, r.path) == (*img.size, "exact")
            np.testing.assert_array_equal(r.pixels, reference_crop(img))  # bit for bit
    assert results[6].reason == "empty file (0 bytes)"
    assert "not a supported image" in results[7].reason


def test_a_dead_decode_worker_fails_the_shard_and_the_next_shard_gets_a_fresh_pool(tmp_path, tiny_clip_dir):
    from embedjob.worker.model.load import load_embedder

    embedder = load_embedder(str(tiny_clip_dir), device="cpu", precision="fp32")
    options = EmbedOptions(batch_size=4, num_threads=2)
    discard_decode_pool()
    pool = shared_decode_pool(2)
    pool.warm_up()
    victim = pool._procs[0].proc
    tar = shards.simple_shard(400, size=(640, 480)).write(tmp_path / "s.tar")

    def kill_soon() -> None:
        time.sleep(0.5)
        victim.send_signal(signal.SIGKILL)

    threading.Thread(target=kill_soon, daemon=True).start()
    with pytest.raises(DecodePoolBroken, match="exited with code -9"):
        embed_shard(str(tar), str(tmp_path / "out"), embedder, options)
    assert not (tmp_path / "out" / "_manifests" / "s.json").exists()
    # The broken pool was dropped: the retry runs on a new one and completes.
    assert shared_decode_pool(2) is not pool
    small = shards.simple_shard(10).write(tmp_path / "small.tar")
    assert embed_shard(str(small), str(tmp_path / "out"), embedder, options).images == 10


def test_decode_workers_exit_when_their_parent_is_killed(tmp_path):
    script = textwrap.dedent("""
        import sys, time
        from embedjob.worker.datapath.decode_pool import DecodePool
        pool = DecodePool(2)
        pool.warm_up()
        print(" ".join(str(p.proc.pid) for p in pool._procs), flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-P", "-c", script], stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in parent.stdout.readline().split()]
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    parent.send_signal(signal.SIGKILL)
    parent.wait(10)
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_cancelled_chunks_are_not_decoded(pool):
    slow = [_jpeg(2000, 1500, seed=1)] * 4
    futures = [pool.submit(slow, 10**8) for _ in range(6)]
    cancelled = [f.cancel() for f in futures]
    assert any(cancelled)  # the queued ones, at least
    for f, c in zip(futures, cancelled, strict=True):
        if not c:
            assert len(f.result(timeout=60)) == 4
    assert len(pool.submit([_jpeg(300, 200)], 10**8).result(timeout=60)) == 1  # the pool still works
