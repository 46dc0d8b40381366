#!/usr/bin/env bash
# The main job of the README's quick start: MiniLLM distillation of the embedded tiny default (teacher,
# SFT student and data ship in minillm_kernels/training/tiny/), ending with the test tables of the checkpoint chosen
# on the validation split and of the last one, at MiniLLM's settings chosen on the validation split by the README's
# comparison (lr 1e-4, a rollout buffer of 128: examples/results/tiny-compare/tuning.md). Extra arguments go to
# examples/train.py and override these, e.g. `bash scripts/train.sh --method kd --lr 3e-4` (kd's chosen lr); the
# README's fair table (every method tuned on validation, then 5 seeds) is `bash scripts/compare.sh`.
source "$(dirname "$0")/env.sh"
if ! "$PYTHON" -c "import transformers, tokenizers, safetensors, tqdm" 2>/dev/null; then
  "$PYTHON" -m pip install --quiet --disable-pip-version-check -e ".[train]"
fi
# One CPU thread: the tiny models gain little from a second one, and two threads sharing 2 cores with
# any other busy process slowed each step 4-5x here (OpenMP threads waiting on each other).
exec "$PYTHON" examples/train.py --out-dir out/tiny --threads 1 --lr 1e-4 --num-rollouts 128 "$@"
