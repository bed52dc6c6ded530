#!/usr/bin/env bash
# Run the CPU test suite against an AddressSanitizer build of the extensions.
#
# The tree is copied to a scratch folder (so the checkout's own build is untouched),
# built with -O0 -g -fsanitize=address, and pytest runs with libasan preloaded (CPython
# itself is not instrumented; leak detection is off because CPython keeps memory until
# exit). Any heap overflow, use after free or double free in kvcore aborts the run.
#
#   bash scripts/asan_tests.sh [pytest args]      e.g. -x -q tests/test_prefix_cache.py
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d /tmp/kvcore-asan.XXXXXX)
trap 'rm -rf "$work"' EXIT
git ls-files -z | xargs -0 -I{} cp --parents {} "$work/"
cd "$work"
python3 -m venv venv
# shellcheck disable=SC1091
source venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "cython>=3" "numpy>=1.25" "setuptools>=77" pytest hypothesis
KVCORE_ASAN=1 KVCORE_DEBUG_BUILD=1 python setup.py -q build_ext --inplace 2>&1 | grep -v -i warning || true
for so in kvcore/_*.so; do
  count=$(nm -D "$so" | grep -c __asan_report || true)
  echo "$so: $count AddressSanitizer checks linked"
  [ "$count" -gt 0 ] || { echo "not instrumented: $so"; exit 1; }
done
asan_lib=$(gcc -print-file-name=libasan.so)
echo "running pytest with $asan_lib preloaded"
LD_PRELOAD="$asan_lib" ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:strict_string_checks=1" \
  python -m pytest -p no:cacheprovider -m "not cuda" "${@:--q}"
