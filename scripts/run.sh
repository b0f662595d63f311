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
has_out=0
# --model and --prompt replace the defaults, in either form (`--model X` or `--model=X`); a flag
# without its value is an error here rather than a confusing one from flux2.
while [ $# -gt 0 ]; do
  case "$1" in
    --model | --prompt)
      if [ $# -lt 2 ]; then
        echo "run.sh: $1 needs a value" >&2
        exit 2
      fi
      if [ "$1" = --model ]; then MODEL=$2; else PROMPT=$2; fi
      shift 2 ;;
    --model=*) MODEL=${1#--model=}; shift ;;
    --prompt=*) PROMPT=${1#--prompt=}; shift ;;
    --out | --out=*) has_out=1; ARGS+=("$1"); shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
[ $has_out = 1 ] || ARGS+=(--out out.png)
exec ./target/release/flux2 generate --model "$MODEL" --prompt "$PROMPT" "${ARGS[@]}"
