"""Main-process CPU ms per image in an end-to-end ``embed_shard`` run (the decode processes' CPU excluded).

    .venv/bin/python scripts/main_cpu_per_image.py [--size 500x375] [--shards 4] [--per-shard 1000]
        [--preprocessing exact] [--profile out.html]
    .venv/bin/python scripts/main_cpu_per_image.py --device-route [--jpeg-room BYTES] [--rounds 3]

A tiny random-weight CLIP keeps the model's cost small; the forward thread's (and torch's own
threads') CPU is reported apart, since on a GPU the forward is a launch, not a computation.

``--device-route``: the fast path on CUDA up to the device, which this machine lacks. The decode
processes check each JPEG's header and leave it encoded; the main process gets every batch and makes
the tensors nvJPEG is given, exactly as the engine's device-decode thread does, then stops. It prints
the main process's CPU per JPEG with the JPEG room of the batch slots (``--jpeg-room``: bytes per row,
default the worker's; the JPEGs stay in shared memory) and with none (0: they come back through the
pipes, as before the room), alternated ``--rounds`` times.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path


def thread_cpu() -> dict[str, float]:
    """CPU seconds of each thread of this process, summed by thread name."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir("/proc/self/task"):
        try:
            stat = Path(f"/proc/self/task/{tid}/stat").read_text()
            name = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def children_cpu() -> dict[int, float]:
    """CPU seconds of each child process (the decode pool: it lives across shards)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            pids = Path(f"/proc/self/task/{tid}/children").read_text().split()
        except OSError:
            continue
        for pid in pids:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            out[int(pid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="500x375")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--per-shard", type=int, default=1000)
    ap.add_argument("--preprocessing", default="exact")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--profile", default="")
    ap.add_argument("--device-route", action="store_true")
    ap.add_argument("--jpeg-room", type=int, default=-1)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if args.device_route:
        device_route(args)
        return

    try:
        from embedjob.bench.synth import make_shards
    except ImportError:  # a checkout from before the bench became a package (to measure "before")
        from embedjob.bench.run import make_shards  # type: ignore[no-redef]
    from embedjob.contract import EmbedOptions
    from embedjob.storage import Storage
    from embedjob.worker.datapath.engine import InferenceEngine
    from embedjob.worker.datapath.shard import embed_shard
    from embedjob.worker.model.load import load_embedder
    from embedjob.worker.model.random_weights import save_random_clip
    try:
        from embedjob.worker.model.torch_env import torch
    except ImportError:  # before the model package was split
        from embedjob.worker.model.load import torch  # type: ignore[no-redef]

    work = Path(tempfile.mkdtemp(prefix="embedjob-maincpu-"))
    storage = Storage()
    shards = make_shards(str(work / "in"), storage, args.size, args.shards + 1, args.per_shard)
    model = load_embedder(str(save_random_clip(work / "tiny")), device="cpu")
    torch.set_num_threads(1)  # the forward runs on the forward thread alone, so its CPU can be told apart
    forward_cpu = [0.0]
    run = InferenceEngine._run

    def timed_run(self: InferenceEngine) -> None:
        t = time.thread_time()
        try:
            run(self)
        finally:
            forward_cpu[0] += time.thread_time() - t

    InferenceEngine._run = timed_run  # type: ignore[method-assign]
    options = EmbedOptions(batch_size=args.batch_size, device="cpu", preprocessing=args.preprocessing)
    embed_shard(shards[0], str(work / "out"), model, options, stem="warm")  # pool started, buffers made

    profiler = None
    if args.profile:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.0005, async_mode="disabled")
    forward_cpu[0] = 0.0
    threads0 = thread_cpu()
    children0 = children_cpu()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    if profiler:
        profiler.start()
    images = 0
    for i, shard in enumerate(shards[1:]):
        images += embed_shard(shard, str(work / "out"), model, options, stem=f"s{i}").images
    if profiler:
        profiler.stop()
    seconds = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    children1 = children_cpu()
    decoders = sum(v - children0.get(k, 0.0) for k, v in children1.items())
    threads1 = thread_cpu()
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    per_thread = {k: v - threads0.get(k, 0.0) for k, v in threads1.items()}
    model_cpu = forward_cpu[0]
    user, system = r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime
    print(f"{images} images in {seconds:.2f} s ({images / seconds:.0f} img/s)")
    print(f"main process CPU: {1000 * cpu / images:.3f} ms/image total "
          f"(user {1000 * user / images:.3f}, sys {1000 * system / images:.3f})")
    print(f"  the decode processes: {1000 * decoders / images:.3f} ms/image")
    print(f"  forward thread (the model): {1000 * model_cpu / images:.3f} ms/image")
    print(f"MAIN PROCESS CPU WITHOUT THE MODEL: {1000 * (cpu - model_cpu) / images:.3f} ms/image")
    for k, v in sorted(per_thread.items(), key=lambda kv: -kv[1]):
        if v > 0.001:
            print(f"    persistent thread {k:20s} {1000 * v / images:.3f} ms/image")
    if profiler:
        Path(args.profile).write_text(profiler.output_html())
        print(profiler.output_text(unicode=False, color=False, show_all=False))


def device_route(args: argparse.Namespace) -> None:
    from embedjob.bench.synth import make_shards
    from embedjob.contract import EmbedOptions
    from embedjob.storage import Storage
    from embedjob.worker.datapath import batch as batch_module
    from embedjob.worker.datapath.decode_pool import DecodePool
    from embedjob.worker.datapath.gpu_decode import jpeg_tensor

    work = Path(tempfile.mkdtemp(prefix="embedjob-devroute-"))
    shards = make_shards(str(work), Storage(), args.size, args.shards, args.per_shard)
    pool = DecodePool(os.cpu_count() or 1)
    pool.warm_up()
    options = EmbedOptions(batch_size=args.batch_size, preprocessing="fast")
    room = batch_module.JPEG_ROOM_PER_ROW if args.jpeg_room < 0 else args.jpeg_room

    def run(per_row: int) -> tuple[int, float, float]:
        batch_module.JPEG_ROOM_PER_ROW = per_row
        jpegs = 0
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for shard in shards:
            with batch_module.PreparedStream(shard, Storage(), pool, options, device_jpeg=True) as stream:
                for b in stream.batches():
                    tensors = [jpeg_tensor(j.data) for j in b.jpegs.values()]  # what nvjpeg_decoder hands nvJPEG
                    jpegs += len(tensors)
                    stream.release(b.slot)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        return jpegs, 1000 * cpu / max(jpegs, 1), jpegs / (time.perf_counter() - t0)

    try:
        for _ in range(args.rounds):
            for per_row in (0, room):
                n, ms, rate = run(per_row)
                label = "through the pipes (room 0)" if per_row == 0 else f"JPEG room {per_row} B/row"
                print(f"{label:30s} {n} JPEGs  main process {ms:.4f} ms/JPEG  {rate:,.0f} JPEGs/s", flush=True)
    finally:
        pool.shutdown()


if __name__ == "__main__":
    main()
