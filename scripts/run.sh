#!/usr/bin/env bash
# The main job: build flux2 (with GPU kernels) and generate one image with FLUX.2 [klein] 4B from the
# local Hugging Face cache. Extra arguments are passed to `flux2 generate` and override the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-nvrtc.sh || echo "warning: NVRTC wheels not installed; building a CPU-only binary" >&2
cargo build --release --bin flux2
MODEL=black-forest-labs/FLUX.2-klein-4B
PROMPT="a red fox in the snow, golden hour, 35mm photo"
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --model) MODEL=$2; shift 2 ;;
    --prompt) PROMPT=$2; shift 2 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
has_out=0
for a in "${ARGS[@]+"${ARGS[@]}"}"; do [ "$a" = "--out" ] && has_out=1; done
[ $has_out = 1 ] || ARGS+=(--out out.png)
exec ./target/release/flux2 generate --model "$MODEL" --prompt "$PROMPT" "${ARGS[@]}"
