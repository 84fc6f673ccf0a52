"""The loaded vision tower: :class:`Embedder` maps crops to L2-normalised rows, batched.

One is loaded per worker process (:func:`embedjob.worker.model.load.load_embedder` caches it) and
reused for every shard. On CUDA, a batch that runs out of memory is halved and retried, and the
smaller size is kept for the following batches.

Speed: fp16 on CUDA by default. The batch size is tuned on the device when the job leaves it at 0
(:meth:`Embedder.resolve_batch_size`). ``compile`` wraps the forward in ``torch.compile``
(``reduce-overhead`` adds CUDA graphs); batches keep one static shape (a short last batch is
padded), and the compile's warm-up is timed and recorded in every manifest
(``model.compileWarmupSeconds``), never hidden in the first shard's throughput.
:meth:`Embedder.launch_uint8` starts a batch without waiting for the device (the engine's forward
thread; :class:`Launched` is its handle).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from embedjob.spec import COMPILE_MODES
from embedjob.worker.model import ModelLoadError
from embedjob.worker.model.torch_env import PRECISION_DTYPES, OutOfMemoryError, torch
from embedjob.worker.model.transform import DEFAULT_TRANSFORM, ImageTransform, normalize

log = logging.getLogger(__name__)

# Batch size 0 ("auto"): on the CPU throughput is flat in the batch size, so a small batch keeps
# memory low; on CUDA the candidates are timed once per loaded model and the fastest that fits wins.
AUTO_BATCH_CPU = 32
AUTO_BATCH_CANDIDATES = (32, 64, 128, 256, 512)
AUTO_BATCH_GAIN = 1.05  # a larger batch must be this much faster to be taken


class Embedder:
    """A loaded vision tower. ``embed`` maps a float32 ``[B, 3, 224, 224]`` batch to float32
    ``[B, dim]`` L2-normalised rows (normalised in fp32 whatever the compute precision)."""

    def __init__(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        *,
        model_id: str,
        revision: str | None,
        dim: int,
        device: torch.device,
        dtype: torch.dtype,
        source: str | None = None,
        module: torch.nn.Module | None = None,
    ) -> None:
        # ``forward`` is the seam between batching and the network: pixels already on the device
        # and in the compute dtype in, unnormalised [B, dim] embeddings out.
        self._forward = forward
        self.model_id = model_id
        self.revision = revision
        self.dim = dim
        self.device = device
        self.dtype = dtype
        self.source = source or model_id
        self.module = module  # the underlying nn.Module (None for an injected forward)
        # Largest batch known to fit; None until an out-of-memory error teaches us one.
        self.max_batch: int | None = None
        self._lock = threading.Lock()
        self._busy = 0.0  # seconds spent running batches (see busy_seconds)
        self._copy_stream: Any = None  # CUDA: host-to-device copies overlap the forward
        self.compile_mode = "none"
        self.compile_warmup_seconds = 0.0  # time spent compiling (and capturing graphs), all sizes
        self._warm_sizes: set[int] = set()
        self._eager_forward: Callable[[torch.Tensor], torch.Tensor] | None = None  # set when compiled
        self.auto_batch_size: int | None = None  # what resolve_batch_size(0) chose, once
        self.auto_batch_trials: dict[int, float] = {}  # candidate -> images/s (CUDA tuning)
        self.provenance: dict[str, Any] | None = None  # set by the loader (model/provenance.py)
        # The same checkpoint's text tower (embedjob.worker.model.text.TextEmbedder), loaded beside this one
        # for a job with text outputs; it takes ``lock`` for each batch.
        self.text: Any = None
        # The pixels this model wants (size, resize rule, mean/std), from its processor config.
        self.transform: ImageTransform = DEFAULT_TRANSFORM

    @property
    def lock(self) -> threading.Lock:
        """Held while a batch runs on the device: one batch at a time, image or text."""
        return self._lock

    def busy_seconds(self) -> float:
        """Time this embedder's device spent on batches: wall time of each batch on the CPU or with
        :meth:`embed`/:meth:`embed_uint8` (which wait for the result), device time measured with
        CUDA events for :meth:`launch_uint8` batches."""
        return self._busy

    @property
    def precision(self) -> str:
        return {v: k for k, v in PRECISION_DTYPES.items()}[self.dtype]

    def describe(self) -> dict[str, Any]:
        """What a manifest records about the model: what was loaded (``provenance``: a hub id and
        revision, or a local folder with its weights' content hash, never a hub id it was not
        loaded from; embedjob.worker.model.provenance), then how it ran."""
        return {
            **(self.provenance or {"id": self.model_id, "revision": self.revision, "source": self.source}),
            "dim": self.dim,
            "device": str(self.device),
            "precision": self.precision,
            "attention": self.attention,
            "compile": self.compile_mode,
            "compileWarmupSeconds": round(self.compile_warmup_seconds, 3),
        }

    @property
    def attention(self) -> str:
        config = getattr(self.module, "config", None)
        return str(getattr(config, "_attn_implementation", None) or "injected")

    # -- batch size and compiled graphs ---------------------------------------------------------------
    def resolve_batch_size(self, requested: int) -> int:
        """The batch size to run: ``requested`` when set (> 0); for 0 ("auto"), AUTO_BATCH_CPU on the
        CPU, and on CUDA the fastest of AUTO_BATCH_CANDIDATES that fits, timed once per loaded model
        on random uint8 batches (a larger one must be AUTO_BATCH_GAIN faster; an out-of-memory
        candidate ends the search). Always capped by what an OOM has taught (``max_batch``)."""
        if requested > 0:
            return requested if self.max_batch is None else min(requested, self.max_batch)
        if self.auto_batch_size is None:
            self.auto_batch_size = AUTO_BATCH_CPU if self.device.type != "cuda" else self.tune_batch_size()
            log.info("batch size: %d (tuned on %s; images/s by size: %s)", self.auto_batch_size, self.device,
                     self.auto_batch_trials or "not timed on the CPU")
        size = self.auto_batch_size
        return size if self.max_batch is None else min(size, self.max_batch)

    def tune_batch_size(self, candidates: tuple[int, ...] = AUTO_BATCH_CANDIDATES, rounds: int = 3) -> int:
        best, best_rate = candidates[0], 0.0
        rng = np.random.default_rng(0)
        for size in candidates:
            side = self.transform.crop
            crops = torch.from_numpy(rng.integers(0, 256, (size, side, side, 3), dtype=np.uint8))
            try:
                self._embed_static(crops, eager=True)  # warm-up; timed eager (compiling each would cost minutes)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                t = time.perf_counter()
                for _ in range(rounds):
                    self._embed_static(crops, eager=True)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                rate = rounds * size / (time.perf_counter() - t)
            except OutOfMemoryError:
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                break
            self.auto_batch_trials[size] = round(rate, 1)
            if rate < best_rate * AUTO_BATCH_GAIN:
                break
            best, best_rate = size, rate
        return best

    def _embed_static(self, crops: torch.Tensor, *, eager: bool = False) -> np.ndarray:
        with self._lock:
            if not eager or self._eager_forward is None:
                return self._run_uint8(crops)
            compiled, self._forward = self._forward, self._eager_forward
            try:
                return self._run_uint8(crops)
            finally:
                self._forward = compiled

    def enable_compile(self, mode: str) -> None:
        """Run the forward through ``torch.compile(mode=mode)`` from now on (``none``: eager)."""
        if mode not in COMPILE_MODES:
            raise ModelLoadError(f"unsupported compile mode {mode!r} (use {', '.join(COMPILE_MODES)})")
        self.compile_mode = mode
        if mode == "none":
            return
        if mode == "reduce-overhead" and self.device.type != "cuda":
            raise ModelLoadError("compile mode 'reduce-overhead' (CUDA graphs) needs a CUDA device")
        self._eager_forward = eager = self._forward
        compiled = torch.compile(eager, mode=None if mode == "default" else mode, dynamic=False)
        graphs = _GraphThread(self.device) if mode == "reduce-overhead" else None

        def forward(pixels: torch.Tensor) -> torch.Tensor:
            # Static shapes: a short batch (the last of a shard) is padded up to the smallest size
            # already compiled, so it reuses that graph instead of compiling one of its own.
            n = int(pixels.shape[0])
            target = min((s for s in self._warm_sizes if s >= n), default=n)
            if target > n:
                pixels = torch.cat([pixels, pixels.new_zeros((target - n, *pixels.shape[1:]))])
            if graphs is not None:
                return graphs.call(compiled, pixels, n)
            return compiled(pixels)[:n].clone()

        self._forward = forward

    def warm_up(self, batch_size: int) -> float:
        """Compile (and capture) the forward for ``batch_size`` before the first real batch; returns
        the seconds it took (0 when already warm or not compiled). Counted in
        ``compile_warmup_seconds`` and in every manifest."""
        if self.compile_mode == "none" or batch_size in self._warm_sizes:
            return 0.0
        t = time.perf_counter()
        crops = torch.zeros((batch_size, self.transform.crop, self.transform.crop, 3), dtype=torch.uint8)
        for _ in range(3 if self.compile_mode == "reduce-overhead" else 1):  # graphs record on the 2nd+ run
            self._embed_static(crops)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t
        self._warm_sizes.add(batch_size)
        self.compile_warmup_seconds += seconds
        log.info("compiled the forward (%s) for batches of %d in %.1f s", self.compile_mode, batch_size, seconds)
        return seconds

    def embed(self, pixels: torch.Tensor | np.ndarray) -> np.ndarray:
        """Embed a normalised float batch ``[B, 3, H, W]``; returns float32 ``[B, dim]`` unit rows. On
        an out-of-memory error the batch is split in halves (down to 1 image) and the smaller size is
        remembered."""
        pixels = torch.as_tensor(pixels)
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected [B, 3, H, W] pixels, got {tuple(pixels.shape)}")
        return self._embed_chunks(pixels, self._run)

    def embed_uint8(self, crops: torch.Tensor | np.ndarray) -> np.ndarray:
        """Embed uint8 crops ``[B, H, W, 3]`` (what the decode workers produce): they go to the device
        as uint8 (4x fewer bytes than float32) and are normalised there, with the same arithmetic
        as :func:`embedjob.worker.model.transform.normalize`. Same result and OOM back-off as :meth:`embed`."""
        crops = torch.as_tensor(crops)
        if crops.dtype != torch.uint8 or crops.ndim != 4 or crops.shape[-1] != 3:
            raise ValueError(f"expected uint8 [B, H, W, 3] crops, got {crops.dtype} {tuple(crops.shape)}")
        return self._embed_chunks(crops, self._run_uint8)

    def _embed_chunks(self, batch: torch.Tensor, run: Callable[[torch.Tensor], np.ndarray]) -> np.ndarray:
        n = int(batch.shape[0])
        if n == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        out: list[np.ndarray] = []
        # One batch at a time per embedder: a GPU shared by threads gains nothing and OOMs sooner.
        with self._lock:
            start = 0
            while start < n:
                size = min(self.max_batch or n, n - start)
                t = time.perf_counter()
                try:
                    out.append(run(batch[start : start + size]))
                except OutOfMemoryError:
                    if size == 1:
                        raise
                    oom_size = size
                else:
                    self._busy += time.perf_counter() - t
                    start += size
                    continue
                # Outside the except block, so the failed attempt's tensors are already released.
                self.max_batch = max(1, oom_size // 2)
                log.warning("out of memory at batch size %d; retrying with %d", oom_size, self.max_batch)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        return np.concatenate(out, axis=0)

    def _finish(self, emb: torch.Tensor) -> np.ndarray:
        emb = torch.nn.functional.normalize(emb.to(torch.float32), dim=-1)
        return emb.cpu().numpy()

    def _run(self, chunk: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            x = chunk.to(self.device, non_blocking=True).to(self.dtype)
            return self._finish(self._forward(x))

    def _run_uint8(self, chunk: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            x = normalize_on_device(chunk.to(self.device, non_blocking=True), self.dtype, self.transform)
            return self._finish(self._forward(x))

    # -- asynchronous launches (the engine's forward thread) -----------------------------------------
    def launch_uint8(self, crops: torch.Tensor, out: torch.Tensor | None = None) -> Launched:
        """Start embedding host uint8 crops ``[B, H, W, 3]`` and return at once with a handle whose
        ``wait()`` gives what :meth:`embed_uint8` would. On CUDA nothing here waits for the device:
        ``crops`` (pinned) go up on a copy stream with a non-blocking copy, normalisation and the
        forward are queued on the compute stream, and the rows come back into ``out`` (pinned, float32
        ``[>=B, dim]``) with a non-blocking copy; ``crops`` and ``out`` must stay untouched until
        ``wait()`` returns. On the CPU the work is done before this returns. Raises
        :class:`OutOfMemoryError` at once when the device has no room (the caller falls back to
        :meth:`embed_uint8`, which halves the batch)."""
        n = int(crops.shape[0])
        if self.device.type != "cuda":
            t = time.perf_counter()
            with self._lock:
                rows = self._run_uint8(crops)
            seconds = time.perf_counter() - t
            self._busy += seconds
            return Launched(rows=rows, seconds=seconds)
        if out is None:
            out = torch.empty((n, self.dim), dtype=torch.float32, pin_memory=True)
        with self._lock, torch.inference_mode():
            compute = torch.cuda.current_stream(self.device)
            if self._copy_stream is None:
                self._copy_stream = torch.cuda.Stream(self.device)
            # ``end`` is a blocking event: waiting for it sleeps in the driver instead of spinning a
            # core (CUDA's default spin-wait burns one CPU per waiting thread for the whole forward,
            # a CPU the decode processes need, and reads as main-process CPU per image).
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True, blocking=True)
            with torch.cuda.stream(self._copy_stream):
                x = crops.to(self.device, non_blocking=True)
            compute.wait_stream(self._copy_stream)
            x.record_stream(compute)  # allocated on the copy stream, used on the compute stream
            start.record(compute)
            emb = self._forward(normalize_on_device(x, self.dtype, self.transform))
            emb = torch.nn.functional.normalize(emb.to(torch.float32), dim=-1)
            out[:n].copy_(emb, non_blocking=True)
            end.record(compute)
        return Launched(out=out[:n], start=start, end=end, embedder=self)


class _GraphThread:
    """The one thread that runs a ``reduce-overhead`` forward. CUDA graph trees keep their state in
    thread-local storage: a compiled function warmed up on one thread fails on another
    (``assert torch._C._is_key_in_tls``; PyTorch issue 123177). The engine's forward thread is made per
    shard, the warm-up runs on the loader's thread, and ``embed_uint8`` on the caller's, so every call
    is handed to this thread instead (one hop per batch, ~0.1 ms, against a forward of tens of ms).
    It uses the default stream, as the callers do, so the order of work on the device is unchanged."""

    def __init__(self, device: torch.device) -> None:
        from concurrent.futures import ThreadPoolExecutor

        def init() -> None:
            if device.type == "cuda" and device.index is not None:
                torch.cuda.set_device(device)

        self._pool = ThreadPoolExecutor(1, thread_name_prefix="embedjob-cudagraphs", initializer=init)

    def call(self, compiled: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor, n: int) -> torch.Tensor:
        def run() -> torch.Tensor:
            with torch.inference_mode():
                torch.compiler.cudagraph_mark_step_begin()
                return compiled(pixels)[:n].clone()  # a copy: a graph's outputs are reused by its next run

        return self._pool.submit(run).result()


@dataclass
class Launched:
    """A batch :meth:`Embedder.launch_uint8` started; ``wait()`` returns its float32 unit rows."""

    rows: np.ndarray | None = None  # CPU: already computed
    seconds: float = 0.0  # the model's time on this batch: wall time on the CPU, device time on CUDA
    out: torch.Tensor | None = None  # CUDA: pinned host rows, valid once ``end`` has completed
    start: Any = None
    end: Any = None
    embedder: Embedder | None = None

    def done(self) -> bool:
        return self.rows is not None or self.end.query()

    def wait(self) -> np.ndarray:
        if self.rows is None:
            self.end.synchronize()
            self.rows = self.out.numpy().copy()  # the pinned buffer goes back to the engine
            self.seconds = self.start.elapsed_time(self.end) / 1000  # device time of this batch
            self.embedder._busy += self.seconds
        return self.rows


def normalize_on_device(crops: torch.Tensor, dtype: torch.dtype = torch.float32,
                        transform: ImageTransform = DEFAULT_TRANSFORM) -> torch.Tensor:
    """ToTensor + Normalize of uint8 ``[B, H, W, 3]`` crops where they are (the model's device), in
    float32 exactly as the reference does (:func:`embedjob.worker.model.transform.normalize`), then cast to
    the compute ``dtype``."""
    return normalize(crops, contiguous=False, mean=transform.mean, std=transform.std).to(dtype)
