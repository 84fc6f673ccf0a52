"""Stage 1 — tar reader: stream a WebDataset ``.tar`` and group its members into samples.

A sample is every consecutive member sharing a key, as WebDataset defines it: the member path up to
the first dot of its basename (the folder part is kept, so ``a/x.jpg`` and ``b/x.jpg`` are two
samples). Each sample carries at most one image (``.jpg .jpeg .png .webp .gif .bmp .tif .tiff``, any
case) plus its ``.txt`` caption and ``.json`` sidecars; every other member is ignored.

Memory is bounded by one sample: the tar is read in stream mode (``"r|*"``) straight from
``Storage.open_read`` (an S3 body or a local file) and nothing but the current sample is held.

Hostile shards are bounded too (embedjob.settings): a GNU long name/link or pax header larger than
``EMBEDJOB_MAX_TAR_HEADER_BYTES`` is skipped without being read (``tarfile`` would read it whole into
memory) and its member recorded as skipped; a caption or JSON sidecar larger than
``EMBEDJOB_MAX_SIDECAR_BYTES`` is not read, and sidecars past ``EMBEDJOB_MAX_METADATA_BYTES`` per shard
are not kept: their samples are recorded as skipped, never embedded without their metadata.

Damage is data, not a crash: when the tar itself is truncated or corrupt, the samples read before
the damage are yielded and the error is reported through :class:`TarStats`. An error of the
*source* (network, S3) is different — retrying may fix it — so it propagates as
:class:`SourceReadError` and never ends up recorded as a "short shard".
"""

from __future__ import annotations

import io
import lzma
import os
import posixpath
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from embedjob import settings
from embedjob.policy import PermanentError
from embedjob.tar_headers import MAX_MEMBER_BYTES, bounded_tarinfo

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"})
CAPTION_EXTENSION = "txt"
JSON_EXTENSION = "json"
# What a damaged tar raises while being parsed. Compressed tars read through "r|*" fail with the
# decompressor's errors (bz2 raises a plain OSError); the source's own failures are wrapped in
# SourceReadError first, so they never land here.
DAMAGE = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError)


class TarOpenError(PermanentError):
    """The shard is not a readable tar at all (nothing could be read from it): retrying cannot fix it."""


class SourceReadError(Exception):
    """Reading the underlying stream failed (network, S3, disk): a retryable shard-level error."""


@dataclass
class Sample:
    """One WebDataset sample that has an image member."""

    key: str
    member: str  # path of the image member inside the tar
    image: bytes  # b"" when the image is left in the file (``offset``/``size``)
    caption: str | None = None
    json: str | None = None
    index: int = 0  # position among the image samples of the tar (row order)
    offset: int = -1  # with iter_tar(in_place=True) on a seekable, uncompressed tar: where the image is
    size: int = 0


@dataclass
class SkippedMember:
    """An image member that was not turned into a sample (recorded in the manifest)."""

    key: str
    member: str
    reason: str


@dataclass
class TarStats:
    members: int = 0
    ignored_members: int = 0
    bytes_read: int = 0
    error: str | None = None  # truncation / corruption of the tar itself


def split_key(path: str) -> tuple[str, str] | None:
    """``"dir/abc.seg.JPG"`` -> ``("dir/abc", "seg.jpg")``; None when the basename has no dot (WebDataset
    ignores such members)."""
    dirname, base = posixpath.split(path)
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None
    return (posixpath.join(dirname, stem) if dirname else stem), ext.lower()


class _SourceStream(io.RawIOBase):
    """Marks every failure of the underlying read as a :class:`SourceReadError`, so the tar parser's
    own errors (truncation, bad headers) are never confused with a network error."""

    def __init__(self, raw: BinaryIO, stats: TarStats) -> None:
        self._raw = raw
        self._stats = stats

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # noqa: ANN001 - buffer protocol
        try:
            data = self._raw.read(len(b))
        except Exception as e:  # boto/urllib3/OS errors all mean "the source failed"
            raise SourceReadError(f"reading the shard failed: {type(e).__name__}: {e}") from e
        n = len(data)
        b[:n] = data
        self._stats.bytes_read += n
        return n


def source_stream(raw: BinaryIO, stats: TarStats) -> io.BufferedReader:
    """``raw`` read in 1 MiB steps, its failures marked as :class:`SourceReadError` and its bytes
    counted in ``stats``."""
    return io.BufferedReader(_SourceStream(raw, stats), buffer_size=1 << 20)


def _watching_tarinfo(seen: list[tarfile.HeaderError]) -> type[tarfile.TarInfo]:
    """:func:`embedjob.tar_headers.bounded_tarinfo` at ``EMBEDJOB_MAX_TAR_HEADER_BYTES``."""
    return bounded_tarinfo(settings.load().max_tar_header_bytes, seen)


def _drain(f: BinaryIO | None) -> None:
    """Read a member's data to its end, 4 MiB at a time, keeping none of it."""
    while f is not None and f.read(4 << 20):
        pass


def _end_error(seen: list[tarfile.HeaderError]) -> str | None:
    """Why iteration stopped, when it was not a proper end-of-archive marker."""
    if not seen or isinstance(seen[-1], tarfile.EOFHeaderError):
        return None
    e = seen[-1]
    if isinstance(e, tarfile.EmptyHeaderError):
        return "data ends without the end-of-archive marker (truncated at a member boundary?)"
    if isinstance(e, tarfile.TruncatedHeaderError):
        return f"truncated member header: {e}"
    return f"invalid member header: {e}"


def _decode_text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


_PLAIN_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE)
_MAGICS = (tarfile.POSIX_MAGIC, tarfile.GNU_MAGIC)  # buf[257:265] of a ustar / GNU header


def _plain_header(tar: tarfile.TarFile, fileobj: BinaryIO) -> tarfile.TarInfo | None:
    """The member at ``tar.offset`` when its header is the plain kind a web dataset is made of (one
    ustar or GNU block of a regular file, valid checksum, octal size, no pax state in force), parsed
    here: ``tarfile``'s own parsing is most of the reader's cost (~70 us per sample of three
    members), this is a few microseconds. None for anything else (end of the archive, damage, long
    names, pax, links, sparse files, old tars...): ``tar.next()`` then parses it as it always did,
    with every check and error message of its own. What is returned is what ``tar.next()`` would."""
    if tar.pax_headers:  # a global pax header changes the members after it: tarfile applies it
        return None
    offset = tar.offset
    fileobj.seek(offset)
    buf = fileobj.read(512)
    if len(buf) != 512 or buf[156:157] not in _PLAIN_TYPES or buf[257:265] not in _MAGICS or buf[124] & 0x80:
        return None
    try:  # octal numbers as tarfile.nti reads them; the checksum as the unsigned sum (the signed
        # one, from some old tars, takes tarfile's path)
        chksum = int(buf[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
        size = int(buf[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        return None
    if chksum != sum(buf[:148]) + 256 + sum(buf[156:]):
        return None
    name = tarfile.nts(buf[0:100], tar.encoding, tar.errors)
    prefix = tarfile.nts(buf[345:500], tar.encoding, tar.errors)
    if buf[156:157] == tarfile.AREGTYPE and name.endswith("/") or size < 0:
        return None  # an old-style directory: tarfile's
    info = tarfile.TarInfo(prefix + "/" + name if prefix else name)
    info.type, info.size, info.offset, info.offset_data = tarfile.REGTYPE, size, offset, offset + 512
    tar.offset = offset + 512 + (-size % 512) + size
    return info


def _is_tar_block(head: bytes) -> bool:
    """Whether a file's first 512 bytes are a tar header (ustar, or an old tar's octal mode field)."""
    return len(head) == 512 and (head[257:262] == b"ustar" or head[100:108].strip(b" \0").isdigit())


def is_plain_tar(raw: BinaryIO) -> bool:
    """Whether the seekable file ``raw`` starts like an uncompressed tar (its position is kept at 0)."""
    try:
        raw.seek(0)
        head = raw.read(512)
        raw.seek(0)
    except (OSError, AttributeError, ValueError, io.UnsupportedOperation):
        return False
    return _is_tar_block(head)


def _open_in_place(raw: BinaryIO, header_errors: list[tarfile.HeaderError]) -> tuple[tarfile.TarFile, int] | None:
    """A random-access TarFile over ``raw`` (a local, uncompressed tar, or a spool of a stream:
    spool.py) and the file's size (-1 for a spool: not known before its end); None when ``raw`` is
    not such a file (a stream, a compressed tar): the caller streams it instead."""
    spool = hasattr(raw, "fill_to")
    try:
        if not raw.seekable():
            return None
        size = -1 if spool else os.fstat(raw.fileno()).st_size
    except (OSError, AttributeError, ValueError, io.UnsupportedOperation):
        return None
    if not is_plain_tar(raw):
        return None  # compressed, or not a tar: the stream path reports it as before
    try:
        return tarfile.open(fileobj=raw, mode="r:", tarinfo=_watching_tarinfo(header_errors)), size
    except tarfile.TarError:
        raw.seek(0)
        header_errors.clear()
        return None


def iter_tar(raw: BinaryIO, stats: TarStats | None = None, in_place: bool = False) -> Iterator[Sample | SkippedMember]:
    """Yield the image samples of the tar stream ``raw`` in tar order, and, in the same order, the
    image members that cannot become samples (:class:`SkippedMember`). ``stats`` (if given) receives
    counts and the tar error, if any. Raises :class:`TarOpenError` when not even the first header
    can be read, :class:`SourceReadError` when the source fails.

    ``in_place``: when ``raw`` is a local, uncompressed tar file, or a spool of a stream
    (:class:`embedjob.worker.datapath.spool.Spool`), images are not read: their samples carry
    ``offset`` and ``size`` in the file instead of ``image`` (the decode processes read them)."""
    stats = stats if stats is not None else TarStats()
    header_errors: list[tarfile.HeaderError] = []
    opened = _open_in_place(raw, header_errors) if in_place else None
    file_size = -1
    fill_to = getattr(raw, "fill_to", None)  # a spool: its bytes come on demand, already decompressed
    if opened is not None:
        tar, file_size = opened
        if fill_to is None:
            stats.bytes_read = file_size  # every byte is read: the headers here, the images by the decoders
    else:
        stream = raw if fill_to is not None else source_stream(raw, stats)
        try:
            tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_watching_tarinfo(header_errors))
        except DAMAGE as e:  # (a spool decompresses as it is read: a damaged gzip fails here)
            raise TarOpenError(f"not a readable tar: {e}") from e

    limits = settings.load()
    metadata_bytes = 0  # sidecar bytes kept for this shard
    refused: tuple[str, str] | None = None  # (member, why) when the current sample cannot be kept
    index = 0
    key: str | None = None
    image: tuple[str, bytes, int, int] | None = None
    caption: str | None = None
    sidecar: str | None = None
    last_member = ""

    def flush() -> Sample | None:
        nonlocal index
        if key is not None and refused is not None:
            return SkippedMember(key, image[0] if image is not None else refused[0], refused[1])
        if key is None or image is None:
            return None
        sample = Sample(key=key, member=image[0], image=image[1], caption=caption, json=sidecar, index=index,
                        offset=image[2], size=image[3])
        index += 1
        return sample

    fast = opened is not None  # a file or a spool: plain headers are parsed here (_plain_header)
    with tar:
        while True:
            try:
                info = None
                if fast and tar.firstmember is None:
                    info = _plain_header(tar, raw)
                if info is None:
                    info = tar.next()
                if info is None:
                    problem = _end_error(header_errors)
                    if problem:
                        after = f" after {last_member}" if last_member else ""
                        stats.error = f"tar truncated or corrupt{after}: {problem}"
                    break
                stats.members += 1
                if getattr(info, "refused", None):  # a header too large to read: recorded, data skipped
                    tar.members = []
                    done = flush()  # the sample before it ends here (tar order is row order)
                    if done is not None:
                        yield done
                    key, image, caption, sidecar, refused = None, None, None, None, None
                    parts = split_key(info.name)
                    yield SkippedMember(parts[0] if parts else info.name, info.name, info.refused)
                    continue
                # Stream mode still appends every TarInfo to tar.members; drop them so a shard with
                # millions of members keeps a constant footprint.
                tar.members = []
                name = info.name
                parts = split_key(name) if info.isfile() else None
                if parts is None or parts[1] not in IMAGE_EXTENSIONS | {CAPTION_EXTENSION, JSON_EXTENSION}:
                    stats.ignored_members += 1
                    continue
                member_key, ext = parts
                if member_key != key:
                    done = flush()
                    if done is not None:
                        yield done
                    key, image, caption, sidecar = member_key, None, None, None
                    refused = None
                if ext in IMAGE_EXTENSIONS and image is not None:
                    yield SkippedMember(key, name, f"sample already has an image ({image[0]})")
                    continue
                if info.size > MAX_MEMBER_BYTES:
                    if ext in IMAGE_EXTENSIONS:
                        yield SkippedMember(key, name, f"member too large ({info.size} > {MAX_MEMBER_BYTES} bytes)")
                    else:
                        stats.ignored_members += 1
                    continue
                if (file_size >= 0 or fill_to is not None) and ext in IMAGE_EXTENSIONS and not info.issparse():
                    end = info.offset_data + info.size
                    if not fill_to(end) if fill_to is not None else end > file_size:
                        raise tarfile.ReadError(f"unexpected end of data in {name}")
                    last_member = name
                    image = (name, b"", info.offset_data, info.size)
                    continue
                if ext in (CAPTION_EXTENSION, JSON_EXTENSION):
                    why = None
                    if info.size > limits.max_sidecar_bytes:
                        why = (f"sidecar {name} too large ({info.size} > {limits.max_sidecar_bytes} bytes, "
                               "EMBEDJOB_MAX_SIDECAR_BYTES)")
                    elif metadata_bytes + info.size > limits.max_metadata_bytes:
                        why = (f"the shard's sidecars exceed {limits.max_metadata_bytes} bytes "
                               "(EMBEDJOB_MAX_METADATA_BYTES)")
                    if why is not None:  # not kept; the sample is recorded, not embedded without it
                        refused = refused or (name, why)
                        if file_size < 0 and fill_to is None:  # a stream: in big chunks (tarfile's skip is slow)
                            _drain(tar.extractfile(info))  # (a file: the next header is a seek away)
                        continue
                    metadata_bytes += info.size
                if fast and not info.issparse():  # a file: the sidecar is right there
                    raw.seek(info.offset_data)
                    data = raw.read(info.size)
                else:
                    f = tar.extractfile(info)
                    data = f.read() if f is not None else b""
                if len(data) != info.size:
                    raise tarfile.ReadError(f"unexpected end of data in {name}")
                last_member = name
                if ext in IMAGE_EXTENSIONS:
                    image = (name, data, -1, len(data))
                elif ext == CAPTION_EXTENSION:
                    caption = _decode_text(data)
                else:
                    sidecar = _decode_text(data)
            except DAMAGE as e:
                after = f" after {last_member}" if last_member else " before any member"
                stats.error = f"tar truncated or corrupt{after}: {type(e).__name__}: {e}"
                break
        done = flush()
        if done is not None:
            yield done

