#!/usr/bin/env bash
# The test command of the README's quick start: sets up what it needs, runs the whole suite, then the mutation
# harness (scripts/mutations.py: planted bugs that the suite must catch, several at a time; its baseline is the suite
# that just passed). Without a GPU the Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py sets it).
# With pytest-xdist (scripts/env.sh installs it) the suite runs on one process per CPU (-n auto).
# When it fails, its last lines say what failed: the failing tests (pytest's short summary, repeated at the very
# end), or the planted bugs that no test caught (the harness's last line). Each part's time is printed as it ends.
# Extra arguments go to pytest and skip the harness, e.g. `bash scripts/test.sh -k triton -x`.
started=$SECONDS
source "$(dirname "$0")/env.sh"
parallel=()
if "$PYTHON" -c "import xdist" 2>/dev/null; then
  parallel=(-n auto --dist worksteal)
  # Each worker's kernels use every CPU too: their OpenMP threads sleep when idle instead of spinning, so that
  # the workers' threads sharing the cores do not wait on each other.
  export OMP_WAIT_POLICY=PASSIVE
fi
if [ "$#" -gt 0 ]; then
  exec "$PYTHON" -m pytest -q "${parallel[@]}" tests "$@"
fi
echo "scripts/test.sh: set-up took $((SECONDS - started)) s"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
tests_started=$SECONDS
set +e
# The suite's fresh interpreters (its workers, torchrun's processes, the benchmarks' cases, the README's blocks) import
# this checkout's modules: compiled into __pycache__ by the first and read back by the others, even where the
# environment says not to write bytecode (PYTHONDONTWRITEBYTECODE). The mutation harness's copies leave __pycache__
# out, and its runs write none (a stale one could stand for a planted bug).
env -u PYTHONDONTWRITEBYTECODE "$PYTHON" -m pytest -q -rfE "${parallel[@]}" tests 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
echo "scripts/test.sh: the test suite took $((SECONDS - tests_started)) s"
if [ "$status" != 0 ]; then
  echo
  echo "scripts/test.sh: the test suite failed (pytest exit status $status), so the mutation harness did not run:"
  grep -E '^(FAILED|ERROR) ' "$log" && exit "$status"
  # No summary: pytest itself died (a crash in a kernel); faulthandler's traceback names the test innermost first.
  crashed=$(grep -m1 -oE 'tests/[A-Za-z0-9_/]+\.py", line [0-9]+ in test_[A-Za-z0-9_]+' "$log" | tr -d '"')
  echo "pytest stopped before its summary${crashed:+, in $crashed} (see above)"
  exit "$status"
fi
mutations_started=$SECONDS
set +e
"$PYTHON" scripts/mutations.py --skip-baseline 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
echo "scripts/test.sh: the mutation harness took $((SECONDS - mutations_started)) s; $((SECONDS - started)) s in all"
if [ "$status" != 0 ]; then  # its last line: how many were caught, and the names of those that were not
  echo "scripts/test.sh: the mutation harness failed (exit status $status):"
  tail -n 1 "$log"
fi
exit "$status"
