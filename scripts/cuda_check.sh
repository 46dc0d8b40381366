#!/usr/bin/env bash
# First checks of the CUDA backend on a GPU machine, in one call (a few minutes): the JIT build (timed), the
# CUDA tests, then compute-sanitizer's memcheck (out-of-bounds and misaligned accesses), racecheck (shared-memory
# hazards in the row reductions) and synccheck on small runs of every kernel variant (scripts/cuda_check.py).
# Needs the machine's python3 with a CUDA torch, nvcc and ninja; prints a line per step and exits non-zero if any
# step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
failed=()

echo "== build"
start=$(date +%s)
python3 -c "from minillm_kernels.cuda import load_extension; assert load_extension() is not None" || exit 1
echo "build (or cached load): $(( $(date +%s) - start )) s"

echo "== tests"
timeout 300 python3 -m pytest -q -rs tests/test_cuda.py tests/test_reverse_kld.py -k "cuda" || failed+=(tests)

for tool in memcheck racecheck synccheck; do
  echo "== compute-sanitizer --tool $tool"
  timeout 180 compute-sanitizer --tool "$tool" --error-exitcode 9 python3 scripts/cuda_check.py || failed+=("$tool")
done

if [ ${#failed[@]} -eq 0 ]; then echo "cuda_check: all passed"; else echo "cuda_check: FAILED: ${failed[*]}"; exit 1; fi
