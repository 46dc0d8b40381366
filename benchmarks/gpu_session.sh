#!/usr/bin/env bash
# Everything a lent GPU is for, in one call of under 10 minutes (step limits: 560 s), most important first:
#   1. the whole test suite on the GPU (Triton and the CUDA C++ kernels against the float64 reference; the
#      first use builds the CUDA extension with nvcc, timed in tests.log),
#   2. the benchmark of fused_reverse_kld (every variant that runs there; vocabularies 32000..262144, 4096 and
#      16384 tokens, bf16 and fp32), with the fractions of the bandwidth floor and gpu_backend_choice.json,
#   3. compute-sanitizer memcheck over small runs of every CUDA kernel variant (benchmarks/sanitizer_runs.py),
#   4. the benchmark of fused_token_stats in bf16,
#   5. the benchmark of fused_linear_reverse_kld at H = 4096, V = 128256, 8192 tokens, bf16 (beside Liger's
#      fused-linear JSD where its wheel came along),
#   6. compute-sanitizer racecheck (the shared-memory row reductions).
# Each step has a time limit, so a slow one cannot starve the next. Everything is written under
# out/benchmarks/cuda-<gpu>-<date>/ (git-ignored); to commit the run, copy that folder to benchmarks/results/, and
# its gpu_backend_choice.json to minillm_kernels/gpu_backend_choice.json (which backend="auto" reads). On the device
# tool's machine ($OUT set) the folder is also packed into $OUT/results.tgz.
#
# Needs only this repository and the machine's python3 with a CUDA torch, triton, nvcc and ninja (no internet,
# no venv: the lent machine has torch 2.11 / triton 3.6, pytest, matplotlib, tqdm). Optional packages such as
# liger-kernel can come along as wheels in a `.whl/` folder at the repository root; they are installed first.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
dir=$(python3 -c "import datetime; from benchmarks.run import default_results_dir; print(default_results_dir('cuda', datetime.date.today().isoformat()))") || exit 1
mkdir -p "$dir"
{ nvidia-smi; python3 -c "from benchmarks.run import versions; print(versions())"; python3 -m pip list 2>/dev/null | grep -iE '^(torch|triton|liger)'; } >"$dir/environment.txt" 2>&1
failed=()

step() {  # step NAME SECONDS LOG COMMAND...: run with a time limit, append to LOG, remember a failure
  local name=$1 limit=$2 log=$3; shift 3
  echo "== $name (limit ${limit} s)" | tee -a "$log"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  local status=${PIPESTATUS[0]}
  echo "== $name: exit status $status after $((SECONDS - start)) s" | tee -a "$log"
  [ "$status" = 0 ] || failed+=("$name")
}

step tests 160 "$dir/tests.log" python3 -m pytest -q -rs tests
step benchmark 180 "$dir/benchmark.log" python3 -m benchmarks --device cuda --op reverse_kld --out "$dir"
step memcheck 50 "$dir/sanitizer.log" compute-sanitizer --tool memcheck --error-exitcode 9 python3 benchmarks/sanitizer_runs.py
step benchmark-token-stats 70 "$dir/benchmark.log" python3 -m benchmarks --device cuda --op token_stats --dtype bf16 --out "$dir/token_stats"
step benchmark-linear 60 "$dir/benchmark.log" python3 -m benchmarks --device cuda --op linear_reverse_kld --hidden 4096 --vocab 128256 --tokens 8192 --dtype bf16 --out "$dir/linear"
step racecheck 40 "$dir/sanitizer.log" compute-sanitizer --tool racecheck --error-exitcode 9 python3 benchmarks/sanitizer_runs.py

echo "failed steps: ${failed[*]:-none}; results in $dir"
if [ -n "${OUT:-}" ]; then tar czf "$OUT/results.tgz" "$dir"; fi
[ ${#failed[@]} -eq 0 ]
