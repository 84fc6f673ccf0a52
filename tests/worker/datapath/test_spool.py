"""The spool (embedjob.worker.datapath.spool): a stream's tar (an S3 object, a compressed tar) made
into a file the decode processes read the images from by offset, so that the main process never
handles an image's bytes. What a user would check: the same samples and bytes as the tar, junk never
stored, the disk it takes bounded by the read-ahead, no file left anywhere, and damage recorded as
before."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import tarfile

import numpy as np
import pytest

from embedjob.contract import EmbedOptions
from embedjob.storage import Storage, s3_client
from embedjob.worker.datapath.batch import PreparedStream
from embedjob.worker.datapath.decode_pool import DecodePool
from embedjob.worker.datapath.read import SourceReadError, TarStats, iter_tar
from embedjob.worker.datapath.spool import Spool
from tests import shards

COMPRESS = {"tar": lambda b: b, "tar.gz": gzip.compress, "tar.bz2": bz2.compress, "tar.xz": lzma.compress}


def _tar(n: int, junk: int = 0, image_bytes: int = 3000) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(n):
            for ext, data in (("jpg", os.urandom(image_bytes + i)), ("txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            if junk and i == n // 2:  # a member nobody keeps, in the middle
                info = tarfile.TarInfo(f"{i:05d}.bin")
                info.size = junk
                tar.addfile(info, io.BytesIO(bytes(junk)))
    return buf.getvalue()


def _held(spool: Spool) -> int:
    """Bytes the spool's file takes on disk now."""
    return os.fstat(spool.fd).st_blocks * 512


@pytest.mark.parametrize("form", sorted(COMPRESS))
@pytest.mark.parametrize("step", [512, 4096 + 17, 1 << 20])
def test_the_spool_gives_every_sample_and_its_bytes_as_the_tar_holds_them(form, step, tmp_path):
    raw = _tar(40)
    reference = list(iter_tar(io.BytesIO(raw)))
    stats = TarStats()
    with Spool(io.BytesIO(COMPRESS[form](raw)), stats, directory=str(tmp_path), step=step) as spool:
        samples = list(iter_tar(spool, stats, in_place=True))
        assert os.listdir(tmp_path) == []  # no name, ever: a SIGKILLed worker leaves nothing
        assert [(s.key, s.member, s.caption, s.index) for s in samples] == [
            (r.key, r.member, r.caption, r.index) for r in reference]
        for s, r in zip(samples, reference, strict=True):
            assert s.image == b"" and s.offset >= 0  # left in the spool, for the decoders
            assert os.pread(spool.fd, s.size, s.offset) == r.image
    assert stats.error is None and stats.bytes_read == len(COMPRESS[form](raw))


@pytest.mark.parametrize("form", ["tar", "tar.gz"])
def test_a_member_nobody_keeps_is_pulled_and_dropped_never_stored(form, tmp_path):
    """64 MiB of junk in the middle of the tar (a few KB gzipped): the spool stores what the parser
    and the decoders need, a step beyond at most."""
    raw = _tar(20, junk=64 << 20)
    stats = TarStats()
    with Spool(io.BytesIO(COMPRESS[form](raw)), stats, directory=str(tmp_path), step=1 << 16) as spool:
        samples = list(iter_tar(spool, stats, in_place=True))
        assert len(samples) == 20 and stats.error is None
        assert spool.pulled >= 64 << 20
        assert spool.stored < 1 << 20 and _held(spool) < 1 << 20, (spool.stored, _held(spool))


def test_released_bytes_leave_the_disk_and_cannot_be_read_again(tmp_path):
    raw = _tar(200, image_bytes=20_000)
    stats = TarStats()
    with Spool(io.BytesIO(raw), stats, directory=str(tmp_path)) as spool:
        samples = list(iter_tar(spool, stats, in_place=True))
        before = _held(spool)
        assert before >= 200 * 20_000
        spool.release_below(samples[150].offset)
        assert spool.punch_works, "this file system cannot punch holes: the spool would hold whole shards"
        assert _held(spool) < before - 140 * 20_000
        assert os.pread(spool.fd, samples[199].size, samples[199].offset) == list(
            iter_tar(io.BytesIO(raw)))[199].image  # what is not released is intact
        spool.seek(0)
        with pytest.raises(OSError, match="released"):
            spool.read(512)


@pytest.mark.parametrize("form", ["tar", "tar.gz"])
def test_a_truncated_stream_keeps_the_samples_before_the_damage_and_records_it(form, tmp_path):
    raw = COMPRESS[form](_tar(30))
    cut = raw[: len(raw) // 2]
    stats, ref_stats = TarStats(), TarStats()
    reference = list(iter_tar(io.BytesIO(cut), ref_stats))
    with Spool(io.BytesIO(cut), stats, directory=str(tmp_path)) as spool:
        samples = list(iter_tar(spool, stats, in_place=True))
        for s in samples:  # every sample given out has all its bytes
            assert len(os.pread(spool.fd, s.size, s.offset)) == s.size
    assert 5 < len(samples) < 30 and [s.key for s in samples] == [r.key for r in reference]
    assert stats.error and stats.error.startswith(f"tar truncated or corrupt after {samples[-1].key}.")


def test_a_failing_source_is_a_retryable_source_error_not_damage(tmp_path):
    class Broken(io.RawIOBase):
        def __init__(self, data: bytes) -> None:
            self.data, self.pos = data, 0

        def readable(self) -> bool:
            return True

        def read(self, n: int = -1) -> bytes:
            if self.pos > 100_000:
                raise ConnectionResetError("connection reset by peer")
            out = self.data[self.pos:self.pos + min(n, 8192)]
            self.pos += len(out)
            return out

    stats = TarStats()
    with Spool(Broken(_tar(100)), stats, directory=str(tmp_path)) as spool, \
            pytest.raises(SourceReadError, match="connection reset"):
        list(iter_tar(spool, stats, in_place=True))
    assert stats.error is None


class _CountingPool(DecodePool):
    """The real process pool, counting the bytes the main process writes down the pipes."""

    payload_bytes = 0

    def submit_chunk(self, header, payload=b""):  # noqa: ANN001, ANN201
        self.payload_bytes += len(payload)
        return super().submit_chunk(header, payload)


@pytest.mark.parametrize("where", ["s3", "tar.gz"])
def test_a_streamed_shards_images_reach_the_decoders_through_the_spool_with_bounded_disk(
        where, tmp_path, request):
    """A shard on S3 (real SeaweedFS) or gzipped on disk: the crops equal those of the same local tar,
    the main process writes no image byte down a pipe, and the spool never holds much more than the
    batches in flight (1,500 images of ~25 KB = 37 MB; batches of 16 in 2 slots)."""
    spec = shards.simple_shard(1500, seed=3)
    data = spec.tar_bytes()
    local = tmp_path / "s.tar"
    local.write_bytes(data)
    if where == "s3":
        bucket = request.getfixturevalue("bucket")
        s3_client().put_object(Bucket=bucket, Key="in/s.tar", Body=data)
        uri = f"s3://{bucket}/in/s.tar"
    else:
        uri = str(tmp_path / "s.tar.gz")
        (tmp_path / "s.tar.gz").write_bytes(gzip.compress(data))
    options = EmbedOptions(batch_size=16, num_threads=2)
    pool = _CountingPool(2)
    peaks: list[int] = []
    try:
        with PreparedStream(str(local), Storage(), pool, options, slots=2) as stream:
            want = [(b.rows, b.crops.copy(), stream.release(b.slot))[:2] for b in stream.batches()]
        with PreparedStream(uri, Storage(), pool, options, slots=2) as stream:
            got = []
            for b in stream.batches():
                assert stream.spool is not None
                peaks.append(_held(stream.spool))
                got.append((b.rows, b.crops.copy()))
                stream.release(b.slot)
            total = stream.spool.pulled
    finally:
        pool.shutdown()
    assert pool.payload_bytes == 0
    assert [r.key for rows, _ in got for r in rows] == spec.good_keys
    for (want_rows, want_crops), (rows, crops) in zip(want, got, strict=True):
        assert [(r.key, r.width, r.height, r.caption) for r in rows] == [
            (r.key, r.width, r.height, r.caption) for r in want_rows]
        np.testing.assert_array_equal(crops, want_crops)
    image_bytes = max(len(v) for v in spec.members_by_key().values())
    bound = 6 * 16 * (image_bytes + 2048) + 3 * (1 << 20)  # a few batches of images + the read-ahead steps
    assert total > 4 * bound, "the shard must be much larger than the bound for this test to mean anything"
    assert max(peaks) <= bound, (max(peaks), bound, total)


def test_s3_and_local_outputs_are_the_same(tmp_path, request):
    """Guard against a spool that reorders: the same shard embedded from S3 and from disk gives the
    same .npy rows and parquet keys."""
    import pyarrow.parquet as pq

    from embedjob.worker.datapath.shard import embed_shard
    from embedjob.worker.model.load import load_embedder
    from embedjob.worker.model.random_weights import save_random_clip

    bucket = request.getfixturevalue("bucket")
    spec = shards.simple_shard(70, seed=5)
    data = spec.tar_bytes()
    (tmp_path / "s.tar").write_bytes(data)
    s3_client().put_object(Bucket=bucket, Key="in/s.tar", Body=data)
    model = load_embedder(str(save_random_clip(tmp_path / "m")), device="cpu")
    options = EmbedOptions(batch_size=8, num_threads=2)
    storage = Storage()
    embed_shard(str(tmp_path / "s.tar"), str(tmp_path / "out"), model, options, stem="x", storage=storage)
    embed_shard(f"s3://{bucket}/in/s.tar", str(tmp_path / "out3"), model, options, stem="x", storage=storage)
    a, b = np.load(tmp_path / "out/img_emb/x.npy"), np.load(tmp_path / "out3/img_emb/x.npy")
    assert a.shape == (70, model.dim)
    np.testing.assert_array_equal(a, b)
    keys = [pq.read_table(tmp_path / d / "metadata/x.parquet").column("key").to_pylist() for d in ("out", "out3")]
    assert keys[0] == keys[1] == spec.good_keys


@pytest.mark.parametrize("step", [512, 1 << 20])
def test_headers_tarfile_parses_itself_after_skipped_bytes(step, tmp_path):
    """A GNU long name and a pax header (tarfile's own parsing, which first reads the byte before the
    header) right after a member whose bytes were skipped, and after a kept image."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in (("a.jpg", b"A" * 5000), ("a.bin", b"j" * 70_000), ("d/" + "x" * 300 + ".jpg", b"L" * 777),
                           ("b.jpg", b"B" * 1000)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    pax = io.BytesIO()
    with tarfile.open(fileobj=pax, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("c.jpg", b"C" * 3000), ("c.bin", b"j" * 9000)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("e.jpg")
        info.size, info.pax_headers = 10, {"comment": "a pax record"}
        tar.addfile(info, io.BytesIO(b"E" * 10))
    for data in (raw, pax.getvalue()):
        reference = list(iter_tar(io.BytesIO(data)))
        stats = TarStats()
        with Spool(io.BytesIO(data), stats, directory=str(tmp_path), step=step) as spool:
            samples = list(iter_tar(spool, stats, in_place=True))
            assert stats.error is None
            assert [(s.key, s.member) for s in samples] == [(r.key, r.member) for r in reference]
            assert [os.pread(spool.fd, s.size, s.offset) for s in samples] == [r.image for r in reference]
