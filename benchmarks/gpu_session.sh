#!/usr/bin/env bash
# Everything a lent GPU is for, in one call of under 10 minutes (the step limits add up to 560 s), most important
# first, each step with a time limit so that a slow one cannot starve the next:
#   0. the build of the kernels (the CUDA extension with nvcc; the Triton kernels compile as the tests first use them),
#   1. the tests that run on the GPU: every Triton and CUDA row of the suite against the float64 reference, the
#      divergence family and the fused-linear ops included (`-k "triton or cuda"`, without the sm_90 compile checks
#      that CI runs); the CPU-only rest runs in CI,
#   2. the benchmark of fused_reverse_kld: every variant that runs there (naive, naive under torch.compile, triton,
#      cuda, Liger's LigerJSD(beta=1) where its wheel came), 8192 and 16384 tokens x 32000..262144 columns, bf16 and
#      fp32, with the fractions of the bandwidth floor and gpu_backend_choice.json,
#   3. compute-sanitizer memcheck over small runs of every CUDA kernel (benchmarks/sanitizer_runs.py: the reverse
#      KL's and the divergence family's),
#   4. the benchmark of the lm_head-fused reverse KL at H = 4096, V = 128256, 8192 tokens, bf16, beside Liger's
#      fused-linear JSD losses and TRL's chunked divergence (trl.kernels.chunked_divergence) where their wheels came,
#   5. the benchmark of the divergence family (fused_divergence, every divergence, beside Liger's JSD and TVD),
#      8192 x 128256, bf16,
#   6. compute-sanitizer racecheck (the shared-memory row reductions).
# Everything is written under out/benchmarks/cuda-<gpu>-<date>/ (git-ignored); to commit the run, copy that folder to
# benchmarks/results/, and its gpu_backend_choice.json to minillm_kernels/gpu_backend_choice.json (which
# backend="auto" reads). On the device tool's machine ($OUT set) the folder is also packed into $OUT/results.tgz,
# after every step (a call cut short still brings back what was measured).
#
# Needs only this repository and the machine's python3 with a CUDA torch, triton, nvcc and ninja (no internet, no
# venv: the lent machine has torch 2.11 / triton 3.6 / transformers 5.17, pytest, matplotlib, tqdm, and neither
# rouge-score, liger-kernel nor trl). Optional packages come along as wheels in a `.whl/` folder at the repository
# root (benchmarks/gpu_wheels.sh fetches those of benchmarks/gpu_wheels.txt: Liger, TRL and what TRL imports); they
# are installed first, into a folder of their own. A test that needs a test extra the machine lacks is deselected.
#
# --dry-run (or GPU_SESSION_DRY_RUN=1): the same steps on a machine without a GPU, to check before a GPU is lent
# that they would run: the tests are collected (not run), each benchmark runs on the CPU at the --quick sizes with
# the same ops, divergences and variants (each variant checked against the float64 reference first, TRL's and Liger's
# chunked ones included), and compute-sanitizer is replaced by building the sanitizer runs' cases; the time limits are
# 10 times the GPU machine's. $PYTHON picks the
# interpreter (default python3), e.g. a venv with the GPU machine's packages (README, "The GPU session's dry run").
set -uo pipefail
cd "$(dirname "$0")/.."
dry_run=${GPU_SESSION_DRY_RUN:-0}
[ "${1:-}" = "--dry-run" ] && dry_run=1
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
  site=$( [ "$dry_run" = 1 ] && mktemp -d || echo /tmp/site )
  "$py" -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl && export PYTHONPATH="$PYTHONPATH:$site"
fi
today=$(date +%F)
limit_scale=1
if [ "$dry_run" = 1 ]; then
  device=cpu
  dir=out/benchmarks/gpu-session-dry-run-$today
  limit_scale=10  # the limits are the GPU machine's (16 cores); a 2-core CPU builds and compiles far slower
else
  device=cuda
  dir=$("$py" -c "import datetime; from benchmarks.run import default_results_dir; print(default_results_dir('cuda', datetime.date.today().isoformat()))") || exit 1
fi
mkdir -p "$dir"
{ nvidia-smi || echo "(no nvidia-smi)"; "$py" -c "from benchmarks.run import versions; print(versions())"
  "$py" -m pip list 2>/dev/null | grep -iE '^(torch|triton|transformers|liger|trl|datasets) '; } >"$dir/environment.txt" 2>&1
failed=()

step() {  # step NAME SECONDS LOG COMMAND...: run with a time limit, append to LOG, remember a failure
  local name=$1 limit=$(($2 * limit_scale)) log=$3; shift 3
  echo "== $name (limit ${limit} s)" | tee -a "$log"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  local status=${PIPESTATUS[0]}
  echo "== $name: exit status $status after $((SECONDS - start)) s" | tee -a "$log"
  [ "$status" = 0 ] || failed+=("$name")
  if [ -n "${OUT:-}" ]; then tar czf "$OUT/results.tgz" "$dir"; fi
}

# Tests whose test extra is not installed here are deselected (they fail where it is: a missing extra is an error).
deselect=()
"$py" -c "import rouge_score" 2>/dev/null || deselect+=(--deselect tests/test_evaluation.py::test_rouge_l_matches_rouge_score_package)
# Sizes: issue 19's tables on the GPU; the --quick ones on the CPU in a dry run (same ops, variants and divergences).
if [ "$dry_run" = 1 ]; then
  tests=(--collect-only -q)
  logits_sizes=(--quick --dtype bf16 fp32)
  linear_sizes=(--quick)
  divergence_sizes=(--quick)
  sanitizer=("$py" -c "from benchmarks import sanitizer_runs as s; print(len(list(s.cases())), 'reverse-KL and', len(list(s.divergence_cases())), 'divergence cases')")
  memcheck=("${sanitizer[@]}")
  racecheck=("${sanitizer[@]}")
else
  tests=(-q -rs -k "(triton or cuda) and not triton_compile and not cuda_compile")
  "$py" -c "import xdist" 2>/dev/null && tests+=(-n 8)  # pytest-xdist (on the lent machine): 8 processes
  logits_sizes=(--tokens 8192 16384 --vocab 32000 128256 151936 262144 --dtype bf16 fp32)
  linear_sizes=(--hidden 4096 --vocab 128256 --tokens 8192 --dtype bf16)
  divergence_sizes=(--tokens 8192 --vocab 128256 --dtype bf16)
  memcheck=(compute-sanitizer --tool memcheck --error-exitcode 9 "$py" benchmarks/sanitizer_runs.py)
  racecheck=(compute-sanitizer --tool racecheck --error-exitcode 9 "$py" benchmarks/sanitizer_runs.py)
fi

step build 120 "$dir/tests.log" "$py" -c "import minillm_kernels as mk; print('available backends:', mk.available_backends())"
if [[ " ${failed[*]} " == *" build "* ]]; then  # a build killed at its limit leaves its lock: later loads would wait
  find "${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}" -name lock -delete 2>/dev/null
fi
step tests 120 "$dir/tests.log" "$py" -m pytest "${tests[@]}" "${deselect[@]}" tests
step benchmark 120 "$dir/benchmark.log" "$py" -m benchmarks --device "$device" --op reverse_kld "${logits_sizes[@]}" --out "$dir"
step memcheck 50 "$dir/sanitizer.log" "${memcheck[@]}"
step benchmark-linear 50 "$dir/benchmark.log" "$py" -m benchmarks --device "$device" --op linear_reverse_kld "${linear_sizes[@]}" --out "$dir/linear"
step benchmark-divergence 70 "$dir/benchmark.log" "$py" -m benchmarks --device "$device" --op divergence "${divergence_sizes[@]}" --out "$dir/divergence"
step racecheck 30 "$dir/sanitizer.log" "${racecheck[@]}"

echo "failed steps: ${failed[*]:-none}; results in $dir"
[ ${#failed[@]} -eq 0 ]
