#!/usr/bin/env bash
# One prepared check of every CUDA path and the GPU numbers, written as ONE Markdown report.
#
#   scripts/gpu_check.sh [OUT_DIR] [--dry]
#
# OUT_DIR (default gpu_check_out/) receives gpu_report.md (written step by step, so a killed run still leaves
# it) and the raw logs tests.log, benchmark.log, data.log: four files. Steps, each in its own time box, in
# order of value; a failing or timed-out step is recorded and the script goes on:
#   1. environment   2. the `cuda`-marked tests   3. speed goals: Swin-T bf16 batch 128, ours vs timm vs official
#   (with a profile of the top kernels)   4. Swin-T/S/B x fp32 (TF32)/bf16/fp16, train and infer, eager
#   5. GPU JPEG decoding   6. input pipeline with GPU normalization   7. torch.compile of Swin-T bf16 (ours,
#   mode default)   8. the other model families, if models.build builds more than Swin v1   9. how long a
#   checkpoint save blocks training (background writer vs synchronous, Swin-B state).
# --dry: every step at toy size on the CPU (tests/test_gpu_check.py runs it); installs and downloads nothing.
#
# Environment: OFFICIAL_SWIN=path of the official models/swin_transformer.py (default:
#   shared/official_swin/swin_transformer.py when present); GPU_CHECK_BUDGET=seconds for all steps together
#   (default 570; each step's box is cut to what is left, later steps are skipped when it is spent).
# Expected: about 9.5 minutes on one H200 (measured there: 550 s for all steps but the last two, which take
#   about 40 s); needs requirements.txt + pytest (requirements-dev.txt).
set -u
cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)
OUT=gpu_check_out
DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry) DRY=1 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) OUT=$arg ;;
  esac
done
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 1
REPORT=$OUT/gpu_report.md
WORK=$(mktemp -d)  # JSON and profiles between steps (only a few files may come back from OUT_DIR)
trap 'rm -rf "$WORK"' EXIT
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-$([ "$DRY" = 1 ] && echo 3600 || echo 570)}
OFFICIAL=${OFFICIAL_SWIN:-}
if [ -z "$OFFICIAL" ] && [ -f shared/official_swin/swin_transformer.py ]; then
  OFFICIAL=$ROOT/shared/official_swin/swin_transformer.py
fi
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
STATUS=()  # "name|result|seconds" of every step, for the summary

say() { printf '%s\n' "$*" >> "$REPORT"; }

# run_step NAME BOX LOG CMD...: CMD in a time box (cut to the budget left), its output appended to LOG;
# the step's result is said in the report and kept for the summary; returns CMD's exit status.
run_step() {
  local name=$1 box=$2 log=$3
  shift 3
  [ "$DRY" = 1 ] && box=$(( box * 4 ))  # toy sizes, but a small shared CPU: compilation and the tests are slow
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if [ "$left" -lt 20 ]; then
    say "**$name: skipped** (the ${BUDGET} s budget is spent)"
    STATUS+=("$name|skipped: budget spent|0")
    return 99
  fi
  [ "$box" -gt "$left" ] && box=$left
  printf '\n===== %s (time box %s s): %s\n' "$name" "$box" "$*" >> "$log"
  local t0 rc result
  t0=$(date +%s)
  timeout -k 15 "$box" "$@" >> "$log" 2>&1
  rc=$?
  case $rc in
    0) result=ok ;;
    124|137) result="TIMED OUT after ${box} s" ;;
    *) result="FAILED (exit $rc)" ;;
  esac
  STATUS+=("$name|$result|$(( $(date +%s) - t0 ))")
  say "*$name: $result in $(( $(date +%s) - t0 )) s (log: $(basename "$log"))*"
  say ""
  return $rc
}

# the table of a benchmark JSON (partial after a time-out), or a note
bench_table() {
  if [ -s "$1" ]; then python scripts/gpu_report.py table "$1" >> "$REPORT" 2>> "$OUT/benchmark.log"
  else say "(no rows: see benchmark.log)"; fi
  say ""
}

if [ "$DRY" = 1 ]; then
  export SWIN_CUDA_TESTS_ON_CPU=1 CUDA_VISIBLE_DEVICES=""
  BENCH=(--device cpu --models toy --batch-size 2 --rounds 2 --iters 1 --warmup 1 --threads 2)
  GOALS=("${BENCH[@]}" --dtypes bf16 --profile 1)
  GRID=("${BENCH[@]}" --dtypes fp32,bf16)
  COMPILED=("${BENCH[@]}" --dtypes bf16 --modes train --compile both --columns ours --rounds 1)
  FAMILY=("${BENCH[@]}" --dtypes bf16 --modes train)
  DATA=(--device cpu --classes 2 --images-per-class 12 --batch-size 4 --batches 2 --warmup 1 --rounds 1 --workers 1)
  DECODE=(--device cpu --images 24 --batch-size 8 --rounds 1)
  CKPT=(--cfg configs/demo.yaml --device cpu --rounds 1)
  # the step's plumbing, with the quick CUDA tests: the demo trainings (95 of 125 s on 2 cores) are left to the GPU
  TESTS=(-k "not demo_run and not save_and_resume")
else
  BENCH=(--device cuda --models T --batch-size 128)
  GOALS=("${BENCH[@]}" --dtypes bf16 --rounds 7 --iters 10 --warmup 3 --profile 3)
  GRID=(--device cuda --models T,S,B --batch-size 128 --dtypes fp32,bf16,fp16 --tf32 --rounds 3 --iters 4 --warmup 2)
  COMPILED=("${BENCH[@]}" --dtypes bf16 --compile both --columns ours --rounds 3 --iters 10 --warmup 3)
  FAMILY=("${BENCH[@]}" --dtypes bf16 --rounds 3 --iters 5 --warmup 2)
  DATA=(--device cuda --classes 16 --images-per-class 40 --batch-size 32 --batches 8 --warmup 8 --rounds 2
        --workers 8 --val-fast-resize)
  DECODE=(--device cuda --images 512 --batch-size 128 --rounds 3)
  CKPT=(--cfg configs/swin_base.yaml --device cuda --rounds 3)
  TESTS=()
fi
OFFICIAL_ARGS=()
[ -n "$OFFICIAL" ] && OFFICIAL_ARGS=(--official "$OFFICIAL")

# ---------------------------------------------------------------------------------------------- report
: > "$REPORT"
: > "$OUT/tests.log"; : > "$OUT/benchmark.log"; : > "$OUT/data.log"
say "# GPU check report"
say ""
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD 2>/dev/null || COMMIT="$COMMIT (+ local changes, or no git)"
say "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $COMMIT; \`scripts/gpu_check.sh $*\`; mode: $([ "$DRY" = 1 ] && echo 'DRY (toy sizes on the CPU: the numbers mean nothing)' || echo GPU); budget ${BUDGET} s; official model: ${OFFICIAL:-not given (OFFICIAL_SWIN)}"
say ""
say "## Environment"
say ""
run_step environment 90 "$WORK/env.md" python scripts/gpu_report.py env
grep -v '^=====' "$WORK/env.md" | sed '/^$/d' >> "$REPORT"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm \
  --format=csv,noheader 2>/dev/null | sed 's/^/- nvidia-smi: /' >> "$REPORT"
say ""

say "## CUDA tests (\`pytest -m cuda tests\`)"
say ""
run_step "cuda tests" 270 "$OUT/tests.log" \
  python -m pytest -m cuda tests ${TESTS[@]+"${TESTS[@]}"} -v -rfEs -p no:cacheprovider --durations 8
say '```'
grep -E ' (PASSED|FAILED|ERROR|SKIPPED)|^(FAILED|ERROR|SKIPPED) |^=+ .*(passed|failed|error|skipped).* =+$' \
  "$OUT/tests.log" | cut -c1-220 >> "$REPORT"
say '```'
say ""

say "## Speed goals: Swin-T, bf16, batch 128, eager, ours vs timm vs official (same process, interleaved)"
say ""
run_step "benchmark goals" 150 "$OUT/benchmark.log" python scripts/benchmark.py "${GOALS[@]}" \
  ${OFFICIAL_ARGS[@]+"${OFFICIAL_ARGS[@]}"} --json "$WORK/goals.json" --profile-out "$WORK/profile.md"
bench_table "$WORK/goals.json"
if [ -s "$WORK/goals.json" ]; then
  python scripts/gpu_report.py goals "$WORK/goals.json" >> "$REPORT" 2>> "$OUT/benchmark.log"
  GOALS_RC=$?
  say ""
  if [ "$GOALS_RC" != 0 ] && [ -s "$WORK/profile.md" ]; then
    say "### A goal is missed: top kernels of each implementation (torch.profiler, train and infer)"
    cat "$WORK/profile.md" >> "$REPORT"
    say ""
  elif [ -s "$WORK/profile.md" ]; then
    say "(every goal met: the profile taken is in benchmark.log)"
    cat "$WORK/profile.md" >> "$OUT/benchmark.log"
  fi
fi

say "## Swin-T/S/B, fp32 (TF32) / bf16 / fp16, train and infer, eager, batch 128"
say ""
run_step "benchmark grid" 200 "$OUT/benchmark.log" python scripts/benchmark.py "${GRID[@]}" \
  ${OFFICIAL_ARGS[@]+"${OFFICIAL_ARGS[@]}"} --json "$WORK/grid.json"
bench_table "$WORK/grid.json"

say "## GPU JPEG decoding (DATA.GPU_DECODE)"
say ""
run_step "gpu decode" 90 "$OUT/data.log" python scripts/benchmark_decode.py "${DECODE[@]}" \
  --markdown "$WORK/decode.md"
[ -s "$WORK/decode.md" ] && cat "$WORK/decode.md" >> "$REPORT"
say ""

say "## Input pipeline with GPU normalization (scripts/benchmark_data.py)"
say ""
run_step "data pipeline" 120 "$OUT/data.log" python scripts/benchmark_data.py "${DATA[@]}"
say '```'
sed -n '/^===== data pipeline/,$p' "$OUT/data.log" | sed -n '/^pipeline/,$p' >> "$REPORT"
say '```'
say ""

say "## torch.compile (mode default): Swin-T bf16, ours, eager vs compiled"
say ""
run_step "benchmark compiled" 200 "$OUT/benchmark.log" python scripts/benchmark.py "${COMPILED[@]}" \
  --json "$WORK/compiled.json"
bench_table "$WORK/compiled.json"

say "## Other model families (every MODEL.TYPE models.build builds)"
say ""
FAMILIES=$(python -c "import sys; sys.path.insert(0, 'scripts'); import benchmark; \
print(','.join(f for f in benchmark.buildable_families() if f != 'swin'))" 2>> "$OUT/benchmark.log")
if [ -n "$FAMILIES" ]; then
  run_step "benchmark families" 120 "$OUT/benchmark.log" python scripts/benchmark.py "${FAMILY[@]}" \
    --families "$FAMILIES" ${OFFICIAL_ARGS[@]+"${OFFICIAL_ARGS[@]}"} --json "$WORK/families.json"
  bench_table "$WORK/families.json"
else
  say "Only Swin v1 is buildable in this checkout (families join this step as models.build learns them)."
  say ""
fi

say "## Checkpoint saves: training blocked, background writer vs synchronous (scripts/benchmark_checkpoint.py)"
say ""
run_step "checkpoint stall" 60 "$WORK/checkpoint.log" python scripts/benchmark_checkpoint.py "${CKPT[@]}"
say '```'
[ -s "$WORK/checkpoint.log" ] && grep -v '^=====' "$WORK/checkpoint.log" | sed '/^$/d' >> "$REPORT"
say '```'
say ""
cat "$WORK/checkpoint.log" >> "$OUT/benchmark.log" 2>/dev/null

say "## Summary"
say ""
say "| step | result | seconds |"
say "|---|---|---|"
for entry in ${STATUS[@]+"${STATUS[@]}"}; do
  IFS='|' read -r name result seconds <<< "$entry"
  say "| $name | $result | $seconds |"
done
say ""
say "Total: $(( $(date +%s) - START )) s. Raw logs: tests.log, benchmark.log, data.log."
echo "report: $REPORT"
