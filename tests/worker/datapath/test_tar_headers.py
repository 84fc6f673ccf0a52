"""The reader parses plain tar headers itself when it reads a file or a spool in place (three times
cheaper than tarfile, the main process's largest cost per image) and hands every other header to
tarfile. Whatever the tar, the samples must be exactly tarfile's: same keys, members, captions,
order, bytes, skips and errors."""

from __future__ import annotations

import io
import tarfile

import pytest

from embedjob.worker.datapath.read import Sample, TarStats, iter_tar


def _tar(fmt: int, members: list[tuple[str, bytes, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind in (tarfile.REGTYPE, tarfile.AREGTYPE):
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                info.linkname = "a.jpg" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
                tar.addfile(info)
    return buf.getvalue()


MEMBERS = [
    ("a.jpg", b"A" * 700, tarfile.REGTYPE),
    ("a.txt", "caption é ✓".encode(), tarfile.REGTYPE),
    ("dir", b"", tarfile.DIRTYPE),
    ("link.jpg", b"", tarfile.SYMTYPE),
    ("hard.jpg", b"", tarfile.LNKTYPE),
    ("old.jpg", b"O" * 513, tarfile.AREGTYPE),  # "\0": a regular file too
    ("deep/" * 30 + "b.jpg", b"B" * 10, tarfile.REGTYPE),  # ustar's prefix field, or a long name
    ("deep/" * 30 + "b.json", b'{"k": 1}', tarfile.REGTYPE),
    ("ünï.jpg", b"U" * 1024, tarfile.REGTYPE),
    ("empty.jpg", b"", tarfile.REGTYPE),
    ("n" * 120 + ".jpg", b"N" * 3, tarfile.REGTYPE),  # too long for ustar's name without a slash
]


def _samples(out: list) -> list[tuple]:
    return [(type(s).__name__, s.key, s.member, getattr(s, "caption", None), getattr(s, "json", None),
             getattr(s, "index", None), getattr(s, "reason", None)) for s in out]


def _both(data: bytes, tmp_path) -> tuple[list, TarStats, list, TarStats, bytes]:  # noqa: ANN001
    ref_stats, stats = TarStats(), TarStats()
    reference = list(iter_tar(io.BytesIO(data), ref_stats))  # tarfile's stream mode, every header
    path = tmp_path / "s.tar"
    path.write_bytes(data)
    with open(path, "rb") as f:
        got = list(iter_tar(f, stats, in_place=True))
    return reference, ref_stats, got, stats, data


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_in_place_parsing_gives_exactly_tarfiles_samples(fmt, tmp_path):
    members = [m for m in MEMBERS if fmt != tarfile.USTAR_FORMAT or len(m[0]) < 100 or "/" in m[0]]
    reference, ref_stats, got, stats, data = _both(_tar(fmt, members), tmp_path)
    assert _samples(got) == _samples(reference)
    assert len(reference) >= 5
    for g, r in zip(got, reference, strict=True):
        if isinstance(r, Sample):
            assert data[g.offset:g.offset + g.size] == r.image
    assert (stats.members, stats.ignored_members, stats.error) == (
        ref_stats.members, ref_stats.ignored_members, ref_stats.error)


def test_a_global_pax_header_in_force_is_left_to_tarfile(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,
                      pax_headers={"comment": "global"}) as tar:
        for name, data in (("a.jpg", b"A"), ("a.txt", b"cap"), ("b.jpg", b"B")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    reference, _, got, stats, _ = _both(buf.getvalue(), tmp_path)
    assert _samples(got) == _samples(reference) and len(got) == 2 and stats.error is None


@pytest.mark.parametrize("damage", ["checksum", "size", "cut-in-data", "cut-in-header", "no-end-blocks"])
def test_damaged_headers_get_tarfiles_errors_after_the_same_samples(damage, tmp_path):
    data = bytearray(_tar(tarfile.GNU_FORMAT, [(f"{i:03d}.jpg", bytes([i]) * 600, tarfile.REGTYPE)
                                               for i in range(6)]))
    fourth = data.index(b"003.jpg")  # the fourth member's header
    if damage == "checksum":
        data[fourth + 20] ^= 0xFF
    elif damage == "size":
        data[fourth + 124:fourth + 136] = b"99999999999\0"  # far past the end of the file
    elif damage == "cut-in-data":
        data = data[:fourth + 512 + 100]
    elif damage == "cut-in-header":
        data = data[:fourth + 200]
    else:
        data = data[:data.index(b"005.jpg") + 512 + 1024]  # the last member ends it: no zero blocks
    reference, ref_stats, got, stats, _ = _both(bytes(data), tmp_path)
    assert _samples(got) == _samples(reference)
    assert 2 <= len(got) <= (6 if damage == "no-end-blocks" else 4)
    assert (stats.error is None) == (ref_stats.error is None)
    if damage == "no-end-blocks":
        assert stats.error == ref_stats.error and "without the end-of-archive marker" in stats.error
    if damage in ("checksum", "cut-in-header", "cut-in-data"):
        assert stats.error and stats.error.startswith("tar truncated or corrupt after 00")
