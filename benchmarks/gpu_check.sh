#!/usr/bin/env bash
# One prepared GPU check (< 8 min on one H100/H200-class GPU): bf16 train steps at 128 and 256 px,
# width 64, eager vs compiled vs channels_last; the largest per-GPU batch at 256 px with and
# without activation checkpointing; MFU against a bf16 GEMM peak measured in the same run (the
# "of GEMM peak" column); the scaling model re-run with the measured 256 px step time.
# Writes gpu_check.md (markdown tables + logs) to $1, else $OUT, else the current directory.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]                  # on the GPU machine
#   bash benchmarks/gpu_check.sh /tmp/x --device cpu --quick  # smoke test of every entry point
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-.}}"
shift || true
EXTRA=("$@")                       # e.g. --device cpu --quick
DEVICE=cuda
[[ " ${EXTRA[*]:-} " == *" --device cpu "* ]] && DEVICE=cpu
PY="${PYTHON:-.venv/bin/python}"
[[ -x "$PY" ]] || PY=python
mkdir -p "$OUT_DIR"
REPORT="$OUT_DIR/gpu_check.md"
STEP_ARGS=(--channels 64 --batch 32 --precisions bf16 --repeats 5 --threads 0)
if [[ "$DEVICE" == cpu ]]; then STEP_ARGS=(--precisions bf16 --threads 1); fi

SCALE=1; [[ "$DEVICE" == cpu ]] && SCALE=8  # CPU smoke: inductor's C++ builds take minutes
run() {  # run <title> <timeout s> <python args...>: output into the report, failures noted
  local title=$1 limit=$(( $2 * SCALE )); shift 2
  echo "## $title" >> "$REPORT"; echo >> "$REPORT"
  echo "\`$PY $*\`" >> "$REPORT"; echo >> "$REPORT"
  if ! timeout "$limit" "$PY" "$@" 2>"$OUT_DIR/stderr.log" | grep -v '^USDT\|^ERROR:.*gpuGetDeviceCount' >> "$REPORT"; then
    echo "**failed or timed out after ${limit}s**; last stderr lines:" >> "$REPORT"
    echo '```' >> "$REPORT"; tail -20 "$OUT_DIR/stderr.log" >> "$REPORT"; echo '```' >> "$REPORT"
  fi
  echo >> "$REPORT"
}

{ echo "# GPU check $(date -u +%FT%TZ)"; echo; "$PY" - <<'PYEOF'
import torch
print(f"torch {torch.__version__}, device: " + (torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"))
PYEOF
echo; } > "$REPORT"

run "bf16 step, 128 px: eager vs compiled vs channels_last" 150 -m benchmarks.train_step \
  --device "$DEVICE" --resolutions 128 --checkpointing off \
  --compute eager compile channels_last compile+channels_last "${STEP_ARGS[@]}" "${EXTRA[@]}"
run "bf16 step, 256 px: eager vs compiled vs channels_last (checkpointing off and on)" 180 \
  -m benchmarks.train_step --device "$DEVICE" --resolutions 256 --checkpointing off attention+blocks \
  --compute eager compile compile+channels_last "${STEP_ARGS[@]}" "${EXTRA[@]}"
if [[ "$DEVICE" == cuda ]]; then
  run "largest per-GPU batch at 256 px, bf16, eager, checkpointing off vs attention+blocks" 150 \
    -m benchmarks.train_step --device cuda --resolutions 256 --checkpointing off attention+blocks \
    --compute eager --channels 64 --batch 64 --precisions bf16 --repeats 2 --max-batch
fi
run "scaling model (8 nodes x 8 GPUs), FLOP-based step estimate; re-run with --step-s <256 px step s above>" 60 \
  -m benchmarks.scaling "${EXTRA[@]}"
echo "report: $REPORT"
