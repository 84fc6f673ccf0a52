"""Reading a tar someone else wrote, in bounded memory: ``tarfile`` reads a GNU long name or a pax
header whole into memory (a 400 MiB one is one 400 MiB read). :func:`bounded_tarinfo` gives a TarInfo
class that skips such a header past ``limit`` bytes in 4 MiB chunks, marks the member it names
``refused``, and remembers why header parsing stopped. Torch-free; the worker's tar reader
(embedjob.worker.datapath.read) and `embedjob report`'s thumbnails read through it.
"""

from __future__ import annotations

import io
import tarfile
from typing import BinaryIO

# A single member larger than this is skipped instead of being read into memory: no real image in a
# web dataset comes near it.
MAX_MEMBER_BYTES = 256 * 1024 * 1024

LONG_HEADERS = {tarfile.GNUTYPE_LONGNAME: "GNU long name", tarfile.GNUTYPE_LONGLINK: "GNU long link",
                tarfile.XHDTYPE: "pax header", tarfile.XGLTYPE: "pax global header",
                tarfile.SOLARIS_XHDTYPE: "pax header"}


def skip(fileobj: BinaryIO, n: int) -> None:
    """Move past ``n`` bytes: a seek in a file (a spool then drops them unstored), else read and drop
    them in 4 MiB chunks (tarfile's stream cannot seek)."""
    if getattr(fileobj, "seekable", None) is not None and fileobj.seekable():
        fileobj.seek(n, io.SEEK_CUR)
        return
    while n > 0:
        chunk = fileobj.read(min(n, 4 << 20))
        if not chunk:
            raise tarfile.TruncatedHeaderError("unexpected end of data in a skipped header")
        n -= len(chunk)


def bounded_tarinfo(limit: int, seen: list[tarfile.HeaderError]) -> type[tarfile.TarInfo]:
    """A TarInfo class that skips a long-name or pax header over ``limit`` bytes unread (the member it
    names gets ``refused``: why) and appends to ``seen`` why header parsing stopped. tarfile ends
    iteration SILENTLY on a garbage header or on data that stops at a member boundary (no
    end-of-archive blocks); only a zero block (EOFHeaderError) is a proper end."""

    class BoundedTarInfo(tarfile.TarInfo):
        refused: str | None = None  # why this member's header was skipped unread

        def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
            kind = LONG_HEADERS.get(self.type)
            if kind is None or self.size <= limit:
                return super()._proc_member(tar)
            skip(tar.fileobj, self._block(self.size))  # bounded chunks, never one 400 MiB read
            try:
                nxt = self.fromtarfile(tar)
            except tarfile.HeaderError as e:
                raise tarfile.SubsequentHeaderError(str(e)) from None
            nxt.offset = self.offset
            nxt.refused = (f"{kind} of {self.size} bytes (more than {limit}, EMBEDJOB_MAX_TAR_HEADER_BYTES): "
                           "skipped unread")
            return nxt

        @classmethod
        def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
            try:
                return super().fromtarfile(tar)
            except tarfile.HeaderError as e:
                seen.append(e)
                raise

    return BoundedTarInfo
