#!/usr/bin/env bash
# The GPU figures in the README, on one CUDA GPU: one final CNN (the default configuration at full budget) and
# the whole study without the report, each timed. Needs the requirements and the data (see README.md).
#
#     bash benchmarks/gpu_study.sh OUT_DIR [WORKERS] [THREADS]    # defaults: one worker per core, 1 thread
#
# The study's CNN runs go to the GPU, its numpy MLP runs to the CPU workers, both at once; OUT_DIR/study holds
# the study's results as a CPU study would write them.
set -euo pipefail
out=${1:?usage: bash benchmarks/gpu_study.sh OUT_DIR [WORKERS] [THREADS]}
workers=${2:-$(nproc)}
threads=${3:-1}
py=${PYTHON:-python3}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "cores: $(nproc); workers: $workers x $threads thread(s)"
TIMEFORMAT='wall: %R s'

echo "== one final CNN (cnn_torch.py, default configuration, full budget)"
time "$py" cnn_torch.py --device cuda --no-progress --json "$out/cnn_final.json" > "$out/cnn_final.log"
grep -E "epoch +1/|^done" "$out/cnn_final.log"

echo "== the whole study (run_experiments.py --device cuda --no-report)"
time "$py" run_experiments.py --device cuda --workers "$workers" --threads "$threads" \
    --results-dir "$out/study" --no-report
