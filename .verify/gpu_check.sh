#!/usr/bin/env bash
# One GPU check, under 8 minutes on an H100, for a machine without Rust (binaries from
# .verify/build_for_gpu.sh, passed as $1 or in .verify/bin):
#   1. flux2 doctor
#   2. flux2 selftest --device cuda: every op vs the CPU reference, poisoned outputs, timings
#   3. the GPU test binary: ops, transformer/text-encoder/VAE fixtures, pipeline images <= 2/255
#   4. the CLI on the fixtures: forward commands and generate --noise vs the diffusers outputs
#   5. a klein-4B-shaped random pipeline (flux2 synth) generating 1024x1024: per-stage timings
# Logs and summary.json go to $OUT (default ./gpu-check-out). The table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=$(realpath "${1:-.verify/bin}")
OUT=${OUT:-$PWD/gpu-check-out}
WORK=${WORK:-/tmp/flux2-gpu-check}
mkdir -p "$OUT" "$WORK"
export FLUX2_FIXTURES=$PWD/tests/fixtures
F=$FLUX2_FIXTURES
FLUX2="$BIN/flux2"
RESULTS="$OUT/results.tsv"
: > "$RESULTS"

step() { # name timeout_s command...
  local name=$1 limit=$2
  shift 2
  local start
  start=$(date +%s.%N)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local secs
  secs=$(python3 -c "print(f'{$(date +%s.%N) - $start:.1f}')")
  printf '%s\t%s\t%s\n' "$name" "$rc" "$secs" >> "$RESULTS"
  if [ $rc -eq 0 ]; then echo "ok   $name (${secs}s)"; else echo "FAIL $name (rc $rc, ${secs}s): see $OUT/$name.log"; fi
}

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
step doctor 60 "$FLUX2" doctor
step selftest 240 "$FLUX2" selftest --device cuda --reps 5 --json "$OUT/selftest.json"
step gpu-tests 300 "$BIN/gpu-tests" --test-threads 1 --nocapture

# CLI fixture parity (bf16 compute against diffusers float32).
for c in t2i_nonsquare batch2_hd24_ref guidance_outchannels; do
  d=$F/transformer/$c
  step "forward-transformer-$c" 60 sh -c "'$FLUX2' forward transformer --model '$d' --inputs '$d/inputs.safetensors' --out '$WORK/$c.safetensors' --device cuda && '$FLUX2' compare '$WORK/$c.safetensors' '$d/expected.safetensors' --min-cosine 0.999"
done
C=$F/components
for comp in text-encoder:text_encoder vae-encode:vae_encode vae-decode:vae_decode; do
  name=${comp%%:*}; file=${comp##*:}
  step "forward-$name" 60 sh -c "'$FLUX2' forward $name --model '$F/pipeline' --inputs '$C/${file}_inputs.safetensors' --out '$WORK/$file.safetensors' --device cuda && '$FLUX2' compare '$WORK/$file.safetensors' '$C/${file}_expected.safetensors' --min-cosine 0.999"
done
for c in t2i_nonsquare t2i_unicode; do
  d=$F/cases/$c
  prompt=$(python3 -c "import json; print(json.load(open('$d/case.json'))['prompt'])")
  step "generate-$c" 60 sh -c "'$FLUX2' generate --model '$F/pipeline' --prompt \"\$0\" --noise '$d/noise.safetensors' --out '$WORK/$c.png' --device cuda && '$FLUX2' compare '$WORK/$c.png' '$d/expected.png' --max-pixel-error 2" "$prompt"
done
d=$F/cases/edit_one_ref
step generate-edit_one_ref 60 sh -c "'$FLUX2' generate --model '$F/pipeline' --prompt 'make it look like winter' --ref '$d/ref0.png' --steps 3 --noise '$d/noise.safetensors' --out '$WORK/edit.png' --device cuda && '$FLUX2' compare '$WORK/edit.png' '$d/expected.png' --max-pixel-error 2"

# klein-4B-shaped random pipeline at 1024x1024 (weights written once per machine; SKIP_SYNTH=1
# leaves this out, e.g. to try the script's plumbing on a machine without a GPU).
if [ "${SKIP_SYNTH:-0}" = 1 ]; then
  python3 .verify/summarize.py "$OUT"
  exit $?
fi
if [ ! -f "$WORK/klein-4b/model_index.json" ]; then
  step synth-klein-4b 240 "$FLUX2" synth --config klein-4b --out "$WORK/klein-4b"
fi
step generate-klein-4b-1024 240 "$FLUX2" generate --model "$WORK/klein-4b" --prompt "a photo of a red fox in the snow" \
  --width 1024 --height 1024 --seed 1 --count 2 --out "$WORK/klein4b.png" --device cuda --json "$OUT/klein4b-1024.json"

# Benchmark tables (klein-4B shapes); the diffusers baseline runs in peer_compare.py when possible.
step bench-gemm 180 "$FLUX2" bench gemm --shapes klein4b --reps 5 --device cuda --json "$OUT/bench_gemm.json"
step profile-attention 120 "$FLUX2" profile attention --seq 4608 --heads 24 --dim 128 --reps 5 --device cuda --json "$OUT/profile_attention.json"
step peer-compare 300 python3 .verify/peer_compare.py --model "$WORK/klein-4b" --flux2 "$FLUX2" --out "$OUT" --reps 5

python3 .verify/summarize.py "$OUT"
