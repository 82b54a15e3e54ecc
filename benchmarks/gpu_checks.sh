#!/usr/bin/env bash
# All GPU checks in one command, most informative first, within 8 minutes on an H200 (compiles
# included). Each step runs under its own `timeout`, cut further so the whole run stays within
# GPU_CHECKS_BUDGET_S (470 s); a step that fails or times out does not stop the next one.
#   device (20 s)       device.txt: nvidia-smi name/memory/driver, commit, jax version and
#                       devices, copy bandwidth measured now (benchmarks/provenance.py; exported
#                       to the benchmarks as LSERVE_COPY_GBPS)
#   gpu_tests (100 s)   only the gpu-marked tests (not the interpret-mode copies CPU CI runs):
#                       decode kernel, page-selection kernels (tests/test_page_select.py, when
#                       present), the model path (LLM pallas vs xla, float and int8/int4
#                       KV), prefill kernel, paged chunked-prefill kernel
#   decode_attention (110 s)  one layer, batch 1: dense and LServe's shipped knobs, 256K and 32K,
#                       bf16 and int8 KV pages
#   hlo_counts (40 s)   compiled-HLO counts of a decode step (when benchmarks/hlo_counts.py exists)
#   decode_e2e (150 s)  Llama-3-8B shape, random bf16 weights, 256K: LServe, then dense, each
#                       with float weights and KV, then int8 weights and KV
#   prefill_attention (50 s)  one prompt length (64K): ours dense and LServe, cuDNN, then the
#                       same prompt in 2,048-token chunks through the paged prefill kernel
#
# Usage (repo root): OUT=dir [LSERVE_COMMIT=sha] bash benchmarks/gpu_checks.sh [--dry-run]
#   --dry-run: the same steps on CPU at small sizes (--small; the gpu tests are collected and
#   skipped), so the script is exercised where there is no GPU; OUT defaults to a new temp dir.
# $OUT receives at most 6 files, each written as it is produced (records are flushed line by
# line): device.txt, gpu_checks.log (all output of all steps, appended), decode_attention.jsonl,
# hlo_counts.jsonl, decode_e2e.jsonl, prefill_attention.jsonl. Plots go to a scratch directory.
# stdout shows each step's last lines and a summary. Exit status 0 when every step passed.
# On a machine without network, wheels of missing packages (gguf) are installed from .whl/.
# PYTHON selects the interpreter (default python3).
set -uo pipefail

DRY_RUN=0
if [[ ${1:-} == --dry-run ]]; then
  DRY_RUN=1
  shift
fi
if (( $# )); then
  echo "usage: OUT=dir bash benchmarks/gpu_checks.sh [--dry-run]" >&2
  exit 2
fi
if (( DRY_RUN )); then
  OUT=${OUT:-$(mktemp -d -t lserve_gpu_checks.XXXXXX)}
else
  OUT=${OUT:-/tmp/lserve_gpu_out}
fi
mkdir -p "$OUT"
LOG="$OUT/gpu_checks.log"
WORK=$(mktemp -d -t lserve_gpu_work.XXXXXX)  # plots, step outputs, wheels: kept out of $OUT
BUDGET_S=${GPU_CHECKS_BUDGET_S:-470}
PY=${PYTHON:-python3}
SECONDS=0

export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WORK/site" .whl/*.whl >>"$LOG" 2>&1 && export PYTHONPATH="$WORK/site"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# One commit for every record; the tree may travel without .git, then the caller names it.
LSERVE_COMMIT=${LSERVE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export LSERVE_COMMIT

if (( DRY_RUN )); then
  SMALL=(--small)
  DECODE_ARGS=(--small --contexts 8192 --batches 1 --variants default --kv-cache-dtypes auto int8)
  E2E_ARGS=(--small --contexts 4096 --modes lserve dense --quant auto:auto,int8:int8)
  PREFILL_ARGS=(--small --lengths 512)
else
  SMALL=()
  # 256K first: the targets are there; dense at each context for the speed-ups.
  DECODE_ARGS=(--contexts 262144 32768 --batches 1 --variants default --kv-cache-dtypes auto int8)
  # LServe first: its ratio to the weight floor needs no dense run.
  E2E_ARGS=(--contexts 262144 --modes lserve dense --quant auto:auto,int8:int8)
  PREFILL_ARGS=(--lengths 65536)
fi

SUMMARY=()
FAILED=0

# step NAME LIMIT_S CMD...: run CMD under `timeout` (LIMIT_S, or what is left of the budget),
# its output appended to $LOG as it comes; then print its last lines that are not JSON records.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$(( BUDGET_S - SECONDS ))
  (( limit > left )) && limit=$left
  if (( limit < 5 )); then
    echo "== $name: not run, budget spent" | tee -a "$LOG"
    SUMMARY+=("$name: not run (budget spent)")
    FAILED=$(( FAILED + 1 ))
    return
  fi
  echo "== $name: $(date -u +%T), limit ${limit}s, at ${SECONDS}s: $*" | tee -a "$LOG"
  local start=$SECONDS
  timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$LOG" >"$WORK/$name.out"
  local rc=${PIPESTATUS[0]}
  grep -v '^{' "$WORK/$name.out" | tail -n "${TAIL_LINES:-20}"
  local result="rc $rc"
  (( rc == 124 || rc == 137 )) && result="timed out (rc $rc)"
  (( rc == 0 )) && result="ok"
  (( rc != 0 )) && FAILED=$(( FAILED + 1 ))
  SUMMARY+=("$name: $result in $(( SECONDS - start ))s")
  echo "== $name: $result in $(( SECONDS - start ))s" >>"$LOG"
}

MODE=gpu
(( DRY_RUN )) && MODE=dry-run
echo "== gpu_checks ($MODE) $(date -u +%FT%TZ), OUT=$OUT, commit $LSERVE_COMMIT" | tee -a "$LOG"

{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $LSERVE_COMMIT"
  if command -v nvidia-smi >/dev/null 2>&1; then
    timeout 15 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
      | sed 's/^/gpu: /'
  else
    echo "gpu: none (no nvidia-smi)"
  fi
} >"$OUT/device.txt" 2>&1
step device 20 "$PY" benchmarks/provenance.py ${SMALL[@]+"${SMALL[@]}"}
cat "$WORK/device.out" >>"$OUT/device.txt"
GBPS=$(sed -n 's/^copy_bandwidth_gbps: \([0-9.]*\).*/\1/p' "$OUT/device.txt")
[[ -n $GBPS ]] && export LSERVE_COPY_GBPS=$GBPS

TESTS=(tests/test_paged_decode.py)
[[ -f tests/test_page_select.py ]] && TESTS+=(tests/test_page_select.py)
TESTS+=(tests/test_gpu_model_path.py tests/test_sparse_prefill.py tests/test_paged_prefill.py)
step gpu_tests 100 "$PY" -m pytest -m gpu -v -rfEs -p no:cacheprovider \
  --continue-on-collection-errors --durations=5 "${TESTS[@]}"

step decode_attention 110 "$PY" benchmarks/decode_attention.py "${DECODE_ARGS[@]}" \
  --out "$OUT/decode_attention.jsonl" --plot "$WORK/decode_attention.png"

if [[ -f benchmarks/hlo_counts.py ]]; then
  step hlo_counts 40 "$PY" benchmarks/hlo_counts.py ${SMALL[@]+"${SMALL[@]}"} \
    --out "$OUT/hlo_counts.jsonl"
else
  SUMMARY+=("hlo_counts: not run (no benchmarks/hlo_counts.py)")
fi

step decode_e2e 150 "$PY" benchmarks/decode_e2e.py "${E2E_ARGS[@]}" \
  --out "$OUT/decode_e2e.jsonl" --plot "$WORK/decode_e2e.png"

step prefill_attention 50 "$PY" benchmarks/prefill_attention.py "${PREFILL_ARGS[@]}" \
  --out "$OUT/prefill_attention.jsonl" --plot "$WORK/prefill_attention.png"

{
  echo "== summary ($SECONDS s, $FAILED failed; OUT=$OUT)"
  grep -E '^(gpu|copy_bandwidth_gbps|device_kind|jax):' "$OUT/device.txt"
  printf '  %s\n' "${SUMMARY[@]}"
} | tee -a "$LOG"
rm -rf "$WORK"
(( FAILED == 0 ))
