#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one run that fits one device call: correctness first, then the step
# benchmark in both memory layouts and with 1-3 discriminator scales, then whole runs. Each part runs under its own
# time limit (25 + 180 + 160 + 120 s: about 8 minutes); logs and a summary table (summary.md) go to $OUT (default
# gpu_check/).
# Needs torch, torchvision, pillow, numpy, tqdm, requests and pytest; not visdom.
#   bench/gpu_check.sh                                      # on the GPU machine
#   CUDA= SIZE=32 STEPS=4 bench/gpu_check.sh                # dry run of the plumbing on the CPU (test_gpu.py skips)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check} SIZE=${SIZE:-256} STEPS=${STEPS:-200} CUDA=${CUDA---cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
rows=()

part() {  # part SECONDS NAME LOG COMMAND...: COMMAND under `timeout`, its output in $OUT/LOG, a row for the summary
    local limit=$1 name=$2 log=$3 start=$SECONDS status rc
    shift 3
    echo "== $name ($*)"
    timeout -k 5 "$limit" "$@" > "$OUT/$log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status="TIMED OUT after $limit s" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    tail -n 3 "$OUT/$log"
    rows+=("| $name | $status | $((SECONDS - start)) s | $log |")
}

part 25 "machine" machine.log bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python -c \
'import torch, torchvision, PIL, numpy, tqdm, requests, pytest; print(\"torch\", torch.__version__, \"cuda\", \
torch.version.cuda, \"cudnn\", torch.backends.cudnn.version(), \"torchvision\", torchvision.__version__, \"python\", \
__import__(\"sys\").version.split()[0])'"
# 1. correctness: graph == eager bit for bit, lr reaches the graph, mixed epochs, test.py --cuda vs the CPU on the
#    demo data set, --amp end to end, deterministic resume
part 180 "tests/test_gpu.py" test_gpu.log python -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py
# 2. one step, in one process: the seed's algorithm against ours, eager and captured, channels_last and contiguous,
#    and (from 96 px, where three scales fit) --d_scales 1, 2, 3
SCALES=()
[ "$SIZE" -ge 96 ] && SCALES=(--d_scales 1 2 3)
part 160 "step benchmark, ${SIZE} px" bench_step.log python bench/bench_step.py --size "$SIZE" $CUDA "${SCALES[@]}"
# 3. whole runs, loading and saving included: the seed's loop, train.py, train.py --amp
part 120 "whole runs, ${STEPS} steps" bench_runs.log \
    python bench/bench_step.py runs --size "$SIZE" $CUDA --n_cpu 8 --steps "$STEPS" --repeats 1

{
    echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    sed -n '1,4p' "$OUT/machine.log"
    echo
    echo "| part | result | time | log |"
    echo "|---|---|---|---|"
    printf '%s\n' "${rows[@]}"
    echo
    echo "test_gpu.py: $(grep -E '(passed|failed|skipped|error)' "$OUT/test_gpu.log" | tail -n 1)"
    for log in bench_step.log bench_runs.log; do
        echo
        grep -B 1 -A 20 '^| step\|^| run' "$OUT/$log" | grep -v '^  '
    done
} > "$OUT/summary.md"
echo
cat "$OUT/summary.md"
! grep -q 'FAILED\|TIMED OUT' "$OUT/summary.md"
