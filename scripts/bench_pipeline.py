#!/usr/bin/env python
"""Throughput benchmark: embed_shard's threaded pipeline vs a naive sequential loop, same shard,
same model, same machine, same run. Prints images/s for both and the speed-up.

    .venv/bin/python scripts/bench_pipeline.py                       # tiny random CLIP: pipeline overhead
    .venv/bin/python scripts/bench_pipeline.py --model vit-l14 -n 32  # random-weight ViT-L/14: real compute cost

The baseline is what one would write first: for each image in the tar, decode, reference
preprocess, and run the model on batches, all in one thread. The pipeline overlaps the tar read,
decode + preprocess (``--threads``) and inference through bounded queues.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import sys
import tarfile
import tempfile
import time
from pathlib import Path

# For tests/ helpers. Appended, not prepended: the repository's embedjob/ folder must not shadow the
# installed package (embedjob.operator / embedjob.worker exist only there).
sys.path.append(str(Path(__file__).resolve().parents[1]))


def make_shard(path: Path, n: int) -> None:
    from tests.shards import encode, rgb, tar_bytes

    members = []
    for i in range(n):
        w, h = 500 + (i * 37) % 300, 375 + (i * 23) % 200  # LAION-like sizes
        members.append((f"{i:06d}.jpg", encode(rgb(w, h, seed=i), "JPEG", quality=90)))
    path.write_bytes(tar_bytes(members))


def model_dir(kind: str, root: Path) -> Path:
    from transformers import CLIPConfig, CLIPModel

    from embedjob.worker.random_model import save_random_clip

    if kind == "tiny":
        return save_random_clip(root / "tiny")
    # ViT-L/14's vision tower shape with random weights: the real compute cost, no download.
    cfg = CLIPConfig(
        vision_config={"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                       "num_attention_heads": 16, "image_size": 224, "patch_size": 14},
        text_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "vocab_size": 1000, "bos_token_id": 0, "eos_token_id": 1,
                     "pad_token_id": 1},
        projection_dim=768,
    )
    CLIPModel(cfg).save_pretrained(root / "vitl14")
    return root / "vitl14"


def baseline(shard: Path, embedder, batch_size: int) -> tuple[int, float]:  # noqa: ANN001
    import torch
    from PIL import Image

    from embedjob.worker.preprocess import preprocess

    t0 = time.perf_counter()
    rows, batch = 0, []
    with tarfile.open(shard) as tar:
        for m in tar:
            img = Image.open(io.BytesIO(tar.extractfile(m).read()))
            img.load()
            batch.append(preprocess(img))
            if len(batch) == batch_size:
                rows += embedder.embed(torch.stack(batch)).shape[0]
                batch = []
    if batch:
        rows += embedder.embed(torch.stack(batch)).shape[0]
    return rows, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["tiny", "vit-l14"], default="tiny")
    ap.add_argument("-n", type=int, default=512, help="images in the shard")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()

    from embedjob.contract import EmbedOptions
    from embedjob.worker.model import load_embedder
    from embedjob.worker.pipeline import embed_shard

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shard = root / "bench.tar"
        make_shard(shard, args.n)
        embedder = load_embedder({"path": str(model_dir(args.model, root))}, device="auto", precision="auto")
        opts = EmbedOptions(dtype="float16", batch_size=args.batch_size, num_threads=args.threads, overwrite=True)
        embed_shard(str(shard), str(root / "warm"), embedder, opts)  # warm-up
        runs: dict[str, list[float]] = {"baseline": [], "pipeline": []}
        for _ in range(args.repeat):
            rows, secs = baseline(shard, embedder, args.batch_size)
            runs["baseline"].append(rows / secs)
            t0 = time.perf_counter()
            r = embed_shard(str(shard), str(root / "out"), embedder, opts)
            runs["pipeline"].append(r.images / (time.perf_counter() - t0))
            if not r.images == rows == args.n:
                raise SystemExit(f"row mismatch: pipeline {r.images}, baseline {rows}, expected {args.n}")
        best = {k: max(v) for k, v in runs.items()}
        print(json.dumps({
            "model": args.model, "images": args.n, "batch_size": args.batch_size, "threads": args.threads,
            "device": str(embedder.device), "precision": embedder.precision,
            "baseline_images_per_s": round(best["baseline"], 2),
            "pipeline_images_per_s": round(best["pipeline"], 2),
            "speedup": round(best["pipeline"] / best["baseline"], 2),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "runs": {k: [round(x, 2) for x in v] for k, v in runs.items()},
        }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
