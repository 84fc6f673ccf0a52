"""The tar reader's caps (embedjob.worker.datapath.read) in-process: GNU long names and pax headers
over EMBEDJOB_MAX_TAR_HEADER_BYTES are skipped unread and recorded; sidecars over
EMBEDJOB_MAX_SIDECAR_BYTES, or past EMBEDJOB_MAX_METADATA_BYTES per shard, make their sample a
recorded skip; the good samples around them stay rows, in order. (A real worker on the full-size
hostile shards: tests/worker/test_hostile_shards.py.)"""

from __future__ import annotations

import io
import tarfile

import pytest

from embedjob import settings
from embedjob.worker.datapath.read import Sample, SkippedMember, TarStats, iter_tar
from embedjob.worker.datapath.spool import Spool


@pytest.fixture()
def caps(monkeypatch):
    monkeypatch.setenv("EMBEDJOB_MAX_TAR_HEADER_BYTES", "4096")
    monkeypatch.setenv("EMBEDJOB_MAX_SIDECAR_BYTES", "1000")
    monkeypatch.setenv("EMBEDJOB_MAX_METADATA_BYTES", "1500")
    settings.reload()
    yield
    monkeypatch.undo()
    settings.reload()


def _tar(members: list[tuple[str, bytes]], fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _read(data: bytes, tmp_path=None, mode: str = "file") -> tuple[list[Sample | SkippedMember], TarStats]:  # noqa: ANN001
    """Streamed (as from S3), or with ``tmp_path`` from a local file read in place (the decode
    processes read its images by offset), or (``mode="spool"``) through the spool a worker reads a
    stream with."""
    stats = TarStats()
    if tmp_path is None:
        return list(iter_tar(io.BytesIO(data), stats)), stats
    if mode == "spool":
        with Spool(io.BytesIO(data), stats, directory=str(tmp_path), step=1024) as spool:
            return list(iter_tar(spool, stats, in_place=True)), stats
    path = tmp_path / "shard.tar"
    path.write_bytes(data)
    with open(path, "rb") as f:
        return list(iter_tar(f, stats, in_place=True)), stats


@pytest.mark.parametrize("mode", ["stream", "file", "spool"])
@pytest.mark.parametrize(("fmt", "kind"), [(tarfile.GNU_FORMAT, "GNU long name"), (tarfile.PAX_FORMAT, "pax header")])
def test_an_oversized_long_name_or_pax_header_is_skipped_unread_and_recorded(caps, fmt, kind, mode, tmp_path):
    long = "d/" + "x" * 8000 + ".jpg"
    out, stats = _read(_tar([("a.jpg", b"A"), ("a.txt", b"cap a"), (long, b"L"), ("b.jpg", b"B")], fmt),
                       tmp_path if mode != "stream" else None, mode)
    assert [type(o).__name__ for o in out] == ["Sample", "SkippedMember", "Sample"]
    assert out[0].caption == "cap a" and out[2].member == "b.jpg" and out[2].index == 1
    assert out[1].reason.startswith(f"{kind} of ") and "skipped unread" in out[1].reason
    assert stats.error is None


@pytest.mark.parametrize("mode", ["stream", "file", "spool"])
def test_oversized_sidecars_and_the_shards_metadata_cap_make_recorded_skips(caps, mode, tmp_path):
    out, stats = _read(_tar([("a.jpg", b"A"), ("a.txt", b"c" * 2000),  # one sidecar over 1000 bytes
                             ("b.json", b"{}"), ("b.jpg", b"B"),  # fine (sidecar before the image)
                             ("c.jpg", b"C"), ("c.txt", b"t" * 900),  # 902 bytes kept so far
                             ("d.jpg", b"D"), ("d.txt", b"u" * 700)],  # past 1500 for the shard
                            tarfile.USTAR_FORMAT), tmp_path if mode != "stream" else None, mode)
    kinds = [(type(o).__name__, o.key) for o in out]
    assert kinds == [("SkippedMember", "a"), ("Sample", "b"), ("Sample", "c"), ("SkippedMember", "d")]
    assert "sidecar a.txt too large (2000 > 1000 bytes" in out[0].reason and out[0].member == "a.jpg"
    assert "exceed 1500 bytes" in out[3].reason
    assert out[1].json == "{}" and out[2].caption == "t" * 900 and [out[1].index, out[2].index] == [0, 1]
    assert stats.error is None
