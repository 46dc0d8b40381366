#!/usr/bin/env bash
# The test command of the README's quick start: sets up what it needs, then runs the whole suite.
# Without a GPU the Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py sets it).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k triton -x`.
source "$(dirname "$0")/env.sh"
exec "$PYTHON" -m pytest -q tests "$@"
