#!/usr/bin/env bash
# Every GPU check of the project in one call on a lent GPU machine, within 9 minutes:
# install the carried wheels of what that machine lacks (scripts/download_gpu_wheels.sh
# puts them in .whl/), build the extension against its torch, run the CUDA tests,
# compute-sanitizer memcheck and racecheck on every op forward and backward, and the op and
# whole-model benchmarks on CUDA in fp32 and bf16. summary.txt, environment.json, the
# benchmarks' JSON and logs.tar.gz (one log per step) go to $OUT (default output/gpu_checks),
# few files, as the lent machine returns at most 8.
#
#   bash scripts/gpu_checks.sh [--dry-run] [--official PATH]
#
# --dry-run (automatic without a CUDA device) runs the same steps on the CPU machine:
# nothing is installed or rebuilt, and the GPU steps report that they skip. --official PATH
# adds the official Conditional DETR (a checkout carried with the tree) to benchmark_model.
# Each step has its own time limit, cut to what is left of $BUDGET seconds (default 530) for
# the whole script; a failing step is recorded and the next one runs.
set -uo pipefail
cd "$(dirname "$0")/.."
# the project runs from this checkout, its extension built in place: the lent machine does not
# install it, and a script run by path would otherwise not find it
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

DRY_RUN=0
OFFICIAL=""
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) DRY_RUN=1 ;;
        --official) OFFICIAL=$2; shift ;;
        *) echo "unknown argument $1 (expected --dry-run or --official PATH)" >&2; exit 2 ;;
    esac
    shift
done
OUT=${OUT:-output/gpu_checks}
BUDGET=${BUDGET:-530}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
LOGS=$(mktemp -d)
trap 'tar -czf "$OUT/logs.tar.gz" -C "$LOGS" . && rm -rf "$LOGS"' EXIT
export PYTHONUNBUFFERED=1

if [ "$DRY_RUN" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    echo "no CUDA device visible to $PY: dry run"
    DRY_RUN=1
fi

# step NAME SECONDS COMMAND...: runs COMMAND with a time limit, its output in NAME.log
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - SECONDS))
    if [ "$left" -lt 10 ]; then
        skip "$name" "out of time: the script's ${BUDGET}s are spent"
        return
    fi
    [ "$limit" -le "$left" ] || limit=$left
    local start=$SECONDS
    timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
    local rc=$?
    local verdict=ok
    [ $rc = 0 ] || verdict="FAILED (exit $rc$([ $rc = 124 ] && echo ", over ${limit}s"))"
    echo "$name: $verdict, $((SECONDS - start)) s" | tee -a "$SUMMARY"
    tail -n 3 "$LOGS/$name.log" | sed 's/^/    /'
}

skip() {
    echo "$1: skipped ($2)" | tee -a "$SUMMARY"
}

gpu_step() {
    if [ "$DRY_RUN" = 1 ]; then skip "$1" "dry run: no CUDA device"; else step "$@"; fi
}

# 1. what the machine lacks (detectron2, fvcore, iopath, yacs, omegaconf, pycocotools, ...)
if [ -d .whl ] && [ "$DRY_RUN" = 0 ]; then
    step install_wheels 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
elif [ "$DRY_RUN" = 1 ]; then
    skip install_wheels "dry run: the environment is used as it is"
else
    skip install_wheels "no .whl/ folder carried (bash scripts/download_gpu_wheels.sh makes it)"
fi
"$PY" - > "$OUT/environment.json" 2>&1 <<'EOF'
import json, platform, subprocess
import torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
try:
    info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=20).stdout.strip() or None
except (OSError, subprocess.SubprocessError):
    info["driver"] = None
print(json.dumps(info, indent=2))
EOF
echo "environment: $(tr -d '\n ' < "$OUT/environment.json")" | tee -a "$SUMMARY"

# 2. the extension, built against this machine's torch for its GPU
if [ "$DRY_RUN" = 1 ]; then
    skip build "dry run: the extension already built here is used"
else
    arch=$("$PY" -c "import torch; print('{}.{}'.format(*torch.cuda.get_device_capability()))")
    step build 180 env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$(nproc)" \
        "$PY" setup.py build_ext --inplace
fi

# 3. the CUDA tests (on CPU, the same selection skips)
step cuda_tests 120 "$PY" -m pytest -q -rs -p no:cacheprovider \
    tests/test_conditional_attention_op.py tests/test_deformable_attention_op.py tests/test_hashed_dropout.py \
    tests/test_ops_fallback.py -k "cuda"

# 4. compute-sanitizer on every op, forward and backward
if [ "$DRY_RUN" = 1 ] || ! command -v compute-sanitizer > /dev/null; then
    skip memcheck "$([ "$DRY_RUN" = 1 ] && echo 'dry run: no CUDA device' || echo 'no compute-sanitizer')"
    skip racecheck "$([ "$DRY_RUN" = 1 ] && echo 'dry run: no CUDA device' || echo 'no compute-sanitizer')"
    step exercise_ops 60 "$PY" scripts/exercise_cuda_ops.py
else
    step memcheck 60 compute-sanitizer --tool memcheck --error-exitcode 3 "$PY" scripts/exercise_cuda_ops.py
    step racecheck 60 compute-sanitizer --tool racecheck --error-exitcode 3 "$PY" scripts/exercise_cuda_ops.py
fi

# 5. benchmarks, JSON beside the logs
gpu_step benchmark_attention 45 "$PY" -m conditional_detr.tools.benchmark_attention --device cuda \
    --json "$OUT/benchmark_attention.json"
gpu_step benchmark_deformable_attention 45 "$PY" -m conditional_detr.tools.benchmark_deformable_attention \
    --device cuda --json "$OUT/benchmark_deformable_attention.json"
gpu_step benchmark_model 120 "$PY" -m conditional_detr.tools.benchmark_model --device cuda --dtype fp32 bf16 \
    ${OFFICIAL:+--official "$OFFICIAL"} --json "$OUT/benchmark_model.json"

echo "summary in $SUMMARY"
! grep -q FAILED "$SUMMARY"
