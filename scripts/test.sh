#!/usr/bin/env bash
# The test command of the README's quick start: sets up what it needs, runs the whole suite, then the mutation
# harness (scripts/mutations.py: planted bugs that the suite must catch).
# Without a GPU the Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py sets it).
# Extra arguments go to pytest and skip the harness, e.g. `bash scripts/test.sh -k triton -x`.
source "$(dirname "$0")/env.sh"
if [ "$#" -gt 0 ]; then
  exec "$PYTHON" -m pytest -q tests "$@"
fi
"$PYTHON" -m pytest -q tests
exec "$PYTHON" scripts/mutations.py
