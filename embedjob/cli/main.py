"""The ``embedjob`` command line.

    embedjob run job.yaml [--workers N]     run an EmbeddingJob on this machine (no cluster)
    embedjob demo                           the README's end-to-end run on the bundled sample shards
    embedjob validate job.yaml              check a job file, naming the bad field, and that its model loads here
    embedjob model fetch [NAME]             fill the model cache (or a folder) ahead of an offline job
    embedjob worker [--queue Q]             a Celery worker for the operator's tasks
    embedjob bench [--size 1mp ...]         throughput vs the decode/model limits and a baseline
    embedjob report OUTPUT [--html F]       one self-contained HTML page about a job's output
    embedjob filter OUTPUT --where E --keys F   the keys of the rows whose metadata satisfies E
    embedjob operator                       the Kubernetes operator
    embedjob dev up|down|status|restart ... the local dev stack (embedjob.dev)
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from embedjob import __version__
from embedjob.bundled import sample_shards, sample_shards_dir
from embedjob.dev.cli import add_commands as add_dev_commands
from embedjob.operator.cli import add_commands as add_operator_commands
from embedjob.spec import DEFAULT_REVISION, Job, SpecError, load_job_file, parse_job

if TYPE_CHECKING:
    from embedjob.storage import Storage

# Worker modules (torch, transformers) are imported inside the commands that run them, so the CLI and
# the operator image stay torch-free (tests/test_packaging.py).
VIT_L14 = "openai/clip-vit-large-patch14"


def _load_job(path: str) -> Job | None:
    """The validated job, or None after printing the error (naming the field)."""
    try:
        return load_job_file(path)
    except SpecError as e:
        print(f"error: invalid job file {path}: {e}", file=sys.stderr)
        return None


# Exit codes of run / validate / demo: 0 succeeded, 1 shards failed (more than maxFailedShards),
# 2 bad job file, 3 the model cannot be loaded here (not in the cache, hub unreachable, not a CLIP).
EXIT_MODEL_UNAVAILABLE = 3


def _cmd_validate(args: argparse.Namespace) -> int:
    job = _load_job(args.job)
    if job is None:
        return 2
    print(f"{args.job}: valid EmbeddingJob {job.name!r}")
    if args.no_model_check:
        return 0
    from dataclasses import asdict

    try:
        from embedjob.cli.run import check_model
        from embedjob.worker.model.resolve import ModelUnavailable
    except ImportError as e:  # an install without the worker extra (the operator's) cannot load models
        print(f"model: not checked ({e.name} is not installed here)")
        return 0
    try:
        print(f"model: {check_model(asdict(job.spec.model))}")
    except ModelUnavailable as e:
        print(f"error: the model cannot be loaded here: {e}", file=sys.stderr)
        return EXIT_MODEL_UNAVAILABLE
    return 0


def _run(job: Job, workers: int | None, progress: bool, extra: dict | None = None,
         processes_per_gpu: int = 1, retry_truncated: bool = False) -> int:
    from embedjob.cli.run import format_summary, run_job
    from embedjob.worker.model.resolve import ModelUnavailable

    try:
        summary = run_job(job, workers=workers, show_progress=progress, extra_manifest=extra,
                          processes_per_gpu=processes_per_gpu, retry_truncated=retry_truncated)
    except SpecError as e:  # includes PlanError
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ModelUnavailable as e:
        print(f"error: the model cannot be loaded here: {e}", file=sys.stderr)
        return EXIT_MODEL_UNAVAILABLE
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; rerun to resume", file=sys.stderr)
        return 130
    print(format_summary(summary, job.spec.output.uri))
    return 0 if summary.ok else 1


def _cmd_run(args: argparse.Namespace) -> int:
    job = _load_job(args.job)
    if job is None:
        return 2
    if args.overwrite:
        job = replace(job, spec=replace(job.spec, output=replace(job.spec.output, overwrite=True)))
    if args.processes_per_gpu < 1:
        print("error: --processes-per-gpu must be at least 1", file=sys.stderr)
        return 2
    return _run(job, args.workers, not args.no_progress, processes_per_gpu=args.processes_per_gpu,
                retry_truncated=args.retry_truncated)


def _vit_l14_available() -> str | None:
    """None when ViT-L/14 can be loaded (model cache or hub), else the reason it cannot."""
    from transformers import CLIPVisionConfig

    from embedjob.worker.model.load import default_model_dir

    try:
        CLIPVisionConfig.from_pretrained(VIT_L14, revision=DEFAULT_REVISION, cache_dir=default_model_dir(),
                                         local_files_only=True)
        return None
    except OSError:
        pass
    from embedjob.worker.model.resolve import hub_offline, hub_reachable

    if hub_offline() or not hub_reachable():
        return "not in the model cache, and the Hugging Face hub is unreachable"
    try:
        CLIPVisionConfig.from_pretrained(VIT_L14, revision=DEFAULT_REVISION, cache_dir=default_model_dir())
        return None
    except Exception as e:  # noqa: BLE001 - hub down, auth, ...: all mean "not available"
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


def _cmd_demo(args: argparse.Namespace) -> int:
    """Sample shards in, embeddings out, on this machine: ViT-L/14 when its weights can be loaded,
    otherwise (offline) a small random-weight CLIP, said plainly and recorded in the output."""
    try:
        if not sample_shards():
            raise FileNotFoundError("no .tar in the package data embedjob.sample_shards")
    except (FileNotFoundError, ModuleNotFoundError) as e:
        print(f"error: the sample shards are missing from this installation: {e}", file=sys.stderr)
        return 2
    output = str(Path(args.output).resolve())
    model: dict = {"name": VIT_L14}
    extra: dict = {"demo": True}
    reason = _vit_l14_available()
    if reason is None:
        print(f"demo: using {VIT_L14} (real weights)")
    else:
        from embedjob.worker.model.load import default_model_dir
        from embedjob.worker.model.random_weights import RANDOM_MODEL_DIRNAME, save_random_clip

        path = Path(default_model_dir()) / RANDOM_MODEL_DIRNAME
        if not (path / "config.json").exists():
            save_random_clip(path)
        print(
            f"demo: {VIT_L14} weights cannot be loaded here ({reason}).\n"
            f"demo: running the whole pipeline with a small RANDOM-WEIGHT CLIP instead ({path}).\n"
            "demo: these embeddings are NOT meaningful; the output's manifests say so.",
        )
        model = {"path": str(path)}
        extra.update(randomWeights=True, note=f"RANDOM-WEIGHT test model, not {VIT_L14}: embeddings are meaningless")
    doc = {
        "apiVersion": "embedjob.io/v1alpha1",
        "kind": "EmbeddingJob",
        "metadata": {"name": "demo"},
        "spec": {
            "input": {"uri": str(sample_shards_dir()) + "/"},
            "output": {"uri": output, "dtype": "float16", "overwrite": True},
            "model": model,
            "inference": {"precision": "auto"},
        },
    }
    rc = _run(parse_job(doc), args.workers, not args.no_progress, extra)
    if rc == 0:
        print(f"read it back: {sys.executable} -c \"import embedjob; "
              f"k, e = embedjob.read_embeddings('{output}'); print(len(k), e.shape)\"")
    return rc


def _cmd_model_fetch(args: argparse.Namespace) -> int:
    """Fill the model cache (or a folder for spec.model.path, e.g. a PVC) ahead of a job, so workers
    and ``embedjob run`` load it with no hub (HF_HUB_OFFLINE=1)."""
    from embedjob.settings import load as load_settings
    from embedjob.worker.model.resolve import fetch_model, hub_endpoint, hub_offline, hub_reachable

    revision = args.revision or (DEFAULT_REVISION if args.name == VIT_L14 else None)
    cache_dir = args.cache_dir or load_settings().model_dir
    if hub_offline() or not hub_reachable():
        why = "HF_HUB_OFFLINE is set" if hub_offline() else f"the hub ({hub_endpoint()}) cannot be reached"
        print(f"error: cannot fetch {args.name}: {why}. Run `embedjob model fetch` where the hub is reachable, "
              "then copy the folder (--to DIR) or the model cache (EMBEDJOB_MODEL_DIR) here", file=sys.stderr)
        return EXIT_MODEL_UNAVAILABLE
    try:
        folder = fetch_model(args.name, revision, cache_dir=cache_dir, to=args.to)
    except Exception as e:  # noqa: BLE001 - not found, no access, network: one message
        print(f"error: cannot fetch {args.name}: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_MODEL_UNAVAILABLE
    if args.to:
        print(f"fetched {args.name} into {folder}: use `model: {{path: {folder}}}` in the job")
    else:
        print(f"fetched {args.name} into the model cache {cache_dir} ({folder}): jobs with `model: {{name: "
              f"{args.name}}}` load it from there, also with HF_HUB_OFFLINE=1")
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    from embedjob.procs import FolderInUse
    from embedjob.settings import load
    from embedjob.worker.runtime import lifecycle, multiproc

    settings = load()
    try:
        if settings.metrics_port:
            # Before prometheus_client is imported (by the tasks module) and before the pool forks.
            multiproc.prepare(settings.metrics_dir)
        # Shared with the pool children (forked later): shutdown deadline, probes, GPU and CPU pinning.
        lifecycle.prepare(settings.health_dir, processes=1)
    except FolderInUse as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.gpus < 1 or args.processes_per_gpu < 1:
        print("error: --gpus and --processes-per-gpu must be at least 1", file=sys.stderr)
        return 2
    pinned = args.gpus * args.processes_per_gpu
    if pinned > 1:
        if args.concurrency not in (1, pinned):
            print(f"error: --gpus {args.gpus} x --processes-per-gpu {args.processes_per_gpu} runs {pinned} "
                  "processes; leave --concurrency out", file=sys.stderr)
            return 2
        args.concurrency, args.shards_in_flight = pinned, 1
    if args.concurrency > 1 and args.shards_in_flight > 1:
        print("error: --shards-in-flight > 1 runs in one process; use it with --concurrency 1", file=sys.stderr)
        return 2
    processes = args.concurrency if args.concurrency > 1 else 0
    lifecycle.expect_processes(max(processes, 1))
    lifecycle.configure_pool(processes, pin_gpus=pinned > 1, visible=os.environ.get("CUDA_VISIBLE_DEVICES"),
                             per_gpu=args.processes_per_gpu,
                             cpus=sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None)
    if settings.health_port:  # up from the start: live while connecting, ready once the model is loaded
        lifecycle.serve(settings.health_port, settings.metrics_addr, settings.stall_seconds)
    from embedjob.worker.runtime.task import app

    if args.concurrency > 1:  # several processes (per GPU: --processes-per-gpu), one shard each
        pool = ["-P", "prefork", "-c", str(args.concurrency)]
    else:
        # One process, one model, one decode pool, several shards in flight as threads: while one shard
        # finishes and uploads, the next one is already decoding, and the GPU never waits for a shard.
        pool = ["-P", "threads", "-c", str(args.shards_in_flight)]
    argv = ["worker", "-Q", args.queue, *pool, "--loglevel", args.loglevel,
            "-n", args.hostname, "--without-gossip", "--without-mingle", "--prefetch-multiplier", "1"]
    app.worker_main(argv)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from embedjob.bench import BenchConfig, bench, format_report, write_json

    modes = ("exact", "fast") if args.preprocessing == "both" else (args.preprocessing,)
    cfg = BenchConfig(
        model=args.model, size=args.size, count=args.count, images_per_shard=args.images_per_shard,
        device=args.device, precision=args.precision, batch_size=args.batch_size, preprocessing=modes,
        compile=args.compile, measure=tuple(x.strip() for x in args.measure.split(",") if x.strip()),
        decode_workers=args.decode_workers, decode_pool=args.decode_pool, processes_per_gpu=args.processes_per_gpu,
        s3_endpoint=args.s3_endpoint, s3_bucket=args.s3_bucket, workdir=args.workdir,
        baseline_images=args.baseline_images, model_seconds=args.model_seconds,
        deviation_images=args.deviation_images, deviation_model=args.deviation_model, repeat=args.repeat,
        decode_scaling=args.decode_scaling, shards_in_flight=args.shards_in_flight, profile_dir=args.profile,
        outputs=tuple(x.strip() for x in args.outputs.split(",") if x.strip()),
    )
    try:
        # e2e gets a private Redis of the bench's own (embedjob.bench.entry), never a deployment's.
        report = bench(cfg, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        write_json(report, args.json)
    return 0


def _output_storage(args: argparse.Namespace) -> Storage:
    from embedjob.storage import Storage, StorageOptions

    return Storage(StorageOptions(endpoint=args.endpoint, region=args.region))


def _cmd_report(args: argparse.Namespace) -> int:
    from embedjob.report import build_report
    from embedjob.results import TooManyManifests

    try:
        page = build_report(args.output, _output_storage(args))
    except (FileNotFoundError, TooManyManifests) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    Path(args.html).write_text(page)
    print(f"{args.html}: report of {args.output} ({len(page) // 1024} KiB, self-contained)")
    return 0


def _cmd_filter(args: argparse.Namespace) -> int:
    from embedjob.results import TooManyManifests
    from embedjob.where import WhereError, write_kept

    try:
        rows = write_kept(args.output, args.where, args.keys, _output_storage(args))
    except WhereError as e:
        print(f"error: --where: {e}", file=sys.stderr)
        return 2
    except TooManyManifests as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.keys}: {rows} keys where {args.where}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="embedjob", description="CLIP image embeddings for WebDataset shards.")
    p.add_argument("--version", action="version", version=f"embedjob {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run an EmbeddingJob on this machine")
    r.add_argument("job", help="EmbeddingJob YAML file")
    r.add_argument("--workers", type=int, default=None,
                   help="local worker processes (default: GPUs x --processes-per-gpu, or 1 on the CPU)")
    r.add_argument("--processes-per-gpu", type=int, default=1,
                   help="worker processes per GPU, each with its own model and share of the CPUs (default 1)")
    r.add_argument("--overwrite", action="store_true", help="redo shards that are already done")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--retry-truncated", action="store_true",
                   help="also redo finished shards whose tar was truncated or partly unreadable")
    r.set_defaults(func=_cmd_run)

    d = sub.add_parser("demo", help="embed the bundled sample shards end to end")
    d.add_argument("--output", default="out/demo", help="output folder (default: out/demo)")
    d.add_argument("--workers", type=int, default=None)
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=_cmd_demo)

    v = sub.add_parser("validate", help="validate a job file, and check that its model can be loaded here")
    v.add_argument("job")
    v.add_argument("--no-model-check", action="store_true",
                   help="check the file only (not whether the model is in the cache, a folder or on a reachable hub)")
    v.set_defaults(func=_cmd_validate)

    m = sub.add_parser("model", help="models ahead of a job (offline machines, PVCs)")
    msub = m.add_subparsers(dest="model_command", required=True)
    mf = msub.add_parser("fetch", help="download a model's config and safetensors weights into the model cache "
                                       "(EMBEDJOB_MODEL_DIR) or a folder")
    mf.add_argument("name", nargs="?", default=VIT_L14, help=f"Hugging Face id (default {VIT_L14})")
    mf.add_argument("--revision", default=None, help="hub revision (default: the pinned one for the default model)")
    mf.add_argument("--cache-dir", default=None, help="the model cache to fill (default: EMBEDJOB_MODEL_DIR)")
    mf.add_argument("--to", default=None, metavar="DIR",
                    help="a plain folder instead of the cache (then spec.model.path: DIR), e.g. a mounted PVC")
    mf.set_defaults(func=_cmd_model_fetch)

    w = sub.add_parser("worker", help="start a Celery worker (broker: EMBEDJOB_REDIS_URL)")
    w.add_argument("--queue", default="embedjob")
    w.add_argument("--concurrency", type=int, default=1, help="processes, one shard each (no GPU pinning)")
    w.add_argument("--gpus", type=int, default=1,
                   help="GPUs of this worker: N > 1 runs N processes, process i pinned to GPU i (default 1)")
    w.add_argument("--processes-per-gpu", type=int, default=1,
                   help="worker processes per GPU, each with its own model and its share of the CPUs for decoding, "
                        "one shard each (default 1); more than 1 keeps the GPU busy while one process is on the CPU")
    w.add_argument("--shards-in-flight", type=int, default=2,
                   help="shards one process works on at once, sharing its model and decode workers (default 2)")
    w.add_argument("--loglevel", default="info")
    w.add_argument("--hostname", default="embedjob@%h")
    w.set_defaults(func=_cmd_worker)

    b = sub.add_parser("bench", help="throughput against the decode and model limits and a baseline, one run",
                       description="Generates its own shards, then measures the decode limit, the model limit, "
                                   "the Hugging Face baseline and the real worker path (see the README).")
    b.add_argument("--model", choices=["tiny", "vit-l14"], default="tiny", help="random-weight model (default tiny)")
    b.add_argument("--size", choices=["256", "500x375", "1mp", "mix"], default="500x375", help="image size")
    b.add_argument("--count", type=int, default=4, help="shards (default 4)")
    b.add_argument("--images-per-shard", type=int, default=500)
    b.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    b.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    b.add_argument("--batch-size", type=int, default=0, help="0 (default): tuned on the device, as in a job")
    b.add_argument("--compile", choices=["none", "default", "reduce-overhead", "max-autotune"], default="none",
                   help="torch.compile mode (spec.inference.compile) of the model limit and e2e; the warm-up "
                        "is reported on its own row")
    b.add_argument("--preprocessing", choices=["exact", "fast", "both"], default="exact")
    b.add_argument("--decode-workers", type=int, default=0,
                   help="decode workers (default: every usable CPU for the decode limit, the job default for e2e)")
    b.add_argument("--decode-pool", choices=["process", "thread"], default=None,
                   help="decode in processes or threads (default: the worker's own choice)")
    b.add_argument("--s3-endpoint", default=None, help="put the shards and outputs on this S3 endpoint "
                   "(credentials from the environment) instead of local disk")
    b.add_argument("--s3-bucket", default="embedjob-bench")
    b.add_argument("--workdir", default=None, help="keep shards, models and outputs here (default: a temp dir)")
    b.add_argument("--baseline-images", type=int, default=512, help="images the (slow) baseline embeds")
    b.add_argument("--model-seconds", type=float, default=3.0, help="minimum time of the model-limit loop")
    b.add_argument("--deviation-images", type=int, default=8, help="images compared fast vs exact (0: skip)")
    b.add_argument("--deviation-model", choices=["vit-l14", "same"], default="vit-l14",
                   help="model for the fast-vs-exact cosine (same: the --model)")
    b.add_argument("--repeat", type=int, default=1,
                   help="rounds of every measurement, each reporting its best (a machine shared with other work)")
    b.add_argument("--shards-in-flight", type=int, default=2,
                   help="e2e: shards at once in one process, as embedjob worker runs them (default 2)")
    b.add_argument("--processes-per-gpu", type=int, default=1, metavar="N",
                   help="e2e: N worker processes side by side on the device, each with its own model and "
                        "1/N of the decode CPUs (default 1: the bench's own process)")
    b.add_argument("--measure", default="decode_limit,model_limit,baseline,e2e",
                   help="comma list of the measurements to run (default all; e.g. model_limit to compare "
                        "--compile modes)")
    b.add_argument("--decode-scaling", action="store_true",
                   help="also the exact decode limit on 1, 2, 4 ... all usable CPUs (first shard)")
    b.add_argument("--profile", default=None, metavar="DIR",
                   help="after the measurements, one more e2e per mode (first 2 shards) under torch.profiler: "
                        "DIR/profile-<mode>.txt, the operators and kernels by self CPU and device time")
    b.add_argument("--outputs", default="image",
                   help="image (default) or image,text: e2e also with caption embeddings (spec.outputs) on the "
                        "same shards and model, and the text cost per image")
    b.add_argument("--json", default=None, metavar="OUT", help="also write the report as JSON")
    b.set_defaults(func=_cmd_bench)

    rp = sub.add_parser("report", help="one self-contained HTML page about a job's output: totals, score "
                                       "histograms with a threshold slider, thumbnails at the score quantiles")
    rp.add_argument("output", help="the job's output (s3:// URI or local folder)")
    rp.add_argument("--html", default="report.html", help="where to write the page (default: report.html)")
    fl = sub.add_parser("filter", help="write the keys of the rows whose metadata satisfies an expression")
    fl.add_argument("output", help="the job's output (s3:// URI or local folder)")
    fl.add_argument("--where", required=True, help='e.g. "aesthetic >= 5.5 and nsfw < 0.1" (and, or, not, '
                                                   "parentheses; < <= > >= == != against metadata columns)")
    fl.add_argument("--keys", required=True, help="the parquet file to write: key, shard, member, stem, row")
    for cmd, func in ((rp, _cmd_report), (fl, _cmd_filter)):
        cmd.add_argument("--endpoint", default=None, help="S3 endpoint (default: the environment's)")
        cmd.add_argument("--region", default=None)
        cmd.set_defaults(func=func)

    add_operator_commands(sub)
    add_dev_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from embedjob import logs
    from embedjob.settings import Settings

    try:
        log_format = Settings.from_env().log_format
    except ValueError:
        log_format = "text"  # the bad setting is reported where the command loads its settings
    logs.configure(os.environ.get("EMBEDJOB_LOGLEVEL", "WARNING"), log_format)
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
