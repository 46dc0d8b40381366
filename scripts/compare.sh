#!/usr/bin/env bash
# The README's tuned comparison: examples/compare.py in PROCESSES processes at once (one thread each, --worker: each
# takes the next run no other has claimed), for each phase: the tuning on the validation split (every row at every
# point of its grid, training seed 0), then one process reads every tuning run back and writes tuning.json (the
# settings chosen, before any test run); then the test phase (each row at its chosen settings for each seed, the test
# split's scores of the chosen and last checkpoints), then one process reads every run back and writes compare.md
# and results.json.
#
#   bash scripts/compare.sh                                        # the whole grid: 5 lrs, minillm 2 buffers, 5 seeds
#   PROCESSES=2 bash scripts/compare.sh --lrs 1e-4 3e-4 --seeds 0 1 --steps 40   # a smaller one
#
# Extra arguments go to every call (the grid's size: --lrs, --buffers, --seeds, --steps, --rows). A finished run is
# read back, not trained again: an interrupted comparison goes on with the same command (--resume also continues the
# interrupted runs from their checkpoints). The logs of the processes: $OUT/logs/.
source "$(dirname "$0")/env.sh"
if ! "$PYTHON" -c "import transformers, tokenizers, safetensors, tqdm" 2>/dev/null; then
  "$PYTHON" -m pip install --quiet --disable-pip-version-check -e ".[train]"
fi
OUT=${OUT:-out/compare}
PROCESSES=${PROCESSES:-2}
mkdir -p "$OUT/logs"
for phase in tune test; do
  rm -rf "$OUT/claims/$phase"  # (an earlier call's claims: its finished runs are read back, the others trained)
  pids=()
  for ((worker = 0; worker < PROCESSES; worker++)); do
    "$PYTHON" examples/compare.py --phase "$phase" --worker --out-dir "$OUT" --threads 1 "$@" \
      > "$OUT/logs/$phase-$worker.log" 2>&1 &
    pids+=($!)
  done
  for index in "${!pids[@]}"; do
    wait "${pids[$index]}" || { echo "$phase worker $index failed: see $OUT/logs/$phase-$index.log" >&2; exit 1; }
  done
  "$PYTHON" examples/compare.py --phase "$phase" --out-dir "$OUT" --threads 1 "$@" > "$OUT/logs/$phase.log" 2>&1 \
    || { echo "$phase failed: see $OUT/logs/$phase.log" >&2; exit 1; }
done
cat "$OUT/compare.md"
