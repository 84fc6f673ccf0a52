#!/usr/bin/env bash
# The GPU check of issue 10, in one go (< 8 min on one H100): the CUDA tests, then `embedjob bench`
# on a random-weight ViT-L/14 in bf16 at two sizes (500x375 and ~1 MP) with both preprocessing paths,
# plus the decode scaling from 1 to all CPUs. Everything lands in OUTDIR: env.txt, pytest-cuda.txt,
# bench-<size>.{txt,json}, summary.md (the table for the README and the closing note).
#
#   scripts/gpu-check.sh OUTDIR
#   GPU_CHECK_DRY_RUN=1 scripts/gpu-check.sh OUTDIR   # the same steps on the CPU, tiny model, tiny
#                                                      # shards (tests/test_gpu_check.py runs this)
#
# Needs a Python with a CUDA build of torch and embedjob installed (the worker image, or
# scripts/setup.sh); -P everywhere, so the checkout's embedjob/ folder never shadows the install; torchvision for the fast path on the GPU (without it the bench says
# so and measures exact only). PYTHON overrides the interpreter.
set -euo pipefail
OUT=${1:?usage: scripts/gpu-check.sh OUTDIR}
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

if [ "${GPU_CHECK_DRY_RUN:-0}" = "1" ]; then
  DEVICE=cpu MODEL=tiny PRECISION=fp32 BATCH=16 COUNT=1 PER_SHARD=8 BASELINE=8
  DEV_IMAGES=2 DEV_MODEL=same MODEL_SECONDS=0.2
else
  DEVICE=cuda MODEL=vit-l14 PRECISION=bf16 BATCH=0 COUNT=8 PER_SHARD=1000 BASELINE=512
  DEV_IMAGES=64 DEV_MODEL=vit-l14 MODEL_SECONDS=5
  "$PY" -P -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: torch sees no CUDA device')"
fi

step() { printf '\n== %s (%s)\n' "$1" "$(date +%T)" >&2; }

step "environment"
{
  date -u; uptime; nproc
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" -P - <<'EOF'
import torch
from embedjob.worker.model.load import available_cpus
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
try:
    import torchvision
    print("torchvision", torchvision.__version__)
except ImportError:
    print("torchvision: not installed (the fast path on the GPU cannot run)")
print("usable CPUs", available_cpus())
EOF
} | tee "$OUT/env.txt"

step "CUDA tests"
# On the CPU they are skipped (and say so); the marker selects exactly them.
"$PY" -P -m pytest -q -rs -m cuda tests/test_cuda.py 2>&1 | tee "$OUT/pytest-cuda.txt"

for SIZE in 500x375 1mp; do
  step "bench $SIZE"
  EXTRA=()
  [ "$SIZE" = "500x375" ] && EXTRA+=(--decode-scaling)
  "$PY" -P -m embedjob.cli.main bench --device "$DEVICE" --model "$MODEL" --precision "$PRECISION" \
      --batch-size "$BATCH" --size "$SIZE" --count "$COUNT" --images-per-shard "$PER_SHARD" \
      --baseline-images "$BASELINE" --preprocessing both --deviation-images "$DEV_IMAGES" \
      --deviation-model "$DEV_MODEL" --model-seconds "$MODEL_SECONDS" "${EXTRA[@]}" \
      --json "$OUT/bench-$SIZE.json" | tee "$OUT/bench-$SIZE.txt"
done

step "bench 500x375, torch.compile reduce-overhead (CUDA graphs), exact"
# The compile's warm-up is printed on its own row and is inside the e2e seconds.
COMPILE=reduce-overhead
[ "${GPU_CHECK_DRY_RUN:-0}" = "1" ] && COMPILE=none
"$PY" -P -m embedjob.cli.main bench --device "$DEVICE" --model "$MODEL" --precision "$PRECISION" \
    --batch-size "$BATCH" --size 500x375 --count "$COUNT" --images-per-shard "$PER_SHARD" \
    --baseline-images "$BASELINE" --preprocessing exact --deviation-images 0 --compile "$COMPILE" \
    --model-seconds "$MODEL_SECONDS" --json "$OUT/bench-compiled.json" | tee "$OUT/bench-compiled.txt"

step "summary"
"$PY" -P - "$OUT" <<'EOF' | tee "$OUT/summary.md"
import json, sys
from pathlib import Path
from embedjob.bench.run import summary_markdown
out = Path(sys.argv[1])
reports = [json.loads((out / f"bench-{size}.json").read_text()) for size in ("500x375", "1mp")]
env = reports[0]["environment"]
print(f"{env['device_name']}, {env['cpus_available']} usable CPUs, torch {env['torch']}; "
      f"load average {env['load_average_start']}\n")
print(summary_markdown(reports))
for r in reports:
    d = r.get("deviation")
    if d:
        psnr = "identical crops" if d["psnr_db_min"] is None else f"PSNR min {d['psnr_db_min']} dB"
        print(f"\nfast vs exact at {r['config']['size']} ({d['fast_path']}, {d['images']} images): "
              f"{psnr}, mean |diff| {d['mean_abs_diff']}, cosine min {d['cosine_min']} ({d['model']})")
    s = r.get("decode_scaling")
    if s:
        print("\ndecode scaling (exact, " + r["config"]["size"] + "): "
              + ", ".join(f"{x['workers']}: {x['images_per_s']:.0f}/s" for x in s))
    for note in r.get("notes", []):
        print(f"\nnote: {note}")
EOF
echo "gpu-check: results in $OUT" >&2
