"""``python -m benchmarks --op distillation_step``: one step of TRL's ``DistillationTrainer`` loss, two ways.

The step is what the trainer's ``training_step`` does on one micro-batch once the completions are generated:
``trainer.compute_loss`` (both backbones, then the divergence from their last hidden states and lm_heads) and the
backward through the student. Not measured: the generation, the optimizer. Variants (TRL 1.16, the ``trl`` extra):

- ``trl``: ``trl.DistillationTrainer``, whose loss is TRL's chunked divergence (``trl/kernels/chunked_divergence.py``:
  float32 tiles of 4096 tokens x 32768 columns; Triton on a GPU, torch operations on each tile elsewhere);
- ``ours``: ``minillm_kernels.integrations.trl.DistillationTrainer``, the same trainer with its loss on
  ``mk.fused_linear_divergence`` (and the logged entropy from one more no-grad pass).

Models (``MODELS``): random Llamas (``benchmarks.minillm_step.random_llama``: 2 layers, tied embeddings), the
teacher twice the student's width, a batch of prompts of random ids with completions of a fixed length (all counted):
``llama-32k`` (V = 32000, student d = 256, 8 prompts of 16 tokens + 64 completion tokens: N = 512), ``llama-8k``
(V = 8192, d = 64, 4 x (8 + 64): N = 256, the size tests/test_trl.py measures memory at) and ``llama-4k`` (V = 4096,
d = 64, 2 x (8 + 16): --quick). The divergence is TRL's beta (``BETAS``: forward KL 0, JSD 0.5, reverse KL 1).
Before a variant is timed, its loss and the norm of its gradient are checked against ``trl``'s (``CHECK_RTOL``).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch

from benchmarks.minillm_step import random_llama

MODELS = {  # student hidden size, vocabulary, prompts, prompt length, completion length
    "llama-32k": dict(hidden=256, vocab=32000, prompts=8, prompt_length=16, completion_length=64),
    "llama-8k": dict(hidden=64, vocab=8192, prompts=4, prompt_length=8, completion_length=64),
    "llama-4k": dict(hidden=64, vocab=4096, prompts=2, prompt_length=8, completion_length=16),
}
VARIANTS = ("trl", "ours")
BETAS = {"forward_kl": 0.0, "jsd": 0.5, "reverse_kl": 1.0}  # TRL's beta of each divergence it computes


class Setup(NamedTuple):
    """A trainer and one micro-batch of its inputs."""

    trainer: object  # a trl.DistillationTrainer
    inputs: dict  # prompt_ids, prompt_mask, completion_ids, completion_mask, num_items_in_batch


def trl_available() -> bool:
    try:
        import minillm_kernels.integrations.trl  # noqa: F401 (TRL, in the tested version)
    except ImportError:
        return False
    return True


@functools.cache
def setup(model: str, variant: str, divergence: str, device: str) -> Setup:
    """The variant's trainer on the model's random Llamas and a batch, made the same way in every process."""
    import trl
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    from minillm_kernels.integrations.trl import DistillationTrainer

    spec = MODELS[model]
    student = random_llama(spec["hidden"], spec["vocab"], seed=2)
    teacher = random_llama(2 * spec["hidden"], spec["vocab"], seed=1)
    # A word-level tokenizer over the vocabulary: the trainer needs one (pad id), the step does not tokenize.
    vocab = {f"t{i}": i for i in range(spec["vocab"])}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t1")),
                                        pad_token="t0", eos_token="t0")
    args = trl.DistillationConfig(
        output_dir="out/benchmarks/distillation_step", beta=BETAS[divergence], report_to="none", save_strategy="no",
        use_cpu=device == "cpu", per_device_train_batch_size=spec["prompts"], bf16=False,
    )
    trainer_class = trl.DistillationTrainer if variant == "trl" else DistillationTrainer
    trainer = trainer_class(model=student, teacher_model=teacher, args=args, processing_class=tokenizer,
                            train_dataset=Dataset.from_list([{"prompt": "t1"}]))
    generator = torch.Generator().manual_seed(0)
    ids = [torch.randint(1, spec["vocab"], (spec["prompts"], spec[f"{part}_length"]), generator=generator)
           for part in ("prompt", "completion")]
    inputs = {"prompt_ids": ids[0], "prompt_mask": torch.ones_like(ids[0]), "completion_ids": ids[1],
              "completion_mask": torch.ones_like(ids[1]), "num_items_in_batch": torch.tensor(ids[1].numel())}
    trainer.model.train()
    return Setup(trainer, {key: value.to(trainer.accelerator.device) for key, value in inputs.items()})


def step_loss(s: Setup) -> torch.Tensor:
    return s.trainer.compute_loss(s.trainer.model, s.inputs)


def loss_and_gradient_norm(s: Setup) -> tuple[float, float]:
    """The step's loss and the norm of its gradient over the student's parameters (left with no gradient)."""
    loss = step_loss(s)
    gradients = torch.autograd.grad(loss, [p for p in s.trainer.model.parameters() if p.requires_grad])
    return float(loss.detach()), float(torch.linalg.vector_norm(torch.stack([g.norm() for g in gradients])))


def disagreement(model: str, variant: str, divergence: str, device: str) -> Optional[str]:
    """None if the variant's loss and gradient norm are ``trl``'s within ``CHECK_RTOL`` (float32), else what differs."""
    from benchmarks.variants import CHECK_RTOL

    rtol = CHECK_RTOL[torch.float32]
    got = loss_and_gradient_norm(setup(model, variant, divergence, device))
    want = loss_and_gradient_norm(setup(model, "trl", divergence, device))
    for name, value, expected in zip(("loss", "gradient norm"), got, want):
        if not abs(value - expected) <= rtol * abs(expected):
            return f"{name} {value:.6g}, trl {expected:.6g}"
    return None


def peak_step_bytes(model: str, variant: str, divergence: str, device: str) -> int:
    """The memory one step (``compute_loss`` and its backward) adds at its peak, after a warm-up step
    (``benchmarks.run.peak_extra_bytes``: on the CPU the peak resident set, exact for large tensors only in a
    process started with ``MALLOC_MMAP_THRESHOLD_`` set, as ``benchmarks.run`` starts its workers)."""
    from benchmarks.run import peak_extra_bytes

    s = setup(model, variant, divergence, device)
    parameters = [p for p in s.trainer.model.parameters() if p.requires_grad]

    def forward_backward() -> None:
        for p in parameters:
            p.grad = None
        step_loss(s).backward()

    forward_backward()  # warm-up: the kernels' builds, the first touch of fresh pages
    for p in parameters:
        p.grad = None
    return peak_extra_bytes(forward_backward, device)


def measure_distillation_step(model: str, variant: str, divergence: str, device: str, repeats: int) -> dict:
    """One case, in this process: the row of ``benchmarks.run`` (times in ms, peak extra memory in MB and in [N, V]
    float32 tensors, N the completion tokens), after the check against ``trl``."""
    from benchmarks.run import WRONG, median_ms

    spec = MODELS[model]
    tokens = spec["prompts"] * spec["completion_length"]
    case = dict(model=model, tokens=tokens, vocab=spec["vocab"], hidden=spec["hidden"])
    wrong = None if variant == "trl" else disagreement(model, variant, divergence, device)
    if wrong:
        return dict(case, status=f"{WRONG}: {wrong}")
    s = setup(model, variant, divergence, device)
    peak = peak_step_bytes(model, variant, divergence, device)
    parameters = [p for p in s.trainer.model.parameters() if p.requires_grad]

    def forward() -> None:
        with torch.no_grad():
            step_loss(s)

    def forward_backward() -> None:
        for p in parameters:
            p.grad = None
        step_loss(s).backward()

    return dict(case, status="ok", fwd_ms=median_ms(forward, device, repeats),
                fwd_bwd_ms=median_ms(forward_backward, device, repeats), peak_extra_mb=peak / 2**20,
                peak_extra_nv=peak / (tokens * spec["vocab"] * 4))
