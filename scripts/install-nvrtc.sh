#!/usr/bin/env bash
# Install the pinned NVRTC compiler and CUDA headers (pip wheels, no GPU or CUDA toolkit needed)
# into .cuda/, where build.rs finds them. NVRTC 12.9 emits PTX 8.8 and ELF-v7 cubins, which any
# driver >= 575 (PTX JIT) / >= 525 (cubins) loads, including driver 580 (CUDA 13).
set -euo pipefail
cd "$(dirname "$0")/.."
NVRTC=nvidia-cuda-nvrtc-cu12==12.9.86
RUNTIME=nvidia-cuda-runtime-cu12==12.9.79
if [ -f .cuda/nvidia/cuda_nvrtc/lib/libnvrtc.so.12 ] && [ -f .cuda/nvidia/cuda_runtime/include/cuda_bf16.h ]; then
  exit 0
fi
PY=${PYTHON:-python3}
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps --target .cuda "$NVRTC" "$RUNTIME"
echo "NVRTC installed in .cuda/"
