"""The ``tiny`` default: a teacher, an SFT student and instruction data that ship with the package.

Everything here is made by the project (no download): ``tasks.py`` generates the data, ``tokenizer.py``
trains the byte-level BPE tokenizer, and ``scripts/make_tiny.py`` trains the teacher and the student's
SFT start once and writes them under ``checkpoints/`` (safetensors + config + tokenizer), where
``examples/train.py --teacher tiny --student tiny`` finds them.

How the default makes the sft / kd / minillm comparison meaningful: the teacher learnt the tasks from
an unlimited stream of examples (it stands for a large model far better than the student's data); the
student sees gold answers for only ``LABELLED_PER_TASK`` prompts per task (its SFT data, which SFT and
KD train on, KD against the teacher's distribution on those same responses) and ``PROMPTS_PER_TASK``
prompts per task without answers, which only on-policy distillation (MiniLLM) can use.
"""
from __future__ import annotations

from pathlib import Path

from minillm_kernels.tiny.tasks import TASKS, make_splits

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
LABELLED_PER_TASK = 100
PROMPTS_PER_TASK = 2000
HELDOUT_PER_TASK = 50
SPLIT_SEED = 0
MAX_NEW_TOKENS = 12  # the longest response (6 words) is 6 tokens + EOS

# name -> (layers, hidden size, heads); both Llama-style (RMSNorm, SwiGLU, RoPE), tied embeddings
ARCHITECTURES = {"teacher": (4, 256, 4), "student": (2, 128, 4)}


def tiny_splits() -> dict:
    """The default's ``labelled`` / ``prompts`` / ``heldout`` splits (see ``tasks.make_splits``)."""
    return make_splits(
        labelled_per_task=LABELLED_PER_TASK, prompts_per_task=PROMPTS_PER_TASK,
        heldout_per_task=HELDOUT_PER_TASK, seed=SPLIT_SEED,
    )


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


__all__ = ["ARCHITECTURES", "CHECKPOINTS", "MAX_NEW_TOKENS", "TASKS", "checkpoint_dir", "tiny_config", "tiny_splits"]
