#!/usr/bin/env bash
# Build, on this (GPU-less) machine, everything .verify/gpu_check.sh runs on a GPU machine:
# the release CLI and the GPU test binary, with kernels for every architecture, into .verify/bin.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-nvrtc.sh
export FLUX2_REQUIRE_KERNELS=1
cargo build --release --bin flux2
mkdir -p .verify/bin
cp target/release/flux2 .verify/bin/flux2
exe=$(cargo test --release --test gpu --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import sys, json
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "gpu":
        print(m["executable"])' | tail -1)
cp "$exe" .verify/bin/gpu-tests
# diffusers for .verify/peer_compare.py (the GPU machine has torch but may lack diffusers).
python3 -m pip download --quiet --no-deps -d .verify/wheels diffusers==0.42.1 || echo "warning: diffusers wheel not fetched" >&2
ls -la .verify/bin
