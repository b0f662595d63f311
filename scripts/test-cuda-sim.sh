#!/usr/bin/env bash
# The CUDA backend checked on the CPU: every GPU check runs under the emulated driver
# (scripts/with-cuda-sim.sh, docs/cuda-emulator.md), failing rather than reporting as ignored.
#   1. per profile (sm_89, sm_90a): `flux2 selftest --device cuda` (every op vs the CPU reference),
#      then the emulator's own tests, which also check that the selftest launched every kernel;
#   2. tests/gpu.rs: the transformer, text-encoder, VAE and pipeline fixtures with bf16 gates;
#   3. .verify/gpu_check.sh end to end (small shapes), so the GPU script is tested before a GPU runs it.
# Expects the release build of scripts/test.sh (it builds what is missing).
set -euo pipefail
cd "$(dirname "$0")/.."
SIM=target/cuda-sim
export FLUX2_REQUIRE_KERNELS=1 FLUX2_EXPECT_SIM=1
cargo build --release --bin flux2 --quiet
mkdir -p "$SIM"
echo "== the emulator's image parser on every shipped image (AddressSanitizer build)"
images=$(dirname "$(ls -t target/release/build/flux2-*/out/gemm.sm_89.cubin | head -1)")
g++ -std=c++17 -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all -Wall -Wextra \
  cuda-sim/tests/image_parse_test.cpp cuda-sim/src/image.cpp -o "$SIM/image_parse_test"
"$SIM/image_parse_test" "$images" kernels | tail -n 1
for arch in sm_89 sm_90a; do
  cov="$SIM/coverage-$arch.txt"
  rm -f "$cov"
  echo "== selftest under the emulator ($arch)"
  FLUX2_SIM_ARCH=$arch FLUX2_SIM_COVERAGE="$cov" \
    scripts/with-cuda-sim.sh target/release/flux2 selftest --device cuda --json "$SIM/selftest-$arch.json" | tail -n 1
  echo "== emulator checks ($arch)"
  FLUX2_SIM_ARCH=$arch FLUX2_SIM_COVERAGE_REPORT="$cov" \
    scripts/with-cuda-sim.sh cargo test --release --quiet --test cuda_sim
done
echo "== GPU tests under the emulator (sm_90a)"
# (its op sweep is the selftest above)
FLUX2_EXPECT_GPU=1 scripts/with-cuda-sim.sh cargo test --release --quiet --test gpu -- --test-threads 1 \
  --skip every_op_matches_the_cpu_reference
echo "== .verify/gpu_check.sh under the emulator (small shapes)"
# The GPU machine's own entry points, end to end: build the bundle, run the check. Its gpu-tests
# step is the binary just run above, so it is skipped here.
.verify/build_for_gpu.sh > "$SIM/build_for_gpu.log" 2>&1 || { cat "$SIM/build_for_gpu.log"; exit 1; }
rm -rf "$SIM/gpu-check-out"
SKIP_STEPS="gpu-tests" OUT="$SIM/gpu-check-out" WORK="$SIM/gpu-check-work" \
  scripts/with-cuda-sim.sh .verify/gpu_check.sh
