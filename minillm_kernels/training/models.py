"""The teacher and the start student of --teacher / --student: the tiny default, SmolLM2, a saved directory or a
Hugging Face Hub id."""
from __future__ import annotations

import torch

from minillm_kernels.training.config import ModelConfig


def load_teacher(config: ModelConfig, device: torch.device) -> tuple[torch.nn.Module, object]:
    """(teacher, tokenizer): the frozen teacher in eval mode and the tokenizer both models share (its pad token the
    EOS where it has none)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if config.teacher == "smollm2":
        from minillm_kernels.training.smollm2 import load_smollm2

        teacher, tokenizer = load_smollm2()
    else:
        if config.teacher == "tiny":
            from minillm_kernels.training.tiny import checkpoint_dir

            path = checkpoint_dir("teacher")
        else:
            path = config.teacher
        teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return teacher.to(device).eval().requires_grad_(False), tokenizer


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
