#!/usr/bin/env bash
# Runs CMD with flux2's CUDA emulator as the CUDA driver: the real kernels/*.cu, compiled as host
# C++, execute on the CPU with race, bounds, alignment and launch-limit checks (docs/cuda-emulator.md).
#   scripts/with-cuda-sim.sh CMD [ARGS...]
# FLUX2_SIM_ARCH picks the device profile (sm_80, sm_86, sm_89, sm_90a default, sm_120);
# FLUX2_SIM_MEMORY overrides its memory (e.g. 8GiB); FLUX2_SIM_THREADS the worker threads.
set -euo pipefail
if [ $# -eq 0 ]; then
  echo "usage: $0 CMD [ARGS...]" >&2
  exit 2
fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${FLUX2_SIM_BUILD:-$ROOT/target/cuda-sim}
# Rebuild what changed (the runtime or any kernel source); quiet unless it fails.
if ! log=$(make -s -C "$ROOT/cuda-sim" -j"$(nproc)" BUILD="$BUILD" 2>&1); then
  echo "$log" >&2
  echo "with-cuda-sim: building the emulator failed" >&2
  exit 1
fi
export LD_LIBRARY_PATH="$BUILD${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# NVRTC for tests that compile kernels at run time (scripts/install-nvrtc.sh puts it here).
if [ -d "$ROOT/.cuda/nvidia/cuda_nvrtc/lib" ]; then
  export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$ROOT/.cuda/nvidia/cuda_nvrtc/lib"
fi
export FLUX2_SIM_ARCH=${FLUX2_SIM_ARCH:-sm_90a}
exec "$@"
