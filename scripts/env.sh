# Sourced by the quick-start scripts: selects the Python to run with and installs what it needs.
#
# - On a machine whose python3 already has a CUDA PyTorch (a GPU box, possibly offline), that python3
#   is used as it is and the package is taken from this checkout (PYTHONPATH).
# - Elsewhere, a .venv at the repository root is created or reused, with the CPU build of PyTorch
#   (torch==2.13.0), triton==3.8.0 (its interpreter runs the Triton kernels on the CPU), ninja (the C++
#   kernel's build, which runs while the rest installs), and this package installed in editable mode with its test,
#   benchmark and trl extras (TRL, pinned, installed after the CPU torch, which it then keeps: tests/test_trl.py runs
#   TRL's trainers). Installed again when this file or pyproject.toml changes.
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
    "$PYTHON" -m pip install --quiet --disable-pip-version-check torch==2.13.0 triton==3.8.0 ninja
    # The CPU kernel needs only torch and ninja to build: it compiles (into torch's extension cache, where the tests
    # and the trainer find it) on the core that pip leaves idle while it installs the rest. A failed build says
    # nothing here: the first use builds again and warns.
    PYTHONPATH="$ROOT" "$PYTHON" -c "from minillm_kernels import _build; _build.load_cpu_extension()" \
      >/dev/null 2>&1 &
    kernel_build=$!
    "$PYTHON" -m pip install --quiet --disable-pip-version-check -e ".[test,bench,trl]"
    wait "$kernel_build" || true
    touch "$stamp"
  fi
fi
export PYTHON
