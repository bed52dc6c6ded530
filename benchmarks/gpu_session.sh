#!/usr/bin/env bash
# One call on a lent GPU machine: build, cuda tests, device benchmark, simulate, sanitizers.
# Usage: bash benchmarks/gpu_session.sh OUTDIR   (see the project's GPU notes)
# FlashInfer: carry its wheels in .whl/ (shared/wheels); they are installed first when present.
set -uo pipefail
OUT=${1:?output folder}
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
  export FLASHINFER_WORKSPACE_BASE=/tmp/fi FLASHINFER_CUDA_ARCH_LIST=9.0 \
    TVM_FFI_CACHE_DIR=/tmp/tvmffi MAX_JOBS=16
fi
which python; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -m pip install --no-build-isolation --no-deps -q -e . >"$OUT/build.log" 2>&1 || {
  tail -40 "$OUT/build.log"; exit 1; }
python -c "import kvcore, cupy, torch; print('kvcore', kvcore.__version__, 'cupy', cupy.__version__, 'torch', torch.__version__)"
python -c "import flashinfer; print('flashinfer', flashinfer.__version__)" || echo "no flashinfer"
echo "== cuda tests"
timeout "${TEST_TIMEOUT:-360}" python -m pytest -q -m cuda -p no:cacheprovider -rs 2>&1 | tee "$OUT/cuda_tests.log" | tail -25
echo "== device benchmark"
timeout 300 python benchmarks/bench_device.py --out "$OUT/h200.json" 2>&1 | tee "$OUT/bench_device.log" | tail -45
if [ "${SIMULATE:-1}" = 1 ]; then
  echo "== kvcore simulate (auto: GPU)"
  timeout 240 python -m kvcore simulate --quiet --json "$OUT/simulate_h200.json" 2>&1 | tee "$OUT/simulate_h200.log"
fi
if [ "${SANITIZE:-1}" = 1 ]; then
  echo "== compute-sanitizer memcheck"
  timeout "${SANITIZER_TIMEOUT:-230}" compute-sanitizer --tool memcheck --error-exitcode 9 \
    python -m pytest -q -m cuda -p no:cacheprovider -k "not flashinfer and not negative and (64 or 7 or strided or slot or graph or adopted or ordered or releases or returned or readme)" \
    2>&1 | tee "$OUT/memcheck.log" | tail -6
  echo "memcheck exit: $?"
  echo "== compute-sanitizer racecheck"
  timeout "${SANITIZER_TIMEOUT:-230}" compute-sanitizer --tool racecheck --error-exitcode 9 \
    python -m pytest -q -m cuda -p no:cacheprovider -k "float16-NHD-16-128 or float32-HND-64-7 or padded" \
    2>&1 | tee "$OUT/racecheck.log" | tail -6
  echo "racecheck exit: $?"
fi
