"""``embedjob bench``: the worker's throughput against its own limits and a baseline, in one run.

It makes its own WebDataset shards (synthetic JPEGs at a chosen size, on local disk or an S3
endpoint through embedjob's storage code), then measures, one after the other on the same machine:

1. **decode limit**: tar read + decode + preprocessing alone (no model), through the worker's own
   reader and decode pool on every CPU the process may use (``PreparedStream``);
2. **model limit**: the model's forward on ready uint8 batches, at the chosen device, precision and
   batch size, through the worker's own engine;
3. **baseline**: the usual stage: sequential decode, Hugging Face's CLIP image processor on the
   CPU, ``CLIPModel.get_image_features`` in fp32, batches of 32;
4. **embedjob e2e**: the real worker path, the Celery task body ``run_shard_task`` (lease, heartbeat,
   model load, pipeline, outputs written) over every shard back to back, start-up included.

The **limit** is what a perfect pipeline could reach: on a CPU, decode and model share the cores, so
``1 / (1/decode + 1/model)``; on CUDA they run side by side, so ``min(decode, model)``. The report
gives e2e/limit and e2e/baseline, peak memory (PSS of the process and its decode workers), CPU use,
and on CUDA the GPU busy fraction and the model's achieved TFLOP/s against a dense matmul measured in
the same run. With ``--preprocessing fast`` (or ``both``) it also measures the fast path's deviation
from the exact one (PSNR and mean absolute difference of the crops, cosine of the embeddings on a
random-weight ViT-L/14).

Models have random weights (no download): ``tiny`` (the test CLIP: pipeline overhead) or
``vit-l14`` (ViT-L/14's real shapes: the real compute cost).
"""

from __future__ import annotations

import gc
import io
import json
import math
import os
import shutil
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from embedjob.contract import EmbedOptions, ShardTask
from embedjob.storage import Storage, StorageOptions, is_s3, join

SIZES: dict[str, tuple[tuple[int, int], ...]] = {
    "256": ((256, 256),),
    "500x375": ((500, 375),),
    "1mp": ((1200, 900),),
    "mix": ((256, 256), (500, 375), (375, 500), (1200, 900), (640, 427)),
}
MODELS = ("tiny", "vit-l14")
BASELINE_BATCH = 32
DEVICE_DECODE_BATCH = 128  # JPEGs per nvJPEG call in the decode limit when the batch size is auto
MEASUREMENTS = ("decode_limit", "model_limit", "baseline", "e2e")


@dataclass
class BenchConfig:
    model: str = "tiny"
    size: str = "500x375"
    count: int = 4  # shards
    images_per_shard: int = 500
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 0  # 0: tuned on the device, as in a job
    compile: str = "none"  # torch.compile mode; its warm-up is reported separately
    preprocessing: tuple[str, ...] = ("exact",)
    decode_workers: int = 0  # 0: decode limit on every CPU the process may use, e2e with the job default
    decode_pool: str | None = None  # None: the worker's own; "thread" or "process" to compare
    s3_endpoint: str | None = None
    s3_bucket: str = "embedjob-bench"
    workdir: str | None = None
    baseline_images: int = 512  # the baseline runs on the first N images (it is slow)
    model_seconds: float = 3.0
    deviation_images: int = 8
    deviation_model: str = "vit-l14"  # "vit-l14" | "same" (the benchmark's own model)
    jpeg_quality: int = 90
    seed: int = 0
    repeat: int = 1  # rounds of all measurements; each reports its best round
    decode_scaling: bool = False  # also the exact decode limit on 1, 2, 4 ... all CPUs
    shards_in_flight: int = 2  # e2e: shards at once in the one worker process (embedjob worker's default)
    redis_url: str | None = None  # e2e: a Redis of the benchmark's own (the CLI starts one); None: e2e skipped


# -- shards ---------------------------------------------------------------------------------------------
def synthetic_image(width: int, height: int, seed: int) -> Any:
    """A photo-like RGB image: smooth colour fields, hard-edged shapes, fine texture and sensor-like
    noise, so JPEG sizes, decode cost and resampling differences resemble real crawled images."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).resize((width, height),
                                                                                  Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(base)
    for _ in range(14):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(8, max(9, width // 3))), y0 + int(rng.integers(8, max(9, height // 3)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    arr = np.asarray(base, dtype=np.int16)
    yy, xx = np.mgrid[0:height, 0:width]
    arr = arr + (12 * np.sin(xx / rng.uniform(2, 9)) * np.cos(yy / rng.uniform(2, 9)))[..., None].astype(np.int16)
    arr = arr + rng.normal(0, 5, arr.shape).astype(np.int16)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    return img.filter(ImageFilter.GaussianBlur(0.6))


def synthetic_jpegs(size: str, n: int, seed: int = 0, quality: int = 90) -> list[bytes]:
    """``n`` distinct encoded JPEGs, cycling through the sizes of ``size``."""
    from PIL import Image

    dims = SIZES[size]
    out = []
    for i in range(n):
        buf = io.BytesIO()
        synthetic_image(*dims[i % len(dims)], seed=seed * 100_003 + i).save(buf, "JPEG", quality=quality)
        out.append(buf.getvalue())
    Image.init()
    return out


def make_shards(root: str, storage: Storage, size: str, count: int, per_shard: int, seed: int = 0,
                quality: int = 90, distinct: int = 24) -> list[str]:
    """Write ``count`` WebDataset shards of ``per_shard`` samples (``.jpg`` + ``.txt`` + ``.json``)
    under ``root``; returns their URIs. ``distinct`` different JPEGs are cycled (decoding costs the
    same whether or not two images are equal; encoding thousands of large images would not)."""
    jpegs = synthetic_jpegs(size, min(distinct, count * per_shard), seed, quality)
    uris = []
    for s in range(count):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:06d}"
                data = jpegs[(s * 7 + i) % len(jpegs)]
                for ext, payload in (("jpg", data), ("txt", f"synthetic image {key}".encode()),
                                     ("json", json.dumps({"key": key, "bytes": len(data)}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    info.mtime = 0
                    tar.addfile(info, io.BytesIO(payload))
        uri = join(root, f"{s:05d}.tar")
        storage.put_atomic(uri, buf.getvalue(), tmp_root=join(root, "_tmp"))
        uris.append(uri)
    return uris


# -- what the process tree uses ---------------------------------------------------------------------------
def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def _tree(pid: int) -> list[int]:
    kids = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def _memory_kib(pid: int) -> int:
    """Proportional set size (shared pages split between the processes that share them), or RSS."""
    for path, key in ((f"/proc/{pid}/smaps_rollup", "Pss:"), (f"/proc/{pid}/status", "VmRSS:")):
        try:
            with open(path) as f:
                for line in f:
                    if line.startswith(key):
                        return int(line.split()[1])
        except OSError:
            continue
    return 0


def _cpu_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except OSError:
        return 0


class TreeMonitor:
    """Samples this process and every descendant (decode workers) while a measurement runs: the
    peak of their summed PSS, and the CPU seconds they used."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.peak_kib = 0
        self._first: dict[int, int] = {}
        self._last: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-monitor", daemon=True)
        self._start = 0.0
        self.seconds = 0.0

    def _sample(self) -> None:
        total = 0
        for pid in _tree(os.getpid()):
            total += _memory_kib(pid)
            ticks = _cpu_ticks(pid)
            self._first.setdefault(pid, 0 if self._start_sampled else ticks)  # born during it: all of it
            self._last[pid] = ticks
        self.peak_kib = max(self.peak_kib, total)

    def __enter__(self) -> TreeMonitor:
        self._start_sampled = False
        self._sample()
        self._start_sampled = True
        self._start = time.perf_counter()
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.seconds = time.perf_counter() - self._start

    @property
    def cpu_seconds(self) -> float:
        ticks = sum(self._last[p] - self._first.get(p, 0) for p in self._last)
        return ticks / os.sysconf("SC_CLK_TCK")

    def report(self) -> dict[str, float]:
        return {"peak_pss_mib": round(self.peak_kib / 1024, 1), "cpu_seconds": round(self.cpu_seconds, 2),
                "cpu_cores_busy": round(self.cpu_seconds / self.seconds, 2) if self.seconds else 0.0}


# -- the four measurements -----------------------------------------------------------------------------------
def _rate(images: int, seconds: float) -> float:
    return images / seconds if seconds > 0 else 0.0


def _measurement(images: int, seconds: float, monitor: TreeMonitor, **extra: Any) -> dict[str, Any]:
    usage = monitor.report()
    # CPU time per image does not depend on how much of the machine other processes took: the
    # measure of efficiency on a shared machine, where images/s is not.
    usage["cpu_ms_per_image"] = round(1000 * usage["cpu_seconds"] / images, 2) if images else None
    return {"images": images, "seconds": round(seconds, 3), "images_per_s": round(_rate(images, seconds), 2),
            **usage, **extra}


def measure_decode(shards: list[str], storage: Storage, options: EmbedOptions, device: Any = None,
                   device_jpeg: bool = False) -> dict[str, Any]:
    """Decode limit: every shard through the worker's reader + decode pool, nothing else. With
    ``device_jpeg`` (the fast path on CUDA) the JPEGs the workers leave encoded are decoded, resized
    and cropped on ``device`` in batches, as the engine does, still without the model."""
    from embedjob.worker.datapath.decode_pool import EncodedJpeg, Rejected, shared_decode_pool
    from embedjob.worker.datapath.shard import PreparedStream, decode_workers

    pool = shared_decode_pool(decode_workers(options))
    pool.warm_up()
    images = rejected = 0
    pending: list[bytes] = []

    def decode_on_device() -> None:
        nonlocal images
        if pending:
            from embedjob.worker.datapath.gpu_decode import device_crops, nvjpeg_decoder
            from embedjob.worker.model.load import torch

            crops = device_crops(pending, device, nvjpeg_decoder())
            torch.cuda.synchronize(device)
            images += sum(1 for c in crops if not isinstance(c, BaseException))
            pending.clear()

    with TreeMonitor() as mon:
        t0 = time.perf_counter()
        for shard in shards:
            with PreparedStream(shard, storage, pool, options, device_jpeg=device_jpeg) as stream:
                for _, item in stream:
                    if isinstance(item, Rejected):
                        rejected += 1
                    elif isinstance(item, EncodedJpeg):
                        pending.append(item.data)
                        if len(pending) >= (options.batch_size or DEVICE_DECODE_BATCH):
                            decode_on_device()
                    else:
                        images += 1
        decode_on_device()
        seconds = time.perf_counter() - t0
    return _measurement(images, seconds, mon, rejected=rejected, workers=pool.workers, pool=pool.kind,
                        on_device=device_jpeg)


def measure_model(embedder: Any, batch_size: int, min_seconds: float) -> dict[str, Any]:
    """Model limit: ready uint8 batches (random pixels: the cost does not depend on them) through the
    worker's own engine (host buffers, copy, on-device normalisation, forward, rows back)."""
    from embedjob.worker.datapath.engine import InferenceEngine

    crops = list(np.random.default_rng(0).integers(0, 256, (batch_size, 224, 224, 3), dtype=np.uint8))
    with InferenceEngine(embedder, batch_size) as engine:
        for f in [engine.submit(crops) for _ in range(2)]:  # warm-up: kernels, allocator, lazy init
            f.result()
        images, batches, futures = 0, 0, []
        with TreeMonitor() as mon:
            t0 = time.perf_counter()
            while batches < 3 or time.perf_counter() - t0 < min_seconds:
                futures.append(engine.submit(crops))
                batches += 1
                while futures and (futures[0].done() or len(futures) > 2):
                    images += futures.pop(0).result().rows.shape[0]
            for f in futures:
                images += f.result().rows.shape[0]
            seconds = time.perf_counter() - t0
    return _measurement(images, seconds, mon, batches=batches, batch_size=batch_size)


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

    from embedjob.worker.model.load import resolve_device

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
    return _measurement(images, seconds, mon, processor=Processor.__name__, batch_size=BASELINE_BATCH,
                        precision="fp32")


def measure_e2e(shards: list[str], stems: list[str], output: str, model: dict[str, Any], options: EmbedOptions,
                storage_options: StorageOptions, redis_url: str | None, in_flight: int = 2) -> dict[str, Any]:
    """The real worker path: ``run_shard_task`` (the Celery task's body) on every shard, ``in_flight``
    at a time on threads of one process as ``embedjob worker`` runs them, from a cold start (no
    model loaded, no decode pool), outputs written and checked."""
    if redis_url is None:
        return {"skipped": "no Redis: the task body keeps its leases and progress there (embedjob bench starts "
                           "a private redis-server when one is installed: apt-get install redis-server)"}
    from concurrent.futures import ThreadPoolExecutor

    from embedjob import settings

    if settings.load().redis_url != redis_url:  # the task body reads its Redis from the process settings
        raise RuntimeError(f"e2e needs EMBEDJOB_REDIS_URL={redis_url} in the process settings "
                           "(the embedjob bench command sets it to its private Redis)")

    from embedjob.results import read_manifest
    from embedjob.worker.datapath.decode_pool import discard_decode_pool
    from embedjob.worker.model.load import clear_cache, load_embedder
    from embedjob.worker.runtime import task as tasks

    clear_cache()
    discard_decode_pool()
    job = f"bench-{uuid.uuid4().hex[:8]}"
    storage = Storage(storage_options)

    def run(shard_stem: tuple[str, str]) -> dict[str, Any]:
        task = ShardTask(job=job, shard=shard_stem[0], stem=shard_stem[1], output=output, model=model,
                         options=asdict(options), storage=storage_options.to_dict())
        result = tasks.run_shard_task(task)
        if result.get("status") != "done":
            raise RuntimeError(f"shard {shard_stem[1]}: {result}")
        return result

    with TreeMonitor() as mon:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max(1, in_flight), thread_name_prefix="bench-task") as pool:
            results = list(pool.map(run, zip(shards, stems, strict=True)))
        seconds = time.perf_counter() - t0
    images = sum(r["images"] for r in results)
    timings: dict[str, float] = {}
    for r in results:
        for k, v in r["timings"].items():
            timings[k] = timings.get(k, 0.0) + v
    manifests = [read_manifest(output, stem, storage) for stem in stems]
    written = sum(m["counts"]["embedded"] for m in manifests)
    if written != images:
        raise RuntimeError(f"manifests record {written} images, the task results {images}")
    embedder = load_embedder(model, device=options.device, precision=options.precision, compile=options.compile)
    # Included in ``seconds`` (the first task loads the model, tunes the batch and compiles), and
    # shown on its own: a long job pays it once per worker.
    warmup = max(float(m["model"].get("compileWarmupSeconds") or 0) for m in manifests)
    return _measurement(images, seconds, mon, failed=sum(r["failed"] for r in results), shards=len(shards),
                        shards_in_flight=in_flight, stage_seconds={k: round(v, 3) for k, v in sorted(timings.items())},
                        preprocessing_paths=_sum_paths(manifests), model_busy_seconds=round(embedder.busy_seconds(), 3),
                        batch_size=manifests[0]["options"]["batch_size"], compile_warmup_seconds=round(warmup, 3))


def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    if "images_per_s" not in runs[0]:
        return runs[0]  # skipped
    best = dict(max(runs, key=lambda r: r["images_per_s"]))
    if len(runs) > 1:
        best["rounds_images_per_s"] = [r["images_per_s"] for r in runs]
    return best


def _sum_paths(manifests: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for m in manifests:
        for k, v in (m.get("preprocessing_paths") or {}).items():
            out[k] = out.get(k, 0) + v
    return out


# -- fast vs exact ---------------------------------------------------------------------------------------------
def fast_crops(datas: list[bytes], device: Any, max_pixels: int) -> tuple[list[np.ndarray], str]:
    """The fast path's crops as the worker makes them on ``device``: nvJPEG + resize on the device on
    CUDA (the CPU path for what it refuses), DCT-domain downscale + exact resize on the CPU."""
    from embedjob.worker.datapath.decode_pool import Crop, prepare_image

    out: list[Any] = [None] * len(datas)
    path = "cpu-draft"
    if device.type == "cuda":
        from embedjob.worker.datapath.gpu_decode import device_crops, nvjpeg_decoder

        path = "device-nvjpeg"
        for i, crop in enumerate(device_crops(datas, device, nvjpeg_decoder())):
            if not isinstance(crop, BaseException):
                out[i] = crop.cpu().numpy()
    for i, d in enumerate(datas):
        if out[i] is None:
            item = prepare_image(d, max_pixels, "fast")
            assert isinstance(item, Crop), item
            out[i] = item.pixels
    return out, path


def measure_deviation(datas: list[bytes], device: Any, model_dir: str, precision: str) -> dict[str, Any]:
    """Fast against exact on the same images: PSNR and mean absolute difference of the 224x224 crops,
    and the cosine between the embeddings of the two crops."""
    from embedjob.worker.datapath.decode_pool import Crop, prepare_image
    from embedjob.worker.model.load import load_embedder

    max_pixels = EmbedOptions().max_image_pixels
    exact = []
    for d in datas:
        item = prepare_image(d, max_pixels, "exact")
        assert isinstance(item, Crop), item
        exact.append(item.pixels)
    fast, path = fast_crops(datas, device, max_pixels)
    psnr, mad = [], []
    for a, b in zip(exact, fast, strict=True):
        diff = a.astype(np.float64) - b.astype(np.float64)
        mse = float(np.mean(diff**2))
        psnr.append(math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse))
        mad.append(float(np.mean(np.abs(diff))))
    embedder = load_embedder(model_dir, device=str(device), precision=precision)
    ea, eb = embedder.embed_uint8(np.stack(exact)), embedder.embed_uint8(np.stack(fast))
    cos = (ea * eb).sum(1) / (np.linalg.norm(ea, axis=1) * np.linalg.norm(eb, axis=1))
    finite = [p for p in psnr if math.isfinite(p)]
    return {
        "images": len(datas),
        "identical_crops": sum(1 for p in psnr if not math.isfinite(p)),
        "psnr_db_min": round(min(finite), 2) if finite else None,
        "psnr_db_mean": round(float(np.mean(finite)), 2) if finite else None,
        "mean_abs_diff": round(float(np.mean(mad)), 4),
        "mean_abs_diff_max": round(float(np.max(mad)), 4),
        "cosine_min": round(float(cos.min()), 6),
        "cosine_mean": round(float(cos.mean()), 6),
        "model": Path(model_dir).name,
        "precision": embedder.precision,
        "fast_path": path,
    }


# -- device extras ----------------------------------------------------------------------------------------------
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


# -- the run -----------------------------------------------------------------------------------------------------
def _model_dir(kind: str, workdir: Path) -> Path:
    from transformers.utils import logging as hf_logging

    from embedjob.worker.model.load import default_model_dir
    from embedjob.worker.model.random_weights import RANDOM_VIT_L14_DIRNAME, save_random_clip, save_random_vit_l14

    hf_logging.disable_progress_bar()
    if kind == "tiny":
        path = workdir / "models" / "tiny"
        return path if (path / "config.json").exists() else save_random_clip(path)
    # 1.2 GB and a minute to make: kept in the model cache for the next run.
    path = Path(default_model_dir()) / RANDOM_VIT_L14_DIRNAME
    if not (path / "model.safetensors").exists():
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        save_random_vit_l14(tmp)
        tmp.rename(path)
    return path


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every measurement of the module docstring; returns the report (see :func:`format_report`)."""
    from embedjob.worker.datapath import decode_pool as prepare
    from embedjob.worker.model.load import (
        available_cpus,
        load_embedder,
        resolve_device,
        resolve_dtype,
        torch,  # imported there, after torch's OpenMP policy is set
    )

    if cfg.model not in MODELS:
        raise ValueError(f"--model must be one of {', '.join(MODELS)}")
    if cfg.size not in SIZES:
        raise ValueError(f"--size must be one of {', '.join(SIZES)}")
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.precision, device)
    if cfg.decode_pool:
        prepare.default_pool_kind = cfg.decode_pool
    workdir = Path(cfg.workdir or tempfile.mkdtemp(prefix="embedjob-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"config": {**asdict(cfg), "preprocessing": list(cfg.preprocessing)}}
    try:
        storage_options = StorageOptions(endpoint=cfg.s3_endpoint)
        storage = Storage(storage_options)
        if cfg.s3_endpoint:
            from embedjob.storage import s3_client

            client = s3_client(storage_options)
            try:
                client.create_bucket(Bucket=cfg.s3_bucket)
            except client.exceptions.BucketAlreadyOwnedByYou:
                pass
            root = f"s3://{cfg.s3_bucket}/bench-{uuid.uuid4().hex[:8]}"
        else:
            root = str(workdir)
        log(f"bench: writing {cfg.count} shards x {cfg.images_per_shard} images ({cfg.size}) under {root}")
        shards = make_shards(join(root, "shards"), storage, cfg.size, cfg.count, cfg.images_per_shard, cfg.seed,
                             cfg.jpeg_quality)
        stems = [f"{i:05d}" for i in range(len(shards))]
        model_path = _model_dir(cfg.model, workdir)
        model = {"name": model_path.name, "revision": None, "path": str(model_path)}
        base = EmbedOptions(dtype="float16", batch_size=cfg.batch_size, precision=cfg.precision, device=cfg.device,
                            compile=cfg.compile,
                            num_threads=cfg.decode_workers or EmbedOptions().num_threads, overwrite=True)
        cpus = available_cpus()
        report["environment"] = {
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} CPUs",
            "cpus_available": cpus, "torch_threads": torch.get_num_threads(), "load_average_start": load_average(),
            "torch": torch.__version__, "storage": "s3" if is_s3(root) else "local",
        }
        modes = _available_modes(cfg.preprocessing, device, report, log)
        runs: dict[str, list[dict[str, Any]]] = {}
        config, precision = None, None
        for r in range(cfg.repeat):
            round_ = f" [round {r + 1}/{cfg.repeat}]" if cfg.repeat > 1 else ""
            for mode in modes:
                log(f"bench: decode limit ({mode}){round_}")
                limit_options = replace(base, preprocessing=mode, num_threads=cfg.decode_workers or available_cpus())
                runs.setdefault(f"decode_limit_{mode}", []).append(measure_decode(
                    shards, storage, limit_options, device, device_jpeg=(mode == "fast" and device.type == "cuda")))
            log(f"bench: model limit{round_}")
            embedder = load_embedder(model, device=cfg.device, precision=cfg.precision, compile=cfg.compile)
            batch_size = embedder.resolve_batch_size(cfg.batch_size)
            warmup = embedder.warm_up(batch_size)
            runs.setdefault("model_limit", []).append(measure_model(embedder, batch_size, cfg.model_seconds))
            runs["model_limit"][-1].update(compile=cfg.compile, compile_warmup_seconds=round(warmup, 3),
                                           batch_size_trials=dict(embedder.auto_batch_trials))
            config = embedder.module.config if embedder.module is not None else None
            precision = embedder.precision
            del embedder  # e2e loads its own, from a cold start
            log(f"bench: baseline ({min(cfg.baseline_images, cfg.count * cfg.images_per_shard)} images){round_}")
            runs.setdefault("baseline", []).append(
                measure_baseline(shards, storage, str(model_path), cfg.device, cfg.baseline_images))
            gc.collect()  # the baseline's model
            for mode in modes:
                log(f"bench: embedjob e2e ({mode}){round_}")
                out = join(root, f"out-{mode}")
                runs.setdefault(f"e2e_{mode}", []).append(measure_e2e(
                    shards, stems, out, model, replace(base, preprocessing=mode), storage_options,
                    cfg.redis_url, cfg.shards_in_flight))
        # On a machine shared with other work, the best of several rounds is the least disturbed one.
        m = {k: _best(v) for k, v in runs.items()}
        m["model_limit"]["precision"] = precision
        report["measurements"] = m
        report["limits"], report["ratios"] = limits_and_ratios(m, modes, device.type)
        if config is not None:
            log("bench: dense matmul peak")
            report["compute"] = compute_section(config, m["model_limit"]["images_per_s"], device, dtype)
        if device.type == "cuda":
            for mode in modes:
                e2e = m[f"e2e_{mode}"]
                if "seconds" in e2e:
                    e2e["gpu_busy_fraction"] = round(e2e["model_busy_seconds"] / e2e["seconds"], 3)
        if cfg.decode_scaling:
            report["decode_scaling"] = measure_scaling(shards[:1], storage, replace(base, preprocessing="exact"),
                                                       available_cpus(), log)
        if "fast" in modes and cfg.deviation_images > 0:
            log("bench: fast vs exact deviation")
            dev_model = model_path if cfg.deviation_model == "same" else _model_dir("vit-l14", workdir)
            datas = synthetic_jpegs(cfg.size, cfg.deviation_images, seed=cfg.seed + 7, quality=cfg.jpeg_quality)
            report["deviation"] = measure_deviation(datas, device, str(dev_model), "fp32")
        report["environment"]["load_average_end"] = load_average()
        report["environment"]["peak_rss_mib_main"] = round(_max_rss_mib(), 1)
        return report
    finally:
        if cfg.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


def _available_modes(modes: tuple[str, ...], device: Any, report: dict[str, Any], log: Callable[[str], None]
                     ) -> tuple[str, ...]:
    """The preprocessing modes this machine can run: the fast path on CUDA needs torchvision."""
    if "fast" not in modes or device.type != "cuda":
        return modes
    from embedjob.worker.datapath.gpu_decode import DeviceDecodeUnavailable, nvjpeg_decoder

    try:
        nvjpeg_decoder()
    except DeviceDecodeUnavailable as e:
        log(f"bench: skipping the fast path: {e}")
        report.setdefault("notes", []).append(f"fast path not measured: {e}")
        return tuple(m for m in modes if m != "fast")
    return modes


def limits_and_ratios(m: dict[str, Any], modes: tuple[str, ...], device_type: str
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The limit per preprocessing mode (CPU: decode and model share the cores; CUDA: side by side)
    and the e2e ratios. On the CPU also the ratio of CPU time per image (decode + model against e2e),
    which other processes on the machine do not distort."""
    model = m["model_limit"]
    limits, ratios = {}, {}
    for mode in modes:
        decode, e2e = m[f"decode_limit_{mode}"], m[f"e2e_{mode}"]
        if device_type == "cuda":
            limit, rule = min(decode["images_per_s"], model["images_per_s"]), "min(decode, model)"
        else:
            both = decode["images_per_s"] and model["images_per_s"]
            limit = 1 / (1 / decode["images_per_s"] + 1 / model["images_per_s"]) if both else 0.0
            rule = "1/(1/decode + 1/model)"
        limits[mode] = {"images_per_s": round(limit, 2), "rule": rule}
        if "images_per_s" not in e2e:
            continue
        ratios[mode] = {
            "e2e_over_limit": round(e2e["images_per_s"] / limit, 3) if limit else None,
            "e2e_over_baseline": round(e2e["images_per_s"] / m["baseline"]["images_per_s"], 3),
        }
        if device_type != "cuda" and e2e.get("cpu_ms_per_image"):
            ratios[mode]["cpu_time_ratio"] = round(
                (decode["cpu_ms_per_image"] + model["cpu_ms_per_image"]) / e2e["cpu_ms_per_image"], 3)
    return limits, ratios


def compute_section(config: Any, model_ips: float, device: Any, dtype: Any) -> dict[str, Any]:
    """The model's achieved TFLOP/s against a dense matmul in the compute dtype, measured now."""
    flops = vision_flops_per_image(config)
    peak = matmul_peak_tflops(device, dtype, n=8192 if device.type == "cuda" else 2048)
    achieved = model_ips * flops / 1e12
    return {"gflop_per_image": round(flops / 1e9, 2), "model_tflops": round(achieved, 4),
            "matmul_peak_tflops": round(peak, 3), "matmul_dtype": str(dtype).replace("torch.", ""),
            "fraction_of_peak": round(achieved / peak, 3) if peak else None}


def measure_scaling(shards: list[str], storage: Storage, options: EmbedOptions, cpus: int,
                    log: Callable[[str], None]) -> list[dict[str, Any]]:
    """The exact decode limit with 1, 2, 4, ... and all usable CPUs: whether decoding scales."""
    from embedjob.worker.datapath.decode_pool import discard_decode_pool

    counts = sorted({*(2**k for k in range(cpus.bit_length()) if 2**k <= cpus), cpus})
    out = []
    for n in counts:
        log(f"bench: decode scaling, {n} workers")
        r = measure_decode(shards, storage, replace(options, num_threads=n))
        out.append({"workers": n, "images_per_s": r["images_per_s"], "cpu_ms_per_image": r["cpu_ms_per_image"],
                    "cpu_cores_busy": r["cpu_cores_busy"]})
    discard_decode_pool()
    return out


def _max_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def format_report(report: dict[str, Any]) -> str:
    """The human-readable table."""
    cfg, env, m = report["config"], report["environment"], report["measurements"]
    trials = m["model_limit"].get("batch_size_trials") or "CPU default"
    tuned = "" if cfg["batch_size"] else f" (tuned: {trials})"
    lines = [
        f"embedjob bench: model {cfg['model']} (random weights), {env['device']} ({env['device_name']}), "
        f"precision {m['model_limit'].get('precision')}, batch {m['model_limit'].get('batch_size')}"
        f"{tuned}"
        f", compile {cfg.get('compile', 'none')}",
        f"  shards: {cfg['count']} x {cfg['images_per_shard']} JPEGs ({cfg['size']}), {env['storage']} storage; "
        f"CPUs available {env['cpus_available']}, torch threads {env['torch_threads']}",
        f"  load average: start {env['load_average_start']}, end {env.get('load_average_end')}",
        "",
        f"  {'measurement':<44}{'images':>8}{'seconds':>9}{'images/s':>10}{'peak MiB':>10}{'CPU busy':>10}"
        f"{'CPU ms/img':>11}",
    ]

    def row(label: str, r: dict[str, Any]) -> None:
        if "skipped" in r:
            lines.append(f"  {label:<44}skipped: {r['skipped']}")
            return
        lines.append(f"  {label:<44}{r['images']:>8}{r['seconds']:>9.2f}{r['images_per_s']:>10.1f}"
                     f"{r['peak_pss_mib']:>10.0f}{r['cpu_cores_busy']:>10.2f}{r['cpu_ms_per_image']:>11.2f}")

    modes = list(report["limits"])
    for mode in modes:
        d = m[f"decode_limit_{mode}"]
        where = " + nvJPEG" if d.get("on_device") else ""
        row(f"1. decode limit ({mode}, {d['workers']} {d['pool']} workers{where})", d)
    row(f"2. model limit (uint8 batches of {m['model_limit'].get('batch_size')})", m["model_limit"])
    row(f"3. baseline ({m['baseline']['processor']}, fp32, b{BASELINE_BATCH})", m["baseline"])
    for mode in modes:
        e2e = m[f"e2e_{mode}"]
        row(f"4. embedjob e2e ({mode}, run_shard_task x{e2e.get('shards_in_flight', 1)})", e2e)
    if cfg.get("compile", "none") != "none":
        lines.append(f"  compile warm-up ({cfg['compile']}): {m['model_limit'].get('compile_warmup_seconds')} s before "
                     "the model limit (not in it); e2e includes its own: "
                     + ", ".join(f"{mode} {m[f'e2e_{mode}'].get('compile_warmup_seconds')} s" for mode in modes))
    lines.append("")
    for mode in modes:
        lim = report["limits"][mode]
        r = report["ratios"].get(mode)
        ratio = (f"e2e/limit {r['e2e_over_limit']:.3f}   e2e/baseline {r['e2e_over_baseline']:.2f}" if r
                 else "e2e skipped")
        if r and "cpu_time_ratio" in r:
            ratio += f"   CPU time (decode+model)/e2e {r['cpu_time_ratio']:.3f}"
        lines.append(f"  {mode}: limit {lim['images_per_s']:.1f} images/s ({lim['rule']});  {ratio}")
    c = report.get("compute")
    if c:
        lines.append(f"  model: {c['gflop_per_image']} GFLOP/image, {c['model_tflops']} TFLOP/s achieved vs dense "
                     f"{c['matmul_dtype']} matmul {c['matmul_peak_tflops']} TFLOP/s ({c['fraction_of_peak']})")
    for mode in modes:
        busy = m[f"e2e_{mode}"].get("gpu_busy_fraction")
        if busy is not None:
            lines.append(f"  GPU busy during e2e ({mode}): {busy:.2f}")
    d = report.get("deviation")
    if d:
        psnr = ("identical" if d["psnr_db_min"] is None
                else f"PSNR min {d['psnr_db_min']} dB mean {d['psnr_db_mean']} dB")
        lines.append(f"  fast ({d['fast_path']}) vs exact ({d['images']} images, {d['identical_crops']} identical "
                     f"crops): {psnr}, "
                     f"mean |diff| {d['mean_abs_diff']} (worst image {d['mean_abs_diff_max']}), cosine "
                     f"min {d['cosine_min']} mean {d['cosine_mean']} on {d['model']} {d['precision']}")
    scaling = report.get("decode_scaling")
    if scaling:
        lines.append("  decode scaling (exact): " + ", ".join(
            f"{x['workers']} workers {x['images_per_s']:.0f}/s" for x in scaling))
    for note in report.get("notes", []):
        lines.append(f"  note: {note}")
    lines.append(f"  peak RSS of the bench process: {env['peak_rss_mib_main']} MiB")
    return "\n".join(lines)


def write_json(report: dict[str, Any], path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=1, sort_keys=True, allow_nan=False))



def summary_markdown(reports: list[dict[str, Any]]) -> str:
    """One Markdown table over several reports (sizes, paths): what the README and a closing note show."""
    head = ("| size | path | decode limit | model limit | limit | embedjob e2e | e2e/limit | baseline | e2e/baseline "
            "| GPU busy | model TFLOP/s (of peak) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in reports:
        m, cfg = r["measurements"], r["config"]
        c = r.get("compute") or {}
        for mode, lim in r["limits"].items():
            e2e, ratio = m[f"e2e_{mode}"], r["ratios"].get(mode, {})
            busy = e2e.get("gpu_busy_fraction")
            lines.append(
                f"| {cfg['size']} | {mode} | {m[f'decode_limit_{mode}']['images_per_s']:.0f} "
                f"| {m['model_limit']['images_per_s']:.0f} | {lim['images_per_s']:.0f} "
                f"| {e2e.get('images_per_s', 0):.0f} | {ratio.get('e2e_over_limit')} "
                f"| {m['baseline']['images_per_s']:.1f} | {ratio.get('e2e_over_baseline')} "
                f"| {'' if busy is None else busy} "
                f"| {c.get('model_tflops', '')} ({c.get('fraction_of_peak', '')}) |")
    return "\n".join(lines)
