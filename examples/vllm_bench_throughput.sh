#!/usr/bin/env bash
# vLLM's own `vllm bench throughput --umim-rules ...` against the same command without it, on a
# natural-text ShareGPT file the script writes (random-token datasets never match a rule).
#   bash examples/vllm_bench_throughput.sh [NUM_PROMPTS] [extra vllm bench throughput args...]
set -euo pipefail
cd "$(dirname "$0")/.."
NUM_PROMPTS="${1:-128}"; shift || true
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}" VLLM_CPU_OMP_THREADS_BIND="${VLLM_CPU_OMP_THREADS_BIND:-0-1}"
vllm-umim bench-pair --rounds 1 --num-prompts "$NUM_PROMPTS" \
    --output-dir "${OUTPUT_DIR:-/tmp/vllm_umim-example-bench}" -- "$@"
