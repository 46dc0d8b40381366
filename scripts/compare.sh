#!/usr/bin/env bash
# The README's fair comparison: examples/compare.py (sft, kd, seqkd, kd on the teacher's answers and minillm;
# the same prompt pool, start, steps, batch and lr) for each training seed, one process per seed at once (one
# thread each), into one --out-dir; then one compare.py --resume reads the finished runs back and writes
# compare.md and results.json over every seed. 26 min here (3 processes on 2 shared CPU cores); one process
# (`python examples/compare.py --threads 1`) runs the same table seed after seed. An interrupted run goes on from
# its checkpoint with the same command plus --resume. Extra arguments go to every call, e.g. --steps 100.
source "$(dirname "$0")/env.sh"
if ! "$PYTHON" -c "import transformers, tokenizers, safetensors, tqdm" 2>/dev/null; then
  "$PYTHON" -m pip install --quiet --disable-pip-version-check -e ".[train]"
fi
OUT=out/compare
SEEDS=(0 1 2)
mkdir -p "$OUT"
pids=()
for seed in "${SEEDS[@]}"; do
  "$PYTHON" examples/compare.py --seeds "$seed" --out-dir "$OUT" --threads 1 "$@" \
    > "$OUT/seed-$seed.log" 2>&1 &
  pids+=($!)
done
for index in "${!pids[@]}"; do
  wait "${pids[$index]}" || { echo "seed ${SEEDS[$index]} failed: see $OUT/seed-${SEEDS[$index]}.log" >&2; exit 1; }
done
exec "$PYTHON" examples/compare.py --seeds "${SEEDS[@]}" --out-dir "$OUT" --threads 1 --resume "$@"
