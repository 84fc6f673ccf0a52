"""Stage 2 → 4 hand-off — shared-memory batch slots the decode processes write their crops into.

A shard's :class:`BatchSlots` is ``slots`` batches of uint8 ``[batch_size, 224, 224, 3]`` crops in
one anonymous shared-memory file (``memfd_create``: it never has a name under ``/dev/shm``, so a
worker that is SIGKILLed leaves nothing behind; the memory goes when the last process mapping it
exits). The decode processes receive its file descriptor over a Unix socket (``SCM_RIGHTS``), map it
and write each crop into the row the reader assigned it. The main process never touches a crop: a
full slot is handed to the inference engine as it is (on the CPU the forward reads it in place; on
CUDA it is one copy per batch into the pinned buffer).

On the fast path on CUDA the same file also holds each slot's JPEG room (``jpeg_room`` bytes per
slot, after the crops): the reader reserves every image of a batch its size in the room of its
slot, and a decode process that leaves an image for the device (nvJPEG) copies its bytes there, so
the encoded JPEGs reach the device-decode thread as views of the room, not through the pipes and the
main process. An image that does not fit in what is left of the room comes back in the reply
instead. The room is sparse: only the pages the JPEGs touch take memory.

A slot is taken by the reader when it starts assigning a batch's rows and given back when the
engine has finished that batch, so at most ``slots`` batches of crops exist per shard.
"""

from __future__ import annotations

import itertools
import mmap
import os
import queue
import threading

import numpy as np

from embedjob.worker.datapath.preprocess import IMAGE_SIZE

CROP_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 3)
CROP_BYTES = IMAGE_SIZE * IMAGE_SIZE * 3
_ids = itertools.count(1)


def map_slots(fd: int, slots: int, batch_size: int, crop: int = IMAGE_SIZE,
              jpeg_room: int = 0) -> tuple[mmap.mmap, np.ndarray, np.ndarray]:
    """Map a slots file: the mapping, its ``[slots, batch_size, crop, crop, 3]`` uint8 view of the
    crops (224 px by default; the model's own crop size otherwise) and its ``[slots, jpeg_room]``
    uint8 view of the JPEG rooms."""
    crops = slots * batch_size * crop * crop * 3
    mm = mmap.mmap(fd, crops + slots * jpeg_room)
    whole = np.frombuffer(mm, dtype=np.uint8)
    return (mm, whole[:crops].reshape(slots, batch_size, crop, crop, 3),
            whole[crops:].reshape(slots, jpeg_room))


class BatchSlots:
    """``slots`` batch slots in an anonymous shared-memory file (see the module docstring)."""

    def __init__(self, batch_size: int, slots: int, crop: int = IMAGE_SIZE, jpeg_room: int = 0) -> None:
        self.id = next(_ids)
        self.batch_size, self.slots, self.crop = int(batch_size), int(slots), int(crop)
        self.jpeg_room = int(jpeg_room)  # bytes per slot for the encoded JPEGs of the device path
        self.fd = os.memfd_create(f"embedjob-batch-slots-{os.getpid()}-{self.id}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, self.slots * (self.batch_size * self.crop * self.crop * 3 + self.jpeg_room))
            self._mm, self.array, self.jpegs = map_slots(self.fd, self.slots, self.batch_size, self.crop,
                                                         self.jpeg_room)
        except BaseException:
            os.close(self.fd)
            raise
        self._free: queue.Queue[int] = queue.Queue()
        for i in range(self.slots):
            self._free.put(i)
        self._lock = threading.Lock()
        self.closed = False

    def acquire(self, stop: threading.Event) -> int | None:
        """A free slot, waiting for one; None once ``stop`` is set."""
        while not stop.is_set():
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    def release(self, slot: int) -> None:
        self._free.put(slot)

    def close(self) -> None:
        """Close the file descriptor and drop the mapping (a view still in use keeps it alive until
        it is garbage-collected; the decode processes unmap their own)."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            os.close(self.fd)
            self.array = np.empty((0, 0, self.crop, self.crop, 3), dtype=np.uint8)
            self.jpegs = np.empty((0, 0), dtype=np.uint8)
            try:
                self._mm.close()
            except BufferError:  # a batch view is still referenced: freed with it
                pass
