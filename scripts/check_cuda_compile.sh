#!/usr/bin/env bash
# Compile-only check of the CUDA twins of the matcher ops (csrc/*.cu) against the installed
# torch headers. Needs nvcc on PATH (or $NVCC), not a GPU or a CUDA build of torch. Exit status != 0
# on failure. Without nvcc it prints one line and exits 0 (most machines have none), unless
# UMIM_REQUIRE_NVCC=1 (CI, where nvcc is installed) makes that a failure too.
#
# -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE: CPU wheels of torch ship c10/cuda headers but not the
# generated c10/cuda/impl/cuda_cmake_macros.h (it only sets Windows DLL-export macros).
# 3306 / -Wc++20-extensions: torch 2.13 headers use C++20 bit-field initializers (harmless).
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC="${NVCC:-nvcc}"
if ! command -v "$NVCC" >/dev/null; then
  if [[ "${UMIM_REQUIRE_NVCC:-0}" == 1 ]]; then
    echo "check_cuda_compile: $NVCC not found, and UMIM_REQUIRE_NVCC=1" >&2
    exit 1
  fi
  echo "check_cuda_compile: skipped, $NVCC not found (the CUDA twins in csrc/*.cu were not compiled)"
  exit 0
fi
mapfile -t INCLUDES < <(python -c \
  "from torch.utils.cpp_extension import include_paths; print('\n'.join(include_paths()))")
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

status=0
for src in csrc/*.cu; do
  if "$NVCC" -c "$src" -o "$OUT/$(basename "$src").o" -std=c++17 -O3 \
      -DUMIM_WITH_CUDA -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE \
      "${INCLUDES[@]/#/-I}" -Icsrc -diag-suppress 3306 -Xcompiler -Wno-c++20-extensions; then
    echo "ok    $src"
  else
    echo "FAIL  $src" >&2
    status=1
  fi
done
exit $status
