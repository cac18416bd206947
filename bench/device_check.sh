#!/usr/bin/env bash
# bench/device_check.sh: the one prepared script for a lent GPU machine (an H200 with no internet, whose
# python3 has jax 0.11.x with the CUDA 13 plugin, flax, optax, pytest, pytest-timeout, transformers, numpy,
# sentencepiece, aiohttp; see /work/.library/device/). Everything is logged under $OUT; each stage runs
# under `timeout`, capped by what is left of a 540 s budget, so the whole run ends within ~9 minutes.
#
#   stage       what                                                                   log in $OUT
#   setup       nvidia-smi, python3 and jax versions, jax.devices(); carried wheels;    setup.log
#               pip install --no-deps --no-build-isolation -e . (else PYTHONPATH=.)
#   bandwidth   HBM copy bandwidth (jitted x + 1 on 1/4/16 GiB, block_until_ready) and   bandwidth.log
#               an int8 vs bf16 [m,4096] x [4096,14336] matmul with its compiled HLO
#   pallas      tests/test_pallas_attention.py with SGL_JAX_PALLAS_NATIVE=1: the GPU      pallas.log
#               kernel compiled by Triton and run natively (not interpreted)
#   model       tests/test_model.py (tiny models vs the HF fp32 references) and the      model.log
#               non-slow tests/test_quant.py, float32 matmuls at highest precision
#   decode      bench/bench_model.py on random Llama-3-8B-shaped bf16 weights (nothing  decode.log
#               downloaded), decode batch 1, 8, 32, 64 at context 1024, pallas_gpu
#               attention, beside the floor (weight + KV bytes / the HBM bandwidth
#               measured in the same process); then the same with int8 weights (last,
#               in whatever time is left)
#   structured  bench/bench_structured.py --parts json (jump-forward on vs off) on a     structured.log
#               random-weight SmolLM2 (bench/random_gguf.py: the real tokenizer from
#               .devdata/, random weights made there; the real 98 MB GGUF cannot travel)
#   summary     each stage's exit status and seconds; results.tgz holds the JSON figures  summary.log
#
# Needs what `--prepare` puts in .whl/ (gguf, which the loader imports, and jsonschema with its dependencies,
# for the structured bench: none is in the device image) and .devdata/ (SmolLM2's metadata and tokenizer,
# 1.8 MB); both are git-ignored, so the call carries them:
#
#   bash bench/device_check.sh --prepare            # here, once (pip download of 5 wheels, the vocab file)
#   run(command="bash bench/device_check.sh", carry=[".whl", ".devdata"], timeout_s=600)
#
# This script was NOT run on a GPU when it was written (the task that wrote it had no device). What was
# checked: `bash bench/device_check.sh --cpu-smoke` runs every stage's Python at tiny size on the CPU
# (JAX_PLATFORMS=cpu; the Pallas kernel interpreted instead of native; 2-layer models; pip only --dry-run),
# so the scripts and their options work; the GPU-only parts (native Triton compile, HBM sizes, the 8B
# shapes, timings) are unverified until the first real run. (In the smoke run `pip install -e .` is a
# --dry-run, which fails on this project's dev venv, setuptools 65 without `wheel`; the image has both.)
# A device call sends the checkout the calling session was started in: run it from one that has this file.
set -u -o pipefail
export PYTHONUNBUFFERED=1

MODE=device
case "${1:-}" in
  "") ;;
  --prepare) MODE=prepare ;;
  --cpu-smoke) MODE=smoke ;;
  *) echo "usage: bash bench/device_check.sh [--prepare | --cpu-smoke]" >&2; exit 2 ;;
esac

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
PY=${PY:-python3}
VOCAB=.devdata/smollm2-vocab.gguf
WHEELS="gguf==0.19.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1"

prepare() {
  mkdir -p .whl .devdata
  # cp312 manylinux wheels for the device's Python 3.12 (rpds-py is the only binary one)
  # shellcheck disable=SC2086
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl $WHEELS || return 1
  local model
  model=$("$PY" -c 'from sgl_jax.models.hub import resolve_model; print(resolve_model("smollm2-135m"))') || return 1
  "$PY" bench/random_gguf.py --from "$model" --vocab-only "$VOCAB" || return 1
  ls -la .whl .devdata
}

if [ "$MODE" = prepare ]; then
  prepare
  exit $?
fi

if [ "$MODE" = smoke ]; then
  export JAX_PLATFORMS=cpu
  OUT=${OUT:-/tmp/sgl_jax_device_check_smoke}
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
  export JAX_PLATFORMS=cuda
  OUT=${OUT:-/tmp/sgl_jax_device_check}
fi
mkdir -p "$OUT"
JSON=$(mktemp -d)
START=$(date +%s)
BUDGET=${BUDGET:-540}
: >"$OUT/summary.log"

# stage NAME LOG LIMIT_S CMD...: run CMD under timeout min(LIMIT_S, budget left), appending to $OUT/LOG
stage() {
  local name=$1 log=$2 limit=$3
  shift 3
  local left=$((START + BUDGET - $(date +%s)))
  if [ "$left" -lt 20 ]; then
    echo "[$name] SKIPPED: ${left}s of the ${BUDGET}s budget left" | tee -a "$OUT/summary.log"
    return 0
  fi
  local t=$((limit < left ? limit : left)) t0 rc
  t0=$(date +%s)
  echo "== [$name] timeout ${t}s: $*" | tee -a "$OUT/$log"
  timeout -k 10 "$t" "$@" >>"$OUT/$log" 2>&1
  rc=$?
  local msg="[$name] rc=$rc in $(($(date +%s) - t0))s"
  [ "$rc" -eq 124 ] && msg="$msg (TIMED OUT at ${t}s)"
  echo "$msg" | tee -a "$OUT/summary.log"
  tail -n 12 "$OUT/$log" | sed "s/^/  [$name] /"
  return 0
}

setup_env() {
  echo "mode $MODE, $(date -u +%FT%TZ), $(uname -m), budget ${BUDGET}s, OUT=$OUT"
  if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi: not found (no NVIDIA driver here)"; fi
  "$PY" -c 'import sys, jax, jaxlib, flax; print(sys.version); print("jax", jax.__version__, "jaxlib",
jaxlib.__version__, "flax", flax.__version__); print("devices", jax.devices()); print("backend", jax.default_backend())'
  if ls .whl/*.whl >/dev/null 2>&1; then
    if [ "$MODE" = smoke ]; then
      echo "carried wheels (smoke: not installed, this Python may not be 3.12):"; ls .whl
    else
      "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        && echo "installed the carried wheels into /tmp/site"
    fi
  else
    echo "WARNING: no .whl/ carried: 'import gguf' (the loader) and jsonschema (structured) may fail; run --prepare"
  fi
  if [ "$MODE" = smoke ]; then
    "$PY" -m pip install --dry-run --no-index --no-deps --no-build-isolation -e . \
      || echo "pip install -e . (dry run) failed: PYTHONPATH=. is used"
  elif "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .; then
    echo "pip install -e . done"
  else
    echo "pip install -e . failed: falling back to PYTHONPATH=."
  fi
  "$PY" -c 'import gguf, sgl_jax, pallas_kernels; print("imports ok:", sgl_jax.__file__)'
}

if [ "$MODE" = device ]; then
  export PYTHONPATH="/tmp/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # set before setup: a failed install still runs
fi
stage setup setup.log 60 bash -c "$(declare -f setup_env); MODE=$MODE PY=$PY OUT=$OUT BUDGET=$BUDGET setup_env"

# ------------------------------------------------------------------------------------------ the stages
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -o addopts= -rfE)
if [ "$MODE" = smoke ]; then
  stage bandwidth bandwidth.log 60 "$PY" bench/floors.py --device-only --sizes-mib 64,256 \
    --json "$JSON/bandwidth.json"
  stage pallas pallas.log 120 "${PYTEST[@]}" tests/test_pallas_attention.py -k "pallas_gpu and kv2g3 and decode"
  stage model model.log 120 "${PYTEST[@]}" tests/test_model.py tests/test_quant.py \
    -k "(alone and llama and not tied) or round_trip"
  DEC=(--random-weights smollm2-135m --layers 2 --dtype float32 --attention jnp --only decode --batches 1,2
       --ctxs 64 --decode-n 2 --quick)
  STRUCT_LAYERS=(--layers 2)
  STRUCT=(--n-requests 2 --max-new-tokens 160 --modes jump_forward --engine dtype=float32
          --engine decode_buckets=1,2 --engine max_running_requests=2 --engine prefill_block_buckets=1,2)
  [ -f "$VOCAB" ] || "$PY" bench/random_gguf.py --from "$("$PY" -c \
    'from sgl_jax.models.hub import resolve_model; print(resolve_model("smollm2-135m"))')" --vocab-only "$VOCAB"
else
  stage bandwidth bandwidth.log 45 "$PY" bench/floors.py --device-only --sizes-mib 1024,4096,16384 \
    --json "$JSON/bandwidth.json"
  stage pallas pallas.log 110 env SGL_JAX_PALLAS_NATIVE=1 JAX_DEFAULT_MATMUL_PRECISION=highest \
    "${PYTEST[@]}" --timeout 90 tests/test_pallas_attention.py
  stage model model.log 90 env JAX_DEFAULT_MATMUL_PRECISION=highest \
    "${PYTEST[@]}" --timeout 80 tests/test_model.py tests/test_quant.py -m "not slow" -k "not engine"
  DEC=(--random-weights llama-3-8b --dtype bfloat16 --attention pallas_gpu --only decode --batches 1,8,32,64
       --ctxs 1024 --decode-n 10)
  STRUCT_LAYERS=()
  STRUCT=(--n-requests 16 --modes jump_forward,no_jump_forward --engine dtype=bfloat16)
fi
stage decode decode.log 170 "$PY" bench/bench_model.py "${DEC[@]}" --quant none --json "$JSON/decode_bf16.json"
stage structured structured.log 130 bash -c "'$PY' bench/random_gguf.py --from '$VOCAB' \
  --out /tmp/smollm2-random.gguf ${STRUCT_LAYERS[*]} && '$PY' bench/bench_structured.py --parts json --repeats 1 \
  --seq 0 --engine model=/tmp/smollm2-random.gguf --engine compile_cache_dir=/tmp/sgl_jax_jax_cache \
  ${STRUCT[*]} --json '$JSON/structured.json'"
stage decode_int8 decode.log 100 "$PY" bench/bench_model.py "${DEC[@]}" --quant int8 \
  --json "$JSON/decode_int8.json"

tar -czf "$OUT/results.tgz" -C "$JSON" . && rm -rf "$JSON"
echo "total $(($(date +%s) - START))s; logs in $OUT:" | tee -a "$OUT/summary.log"
ls -la "$OUT"
