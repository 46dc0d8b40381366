"""A rollout buffer of the on-policy methods' samples with what their losses reuse over several steps (the rewards
and the teacher's outputs at the response positions), and the shuffled minibatches that a PPO epoch takes of it."""
from __future__ import annotations

import dataclasses
import random
from typing import TYPE_CHECKING, Iterator, Optional, Union

import torch

import minillm_kernels as mk
from minillm_kernels.distributed import full_tensor
from minillm_kernels.training.data import prompt_batch
from minillm_kernels.training.evaluation import eval_mode
from minillm_kernels.training.teacher import ScoringTeacher, SparseTeacher

if TYPE_CHECKING:
    from minillm_kernels.training.config import TrainConfig

TeacherHead = Optional[tuple[torch.Tensor, Optional[torch.Tensor]]]  # the teacher's output layer (weight, bias)
TeacherOutputs = Union[torch.Tensor, SparseTeacher, None]  # at the response positions, what a loss reads of the teacher


class Rollout:
    """A buffer of samples with its rewards and the teacher's outputs at the response positions (``teacher_outputs``):
    its logits, or with --fused-linear its last hidden states and its output layer (``teacher_head``: (weight, bias),
    gathered whole under --fsdp), or a scoring teacher's top-k (``SparseTeacher``), or None where the loss reads only
    log p(y_t), recorded in the sample. Computed once, reused by every step on these samples (not stored in
    checkpoints: recomputed by ``from_state``)."""

    def __init__(self, sample: mk.TeacherMixedSample, rewards: torch.Tensor, teacher_outputs: TeacherOutputs,
                 teacher_head: TeacherHead = None) -> None:
        self.sample, self.rewards = sample, rewards
        self.teacher_outputs, self.teacher_head = teacher_outputs, teacher_head

    def state(self) -> dict:
        """Tensors, an int and dicts only: ``torch.load(weights_only=True)`` reads them back."""
        return {"sample": {field.name: getattr(self.sample, field.name)
                           for field in dataclasses.fields(self.sample)}, "rewards": self.rewards}

    @classmethod
    def from_state(cls, state: dict, teacher, scorer: Optional[ScoringTeacher], *, fused_linear: bool,
                   distribution: bool) -> Rollout:
        """The buffer of a checkpoint's ``state``, the teacher's outputs recomputed (``teacher_outputs``)."""
        sample = mk.TeacherMixedSample(**state["sample"])
        return cls(sample, state["rewards"], *teacher_outputs(sample, teacher, scorer, fused_linear=fused_linear,
                                                              distribution=distribution))

    @property
    def size(self) -> int:
        """The number of sampled sequences in the buffer."""
        return self.sample.sequences.shape[0]

    def chunks(self, count: int, rows: Optional[torch.Tensor] = None
               ) -> Iterator[tuple[mk.TeacherMixedSample, torch.Tensor, torch.Tensor, TeacherHead]]:
        """``(sample, rewards, teacher_outputs, teacher_head)`` for each of ``count`` micro-batches of the rows that
        ``rows`` selects (a minibatch of the buffer; default every row, in order), in consecutive parts whose sizes
        differ by at most one row (e.g. after a resume with another --batch-size or --grad-accum)."""
        rows = torch.arange(self.size) if rows is None else rows
        outputs = self.teacher_outputs
        for index in range(count):
            part = as_slice(rows[index * len(rows) // count : (index + 1) * len(rows) // count])
            yield (self.sample.rows(part), self.rewards[part],
                   None if outputs is None else outputs.rows(part) if isinstance(outputs, SparseTeacher) else
                   outputs[part], self.teacher_head)


def as_slice(rows: torch.Tensor) -> slice | torch.Tensor:
    """Row indices as a slice where they are consecutive and ascending (a view of the buffer's rows: its teacher
    outputs, [rows, N, V] logits, are not copied), else as they are (a gather)."""
    if len(rows) and torch.equal(rows, torch.arange(int(rows[0]), int(rows[0]) + len(rows))):
        return slice(int(rows[0]), int(rows[0]) + len(rows))
    return rows


def epoch_minibatches(size: int, minibatch: int, seed: str) -> list[torch.Tensor]:
    """One PPO epoch over a buffer of ``size`` rows (the reference code's shuffled loader over its rollout storage):
    a random permutation of the rows, drawn with ``seed`` (a string naming the draw: the run's seed, the buffer's
    first step, the rank and the epoch, so that a resumed run draws it again), cut into ``size // minibatch``
    minibatches of ``minibatch`` rows; each minibatch's rows in buffer order (the shuffle decides which rows share a
    minibatch, the order inside one changes nothing). A buffer of one minibatch is every row in order: one full-batch
    step per epoch. ValueError if ``minibatch`` does not divide ``size``."""
    if minibatch < 1 or size % minibatch:
        raise ValueError(f"a buffer of {size} rollouts does not split into minibatches of {minibatch}: give a "
                         "--num-rollouts that is a multiple of --batch-size")
    order = torch.tensor(random.Random(seed).sample(range(size), size))
    return [part.sort().values for part in order.split(minibatch)]


def teacher_outputs(sample: mk.TeacherMixedSample, teacher, scorer: Optional[ScoringTeacher], *, fused_linear: bool,
                    distribution: bool) -> tuple[TeacherOutputs, TeacherHead]:
    """``(teacher_outputs, teacher_head)`` at ``sample``'s response positions: a scoring teacher's ``SparseTeacher``
    (its top-k and log p of each sampled token: ``score`` from position P - 1); else, with ``distribution`` (the loss
    reads the teacher's distribution), the teacher's ``response_logits`` through its ModelRunner, or with
    ``fused_linear`` its ``response_hidden_states`` and output layer; else (None, None)."""
    if scorer is not None:
        return scorer.score(sample.sequences, sample.attention_mask, sample.prompt_length - 1), None
    if not distribution:
        return None, None
    with torch.no_grad():
        outputs = teacher(mk.response_hidden_states if fused_linear else mk.response_logits, sample)
    if not fused_linear:
        return outputs, None
    head = teacher.module.get_output_embeddings()
    return outputs, (full_tensor(head.weight), full_tensor(head.bias))


def make_rollout(student, teacher, tokenizer, prompts: list[str], generator: torch.Generator, vocab_size: int,
                 config: TrainConfig, *, alpha: float, reward_scaling: float, reward_clip: float,
                 scorer: Optional[ScoringTeacher] = None, distribution: bool = True) -> Rollout:
    """Sample responses from p~ = alpha p + (1 - alpha) q_old (the student in eval() mode) with the temperature and
    filters of ``config.sampling`` and score them: r_t = clip((log p(y_t) - log q(y_t)) / reward_scaling, +-
    reward_clip). With a ``scorer`` (alpha 0) the student samples alone and the scoring teacher gives log p(y_t) and
    its top-k afterwards; else the teacher (its ModelRunner) runs beside the sampler. Under --fsdp every process takes
    the same number of sampling steps."""
    input_ids, attention_mask = prompt_batch(tokenizer, prompts, max_length=config.data.max_length)
    device = next(student.parameters()).device
    sampling = config.sampling
    with eval_mode(student):
        sample = mk.sample_teacher_mixed(
            student, None if scorer is not None else teacher, input_ids.to(device), attention_mask.to(device),
            alpha=alpha, max_new_tokens=config.data.max_new_tokens, temperature=sampling.temperature,
            top_k=sampling.top_k, top_p=sampling.top_p, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, vocab_size=vocab_size, generator=generator,
            synced_processes=config.run.fsdp,
        )
    outputs, head = teacher_outputs(sample, teacher, scorer, fused_linear=config.run.fused_linear,
                                    distribution=distribution)
    if scorer is not None:
        sample = dataclasses.replace(sample, teacher_logprob=torch.where(sample.response_mask, outputs.token_logprob,
                                                                         0.0))
    rewards = mk.log_ratio_rewards(sample.teacher_logprob - sample.student_logprob, sample.response_mask,
                                   reward_scaling=reward_scaling, reward_clip=reward_clip)
    return Rollout(sample, rewards, outputs, head)
