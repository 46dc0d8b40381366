"""The ``tiny`` default: a teacher, an SFT student and instruction data that ship with the package.

Everything here is made by the project (no download): ``tasks.py`` generates the data, ``tokenizer.py``
trains the byte-level BPE tokenizer, and ``scripts/make_tiny.py`` trains the teacher and the student's
SFT start once and writes them under ``checkpoints/`` (safetensors + config + tokenizer), where
``examples/train.py --teacher tiny --student tiny`` finds them.

How the default makes a fair comparison of sft / kd / seqkd / minillm: the teacher learnt the tasks from an
unlimited stream of examples (it stands for a large model far better than the student); the student's SFT start
was fine-tuned on the prompt pool's gold answers (``PROMPTS_PER_TASK`` prompts per task, each with one gold
answer), and every method then trains it further on that same pool: the gold answers where a method needs them
(sft, kd), the same prompts for the others (seqkd and kd on the teacher's answers, minillm's rollouts).
"""
from __future__ import annotations

import functools
from pathlib import Path

from minillm_kernels.training.tiny.tasks import LONG_TASKS, OPEN_TASKS, TASKS, is_valid, make_splits

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
PROMPTS_PER_TASK = 500
HELDOUT_PER_TASK = 50
SPLIT_SEED = 0
MAX_NEW_TOKENS = 40  # the longest response (countup: 12 numbers of 3 tokens) is 36 tokens + EOS

# name -> (layers, hidden size, heads); both Llama-style (RMSNorm, SwiGLU, RoPE), tied embeddings
ARCHITECTURES = {"teacher": (4, 256, 4), "student": (2, 128, 4)}


def tiny_splits() -> dict:
    """The default's ``prompts`` (the prompt pool, with gold answers) and ``heldout`` splits (``tasks.make_splits``)."""
    return make_splits(prompts_per_task=PROMPTS_PER_TASK, heldout_per_task=HELDOUT_PER_TASK, seed=SPLIT_SEED)


def tiny_checkers() -> dict:
    """``{open task: check(prompt, response)}``, the validity rules ``evaluation.evaluate`` scores open tasks by."""
    return {task: functools.partial(is_valid, task) for task in OPEN_TASKS}


def tiny_config(name: str, vocab_size: int, eos_token_id: int):
    """A ``transformers.LlamaConfig`` for the ``"teacher"`` or ``"student"`` architecture."""
    from transformers import LlamaConfig

    if name not in ARCHITECTURES:
        raise ValueError(f"name must be one of {tuple(ARCHITECTURES)}, got {name!r}")
    layers, hidden, heads = ARCHITECTURES[name]
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=8 * hidden // 3, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=128,
        tie_word_embeddings=True, bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=eos_token_id,
    )


def checkpoint_dir(name: str) -> Path:
    """The shipped checkpoint directory of ``"teacher"`` or ``"student-sft"``; a clear error if it is missing."""
    path = CHECKPOINTS / name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"the tiny {name!r} checkpoint is missing at {path}; build it with `python scripts/make_tiny.py {name}`"
        )
    return path


__all__ = ["ARCHITECTURES", "CHECKPOINTS", "LONG_TASKS", "MAX_NEW_TOKENS", "OPEN_TASKS", "TASKS", "checkpoint_dir",
           "tiny_checkers", "tiny_config", "tiny_splits"]
