#!/usr/bin/env bash
# Everything that needs a GPU, in one run (for the device tool, or any CUDA machine whose python
# already has torch, triton and transformers): build the extension with its CUDA kernels, run the
# GPU tests, the op microbenchmarks and the end-to-end benchmarks. Results land in $OUT
# (default benchmarks/results): JSON and PNG per benchmark, the pytest logs, and env.txt naming
# the device and the commit.
#
#   OUT=/tmp/out bash benchmarks/gpu_checks.sh [quick]
#
# "quick" trims the end-to-end benchmarks (batch 1 and 8, prompt 128, 64 new tokens, fewer
# train steps) to fit a short device lease.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
status=0
run() { echo "+ $*"; "$@" || status=1; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  git rev-parse HEAD 2>/dev/null || echo "commit: unknown (no git)"
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

run pip install -e . --no-build-isolation --no-deps -q
export LAYERROUTE_REQUIRE_EXT=1
# Every GPU test (the CPU-only ones skip there), all failures gathered: a GPU run is rare.
python -m pytest tests -q -p no:cacheprovider > "$OUT/pytest_gpu.log" 2>&1 || status=1
tail -25 "$OUT/pytest_gpu.log"
python -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider \
    --benchmark-json="$OUT/microbenchmarks.json" > "$OUT/microbenchmarks.log" 2>&1 || status=1
tail -40 "$OUT/microbenchmarks.log"

if [[ "${1:-}" == "quick" ]]; then
    run python benchmarks/bench_generate.py --batch 1 8 --prompt 128 --new-tokens 64 --repeats 3 \
        --baselines --out "$OUT"
    run python benchmarks/bench_train.py --steps 8 --warmup 2 --out "$OUT"
else
    run python benchmarks/bench_generate.py --baselines --out "$OUT"
    run python benchmarks/bench_train.py --out "$OUT"
fi
exit $status
