#!/usr/bin/env bash
# For a session with a CUDA GPU: everything the speed work must show on the GPU, in one run (about 6 minutes on an
# H200), logs into $OUT (default gpu_check/). Needs torch, torchvision, pillow, numpy, tqdm, requests, pytest; not
# visdom. A dry run of the plumbing on the CPU: CUDA= SIZE=32 STEPS=4 tests/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check} SIZE=${SIZE:-256} STEPS=${STEPS:-400} CUDA=${CUDA---cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
} 2>&1 | tee "$OUT/machine.log"
# 1. the captured step == the eager step; --deterministic resume bit-identical (skipped without CUDA)
python -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/test_gpu.log"
# 2. one step, in one process: the seed's algorithm vs ours (fp32, --amp, CUDA graph)
python tests/bench_step.py --size "$SIZE" $CUDA 2>&1 | tee "$OUT/bench_step.log"
# 3. whole runs: the seed's loop vs train.py vs train.py --amp, wall time and peak RSS
python tests/bench_step.py runs --size "$SIZE" $CUDA --n_cpu 8 --steps "$STEPS" --repeats 1 2>&1 | tee "$OUT/bench_runs.log"
