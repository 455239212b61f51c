#!/usr/bin/env bash
# The test suite (what CI runs): ruff, the CUDA compile check of csrc/*.cu (skipped where nvcc is
# absent), then all tests: fast ones on a tiny random Llama, slow ones (marked `slow`) on the real
# SmolLM2 and Gemma models and vLLM engines. Run scripts/setup.sh first.
#
#   bash scripts/test.sh                 everything but the long measurements (what CI runs)
#   bash scripts/test.sh --fast          ruff and the tests that start no vLLM engine and load no real
#                                        model's weights (pytest -m "not slow"): a few minutes
#   bash scripts/test.sh --measurements  the long measurements with a stated tolerance (marked
#                                        `measurement`, e.g. fp8 KV against the fp32 reference)
#
# Other arguments go to pytest (e.g. -x, -k name, a test file instead of tests/).
set -euo pipefail
cd "$(dirname "$0")/.."

fast=0
marks="not measurement"
args=()
for arg in "$@"; do
  if [[ "$arg" == --fast ]]; then fast=1
  elif [[ "$arg" == --measurements ]]; then marks="measurement"
  else args+=("$arg"); fi
done
paths=(tests)
for arg in "${args[@]}"; do  # a test path given: run that instead of all of tests/
  if [[ "$arg" != -* && -e "${arg%%::*}" ]]; then paths=(); break; fi
done

python -m ruff --version >/dev/null 2>&1 || { echo "test.sh: ruff is not installed (pip install -e \".[lint]\")" >&2; exit 1; }
python -m ruff check .
if (( fast )); then
  echo "check_cuda_compile: left out by --fast"
  python -m pytest -q -ra --durations=20 -m "not slow and not measurement" "${paths[@]}" "${args[@]}"
else
  bash scripts/check_cuda_compile.sh
  python -m pytest -q -ra --durations=40 -m "$marks" "${paths[@]}" "${args[@]}"
fi
