#!/usr/bin/env bash
# The test command of the README's quick start: sets up what it needs, runs the whole suite, then the mutation
# harness (scripts/mutations.py: planted bugs that the suite must catch, several at a time; its baseline is the suite
# that just passed). Without a GPU the Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py sets it).
# When it fails, its last lines say what failed: the failing tests (pytest's short summary, repeated at the very
# end), or the planted bugs that no test caught (the harness's last line).
# Extra arguments go to pytest and skip the harness, e.g. `bash scripts/test.sh -k triton -x`.
source "$(dirname "$0")/env.sh"
if [ "$#" -gt 0 ]; then
  exec "$PYTHON" -m pytest -q tests "$@"
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
"$PYTHON" -m pytest -q -rfE tests 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
if [ "$status" != 0 ]; then
  echo
  echo "scripts/test.sh: the test suite failed (pytest exit status $status), so the mutation harness did not run:"
  grep -E '^(FAILED|ERROR) ' "$log" && exit "$status"
  # No summary: pytest itself died (a crash in a kernel); faulthandler's traceback names the test innermost first.
  crashed=$(grep -m1 -oE 'tests/[A-Za-z0-9_/]+\.py", line [0-9]+ in test_[A-Za-z0-9_]+' "$log" | tr -d '"')
  echo "pytest stopped before its summary${crashed:+, in $crashed} (see above)"
  exit "$status"
fi
"$PYTHON" scripts/mutations.py --skip-baseline
