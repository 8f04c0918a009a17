#!/usr/bin/env bash
# Everything that needs a GPU, in one run (for the device tool, or any CUDA machine whose python
# already has torch, triton and transformers). Results land in $OUT (default
# benchmarks/results): gpu-<date>.json (the quick check's stages, with the device, the commit and
# the torch, CUDA and triton versions), the logs of every stage, and in full mode the JSON and
# PNG of each benchmark. Failures are gathered, not stopped at: a GPU run is rare.
#
#   OUT=/tmp/out bash benchmarks/gpu_checks.sh quick [--dry-run]
#   OUT=/tmp/out bash benchmarks/gpu_checks.sh            # everything (an hour or more)
#
# "quick" is one device command from a cold start, under 420 s (the budgets below; --dry-run
# lists them and their sum, and runs nothing). It builds nothing the decode does not use (the
# package is installed without its compiled extension: the decode runs Triton kernels), then
# the stages of benchmarks/gpu_quick.py in order of value (greedy equality with model.py, the
# decode path and the graph's nodes per block, the dense batch-1 figure against the weight-read
# floor, the time a skipped block saves against its share), the kernel microbenchmarks, and
# transformers' compiled static-cache decode on the same shape. Each stage is stopped with
# SIGINT at its budget (pytest still prints its summary) and writes its JSON as it ends.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
JSON="$OUT/gpu-$(date +%Y-%m-%d).json"
status=0

QUICK=(install:30 env:10 equality:90 graph:60 dense:60 skip:60 microbenchmarks:40 transformers:60)

# stage NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, show its tail.
stage() {
    local name=$1 limit=$2
    shift 2
    echo "+ [$name, at most ${limit}s] $*"
    timeout -s INT -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1 || { echo "  $name: exit $?"; status=1; }
    tail -5 "$OUT/$name.log"
}

budget() {   # the budget of a quick stage
    local item
    for item in "${QUICK[@]}"; do [[ ${item%%:*} == "$1" ]] && { echo "${item##*:}"; return; }; done
    echo 60
}

if [[ "${1:-}" == "quick" ]]; then
    if [[ "${2:-}" == "--dry-run" ]]; then
        total=0
        for item in "${QUICK[@]}"; do
            printf "%-16s %4ss\n" "${item%%:*}" "${item##*:}"
            total=$((total + ${item##*:}))
        done
        printf "%-16s %4ss (limit 420s)\n" total "$total"
        [[ $total -lt 420 ]] || exit 1
        exit 0
    fi
    mkdir -p "$OUT"
    LAYERROUTE_NO_EXTENSION=1 stage install "$(budget install)" pip install -e . --no-build-isolation --no-deps
    stage env "$(budget env)" python benchmarks/gpu_quick.py env --json "$JSON"
    cat "$JSON"
    for name in equality graph dense skip; do
        stage "$name" "$(budget "$name")" python benchmarks/gpu_quick.py "$name" --json "$JSON"
    done
    stage microbenchmarks "$(budget microbenchmarks)" python -m pytest benchmarks/ --benchmark-only -q \
        -p no:cacheprovider -k "decode_attention or router" --benchmark-max-time=0.05 \
        --benchmark-json="$OUT/microbenchmarks.json"
    stage transformers "$(budget transformers)" python benchmarks/gpu_quick.py transformers --json "$JSON"
else
    mkdir -p "$OUT"
    stage install 900 pip install -e . --no-build-isolation --no-deps
    export LAYERROUTE_REQUIRE_EXT=1
    stage env 30 python benchmarks/gpu_quick.py env --json "$JSON"
    for name in equality graph dense skip transformers; do
        stage "$name" 300 python benchmarks/gpu_quick.py "$name" --json "$JSON"
    done
    stage pytest_gpu 1800 python -m pytest tests -q -rfE -p no:cacheprovider
    stage microbenchmarks 1800 python -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider \
        --benchmark-json="$OUT/microbenchmarks.json"
    stage bench_generate 3600 python benchmarks/bench_generate.py --baselines --out "$OUT"
    stage bench_train 1800 python benchmarks/bench_train.py --out "$OUT"
fi
exit $status
