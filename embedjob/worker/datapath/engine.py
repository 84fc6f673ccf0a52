"""Stage 4 on its own thread — the engine: batches of uint8 crops to the model's device, normalised
there, the forward in a thread of its own, results back asynchronously.

The pipeline's calling thread only stacks crops into a free host buffer (pinned memory on CUDA, so
the copy to the device is a non-blocking DMA) and hands it over; it then goes straight back to
collecting decoded samples and writing finished batches. The forward thread launches each batch
(:meth:`Embedder.launch_uint8`) and only then waits for the one before it, so on CUDA the device
always has the next batch queued; on the CPU the forward simply runs while the calling thread keeps
the decode workers supplied. Order is kept: futures resolve in submission order.

    engine = InferenceEngine(embedder, batch_size=256)
    future = engine.submit(list_of_224x224x3_uint8)   # blocks only while every host buffer is busy
    rows = future.result().rows                       # float32 [n, dim], L2-normalised
    engine.close()

With the fast path on CUDA, items may also be encoded JPEGs (EncodedJpeg): a device-decode thread
of its own, on a CUDA stream of its own, uploads the batch, decodes its JPEGs with nvJPEG in one
call, resizes and crops them in batches (one call per image size) and scatters them into their
places in the batch; the forward thread only waits for that stream's event. So batch N+1 is decoded
while batch N runs through the model, and neither thread has a per-image loop. An image nvJPEG
refuses takes the CPU path, and one that fails there too is left out of the rows and reported in
``BatchResult.rejected``.

Device-agnostic: the same code runs on the CPU (plain buffers, synchronous forward) and on CUDA.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
import weakref
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from embedjob.worker.datapath.crop import Crop, EncodedJpeg, prepare_image
from embedjob.worker.datapath.gpu_decode import JpegDecoder, decode_into
from embedjob.worker.model.embedder import Embedder, Launched
from embedjob.worker.model.torch_env import OutOfMemoryError, torch

# Host buffers: one being filled by the caller, one launched, one finishing.
SLOTS = 3
_STOP = object()
DEVICE_JPEG_PATH = "device-nvjpeg"


@dataclass
class BatchResult:
    """What a batch gave: ``rows[j]`` is the embedding of the j-th item not in ``rejected``."""

    rows: np.ndarray  # float32 [n - len(rejected), dim], L2-normalised, in item order
    rejected: dict[int, str] = field(default_factory=dict)  # item index -> reason (device-path items only)
    paths: dict[int, str] = field(default_factory=dict)  # item index -> how a device-path item was made


_buffers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_buffers_lock = threading.Lock()


def _take_buffers(embedder: Embedder, batch_size: int, slots: int) -> tuple[list, list]:
    """Host buffers for the crops going up and the rows coming back, pinned on CUDA. Pinning memory
    is slow, so an engine that closes gives its buffers back for the next shard; two engines on one
    embedder (two shards in flight) each get their own."""
    with _buffers_lock:
        free = _buffers.setdefault(embedder, {}).setdefault((batch_size, slots), [])
        if free:
            return free.pop()
    pinned = embedder.device.type == "cuda"
    side = embedder.transform.crop
    return ([torch.empty((batch_size, side, side, 3), dtype=torch.uint8, pin_memory=pinned) for _ in range(slots)],
            [torch.empty((batch_size, embedder.dim), dtype=torch.float32, pin_memory=pinned) for _ in range(slots)])


def _give_back_buffers(embedder: Embedder, batch_size: int, slots: int, buffers: tuple[list, list]) -> None:
    with _buffers_lock:
        per_size = _buffers.setdefault(embedder, {})
        for key in [k for k in per_size if k != (batch_size, slots)]:
            del per_size[key]  # keep one batch size's buffers, the one in use
        per_size.setdefault((batch_size, slots), []).append(buffers)


def _runs_without(n: int, skip: dict[int, object]) -> list[tuple[int, int]]:
    """The runs ``[start, stop)`` of ``range(n)`` that hold no index of ``skip``."""
    runs, start = [], 0
    for i in sorted(skip):
        if i > start:
            runs.append((start, i))
        start = i + 1
    if start < n:
        runs.append((start, n))
    return runs


class InferenceEngine:
    """Runs ``embedder`` on a thread of its own; see the module docstring."""

    def __init__(self, embedder: Embedder, batch_size: int, slots: int = SLOTS, *,
                 jpeg_decoder: JpegDecoder | None = None, max_pixels: int = 0) -> None:
        self.embedder = embedder
        self.batch_size = int(batch_size)
        self.jpeg_decoder = jpeg_decoder  # for EncodedJpeg items (the fast path on CUDA)
        self.max_pixels = max_pixels  # for their CPU fallback
        self._slots = slots
        self._crops, self._rows = _take_buffers(embedder, self.batch_size, slots)
        self._free: queue.Queue[int] = queue.Queue()
        for i in range(slots):
            self._free.put(i)
        self._inbox: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self.busy_seconds = 0.0  # the model's time on this engine's batches (device time on CUDA)
        # With a device JPEG decoder, batches go through the device-decode thread first (its own CUDA
        # stream), which hands them to the forward thread ready, with an event to wait for.
        self._ready: queue.Queue = self._inbox
        self._decode_thread: threading.Thread | None = None
        self._decode_stream = None
        if jpeg_decoder is not None:
            self._ready = queue.Queue()
            if embedder.device.type == "cuda":
                self._decode_stream = torch.cuda.Stream(embedder.device)
            self._decode_thread = threading.Thread(target=self._decode_loop, name="embedjob-device-decode",
                                                   daemon=True)
            self._decode_thread.start()
        self._thread = threading.Thread(target=self._run, name="embedjob-forward", daemon=True)
        self._thread.start()

    # -- the caller's side -----------------------------------------------------------------------
    def submit(self, items: Sequence[np.ndarray | EncodedJpeg] | np.ndarray) -> Future:
        """Queue a batch (at most ``batch_size``) of uint8 ``[224, 224, 3]`` crops, or encoded JPEGs
        for the device; the Future gives a :class:`BatchResult`. Blocks while every host buffer is in
        use (back-pressure)."""
        n = len(items)
        if not 0 < n <= self.batch_size:
            raise ValueError(f"batch of {n} crops for an engine of batch size {self.batch_size}")
        if not self._crops or not self._thread.is_alive():
            raise RuntimeError("the inference engine is closed")
        jpegs = {i: it for i, it in enumerate(items) if isinstance(it, EncodedJpeg)}
        if jpegs and self.jpeg_decoder is None:
            raise ValueError("encoded JPEGs given to an engine without a device JPEG decoder")
        slot = self._free.get()
        host = self._crops[slot].numpy()
        if not jpegs:
            np.stack(items, out=host[:n])  # straight into the (pinned) buffer
        else:
            for i, it in enumerate(items):
                if i not in jpegs:
                    host[i] = it
        future: Future = Future()
        self._inbox.put((slot, n, jpegs, future, None))
        return future

    def submit_batch(self, crops: np.ndarray, jpegs: dict[int, EncodedJpeg] | None = None) -> Future:
        """Queue a batch that is already laid out in memory: ``crops`` is uint8 ``[n, 224, 224, 3]``
        (a batch slot the decode processes wrote into), ``jpegs`` the positions left for encoded
        JPEGs. On the CPU the forward reads ``crops`` in place, so the caller keeps it unchanged until
        the Future is done; on CUDA it is copied into a pinned buffer here, in one copy."""
        n = int(crops.shape[0])
        jpegs = jpegs or {}
        if not 0 < n <= self.batch_size:
            raise ValueError(f"batch of {n} crops for an engine of batch size {self.batch_size}")
        if not self._crops or not self._thread.is_alive():
            raise RuntimeError("the inference engine is closed")
        if jpegs and self.jpeg_decoder is None:
            raise ValueError("encoded JPEGs given to an engine without a device JPEG decoder")
        slot = self._free.get()
        external = None
        if self.embedder.device.type == "cuda":
            # One copy per batch, the GIL released; the rows left for device JPEGs hold no crop (on
            # the fast path most rows are those): only the runs of host crops are copied.
            host, source = self._crops[slot], torch.from_numpy(crops)
            for start, stop in _runs_without(n, jpegs):
                host[start:stop].copy_(source[start:stop])
        else:
            external = torch.from_numpy(crops)
        future: Future = Future()
        self._inbox.put((slot, n, jpegs, future, external))
        return future

    def close(self) -> None:
        """Stop the forward thread; batches not started yet are cancelled."""
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                item[3].cancel()
                self._free.put(item[0])
        self._inbox.put(_STOP)  # the device-decode thread, if any, passes it on to the forward thread
        if self._decode_thread is not None:
            self._decode_thread.join()
        self._thread.join()
        if self._crops:
            _give_back_buffers(self.embedder, self.batch_size, self._slots, (self._crops, self._rows))
            self._crops, self._rows = [], []

    def __enter__(self) -> InferenceEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the device-decode thread (fast path on CUDA) -------------------------------------------------
    def _decode_loop(self) -> None:
        while True:
            item = self._inbox.get()
            if item is _STOP:
                self._ready.put(_STOP)
                return
            started = self._start(item)
            if started is not None:
                self._ready.put(started)

    def _start(self, item: tuple) -> tuple | None:
        """Take up one submitted batch: ``(slot, future, prepared, event)``, where ``prepared`` is what
        :meth:`_batch` made or the exception it raised and ``event`` marks its end on the decode stream
        (None without one); None when the batch was cancelled meanwhile (its slot goes back)."""
        slot, n, jpegs, future, external = item
        if not future.set_running_or_notify_cancel():
            self._free.put(slot)
            return None
        stream, event = self._decode_stream, None
        try:
            if stream is not None:
                with torch.cuda.stream(stream):
                    prepared: tuple | BaseException = self._batch(slot, n, jpegs, external)
                    event = torch.cuda.Event()
                    event.record(stream)
            else:
                prepared = self._batch(slot, n, jpegs, external)
        except BaseException as e:  # noqa: BLE001 - delivered through the Future
            prepared = e
        return slot, future, prepared, event

    def _batch(self, slot: int, n: int, jpegs: dict[int, EncodedJpeg],
               external: torch.Tensor | None = None) -> tuple[torch.Tensor, dict, dict]:
        """The batch to embed: the host crops as they are (``external``: a batch slot the caller laid
        out, read in place), or, with encoded JPEGs, the crops on the device with the device-decoded
        images in their places and the rejected ones left out."""
        crops = self._crops[slot][:n] if external is None else external
        if not jpegs:
            return crops, {}, {}
        device = self.embedder.device
        if len(jpegs) == n:  # nothing from the host: every row is decoded on the device
            batch = torch.empty((n, *crops.shape[1:]), dtype=crops.dtype, device=device)
        else:
            batch = crops.to(device, non_blocking=True)
        order = sorted(jpegs)
        transform = self.embedder.transform
        refused = decode_into([jpegs[i].data for i in order], batch, order, self.jpeg_decoder, transform)
        rejected: dict[int, str] = {}
        paths = dict.fromkeys(order, DEVICE_JPEG_PATH)
        for k in refused:  # nvJPEG refused these: the CPU path, for those images only
            i = order[k]
            fallback = prepare_image(bytes(jpegs[i].data), self.max_pixels, "fast", transform=transform)
            if not isinstance(fallback, Crop):
                rejected[i] = fallback.reason
                del paths[i]
                continue
            batch[i] = torch.from_numpy(fallback.pixels).to(device)
            paths[i] = fallback.path
        if rejected:
            batch = batch[[i for i in range(n) if i not in rejected]]
        return batch, rejected, paths

    def _launch(self, slot: int, batch: torch.Tensor) -> Launched:
        n = int(batch.shape[0])
        if n == 0:
            return Launched(rows=np.zeros((0, self.embedder.dim), dtype=np.float32))
        if self.embedder.max_batch is None or n <= self.embedder.max_batch:
            try:
                return self.embedder.launch_uint8(batch, out=self._rows[slot])
            except OutOfMemoryError:
                pass
        # Too big for the device: the synchronous path halves the batch and remembers the size.
        if self.embedder.device.type == "cuda":
            torch.cuda.empty_cache()
        t = time.perf_counter()
        rows = self.embedder.embed_uint8(batch)
        return Launched(rows=rows, seconds=time.perf_counter() - t)

    def _finish(self, slot: int, future: Future, launched: tuple | BaseException) -> None:
        try:
            if isinstance(launched, BaseException):
                raise launched
            handle, rejected, paths = launched
            rows = handle.wait()
            self.busy_seconds += handle.seconds
        except BaseException as e:  # noqa: BLE001 - the caller re-raises it from the Future
            future.set_exception(e)
        else:
            future.set_result(BatchResult(rows, rejected, paths))
        finally:
            self._free.put(slot)

    def _run(self) -> None:
        in_flight: collections.deque = collections.deque()
        while True:
            if in_flight:
                try:
                    item = self._ready.get_nowait()
                except queue.Empty:  # nothing new to launch: finish the oldest batch meanwhile
                    self._finish(*in_flight.popleft())
                    continue
            else:
                item = self._ready.get()
            if item is _STOP:
                break
            if self._decode_thread is None:  # else the device-decode thread has started it
                item = self._start(item)
                if item is None:
                    continue
            slot, future, prepared, event = item
            if isinstance(prepared, BaseException):
                launched: tuple | BaseException = prepared
            else:
                batch, rejected, paths = prepared
                try:
                    if event is not None:  # made on the decode stream: the forward's stream waits for it
                        current = torch.cuda.current_stream(self.embedder.device)
                        current.wait_event(event)
                        if batch.is_cuda:  # a batch with no device JPEG is the host slot, uploaded later
                            batch.record_stream(current)
                    launched = (self._launch(slot, batch), rejected, paths)
                except BaseException as e:  # noqa: BLE001 - delivered through the Future
                    launched = e
            in_flight.append((slot, future, launched))
            while len(in_flight) > 1:  # the device has the newest batch queued: wait for the older
                self._finish(*in_flight.popleft())
        while in_flight:
            self._finish(*in_flight.popleft())
