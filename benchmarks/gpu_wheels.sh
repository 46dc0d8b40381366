#!/usr/bin/env bash
# Fetches the wheels of benchmarks/gpu_wheels.txt into .whl/ at the repository root (git-ignored through
# .git/info/exclude), for the lent GPU machine: CPython 3.12 on x86-64 Linux, whatever this machine is, and without
# their dependencies (the list names each one the machine lacks). benchmarks/gpu_session.sh installs them there.
set -euo pipefail
cd "$(dirname "$0")/.."
exclude="$(git rev-parse --git-path info/exclude)"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
mkdir -p .whl
sed -e 's/#.*//' -e '/^\s*$/d' benchmarks/gpu_wheels.txt | xargs python3 -m pip download -q --no-deps \
  --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d .whl
ls -l .whl
