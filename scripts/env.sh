# Sourced by the quick-start scripts: selects the Python to run with and installs what it needs.
#
# - On a machine whose python3 already has a CUDA PyTorch (a GPU box, possibly offline), that python3
#   is used as it is and the package is taken from this checkout (PYTHONPATH).
# - Elsewhere, a .venv at the repository root is created or reused, with the CPU build of PyTorch
#   (torch==2.13.0), triton==3.8.0 (its interpreter runs the Triton kernels on the CPU), ninja (the C++
#   kernel's build), and this package installed in editable mode with its test, benchmark and trl extras (TRL, pinned,
#   installed after the CPU torch, which it then keeps: tests/test_trl.py runs TRL's trainers). Installed again
#   when this file or pyproject.toml changes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  PYTHON=python3
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
  [ -x .venv/bin/python ] || python3 -m venv .venv
  PYTHON="$ROOT/.venv/bin/python"
  # Installed once per version of pyproject.toml and of this file: a changed dependency list installs again.
  stamp=".venv/.installed-$(cat pyproject.toml scripts/env.sh | sha1sum | cut -c1-12)"
  if [ ! -f "$stamp" ]; then
    # pip byte-compiles what it installs on one core (~40 s of the ~70 s): compileall does it on every core instead.
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-compile torch==2.13.0 triton==3.8.0
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-compile -e ".[test,bench,trl]"
    "$PYTHON" -m compileall -q -j 0 "$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
      >/dev/null 2>&1 || true  # (as pip's own: a file that does not compile, e.g. a package's test data, is left)
    touch "$stamp"
  fi
fi
export PYTHON
