"""One training run's state (``Run``): the models, the optimizer, the data draws and where the run stands; what a
method's batches and loss and the checkpoint read and write."""
from __future__ import annotations

import contextlib
import dataclasses
import random
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from minillm_kernels.distributed import local_tensor, parallelize
from minillm_kernels.training.data import TrainingData, causal_lm_logits
from minillm_kernels.training.models import load_student
from minillm_kernels.training.teacher import HTTPTeacher, InProcessTeacher, ScoringTeacher, SparseTeacher, empty_teacher

if TYPE_CHECKING:
    from minillm_kernels.training.cache import TeacherCache
    from minillm_kernels.training.config import TrainConfig
    from minillm_kernels.training.methods import Method
    from minillm_kernels.training.rollout import Rollout

SHARDED_CHECKPOINT = re.compile(r"\d{6}")  # checkpoint/<save number>/ under --fsdp (checkpoint.save_sharded)


class Sampler:
    """Seeded draws of global batches; each process keeps its rank's slice (prompts sharded by rank)."""

    def __init__(self, items: list, seed: int, rank: int, world: int) -> None:
        self.items, self.rank, self.world = items, rank, world
        self.rng = random.Random(seed)

    def next(self, per_rank: int) -> list:
        drawn = [self.items[self.rng.randrange(len(self.items))] for _ in range(per_rank * self.world)]
        return drawn[self.rank * per_rank : (self.rank + 1) * per_rank]


def make_samplers(data: TrainingData, seed: int, rank: int, world: int) -> dict[str, Sampler]:
    """A run's seeded draws: "pairs" (the teacher-forced methods'), "prompts" (the rollouts') and "lm" (L_PT's text).
    The pairs and the prompts are drawn with the same seed, so that every method of a seed sees the pool's prompts in
    the same order."""
    return {name: Sampler(items, seed + offset, rank, world)
            for name, items, offset in (("pairs", data.pairs, 0), ("prompts", data.prompts, 0), ("lm", data.lm, 2))}


@dataclasses.dataclass
class Run:
    """One method's training run: the models, the optimizer and data draws, and where it stands."""

    config: TrainConfig
    method: Method
    student: torch.nn.Module  # the Hugging Face model (its parameters sharded under --fsdp)
    model: torch.nn.Module  # every use of the student goes through it: its ModelRunner (DDP'd or sharded)
    teacher: Optional[torch.nn.Module]  # the teacher's ModelRunner (sharded under --fsdp); None if cached or served
    tokenizer: object
    optimizer: torch.optim.Optimizer
    samplers: dict[str, Sampler]  # "pairs" (teacher-forced methods), "prompts" (rollouts), "lm" (L_PT text)
    vocab_size: int
    checkpoint_path: Path  # checkpoint.pt, or under --fsdp the folder checkpoint/ (checkpoint.save_sharded)
    rank: int
    world: int
    step: int = 0
    resumed: bool = False
    rollout: Optional[Rollout] = None  # an on-policy method's current buffer of samples
    scorer: Optional[ScoringTeacher] = None  # the teacher as its top-k (--teacher-top-k, --teacher-server)
    cache: Optional[TeacherCache] = None  # the offline top-k teacher cache (--teacher-cache)
    history: list[dict] = dataclasses.field(default_factory=list)  # [{"step", "validation"}], the same on every rank
    best: Optional[dict] = None  # the chosen checkpoint so far, {"step", "score"} (--select-by on validation)
    # this process's teacher forward tokens (non-padding), generated (rollout) tokens and training seconds so far
    compute: dict = dataclasses.field(
        default_factory=lambda: {"teacher_forward_tokens": 0, "generated_tokens": 0, "seconds": 0.0})

    @property
    def device(self) -> torch.device:
        return next(self.student.parameters()).device

    @property
    def out_dir(self) -> Path:
        """--out-dir: the checkpoint, the log, best/ (the chosen checkpoint's weights) and student/ (the last)."""
        return self.checkpoint_path.parent

    @property
    def checkpoint(self) -> Optional[Path]:
        """What --resume reads: checkpoint.pt, or under --fsdp the newest complete save in checkpoint/; None if there
        is none yet."""
        if self.checkpoint_path.suffix == ".pt":
            return self.checkpoint_path if self.checkpoint_path.exists() else None
        saves = [p for p in self.checkpoint_path.glob("*") if SHARDED_CHECKPOINT.fullmatch(p.name) and p.is_dir()]
        return max(saves, default=None)

    def say(self, text: str) -> None:
        if self.rank == 0:
            tqdm.write(text, file=sys.stderr)

    def no_sync(self, skip: bool = True):
        """DDP's no_sync() (gradients not all-reduced in this backward) if ``skip`` and under DDP. FSDP2
        reduce-scatters after every backward instead: its sharded gradients accumulate (skipping the reduction
        would keep whole, unsharded gradients until the last backward)."""
        skip = skip and isinstance(self.model, torch.nn.parallel.DistributedDataParallel)
        return self.model.no_sync() if skip else contextlib.nullcontext()

    def autocast(self):
        """bfloat16 autocast with --bf16, else nothing."""
        if self.config.run.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def to_device(self, batch):
        """A NamedTuple of tensors (a teacher-forced batch) on the student's device."""
        return type(batch)(*(t.to(self.device) for t in batch))

    def teacher_logits(self, batch) -> torch.Tensor:
        """The frozen teacher's logits on a teacher-forced batch, its first ``vocab_size`` columns (counted in
        ``compute``)."""
        with torch.no_grad():
            logits = causal_lm_logits(self.teacher, batch.input_ids, batch.attention_mask)
        self.compute["teacher_forward_tokens"] += int(batch.attention_mask.sum())
        return logits[..., : self.vocab_size]

    def sparse_teacher(self, batch) -> Optional[SparseTeacher]:
        """The teacher's top-k at each position of a teacher-forced batch (``[B, L, K]``: position i's distribution of
        token i + 1; filler where no label), from the offline cache or the scoring teacher (counted in ``compute``);
        None for the dense teacher in memory (``teacher_logits``)."""
        if self.cache is not None:
            return self.cache.lookup(batch)
        if self.scorer is None:
            return None
        scores = self.scorer.score(batch.input_ids, batch.attention_mask, 0)
        self.compute["teacher_forward_tokens"] += int(batch.attention_mask.sum())
        last = empty_teacher((batch.input_ids.shape[0], 1), scores.top_k, self.device)  # (position L - 1: no label)
        return SparseTeacher(*(torch.cat([x, y.to(x.dtype)], dim=1) for x, y in
                               ((scores.ids, last.ids), (scores.logprobs, last.logprobs),
                                (scores.token_logprob, last.token_logprob))))

    def stop_if_not_finite(self, value: torch.Tensor, what: str, parts: dict) -> None:
        """FloatingPointError naming the step, the loss parts and the last checkpoint if ``value`` is NaN or inf."""
        if not torch.isfinite(value):
            listed = ", ".join(f"{name}={float(torch.as_tensor(part).detach()):.4g}" for name, part in parts.items())
            raise FloatingPointError(
                f"{self.method.name}: non-finite {what} {value.item()} at step {self.step}"
                + (f"; parts: {listed}" if listed else "")
                + f". Last checkpoint: {self.checkpoint or 'none'}")

    def largest_parameter(self) -> torch.Tensor:
        """max |p| over the student's parameters (NaN if any is NaN), over every process's shards under --fsdp
        (gathered: gloo's MAX reduction may drop a NaN)."""
        shards = [local_tensor(p).detach() for p in self.student.parameters()]
        largest = torch.stack([shard.abs().max() for shard in shards if shard.numel()]).max()
        if self.world == 1:
            return largest
        gathered = [torch.empty_like(largest) for _ in range(self.world)]
        dist.all_gather(gathered, largest)
        return torch.stack(gathered).max()


def new_run(config: TrainConfig, out_dir: Path, teacher, tokenizer, data: TrainingData, rank: int, world: int, *,
            cache: Optional[TeacherCache] = None, device: Optional[torch.device] = None) -> Run:
    """A fresh run of ``config``'s method from step 0: a new copy of the start student (its dropout on unless the
    method updates in eval() mode) behind its ModelRunner (DDP'd, or sharded with --fsdp) on ``device`` (default:
    the teacher's), AdamW, the seeded data draws; ``teacher`` is the teacher's ModelRunner (None if it is cached, in
    ``cache``, or served); the scoring teacher of --teacher-top-k or --teacher-server. Its checkpoint goes in
    ``out_dir``."""
    method, fsdp, form = config.method, config.run.fsdp, config.teacher
    student = load_student(config.model, device or teacher.module.device)
    student.train(method.trains_with_dropout)  # MiniLLM updates in eval() mode, as the reference code
    model = parallelize(student, fsdp=fsdp, trainable=True)  # before the optimizer: FSDP2 replaces parameters
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.optim.lr, betas=config.optim.betas,
                                  weight_decay=config.optim.weight_decay)
    widths = [len(tokenizer), student.get_output_embeddings().weight.shape[0]]
    if teacher is not None:
        widths.append(teacher.module.get_output_embeddings().weight.shape[0])
    vocab_size = min(widths)
    scorer = None
    if form.teacher_server:
        scorer = HTTPTeacher(form.teacher_server, config.model.teacher, form.teacher_top_k, config.sampling.temperature)
    elif form.form == "top-k":
        scorer = InProcessTeacher(teacher, form.teacher_top_k, config.sampling.temperature, vocab_size)
    return Run(config=config, method=method, student=student, model=model, teacher=teacher, tokenizer=tokenizer,
               optimizer=optimizer, samplers=make_samplers(data, config.run.seed, rank, world), vocab_size=vocab_size,
               checkpoint_path=out_dir / ("checkpoint" if fsdp else "checkpoint.pt"), rank=rank, world=world,
               scorer=scorer, cache=cache)
