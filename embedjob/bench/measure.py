"""The benchmark's measurements but e2e (embedjob/bench/e2e.py) and the fast-vs-exact deviation
(embedjob/bench/deviation.py): the decode limit, the model limit, the Hugging Face baseline, the
decode scaling, the model's FLOPs against a dense matmul, and the limits they set together."""

from __future__ import annotations

import collections
import io
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import numpy as np

from embedjob.bench.monitor import TreeMonitor
from embedjob.contract import EmbedOptions
from embedjob.storage import Storage

BASELINE_BATCH = 32
DEVICE_DECODE_BATCH = 128  # JPEGs per nvJPEG call in the decode limit when the batch size is auto


def rate(images: int, seconds: float) -> float:
    return images / seconds if seconds > 0 else 0.0


def measurement(images: int, seconds: float, monitor: TreeMonitor, **extra: Any) -> dict[str, Any]:
    """One row of the report: images, seconds, rate, and what the process tree used meanwhile."""
    usage: dict[str, Any] = monitor.report()
    # CPU time per image does not depend on how much of the machine other processes took: the
    # measure of efficiency on a shared machine, where images/s is not.
    usage["cpu_ms_per_image"] = round(1000 * usage["cpu_seconds"] / images, 2) if images else None
    usage["main_cpu_ms_per_image"] = round(1000 * usage["main_cpu_seconds"] / images, 3) if images else None
    return {"images": images, "seconds": round(seconds, 3), "images_per_s": round(rate(images, seconds), 2),
            **usage, **extra}


def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The best of several rounds (on a shared machine, the least disturbed one)."""
    if "images_per_s" not in runs[0]:
        return runs[0]  # skipped
    out = dict(max(runs, key=lambda r: r["images_per_s"]))
    if len(runs) > 1:
        out["rounds_images_per_s"] = [r["images_per_s"] for r in runs]
    return out


# -- decode limit -----------------------------------------------------------------------------------------
def measure_decode(shards: list[str], storage: Storage, options: EmbedOptions, device: Any = None,
                   device_jpeg: bool = False, pool_kind: str | None = None) -> dict[str, Any]:
    """Decode limit: every shard through the worker's reader + decode pool (of ``pool_kind``:
    "process", "thread", None for the worker's own), nothing else. With ``device_jpeg`` (the fast
    path on CUDA) the JPEGs the workers leave encoded are decoded, resized and cropped on ``device``
    in batches, as the engine does, still without the model: that decode shares the device's SMs
    with the model (``shares_model_device``)."""
    from embedjob.worker.datapath.batch import PreparedStream, decode_workers
    from embedjob.worker.datapath.decode_pool import shared_decode_pool

    pool = shared_decode_pool(decode_workers(options), pool_kind)
    pool.warm_up()
    images = rejected = 0
    if device_jpeg:  # one nvJPEG call per batch, as the engine makes
        options = replace(options, batch_size=options.batch_size or DEVICE_DECODE_BATCH)

    def decode_on_device(datas: list) -> int:
        from embedjob.worker.datapath.gpu_decode import device_crops, nvjpeg_decoder
        from embedjob.worker.model.torch_env import torch

        crops = device_crops(datas, device, nvjpeg_decoder())
        if device is not None and torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        return sum(1 for c in crops if not isinstance(c, BaseException))

    with TreeMonitor() as mon:
        t0 = time.perf_counter()
        for shard in shards:
            with PreparedStream(shard, storage, pool, options, device_jpeg=device_jpeg) as stream:
                for batch in stream.batches():
                    try:
                        rejected += len(batch.failures)
                        images += len(batch.rows) - len(batch.jpegs)
                        if batch.jpegs:  # their bytes are views of the slot: decoded before it goes back
                            images += decode_on_device([j.data for j in batch.jpegs.values()])
                    finally:
                        stream.release(batch.slot)
        seconds = time.perf_counter() - t0
    return measurement(images, seconds, mon, rejected=rejected, workers=pool.workers, pool=pool.kind,
                       on_device=device_jpeg, shares_model_device=device_jpeg)


def measure_scaling(shards: list[str], storage: Storage, options: EmbedOptions, cpus: int,
                    log: Callable[[str], None], pool_kind: str | None = None) -> list[dict[str, Any]]:
    """The exact decode limit with 1, 2, 4, ... and all usable CPUs: whether decoding scales."""
    from embedjob.worker.datapath.decode_pool import discard_decode_pool

    counts = sorted({*(2**k for k in range(cpus.bit_length()) if 2**k <= cpus), cpus})
    out = []
    for n in counts:
        log(f"bench: decode scaling, {n} workers")
        r = measure_decode(shards, storage, replace(options, num_threads=n), pool_kind=pool_kind)
        out.append({"workers": n, "images_per_s": r["images_per_s"], "cpu_ms_per_image": r["cpu_ms_per_image"],
                    "cpu_cores_busy": r["cpu_cores_busy"]})
    discard_decode_pool()
    return out


# -- model limit ------------------------------------------------------------------------------------------
def measure_model(embedder: Any, requested_batch: int, min_seconds: float) -> dict[str, Any]:
    """Model limit: ready uint8 batches (random pixels: the cost does not depend on them) through the
    model's own launch path (pinned host buffers, copy stream, on-device normalisation, forward, rows
    back), two batches in flight. Everything that runs the forward (batch-size tuning, compile
    warm-up and CUDA-graph capture, the timed loop) runs on ONE thread: a compiled function, CUDA
    graph trees above all, keeps thread-local state and must be called from the thread that warmed
    it up (PyTorch issue 123177)."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result.update(_model_loop(embedder, requested_batch, min_seconds))
        except BaseException as e:  # noqa: BLE001 - re-raised on the calling thread
            result["error"] = e

    thread = threading.Thread(target=run, name="bench-model", daemon=True)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result


def _model_loop(embedder: Any, requested_batch: int, min_seconds: float) -> dict[str, Any]:
    from embedjob.worker.model.torch_env import torch

    batch_size = embedder.resolve_batch_size(requested_batch)
    warmup = embedder.warm_up(batch_size)  # compile (and capture) on this thread
    cuda = embedder.device.type == "cuda"
    crops = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (batch_size, 224, 224, 3), dtype=np.uint8))
    outs = [torch.empty((batch_size, embedder.dim), dtype=torch.float32) for _ in range(2)]
    if cuda:
        crops, outs = crops.pin_memory(), [o.pin_memory() for o in outs]
    for i in range(2):  # warm-up: kernels, allocator, lazy init
        embedder.launch_uint8(crops, out=outs[i]).wait()
    images, batches = 0, 0
    in_flight: collections.deque = collections.deque()
    with TreeMonitor() as mon:
        t0 = time.perf_counter()
        while batches < 3 or time.perf_counter() - t0 < min_seconds:
            if len(in_flight) == 2:  # its output buffer is the one the next batch needs
                images += in_flight.popleft().wait().shape[0]
            in_flight.append(embedder.launch_uint8(crops, out=outs[batches % 2]))
            batches += 1
        while in_flight:
            images += in_flight.popleft().wait().shape[0]
        seconds = time.perf_counter() - t0
    return measurement(images, seconds, mon, batches=batches, batch_size=batch_size,
                       compile=embedder.compile_mode, compile_warmup_seconds=round(warmup, 3),
                       batch_size_trials=dict(getattr(embedder, "auto_batch_trials", {}) or {}),
                       precision=embedder.precision)


# -- baseline ---------------------------------------------------------------------------------------------
def _iter_tar_images(shards: list[str], storage: Storage, limit: int) -> Iterator[bytes]:
    n = 0
    for shard in shards:
        with storage.open_read(shard) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
            for member in tar:
                if member.isfile() and member.name.rsplit(".", 1)[-1].lower() in ("jpg", "jpeg", "png", "webp"):
                    yield tar.extractfile(member).read()
                    n += 1
                    if n >= limit:
                        return


def measure_baseline(shards: list[str], storage: Storage, model_dir: str, device: str, limit: int
                     ) -> dict[str, Any]:
    """The reference stage's approach: one thread reads and decodes, Hugging Face's CLIP image
    processor prepares the pixels on the CPU, ``CLIPModel.get_image_features`` runs in fp32 on
    batches of 32."""
    import torch
    from PIL import Image
    from transformers import CLIPModel
    from transformers.utils import logging as hf_logging

    try:  # transformers >= 5: the PIL implementation (the default one needs torchvision)
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:  # pragma: no cover - older transformers
        from transformers import CLIPImageProcessor as Processor

    from embedjob.worker.model.torch_env import resolve_device

    dev = resolve_device(device)
    hf_logging.set_verbosity_error()
    processor = Processor()
    model = CLIPModel.from_pretrained(model_dir, dtype=torch.float32).to(dev).eval()

    def run(images: list) -> int:
        pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(dev)
        with torch.inference_mode():
            out = model.get_image_features(pixel_values=pixels)
        feats = getattr(out, "pooler_output", out)
        return int(feats.cpu().shape[0])

    first = next(_iter_tar_images(shards, storage, 1))
    run([Image.open(io.BytesIO(first)).convert("RGB")])  # warm-up
    images = 0
    with TreeMonitor() as mon:
        t0 = time.perf_counter()
        batch: list = []
        for data in _iter_tar_images(shards, storage, limit):
            batch.append(Image.open(io.BytesIO(data)).convert("RGB"))
            if len(batch) == BASELINE_BATCH:
                images += run(batch)
                batch = []
        if batch:
            images += run(batch)
        seconds = time.perf_counter() - t0
    return measurement(images, seconds, mon, processor=Processor.__name__, batch_size=BASELINE_BATCH,
                        precision="fp32")


# -- compute --------------------------------------------------------------------------------------------
def vision_flops_per_image(config: Any) -> float:
    """Forward FLOPs of a CLIP ViT image tower (2 per multiply-add): patch embedding, per layer the
    QKV/output projections, attention and MLP, and the final projection. ViT-L/14 at 224 px: ~162 G."""
    d, dff, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    patches = (config.image_size // config.patch_size) ** 2
    tokens = patches + 1
    macs = patches * 3 * config.patch_size**2 * d
    macs += layers * (tokens * (4 * d * d + 2 * d * dff) + 2 * tokens * tokens * d)
    macs += d * getattr(config, "projection_dim", d)
    return 2.0 * macs


def matmul_peak_tflops(device: Any, dtype: Any, n: int = 8192, seconds: float = 1.0) -> float:
    """Dense ``n x n`` matmul throughput on ``device`` in ``dtype``: the roofline the model's achieved
    TFLOP/s is compared with."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or iters < 3:
        for _ in range(10):
            a @ b
        sync()
        iters += 10
    return 2.0 * n**3 * iters / (time.perf_counter() - t0) / 1e12


def compute_section(config: Any, model_ips: float, device: Any, dtype: Any) -> dict[str, Any]:
    """The model's achieved TFLOP/s against a dense matmul in the compute dtype, measured now."""
    flops = vision_flops_per_image(config)
    peak = matmul_peak_tflops(device, dtype, n=8192 if device.type == "cuda" else 2048)
    achieved = model_ips * flops / 1e12
    return {"gflop_per_image": round(flops / 1e9, 2), "model_tflops": round(achieved, 4),
            "matmul_peak_tflops": round(peak, 3), "matmul_dtype": str(dtype).replace("torch.", ""),
            "fraction_of_peak": round(achieved / peak, 3) if peak else None}


# -- limits ---------------------------------------------------------------------------------------------
def limit_of(decode: dict[str, Any], model: dict[str, Any], device_type: str) -> dict[str, Any]:
    """What a perfect pipeline could reach with this decode and this model. They run side by side,
    ``min(decode, model)``, only where the decode does not share the model's compute: exact (PIL on
    the CPU) feeding a GPU. On the CPU they share the cores, and the GPU fast path's decode (nvJPEG,
    resize and crop on the device) shares the device's SMs; there each image costs the time of both,
    ``1/(1/decode + 1/model)``."""
    d, m = decode.get("images_per_s") or 0.0, model.get("images_per_s") or 0.0
    if device_type == "cuda" and not decode.get("shares_model_device"):
        return {"images_per_s": round(min(d, m), 2), "rule": "min(decode, model)", "shares": None}
    shares = "the device's SMs" if device_type == "cuda" else "the CPU cores"
    limit = 1 / (1 / d + 1 / m) if d and m else 0.0
    return {"images_per_s": round(limit, 2), "rule": "1/(1/decode + 1/model)", "shares": shares}


def limits_and_ratios(m: dict[str, Any], modes: tuple[str, ...], device_type: str
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The limit per preprocessing mode (:func:`limit_of`) and the e2e ratios: over the limit on the
    whole run and in steady state, over the baseline, and on the CPU the ratio of CPU time per image
    (decode + model against e2e), which other processes on the machine do not distort."""
    model = m["model_limit"]
    limits, ratios = {}, {}
    for mode in modes:
        decode, e2e = m[f"decode_limit_{mode}"], m[f"e2e_{mode}"]
        lim = limits[mode] = limit_of(decode, model, device_type)
        limit = lim["images_per_s"]
        if "images_per_s" not in e2e:
            continue
        steady = e2e.get("steady_images_per_s")
        ratios[mode] = {
            "e2e_over_limit": round(e2e["images_per_s"] / limit, 3) if limit else None,
            "steady_over_limit": round(steady / limit, 3) if limit and steady else None,
            "e2e_over_baseline": round(e2e["images_per_s"] / m["baseline"]["images_per_s"], 3)
            if m["baseline"].get("images_per_s") else None,
        }
        if device_type != "cuda" and e2e.get("cpu_ms_per_image"):
            ratios[mode]["cpu_time_ratio"] = round(
                (decode["cpu_ms_per_image"] + model["cpu_ms_per_image"]) / e2e["cpu_ms_per_image"], 3)
        base = m["baseline"].get("images_per_s")
        if base and steady:
            ratios[mode]["steady_over_baseline"] = round(steady / base, 3)
        ratios[mode]["why"] = explain_ratios(ratios[mode], e2e)
    return limits, ratios


def explain_ratios(r: dict[str, Any], e2e: dict[str, Any]) -> list[str]:
    """Why a ratio reads as impossible or as a regression, so the report never prints one bare: e2e
    above its limit (the limit's parts are measured apart, each in its own time window, and a shared
    machine's load moves between them; the CPU-time ratio is the load-free comparison), e2e below
    the baseline (e2e counts its cold start, the baseline does not: the steady state compares like
    with like)."""
    why: list[str] = []
    over = r.get("e2e_over_limit")
    if over is not None and over > 1.0:
        cpu = r.get("cpu_time_ratio")
        why.append(f"e2e is {over:.3f}x its limit: the decode and model limits are measured apart, each in its own "
                   "time window, and the machine's load differs between them (above 1 is within that noise, not "
                   "a pipeline faster than its parts)"
                   + (f"; CPU time (decode+model)/e2e, which the load does not move, is {cpu:.3f}" if cpu else ""))
    below = r.get("e2e_over_baseline")
    if below is not None and below < 1.0:
        steady = r.get("steady_over_baseline")
        startup = e2e.get("startup_seconds")
        why.append(f"e2e is {below:.3f}x the baseline: e2e counts its cold start (process spawn, model load, first "
                   f"batch{f': {startup:.1f} s' if startup is not None else ''}) and the baseline is timed after "
                   "its warm-up" + (f"; in steady state e2e is {steady:.3f}x the baseline" if steady else "")
                   + ("" if steady is None or steady >= 1.0 else
                      " (below 1 in steady state too: the run is model-bound and too short to amortise the start, "
                      "or the machine was busy; use --repeat and more images)"))
    return why
