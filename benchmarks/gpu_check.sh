#!/usr/bin/env bash
# One prepared GPU check for the lent machine as it is (one H200, Python 3.12, torch 2.11, no
# DeepSpeed/MLflow/omegaconf/webdataset): installs the carried wheels (.whl/, made by
# benchmarks/fetch_wheels.sh), then, in order of value, each stage under a share of one time budget
# (GPU_CHECK_BUDGET_S, default 300 s, so that the run plus the machine's start stays well under 8 min):
#   smoke    torch.compile of a small conv net on the device (seconds; a failure skips "compile")
#   eager    bf16 steps, width 64, batch 32: 128 px eager / channels_last (MFU = "of GEMM peak",
#            against an 8192^3 bf16 GEMM of the same run), 256 px with checkpointing off / on
#   maxbatch the largest per-GPU batch at 256 px, checkpointing off / attention+blocks (capped
#            doubling from 128 in one child per variant), each timed at what it found
#   compile  compile+channels_last at 128 and 256 px, in a run of its own
# Every variant runs in its own child (train_step --isolate): a CUDA error, crash or timeout is that
# row's error, and each row is in the report as soon as it is measured. Not run here: DeepSpeed
# (not installed there, engine=ddp only), MLflow (tracking.enabled=false), evaluation (eval.every=0),
# the scaling model (fake tensors, CPU: re-run it here with --step-s from the 256 px row).
# Writes gpu_check.md to $1, else $OUT, else the current directory.
#
#   bash benchmarks/gpu_check.sh                                   # on the GPU machine (report in $OUT)
#   GPU_CHECK_STAGES="smoke compile" bash benchmarks/gpu_check.sh   # a rerun of some stages
#   PYTHON=/work/venv312/bin/python bash benchmarks/gpu_check.sh /tmp/x --device cpu --quick   # rehearsal
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-.}}"
shift || true
EXTRA=("$@")                       # e.g. --device cpu --quick
DEVICE=cuda
[[ " ${EXTRA[*]:-} " == *" --device cpu "* ]] && DEVICE=cpu
PY="${PYTHON:-python3}"
STAGES=" ${GPU_CHECK_STAGES:-smoke eager maxbatch compile} "
BUDGET_S="${GPU_CHECK_BUDGET_S:-300}"
[[ "$DEVICE" == cpu && -z "${GPU_CHECK_BUDGET_S:-}" ]] && BUDGET_S=1500  # CPU: inductor's C++ builds
START=$SECONDS RUNS=0
mkdir -p "$OUT_DIR"
REPORT="$OUT_DIR/gpu_check.md"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/sagan-inductor}"

if compgen -G ".whl/*.whl" > /dev/null; then  # the carried wheels, beside the image's packages
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/sagan-site \
    .whl/*.whl || { echo "wheel install failed" >&2; exit 1; }
  export PYTHONPATH="/tmp/sagan-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{ echo "# GPU check $(date -u +%FT%TZ)"; echo
  "$PY" -c 'import sys, torch; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, " + (torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA"))'
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  echo; } > "$REPORT" 2>&1

# stage <name> <cap s> <title> <python args...>: under min(cap, what the budget has left).
stage() {
  local name=$1 cap=$2 title=$3; shift 3
  [[ "$STAGES" == *" $name "* ]] || return 0
  local left=$(( BUDGET_S - (SECONDS - START) )) limit=$cap
  [[ "$DEVICE" == cpu ]] && limit=$(( cap * 6 ))
  (( limit > left )) && limit=$left
  echo "## $title" >> "$REPORT"; echo >> "$REPORT"
  if (( limit < 20 )); then
    echo "**skipped**: ${left}s of the ${BUDGET_S}s budget left" >> "$REPORT"; echo >> "$REPORT"; return 1
  fi
  echo "\`$PY $*\` (limit ${limit}s)" >> "$REPORT"; echo >> "$REPORT"
  local began=$SECONDS log="$OUT_DIR/$(( ++RUNS ))-$name.stderr"
  timeout -k 10 "$limit" "$PY" "$@" >> "$REPORT" 2> "$log"
  local rc=$?
  if (( rc != 0 )); then
    echo; echo "**exit $rc$( (( rc == 124 )) && echo ": timed out after ${limit}s")**; last stderr lines:" >> "$REPORT"
    { echo '```'; grep -v '^USDT' "$log" | tail -15; echo '```'; } >> "$REPORT"
  fi
  echo "($(( SECONDS - began ))s)" >> "$REPORT"; echo >> "$REPORT"
  return $rc
}

ROW_S=120; COMPILE_ROW_S=140        # per child: a hung row is that row's error
[[ "$DEVICE" == cpu ]] && ROW_S=900 && COMPILE_ROW_S=900
STEP=(-m benchmarks.train_step --device "$DEVICE" --isolate --precisions bf16 --channels 64 --batch 32
      --repeats 5 --row-timeout "$ROW_S")
COMPILE_OK=1
stage smoke 90 "compile smoke test (a conv net, forward and backward, bf16 autocast)" \
  -m benchmarks.compile_smoke --device "$DEVICE" || COMPILE_OK=0
stage eager 150 "bf16 steps, 128 px: eager / channels_last" \
  "${STEP[@]}" --resolutions 128 --checkpointing off --compute eager channels_last "${EXTRA[@]}"
stage eager 120 "bf16 steps, eager, 256 px: checkpointing off / attention+blocks" \
  "${STEP[@]}" --resolutions 256 --checkpointing off attention+blocks --compute eager "${EXTRA[@]}"
if [[ "$DEVICE" == cuda ]]; then
  stage maxbatch 150 "largest per-GPU batch at 256 px, bf16, eager: checkpointing off / attention+blocks" \
    "${STEP[@]}" --resolutions 256 --checkpointing off attention+blocks --compute eager --batch 128 \
    --repeats 2 --max-batch --max-batch-probes 5
fi
if (( COMPILE_OK )); then
  stage compile 150 "bf16 steps, torch.compile + channels_last: 128 px, 256 px" \
    "${STEP[@]}" --resolutions 128 256 --checkpointing off --compute compile+channels_last --repeats 3 \
    --row-timeout "$COMPILE_ROW_S" "${EXTRA[@]}"
elif [[ "$STAGES" == *" compile "* ]]; then
  { echo "## torch.compile rows"; echo; echo "**skipped**: the compile smoke test did not pass (failed or skipped, above)"; echo; } >> "$REPORT"
fi
echo "total $(( SECONDS - START ))s of a ${BUDGET_S}s budget" >> "$REPORT"
echo "report: $REPORT"
