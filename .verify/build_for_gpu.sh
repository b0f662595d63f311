#!/usr/bin/env bash
# Build, on this (GPU-less) machine, everything .verify/gpu_check.sh runs on a GPU machine without
# Rust: the release CLI and the GPU test binary, with kernels for every architecture, into
# .verify/bin, and the diffusers wheel for .verify/peer_compare.py into .verify/wheels.
# Both folders are git-ignored: name them in the device tool's `carry`:
#   run(command=".verify/gpu_check.sh", carry=[".verify/bin", ".verify/wheels", ".verify/sim"], timeout_s=600)
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-nvrtc.sh
export FLUX2_REQUIRE_KERNELS=1
cargo build --release --bin flux2
mkdir -p .verify/bin
cp target/release/flux2 .verify/bin/flux2

log=$(mktemp)
exe=$(cargo test --release --test gpu --no-run --message-format=json 2>"$log" \
  | python3 -c 'import sys, json
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "gpu":
        print(m["executable"])' | tail -1) || true
if [ -z "$exe" ] || [ ! -x "$exe" ]; then
  cat "$log" >&2
  echo "build_for_gpu: the GPU test binary was not built" >&2
  exit 1
fi
rm -f "$log"
cp "$exe" .verify/bin/gpu-tests

# The binaries must carry kernel images (FLUX2_REQUIRE_KERNELS=1 makes build.rs fail otherwise).
.verify/bin/flux2 doctor | grep '^kernel images' >&2
if .verify/bin/flux2 doctor | grep -q '^kernel images: none'; then
  echo "build_for_gpu: no kernel images embedded" >&2
  exit 1
fi
.verify/bin/gpu-tests --list >/dev/null

# The CUDA emulator, for the emulator-versus-hardware step (its runtime and kernel modules for every
# profile, stripped: a few MB).
make -s -C cuda-sim -j"$(nproc)" BUILD="$PWD/target/cuda-sim"
rm -rf .verify/sim
mkdir -p .verify/sim
cp -r target/cuda-sim/kernels .verify/sim/
cp target/cuda-sim/libcuda.so.1 .verify/sim/libcuda.so.1
cp target/cuda-sim/libcuda.so.1 .verify/sim/libcuda.so
find .verify/sim -name '*.so*' -exec strip --strip-debug {} +

# diffusers for .verify/peer_compare.py (the GPU machine has torch, huggingface_hub and safetensors,
# but no diffusers; its other needs are there too, importlib_metadata being stdlib on Python 3.12).
if ! ls .verify/wheels/diffusers-0.42.1-*.whl >/dev/null 2>&1; then
  python3 -m pip download --quiet --no-deps --only-binary=:all: -d .verify/wheels diffusers==0.42.1 ||
    echo "warning: diffusers wheel not fetched: peer_compare.py fails on a machine without diffusers" >&2
fi

# Compressed for the trip (the embedded cubins compress about 5:1); gpu_check.sh unpacks them.
for f in .verify/bin/flux2 .verify/bin/gpu-tests; do
  xz -T0 -6 -f "$f"
done
ls -la .verify/bin .verify/wheels 2>/dev/null || true
# What travels to the device machine: tracked files + the two carried folders (limit 64 MiB).
tracked=$(git ls-files -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
carried=$(du -cb .verify/bin .verify/wheels .verify/sim 2>/dev/null | tail -1 | cut -f1)
total=$((tracked + carried))
echo "to carry: $((total / 1048576)) MiB (tracked $((tracked / 1048576)) MiB + .verify/bin, wheels and sim $((carried / 1048576)) MiB; limit 64 MiB)"
if [ "$total" -gt $((60 * 1048576)) ]; then
  echo "warning: close to or over the 64 MiB the device tool carries (untracked, unignored files count too)" >&2
fi
