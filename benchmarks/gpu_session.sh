#!/usr/bin/env bash
# One call on a GPU machine: the whole test suite on the GPU, then the benchmark (every variant that runs there;
# fused_reverse_kld at vocabularies 32000..262144, 4096 and 16384 tokens, bf16 and fp32; fused_token_stats
# at the same sizes in bf16), all written under
# benchmarks/results/cuda-<gpu>-<date>/ (environment.txt, tests.log, benchmark.log, table.md, results.csv, plots).
#
# Needs only this repository and the machine's python3 with a CUDA build of torch and triton (no internet, no
# venv: the lent GPU machine has torch 2.11 / triton 3.6, pytest, matplotlib and tqdm). Optional packages such as
# liger-kernel can come along as wheels in a `.whl/` folder at the repository root; they are installed first.
# On the device tool's machine ($OUT set) the results folder is also packed into $OUT/results.tgz.
#
#   bash benchmarks/gpu_session.sh     # under 9 minutes (time limits: tests 200 s, benchmarks 330 s together)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
dir=$(python3 -c "import datetime; from benchmarks.run import default_results_dir; print(default_results_dir('cuda', datetime.date.today().isoformat()))") || exit 1
mkdir -p "$dir"
{ nvidia-smi; python3 -c "from benchmarks.run import versions; print(versions())"; python3 -m pip list 2>/dev/null | grep -iE '^(torch|triton|liger)'; } >"$dir/environment.txt" 2>&1

timeout 200 python3 -m pytest -q -rs tests 2>&1 | tee "$dir/tests.log"
tests_status=${PIPESTATUS[0]}
timeout 210 python3 -m benchmarks --device cuda --op reverse_kld --out "$dir" 2>&1 | tee "$dir/benchmark.log"
bench_status=${PIPESTATUS[0]}
timeout 120 python3 -m benchmarks --device cuda --op token_stats --dtype bf16 --out "$dir/token_stats" 2>&1 | tee -a "$dir/benchmark.log"
[ "${PIPESTATUS[0]}" = 0 ] || bench_status=1

echo "tests exit status: $tests_status; benchmark exit status: $bench_status; results in $dir"
if [ -n "${OUT:-}" ]; then tar czf "$OUT/results.tgz" "$dir"; fi
[ "$tests_status" = 0 ] && [ "$bench_status" = 0 ]
