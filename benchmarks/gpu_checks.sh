#!/usr/bin/env bash
# All GPU checks in one go: native kernel tests, model tests on the GPU, then the benchmarks.
# Usage (repo root): OUT=dir LSERVE_COMMIT=sha bash benchmarks/gpu_checks.sh [bench args...]
# On a machine without network, wheels of missing packages (gguf) are installed from .whl/.
set -uo pipefail
OUT=${OUT:-/tmp/lserve_gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$OUT/device.txt"
timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests/test_sparse_prefill.py \
  tests/test_paged_decode.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -5
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_llama_parity.py \
  tests/test_decode.py tests/test_kv_cache.py tests/test_lserve_decode.py \
  2>&1 | tee -a "$OUT/gpu_tests.log" | tail -5
# Which benchmarks: BENCHES="prefill_attention decode_attention decode_e2e" (the default).
for bench in ${BENCHES:-prefill_attention decode_attention decode_e2e}; do
  timeout ${BENCH_TIMEOUT:-420} python3 benchmarks/$bench.py \
    --out "$OUT/${bench}_h100.jsonl" "$@" 2>&1 | tee "$OUT/$bench.log" | tail -40
done
