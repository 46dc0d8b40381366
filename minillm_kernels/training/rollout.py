"""A batch of the on-policy methods' samples with what their losses reuse over several steps: the rewards and the
teacher's outputs at the response positions."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Iterator, Optional

import torch

import minillm_kernels as mk
from minillm_kernels.distributed import full_tensor
from minillm_kernels.training.data import prompt_batch
from minillm_kernels.training.evaluation import eval_mode

if TYPE_CHECKING:
    from minillm_kernels.training.config import TrainConfig

TeacherHead = Optional[tuple[torch.Tensor, Optional[torch.Tensor]]]  # the teacher's output layer (weight, bias)


class Rollout:
    """One batch of teacher-mixed samples with its rewards and the teacher's outputs at the response
    positions: its logits, or with --fused-linear its last hidden states and its output layer (``teacher_head``:
    (weight, bias), gathered whole under --fsdp). Computed once through the teacher's ModelRunner, reused by every
    step on these samples; not stored in checkpoints: recomputed."""

    def __init__(self, sample: mk.TeacherMixedSample, rewards: torch.Tensor, teacher, fused_linear: bool) -> None:
        self.sample, self.rewards, self.teacher_head = sample, rewards, None
        with torch.no_grad():
            self.teacher_outputs = teacher(mk.response_hidden_states if fused_linear else mk.response_logits, sample)
            if fused_linear:
                head = teacher.module.get_output_embeddings()
                self.teacher_head = (full_tensor(head.weight), full_tensor(head.bias))

    def state(self) -> dict:
        """Tensors, an int and dicts only: ``torch.load(weights_only=True)`` reads them back."""
        return {"sample": {field.name: getattr(self.sample, field.name)
                           for field in dataclasses.fields(self.sample)}, "rewards": self.rewards}

    @classmethod
    def from_state(cls, state: dict, teacher, fused_linear: bool) -> Rollout:
        return cls(mk.TeacherMixedSample(**state["sample"]), state["rewards"], teacher, fused_linear)

    def chunks(self, count: int) -> Iterator[tuple[mk.TeacherMixedSample, torch.Tensor, torch.Tensor, TeacherHead]]:
        """``(sample, rewards, teacher_outputs, teacher_head)`` for each of ``count`` micro-batches of rows (sizes
        differ by at most one row, e.g. after a resume with another --batch-size or --grad-accum)."""
        rows = self.sample.sequences.shape[0]
        for index in range(count):
            part = slice(index * rows // count, (index + 1) * rows // count)
            yield self.sample.rows(part), self.rewards[part], self.teacher_outputs[part], self.teacher_head


def make_rollout(student, teacher, tokenizer, prompts: list[str], generator: torch.Generator, vocab_size: int,
                 config: TrainConfig, *, alpha: float, reward_scaling: float, reward_clip: float) -> Rollout:
    """Sample responses from p~ = alpha p + (1 - alpha) q_old (the student in eval() mode) with the temperature and
    filters of ``config.sampling`` and score them: r_t = clip((log p(y_t) - log q(y_t)) / reward_scaling, +-
    reward_clip). Under --fsdp every process takes the same number of sampling steps."""
    input_ids, attention_mask = prompt_batch(tokenizer, prompts, max_length=config.data.max_length)
    device = next(student.parameters()).device
    sampling = config.sampling
    with eval_mode(student):
        sample = mk.sample_teacher_mixed(
            student, teacher, input_ids.to(device), attention_mask.to(device), alpha=alpha,
            max_new_tokens=config.data.max_new_tokens, temperature=sampling.temperature, top_k=sampling.top_k,
            top_p=sampling.top_p, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            vocab_size=vocab_size, generator=generator, synced_processes=config.run.fsdp,
        )
    rewards = mk.log_ratio_rewards(sample.teacher_logprob - sample.student_logprob, sample.response_mask,
                                   reward_scaling=reward_scaling, reward_clip=reward_clip)
    return Rollout(sample, rewards, teacher, config.run.fused_linear)
