"""Stage 1 for a stream (an S3 object, a compressed tar): the tar's bytes in a spool file the decode
processes read the images from by offset, as they read a local tar.

A local, uncompressed ``.tar`` needs no copy: the reader indexes it where it is and the decode
processes read each image from the file by (offset, size). A stream cannot be read twice, so before
this module the reader took every image's bytes out of it in Python and wrote them down a pipe to a
decode process, image by image. A :class:`Spool` makes a stream look like that local file instead:

- the reader's tar parser reads it like a file (``seek``/``read``); every read pulls the stream
  forward, in large steps (``STEP`` bytes at a time, the GIL released in the socket read and in the
  decompressor), and the bytes a reader asked for are written to an anonymous temporary file
  (``O_TMPFILE``: it never has a name, so a worker that is SIGKILLed leaves nothing behind);
- :meth:`fill_to` stores an image's bytes without Python ever looking at them; the decode processes
  get the file's descriptor once per shard (``SCM_RIGHTS``) and ``pread`` their images from it;
- bytes the parser skips (members that are not kept: a 10 GB junk member, say) are pulled and
  dropped, never stored;
- :meth:`release_below` punches the file's bytes out once the decode processes have read them
  (``fallocate(PUNCH_HOLE)``), so the disk it takes is the read-ahead (a few batches of images),
  not the shard.

Compressed tars (gzip, bzip2, xz, by their magic bytes) are decompressed on the way in, in bounded
steps: a decompression bomb costs time, never memory. A failure of the source itself is a
:class:`~embedjob.worker.datapath.read.SourceReadError` (retryable); a damaged compressed stream is
the tar's damage (``zlib.error``, ``EOFError``, ``lzma.LZMAError``, ``OSError``), recorded like a
truncated tar.
"""

from __future__ import annotations

import bz2
import ctypes
import ctypes.util
import gzip
import io
import itertools
import logging
import lzma
import os
import tempfile
import threading
from typing import BinaryIO

from embedjob.worker.datapath.read import DAMAGE as _DAMAGE
from embedjob.worker.datapath.read import TarStats, source_stream

log = logging.getLogger(__name__)

# Bytes pulled from the stream per step: large enough that the per-step Python is noise (~1 us per
# 1 MiB), small enough that the spool runs at most this far ahead of what the parser asked for.
STEP = 1 << 20
BLOCK = 512
_ids = itertools.count(1)

_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_fallocate = getattr(_libc, "fallocate", None)
if _fallocate is not None:
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    _fallocate.restype = ctypes.c_int


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Free a file's blocks in ``[offset, offset + length)`` (the size stays); False where the file
    system or the platform cannot."""
    if _fallocate is None or length <= 0:
        return False
    return _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0


def _decompressing(stream: io.BufferedReader) -> BinaryIO:
    """``stream`` itself, or a reader of its decompressed bytes when it starts with the magic of
    gzip, bzip2 or xz (what ``tarfile``'s ``"r|*"`` accepts)."""
    head = stream.peek(6)[:6]
    if head[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=stream, mode="rb")
    if head[:3] == b"BZh":
        return bz2.BZ2File(stream, mode="rb")
    if head == b"\xfd7zXZ\x00":
        return lzma.LZMAFile(stream, mode="rb")
    return stream


class Spool(io.RawIOBase):
    """A stream (``source``) as a readable, seekable file for the tar parser, and as a file
    descriptor (:attr:`fd`) the decode processes read its images from; see the module docstring.
    Offsets are the tar's own (after decompression). Used by one thread (the reader)."""

    def __init__(self, source: BinaryIO, stats: TarStats, directory: str | None = None, step: int = STEP) -> None:
        super().__init__()
        self.id = next(_ids)
        self.step = step
        self._source = _decompressing(source_stream(source, stats))
        self._file = tempfile.TemporaryFile(dir=directory)  # O_TMPFILE on Linux: no name, ever
        self.fd = self._file.fileno()
        self._pos = 0  # the parser's position
        self.pulled = 0  # bytes of the tar taken from the source (stored or dropped)
        self.stored = 0  # bytes written to the file (the rest of what was pulled was skipped)
        self.ended = False  # the source has no more bytes
        self.punched = 0  # the file's bytes below this were freed
        self._dropped_to = 0  # the end of the last range pulled and dropped
        self._damage: BaseException | None = None  # a damaged compressed stream: raised where it is reached
        self.punch_works = True
        self._lock = threading.Lock()  # close() from another thread

    # -- io.RawIOBase ------------------------------------------------------------------------------
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        else:  # the end of a stream is not known before it is read
            raise io.UnsupportedOperation("a spool cannot seek from its end")
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        self._pos = pos
        return pos

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes at the position (the parser's reads: headers, sidecars)."""
        if size is None or size < 0:
            raise io.UnsupportedOperation("a spool is read in sized steps")
        pos = self._pos
        if pos + size <= self.pulled and pos >= self._dropped_to and pos >= self.punched:  # already here
            data = os.pread(self.fd, size, pos)
            self._pos = pos + len(data)
            return data
        buf = bytearray(size)
        n = self.readinto(buf)
        return bytes(buf[:n])

    def readinto(self, b) -> int:  # noqa: ANN001 - buffer protocol
        want = len(b)
        if want == 0:
            return 0
        if self._pos < max(self.punched, self._dropped_to):  # the parser only goes forward
            raise OSError(f"spool: offset {self._pos} was skipped or released already")
        # Skipped bytes before it are dropped, all but the last block: tarfile checks that a member's
        # data is all there by reading the byte before the next header.
        self._pull(self._pos - BLOCK, store=False)
        self._pull(self._pos + want, store=True)
        data = os.pread(self.fd, min(want, max(0, self.pulled - self._pos)), self._pos)
        if not data and self._damage is not None:
            raise self._damage
        n = len(data)
        b[:n] = data
        self._pos += n
        return n

    # -- the reader's side ---------------------------------------------------------------------------
    def fill_to(self, end: int) -> bool:
        """Store the tar's bytes up to ``end`` (an image's last byte) for the decode processes; False
        when the stream ends before it (a truncated tar)."""
        self._pull(end, store=True)
        if self.pulled < end and self._damage is not None:
            raise self._damage
        return self.pulled >= end

    def release_below(self, offset: int) -> None:
        """The decode processes are done with every byte below ``offset``: free them (whole pages)."""
        offset -= offset % 4096
        if offset <= self.punched or not self.punch_works:
            return
        with self._lock:
            if self.closed:
                return
            if not punch_hole(self.fd, self.punched, offset - self.punched):
                self.punch_works = False  # a file system without holes: the spool keeps its bytes
                err = ctypes.get_errno()
                log.warning("the spool's file system (TMPDIR=%s) cannot free read bytes (fallocate punch-hole: "
                            "%s): each S3 or compressed shard in flight keeps its whole tar on disk until it "
                            "ends", tempfile.gettempdir(), os.strerror(err) if err else "unsupported")
                return
            self.punched = offset

    def close(self) -> None:
        with self._lock:
            if not self.closed:
                self._file.close()
            super().close()

    def _pull(self, end: int, store: bool) -> None:
        """Take the source forward to ``end``: written to the file (``store``: a whole step at a time,
        so the next headers and images usually come with it) or dropped (exactly to ``end``: what
        follows may be wanted)."""
        if not store and end > self.pulled:
            self._dropped_to = end
        while self.pulled < end and not self.ended:
            try:
                # read1: one read of the source (a buffered read of a step would lose what it
                # decompressed before a damaged block, and wait for the whole step)
                data = self._source.read1(self.step if store else min(self.step, end - self.pulled))
            except _DAMAGE as e:  # the bytes before it stand; whoever reads past them gets the error
                self._damage, self.ended = e, True
                break
            if not data:
                self.ended = True
                break
            if store:
                os.pwrite(self.fd, data, self.pulled)
                self.stored += len(data)
            self.pulled += len(data)
