#!/usr/bin/env bash
# The GPU checks in one go, for a CUDA machine borrowed for a few minutes: the GPU itself, the
# tests that need CUDA (skipped everywhere else), then benchmarks/bench_gpu.py within a time
# budget, 2-Mpx frames first (the size of the 1,000 frames/s target).  Everything is logged
# into OUT, the benchmark's rows as JSON after each measurement, so a run cut short keeps what
# it measured.  Needs the package importable by python3 (an install, or PYTHONPATH).
#
#   benchmarks/gpu_checks.sh OUT [BUDGET_S]      BUDGET_S: seconds of benchmark (default 300)
set -uo pipefail
out=${1:?usage: benchmarks/gpu_checks.sh OUT [BUDGET_S]}
budget=${2:-300}
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONUNBUFFERED=1
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
        || echo "nvidia-smi: not available"
    python3 -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda,
"available", torch.cuda.is_available())'
} 2>&1 | tee "$out/gpu.txt"
python3 -m pytest -q -p no:cacheprovider -rs -m "not ray" \
    tests/finding/test_engine.py tests/benchmarks/test_bench_gpu.py 2>&1 | tee "$out/tests.log"
tests=${PIPESTATUS[0]}
python3 benchmarks/bench_gpu.py --mpx 2 1 4 16 --max-batch 16 --budget-s "$budget" \
    --json "$out/bench_gpu.json" 2>&1 | tee "$out/bench_gpu.log"
bench=${PIPESTATUS[0]}
echo "gpu_checks: tests exit $tests, benchmark exit $bench"
exit $((tests || bench))
