#!/usr/bin/env bash
# The main job of the README's quick start: MiniLLM distillation of the embedded tiny default (teacher,
# SFT student and data ship in minillm_kernels/training/tiny/), ending with the before/after held-out tables.
# Extra arguments go to examples/train.py, e.g. `bash scripts/train.sh --method kd`; the README's fair table (sft,
# kd, seqkd, kd on the teacher's answers and minillm, 3 seeds each) is `bash scripts/compare.sh`.
source "$(dirname "$0")/env.sh"
if ! "$PYTHON" -c "import transformers, tokenizers, safetensors, tqdm" 2>/dev/null; then
  "$PYTHON" -m pip install --quiet --disable-pip-version-check -e ".[train]"
fi
# One CPU thread: the tiny models gain little from a second one, and two threads sharing 2 cores with
# any other busy process slowed each step 4-5x here (OpenMP threads waiting on each other).
exec "$PYTHON" examples/train.py --out-dir out/tiny --threads 1 "$@"
