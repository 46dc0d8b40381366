"""The output projection fused into the reverse-KL family: the MiniLLM terms from hidden states, chunk by chunk.

``fused_linear_reverse_kld`` and ``fused_linear_token_stats`` take the two models' last hidden states and
output layers instead of their logits, with the student and teacher logits
    s = h_s W_s^T + b_s,      t = h_t W_t^T + b_t          (h: [N, H_s] / [N, H_t], W: [V_s, H_s] / [V_t, H_t])
and compute exactly what ``fused_reverse_kld`` / ``fused_token_stats`` compute on (s, t), without ever holding
the [N, V] logits: the tokens are split into chunks of C rows, and per chunk
    1. s_c, t_c = the chunk's logits, two matmuls in the input dtype (float32 accumulation), written into two
       [C, V] buffers reused from chunk to chunk;
    2. the reverse-KL kernel of the chosen backend (``ops/reverse_kld.py``) gives the per-token terms;
    3. the kernel's backward gives G_c = dL/ds_c (one more [C, V] buffer), turned at once into
           grad h_s[c] = G_c W_s,     grad W_s += G_c^T h_s[c],     grad b_s += sum_rows G_c.
Only the first ``vocab_size`` rows of each weight are used (the padding rows get a zero gradient), and masked
tokens are skipped (they get zero outputs and a zero gradient), so the work is proportional to the counted
tokens. Peak extra memory: three [C, V] buffers in the input dtype, plus the gradients of the inputs.

When is step 3 done? The loss's upstream gradient must be known to form G_c:
- ``fused_linear_reverse_kld`` with reduction "sum" or "mean": the upstream of each KL_t is the same scalar
  (times 1/count for "mean"), so step 3 runs in the forward pass with a_t = 1 (or 1/count), and the backward
  only scales the stored gradients by the scalar (free when it is 1). Four matmuls per chunk in all.
- reduction "none" and ``fused_linear_token_stats``: the upstreams (a_t, b_t, c_t) of KL_t, log q(y_t), H_t are
  per token and only known in the backward. The forward keeps per-token scalars (KL, H and the row statistics
  (m_s, log Z_s, m_t, log Z_t)); the backward recomputes each chunk's two logits and runs step 3 with them.
  Six matmuls per chunk in all (the teacher's too: the gradient needs log p).
Measured (``python -m benchmarks --op linear_reverse_kld``, 2 CPU cores, V = 32000, H = 256, float32, 4k-16k
tokens): the same peak memory either way (~290 MB), the forward-time gradient 1.4-1.5x faster forward+backward;
so the first is used wherever the upstream is a scalar. The matmuls stay in the inputs' dtype under autocast, and
grad W accumulates in the weight's dtype (one rounding per chunk).
Gradients flow to the student hidden states, weight and bias; the teacher is frozen.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional, Union

import torch

from minillm_kernels import reference
from minillm_kernels.dispatch import (
    TokenStats,
    _assemble_token_stats,
    _check_reduction,
    _check_sampling_args,
    _validate_token_args,
)
from minillm_kernels.ops import reverse_kld as ops

Tensor = torch.Tensor
Rows = Union[slice, Tensor]  # a chunk's tokens: a slice of [0, N), or the indices of its counted tokens

# The default chunk holds three [C, V] buffers (both models' logits and the student's logit gradient) in at most
# this many bytes (on a GPU, at most a quarter of its free memory). On the CPU, 256 MiB is ~700 rows at V = 32000
# in float32; the time was the same from 256 rows up (2 cores, N = 4096, H = 256), and 1.6x longer at 64 rows.
# On a GPU, 1 GiB is ~1400 rows at V = 128256 in bf16, in the range where the matmuls run at full speed.
CHUNK_BYTES_CPU = 256 * 2**20
CHUNK_BYTES_GPU = 2**30
GPU_FREE_MEMORY_SHARE = 0.25


def default_chunk_size(n_tokens: int, vocab_size: int, dtype: torch.dtype, device: torch.device) -> int:
    """Tokens per chunk: as many as fit three [C, vocab_size] ``dtype`` buffers in the budget (``CHUNK_BYTES_CPU``;
    on a GPU ``CHUNK_BYTES_GPU`` or ``GPU_FREE_MEMORY_SHARE`` of its free memory, the smaller), then evened out so
    that the chunks of ``n_tokens`` have equal sizes (e.g. 1100 tokens at a 1024 limit: two chunks of 550)."""
    budget = CHUNK_BYTES_CPU
    if device.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(device)
        budget = min(CHUNK_BYTES_GPU, int(free_bytes * GPU_FREE_MEMORY_SHARE))
    bytes_per_token = 3 * vocab_size * torch.empty((), dtype=dtype).element_size()
    max_rows = max(1, budget // bytes_per_token)
    n_chunks = max(1, math.ceil(n_tokens / max_rows))
    return max(1, math.ceil(n_tokens / n_chunks))


class _Projection(NamedTuple):
    """One model's output layer on its flattened hidden states, restricted to the real vocabulary."""

    hidden: Tensor  # [N, H]
    weight: Tensor  # [vocab_size, H], a view of the first rows of the [V, H] weight
    bias: Optional[Tensor]  # [vocab_size] or None

    def logits(self, hidden_rows: Tensor, out: Tensor) -> Tensor:
        """``hidden_rows @ weight^T + bias`` written into ``out`` ([C, vocab_size], contiguous)."""
        if self.bias is None:
            return torch.mm(hidden_rows, self.weight.t(), out=out)
        return torch.addmm(self.bias, hidden_rows, self.weight.t(), out=out)


class _Plan(NamedTuple):
    """What the autograd functions need besides the tensors they differentiate."""

    chunks: list[Rows]
    target: Optional[Tensor]  # [N] int64
    temperature: float
    vocab_size: int
    backend: str
    needs_grad: bool  # grad mode was on when called (forward-time gradients are skipped otherwise)


def _chunks(n_tokens: int, counted: Optional[Tensor], chunk_size: int) -> list[Rows]:
    """The chunks' rows: slices of [0, N) without a mask, else slices of the indices of the counted tokens."""
    n_rows = n_tokens if counted is None else counted.numel()
    bounds = [(start, min(start + chunk_size, n_rows)) for start in range(0, n_rows, chunk_size)]
    return [slice(lo, hi) if counted is None else counted[lo:hi] for lo, hi in bounds]


def _rows_count(rows: Rows) -> int:
    return rows.stop - rows.start if isinstance(rows, slice) else rows.numel()


class _ChunkLogits:
    """Both models' logits chunk by chunk, into two [C, vocab] buffers (C: the largest chunk) allocated once."""

    def __init__(self, student: _Projection, teacher: _Projection, plan: _Plan) -> None:
        self.models = (student, teacher)
        shape = (max(map(_rows_count, plan.chunks), default=0), plan.vocab_size)
        self.buffers = (student.hidden.new_empty(shape), student.hidden.new_empty(shape))

    def __call__(self, rows: Rows) -> tuple[Tensor, Tensor, Tensor]:
        """The chunk's student hidden states [C, H_s] and the two models' logits [C, vocab] (buffer views)."""
        (student, teacher), n = self.models, _rows_count(rows)
        student_hidden = student.hidden[rows]
        student_logits = student.logits(student_hidden, self.buffers[0][:n])
        teacher_logits = teacher.logits(teacher.hidden[rows], self.buffers[1][:n])
        return student_hidden, student_logits, teacher_logits


def _chunk_stats(student_logits: Tensor, teacher_logits: Tensor, target: Optional[Tensor], plan: _Plan):
    """``(kl, student_logprob, teacher_logprob, entropy, row_stats)`` of a chunk's logits, from the chosen backend
    (the reference has no row statistics: None)."""
    if plan.backend == "reference":
        stats = reference.token_stats(student_logits, teacher_logits, target, None, plan.temperature, plan.vocab_size)
        return (*stats, None)
    return ops.token_stats(
        student_logits, teacher_logits, target, None, 1.0 / plan.temperature, plan.vocab_size, plan.backend
    )


def _chunk_logit_gradient(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Optional[Tensor],
    upstream: tuple[Tensor, Tensor, Tensor],
    saved: tuple[Tensor, Tensor, Optional[Tensor]],
    plan: _Plan,
) -> Tensor:
    """d/ds of sum_i a_i KL_i + b_i log q_i(y_i) + c_i H_i over a chunk, ``[C, vocab]`` in the logits' dtype, from
    ``upstream = (a, b, c)`` and the forward's ``saved = (kl, entropy, row_stats)``."""
    grad_kl, grad_student_logprob, grad_entropy = upstream
    if plan.backend == "reference":
        with torch.enable_grad():
            student_logits = student_logits.detach().requires_grad_()
            kl, student_logprob, _, entropy = reference.token_stats(
                student_logits, teacher_logits, target, None, plan.temperature, plan.vocab_size
            )
            loss = (grad_kl * kl + grad_student_logprob * student_logprob + grad_entropy * entropy).sum()
            return torch.autograd.grad(loss, student_logits)[0]
    kl, entropy, row_stats = saved
    return ops.token_stats_backward(
        student_logits, teacher_logits, target, None, grad_kl, grad_student_logprob, grad_entropy,
        kl, entropy, row_stats, 1.0 / plan.temperature, plan.vocab_size, plan.backend,
    )


class _InputGradients:
    """The student's input gradients, filled chunk by chunk (None for an input that needs none).

    grad_weight accumulates in the weight's dtype (one rounding per chunk, by ``addmm_``; a float32 copy of a
    bf16 [V, H] weight would cost more memory than the chunks); grad_bias in float32 (float64 for float64).
    """

    def __init__(self, student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor],
                 needs: tuple[bool, bool, bool], vocab_size: int) -> None:
        self.hidden = torch.zeros_like(student_hidden) if needs[0] else None
        self.weight = torch.zeros_like(student_weight) if needs[1] else None
        self.bias = None
        if student_bias is not None and needs[2]:
            self.bias = student_bias.new_zeros(student_bias.shape, dtype=ops.stats_dtype(student_bias.dtype))
        self.bias_dtype = None if student_bias is None else student_bias.dtype
        self.vocab_size = vocab_size

    @property
    def any(self) -> bool:
        return self.hidden is not None or self.weight is not None or self.bias is not None

    def add_chunk(self, grad_logits: Tensor, rows: Rows, student_hidden: Tensor, student: _Projection) -> None:
        """Turn the chunk's logit gradient G [C, vocab] into grad h[rows] = G W, grad W += G^T h, grad b += sum G."""
        if self.hidden is not None:
            self.hidden[rows] = grad_logits @ student.weight
        if self.weight is not None:
            self.weight[: self.vocab_size].addmm_(grad_logits.t(), student_hidden)
        if self.bias is not None:
            self.bias[: self.vocab_size] += grad_logits.sum(0, dtype=self.bias.dtype)

    def result(self) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        """``(grad_hidden, grad_weight, grad_bias)``, grad_bias in the bias's dtype."""
        return self.hidden, self.weight, None if self.bias is None else self.bias.to(self.bias_dtype)


def _without_autocast(method):
    """Run a forward/backward with autocast off on the inputs' device: the matmuls stay in the inputs' dtype
    (an autocast region would otherwise run some of them, e.g. G W, in its lower precision)."""

    @functools.wraps(method)
    def run(ctx, first, *args):
        with torch.autocast(first.device.type, enabled=False):
            return method(ctx, first, *args)

    return run


def _projections(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                 vocab_size: int) -> tuple[_Projection, _Projection]:
    restrict = lambda x: None if x is None else x[:vocab_size]  # noqa: E731 (a view: the first rows)
    return (
        _Projection(student_hidden, restrict(student_weight), restrict(student_bias)),
        _Projection(teacher_hidden, restrict(teacher_weight), restrict(teacher_bias)),
    )


class _LinearReverseKLDSum(torch.autograd.Function):
    """sum_t scale * KL_t over the counted tokens, with the student's gradients computed during the forward."""

    @staticmethod
    @_without_autocast
    def forward(ctx, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                plan: _Plan, scale: float):
        student, teacher = _projections(student_hidden, student_weight, student_bias, teacher_hidden,
                                        teacher_weight, teacher_bias, plan.vocab_size)
        needs = tuple(plan.needs_grad and x for x in ctx.needs_input_grad[:3])
        grads = _InputGradients(student_hidden, student_weight, student_bias, needs, plan.vocab_size)
        chunk_logits = _ChunkLogits(student, teacher, plan)
        total = student_hidden.new_zeros((), dtype=ops.stats_dtype(student_hidden.dtype))
        for rows in plan.chunks:
            hidden_rows, student_logits, teacher_logits = chunk_logits(rows)
            kl, _, _, entropy, row_stats = _chunk_stats(student_logits, teacher_logits, None, plan)
            total += kl.sum()
            if grads.any:  # (the logit gradient, passed on directly, is freed before the next chunk's)
                upstream = (torch.full_like(kl, scale), torch.zeros_like(kl), torch.zeros_like(kl))
                grads.add_chunk(
                    _chunk_logit_gradient(student_logits, teacher_logits, None, upstream, (kl, entropy, row_stats),
                                          plan),
                    rows, hidden_rows, student,
                )
        ctx.save_for_backward(*grads.result())  # intermediates: freed after the backward, unless retained
        return total * scale

    @staticmethod
    @_without_autocast
    def backward(ctx, grad_total):
        # The stored gradients are for an upstream gradient of 1: scale them (without a copy when it is 1).
        unit = bool(grad_total == 1)
        grads = tuple(g if g is None or unit else g * grad_total.to(g.dtype) for g in ctx.saved_tensors)
        return (*grads, None, None, None, None, None)


class _LinearTokenStats(torch.autograd.Function):
    """Per-token (KL, log q(y), log p(y), H), ``[N]`` each; the backward recomputes each chunk's logits."""

    @staticmethod
    @_without_autocast
    def forward(ctx, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                plan: _Plan):
        student, teacher = _projections(student_hidden, student_weight, student_bias, teacher_hidden,
                                        teacher_weight, teacher_bias, plan.vocab_size)
        n_tokens = student_hidden.shape[0]
        stats_dtype = ops.stats_dtype(student_hidden.dtype)
        outputs = tuple(student_hidden.new_zeros(n_tokens, dtype=stats_dtype) for _ in range(4))
        row_stats = None if plan.backend == "reference" else student_hidden.new_zeros(n_tokens, 4, dtype=stats_dtype)
        chunk_logits = _ChunkLogits(student, teacher, plan)
        for rows in plan.chunks:
            target = None if plan.target is None else plan.target[rows]
            _, student_logits, teacher_logits = chunk_logits(rows)
            *chunk_outputs, chunk_row_stats = _chunk_stats(student_logits, teacher_logits, target, plan)
            for out, value in zip(outputs, chunk_outputs):
                out[rows] = value
            if row_stats is not None:
                row_stats[rows] = chunk_row_stats
        kl, _, teacher_logprob, entropy = outputs
        ctx.save_for_backward(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                              teacher_bias, kl, entropy, row_stats)
        ctx.plan = plan
        ctx.mark_non_differentiable(teacher_logprob)
        return outputs

    @staticmethod
    @_without_autocast
    def backward(ctx, grad_kl, grad_student_logprob, grad_teacher_logprob, grad_entropy):
        (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
         kl, entropy, row_stats) = ctx.saved_tensors
        plan: _Plan = ctx.plan
        student, teacher = _projections(student_hidden, student_weight, student_bias, teacher_hidden,
                                        teacher_weight, teacher_bias, plan.vocab_size)
        # Unused outputs get zeros (autograd materializes them); expanded ones (from .sum()) must be contiguous.
        upstream = tuple(g.to(kl.dtype).contiguous() for g in (grad_kl, grad_student_logprob, grad_entropy))
        grads = _InputGradients(student_hidden, student_weight, student_bias, ctx.needs_input_grad[:3],
                                plan.vocab_size)
        chunk_logits = _ChunkLogits(student, teacher, plan)
        for rows in plan.chunks:
            target = None if plan.target is None else plan.target[rows]
            hidden_rows, student_logits, teacher_logits = chunk_logits(rows)
            saved = (kl[rows], entropy[rows], None if row_stats is None else row_stats[rows])
            grads.add_chunk(  # (the logit gradient, passed on directly, is freed before the next chunk's)
                _chunk_logit_gradient(student_logits, teacher_logits, target, tuple(u[rows] for u in upstream),
                                      saved, plan),
                rows, hidden_rows, student,
            )
        return (*grads.result(), None, None, None, None)


# --------------------------------------------------------------------------------------------------------------
# Validation and the public functions
# --------------------------------------------------------------------------------------------------------------
def _check_projection(model: str, hidden: object, weight: object, bias: object) -> None:
    """One model's hidden states [..., H], weight [V, H] and optional bias [V]: tensors of one dtype and device."""
    named = {f"{model}_hidden": hidden, f"{model}_weight": weight, f"{model}_bias": bias}
    for name, x in named.items():
        if x is None and name.endswith("_bias"):
            continue
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if x.dtype != hidden.dtype:
            raise TypeError(f"{name} is {x.dtype} but {model}_hidden is {hidden.dtype}: cast them to one dtype")
        if x.device != hidden.device:
            raise ValueError(f"{name} is on {x.device} but {model}_hidden is on {hidden.device}")
    if hidden.dim() == 0 or hidden.shape[-1] == 0:
        raise ValueError(f"{model}_hidden must have shape [..., H] with H >= 1, got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[0] == 0 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{model}_weight must have shape [V, H] with V >= 1 and H = {model}_hidden.shape[-1] = {hidden.shape[-1]} "
            f"(the lm_head weight, as nn.Linear stores it), got {tuple(weight.shape)}"
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"{model}_bias must have shape [V] = ({weight.shape[0]},), got {tuple(bias.shape)}")


def _plan(
    student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
    target_ids, mask, temperature, vocab_size, chunk_size, backend,
) -> tuple[_Plan, Optional[Tensor], torch.Size]:
    """Validate everything; return the plan, the flattened mask and the leading shape."""
    _check_projection("student", student_hidden, student_weight, student_bias)
    _check_projection("teacher", teacher_hidden, teacher_weight, teacher_bias)
    if student_hidden.dtype != teacher_hidden.dtype:
        raise TypeError(
            f"student_hidden ({student_hidden.dtype}) and teacher_hidden ({teacher_hidden.dtype}) must share a dtype "
            "(the kernels take both models' logits in one dtype)"
        )
    if student_hidden.device != teacher_hidden.device:
        raise ValueError(f"student_hidden is on {student_hidden.device} but teacher_hidden is on {teacher_hidden.device}")
    lead_shape = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != lead_shape:
        raise ValueError(
            f"student_hidden {tuple(student_hidden.shape)} and teacher_hidden {tuple(teacher_hidden.shape)} must "
            "agree on every dimension but the last (the hidden sizes may differ)"
        )
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1 (tokens per chunk), got {chunk_size!r}")
    args = _validate_token_args(
        lead_shape, student_hidden.device, student_hidden.dtype,
        {"student_weight": student_weight.shape[0], "teacher_weight": teacher_weight.shape[0]},
        target_ids, mask, temperature, vocab_size, backend, inputs="hidden states",
    )
    n_tokens = lead_shape.numel()
    counted = None if args.mask is None else args.mask.nonzero().squeeze(1)
    n_counted = n_tokens if counted is None else counted.numel()
    if chunk_size is None:
        chunk_size = default_chunk_size(n_counted, args.vocab_size, student_hidden.dtype, student_hidden.device)
    plan = _Plan(
        chunks=_chunks(n_tokens, counted, chunk_size),
        target=args.target,
        temperature=float(temperature),
        vocab_size=args.vocab_size,
        backend=args.backend,
        needs_grad=torch.is_grad_enabled(),
    )
    return plan, args.mask, lead_shape


def _flat(hidden: Tensor) -> Tensor:
    return hidden.reshape(-1, hidden.shape[-1])


def fused_linear_reverse_kld(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    *,
    student_bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    vocab_size: Optional[int] = None,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
) -> Tensor:
    """``fused_reverse_kld`` of the logits ``h_s W_s^T + b_s`` and ``h_t W_t^T + b_t``, without the [N, V] logits.

    KL_t = sum_v q_v (log q_v - log p_v) with q = softmax(s / T), p = softmax(t / T) over the first
    ``vocab_size`` columns, reduced as ``reduction`` says; the gradients reach ``student_hidden``,
    ``student_weight`` and ``student_bias`` (the teacher's inputs get none). See the module docstring for how.

    Args:
        student_hidden: ``[..., H_s]`` the student's last hidden states (what its lm_head takes).
        student_weight: ``[V_s, H_s]`` the student's lm_head weight (``nn.Linear.weight``).
        teacher_hidden: ``[..., H_t]``, same leading shape and dtype; H_t may differ from H_s.
        teacher_weight: ``[V_t, H_t]``.
        student_bias, teacher_bias: optional ``[V_s]`` / ``[V_t]`` lm_head biases.
        chunk_size: tokens per chunk (default: ``default_chunk_size``, from V, the dtype and free GPU memory).
        mask, temperature, reduction, vocab_size, backend: as in ``fused_reverse_kld``.

    Returns:
        The loss, float32 (float64 for float64 inputs): ``[...]`` for "none", else a scalar.
    """
    _check_reduction(reduction)
    plan, flat_mask, lead_shape = _plan(
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
        None, mask, temperature, vocab_size, chunk_size, backend,
    )
    inputs = (_flat(student_hidden), student_weight, student_bias, _flat(teacher_hidden), teacher_weight, teacher_bias)
    if reduction == "none":
        return _LinearTokenStats.apply(*inputs, plan)[0].reshape(lead_shape)
    n_counted = lead_shape.numel() if flat_mask is None else sum(map(_rows_count, plan.chunks))
    scale = 1.0 if reduction == "sum" else 1.0 / max(n_counted, 1)  # "mean": 0, with zero gradient, if none count
    return _LinearReverseKLDSum.apply(*inputs, plan, scale)


def fused_linear_token_stats(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    target_ids: Tensor,
    *,
    student_bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    temperature: float = 1.0,
    mix_alpha: float = 0.0,
    weight_clip: Optional[tuple[float, float]] = None,
    with_entropy: bool = False,
    vocab_size: Optional[int] = None,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
) -> TokenStats:
    """``fused_token_stats`` of the logits ``h_s W_s^T + b_s`` and ``h_t W_t^T + b_t``, without the [N, V] logits.

    Every per-token MiniLLM term (reverse KL, log q(y), log p(y), log-ratio, importance weight, entropy) of the
    sampled tokens ``target_ids``; gradients through reverse_kld, student_logprob and entropy reach
    ``student_hidden``, ``student_weight`` and ``student_bias``. The backward recomputes each chunk's logits.
    Arguments as in ``fused_linear_reverse_kld`` and ``fused_token_stats``.

    Returns:
        ``TokenStats`` of ``[...]`` tensors (float32, float64 for float64 inputs), 0 where masked.
    """
    _check_sampling_args(target_ids, mix_alpha, weight_clip)
    plan, flat_mask, lead_shape = _plan(
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
        target_ids, mask, temperature, vocab_size, chunk_size, backend,
    )
    kl, student_logprob, teacher_logprob, entropy = _LinearTokenStats.apply(
        _flat(student_hidden), student_weight, student_bias, _flat(teacher_hidden), teacher_weight, teacher_bias, plan
    )
    return _assemble_token_stats(
        kl, student_logprob, teacher_logprob, entropy if with_entropy else None,
        flat_mask, lead_shape, mix_alpha, weight_clip,
    )
