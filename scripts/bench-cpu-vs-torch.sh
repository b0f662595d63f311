#!/usr/bin/env bash
# flux2 on the CPU (bf16 precision) against PyTorch bf16 (diffusers 0.42.1) on the same pipeline folder (e.g. a
# `flux2 synth --config klein-4b --tokenizer tests/fixtures/pipeline/tokenizer` pipeline: diffusers needs its chat template),
# the same noise and prompt, 1 step per side, one process each, one after the other. Prints the side-by-side table.
#   scripts/bench-cpu-vs-torch.sh PIPELINE_DIR [SIDE...]        (default sides: 256 512)
# Env: VENV (default .venv-bench, created with torch 2.11.0 from PyPI: ~2.6 GB download, ~5 GB on disk),
#      OUT (default out/bench-cpu), RAYON_NUM_THREADS / OMP_NUM_THREADS to pin both to the same thread count,
#      ROUNDS (default 1): flux2 and torch alternate this many times per side; the table gives each stage's median
#      and range over the rounds (a shared VM's speed moves ±30% between minutes, so one pair proves little).
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?usage: $0 PIPELINE_DIR [SIDE...]}
shift
sides=${*:-256 512}
venv=${VENV:-.venv-bench}
out=${OUT:-out/bench-cpu}
prompt="a red fox in the snow, golden hour"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q torch==2.11.0 diffusers==0.42.1 transformers==5.17.0
fi
cargo build --release --bin flux2
mkdir -p "$out"
grep -m1 "model name" /proc/cpuinfo | tee "$out/cpu.txt"
grep -m1 flags /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|fma|avx512f|avx512bw|avx512_bf16|amx_bf16|amx_tile)$' | tr '\n' ' ' | tee -a "$out/cpu.txt"
echo
rounds=${ROUNDS:-1}
rm -f "$out"/flux2-*-r*.json "$out"/torch-*-r*.json "$out"/*-r*.wall
for side in $sides; do
    "$venv/bin/python" scripts/bench_cpu_torch.py noise "$side" "$out/noise-$side.safetensors"
    for r in $(seq "$rounds"); do
        /usr/bin/time -f "%e" -o "$out/flux2-$side-r$r.wall" target/release/flux2 generate --model "$model" --device cpu \
            --cpu-precision bf16 --prompt "$prompt" --width "$side" --height "$side" --steps 1 \
            --noise "$out/noise-$side.safetensors" --no-prompt-cache --out "$out/flux2-$side.png" \
            --json "$out/flux2-$side-r$r.json"
        /usr/bin/time -f "%e" -o "$out/torch-$side-r$r.wall" "$venv/bin/python" scripts/bench_cpu_torch.py run "$model" \
            "$side" "$out/noise-$side.safetensors" "$out/torch-$side-r$r.json" "$prompt"
    done
done
"$venv/bin/python" scripts/bench_cpu_torch.py table "$out" $sides | tee "$out/table.md"
