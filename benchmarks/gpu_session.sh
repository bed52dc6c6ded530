#!/usr/bin/env bash
# One call on a lent GPU machine: build, cuda tests, device benchmark, sanitizers.
# Usage: bash benchmarks/gpu_session.sh OUTDIR   (see the project's GPU notes)
set -uo pipefail
OUT=${1:?output folder}
export PYTHONUNBUFFERED=1
which python; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -m pip install --no-build-isolation --no-deps -q -e . >"$OUT/build.log" 2>&1 || {
  tail -40 "$OUT/build.log"; exit 1; }
python -c "import kvcore, cupy, torch; print('kvcore', kvcore.__version__, 'cupy', cupy.__version__, 'torch', torch.__version__)"
echo "== cuda tests"
timeout 300 python -m pytest -q -m cuda -p no:cacheprovider 2>&1 | tee "$OUT/cuda_tests.log" | tail -25
echo "== device benchmark"
timeout 300 python benchmarks/bench_device.py --out "$OUT/h200.json" 2>&1 | tee "$OUT/bench_device.log" | tail -25
echo "== kvcore simulate (auto: GPU)"
timeout 240 python -m kvcore simulate --quiet --json "$OUT/simulate_h200.json" 2>&1 | tee "$OUT/simulate_h200.log"
if [ "${SANITIZE:-1}" = 1 ]; then
  echo "== compute-sanitizer memcheck"
  timeout "${SANITIZER_TIMEOUT:-240}" compute-sanitizer --tool memcheck --error-exitcode 9 \
    python -m pytest -q -m cuda -p no:cacheprovider -k "not torch and (64 or 7 or strided or slot or graph)" \
    2>&1 | tee "$OUT/memcheck.log" | tail -6
  echo "memcheck exit: $?"
  echo "== compute-sanitizer racecheck"
  timeout "${SANITIZER_TIMEOUT:-240}" compute-sanitizer --tool racecheck --error-exitcode 9 \
    python -m pytest -q -m cuda -p no:cacheprovider -k "float16-NHD-16-128 or float32-HND-64-7 or graph" \
    2>&1 | tee "$OUT/racecheck.log" | tail -6
  echo "racecheck exit: $?"
fi
