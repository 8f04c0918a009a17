#!/usr/bin/env bash
# Everything that needs a GPU, in one run (for the device tool, or any CUDA machine whose python
# already has torch, triton and transformers): build the extension with its CUDA kernels, run the
# GPU tests, the op microbenchmarks and the end-to-end benchmarks. Results land in $OUT
# (default benchmarks/results): JSON and PNG per benchmark, the logs, and env.txt naming the
# device and the commit. Failures are gathered, not stopped at: a GPU run is rare.
#
#   OUT=/tmp/out bash benchmarks/gpu_checks.sh [quick]
#
# "quick" fits one device command of 600 s (stage limits sum to 530 s), most important first:
# the build for this GPU's architecture only, the dense batch-1 decode figure (JSON at once) and
# the kernel nodes per block of the captured graph (decode_graph_check.py), the end-to-end
# decode benchmark at batch 1 with its routed and skipped cases (prompt 128, 64 new tokens,
# transformers baselines), then the CUDA tests (bench_train runs in the full mode only). Without "quick": everything, in full (an hour or more:
# not for a 15-minute lease). Each stage is stopped with SIGINT at its limit, so pytest still
# prints its summary; bench_generate.py writes its JSON after every case.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
status=0

# stage NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, show its tail.
stage() {
    local name=$1 limit=$2
    shift 2
    echo "+ [$name, at most ${limit}s] $*"
    timeout -s INT -k 15 "$limit" "$@" > "$OUT/$name.log" 2>&1 || { echo "  $name: exit $?"; status=1; }
    tail -15 "$OUT/$name.log"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  git rev-parse HEAD 2>/dev/null || echo "commit: unknown (no git)"
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [[ "${1:-}" == "quick" ]]; then
    arch=$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    export TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=16
    stage install 180 pip install -e . --no-build-isolation --no-deps
    export LAYERROUTE_REQUIRE_EXT=1
    # First: the dense batch-1 decode figure (its JSON written at once), then the kernel nodes
    # per block read from the captured graph (benchmarks/decode_graph_check.py).
    stage decode_graph 100 python benchmarks/decode_graph_check.py --out "$OUT"
    # Then the routed and skipped cases.
    stage bench_generate 120 python benchmarks/bench_generate.py --batch 1 --prompt 128 \
        --new-tokens 64 --repeats 3 --baselines --out "$OUT"
    # The tests last.
    export LAYERROUTE_TRITON_AUTOTUNE=0      # tests: the first fitting config of each set
    stage pytest_decode 50 python -m pytest -q -rfE -p no:cacheprovider -k "cuda or graph or synchronise" \
        tests/test_generate.py tests/test_decode_attention.py
    stage pytest_kernels 80 python -m pytest -q -rfE -p no:cacheprovider \
        tests/test_block_stages.py tests/test_ext_ops.py tests/test_rows.py tests/test_router.py \
        tests/test_lora_linear.py tests/test_model.py -k "cuda or stage or qkv or route_kv or scatter or gate or norm_linear"
    unset LAYERROUTE_TRITON_AUTOTUNE
else
    stage install 900 pip install -e . --no-build-isolation --no-deps
    export LAYERROUTE_REQUIRE_EXT=1
    stage decode_graph 300 python benchmarks/decode_graph_check.py --out "$OUT"
    stage pytest_gpu 1800 python -m pytest tests -q -rfE -p no:cacheprovider
    stage microbenchmarks 1800 python -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider \
        --benchmark-json="$OUT/microbenchmarks.json"
    stage bench_generate 3600 python benchmarks/bench_generate.py --baselines --out "$OUT"
    stage bench_train 1800 python benchmarks/bench_train.py --out "$OUT"
fi
exit $status
