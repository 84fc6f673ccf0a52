"""``embedjob bench``'s entry point: the configuration, a private Redis, and the run of every
measurement (what each one is: embedjob/bench/__init__.py)."""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from embedjob.bench import measure
from embedjob.bench.deviation import measure_deviation
from embedjob.bench.e2e import measure_e2e, profile_e2e
from embedjob.bench.monitor import load_average, max_rss_mib
from embedjob.bench.synth import SIZES, make_shards, synthetic_jpegs
from embedjob.contract import EmbedOptions
from embedjob.storage import Storage, StorageOptions, is_s3, join

MODELS = ("tiny", "vit-l14")
MEASUREMENTS = ("decode_limit", "model_limit", "baseline", "e2e")
POOL_KINDS = ("process", "thread")


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
    measure: tuple[str, ...] = MEASUREMENTS  # a subset: e.g. ("model_limit",) to compare compile modes
    decode_workers: int = 0  # 0: decode limit on every CPU the process may use, e2e with the job default
    decode_pool: str | None = None  # None: the worker's own; "thread" or "process" to compare
    processes_per_gpu: int = 1  # e2e: worker processes side by side on the device, decode CPUs shared
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
    shards_in_flight: int = 2  # e2e: shards at once in one worker process (embedjob worker's default)
    redis_url: str | None = None  # e2e: a Redis of the benchmark's own (bench() starts one); None: e2e skipped
    profile_dir: str | None = None  # one more e2e per mode under torch.profiler, its tables written here
    # ("image", "text"): e2e also with caption embeddings (spec.outputs), on the same shards and model,
    # and the text cost per image reported (report["text"]).
    outputs: tuple[str, ...] = ("image",)


@contextmanager
def private_redis() -> Iterator[str | None]:
    """A Redis of the bench's own on a free port, named in this process's settings (the task body
    reads its Redis from there), never the EMBEDJOB_REDIS_URL of a real deployment. Yields its URL,
    or None when no redis-server is installed (e2e is then skipped). The environment is restored."""
    if not shutil.which("redis-server"):
        yield None
        return
    from embedjob import settings
    from embedjob.dev.services import RedisServer

    # The private Redis has no password or TLS; the bench makes its own tasks (its workdir may be
    # local), so a deployment's password, CA and storage allow-list (e.g. in a worker pod) do not apply.
    names = ("EMBEDJOB_REDIS_URL", "EMBEDJOB_REDIS_PASSWORD", "EMBEDJOB_REDIS_USERNAME", "EMBEDJOB_REDIS_CA_FILE",
             "EMBEDJOB_STORAGE_ALLOW_LIST", "EMBEDJOB_ALLOW_LOCAL_PATHS")
    saved = {name: os.environ.get(name) for name in names}
    redis = RedisServer(Path(tempfile.mkdtemp(prefix="embedjob-bench-redis-"))).start()
    try:
        for name in names:
            os.environ.pop(name, None)
        os.environ["EMBEDJOB_REDIS_URL"] = redis.url
        os.environ["EMBEDJOB_ALLOW_LOCAL_PATHS"] = "true"
        settings.reload()
        yield redis.url
    finally:
        redis.stop()
        shutil.rmtree(redis.dir, ignore_errors=True)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        settings.reload()


def bench(cfg: BenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """``embedjob bench``: :func:`run_bench` with a private Redis for e2e (when e2e is measured)."""
    if "e2e" not in cfg.measure:
        return run_bench(cfg, log)
    with private_redis() as url:
        return run_bench(replace(cfg, redis_url=url), log)


def _check(cfg: BenchConfig) -> None:
    if cfg.model not in MODELS:
        raise ValueError(f"--model must be one of {', '.join(MODELS)}")
    if cfg.size not in SIZES:
        raise ValueError(f"--size must be one of {', '.join(SIZES)}")
    if cfg.decode_pool not in (None, *POOL_KINDS):
        raise ValueError(f"--decode-pool must be one of {', '.join(POOL_KINDS)}")
    unknown = set(cfg.measure) - set(MEASUREMENTS)
    if unknown or not cfg.measure:
        raise ValueError(f"--measure takes some of {', '.join(MEASUREMENTS)}")
    if cfg.processes_per_gpu < 1:
        raise ValueError("--processes-per-gpu must be at least 1")
    if cfg.outputs not in (("image",), ("image", "text")):
        raise ValueError("--outputs must be image or image,text")


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every measurement in ``cfg.measure``; returns the report (see embedjob.bench.report)."""
    from embedjob.worker.host import available_cpus
    from embedjob.worker.model.load import load_embedder, resolve_dtype
    from embedjob.worker.model.torch_env import resolve_device, torch

    _check(cfg)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.precision, device)
    workdir = Path(cfg.workdir or tempfile.mkdtemp(prefix="embedjob-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"config": {**asdict(cfg), "preprocessing": list(cfg.preprocessing),
                                         "measure": list(cfg.measure), "outputs": list(cfg.outputs)}}
    text = "text" in cfg.outputs
    wants = set(cfg.measure)
    try:
        storage_options = StorageOptions(endpoint=cfg.s3_endpoint)
        storage = Storage(storage_options)
        root = _storage_root(cfg, storage_options, workdir)
        shards: list[str] = []
        if wants & {"decode_limit", "baseline", "e2e"}:
            log(f"bench: writing {cfg.count} shards x {cfg.images_per_shard} images ({cfg.size}) under {root}")
            shards = make_shards(join(root, "shards"), storage, cfg.size, cfg.count, cfg.images_per_shard, cfg.seed,
                                 cfg.jpeg_quality)
        stems = [f"{i:05d}" for i in range(len(shards))]
        model_path = _model_dir(cfg.model, workdir, text=text)
        model = {"name": model_path.name, "revision": None, "path": str(model_path)}
        base = EmbedOptions(dtype="float16", batch_size=cfg.batch_size, precision=cfg.precision, device=cfg.device,
                            compile=cfg.compile, num_threads=cfg.decode_workers or EmbedOptions().num_threads,
                            overwrite=True)
        report["environment"] = {
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} CPUs",
            "cpus_available": available_cpus(), "torch_threads": torch.get_num_threads(),
            "load_average_start": load_average(), "torch": torch.__version__,
            "storage": "s3" if is_s3(root) else "local",
        }
        modes = _available_modes(cfg.preprocessing, device, report, log)
        runs: dict[str, list[dict[str, Any]]] = {}
        config = None
        for r in range(cfg.repeat):
            round_ = f" [round {r + 1}/{cfg.repeat}]" if cfg.repeat > 1 else ""
            for mode in modes if "decode_limit" in wants else ():
                log(f"bench: decode limit ({mode}){round_}")
                limit_options = replace(base, preprocessing=mode, num_threads=cfg.decode_workers or available_cpus())
                runs.setdefault(f"decode_limit_{mode}", []).append(measure.measure_decode(
                    shards, storage, limit_options, device, device_jpeg=(mode == "fast" and device.type == "cuda"),
                    pool_kind=cfg.decode_pool))
            if "model_limit" in wants:
                log(f"bench: model limit (compile {cfg.compile}){round_}")
                embedder = load_embedder(model, device=cfg.device, precision=cfg.precision, compile=cfg.compile)
                runs.setdefault("model_limit", []).append(measure.measure_model(embedder, cfg.batch_size,
                                                                                cfg.model_seconds))
                config = embedder.module.config if embedder.module is not None else None
                del embedder  # e2e loads its own, from a cold start
            if "baseline" in wants:
                log(f"bench: baseline ({min(cfg.baseline_images, cfg.count * cfg.images_per_shard)} images){round_}")
                runs.setdefault("baseline", []).append(
                    measure.measure_baseline(shards, storage, str(model_path), cfg.device, cfg.baseline_images))
                gc.collect()  # the baseline's model
            for mode in modes if "e2e" in wants else ():
                log(f"bench: embedjob e2e ({mode}, {cfg.processes_per_gpu} process(es)){round_}")
                runs.setdefault(f"e2e_{mode}", []).append(measure_e2e(
                    shards, stems, join(root, f"out-{mode}"), model, replace(base, preprocessing=mode),
                    storage_options, cfg.redis_url, cfg.shards_in_flight, processes=cfg.processes_per_gpu,
                    pool_kind=cfg.decode_pool, decode_cpus=cfg.decode_workers or available_cpus()))
                if text:
                    log(f"bench: embedjob e2e ({mode}, outputs image+text){round_}")
                    runs.setdefault(f"e2e_{mode}_text", []).append(measure_e2e(
                        shards, stems, join(root, f"out-{mode}-text"), model,
                        replace(base, preprocessing=mode, text=True), storage_options, cfg.redis_url,
                        cfg.shards_in_flight, processes=cfg.processes_per_gpu, pool_kind=cfg.decode_pool,
                        decode_cpus=cfg.decode_workers or available_cpus()))
        # On a machine shared with other work, the best of several rounds is the least disturbed one.
        m = report["measurements"] = {k: measure.best(v) for k, v in runs.items()}
        if text:
            report["text"] = text_cost(m, modes)
        if wants >= {"decode_limit", "model_limit", "baseline", "e2e"}:
            report["limits"], report["ratios"] = measure.limits_and_ratios(m, modes, device.type)
        if config is not None:
            log("bench: dense matmul peak")
            report["compute"] = measure.compute_section(config, m["model_limit"]["images_per_s"], device, dtype)
        if device.type == "cuda":
            for mode in modes:
                e2e = m.get(f"e2e_{mode}", {})
                if "seconds" in e2e:
                    e2e["gpu_busy_fraction"] = round(e2e["model_busy_seconds"] / e2e["seconds"], 3)
        if cfg.decode_scaling and shards:
            exact = replace(base, preprocessing="exact")
            report["decode_scaling"] = measure.measure_scaling(shards[:1], storage, exact, available_cpus(), log,
                                                               cfg.decode_pool)
        if cfg.profile_dir and shards:
            report["profiles"] = {}
            for mode in modes:
                log(f"bench: e2e ({mode}) under torch.profiler -> {cfg.profile_dir}")
                report["profiles"][mode] = profile_e2e(
                    Path(cfg.profile_dir) / f"profile-{mode}.txt", shards[:2], stems[:2],
                    join(root, f"out-profile-{mode}"), model, replace(base, preprocessing=mode), storage_options,
                    cfg.redis_url, cfg.shards_in_flight, device)
        if "fast" in modes and cfg.deviation_images > 0 and "decode_limit" in wants:
            log("bench: fast vs exact deviation")
            dev_model = model_path if cfg.deviation_model == "same" else _model_dir("vit-l14", workdir)
            datas = synthetic_jpegs(cfg.size, cfg.deviation_images, seed=cfg.seed + 7, quality=cfg.jpeg_quality)
            report["deviation"] = measure_deviation(datas, device, str(dev_model), "fp32")
        report["environment"]["load_average_end"] = load_average()
        report["environment"]["peak_rss_mib_main"] = round(max_rss_mib(), 1)
        return report
    finally:
        if cfg.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


def text_cost(m: dict[str, Any], modes: tuple[str, ...]) -> dict[str, Any]:
    """Image-only vs image+text e2e per preprocessing mode: what the captions cost per image, measured
    as the difference of the two runs' times per image and as the text tower's own time."""
    out: dict[str, Any] = {}
    for mode in modes:
        image, both = m.get(f"e2e_{mode}") or {}, m.get(f"e2e_{mode}_text") or {}
        if not image.get("images_per_s") or not both.get("images_per_s"):
            continue
        images = both["images"]
        out[mode] = {
            "image_only_images_per_s": image["images_per_s"],
            "image_text_images_per_s": both["images_per_s"],
            "text_ms_per_image": round(1000 * (1 / both["images_per_s"] - 1 / image["images_per_s"]), 3),
            "text_tower_ms_per_image": round(1000 * both.get("text_busy_seconds", 0.0) / images, 3) if images else None,
            "text_stage_ms_per_image": round(1000 * both["stage_seconds"].get("text", 0.0) / images, 3)
            if images else None,
            "slowdown": round(image["images_per_s"] / both["images_per_s"], 3),
        }
    return out


def _storage_root(cfg: BenchConfig, storage_options: StorageOptions, workdir: Path) -> str:
    if not cfg.s3_endpoint:
        return str(workdir)
    from embedjob.storage import s3_client

    client = s3_client(storage_options)
    try:
        client.create_bucket(Bucket=cfg.s3_bucket)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    return f"s3://{cfg.s3_bucket}/bench-{uuid.uuid4().hex[:8]}"


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
        return tuple(x for x in modes if x != "fast")
    return modes


def _model_dir(kind: str, workdir: Path, text: bool = False) -> Path:
    from transformers.utils import logging as hf_logging

    from embedjob.worker.model.load import default_model_dir
    from embedjob.worker.model.random_weights import (
        RANDOM_VIT_L14_DIRNAME,
        save_random_clip,
        save_random_text_clip,
        save_random_vit_l14,
    )

    hf_logging.disable_progress_bar()
    if kind == "tiny":  # with text outputs, a text tower that takes the real tokenizer's ids
        path = workdir / "models" / ("tiny-text" if text else "tiny")
        return path if (path / "config.json").exists() else (save_random_text_clip if text else save_random_clip)(path)
    # 1.2 GB and a minute to make: kept in the model cache for the next run.
    path = Path(default_model_dir()) / (RANDOM_VIT_L14_DIRNAME + ("-with-text" if text else ""))
    if not (path / "model.safetensors").exists():
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        save_random_vit_l14(tmp, text=text)
        tmp.rename(path)
    return path
