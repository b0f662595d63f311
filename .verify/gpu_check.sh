#!/usr/bin/env bash
# The GPU check: one command of under 10 minutes on a GPU machine without Rust. It runs the binaries
# that .verify/build_for_gpu.sh built elsewhere (in .verify/bin, or the folder given as $1):
#   1. nvidia-smi and `flux2 doctor` (driver, card, kernel image, emulator or not)
#   2. `flux2 selftest --device cuda`: every op vs the CPU reference, poisoned outputs, timings
#   3. the GPU test binary on the fixtures (FLUX2_EXPECT_GPU=1: a device that does not initialise
#      FAILS its checks; its op sweep is step 2's, so it is skipped here)
#   4. the CLI on the fixtures: forward commands and generate --noise vs the diffusers outputs
#   5. full mode: `bench gemm`, `bench conv` (the VAE decoder at 1024²) and `profile attention` at klein-4B shapes (attention beside torch SDPA,
#      .verify/attention_compare.py, also at the VAE's 512-wide head), a klein-4B-shaped random
#      pipeline (`flux2 synth`) generating 1024x1024 (per-stage timings), `bench dit` on it (each path eager and
#      replayed from a CUDA graph) and .verify/peer_compare.py
#      small mode: `selftest --small`, a tiny synthetic pipeline generating SMALL_SIZE (256) pixels
#      square in 2 steps, and `profile attention` at a tiny size
#
# Remote use (the device tool: .verify/bin, .verify/wheels and .verify/sim are git-ignored, so carry them):
#   run(command=".verify/gpu_check.sh", carry=[".verify/bin", ".verify/wheels", ".verify/sim"], timeout_s=600)
# Under the CUDA emulator:  scripts/with-cuda-sim.sh .verify/gpu_check.sh
#
# What comes back: at most 8 files may leave $OUT, so $OUT gets exactly three:
#   $OUT/gpu-check.tar.gz  every log, JSON report, results.tsv and the summary (folder report/)
#   $OUT/summary.json      card, driver, each step's status and seconds, selftest, parities, timings
#   $OUT/summary.txt       the table printed last
# Big files (weights, images, tensors) stay in $WORK. summary.json is refreshed after every step, and
# the summary and archive are written on every exit (a step timing out, INT/TERM/HUP included).
#
# Environment (all optional):
#   OUT=DIR          results (default: REPO/gpu-check-out)
#   WORK=DIR         scratch for weights, images, tensors and the staged report
#                    (default: $TMPDIR or /tmp, /flux2-gpu-check)
#   BUDGET_S=N       whole-script budget in seconds (default 540; 2400 under the emulator). Each step
#                    gets the smaller of its own limit and the time left less RESERVE_S; a step that
#                    cannot get MIN_STEP_S seconds is recorded as skipped.
#   RESERVE_S=N      seconds kept for the summary and the archive (default 20)
#   MIN_STEP_S=N     shortest time worth starting a step with (default 5)
#   LIMIT_SCALE=N    multiplies every step's own limit (default 1; 10 under the emulator)
#   SMALL=1|0        small shapes (default: on under the emulator, i.e. when FLUX2_SIM_ARCH is set
#                    or the device name starts with "flux2 cuda-sim"); SMALL=0 forces full shapes
#   SMALL_SIZE=N     image side of the small-mode generate (default 256)
#   SKIP_SYNTH=1     full mode without the klein-4B synth, its generate and peer_compare
#   SKIP_STEPS="A B" steps to record as skipped without running them (e.g. gpu-tests when the
#                    caller has just run that binary, as scripts/test-cuda-sim.sh does)
#   CHECK_DEVICE=cpu run every step on the CPU reference (checks this script's command lines, not
#                    the GPU; default cuda)
# Exit status: 0 all passed, 1 a step failed/timed out/was interrupted, 2 nothing failed but steps
# were skipped for lack of time.

# shellcheck disable=SC2016,SC2317 # sh -c scripts read their arguments as $1...; on_signal runs from traps
set -uo pipefail

abspath() { case $1 in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$PWD/$1" ;; esac; }
# Every path is resolved against the caller's directory before anything else.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=$(abspath "${1:-$ROOT/.verify/bin}")
OUT=$(abspath "${OUT:-$ROOT/gpu-check-out}")
WORK=$(abspath "${WORK:-${TMPDIR:-/tmp}/flux2-gpu-check}")
REPORT=$WORK/report
RESULTS=$REPORT/results.tsv
FLUX2=$BIN/flux2
GPU_TESTS=$BIN/gpu-tests
F=$ROOT/tests/fixtures
CHECK_DEVICE=${CHECK_DEVICE:-cuda}
RESERVE_S=${RESERVE_S:-20}
MIN_STEP_S=${MIN_STEP_S:-5}
SMALL_SIZE=${SMALL_SIZE:-256}
PY=${PYTHON:-python3}

for v in RESERVE_S MIN_STEP_S SMALL_SIZE ${BUDGET_S:+BUDGET_S} ${LIMIT_SCALE:+LIMIT_SCALE}; do
  case ${!v} in '' | *[!0-9]*) echo "gpu_check: $v=${!v} is not a whole number of seconds" >&2; exit 64 ;; esac
done

now_ms() {
  if [ -n "${EPOCHREALTIME:-}" ]; then
    local t=${EPOCHREALTIME//[!0-9]/}
    echo $((10#$t / 1000))
  else
    date +%s%3N
  fi
}
T0_MS=$(now_ms)
elapsed_s() { echo $((($(now_ms) - T0_MS) / 1000)); }
fmt_secs() { printf '%d.%d' $(($1 / 1000)) $((($1 % 1000) / 100)); }

mkdir -p "$OUT" "$WORK" || { echo "gpu_check: cannot create $OUT or $WORK" >&2; exit 73; }
rm -rf "$REPORT"
mkdir -p "$REPORT"
: >"$RESULTS"
say() { printf '%s\n' "$*" | tee -a "$REPORT/console.log"; }

export FLUX2_FIXTURES=$F
export FLUX2_CACHE_DIR=$WORK/prompt-cache # cold prompt cache: encode timings include the encoder
rm -rf "$FLUX2_CACHE_DIR"
export RUST_BACKTRACE=${RUST_BACKTRACE:-1}
[ "$CHECK_DEVICE" = cuda ] && export FLUX2_EXPECT_GPU=1

CUR_PID="" CUR_STEP="" CUR_T0=0 CUR_LIMIT=0 FINALIZED="" INTERRUPTED=""

record() { # name status rc ms limit note
  local note=${6//$'\t'/ }
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$(fmt_secs "$4")" "$5" "${note//$'\n'/ }" >>"$RESULTS"
}

skip() { # name reason
  record "$1" skipped - 0 - "$2"
  say "$(printf '%-8s %-40s %s' skipped "$1" "($2)")"
}

refresh_summary() { # keep $OUT/summary.json current, in case the whole command is killed
  timeout 30 "$PY" "$ROOT/.verify/summarize.py" "$REPORT" --quiet >/dev/null 2>&1 &&
    cp -f "$REPORT/summary.json" "$OUT/summary.json" 2>/dev/null
}

# step NAME LIMIT_S CMD... : run CMD with its output in $REPORT/NAME.log, under the smaller of
# LIMIT_S*LIMIT_SCALE and the budget left; record pass/fail/timeout/skipped and the seconds.
step() {
  local name=$1 limit=$(($2 * LIMIT_SCALE))
  shift 2
  if [[ " ${SKIP_STEPS:-} " == *" $name "* ]]; then
    skip "$name" "SKIP_STEPS"
    return 1
  fi
  local left=$((BUDGET_S - RESERVE_S - $(elapsed_s)))
  if ((left < MIN_STEP_S)); then
    skip "$name" "no time left: ${left}s of BUDGET_S=${BUDGET_S}"
    return 1
  fi
  ((limit > left)) && limit=$left
  local log=$REPORT/$name.log
  { printf '$'; printf ' %q' "$@"; printf '\n# limit %ss\n' "$limit"; } >"$log"
  CUR_STEP=$name CUR_T0=$(now_ms) CUR_LIMIT=$limit
  # timeout puts the command in its own process group and kills the whole group at the limit.
  timeout -k 10 "$limit" "$@" >>"$log" 2>&1 </dev/null &
  CUR_PID=$!
  wait "$CUR_PID"
  local rc=$? ms=$(($(now_ms) - CUR_T0))
  CUR_PID=""
  local status=fail note=""
  case $rc in
    0) status=pass ;;
    124 | 137) status=timeout note="stopped at the ${limit}s limit" ;;
    *) # the first error line (and, for a panic, its message on the next line)
      note=$(awk '/panicked at/ { p = $0; getline m; print p " " m; exit } /^error|FAILED|Error|error:/ { print; exit }' "$log" | cut -c1-240) ;;
  esac
  record "$name" "$status" "$rc" "$ms" "$limit" "$note"
  say "$(printf '%-8s %-40s %7ss%s' "$status" "$name" "$(fmt_secs "$ms")" "${note:+  $note}")"
  refresh_summary
  [ "$status" = pass ]
}

finalize() {
  [ -n "$FINALIZED" ] && return
  FINALIZED=1
  if [ -n "$CUR_PID" ]; then
    kill -TERM "$CUR_PID" 2>/dev/null
    sleep 1
    kill -KILL "$CUR_PID" 2>/dev/null
    wait "$CUR_PID" 2>/dev/null
    record "$CUR_STEP" interrupted - $(($(now_ms) - CUR_T0)) "$CUR_LIMIT" "script got SIG${INTERRUPTED:-?}"
    CUR_PID=""
  fi
  [ -n "$INTERRUPTED" ] && say "gpu_check: interrupted by SIG$INTERRUPTED after $(elapsed_s)s"
  {
    echo "budget_s=$BUDGET_S elapsed_s=$(elapsed_s) small=$SMALL check_device=$CHECK_DEVICE"
    echo "limit_scale=$LIMIT_SCALE emulated=$EMULATED gpu_ok=$GPU_OK device=$DEVICE_NAME"
    echo "interrupted=${INTERRUPTED:-no}"
  } >"$REPORT/run.txt"
  # Under the emulator, the kernels that ran (one line per target and kernel).
  if [ -n "${FLUX2_SIM_COVERAGE:-}" ] && [ -f "$FLUX2_SIM_COVERAGE" ]; then
    head -c 1048576 "$FLUX2_SIM_COVERAGE" >"$REPORT/sim-coverage.txt"
  fi
  # Logs over 2 MiB keep their first and last MiB, so the archive stays far under 16 MiB.
  local f
  for f in "$REPORT"/*.log; do
    [ -f "$f" ] || continue
    if [ "$(stat -c %s "$f")" -gt 2097152 ]; then
      { head -c 1048576 "$f"; printf '\n\n[... cut by gpu_check.sh ...]\n\n'; tail -c 1048576 "$f"; } >"$f.cut" && mv "$f.cut" "$f"
    fi
  done
  local rc=1
  timeout 60 "$PY" "$ROOT/.verify/summarize.py" "$REPORT" --quiet >"$REPORT/summarize.log" 2>&1
  rc=$?
  if [ ! -s "$REPORT/summary.json" ] || { [ "$rc" != 0 ] && [ "$rc" != 1 ] && [ "$rc" != 2 ]; }; then
    # summarize.py could not run (no python3?): a plain summary from results.tsv.
    {
      echo '{"summarize_error": "summarize.py failed, see summarize.log", "steps": ['
      awk -F'\t' 'BEGIN { sep = "" } { gsub(/["\\]/, "", $6); printf "%s  {\"name\": \"%s\", \"status\": \"%s\", \"rc\": \"%s\", \"seconds\": %s, \"note\": \"%s\"}", sep, $1, $2, $3, $4, $6; sep = ",\n" } END { print "" }' "$RESULTS"
      echo ']}'
    } >"$REPORT/summary.json"
    awk -F'\t' '{ printf "%-12s %-40s %7ss  %s\n", $2, $1, $4, $6 }' "$RESULTS" >"$REPORT/summary.txt"
    grep -qE $'\t(fail|timeout|interrupted)\t' "$RESULTS" && rc=1 || rc=0
  fi
  cp -f "$REPORT/summary.json" "$OUT/summary.json"
  cp -f "$REPORT/summary.txt" "$OUT/summary.txt" 2>/dev/null
  tar -czf "$OUT/gpu-check.tar.gz.part" -C "$WORK" report 2>>"$REPORT/console.log" &&
    mv -f "$OUT/gpu-check.tar.gz.part" "$OUT/gpu-check.tar.gz"
  rm -f "$OUT/gpu-check.tar.gz.part"
  if [ -f "$OUT/gpu-check.tar.gz" ] && [ "$(stat -c %s "$OUT/gpu-check.tar.gz")" -gt 15728640 ]; then
    tar -czf "$OUT/gpu-check.tar.gz" -C "$WORK" report/summary.json report/summary.txt report/results.tsv \
      report/console.log report/run.txt
  fi
  echo
  cat "$REPORT/summary.txt" 2>/dev/null
  echo "(logs: $OUT/gpu-check.tar.gz, summary: $OUT/summary.json; big files in $WORK)"
  EXIT_CODE=$rc
}

on_signal() {
  INTERRUPTED=$1
  trap - INT TERM HUP
  finalize
  case $1 in INT) exit 130 ;; HUP) exit 129 ;; *) exit 143 ;; esac
}
EXIT_CODE=1
SMALL_USER=${SMALL:-} BUDGET_USER=${BUDGET_S:-} SCALE_USER=${LIMIT_SCALE:-}
SMALL=$SMALL_USER EMULATED=0 GPU_OK=0 DEVICE_NAME="" LIMIT_SCALE=${LIMIT_SCALE:-1} BUDGET_S=${BUDGET_S:-540}
emulator_defaults() { # under the emulator: small shapes, longer limits (no 10-minute command there)
  EMULATED=1
  [ -z "$SMALL_USER" ] && SMALL=1
  [ -z "$BUDGET_USER" ] && BUDGET_S=2400
  [ -z "$SCALE_USER" ] && LIMIT_SCALE=10
  return 0
}
[ -n "${FLUX2_SIM_ARCH:-}" ] && emulator_defaults
trap 'finalize' EXIT
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM
trap 'on_signal HUP' HUP

# ---------------------------------------------------------------------------------------------
say "gpu_check: bin=$BIN out=$OUT work=$WORK device=$CHECK_DEVICE"
# build_for_gpu.sh carries the binaries xz-compressed (the device tool carries 64 MiB in all):
# unpack them into the work folder with Python's lzma (no xz needed on the device machine).
for name in flux2 gpu-tests; do
  if [ ! -x "$BIN/$name" ] && [ -f "$BIN/$name.xz" ]; then
    mkdir -p "$WORK/bin"
    python3 -c 'import lzma, shutil, sys
with lzma.open(sys.argv[1]) as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)' "$BIN/$name.xz" "$WORK/bin/$name" && chmod +x "$WORK/bin/$name"
    case $name in flux2) FLUX2=$WORK/bin/flux2 ;; gpu-tests) GPU_TESTS=$WORK/bin/gpu-tests ;; esac
  fi
done
missing=""
for f in "$FLUX2" "$GPU_TESTS"; do [ -x "$f" ] || missing="$missing $f"; done
if [ -n "$missing" ]; then
  say "gpu_check: missing binaries:$missing (build them with .verify/build_for_gpu.sh; carry .verify/bin)"
  record binaries fail - 0 - "missing:$missing"
  [ -x "$FLUX2" ] || { finalize; exit "$EXIT_CODE"; }
fi
command -v "$PY" >/dev/null || say "gpu_check: no $PY: the fixture generate steps fail, the summary is a plain table"

{
  uname -a
  echo "cpus: $(nproc 2>/dev/null)"
  free -g 2>/dev/null
  df -h "$WORK" 2>/dev/null
  "$PY" --version 2>&1
  env | grep -E '^(FLUX2_|CUDA_|LD_LIBRARY_PATH|NVIDIA_)' | sort
} >"$REPORT/machine.txt" 2>&1

if command -v nvidia-smi >/dev/null; then
  timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader \
    >"$REPORT/nvidia-smi.csv" 2>&1
  step nvidia-smi 30 nvidia-smi
else
  skip nvidia-smi "nvidia-smi not found"
fi

step doctor 60 "$FLUX2" doctor
DEVICE_NAME=$(sed -n 's/^gpu 0: //p' "$REPORT/doctor.log" | head -1)
[ -n "$DEVICE_NAME" ] && GPU_OK=1
case $DEVICE_NAME in "flux2 cuda-sim"*) emulator_defaults ;; esac
SMALL=${SMALL:-0}
say "device: ${DEVICE_NAME:-none} (emulated=$EMULATED, small=$SMALL, limit scale $LIMIT_SCALE, budget ${BUDGET_S}s)"

if [ "$SMALL" = 1 ]; then
  # --small picks its sizes (and no timed repetitions under the emulator) by itself.
  step selftest 240 "$FLUX2" selftest --device "$CHECK_DEVICE" --small --json "$REPORT/selftest.json"
  # Cheap, and the only check of the attention paths against f32 in small mode: before the slow steps.
  step profile-attention-small 120 "$FLUX2" profile attention --seq 256 --heads 2 --dim 128 --reps 1 \
    --device "$CHECK_DEVICE" --json "$REPORT/profile_attention.json"
else
  step selftest 180 "$FLUX2" selftest --device "$CHECK_DEVICE" --reps 5 --json "$REPORT/selftest.json"
fi
# Emulator versus hardware: the small selftest's outputs on this GPU and under the carried CUDA
# emulator (.verify/sim, built by build_for_gpu.sh) with the profile of this card, case by case
# (bitwise-equal counts, bf16 ulps); the comparison's log is the record (docs/gpu-validation.md).
SIMDIR=$ROOT/.verify/sim
sim_profile() { # compute capability (doctor) -> emulator profile
  case $(sed -n 's/^ *compute capability: \([0-9.]*\).*/\1/p' "$REPORT/doctor.log" | head -1) in
    8.0) echo sm_80 ;; 8.6 | 8.7) echo sm_86 ;; 8.9) echo sm_89 ;; 9.0) echo sm_90a ;; 12.*) echo sm_120 ;; *) echo "" ;;
  esac
}
if [ "$GPU_OK" = 1 ] && [ "$EMULATED" = 0 ] && [ "$CHECK_DEVICE" = cuda ]; then
  profile=$(sim_profile)
  if [ ! -f "$SIMDIR/libcuda.so.1" ]; then
    skip emulator-vs-hardware "no emulator build in .verify/sim (carry it)"
  elif [ -z "$profile" ]; then
    skip emulator-vs-hardware "no emulator profile for this compute capability"
  elif step selftest-dump-hardware 120 "$FLUX2" selftest --device cuda --small --dump "$WORK/selftest-hw.safetensors" &&
    step selftest-dump-emulator 240 env LD_LIBRARY_PATH="$SIMDIR" FLUX2_SIM_ARCH="$profile" \
      "$FLUX2" selftest --device cuda --small --dump "$WORK/selftest-sim.safetensors"; then
    step emulator-vs-hardware 60 "$FLUX2" compare "$WORK/selftest-hw.safetensors" "$WORK/selftest-sim.safetensors" --ulps
  else
    skip emulator-vs-hardware "a selftest dump failed"
  fi
else
  skip emulator-vs-hardware "needs a real GPU"
fi

# The test binary's every_op_matches_the_cpu_reference is the selftest just run (same sweep, same
# poisoning), so it is left out here; the fixtures (tiny models) are what this step adds.
step gpu-tests 180 "$GPU_TESTS" --test-threads 1 --skip every_op_matches_the_cpu_reference

# CLI fixture parity (bf16 compute against diffusers float32): the gates of tests/gpu.rs. The
# references computed timestep x 1000 in float32, so the runs do too (--timesteps diffusers-f32);
# a bf16 time moves the sinusoid's phase (cosine 0.97, 4.6/255 on base_cfg), which measures the
# rounding, not the kernels.
for c in t2i_nonsquare batch2_hd24_ref guidance_outchannels; do
  d=$F/transformer/$c
  step "forward-transformer-$c" 60 sh -c '"$1" forward transformer --model "$2" --inputs "$2/inputs.safetensors" --out "$3" --device "$4" --timesteps diffusers-f32 &&
    "$1" compare "$3" "$2/expected.safetensors" --min-cosine 0.999 --max-rel 0.05' \
    sh "$FLUX2" "$d" "$WORK/$c.safetensors" "$CHECK_DEVICE"
done
C=$F/components
for comp in text-encoder:text_encoder vae-encode:vae_encode vae-decode:vae_decode; do
  name=${comp%%:*} file=${comp##*:}
  step "forward-$name" 60 sh -c '"$1" forward "$2" --model "$3" --inputs "$4" --out "$5" --device "$7" &&
    "$1" compare "$5" "$6" --min-cosine 0.999' \
    sh "$FLUX2" "$name" "$F/pipeline" "$C/${file}_inputs.safetensors" "$WORK/$file.safetensors" \
    "$C/${file}_expected.safetensors" "$CHECK_DEVICE"
done

# generate --noise on the fixture cases, with each case's prompt, size, steps and guidance.
case_field() { # dir key
  "$PY" -c 'import json, sys; v = json.load(open(sys.argv[1] + "/case.json"))[sys.argv[2]]; print(v if not isinstance(v, list) else " ".join(v))' "$1" "$2" 2>/dev/null
}
for c in t2i_nonsquare t2i_unicode edit_one_ref; do
  d=$F/cases/$c
  prompt=$(case_field "$d" prompt)
  args=(--steps "$(case_field "$d" steps)" --guidance "$(case_field "$d" guidance)")
  refs=$(case_field "$d" refs)
  if [ -n "$refs" ]; then
    for r in $refs; do args+=(--ref "$d/$r"); done
  else
    args+=(--width "$(case_field "$d" width)" --height "$(case_field "$d" height)")
  fi
  step "generate-$c" 60 sh -c 'f=$1 d=$2 out=$3 prompt=$4; shift 4
    "$f" generate --model "$FLUX2_FIXTURES/pipeline" --prompt "$prompt" --noise "$d/noise.safetensors" --out "$out" --timesteps diffusers-f32 "$@" &&
    "$f" compare "$out" "$d/expected.png" --max-pixel-error 2' \
    sh "$FLUX2" "$d" "$WORK/$c.png" "$prompt" "${args[@]}" --device "$CHECK_DEVICE"
done

NO_GPU=""
[ "$CHECK_DEVICE" = cuda ] && [ "$GPU_OK" = 0 ] && NO_GPU="no usable CUDA device (see doctor.log)"

if [ "$SMALL" = 1 ]; then
  # A tiny pipeline with the fixture's configs and random weights, stored in bf16 as synth writes them.
  SP=$WORK/small-pipeline
  rm -rf "$SP"
  if step synth-small 60 "$FLUX2" synth --config "$F/pipeline" --out "$SP"; then
    step "generate-small-$SMALL_SIZE" 300 "$FLUX2" generate --model "$SP" --prompt "a photo of a red fox in the snow" \
      --width "$SMALL_SIZE" --height "$SMALL_SIZE" --steps 2 --seed 1 --out "$WORK/small.png" \
      --device "$CHECK_DEVICE" --json "$REPORT/small-$SMALL_SIZE.json"
  else
    skip "generate-small-$SMALL_SIZE" "needs synth-small"
  fi
  skip bench-gemm "small mode: bench gemm takes only klein shapes (--shapes klein4b|klein9b)"
  skip bench-conv "small mode: bench conv times the VAE decoder at 1024x1024"
  for s in synth-klein-4b generate-klein-4b-1024 bench-dit peer-compare; do skip "$s" "small mode"; done
elif [ -n "$NO_GPU" ]; then
  for s in bench-gemm bench-conv profile-attention synth-klein-4b generate-klein-4b-1024 bench-dit peer-compare; do
    skip "$s" "$NO_GPU"
  done
else
  # cuBLASLt for bench gemm's baseline columns when the library path does not have it: the CUDA
  # toolkit's or PyTorch's wheel's (FLUX2_CUBLASLT names the file; without one the columns say why).
  if [ -z "${FLUX2_CUBLASLT:-}" ]; then
    dirs="/usr/local/cuda/lib64 $("$PY" -c 'import nvidia.cublas as c; print(c.__path__[0] + "/lib")' 2>/dev/null || true)"
    dirs="$dirs $("$PY" -c 'import torch, os; print(os.path.dirname(torch.__file__) + "/lib")' 2>/dev/null || true)"
    for d in $dirs; do
      lib=$(ls "$d"/libcublasLt.so* 2>/dev/null | sort -V | tail -n 1 || true)
      if [ -n "$lib" ]; then export FLUX2_CUBLASLT="$lib"; break; fi
    done
  fi
  # Benchmark tables at klein-4B shapes (cheap, so before the synth).
  step bench-gemm 180 "$FLUX2" bench gemm --shapes klein4b --reps 5 --device "$CHECK_DEVICE" \
    --json "$REPORT/bench_gemm.json"
  # The VAE decoder's convolutions at 1024x1024 (the narrow conv_out also on v2).
  step bench-conv 120 "$FLUX2" bench conv --reps 5 --device "$CHECK_DEVICE" --json "$REPORT/bench_conv.json"
  # Every attention path at klein-4B's DiT shape and the VAE's 512-wide head at 1024², each next to
  # PyTorch SDPA timed in the same run (flux2 profile attention's rows; the DiT shape's also as
  # profile_attention.json).
  step profile-attention 240 "$PY" "$ROOT/.verify/attention_compare.py" --flux2 "$FLUX2" --out "$REPORT" \
    --shapes 4608x24x128,16384x1x512 --reps 5 --device "$CHECK_DEVICE" --first-json "$REPORT/profile_attention.json"
  # A klein-4B-shaped random pipeline (about 16 GB, written once per $WORK) generating 1024x1024.
  K=$WORK/klein-4b
  if [ "${SKIP_SYNTH:-0}" = 1 ]; then
    for s in synth-klein-4b generate-klein-4b-1024 bench-dit peer-compare; do skip "$s" "SKIP_SYNTH=1"; done
  else
    if [ -f "$K/model_index.json" ]; then # synth writes model_index.json last
      skip synth-klein-4b "reused $K"
      have_k=1
    else
      rm -rf "$K"
      step synth-klein-4b 240 "$FLUX2" synth --config klein-4b --out "$K" && have_k=1 || have_k=0
    fi
    if [ "$have_k" = 1 ]; then
      step generate-klein-4b-1024 240 "$FLUX2" generate --model "$K" --prompt "a photo of a red fox in the snow" \
        --width 1024 --height 1024 --seed 1 --count 2 --out "$WORK/klein4b.png" --device "$CHECK_DEVICE" \
        --json "$REPORT/klein4b-1024.json"
      # One forward at 1024² per path, eager and replayed from a CUDA graph, in the same run.
      step bench-dit 240 "$FLUX2" bench dit --model "$K" --width 1024 --height 1024 --reps 3 \
        --device "$CHECK_DEVICE" --json "$REPORT/bench_dit.json"
      step peer-compare 300 "$PY" "$ROOT/.verify/peer_compare.py" --model "$K" --flux2 "$FLUX2" \
        --out "$REPORT" --work "$WORK/peer" --wheels "$ROOT/.verify/wheels" --reps 5
    else
      skip generate-klein-4b-1024 "needs synth-klein-4b"
      skip bench-dit "needs synth-klein-4b"
      skip peer-compare "needs synth-klein-4b"
    fi
  fi
fi

finalize
exit "$EXIT_CODE"
