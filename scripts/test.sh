#!/usr/bin/env bash
# The test suite: CUDA compile check of csrc/*.cu, then all tests (fast ones on a tiny random
# Llama, slow ones on the real SmolLM2 and vLLM engines). Run scripts/setup.sh first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/check_cuda_compile.sh
python -m pytest -q -ra --durations=40 tests "$@"
