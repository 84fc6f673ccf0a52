"""Stage 4 — model: the CLIP vision tower + projection, batched, L2-normalised.

:func:`load_embedder` loads ONLY ``CLIPVisionModelWithProjection`` (the text tower is never built),
from a Hugging Face id (cached under ``model_dir``) or a local folder. A full ``CLIPModel`` checkpoint
— the hub layout of ``openai/clip-vit-large-patch14`` — loads as is: its vision config and
projection size are taken from the checkpoint's ``config.json``, the text weights are skipped, and a
missing or mis-shaped vision weight is an error (never a silently random-initialised layer).
Checkpoints are only ever read as safetensors with the built-in CLIP classes: ``trust_remote_code``
is never passed, so no code shipped with a checkpoint runs.

An :class:`Embedder` is loaded once per worker process (:func:`load_embedder` caches it) and reused
for every shard. On CUDA, a batch that runs out of memory is halved and retried, and the smaller
size is kept for the following batches.

Speed: attention runs through PyTorch's scaled-dot-product attention (``attn_implementation="sdpa"``:
flash / memory-efficient kernels on CUDA), in fp16 on CUDA by default. The batch size is tuned on
the device when the job leaves it at 0 (:meth:`Embedder.resolve_batch_size`). ``compile`` wraps the
forward in ``torch.compile`` (``reduce-overhead`` adds CUDA graphs); batches keep one static shape
(a short last batch is padded), and the compile's warm-up is timed and recorded in every manifest
(``model.compileWarmupSeconds``), never hidden in the first shard's throughput.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embedjob import settings
from embedjob.settings import library_env, set_library_env
from embedjob.spec import COMPILE_MODES

# The decode processes keep every core busy while this process runs the model. With OpenMP's default
# (spin-waiting) torch's threads then burn those cores between ops, and every op's barrier waits for
# a peer thread the scheduler gave to a decoder: on 2 cores at 1 MP that cost a third of the
# throughput (see README, Performance). Passive threads sleep instead. libgomp reads this once, when
# torch is imported, so it is set here, before the import; a setting of the user's own wins.
set_library_env("OMP_WAIT_POLICY", "PASSIVE", keep_users=True)
import torch  # noqa: E402

log = logging.getLogger(__name__)

PRECISION_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SUPPORTED_MODEL_TYPES = ("clip", "clip_vision_model")
ATTENTION = "sdpa"
# Batch size 0 ("auto"): on the CPU throughput is flat in the batch size, so a small batch keeps
# memory low; on CUDA the candidates are timed once per loaded model and the fastest that fits wins.
AUTO_BATCH_CPU = 32
AUTO_BATCH_CANDIDATES = (32, 64, 128, 256, 512)
AUTO_BATCH_GAIN = 1.05  # a larger batch must be this much faster to be taken
# torch >= 2.5 names it torch.OutOfMemoryError; torch.cuda.OutOfMemoryError is the same class.
OutOfMemoryError = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


class ModelLoadError(RuntimeError):
    """The model cannot be loaded as asked (bad checkpoint, unsupported device/precision)."""


@dataclass(frozen=True)
class ModelRef:
    """Which checkpoint: a hub ``name`` at ``revision``, or a local ``path`` (which wins)."""

    name: str
    revision: str | None = None
    path: str | None = None

    @classmethod
    def of(cls, model: Any) -> ModelRef:
        """From a ModelSpec, a dict with name/revision/path, or a plain id/path string."""
        if isinstance(model, ModelRef):
            return model
        if isinstance(model, str):
            return cls(name=model, path=model if os.path.isdir(model) else None)
        get = model.get if isinstance(model, dict) else (lambda k, d=None: getattr(model, k, d))
        name, path = get("name"), get("path")
        if not name and not path:
            raise ModelLoadError("model needs a name (Hugging Face id) or a path")
        return cls(name=name or str(path), revision=get("revision"), path=path or None)

    @property
    def source(self) -> str:
        return self.path or self.name


def default_model_dir() -> str:
    return settings.load().model_dir


def available_cpus() -> int:
    """CPUs this process may really use: its affinity mask, capped by a cgroup v2 CPU quota (a
    container limited to 4 CPUs on a 64-core node must not start 64 threads)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def resolve_device(device: str = "auto") -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"unsupported device {device!r} (use auto, cpu or cuda)")
    return dev


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """auto: fp16 on CUDA, fp32 on CPU. fp32/fp16/bf16: as asked."""
    if precision in (None, "", "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    try:
        return PRECISION_DTYPES[precision]
    except KeyError:
        raise ModelLoadError(f"unsupported precision {precision!r} (use auto, fp32, fp16 or bf16)") from None


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

    def busy_seconds(self) -> float:
        """Time this embedder's device spent on batches: wall time of each batch on the CPU or with
        :meth:`embed`/:meth:`embed_uint8` (which wait for the result), device time measured with
        CUDA events for :meth:`launch_uint8` batches."""
        return self._busy

    @property
    def precision(self) -> str:
        return {v: k for k, v in PRECISION_DTYPES.items()}[self.dtype]

    def describe(self) -> dict[str, Any]:
        """What a manifest records about the model."""
        return {
            "id": self.model_id,
            "revision": self.revision,
            "source": self.source,
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
            crops = torch.from_numpy(rng.integers(0, 256, (size, 224, 224, 3), dtype=np.uint8))
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

        def forward(pixels: torch.Tensor) -> torch.Tensor:
            # Static shapes: a short batch (the last of a shard) is padded up to the smallest size
            # already compiled, so it reuses that graph instead of compiling one of its own.
            n = int(pixels.shape[0])
            target = min((s for s in self._warm_sizes if s >= n), default=n)
            if target > n:
                pixels = torch.cat([pixels, pixels.new_zeros((target - n, *pixels.shape[1:]))])
            if mode == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()
            return compiled(pixels)[:n].clone()  # a copy: a graph's outputs are reused by its next run

        self._forward = forward

    def warm_up(self, batch_size: int) -> float:
        """Compile (and capture) the forward for ``batch_size`` before the first real batch; returns
        the seconds it took (0 when already warm or not compiled). Counted in
        ``compile_warmup_seconds`` and in every manifest."""
        if self.compile_mode == "none" or batch_size in self._warm_sizes:
            return 0.0
        t = time.perf_counter()
        crops = torch.zeros((batch_size, 224, 224, 3), dtype=torch.uint8)
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
        as :func:`embedjob.worker.datapath.preprocess.normalize`. Same result and OOM back-off as :meth:`embed`."""
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
            x = normalize_on_device(chunk.to(self.device, non_blocking=True), self.dtype)
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
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(self._copy_stream):
                x = crops.to(self.device, non_blocking=True)
            compute.wait_stream(self._copy_stream)
            x.record_stream(compute)  # allocated on the copy stream, used on the compute stream
            start.record(compute)
            emb = self._forward(normalize_on_device(x, self.dtype))
            emb = torch.nn.functional.normalize(emb.to(torch.float32), dim=-1)
            out[:n].copy_(emb, non_blocking=True)
            end.record(compute)
        return Launched(out=out[:n], start=start, end=end, embedder=self)


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


def normalize_on_device(crops: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ToTensor + Normalize of uint8 ``[B, H, W, 3]`` crops where they are (the model's device), in
    float32 exactly as the reference does (:func:`embedjob.worker.datapath.preprocess.normalize`), then cast to
    the compute ``dtype``."""
    from embedjob.worker.datapath.preprocess import normalize

    return normalize(crops, contiguous=False).to(dtype)


_cache: dict[tuple, Embedder] = {}
_cache_lock = threading.Lock()
_threads_configured = False


def _configure_cpu_threads() -> None:
    """Use the CPUs we really have, unless the operator pinned OMP_NUM_THREADS."""
    global _threads_configured
    if _threads_configured:
        return
    _threads_configured = True
    if not library_env("OMP_NUM_THREADS"):
        torch.set_num_threads(available_cpus())


def vision_config(ref: ModelRef, cache_dir: str) -> Any:
    """The vision config from the checkpoint's config.json, with the projection size of the full
    model (a CLIPModel's vision_config does not carry it). Only CLIP model types are accepted."""
    from transformers import CLIPConfig, CLIPVisionConfig, PretrainedConfig

    try:
        config_dict, _ = PretrainedConfig.get_config_dict(ref.source, revision=ref.revision, cache_dir=cache_dir)
    except Exception as e:
        raise ModelLoadError(f"cannot read the model config of {ref.source!r}: {type(e).__name__}: {e}") from e
    model_type = config_dict.get("model_type")
    if model_type == "clip":
        full = CLIPConfig.from_dict(config_dict)
        vision = full.vision_config
        vision.projection_dim = full.projection_dim
        return vision
    if model_type == "clip_vision_model":
        return CLIPVisionConfig.from_dict(config_dict)
    raise ModelLoadError(
        f"{ref.source!r} has model_type {model_type!r}; embedjob loads only CLIP checkpoints "
        f"({', '.join(SUPPORTED_MODEL_TYPES)}) with the built-in classes and never runs code from a "
        "checkpoint (trust_remote_code is never enabled)"
    )


def _load_module(ref: ModelRef, cache_dir: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import CLIPVisionModelWithProjection
    from transformers.utils import logging as hf_logging

    # The loading report lists every skipped text-tower weight (we check the info ourselves), and
    # the full config warns about text-tower settings we never use.
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        config = vision_config(ref, cache_dir)
        module, info = CLIPVisionModelWithProjection.from_pretrained(
            ref.source,
            config=config,
            revision=ref.revision,
            cache_dir=cache_dir,
            use_safetensors=True,
            dtype=dtype,
            attn_implementation=ATTENTION,
            output_loading_info=True,
        )
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(f"cannot load the CLIP vision tower from {ref.source!r}: {type(e).__name__}: {e}") from e
    finally:
        hf_logging.set_verbosity(previous)
    problems = {k: list(info.get(k) or []) for k in ("missing_keys", "mismatched_keys", "error_msgs")}
    if any(problems.values()):
        raise ModelLoadError(f"checkpoint {ref.source!r} does not hold a complete CLIP vision tower: {problems}")
    return module


def load_embedder(
    model: Any,
    device: str = "auto",
    precision: str = "auto",
    model_dir: str | None = None,
    compile: str = "none",  # noqa: A002 - the spec's name (spec.inference.compile)
) -> Embedder:
    """Load (or reuse, once per process) the CLIP image embedder for ``model`` — a ModelSpec, a dict
    with ``name``/``revision``/``path``, or an id/path string.

    ``device``: auto (CUDA if available, else CPU) | cpu | cuda[:N]. ``precision``: auto (fp16 on
    CUDA, fp32 on CPU) | fp32 | fp16 | bf16. ``model_dir``: the download cache (default
    ``$EMBEDJOB_MODEL_DIR`` or ``~/.cache/embedjob/models``). ``compile``: one of COMPILE_MODES
    (see :meth:`Embedder.enable_compile`). Raises :class:`ModelLoadError`."""
    ref = ModelRef.of(model)
    dev = resolve_device(device)
    dtype = resolve_dtype(precision, dev)
    cache_dir = model_dir or default_model_dir()
    if compile not in COMPILE_MODES:
        raise ModelLoadError(f"unsupported compile mode {compile!r} (use {', '.join(COMPILE_MODES)})")
    key = (ref, str(dev), dtype, cache_dir, compile)
    with _cache_lock:
        cached = _cache.get(key)
        if cached is not None:
            return cached
        if dev.type == "cpu":
            _configure_cpu_threads()
        module = _load_module(ref, cache_dir, dtype).to(dev).eval()
        module.requires_grad_(False)

        def forward(pixels: torch.Tensor) -> torch.Tensor:
            return module(pixel_values=pixels).image_embeds

        embedder = Embedder(
            forward,
            model_id=ref.name,
            revision=ref.revision,
            dim=int(module.config.projection_dim),
            device=dev,
            dtype=dtype,
            source=ref.source,
            module=module,
        )
        if dev.type == "cpu" and dtype != torch.float32:
            _check_runs(embedder, precision)
        embedder.enable_compile(compile)
        _cache[key] = embedder
        return embedder


def _check_runs(embedder: Embedder, precision: str) -> None:
    """Reduced precision on CPU depends on the torch build and the CPU: fail at load, clearly."""
    size = int(getattr(getattr(embedder.module, "config", None), "image_size", 224))
    try:
        embedder.embed(torch.zeros(1, 3, size, size))
    except Exception as e:
        raise ModelLoadError(f"precision {precision!r} does not run on this CPU: {type(e).__name__}: {e}") from e


def clear_cache() -> None:
    """Forget loaded embedders (tests; a worker keeps its one model for its lifetime)."""
    with _cache_lock:
        _cache.clear()
