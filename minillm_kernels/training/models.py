"""The teacher and the start student of --teacher / --student: the tiny default, SmolLM2, a saved directory or a
Hugging Face Hub id; the tokenizer alone (a run whose teacher is cached or served loads no teacher weights); and the
fingerprints an offline teacher cache is checked against (``weights_sha256``, ``tokenizer_sha256``)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import torch

from minillm_kernels.training.config import ModelConfig

WEIGHT_FILES = ("*.safetensors", "*.bin")  # what a saved Hugging Face model keeps its weights in


def teacher_directory(config: ModelConfig) -> Optional[Path]:
    """The directory of --teacher's files on this machine: the tiny default's, SmolLM2's float32 copy (made by its
    first load), a saved directory, or a Hub id's cached snapshot; None where there is none (a Hub id not downloaded,
    SmolLM2 never loaded)."""
    if config.teacher == "tiny":
        from minillm_kernels.training.tiny import checkpoint_dir

        return checkpoint_dir("teacher")
    if config.teacher == "smollm2":
        from minillm_kernels.training.smollm2 import default_cache_dir

        return default_cache_dir() if (default_cache_dir() / "config.json").is_file() else None
    if Path(config.teacher).is_dir():
        return Path(config.teacher)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(config.teacher, local_files_only=True))
    except Exception:  # (not in the local Hub cache: huggingface_hub's error types vary across versions)
        return None


def with_pad_token(tokenizer):
    """``tokenizer`` with a pad token: its EOS where it has none."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(config: ModelConfig):
    """The tokenizer both models share (--teacher's, its pad token the EOS where it has none), without loading the
    teacher's weights where its files are on this machine (``teacher_directory``)."""
    from transformers import AutoTokenizer

    directory = teacher_directory(config)
    if directory is None and config.teacher == "smollm2":
        from minillm_kernels.training.smollm2 import load_smollm2

        return with_pad_token(load_smollm2()[1])
    return with_pad_token(AutoTokenizer.from_pretrained(directory or config.teacher))


def load_teacher(config: ModelConfig, device: torch.device) -> tuple[torch.nn.Module, object]:
    """(teacher, tokenizer): the frozen teacher in eval mode and the tokenizer both models share (its pad token the
    EOS where it has none)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if config.teacher == "smollm2":
        from minillm_kernels.training.smollm2 import load_smollm2

        teacher, tokenizer = load_smollm2()
    else:
        path = teacher_directory(config) or config.teacher
        teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
    return teacher.to(device).eval().requires_grad_(False), with_pad_token(tokenizer)


def load_student(config: ModelConfig, device: torch.device) -> torch.nn.Module:
    """A fresh float32 copy of the start student, in train mode."""
    from transformers import AutoModelForCausalLM

    if config.student == "smollm2":
        from minillm_kernels.training.smollm2 import cut_layers, load_smollm2

        student = cut_layers(load_smollm2()[0], config.student_layers)  # a fresh copy: the teacher may be sharded
    elif config.student == "tiny":
        from minillm_kernels.training.tiny import checkpoint_dir

        student = AutoModelForCausalLM.from_pretrained(checkpoint_dir("student-sft"), dtype=torch.float32)
    else:
        student = AutoModelForCausalLM.from_pretrained(config.student, dtype=torch.float32)
    return student.to(device).train().requires_grad_(True)


def weights_sha256(directory: Path) -> str:
    """A SHA-256 of a saved model's weight files (their names and bytes, in name order), read in 16 MiB blocks."""
    digest = hashlib.sha256()
    files = sorted({path for pattern in WEIGHT_FILES for path in directory.glob(pattern)})
    if not files:
        raise FileNotFoundError(f"{directory}: no weight file ({', '.join(WEIGHT_FILES)})")
    for path in files:
        digest.update(path.name.encode())
        with open(path, "rb") as weights:
            while block := weights.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()


def tokenizer_sha256(tokenizer) -> str:
    """A SHA-256 of a tokenizer's vocabulary (token -> id, added tokens included) and its EOS and BOS ids."""
    vocabulary = {"vocab": tokenizer.get_vocab(), "eos": tokenizer.eos_token_id, "bos": tokenizer.bos_token_id}
    return hashlib.sha256(json.dumps(vocabulary, sort_keys=True).encode()).hexdigest()
