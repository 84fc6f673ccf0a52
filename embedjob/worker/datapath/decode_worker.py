"""Inside a decode process (``python -P -m embedjob.worker.datapath.decode_worker``, started by
decode_pool.py): read a chunk's images (by offset from a local tar, or from the task's payload), run
crop.prepare_image on each, write the crops into their rows of the shared-memory batch slots, and answer
with one small record per image. Also the frames both sides speak: a JSON header plus raw bytes,
never pickles.

Torch-free: a decode process costs a Python, Pillow and numpy, not a second copy of torch.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
from typing import IO, Any

import numpy as np

from embedjob.worker.datapath.batch_slots import map_slots
from embedjob.worker.datapath.crop import Crop, EncodedJpeg, Prepared, Rejected, prepare_image
from embedjob.worker.model.transform import ImageTransform

# -- one pool task: a chunk of images ---------------------------------------------------------------
# A task is a small JSON header plus a raw payload, both ways; no pickles. The header of a chunk:
#   {"op": "chunk", "max_pixels", "preprocessing", "device_jpeg",
#    "transform": the model's ImageTransform as a dict (absent: OpenAI CLIP's 224 px transform),
#    "src": a local tar file the decoder reads the images from (by offset), or null: from the payload,
#    "src_id": [st_dev, st_ino, st_size, st_mtime_ns] of the file the reader indexed (a file put in
#              its place since is refused, never read),
#    "spool": or the id of an attached spool (spool.py: a stream's tar, its file descriptor passed
#             over the socket) the decoder reads the images from (by offset),
#    "items": [[offset, size], ...]   (in the file, or in the payload),
#    "slots": the BatchSlots id the crops go into, "slot": its slot, "rows": [row, ...]
#             (or "slots": null: the crops come back in the reply's payload),
#    "jpeg_at": with "device_jpeg" and slots: [offset in the slot's JPEG room, or -1, ...]: where an
#               image left encoded for the device goes (its size is reserved there; -1: no room)}
# The reply: {"records": [[status, width, height, text, payload bytes], ...], "decode_s",
# "preprocess_s", "paths": {path: count}} plus a payload (the crops when not in slots, the encoded
# JPEGs of the device path that have no room). status: CROP (text = its path), JPEG (in the payload),
# JPEG_IN_SLOT (its bytes at its "jpeg_at" in the slot's JPEG room), REJECTED (text = the reason).
CROP, JPEG, REJECTED, JPEG_IN_SLOT = 0, 1, 2, 3


def file_identity(st: os.stat_result) -> list[int]:
    """What tells one version of a file from another: device, inode, size, modification time."""
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]


class Sources:
    """The decode side's open tar files (a few: two shards may be in flight), each the very file the
    reader indexed (``src_id``), and the attached spools (``spools``: id -> file descriptor)."""

    def __init__(self, keep: int = 4, spools: dict[int, int] | None = None) -> None:
        self.keep = keep
        self._files: dict[tuple, int] = {}
        self.spools = spools if spools is not None else {}

    def read_spool(self, spool: int, offset: int, size: int) -> bytes:
        fd = self.spools.get(spool)
        if fd is None:
            raise RuntimeError(f"spool {spool} is not attached")
        return os.pread(fd, size, offset)

    def read(self, path: str, identity: list[int] | None, offset: int, size: int) -> bytes:
        key = (path, *(identity or ()))
        fd = self._files.get(key)
        if fd is None:
            while len(self._files) >= self.keep:
                os.close(self._files.pop(next(iter(self._files))))
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            if identity is not None and file_identity(os.fstat(fd)) != list(identity):
                os.close(fd)
                raise RuntimeError(f"{path} changed while its shard was being read")
            self._files[key] = fd
        return os.pread(fd, size, offset)

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()


def run_chunk(header: dict, payload: bytes | memoryview, slots: dict[int, tuple[np.ndarray, np.ndarray]],
              sources: Sources) -> tuple[dict, list[bytes]]:
    """Prepare one chunk (see above); ``slots`` maps the attached BatchSlots ids to their arrays
    (crops, JPEG rooms)."""
    src = header.get("src")
    spool = header.get("spool")
    view = memoryview(payload)
    out = room = None
    if header.get("slots") is not None:
        attached = slots.get(header["slots"])
        if attached is None:
            raise RuntimeError(f"batch slots {header['slots']} are not attached")
        out, room = attached[0][header["slot"]], attached[1][header["slot"]]
    rows = header.get("rows") or []
    jpeg_at = header.get("jpeg_at") or []
    records: list[list] = []
    blobs: list[bytes] = []
    paths: dict[str, int] = {}
    decode_s = preprocess_s = 0.0
    transform = ImageTransform.from_dict(header.get("transform"))
    for k, (offset, size) in enumerate(header["items"]):
        if spool is not None:
            data = sources.read_spool(spool, offset, size)
        elif src:
            data = sources.read(src, header.get("src_id"), offset, size)
        else:
            data = bytes(view[offset:offset + size])
        if (src or spool is not None) and len(data) != size:
            item: Prepared = Rejected(f"decode: short read ({len(data)} of {size} bytes)")
        else:
            item = prepare_image(data, header["max_pixels"], header["preprocessing"], header["device_jpeg"], transform)
        decode_s += item.decode_s
        if isinstance(item, Crop):
            preprocess_s += item.preprocess_s
            paths[item.path] = paths.get(item.path, 0) + 1
            if out is not None:
                out[rows[k]] = item.pixels
                records.append([CROP, item.width, item.height, item.path, 0])
            else:
                blobs.append(item.pixels.tobytes())
                records.append([CROP, item.width, item.height, item.path, len(blobs[-1])])
        elif isinstance(item, EncodedJpeg):
            at, n = (jpeg_at[k] if k < len(jpeg_at) else -1), len(item.data)
            if room is not None and 0 <= at and n <= size and at + n <= room.size:  # its reserved place
                room[at:at + n] = np.frombuffer(item.data, dtype=np.uint8)
                records.append([JPEG_IN_SLOT, item.width, item.height, "", n])
            else:
                blobs.append(bytes(item.data))
                records.append([JPEG, item.width, item.height, "", n])
        else:
            preprocess_s += item.preprocess_s
            records.append([REJECTED, 0, 0, item.reason, 0])
    return {"records": records, "decode_s": decode_s, "preprocess_s": preprocess_s, "paths": paths,
            "crop": transform.crop}, blobs


def unpack_prepared(reply: dict, payload: bytes) -> list[Prepared]:
    """The :class:`Prepared` items of a chunk whose crops came back in the payload."""
    out: list[Prepared] = []
    pos = 0
    for status, width, height, text, size in reply["records"]:
        blob, pos = payload[pos:pos + size], pos + size
        if status == CROP:
            pixels = np.frombuffer(blob, dtype=np.uint8).reshape(reply.get("crop", 224), reply.get("crop", 224), 3)
            out.append(Crop(pixels, width, height, 0.0, 0.0, text))
        elif status == JPEG:
            out.append(EncodedJpeg(blob, width, height, 0.0))
        else:
            out.append(Rejected(text))
    return out


ATTACH = "attach"
DETACH = "detach"


FRAME = struct.Struct("<II")


def write_frame(pipe: IO[bytes], header: dict, payload: bytes | list[bytes] = b"") -> None:
    head = json.dumps(header, separators=(",", ":")).encode()
    parts = payload if isinstance(payload, list) else [payload]
    pipe.write(FRAME.pack(len(head), sum(len(p) for p in parts)))
    pipe.write(head)
    for part in parts:
        pipe.write(part)
    pipe.flush()


def read_exact(pipe: IO[bytes], size: int) -> bytes:
    data = pipe.read(size)
    if len(data) < size:
        raise EOFError
    return data


def read_frame(pipe: IO[bytes]) -> tuple[dict, bytes]:
    head_size, payload_size = FRAME.unpack(read_exact(pipe, FRAME.size))
    header = json.loads(read_exact(pipe, head_size))
    if not isinstance(header, dict):
        raise ValueError("a frame's header must be a JSON object")
    return header, read_exact(pipe, payload_size) if payload_size else b""


def serve(stdin: IO[bytes], stdout: IO[bytes], fds: socket.socket | None = None) -> None:
    """The decode worker's loop: read a task, prepare its images, write the results; until EOF."""
    attached: dict[int, tuple[Any, np.ndarray]] = {}
    views: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    sources = Sources()
    while True:
        try:
            header, payload = read_frame(stdin)
        except EOFError:
            return
        op = header.get("op")
        if op == ATTACH:
            assert fds is not None
            _, received, _, _ = socket.recv_fds(fds, 1, 1)  # one byte: exactly one sendmsg's fd
            if "spool" in header:  # kept open until detached: the decoder preads the images from it
                old = sources.spools.pop(header["spool"], None)
                if old is not None:
                    os.close(old)
                sources.spools[header["spool"]] = received[0]
                continue
            try:
                mm, array, rooms = map_slots(received[0], header["count"], header["batch_size"],
                                             header.get("crop", 224), header.get("jpeg_room", 0))
            finally:
                for fd in received:
                    os.close(fd)
            attached[header["slots"]] = (mm, array)
            views[header["slots"]] = (array, rooms)
            del array, rooms  # only the maps above keep views: detaching can then unmap it
            continue
        if op == DETACH:
            if "spool" in header:
                fd = sources.spools.pop(header["spool"], None)
                if fd is not None:
                    os.close(fd)
                continue
            views.pop(header["slots"], None)
            mm, _ = attached.pop(header["slots"], (None, None))
            del _
            if mm is not None:
                try:
                    mm.close()
                except BufferError:
                    pass
            continue
        try:
            reply, blobs = run_chunk(header, payload, views, sources)
        except Exception as e:  # noqa: BLE001 - prepare_image never raises; anything else goes back
            reply, blobs = {"error": f"{type(e).__name__}: {e}"}, []
        reply["id"] = header.get("id")
        write_frame(stdout, reply, blobs)


def _main() -> None:
    # The protocol owns the real stdout; anything a library prints goes to stderr instead.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    fds = socket.socket(fileno=int(sys.argv[1])) if len(sys.argv) > 1 else None
    from embedjob.worker.datapath import decode_worker

    decode_worker.serve(sys.stdin.buffer, out, fds)


if __name__ == "__main__":
    _main()

