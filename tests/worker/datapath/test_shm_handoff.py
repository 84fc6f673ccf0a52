"""The shared-memory hand-off between the decode processes and the engine (real processes, no mocks):
decode processes read their images from the tar by offset and write their crops into batch slots
the main process never copies per image. Crops must be today's crops, rows in tar order, a dead
decoder must fail the shard cleanly, and a killed worker must leave no shared memory behind."""

from __future__ import annotations

import gzip
import io
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from embedjob.contract import EmbedOptions
from embedjob.storage import Storage
from embedjob.worker.datapath.batch import PreparedStream
from embedjob.worker.datapath.crop import Crop, prepare_image
from embedjob.worker.datapath.decode_pool import DecodePool, DecodePoolBroken, discard_decode_pool, shared_decode_pool
from embedjob.worker.datapath.read import iter_tar
from embedjob.worker.datapath.shard import embed_shard
from embedjob.worker.model.load import clear_cache, load_embedder
from tests import shards


@pytest.fixture(scope="module")
def embedder(tiny_clip_dir):
    clear_cache()
    return load_embedder({"name": "tiny-clip", "revision": "test", "path": str(tiny_clip_dir)}, precision="fp32")


def _mixed_shard(n_simple: int = 23) -> shards.ShardSpec:
    """Every varied and broken image, then ordinary JPEGs with a bad one every 5th."""
    spec = shards.varied_shard()
    broken = shards.broken_images()
    names = sorted(broken)
    for i in range(n_simple):
        key = f"zz{i:04d}"
        if i % 5 == 3:
            ext, data = broken[names[i % len(names)]]
            spec.failed_keys.append(key)
        else:
            ext, data = "jpg", shards.encode(shards.rgb(300 + 11 * i, 200 + 7 * i, seed=i), "JPEG", quality=85)
            spec.good_keys.append(key)
        spec.members.append((f"{key}.{ext}", data))
    return spec


def _tar_order(spec: shards.ShardSpec) -> list[str]:
    good, bad = set(spec.good_keys), set(spec.failed_keys)
    return [k for k in spec.members_by_key() if k in good or k in bad]


@pytest.mark.parametrize("form", ["tar", "tar.gz"])  # by offset from the file / from the spool (spool.py)
@pytest.mark.parametrize("kind", ["process", "thread"])
def test_batches_hold_todays_crops_in_tar_order(tmp_path, form, kind):
    spec = _mixed_shard()
    path = tmp_path / f"s.{form}"
    path.write_bytes(spec.tar_bytes() if form == "tar" else gzip.compress(spec.tar_bytes()))
    images = spec.members_by_key()
    pool = DecodePool(2, kind)
    seen: list[str] = []
    try:
        options = EmbedOptions(batch_size=5, num_threads=2)
        with PreparedStream(str(path), Storage(), pool, options, slots=2) as stream:
            for batch in stream.batches():
                assert batch.slot is not None or not batch.rows
                assert batch.crops.shape == (len(batch.rows), 224, 224, 3)
                for row, crop in zip(batch.rows, batch.crops, strict=True):
                    want = prepare_image(images[row.key], options.max_image_pixels)
                    assert isinstance(want, Crop), row.key
                    np.testing.assert_array_equal(crop, want.pixels, err_msg=row.key)  # bit for bit
                    assert (row.width, row.height) == (want.width, want.height) == spec.sizes.get(row.key, (
                        want.width, want.height))
                for _, info, reason in batch.failures:
                    want = prepare_image(images[info.key], options.max_image_pixels)
                    assert want.reason == reason, info.key
                order = sorted([(s, r.key) for s, r in zip(batch.seqs, batch.rows, strict=True)]
                               + [(s, i.key) for s, i, _ in batch.failures])
                seen += [k for _, k in order]
                stream.release(batch.slot)
    finally:
        pool.shutdown()
    assert seen == _tar_order(spec)


def test_a_local_tar_is_indexed_not_read(tmp_path):
    """The main process only indexes a local tar: image samples carry offsets, not bytes."""
    spec = shards.simple_shard(5)
    path = spec.write(tmp_path / "s.tar")
    data = path.read_bytes()
    with open(path, "rb") as f:
        samples = list(iter_tar(f, in_place=True))
    assert [s.key for s in samples] == spec.good_keys
    for s in samples:
        assert s.image == b"" and data[s.offset:s.offset + s.size] == spec.members_by_key()[s.key]


def _reference_rows(embedder, spec: shards.ShardSpec) -> np.ndarray:
    images = spec.members_by_key()
    crops = np.stack([prepare_image(images[k], 10**8).pixels for k in spec.good_keys])
    return embedder.embed_uint8(crops)


def test_embed_shard_rows_are_in_tar_order_with_bad_images_interleaved(embedder, tmp_path):
    spec = _mixed_shard()
    tar = spec.write(tmp_path / "s.tar")
    discard_decode_pool()
    result = embed_shard(str(tar), str(tmp_path / "out"), embedder, EmbedOptions(batch_size=4, num_threads=2))
    assert (result.images, result.failed) == (len(spec.good_keys), len(spec.failed_keys))
    emb = np.load(tmp_path / "out" / "img_emb" / "s.npy")
    keys = pq.read_table(tmp_path / "out" / "metadata" / "s.parquet").column("key").to_pylist()
    assert keys == spec.good_keys
    np.testing.assert_allclose(emb.astype(np.float32), _reference_rows(embedder, spec), atol=2e-3)


def test_a_decode_process_killed_mid_shard_fails_the_shard_and_the_retry_is_aligned(embedder, tmp_path):
    spec = shards.simple_shard(300, size=(640, 480))
    tar = spec.write(tmp_path / "s.tar")
    options = EmbedOptions(batch_size=4, num_threads=2)
    discard_decode_pool()
    pool = shared_decode_pool(2)
    pool.warm_up()
    victim = pool._procs[1].proc
    started = threading.Event()

    def kill_when_started() -> None:
        started.wait(60)
        victim.send_signal(signal.SIGKILL)

    threading.Thread(target=kill_when_started, daemon=True).start()
    with pytest.raises(DecodePoolBroken, match="exited with code -9"):
        embed_shard(str(tar), str(tmp_path / "out"), embedder, options, on_progress=lambda n: started.set())
    assert started.is_set()
    assert not (tmp_path / "out" / "_manifests" / "s.json").exists()
    # The retry, on a fresh pool, gives every row its own image's embedding.
    assert shared_decode_pool(2) is not pool
    assert embed_shard(str(tar), str(tmp_path / "out"), embedder, options).images == 300
    keys = pq.read_table(tmp_path / "out" / "metadata" / "s.parquet").column("key").to_pylist()
    assert keys == spec.good_keys
    emb = np.load(tmp_path / "out" / "img_emb" / "s.npy").astype(np.float32)
    sample = [0, 1, 57, 150, 299]
    sub = shards.ShardSpec(members=[(f"{spec.good_keys[i]}.jpg", spec.members_by_key()[spec.good_keys[i]])
                                    for i in sample], good_keys=[spec.good_keys[i] for i in sample])
    np.testing.assert_allclose(emb[sample], _reference_rows(embedder, sub), atol=2e-3)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _maps_slots(pid: int) -> bool:
    try:
        return "memfd:embedjob-batch-slots" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def _in_shm(pids: list[int]) -> set[str]:
    """What these processes have open or mapped under /dev/shm."""
    found = set()
    for pid in pids:
        paths = []
        try:
            paths += Path(f"/proc/{pid}/maps").read_text().split()
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                paths.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:  # closed meanwhile
                pass
        found |= {p for p in paths if p.startswith("/dev/shm/")}
    return found


def _shm() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def _open_under(pids: list[int], folder: Path) -> set[str]:
    """What these processes have open under ``folder``."""
    found = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith(str(folder) + "/"):
                found.add(target)
    return found


@pytest.mark.parametrize("form", ["tar", "tar.gz"])  # from the file / through the spool
def test_a_worker_sigkilled_mid_shard_leaves_no_shared_memory(tmp_path, tiny_clip_dir, form):
    tar = shards.simple_shard(400, size=(640, 480)).write(tmp_path / "s.tar")
    if form == "tar.gz":
        tar = tmp_path / "s.tar.gz"
        tar.write_bytes(gzip.compress((tmp_path / "s.tar").read_bytes(), compresslevel=1))
    spool_dir = tmp_path / "tmp"  # the worker's TMPDIR: where a spool lives, without a name
    spool_dir.mkdir()
    script = textwrap.dedent(f"""
        import sys
        from embedjob.contract import EmbedOptions
        from embedjob.worker.datapath.shard import embed_shard
        from embedjob.worker.model.load import load_embedder
        model = load_embedder({str(tiny_clip_dir)!r}, device="cpu", precision="fp32")
        def progress(n):
            print("progress", n, flush=True)
        embed_shard({str(tar)!r}, {str(tmp_path / "out")!r}, model, EmbedOptions(batch_size=4, num_threads=2),
                    on_progress=progress)
        print("finished", flush=True)
    """)
    before = _shm()
    worker = subprocess.Popen([sys.executable, "-P", "-c", script], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "TMPDIR": str(spool_dir)})
    try:
        line = worker.stdout.readline()
        assert line.startswith("progress"), line
        decoders = _children(worker.pid)
        assert len(decoders) == 2, decoders
        # They write into the batch slots: an anonymous (memfd) mapping, nothing named in /dev/shm.
        deadline = time.monotonic() + 30
        while not all(_maps_slots(pid) for pid in decoders) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(_maps_slots(pid) for pid in decoders), [_maps_slots(pid) for pid in decoders]
        assert worker.poll() is None, "the shard finished before the kill: make it longer"
        assert _in_shm([worker.pid, *decoders]) == set()  # nothing named, even while it runs
        if form == "tar.gz":  # the spool is open in the worker and its decoders, and has no name
            spooled = _open_under([worker.pid, *decoders], spool_dir)
            assert spooled and all(p.endswith(" (deleted)") for p in spooled), spooled
        assert os.listdir(spool_dir) == []
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in decoders) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in decoders)
    # Other processes on this machine (test sessions beside this one) may add their own
    # multiprocessing semaphores meanwhile; nothing else may appear.
    assert {n for n in _shm() - before if not n.startswith("sem.mp-")} == set()
    assert os.listdir(spool_dir) == []


def test_slots_are_bounded_and_reused(tmp_path):
    """However long the shard, the stream holds its few slots: memory stays bounded."""
    spec = shards.simple_shard(60, size=(96, 64))
    path = spec.write(tmp_path / "s.tar")
    pool = DecodePool(2)
    try:
        with PreparedStream(str(path), Storage(), pool, EmbedOptions(batch_size=4), slots=2) as stream:
            used = set()
            n = 0
            for batch in stream.batches():
                used.add(batch.slot)
                n += len(batch.rows)
                stream.release(batch.slot)
            assert stream.slots.array.nbytes == 2 * 4 * 224 * 224 * 3
    finally:
        pool.shutdown()
    assert n == 60 and used == {0, 1}


def test_the_decode_protocol_has_no_pickles():
    """Frames are a JSON header and raw bytes, both ways."""
    from embedjob.worker.datapath import crop, decode_pool, decode_worker

    buf = io.BytesIO()
    decode_worker.write_frame(buf, {"op": "chunk", "items": [[0, 3]]}, b"abc")
    buf.seek(0)
    assert decode_worker.read_frame(buf) == ({"op": "chunk", "items": [[0, 3]]}, b"abc")
    for module in (crop, decode_pool, decode_worker):
        assert "import pickle" not in Path(module.__file__).read_text()


def test_a_shard_rewritten_at_the_same_path_is_read_afresh(tmp_path):
    """The decode processes keep their tar files open across chunks: a new file at the same path
    (a re-downloaded shard, a retry) must be read as the new file, never through a stale handle."""
    path = tmp_path / "s.tar"
    pool = DecodePool(1)
    try:
        for seed, replace in ((1, False), (2, True), (3, False)):
            spec = shards.simple_shard(6, seed=seed)
            if replace:  # a new inode
                spec.write(tmp_path / "new.tar").replace(path)
            else:  # the same inode, rewritten
                spec.write(path)
            images = spec.members_by_key()
            with PreparedStream(str(path), Storage(), pool, EmbedOptions(batch_size=4)) as stream:
                for batch in stream.batches():
                    for row, crop in zip(batch.rows, batch.crops, strict=True):
                        np.testing.assert_array_equal(crop, prepare_image(images[row.key], 10**8).pixels)
                    stream.release(batch.slot)
    finally:
        pool.shutdown()
