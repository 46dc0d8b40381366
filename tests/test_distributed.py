"""minillm_kernels.distributed in one process: the ModelRunner's two kinds of call, the decoder layers FSDP2 shards,
the wrapper errors of response_hidden_states and the sampler, and eval_mode through a wrapper; end_process_group on 2
processes. (DDP and FSDP2 training on 2 processes runs in tests/test_train.py, through the trainer.)"""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import conftest
import minillm_kernels as mk
from minillm_kernels.distributed import ModelRunner, decoder_layers, parallelize
from minillm_kernels.training.evaluation import eval_mode
from minillm_kernels.training.tiny import checkpoint_dir


@pytest.fixture(scope="module")
def student() -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(checkpoint_dir("student-sft"), dtype=torch.float32).eval()


def sample_of(student: torch.nn.Module) -> mk.TeacherMixedSample:
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with torch.no_grad():
        return mk.sample_teacher_mixed(student, student, ids, torch.ones_like(ids), max_new_tokens=3,
                                       generator=torch.Generator().manual_seed(0))


def test_a_model_runner_runs_the_model_or_a_function_of_it(student):
    runner = parallelize(student, fsdp=False, trainable=True)  # one process: no DDP
    assert type(runner) is ModelRunner and runner.module is student
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(runner(input_ids=ids).logits, student(input_ids=ids).logits, rtol=0, atol=0)
        sample = sample_of(student)
        torch.testing.assert_close(runner(mk.response_logits, sample), mk.response_logits(student, sample))
    assert "logits_to_keep" in mk.sampling.forward_parameters(runner)  # the sampler sees the model's signature


def test_decoder_layers_are_the_no_split_modules(student):
    assert [type(m).__name__ for m in decoder_layers(student)] == ["LlamaDecoderLayer"] * 2
    with pytest.raises(ValueError, match="names no decoder layer class in _no_split_modules"):
        decoder_layers(torch.nn.Linear(2, 2))


def test_response_hidden_states_refuses_a_wrapper(student):
    """Through a wrapper the base model would run outside the wrapper's forward (unsynchronised gradients under DDP,
    unsharded parameters missing under FSDP2): a TypeError saying what to do."""
    sample = sample_of(student)
    with pytest.raises(TypeError, match="Run it inside the wrapper's forward"):
        mk.response_hidden_states(ModelRunner(student), sample)
    with torch.no_grad():
        hidden = ModelRunner(student)(mk.response_hidden_states, sample)
    torch.testing.assert_close(hidden @ student.lm_head.weight.t(), mk.response_logits(student, sample))


def test_synced_sampling_needs_a_process_group(student):
    ids = torch.tensor([[5, 6]])
    with pytest.raises(ValueError, match="synced_processes=True needs an initialised torch.distributed"):
        mk.sample_teacher_mixed(student, student, ids, torch.ones_like(ids), max_new_tokens=2, synced_processes=True)


def test_eval_mode_restores_each_module_through_a_wrapper(student):
    """A wrapper built in train mode around a model in eval mode: after eval_mode the model is in eval mode again
    (restoring the wrapper's flag recursively would switch the model's dropout on)."""
    wrapper = ModelRunner(student.eval())
    assert wrapper.training and not student.training
    with eval_mode(wrapper):
        assert not wrapper.training
    assert wrapper.training and not any(m.training for m in student.modules())


END_PROCESS_GROUP = textwrap.dedent("""
    import json, os, torch, torch.distributed as dist
    from transformers import AutoModelForCausalLM
    from minillm_kernels.distributed import end_process_group, parallelize
    from minillm_kernels.training.tiny import checkpoint_dir

    def gloo_threads():
        tasks = f"/proc/{os.getpid()}/task"
        return sorted(name for name in (open(f"{tasks}/{t}/comm").read().strip() for t in os.listdir(tasks))
                      if "gloo" in name)

    dist.init_process_group("gloo")
    model = AutoModelForCausalLM.from_pretrained(checkpoint_dir("student-sft"), dtype=torch.float32)
    runner = parallelize(model, fsdp=True, trainable=True)
    runner(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    torch.nn.utils.clip_grad_norm_(runner.parameters(), 1.0)  # a norm over DTensors: more of DTensor's plans cached
    during = gloo_threads()
    del runner, model
    end_process_group()
    os.write(1, (json.dumps({"during": during, "after": gloo_threads()}) + "\\n").encode())  # one write: whole lines
""")


def test_end_process_group_ends_the_gloo_threads_of_an_fsdp_run(tmp_path: Path):
    """After FSDP2 has trained, ``destroy_process_group`` alone leaves the gloo backend alive (DTensor's plan caches
    hold the device mesh, which holds the group) and its threads end in the interpreter's shutdown, where they can
    abort the process (seen in CI); ``end_process_group`` ends them before. Read from /proc: Linux."""
    script = tmp_path / "end_process_group.py"
    script.write_text(END_PROCESS_GROUP)
    processes = [json.loads(line) for line in
                 conftest.torchrun(script, timeout=120, what="end_process_group").splitlines()]
    assert len(processes) == 2
    for threads in processes:  # (torch 2.13 names gloo's event loop too, 2.11 does not)
        assert threads["during"].count("pt_gloo_runloop") >= 1 and threads["after"] == [], threads
