#!/usr/bin/env bash
# The project's test command (README): install the pinned NVRTC wheels (so every CUDA kernel is
# compiled for every architecture, and a kernel that does not compile fails), then build and run
# every test (GPU checks report as ignored on machines without a GPU), check `flux2 serve` with the
# official openai client and curl, then run the CUDA backend's
# checks under the CPU emulator of the CUDA driver, where they must pass (docs/cuda-emulator.md).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-nvrtc.sh
FLUX2_REQUIRE_KERNELS=1 cargo test --release --all-targets
./scripts/test-serve-clients.sh
./scripts/test-cuda-sim.sh
