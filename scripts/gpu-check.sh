#!/usr/bin/env bash
# The GPU check (issues 10 and 15), in one go, under 8 minutes on one H200: the CUDA tests, then
# `embedjob bench` on a random-weight ViT-L/14 in bf16 with both preprocessing paths at 500x375
# (48 shards x 1,000 images per path, so that steady state dominates) and at ~1 MP (8 x 1,000), and
# the model limit with compile none, default, reduce-overhead and max-autotune.
#
# Every step runs even when an earlier one failed; each has a time limit (never past the overall
# budget, GPU_CHECK_BUDGET_S, default 420 s, plus 30 s for the summary), and a step the budget no longer allows is SKIPPED.
# At the end a table gives each step, its status and its seconds; the exit status is non-zero when
# any step did not pass. Everything lands in OUTDIR: env.txt, pytest-cuda.txt, bench-<size>.{txt,json},
# model-<compile>.{txt,json}, profile/profile-<mode>.txt, steps.{txt,json}, summary.md (the tables for the README and a closing note).
#
#   scripts/gpu-check.sh OUTDIR
#   GPU_CHECK_DRY_RUN=1 scripts/gpu-check.sh OUTDIR   # the same steps on the CPU, tiny model, tiny
#                                                      # shards, compile none only (tests/test_gpu_check.py)
#   GPU_CHECK_PROCESSES=N                              # the second e2e's worker processes per GPU (default 2)
#   GPU_CHECK_STEPS="cuda 500 procs profile compile 1mp"  # a subset of the steps (default these, in this order);
#                                                      # two device calls can split the check this way
#   GPU_CHECK_STEPS="... graphs"                       # not by default: the exact e2e at 500x375 with the forward
#                                                      # as CUDA graphs (compile reduce-overhead: one launch per
#                                                      # batch, so the forward thread needs the GIL once, not per op)
#
# Needs a Python with a CUDA build of torch and embedjob installed (the worker image, or
# scripts/setup.sh); -P everywhere, so the checkout's embedjob/ folder never shadows the install;
# torchvision for the fast path on the GPU (without it the bench says so and measures exact only).
# PYTHON overrides the interpreter.
set -uo pipefail  # no -e: a failing step is recorded, and the next one runs
OUT=${1:?usage: scripts/gpu-check.sh OUTDIR}
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PY OUT
BUDGET=${GPU_CHECK_BUDGET_S:-420}
PROCS=${GPU_CHECK_PROCESSES:-2}
STEPS=" ${GPU_CHECK_STEPS:-cuda 500 procs profile compile 1mp} "
wants() { [[ "$STEPS" == *" $1 "* ]]; }
STARTED=$(date +%s)

if [ "${GPU_CHECK_DRY_RUN:-0}" = "1" ]; then
  DEVICE=cpu MODEL=tiny PRECISION=fp32 BATCH=16 COUNT=1 PER_SHARD=8 COUNT_1MP=1 PER_SHARD_1MP=8
  BASELINE=8 DEV_IMAGES=2 DEV_MODEL=same MODEL_SECONDS=0.2 COMPILE_MODES="none" GRAPHS=none
else
  DEVICE=cuda MODEL=vit-l14 PRECISION=bf16 BATCH=0 COUNT=48 PER_SHARD=1000 COUNT_1MP=8 PER_SHARD_1MP=1000
  BASELINE=256 DEV_IMAGES=32 DEV_MODEL=vit-l14 MODEL_SECONDS=3
  COMPILE_MODES="none default reduce-overhead max-autotune" GRAPHS=reduce-overhead
  "$PY" -P -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: torch sees no CUDA device')" \
    || exit 2
fi

NAMES=() STATUSES=() SECONDS_TAKEN=() CODES=()
# run_step NAME LIMIT_S LOGFILE CMD...: runs CMD under `timeout`, its output to the terminal and LOGFILE.
run_step() {
  local name=$1 limit=$2 log=$3; shift 3
  local now left rc status t0
  now=$(date +%s); left=$((BUDGET - (now - STARTED)))
  printf '\n== %s (%s, limit %ss, %ss of the budget left)\n' "$name" "$(date +%T)" "$limit" "$left" >&2
  if [ "$left" -lt 15 ]; then
    NAMES+=("$name") STATUSES+=("SKIPPED (budget)") SECONDS_TAKEN+=(0) CODES+=(-1)
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  t0=$(date +%s)
  timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) status=ok ;;
    124|137) status="TIMEOUT (${limit}s)" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  NAMES+=("$name") STATUSES+=("$status") SECONDS_TAKEN+=($(($(date +%s) - t0))) CODES+=("$rc")
}

bench() {  # bench NAME LIMIT_S OUTNAME ARGS...
  local name=$1 limit=$2 out=$3; shift 3
  run_step "$name" "$limit" "$OUT/$out.txt" "$PY" -P -m embedjob.cli.main bench --device "$DEVICE" --model "$MODEL" \
    --precision "$PRECISION" --model-seconds "$MODEL_SECONDS" --json "$OUT/$out.json" "$@"
}

run_step "environment" 60 "$OUT/env.txt" bash -c '
  date -u; uptime; nproc
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" -P - <<EOF
import torch
from embedjob.worker.host import available_cpus
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
try:
    import torchvision
    print("torchvision", torchvision.__version__)
except ImportError:
    print("torchvision: not installed (the fast path on the GPU cannot run)")
print("usable CPUs", available_cpus())
EOF'

# On the CPU they are skipped (and say so); the marker selects exactly them.
wants cuda && run_step "CUDA tests" 150 "$OUT/pytest-cuda.txt" "$PY" -P -m pytest -q -rs -m cuda tests/test_cuda.py

# The biggest run first: it also makes the random ViT-L/14 (kept in the model cache) and tunes the batch.
wants 500 && bench "bench 500x375, ${COUNT} x ${PER_SHARD}, exact + fast" 270 bench-500x375 --size 500x375 \
  --count "$COUNT" --images-per-shard "$PER_SHARD" --batch-size "$BATCH" --baseline-images "$BASELINE" \
  --preprocessing both --deviation-images "$DEV_IMAGES" --deviation-model "$DEV_MODEL"

# The batch the 500x375 run tuned (or the fixed one): no tuning, and one compile, in the runs below.
TUNED=$("$PY" -P -c "import json,sys; print(json.load(open(sys.argv[1]))['measurements']['model_limit']['batch_size'])" \
  "$OUT/bench-500x375.json" 2>/dev/null) || TUNED=""
[ -n "$TUNED" ] || TUNED=$([ "$BATCH" = 0 ] && echo 256 || echo "$BATCH")

# The same e2e with PROCS worker processes sharing the GPU (each its own model and share of the CPUs).
wants procs && bench "e2e 500x375, ${COUNT} x ${PER_SHARD}, ${PROCS} processes per GPU" 150 "bench-500x375-p${PROCS}" \
  --size 500x375 --count "$COUNT" --images-per-shard "$PER_SHARD" --batch-size "$TUNED" --preprocessing both \
  --measure e2e --processes-per-gpu "$PROCS"

# Where the e2e's time goes: operators and kernels by device and CPU time, the CUDA syncs, every thread
# (torch.profiler over 2 shards, exact and fast; the main process's CPU by thread is in every e2e row).
wants profile && bench "e2e 500x375 under torch.profiler, 2 x ${PER_SHARD}" 90 "bench-profile" \
  --size 500x375 --count 2 --images-per-shard "$PER_SHARD" --batch-size "$TUNED" --preprocessing both \
  --measure e2e --profile "$OUT/profile"

# Whether the e2e cap is the forward thread's Python: the same e2e with the forward as CUDA graphs.
wants graphs && bench "e2e 500x375 exact, ${COUNT} x ${PER_SHARD}, compile ${GRAPHS}" 200 "bench-500x375-graphs" \
  --size 500x375 --count "$COUNT" --images-per-shard "$PER_SHARD" --batch-size "$TUNED" --preprocessing exact \
  --measure e2e --compile "$GRAPHS"

# max-autotune last: its autotuning takes what the budget leaves.
if wants compile; then
  for MODE in $COMPILE_MODES; do
    LIMIT=90
    [ "$MODE" = "none" ] && LIMIT=45
    [ "$MODE" = "max-autotune" ] && LIMIT=150
    bench "model limit, compile $MODE" "$LIMIT" "model-$MODE" --measure model_limit --compile "$MODE" \
      --batch-size "$TUNED"
  done
fi

wants 1mp && bench "bench 1mp, ${COUNT_1MP} x ${PER_SHARD_1MP}, exact + fast" 150 bench-1mp --size 1mp \
  --count "$COUNT_1MP" --images-per-shard "$PER_SHARD_1MP" --batch-size "$TUNED" --baseline-images "$BASELINE" \
  --preprocessing both --deviation-images "$DEV_IMAGES" --deviation-model "$DEV_MODEL"

BUDGET=$((BUDGET + 30))  # the summary always gets its turn
run_step "summary" 30 "$OUT/summary.md" "$PY" -P - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
from embedjob.bench.report import compile_markdown, summary_markdown
out = Path(sys.argv[1])
def load(name):
    try:
        return json.loads((out / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None
reports = [r for r in (load("bench-500x375"), load("bench-1mp")) if r and "limits" in r]
procs = [r for r in (load(p.stem) for p in sorted(out.glob("bench-500x375-p*.json"))) if r]
models = [r for r in (load(f"model-{m}") for m in ("none", "default", "reduce-overhead", "max-autotune")) if r]
if reports:
    env = reports[0]["environment"]
    print(f"{env['device_name']}, {env['cpus_available']} usable CPUs, torch {env['torch']}; "
          f"load average {env['load_average_start']}\n")
    print(summary_markdown(reports))
for r in procs:
    n = r["config"].get("processes_per_gpu")
    for key, m in sorted(r["measurements"].items()):
        if key.startswith("e2e_"):
            busy = round(m["model_busy_seconds"] / m["seconds"], 2) if m.get("seconds") else None
            print(f"\ne2e {key[4:]} at 500x375 with {n} processes per GPU: {m.get('images_per_s')} images/s "
                  f"(steady {m.get('steady_images_per_s')}, start-up {m.get('startup_seconds')} s, "
                  f"main CPU {m.get('main_cpu_ms_per_image')} ms/image, model busy {busy}, "
                  f"GPU MiB per process {m.get('gpu_memory_mib_per_process')})")
graphs = load("bench-500x375-graphs")
for key, m in sorted(((graphs or {}).get("measurements") or {}).items()):
    if key.startswith("e2e_"):
        print(f"\ne2e {key[4:]} at 500x375 with compile {graphs['config'].get('compile')} (the forward as one launch per "
              f"batch): {m.get('images_per_s')} images/s (steady {m.get('steady_images_per_s')}, start-up "
              f"{m.get('startup_seconds')} s, main CPU {m.get('main_cpu_ms_per_image')} ms/image)")
prof = load("bench-profile")
for mode, pr in sorted(((prof or {}).get("profiles") or {}).items()):
    print(f"\ne2e {mode} under torch.profiler ({pr.get('images')} images, {pr.get('seconds')} s): device busy "
          f"{pr.get('device_busy_fraction')}; tables in {pr.get('file')}")
if models:
    print("\nmodel limit by compile mode (uint8 batches, one thread warms up and runs):\n")
    print(compile_markdown(models))
for r in reports:
    d = r.get("deviation")
    if d:
        psnr = "identical crops" if d["psnr_db_min"] is None else f"PSNR min {d['psnr_db_min']} dB"
        print(f"\nfast vs exact at {r['config']['size']} ({d['fast_path']}, {d['images']} images): "
              f"{psnr}, mean |diff| {d['mean_abs_diff']}, cosine min {d['cosine_min']} ({d['model']})")
    for mode, lim in r["limits"].items():
        if lim.get("shares") == "the device's SMs":
            print(f"\n{r['config']['size']} {mode}: decode shares {lim['shares']} with the model: the limit is "
                  f"1/(1/decode + 1/model), not min(decode, model)")
    for note in r.get("notes", []):
        print(f"\nnote: {note}")
EOF

FAILED=0
{
  printf '\n## gpu-check steps (%s s in all)\n\n| step | status | seconds |\n|---|---|---|\n' "$(($(date +%s) - STARTED))"
  for i in "${!NAMES[@]}"; do
    printf '| %s | %s | %s |\n' "${NAMES[$i]}" "${STATUSES[$i]}" "${SECONDS_TAKEN[$i]}"
    [ "${CODES[$i]}" = 0 ] || FAILED=$((FAILED + 1))
  done
} > "$OUT/steps.txt"
"$PY" -P - "$OUT" "${#NAMES[@]}" "${NAMES[@]}" "${STATUSES[@]}" "${SECONDS_TAKEN[@]}" <<'EOF' 2>/dev/null || true
import json, sys
out, n = sys.argv[1], int(sys.argv[2])
names, statuses, secs = sys.argv[3:3 + n], sys.argv[3 + n:3 + 2 * n], sys.argv[3 + 2 * n:3 + 3 * n]
steps = [{"step": a, "status": b, "seconds": int(c)} for a, b, c in zip(names, statuses, secs)]
open(f"{out}/steps.json", "w").write(json.dumps(steps, indent=1))
EOF
cat "$OUT/steps.txt" >> "$OUT/summary.md"
cat "$OUT/steps.txt"
if [ "$FAILED" -gt 0 ]; then
  echo "gpu-check: $FAILED step(s) did not pass; results in $OUT" >&2
  exit 1
fi
echo "gpu-check: every step passed; results in $OUT" >&2
