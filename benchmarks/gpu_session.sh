#!/usr/bin/env bash
# Everything a lent GPU is for, in one call of the device tool (`bash benchmarks/gpu_session.sh`, under its 10-minute
# limit: the step limits add up to 480 s), most important first, each step with a time limit so that a slow one
# cannot starve the next:
#   build                 the kernels: the CPU and CUDA extensions (nvcc, ninja); Triton's compile as tests use them,
#   tests                 every Triton and CUDA row of the suite against the float64 reference, the divergence family,
#                         the sparse teacher and the fused-linear ops included (`-k "triton or cuda"`, without the
#                         sm_90 compile checks CI runs; pytest-xdist's 8 processes where installed); the CPU rest runs
#                         in CI,
#   benchmark             fused_reverse_kld: every variant that runs there (naive, naive under torch.compile, triton,
#                         cuda, Liger's LigerJSD(beta=1) where its wheel came), 8192 and 16384 tokens x 32000..262144
#                         columns, bf16 and fp32, with the fractions of the bandwidth floor and gpu_backend_choice.json,
#   memcheck              compute-sanitizer memcheck over small runs of every CUDA kernel (benchmarks/sanitizer_runs.py),
#   benchmark-linear      the lm_head-fused reverse KL at H = 4096, V = 128256, 8192 tokens, bf16, beside Liger's
#                         fused-linear JSD losses and TRL 1.16's chunked divergence (`trl_chunked`) where their wheels
#                         came,
#   benchmark-divergence  fused_divergence, every divergence of the family, 8192 x 128256, bf16 (beside Liger's JSD and
#                         TVD where its wheel came),
#   racecheck             compute-sanitizer racecheck (the shared-memory row reductions).
# Everything is written under out/benchmarks/cuda-<gpu>-<date>/ (git-ignored); to commit the run, copy that folder to
# benchmarks/results/, and its gpu_backend_choice.json to minillm_kernels/gpu_backend_choice.json (which
# backend="auto" reads). On the device tool's machine ($OUT set) the folder is also packed into $OUT/results.tgz
# after every step (a call cut short still brings back what was measured).
#
# Needs only this repository and the machine's python3 with a CUDA torch, triton, nvcc and ninja (no internet, no
# venv: the lent machine has torch 2.11 / triton 3.6 / transformers 5.17, pytest, pytest-xdist, matplotlib, tqdm, and
# neither rouge-score, liger-kernel nor trl: benchmarks/gpu_machine_requirements.txt). Optional packages come along as
# wheels in a `.whl/` folder at the repository root (`bash benchmarks/gpu_wheels.sh` fetches those of
# benchmarks/gpu_wheels.txt: Liger, TRL and what TRL imports; the device call then carries ".whl"); they are installed
# first, into a folder of their own. Without them their variants are left out and said so, and the run goes on.
#
# --dry-run (or GPU_SESSION_DRY_RUN=1): the same steps on a machine without a GPU, to check before a GPU is lent that
# they run, each GPU-only part skipped and named as such: the build builds the CPU extension only, the tests are
# collected with the GPU run's selection (not run: the rows need a GPU), each benchmark runs on the CPU at the --quick
# sizes with the same ops, divergences and variants where they run on a CPU (each checked against the float64
# reference first, TRL's chunked divergence and Liger's chunked loss included where installed), and compute-sanitizer
# is replaced by enumerating the sanitizer runs' cases. The time limits are 30 times the GPU machine's. $PYTHON picks
# the interpreter (default python3), e.g. the venv with the GPU machine's packages (README, "The GPU session's dry
# run"); the C++ build goes to $TORCH_EXTENSIONS_DIR, by default a folder per torch version under out/.
set -uo pipefail
cd "$(dirname "$0")/.."
dry_run=${GPU_SESSION_DRY_RUN:-0}
[ "${1:-}" = "--dry-run" ] && dry_run=1
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
session_start=$SECONDS
if compgen -G ".whl/*.whl" >/dev/null; then  # the optional packages' wheels, into a folder of their own
  if [ "$dry_run" = 1 ]; then site=$(mktemp -d) && trap 'rm -rf "$site"' EXIT; else site=/tmp/site; fi
  "$py" -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl && export PYTHONPATH="$PYTHONPATH:$site"
fi
today=$(date +%F)
limit_scale=1
if [ "$dry_run" = 1 ]; then
  device=cpu
  dir=out/benchmarks/gpu-session-dry-run-$today
  limit_scale=30  # the limits are the GPU machine's; on a CPU they only catch a hang (2 shared cores: 10x was short)
  torch_version=$("$py" -c "import torch; print(torch.__version__)") || exit 1
  export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/out/torch_extensions/torch-$torch_version}
  echo "DRY RUN on $("$py" -c "from benchmarks.run import device_name; print(device_name('cpu'))"): the GPU-only parts" \
       "are skipped and named as such; time limits x$limit_scale"
else
  device=cuda
  dir=$("$py" -c "import datetime; from benchmarks.run import default_results_dir; print(default_results_dir('cuda', datetime.date.today().isoformat()))") || exit 1
fi
mkdir -p "$dir"
optional_packages='
import importlib.util as u
for module, what in (("trl", "the benchmarks variant trl_chunked"), ("liger_kernel", "the benchmarks variants liger*"),
                     ("rouge_score", "tests/test_evaluation.py::test_rouge_l_matches_rouge_score_package")):
    print(f"{module}:", "installed" if u.find_spec(module) else f"not installed here: {what} left out")'
{ nvidia-smi 2>/dev/null || echo "(no nvidia-smi)"; "$py" -c "from benchmarks.run import versions; print(versions())"
  "$py" -m pip list 2>/dev/null | grep -iE '^(torch|triton|transformers|liger.kernel|trl|datasets|rouge.score) '
  "$py" -c "$optional_packages"
} 2>&1 | tee "$dir/environment.txt"
failed=()
summary=()

step() {  # step NAME SECONDS LOG COMMAND...: run with a time limit, append to LOG, remember a failure
  local name=$1 limit=$(($2 * limit_scale)) log=$3; shift 3
  echo "== $name (limit ${limit} s)" | tee -a "$log"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  local status=${PIPESTATUS[0]}
  echo "== $name: exit status $status after $((SECONDS - start)) s" | tee -a "$log"
  summary+=("$(printf '%-22s exit %3s  %4s s / %4s s' "$name" "$status" $((SECONDS - start)) "$limit")")
  [ "$status" = 0 ] || failed+=("$name")
  if [ -n "${OUT:-}" ]; then tar czf "$OUT/results.tgz" "$dir"; fi
}

dry_run_note() {  # dry_run_note TEXT: what a dry run skips of the next step, and why
  if [ "$dry_run" = 1 ]; then echo "-- dry run, GPU-only skipped: $1"; fi
}

# The GPU run's test selection: every Triton and CUDA row (the sm_90 compile checks run in CI, on a CPU).
selection=(-k "(triton or cuda) and not triton_compile and not cuda_compile and not sm90")
# Sizes: issue 19's tables on the GPU; the --quick ones on the CPU in a dry run (same ops, variants and divergences).
if [ "$dry_run" = 1 ]; then
  tests=(--collect-only -qq "${selection[@]}")  # the count per file
  logits_sizes=(--quick --dtype bf16 fp32)
  linear_sizes=(--quick)
  divergence_sizes=(--quick)
  sanitizer=("$py" -c "from benchmarks import sanitizer_runs as s; print('sanitizer_runs:', len(list(s.cases())), 'reverse-KL and', len(list(s.divergence_cases())), 'divergence cases, not run')")
  memcheck=("${sanitizer[@]}")
  racecheck=("${sanitizer[@]}")
else
  tests=(-q -rs "${selection[@]}")
  "$py" -c "import xdist" 2>/dev/null && tests+=(-n 8)  # pytest-xdist (on the lent machine): 8 processes
  logits_sizes=(--tokens 8192 16384 --vocab 32000 128256 151936 262144 --dtype bf16 fp32)
  linear_sizes=(--hidden 4096 --vocab 128256 --tokens 8192 --dtype bf16)
  divergence_sizes=(--tokens 8192 --vocab 128256 --dtype bf16)
  memcheck=(compute-sanitizer --tool memcheck --error-exitcode 9 "$py" benchmarks/sanitizer_runs.py)
  racecheck=(compute-sanitizer --tool racecheck --error-exitcode 9 "$py" benchmarks/sanitizer_runs.py)
fi
on_cpu="the Triton and CUDA variants and Liger's GPU kernels (on a CPU: the naive losses and the C++ kernel, --quick sizes)"

dry_run_note "the CUDA extension (nvcc) and Triton's compile; the CPU extension is built"
step build 120 "$dir/tests.log" "$py" -c "import minillm_kernels as mk; print('available backends:', mk.available_backends())"
if [[ " ${failed[*]} " == *" build "* ]]; then  # a build killed at its limit leaves its lock: later loads would wait
  find "${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}" -name lock -delete 2>/dev/null
fi
dry_run_note "running the tests (their Triton and CUDA rows need a GPU): they are collected with the GPU run's selection"
step tests 130 "$dir/tests.log" "$py" -m pytest "${tests[@]}" tests
dry_run_note "$on_cpu"
step benchmark 80 "$dir/benchmark.log" "$py" -m benchmarks --device "$device" --op reverse_kld "${logits_sizes[@]}" --out "$dir"
dry_run_note "compute-sanitizer memcheck: its cases are enumerated"
step memcheck 35 "$dir/sanitizer.log" "${memcheck[@]}"
dry_run_note "$on_cpu"
step benchmark-linear 45 "$dir/benchmark.log" "$py" -m benchmarks --device "$device" --op linear_reverse_kld "${linear_sizes[@]}" --out "$dir/linear"
dry_run_note "$on_cpu"
step benchmark-divergence 55 "$dir/benchmark.log" "$py" -m benchmarks --device "$device" --op divergence "${divergence_sizes[@]}" --out "$dir/divergence"
dry_run_note "compute-sanitizer racecheck: its cases are enumerated"
step racecheck 15 "$dir/sanitizer.log" "${racecheck[@]}"

echo "== summary$([ "$dry_run" = 1 ] && echo " (dry run)"): $((SECONDS - session_start)) s in all"
printf '%s\n' "${summary[@]}" | tee -a "$dir/environment.txt"
echo "failed steps: ${failed[*]:-none}; results in $dir"
[ ${#failed[@]} -eq 0 ]
