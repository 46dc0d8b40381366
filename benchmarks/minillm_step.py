"""``python -m benchmarks --op minillm_step``: one MiniLLM PPO step's loss, forward and backward, three ways.

The step is what the trainer's ``rollout_loss`` and its backward do on one micro-batch of a rollout: the student's
fresh forward pass over the sampled sequences, every per-token term (KL_t, log q(y_t), log p(y_t), w_t), L_pg +
L_single (``mk.minillm_loss``, the trainer's defaults), and the backward through the student. Variants:

- ``naive``: the per-token terms written by hand on the logits: log_softmax of both models over [B, N, V], exp,
  product, sum, gather (the textbook implementation);
- ``ours``: ``mk.response_token_stats`` on the logits (``fused_token_stats``: the trainer's default);
- ``ours_fused_linear``: ``mk.response_token_stats`` with the teacher's output layer (``fused_linear_token_stats`` on
  both models' last hidden states: ``--fused-linear``).

Models (``MODELS``): ``tiny`` (the shipped teacher and SFT student, the trainer's default 32 prompts x up to 12 new
tokens), ``llama-128k`` (random Llamas, 2 layers, d = 256, V = 128256, tied embeddings, 8 prompts of 16 tokens x 64
new tokens, no EOS) and ``llama-4k`` (the same at V = 4096, d = 64, 4 prompts x 8 tokens: --quick). N = the response
positions of the micro-batch (rows x response length), V = the logits' width.

Not measured: the rollout (sampling, and the teacher's response logits or hidden states, computed once per rollout);
the column ``held_nv`` gives what the rollout holds through its PPO epochs for the variant, in [N, V] float32 units
(the teacher's logits: 1; its hidden states: H / V). Not included: L_PT, the cross-entropy on pre-training text, the
same plain PyTorch on every path (its [B T, V] logits, log-softmax and their gradients: 4 tensors, counted by
``tests/test_train.py``), and the optimizer update. Before a variant is timed, its loss and the norm of its gradient
over the student's parameters are checked against ``naive``'s on the same rollout (within ``CHECK_RTOL``).
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import torch

import minillm_kernels as mk
from minillm_kernels.losses import importance_weight

MODELS = {  # prompts, new tokens; for the random Llamas: prompt length (random ids), hidden size, vocabulary
    "tiny": dict(prompts=32, new_tokens=12),
    "llama-128k": dict(prompts=8, prompt_length=16, new_tokens=64, hidden=256, vocab=128256),
    "llama-4k": dict(prompts=4, prompt_length=8, new_tokens=8, hidden=64, vocab=4096),
}
VARIANTS = ("naive", "ours", "ours_fused_linear")
MIX_ALPHA = 0.2  # the trainer's default teacher share


class Setup(NamedTuple):
    """One rollout and everything a step on it reads."""

    student: torch.nn.Module
    sample: mk.TeacherMixedSample
    rewards: torch.Tensor
    teacher_logits: torch.Tensor  # [B, N, V] (naive, ours)
    teacher_hidden: torch.Tensor  # [B, N, H] (ours_fused_linear)
    teacher_head: tuple[torch.Tensor, Optional[torch.Tensor]]
    vocab_size: int

    @property
    def positions(self) -> int:
        return self.sample.response_mask.numel()


def random_llama(hidden: int, vocab: int, seed: int) -> torch.nn.Module:
    """A random Llama: 2 layers of width ``hidden``, ``vocab`` tokens, tied embeddings, float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config)


@functools.cache
def setup(model: str, device: str) -> Setup:
    """The models and a rollout sampled from them, made the same way in every process (fixed seeds)."""
    spec = MODELS[model]
    if model == "tiny":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from minillm_kernels.training.data import prompt_batch
        from minillm_kernels.training.tiny import checkpoint_dir, tiny_splits

        teacher, student = (AutoModelForCausalLM.from_pretrained(checkpoint_dir(name), dtype=torch.float32)
                            for name in ("teacher", "student-sft"))
        tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir("teacher"))
        prompts = [e.prompt for e in tiny_splits()["prompts"][: spec["prompts"]]]
        input_ids, attention_mask = prompt_batch(tokenizer, prompts, max_length=512)
        eos, vocab_size = tokenizer.eos_token_id, len(tokenizer)
    else:
        teacher, student = (random_llama(spec["hidden"], spec["vocab"], seed) for seed in (1, 2))
        input_ids = torch.randint(1, spec["vocab"], (spec["prompts"], spec["prompt_length"]),
                                  generator=torch.Generator().manual_seed(0))
        attention_mask, eos, vocab_size = torch.ones_like(input_ids), None, spec["vocab"]
    teacher, student = (m.to(device).eval() for m in (teacher, student))
    teacher.requires_grad_(False)
    sample = mk.sample_teacher_mixed(
        student, teacher, input_ids.to(device), attention_mask.to(device), alpha=MIX_ALPHA,
        max_new_tokens=spec["new_tokens"], eos_token_id=eos, vocab_size=vocab_size,
        generator=torch.Generator(device).manual_seed(0),
    )
    rewards = mk.log_ratio_rewards(sample.teacher_logprob - sample.student_logprob, sample.response_mask)
    with torch.no_grad():
        teacher_logits, teacher_hidden = mk.response_logits(teacher, sample), mk.response_hidden_states(teacher, sample)
    head = teacher.get_output_embeddings()
    return Setup(student, sample, rewards, teacher_logits, teacher_hidden, (head.weight, head.bias), vocab_size)


def naive_token_stats(student: torch.nn.Module, s: Setup) -> mk.TokenStats:
    """The per-token terms as one writes them by hand, on both models' [B, N, V] logits."""
    mask = s.sample.response_mask
    index = s.sample.response_ids.masked_fill(~mask, 0).unsqueeze(-1)
    student_logq = mk.response_logits(student, s.sample)[..., : s.vocab_size].float().log_softmax(-1)
    teacher_logp = s.teacher_logits[..., : s.vocab_size].float().log_softmax(-1)
    reverse_kld = (student_logq.exp() * (student_logq - teacher_logp)).sum(-1)
    student_logprob = student_logq.gather(-1, index).squeeze(-1)
    teacher_logprob = teacher_logp.gather(-1, index).squeeze(-1)
    weight = importance_weight(student_logprob.detach(), teacher_logprob, MIX_ALPHA)
    masked = [torch.where(mask, x, 0.0) for x in (reverse_kld, student_logprob, teacher_logprob, weight)]
    return mk.TokenStats(masked[0], masked[1], masked[2], masked[2] - masked[1].detach(), masked[3], None)


STATS: dict[str, Callable[[torch.nn.Module, Setup], mk.TokenStats]] = {
    "naive": naive_token_stats,
    "ours": lambda student, s: mk.response_token_stats(student, s.sample, s.teacher_logits, mix_alpha=MIX_ALPHA,
                                                       vocab_size=s.vocab_size),
    "ours_fused_linear": lambda student, s: mk.response_token_stats(
        student, s.sample, s.teacher_hidden, s.teacher_head, mix_alpha=MIX_ALPHA, vocab_size=s.vocab_size),
}


def step_loss(variant: str, s: Setup) -> torch.Tensor:
    """L_pg + L_single of the variant's per-token terms (the trainer's ``rollout_loss``)."""
    stats = STATS[variant](s.student, s)
    sample = s.sample
    return mk.minillm_loss(stats, sample.student_logprob, s.rewards, sample.importance_weight, sample.response_mask)[0]


def loss_and_gradient_norm(variant: str, s: Setup) -> tuple[float, float]:
    """The step's loss and the norm of its gradient over the student's parameters (left with no gradient)."""
    loss = step_loss(variant, s)
    gradients = torch.autograd.grad(loss, [p for p in s.student.parameters() if p.requires_grad])
    return float(loss.detach()), float(torch.linalg.vector_norm(torch.stack([g.norm() for g in gradients])))


def disagreement(variant: str, s: Setup) -> Optional[str]:
    """None if the variant's loss and gradient norm are naive's within ``CHECK_RTOL`` (float32), else what differs."""
    from benchmarks.variants import CHECK_RTOL

    rtol = CHECK_RTOL[torch.float32]
    got, want = loss_and_gradient_norm(variant, s), loss_and_gradient_norm("naive", s)
    for name, value, expected in zip(("loss", "gradient norm"), got, want):
        if not abs(value - expected) <= rtol * abs(expected):
            return f"{name} {value:.6g}, naive {expected:.6g}"
    return None


def held_nv(variant: str, s: Setup) -> float:
    """What the rollout holds for the variant through its PPO epochs (the teacher's outputs), in [N, V] float32."""
    held = s.teacher_hidden if variant == "ours_fused_linear" else s.teacher_logits
    return held.numel() * held.element_size() / (s.positions * s.teacher_logits.shape[-1] * 4)


def measure_step(model: str, variant: str, device: str, repeats: int) -> dict:
    """One case, in this process: the row of ``benchmarks.run`` (times in ms, peak extra memory in MB and in [N, V]
    float32 tensors, N and V of the model's rollout), after the check against naive."""
    from benchmarks.run import WRONG, median_ms, peak_extra_bytes

    s = setup(model, device)
    width = s.teacher_logits.shape[-1]
    case = dict(model=model, tokens=s.positions, vocab=width, hidden=s.teacher_hidden.shape[-1],
                held_nv=held_nv(variant, s))
    wrong = None if variant == "naive" else disagreement(variant, s)
    if wrong:
        return dict(case, status=f"{WRONG}: {wrong}")
    parameters = [p for p in s.student.parameters() if p.requires_grad]

    def forward() -> None:
        with torch.no_grad():
            step_loss(variant, s)

    def forward_backward() -> None:
        for p in parameters:
            p.grad = None
        step_loss(variant, s).backward()

    forward_backward()  # warm-up: the kernels' builds, the first touch of fresh pages
    forward()
    for p in parameters:
        p.grad = None
    peak = peak_extra_bytes(forward_backward, device)
    return dict(case, status="ok", fwd_ms=median_ms(forward, device, repeats),
                fwd_bwd_ms=median_ms(forward_backward, device, repeats), peak_extra_mb=peak / 2**20,
                peak_extra_nv=peak / (s.positions * width * 4))
