"""The output projection fused into the reverse-KL family: the MiniLLM terms from hidden states, chunk by chunk.

``fused_linear_reverse_kld`` and ``fused_linear_token_stats`` take the two models' last hidden states and
output layers instead of their logits, with the student and teacher logits
    s = h_s W_s^T + b_s,      t = h_t W_t^T + b_t          (h: [N, H_s] / [N, H_t], W: [V_s, H_s] / [V_t, H_t])
and compute exactly what ``fused_reverse_kld`` / ``fused_token_stats`` compute on (s, t), without ever holding
the [N, V] logits: the tokens are split into chunks of C rows, and per chunk
    1. s_c, t_c = the chunk's logits, one matmul per model in its weight's dtype (float32 accumulation), written
       into two [C, V] buffers reused from chunk to chunk, and soft-capped there for a model given a cap c
       (Gemma-2's ``final_logit_softcapping``): z -> c tanh(z / c);
    2. the reverse-KL kernel of the chosen backend (``ops/reverse_kld.py``) gives the per-token terms;
    3. the kernel's backward gives G_c = dL/ds_c (one more [C, V] buffer), times the student's cap derivative
       1 - (s_c / c)^2 = 1 - tanh(z / c)^2 if it has one, turned at once into
           grad h_s[c] = G_c W_s,     grad W_s += G_c^T h_s[c],     grad b_s += sum_rows G_c.
Only the first ``vocab_size`` rows of each weight are used (the padding rows get a zero gradient), and masked
tokens are skipped (they get zero outputs and a zero gradient), so the work is proportional to the counted
tokens. Peak extra memory: three [C, V] buffers in the weights' dtypes, plus the gradients of the inputs.

When is step 3 done? The loss's upstream gradient must be known to form G_c:
- ``fused_linear_reverse_kld`` and ``fused_linear_divergence`` with reduction "sum" or "mean": the upstream of each
  KL_t (D_t) is the same scalar (times 1/count for "mean"), so step 3 runs in the forward pass with a_t = 1 (or
  1/count), and the backward only scales the stored gradients by the scalar, into new tensors (the stored ones stay
  for a retained graph's next backward, whatever the caller does to those it got). Four matmuls per chunk in all.
- reduction "none" and ``fused_linear_token_stats``: the upstreams (a_t, b_t, c_t) of KL_t, log q(y_t), H_t are
  per token and only known in the backward. The forward keeps per-token scalars (KL, H and the row statistics
  (m_s, log Z_s, m_t, log Z_t)); the backward recomputes each chunk's two logits and runs step 3 with them.
  Six matmuls per chunk in all (the teacher's too: the gradient needs log p).
The same peak memory either way; the first saves the backward's two recomputed matmuls per chunk, so it is used
wherever the upstream is a scalar.

Dtypes: each model's matmul runs in its weight's dtype (the lm_head as stored): hidden states of another dtype
are cast chunk by chunk ([C, H], no [N, H] copy), a bias of another dtype once ([V]). So a bf16 teacher beside a
float32 student costs no copy of either weight, and the kernels read each model's logits in their own dtype. The
matmuls stay in those dtypes under autocast; grad W accumulates in the weight's dtype (one rounding per chunk),
grad h is returned in the hidden states' dtype, grad b in the bias's.

One chunk loop (``_ChunkLoop``: the projections, the plan, the logits buffers, autocast off) runs inside every
``torch.library`` custom op here (``minillm_kernels::linear_token_stats``, ``linear_reverse_kld_sum``,
``linear_divergence``, ``linear_divergence_sum`` and ``linear_sparse_divergence`` with their backwards, each with a
fake implementation and an autograd formula), each op handing it its kernel family's per-chunk function; so
``torch.compile(fullgraph=True)`` traces a model and this loss together: the chunk plan, which depends on the mask's
contents, is made inside the op.
Meta tensors get the outputs' shapes. The inputs are saved for the backward, so an in-place change of a weight between
forward and backward is autograd's usual error.
Gradients flow to the student hidden states, weight and bias; the teacher is frozen.

``fused_linear_divergence`` runs the same chunk loop for the divergence family (``ops/divergence.py``), whose
logit gradient is G_c = g k q (a - mean_partial) with ``mean_partial = sum_v q_v a_v``: with reduction "sum" or
"mean" in the forward (``linear_divergence_sum``, four matmuls per chunk), with "none" in the backward, from the value,
``mean_partial`` and the row statistics its forward kept per token (``linear_divergence``, six matmuls per chunk); the
reverse KL is ``fused_linear_reverse_kld``'s.

``fused_linear_sparse_divergence`` runs it for the sparse teacher's family (``ops/sparse.py``): the teacher is its
[N, K] top-k ids and log-probabilities, not an lm_head, so the loop has no teacher projection (two [C, V] buffers,
two matmuls fewer per chunk), and each chunk hands the sparse kernels its tokens' rows of the top-k (the ids are
vocabulary columns, the same in every chunk). The forward keeps per token the value, ``mean_partial``, the entropy
and the row statistics; the backward recomputes each chunk's student logits (four matmuls per chunk in all).

Vocabulary-parallel (``process_group``, or DTensor weights; ``parallel.py``): each rank runs the chunk loop on its
rows of both lm_heads, the per-token terms are combined over the ranks (for reduction "sum" / "mean", chunk by chunk,
before each chunk's gradient), and grad h, each rank's G_r W_r, is summed over the ranks in the backward.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Iterator, NamedTuple, Optional, Sequence, Union

import torch

from minillm_kernels import parallel
from minillm_kernels.backends import compute_dtype
from minillm_kernels.losses import TokenStats, assemble_token_stats, reduce_per_token
from minillm_kernels.validation import (
    LinearCall,
    LinearSparseCall,
    check_coefficient,
    check_reduction,
    as_softcap,
    check_sampling_args,
    divergence_coefficient,
    validate_linear,
    validate_linear_sparse,
)
from minillm_kernels.ops import divergence as divergence_ops
from minillm_kernels.ops import reverse_kld as ops
from minillm_kernels.ops import sparse as sparse_ops
from minillm_kernels.ops.autograd import differentiable, first_order

Tensor = torch.Tensor
Rows = Union[slice, Tensor]  # a chunk's tokens: a slice of [0, N), or the indices of its counted tokens
Softcaps = tuple[Optional[float], Optional[float]]  # the student's and the teacher's soft cap c, or None (no cap)

# The default chunk holds three [C, V] buffers (both models' logits and the student's logit gradient) in at most
# this many bytes (on a GPU, at most a quarter of its free memory). On the CPU, 256 MiB is ~700 rows at V = 32000
# in float32; the time was the same from 256 rows up (2 cores, N = 4096, H = 256), and 1.6x longer at 64 rows.
# On a GPU, 1 GiB is ~1400 rows at V = 128256 in bf16, in the range where the matmuls run at full speed.
CHUNK_BYTES_CPU = 256 * 2**20
CHUNK_BYTES_GPU = 2**30
GPU_FREE_MEMORY_SHARE = 0.25


def default_chunk_size(n_tokens: int, vocab_size: int, dtype: torch.dtype, device: torch.device,
                       buffers: int = 3) -> int:
    """Tokens per chunk: as many as fit ``buffers`` [C, vocab_size] ``dtype`` buffers (three: both models' logits and
    the student's logit gradient; two for a sparse teacher, which has no logits) in the budget (``CHUNK_BYTES_CPU``;
    on a GPU ``CHUNK_BYTES_GPU`` or ``GPU_FREE_MEMORY_SHARE`` of its free memory, the smaller), then evened out so
    that the chunks of ``n_tokens`` have equal sizes (e.g. 1100 tokens at a 1024 limit: two chunks of 550)."""
    budget = CHUNK_BYTES_CPU
    if device.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(device)
        budget = min(CHUNK_BYTES_GPU, int(free_bytes * GPU_FREE_MEMORY_SHARE))
    bytes_per_token = buffers * vocab_size * torch.empty((), dtype=dtype).element_size()
    max_rows = max(1, budget // bytes_per_token)
    n_chunks = max(1, math.ceil(n_tokens / max_rows))
    return max(1, math.ceil(n_tokens / n_chunks))


class _Projection(NamedTuple):
    """One model's output layer on its flattened hidden states, restricted to the real vocabulary, and its soft cap:
    logits c tanh(z / c) of z = h W^T + b (Gemma-2's ``final_logit_softcapping``), or z itself when c is None."""

    hidden: Tensor  # [N, H]
    weight: Tensor  # [vocab_size, H], a view of the first rows of the [V, H] weight
    bias: Optional[Tensor]  # [vocab_size] in the weight's dtype, or None
    softcap: Optional[float]  # c > 0, or None

    @classmethod
    def of(cls, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], vocab_size: int,
           softcap: Optional[float]) -> "_Projection":
        bias = None if bias is None else bias[:vocab_size].to(weight.dtype)
        return cls(hidden, weight[:vocab_size], bias, softcap)

    def logits(self, hidden_rows: Tensor, out: Tensor) -> Tensor:
        """``z = hidden_rows @ weight^T + bias`` in the weight's dtype, written into ``out`` ([C, vocab_size]), then
        capped there, ``c tanh(z / c)`` (three roundings to that dtype, each within half an ulp of a value <= c)."""
        hidden_rows = hidden_rows.to(self.weight.dtype)
        if self.bias is None:
            torch.mm(hidden_rows, self.weight.t(), out=out)
        else:
            torch.addmm(self.bias, hidden_rows, self.weight.t(), out=out)
        if self.softcap is not None:
            out.div_(self.softcap).tanh_().mul_(self.softcap)
        return out

    def uncapped_gradient(self, grad_logits: Tensor, logits: Tensor) -> Tensor:
        """dL/dz from ``grad_logits`` = dL/dl of the capped ``logits`` l = c tanh(z / c) ([C, vocab_size] each):
            dL/dz = dL/dl (1 - tanh(z / c)^2) = dL/dl (1 - (l / c)^2),
        written into ``grad_logits``; ``logits`` is overwritten with the factor (the chunk is done with it). Without
        a cap, ``grad_logits`` as it is."""
        if self.softcap is None:
            return grad_logits
        derivative = logits.div_(self.softcap).square_().neg_().add_(1.0)
        return grad_logits.mul_(derivative)


class _Plan(NamedTuple):
    """How the chunk loop runs: the chunks' rows and the per-token arguments."""

    chunks: list[Rows]
    target: Optional[Tensor]  # [N] int64
    temperature: float
    vocab_size: int
    backend: str

    @property
    def n_counted(self) -> int:
        return sum(map(_rows_count, self.chunks))


def _make_plan(student: _Projection, mask: Optional[Tensor], target: Optional[Tensor], temperature: float,
               vocab_size: int, chunk_size: int, backend: str, buffers: int) -> _Plan:
    """Chunks of ``chunk_size`` tokens (0: ``default_chunk_size`` for ``buffers`` [C, vocab] buffers) over the counted
    tokens: slices of [0, N) without a mask, else slices of the indices of the counted tokens (data-dependent: this
    runs inside the custom ops)."""
    n_tokens = student.hidden.shape[0]
    counted = None if mask is None else mask.nonzero().squeeze(1)
    n_rows = n_tokens if counted is None else counted.numel()
    if chunk_size == 0:
        chunk_size = default_chunk_size(n_rows, vocab_size, student.weight.dtype, student.hidden.device, buffers)
    bounds = [(start, min(start + chunk_size, n_rows)) for start in range(0, n_rows, chunk_size)]
    chunks = [slice(lo, hi) if counted is None else counted[lo:hi] for lo, hi in bounds]
    return _Plan(chunks, target, temperature, vocab_size, backend)


def _rows_count(rows: Rows) -> int:
    return rows.stop - rows.start if isinstance(rows, slice) else rows.numel()


class _Chunk(NamedTuple):
    """One chunk of tokens, as the per-chunk functions of a kernel family take it."""

    rows: Rows  # its tokens
    hidden: Tensor  # [C, H_s] the student's hidden states
    student_logits: Tensor  # [C, vocab], in the student weight's dtype (a view of a buffer the next chunk reuses)
    teacher_logits: Optional[Tensor]  # [C, vocab], in the teacher weight's dtype (likewise); None: a sparse teacher
    target: Optional[Tensor]  # [C] int64, or None


class _ChunkLoop:
    """The loop every fused-linear op runs: the two models' projections on their first ``vocab_size`` rows, the plan
    (``_make_plan``: chunks of the counted tokens) and, iterating, each ``_Chunk`` with both models' logits, computed
    into two [C, vocab] buffers (C: the largest chunk) allocated once, with autocast off while the loop runs (each
    matmul in its weight's dtype). A teacher given without an lm_head (its ``tensors`` None: the sparse teacher's
    top-k, which its per-chunk functions read at the chunk's rows) has no projection, buffer or chunk logits. Each
    model's soft cap (``_Projection``) is applied there, to the logits every kernel reads, and its derivative where
    the student's logit gradient becomes its input gradients (``_InputGradients.add_chunk``): in one place for every
    op and backend. What an op does with a chunk is its kernel family's per-chunk function (e.g. ``_chunk_stats`` and
    ``_chunk_stats_gradient``, ``_chunk_sparse_divergence`` and its ``_gradient``): ``per_token`` writes
    per-token outputs, ``input_gradients`` turns logit gradients into the student's input gradients, and a plain
    ``for chunk in loop`` does anything else."""

    def __init__(self, tensors: Sequence[Optional[Tensor]], target: Optional[Tensor], mask: Optional[Tensor],
                 temperature: float, vocab_size: int, chunk_size: int, backend: str,
                 softcaps: Softcaps = (None, None)) -> None:
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias = tensors
        self.student_inputs = (student_hidden, student_weight, student_bias)
        self.student = _Projection.of(student_hidden, student_weight, student_bias, vocab_size, softcaps[0])
        self.teacher = None if teacher_weight is None else _Projection.of(
            teacher_hidden, teacher_weight, teacher_bias, vocab_size, softcaps[1])
        self.plan = _make_plan(self.student, mask, target, temperature, vocab_size, chunk_size, backend,
                               buffers=2 if self.teacher is None else 3)

    def __iter__(self) -> Iterator[_Chunk]:
        student, teacher, plan = self.student, self.teacher, self.plan
        largest = max(map(_rows_count, plan.chunks), default=0)
        student_buffer = student.weight.new_empty((largest, plan.vocab_size))
        teacher_buffer = None if teacher is None else teacher.weight.new_empty((largest, plan.vocab_size))
        with torch.autocast(student.hidden.device.type, enabled=False):
            for rows in plan.chunks:
                n, hidden = _rows_count(rows), student.hidden[rows]
                yield _Chunk(rows, hidden, student.logits(hidden, student_buffer[:n]),
                             None if teacher is None else teacher.logits(teacher.hidden[rows], teacher_buffer[:n]),
                             None if plan.target is None else plan.target[rows])

    def per_token(self, outputs: tuple[Tensor, ...],
                  terms: Callable[[_Chunk], Sequence[Tensor]]) -> tuple[Tensor, ...]:
        """``outputs`` (per-token tensors, zeros for the tokens no chunk holds) with each chunk's ``terms``."""
        for chunk in self:
            for out, value in zip(outputs, terms(chunk)):
                out[chunk.rows] = value
        return outputs

    def new_input_gradients(self, needs: Sequence[bool]) -> "_InputGradients":
        return _InputGradients(*self.student_inputs, tuple(needs), self.plan.vocab_size)

    def input_gradients(self, needs: Sequence[bool],
                        logit_gradient: Callable[[_Chunk], Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """``(grad_hidden, grad_weight, grad_bias)`` (empty where ``needs`` says none) from each chunk's
        ``logit_gradient``, G = dL/ds ``[C, vocab]``."""
        grads = self.new_input_gradients(needs)
        for chunk in self:  # (the logit gradient, passed on directly, is freed before the next chunk's)
            grads.add_chunk(logit_gradient(chunk), chunk, self.student)
        return grads.result()


# The token statistics' per-chunk functions (ops/reverse_kld.py).
def _chunk_stats(chunk: _Chunk, plan: _Plan) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(kl, student_logprob, teacher_logprob, entropy, row_stats)`` of a chunk, from the plan's backend."""
    return ops.backend_token_stats(chunk.student_logits, chunk.teacher_logits, chunk.target, None, plan.temperature,
                                   plan.vocab_size, plan.backend)


def _chunk_stats_gradient(chunk: _Chunk, plan: _Plan, upstream: tuple[Tensor, Tensor, Tensor],
                          saved: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """d/ds of sum_i a_i KL_i + b_i log q_i(y_i) + c_i H_i over a chunk, ``[C, vocab]`` in the logits' dtype, from
    ``upstream = (a, b, c)`` and the forward's ``saved = (kl, entropy, row_stats)`` of its rows."""
    return ops.backend_logit_gradient(chunk.student_logits, chunk.teacher_logits, chunk.target, None, upstream, saved,
                                      plan.temperature, plan.vocab_size, plan.backend)


# The divergence family's per-chunk functions (ops/divergence.py).
def _chunk_divergence(chunk: _Chunk, plan: _Plan, divergence: str, coefficient: float,
                      given_row_stats: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(value, mean_partial, row_stats)`` of a chunk, from the plan's backend; with ``given_row_stats`` (of its
    rows), the terms from those log-normalisers (``ops.divergence.divergence``)."""
    return divergence_ops.divergence(chunk.student_logits, chunk.teacher_logits, None, divergence, coefficient,
                                     1.0 / plan.temperature, plan.vocab_size, plan.backend, given_row_stats)


def _chunk_divergence_gradient(chunk: _Chunk, plan: _Plan, grad_value: Tensor, saved: tuple[Tensor, Tensor],
                               divergence: str, coefficient: float) -> Tensor:
    """d/ds of sum_i g_i D_i over a chunk, ``[C, vocab]`` in the logits' dtype, from ``grad_value = g`` and the
    forward's ``saved = (mean_partial, row_stats)`` of its rows."""
    return divergence_ops.divergence_backward(chunk.student_logits, chunk.teacher_logits, None, grad_value, *saved,
                                              divergence, coefficient, 1.0 / plan.temperature, plan.vocab_size,
                                              plan.backend)


class _InputGradients:
    """The student's input gradients, filled chunk by chunk (an empty tensor for an input that needs none).

    grad_weight accumulates in the weight's dtype (one rounding per chunk, by ``addmm_``; a float32 copy of a
    bf16 [V, H] weight would cost more memory than the chunks); grad_hidden is written in the hidden states' dtype;
    grad_bias accumulates in float32 (float64 for float64) and is returned in the bias's dtype.
    """

    def __init__(self, student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor],
                 needs: tuple[bool, bool, bool], vocab_size: int) -> None:
        self.hidden = torch.zeros_like(student_hidden) if needs[0] else None
        self.weight = torch.zeros_like(student_weight) if needs[1] else None
        self.bias = None
        if student_bias is not None and needs[2]:
            self.bias = student_bias.new_zeros(student_bias.shape, dtype=compute_dtype(student_bias.dtype))
        self.bias_dtype = None if student_bias is None else student_bias.dtype
        self.vocab_size = vocab_size
        self.like = student_hidden  # (the device and dtype of the empty tensors that stand for no gradient)

    @property
    def any(self) -> bool:
        return self.hidden is not None or self.weight is not None or self.bias is not None

    def add_chunk(self, grad_logits: Tensor, chunk: _Chunk, student: _Projection) -> None:
        """Turn the chunk's logit gradient dL/ds [C, vocab] into G = dL/dz through the student's soft cap
        (``_Projection.uncapped_gradient``: the chunk's logits are overwritten), then grad h[rows] = G W,
        grad W += G^T h, grad b += sum G."""
        grad_logits = student.uncapped_gradient(grad_logits, chunk.student_logits)
        if self.hidden is not None:
            self.hidden[chunk.rows] = (grad_logits @ student.weight).to(self.hidden.dtype)
        if self.weight is not None:
            self.weight[: self.vocab_size].addmm_(grad_logits.t(), chunk.hidden.to(self.weight.dtype))
        if self.bias is not None:
            self.bias[: self.vocab_size] += grad_logits.sum(0, dtype=self.bias.dtype)

    def result(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(grad_hidden, grad_weight, grad_bias)``, an empty tensor for each one not needed."""
        bias = None if self.bias is None else self.bias.to(self.bias_dtype)
        return tuple(self.like.new_empty(0) if g is None else g for g in (self.hidden, self.weight, bias))


# --------------------------------------------------------------------------------------------------------------
# The custom ops. Inputs: flattened hidden states [N, H], weights [V, H], optional biases [V], for both models;
# chunk_size 0 means default_chunk_size; the student's input gradients an op does not compute are empty tensors.
# --------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("minillm_kernels::linear_token_stats", mutates_args=())
def linear_token_stats(
    student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor],
    teacher_hidden: Tensor, teacher_weight: Tensor, teacher_bias: Optional[Tensor],
    target: Optional[Tensor], mask: Optional[Tensor],
    temperature: float, vocab_size: int, chunk_size: int, backend: str,
    student_softcap: Optional[float] = None, teacher_softcap: Optional[float] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-token ``(kl, student_logprob, teacher_logprob, entropy, row_stats)``, ``[N]`` each and ``[N, 4]``; 0 for
    tokens the mask leaves out."""
    loop = _ChunkLoop((student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias),
                      target, mask, temperature, vocab_size, chunk_size, backend, (student_softcap, teacher_softcap))
    outputs = _linear_token_stats_outputs(student_hidden, student_weight, teacher_weight, zeros=True)
    return loop.per_token(outputs, lambda chunk: _chunk_stats(chunk, loop.plan))


@linear_token_stats.register_fake
def _(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, target, mask,
      temperature, vocab_size, chunk_size, backend, student_softcap=None, teacher_softcap=None):
    return _linear_token_stats_outputs(student_hidden, student_weight, teacher_weight, zeros=False)


def _linear_token_stats_outputs(student_hidden: Tensor, student_weight: Tensor, teacher_weight: Tensor, *,
                                zeros: bool) -> tuple[Tensor, ...]:
    n_tokens, dtype = student_hidden.shape[0], compute_dtype(student_weight.dtype, teacher_weight.dtype)
    make = student_hidden.new_zeros if zeros else student_hidden.new_empty
    return (*(make(n_tokens, dtype=dtype) for _ in range(4)), make(n_tokens, 4, dtype=dtype))


@torch.library.custom_op("minillm_kernels::linear_token_stats_backward", mutates_args=())
def linear_token_stats_backward(
    student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor],
    teacher_hidden: Tensor, teacher_weight: Tensor, teacher_bias: Optional[Tensor],
    target: Optional[Tensor], mask: Optional[Tensor],
    grad_kl: Tensor, grad_student_logprob: Tensor, grad_entropy: Tensor,
    kl: Tensor, entropy: Tensor, row_stats: Tensor,
    temperature: float, vocab_size: int, chunk_size: int, backend: str, needs: list[bool],
    student_softcap: Optional[float] = None, teacher_softcap: Optional[float] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_hidden, grad_weight, grad_bias)`` of sum_t a_t KL_t + b_t log q(y_t) + c_t H_t, the chunks' logits
    recomputed; ``needs`` says which of the three to compute (the others are empty)."""
    loop = _ChunkLoop((student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias),
                      target, mask, temperature, vocab_size, chunk_size, backend, (student_softcap, teacher_softcap))
    upstream, saved = (grad_kl, grad_student_logprob, grad_entropy), (kl, entropy, row_stats)
    return loop.input_gradients(needs, lambda chunk: _chunk_stats_gradient(
        chunk, loop.plan, tuple(u[chunk.rows] for u in upstream), tuple(x[chunk.rows] for x in saved)))


@linear_token_stats_backward.register_fake
def _(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, target, mask,
      grad_kl, grad_student_logprob, grad_entropy, kl, entropy, row_stats, temperature, vocab_size, chunk_size,
      backend, needs, student_softcap=None, teacher_softcap=None):
    return _input_gradients_like(student_hidden, student_weight, student_bias, needs)


def _input_gradients_like(student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor],
                          needs: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """Fake ``(grad_hidden, grad_weight, grad_bias)``: each input's shape where needed, else empty."""
    like = (student_hidden, student_weight, student_bias)
    return tuple(torch.empty_like(x) if x is not None and need else student_hidden.new_empty(0)
                 for x, need in zip(like, needs))


def _setup_token_stats(ctx, inputs, output) -> None:
    *tensors, target, mask, temperature, vocab_size, chunk_size, backend, student_softcap, teacher_softcap = inputs
    kl, _, _, entropy, row_stats = output
    ctx.save_for_backward(*tensors, target, mask, kl, entropy, row_stats)
    ctx.arguments = (temperature, vocab_size, chunk_size, backend)
    ctx.softcaps = (student_softcap, teacher_softcap)
    ctx.mark_non_differentiable(output[2], row_stats)


def _token_stats_backward(ctx, grad_kl, grad_student_logprob, grad_teacher_logprob, grad_entropy, grad_row_stats):
    *tensors, target, mask, kl, entropy, row_stats = ctx.saved_tensors
    # Unused outputs have no gradient; expanded ones (from .sum()) must be made contiguous.
    upstream = tuple(kl.new_zeros(kl.shape) if g is None else g.to(kl.dtype).contiguous()
                     for g in (grad_kl, grad_student_logprob, grad_entropy))
    needs = list(ctx.needs_input_grad[:3])
    grads = linear_token_stats_backward(*tensors, target, mask, *upstream, kl, entropy, row_stats, *ctx.arguments,
                                        needs, *ctx.softcaps)
    return (*(g if need else None for g, need in zip(grads, needs)), *(None,) * 11)


differentiable_linear_token_stats = differentiable(linear_token_stats, _token_stats_backward, _setup_token_stats)


@torch.library.custom_op("minillm_kernels::linear_reverse_kld_sum", mutates_args=())
def linear_reverse_kld_sum(
    student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor],
    teacher_hidden: Tensor, teacher_weight: Tensor, teacher_bias: Optional[Tensor],
    mask: Optional[Tensor], temperature: float, vocab_size: int, chunk_size: int, backend: str, mean: bool,
    needs: list[bool], student_softcap: Optional[float] = None, teacher_softcap: Optional[float] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(loss, grad_hidden, grad_weight, grad_bias)``: loss = scale sum_t KL_t over the counted tokens (scale = 1,
    or 1 / their count with ``mean``: 0 when none counts), and its gradients for an upstream gradient of 1,
    computed in the forward (those ``needs`` leaves out are empty)."""
    return reverse_kld_sum_and_gradients(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                                         teacher_bias, mask, temperature, vocab_size, chunk_size, backend, mean, needs,
                                         softcaps=(student_softcap, teacher_softcap))


def reverse_kld_sum_and_gradients(
    student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor],
    teacher_hidden: Tensor, teacher_weight: Tensor, teacher_bias: Optional[Tensor],
    mask: Optional[Tensor], temperature: float, vocab_size: int, chunk_size: int, backend: str, mean: bool,
    needs: list[bool], combine: Optional[Callable[[tuple[Tensor, ...]], tuple[Tensor, ...]]] = None,
    softcaps: Softcaps = (None, None),
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """What ``linear_reverse_kld_sum`` returns. ``combine``, for a vocabulary shard (``parallel.py``), turns each
    chunk's per-token terms into those of the whole vocabulary (a collective: every rank runs the same chunks),
    which the loss sums and the chunk's gradient is computed from; the gradient of the hidden states is then this
    shard's part of it. ``softcaps``: the student's and the teacher's (``_Projection``)."""
    loop = _ChunkLoop((student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias),
                      None, mask, temperature, vocab_size, chunk_size, backend, softcaps)

    def terms(chunk: _Chunk) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        stats = _chunk_stats(chunk, loop.plan)
        kl, _, _, entropy, row_stats = stats if combine is None else combine(stats)
        no_upstream = torch.zeros_like(kl)  # (log q(y) and H have none here)
        return kl, lambda upstream: _chunk_stats_gradient(chunk, loop.plan, (upstream, no_upstream, no_upstream),
                                                          (kl, entropy, row_stats))

    return _sum_and_gradients(loop, mean, needs, terms)


def _sum_and_gradients(loop: _ChunkLoop, mean: bool, needs: list[bool],
                       terms: Callable[[_Chunk], tuple[Tensor, Callable[[Tensor], Tensor]]],
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(loss, grad_hidden, grad_weight, grad_bias)`` of loss = scale sum_t D_t over the counted tokens (scale = 1, or
    1 / their count with ``mean``: 0 when none counts), the gradients for an upstream gradient of 1 formed chunk by
    chunk in the same pass (step 3 of the module docstring with a_t = scale). ``terms(chunk)`` gives the chunk's
    per-token D_t and the function that turns their upstream [C] into the logit gradient [C, vocab]."""
    grads = loop.new_input_gradients(needs)
    weights = loop.student.weight.dtype, loop.teacher.weight.dtype
    total = loop.student.hidden.new_zeros((), dtype=compute_dtype(*weights))
    scale = 1.0 / max(loop.plan.n_counted, 1) if mean else 1.0
    for chunk in loop:
        value, logit_gradient = terms(chunk)
        total += value.sum()
        if grads.any:  # (the logit gradient, passed on directly, is freed before the next chunk's)
            grads.add_chunk(logit_gradient(torch.full_like(value, scale)), chunk, loop.student)
    return (total * scale, *grads.result())


@linear_reverse_kld_sum.register_fake
def _(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, mask, temperature,
      vocab_size, chunk_size, backend, mean, needs, student_softcap=None, teacher_softcap=None):
    return _sum_outputs_like(student_hidden, student_weight, student_bias, teacher_weight, needs)


def _sum_outputs_like(student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor],
                      teacher_weight: Tensor, needs: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fake ``(loss, grad_hidden, grad_weight, grad_bias)`` of the scalar-reduction ops (``_sum_and_gradients``)."""
    total = student_hidden.new_empty((), dtype=compute_dtype(student_weight.dtype, teacher_weight.dtype))
    return (total, *_input_gradients_like(student_hidden, student_weight, student_bias, needs))


def _setup_sum(ctx, inputs, output) -> None:
    """The scalar-reduction ops' (``linear_reverse_kld_sum``, ``linear_divergence_sum``): their inputs end with
    ``needs`` and the two soft caps."""
    # The inputs are saved only for autograd's version check: a weight changed in place between the forward and
    # the backward raises, as for any op, instead of returning the gradient of the old weight.
    ctx.save_for_backward(*inputs[:3], *output[1:])
    ctx.needs = inputs[-3]
    ctx.n_inputs = len(inputs)
    ctx.mark_non_differentiable(*output[1:])


def _sum_backward(ctx, grad_total, *unused):
    _, _, _, *grads = ctx.saved_tensors
    return (*_scaled_gradients(grads, ctx.needs, grad_total), *(None,) * (ctx.n_inputs - 3))


def _scaled_gradients(grads: tuple[Tensor, ...], needs: list[bool], grad_total: Tensor) -> tuple[Optional[Tensor], ...]:
    """The gradients stored for an upstream gradient of 1, scaled by ``grad_total`` into new tensors (also when it is
    1: the caller owns what it gets, e.g. zeroes it in place, while a retained graph keeps the stored ones for its
    next backward); None where not needed."""
    return tuple(g * grad_total.to(g.dtype) if need else None for g, need in zip(grads, needs))


differentiable_linear_reverse_kld_sum = differentiable(linear_reverse_kld_sum, _sum_backward, _setup_sum)


# --------------------------------------------------------------------------------------------------------------
# Vocabulary-parallel: this rank's rows of both lm_heads (parallel.py)
# --------------------------------------------------------------------------------------------------------------
def _shard_options(call: LinearCall) -> tuple[float, int, int, str]:
    """``(temperature, real_columns, chunk_size, backend)`` of the chunk loop on this rank's rows [r W, (r + 1) W) of
    both lm_heads: its V_r real rows (none on a padding shard) and the chunk size the ranks agree on (the smallest
    default, which depends on a GPU's free memory: the reduction "sum" / "mean" loop runs a collective per chunk),
    after ``parallel.check_replicated``."""
    temperature, vocab_size, chunk_size, backend = call.options
    student_hidden, student_weight, _, teacher_hidden, *_ = call.tensors
    width, n_tokens = student_weight.shape[0], student_hidden.shape[0]
    counted = n_tokens if call.mask is None else int(call.mask.sum())
    own_chunk = chunk_size or default_chunk_size(counted, width, student_weight.dtype, student_hidden.device)
    agreed_chunk = int(parallel.check_replicated(call.shards, {
        "the local vocabulary width": width, "vocab_size": vocab_size, "the number of tokens": n_tokens,
        "target_ids": parallel.fingerprint(call.target, call.mask), "mask": parallel.fingerprint(call.mask),
        "student_hidden": parallel.fingerprint(student_hidden), "teacher_hidden": parallel.fingerprint(teacher_hidden),
    }, student_hidden.device, least=own_chunk))
    return temperature, call.shards.real_columns(width, vocab_size), agreed_chunk, backend


def _summed_over_ranks(shards: parallel.VocabShards, grads: Sequence[Tensor],
                       needs: Sequence[bool]) -> tuple[Optional[Tensor], ...]:
    """None where not needed; grad h summed over the ranks (each has its shard's part, G_r W_r)."""
    if needs[0]:
        shards.sum(grads[0])
    return tuple(g if need else None for g, need in zip(grads, needs))


def _vocab_shard(call: LinearCall, family: parallel.KernelFamily) -> parallel.VocabShard:
    """This rank's rows of both lm_heads, running ``family``."""
    temperature, vocab_size, _, _ = call.options
    return parallel.VocabShard(call.shards, family, call.tensors[1].shape[0], vocab_size, temperature, call.target,
                               call.mask)


class _ShardedReverseKldSum(torch.autograd.Function):
    """Reduction "sum" / "mean" of a vocabulary-sharded lm_head: the loss, its gradients computed in the forward."""

    @staticmethod
    def forward(ctx, loss_and_gradients: Callable, needs: list[bool], hidden, weight, bias):
        total, grads = loss_and_gradients(hidden, weight, bias)
        # The inputs are saved for autograd's version check only (as ``_setup_sum`` does).
        ctx.save_for_backward(hidden, weight, bias, *(g if need else None for g, need in zip(grads, needs)))
        ctx.needs = needs
        return total

    @staticmethod
    @first_order("the vocabulary-parallel fused-linear reverse KL")
    def backward(ctx, grad_total):
        _, _, _, *grads = ctx.saved_tensors
        return (None, None, *_scaled_gradients(grads, ctx.needs, grad_total))


def _token_stats(call: LinearCall, softcaps: Softcaps) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(kl, student_logprob, teacher_logprob, entropy)``, ``[N]`` each, of a validated call (``softcaps``:
    ``_checked_softcaps``, (None, None) for a sharded one)."""
    if call.shards is not None:
        return _sharded_token_stats(call)
    return differentiable_linear_token_stats(*call.tensors, call.target, call.mask, *call.options, *softcaps)[:4]


@torch.compiler.disable  # collectives and data-dependent checks: eager (a graph break under torch.compile)
def _sharded_token_stats(call: LinearCall) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The token statistics of a sharded lm_head: ``linear_token_stats``'s chunk loop on this rank's rows."""
    options, teacher, shards = _shard_options(call), call.tensors[3:], call.shards
    local_target = shards.local_target(call.target, call.tensors[1].shape[0])

    def forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, ...]:
        return linear_token_stats(hidden, weight, bias, *teacher, local_target, call.mask, *options)

    def backward(student, upstream, saved, needs):
        grads = linear_token_stats_backward(*student, *teacher, local_target, call.mask, *upstream, *saved, *options,
                                            list(needs))
        return _summed_over_ranks(shards, grads, needs)

    family = parallel.KernelFamily(forward, backward, parallel.combine_token_stats, non_differentiable=(2,))
    return parallel.sharded(_vocab_shard(call, family), *call.tensors[:3])


@torch.compiler.disable  # (likewise)
def _sharded_reverse_kld_sum(call: LinearCall, mean: bool, needs: list[bool]) -> Tensor:
    """Reduction "sum" (``mean``: "mean") over the whole vocabulary of a sharded lm_head: each chunk's terms combined
    over the ranks before its gradient."""
    options, shards, (temperature, vocab_size, _, _) = _shard_options(call), call.shards, call.options

    def combine(local):
        return parallel.combine(local, shards, width=call.tensors[1].shape[0], vocab_size=vocab_size,
                                temperature=temperature)

    def loss_and_gradients(hidden, weight, bias):
        total, *grads = reverse_kld_sum_and_gradients(hidden, weight, bias, *call.tensors[3:], call.mask, *options,
                                                      mean, needs, combine)
        return total, _summed_over_ranks(shards, grads, needs)

    return _ShardedReverseKldSum.apply(loss_and_gradients, needs, *call.tensors[:3])


@torch.compiler.disable  # (likewise)
def _sharded_divergence(call: LinearCall, divergence: str, coefficient: float) -> Tensor:
    """A divergence of the family on a sharded lm_head (``parallel.combine_divergence``): the row statistics from
    ``linear_token_stats``'s chunk loop, the terms from ``linear_divergence``'s, the gradients from
    ``linear_divergence_backward``'s, grad h summed over the ranks."""
    parallel.check_divergence_backend(divergence, call.options[3])
    options, teacher, mask, shards = _shard_options(call), call.tensors[3:], call.mask, call.shards

    def row_stats(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        return linear_token_stats(hidden, weight, bias, *teacher, None, mask, *options)[4]

    def forward(hidden, weight, bias, given_row_stats=None) -> tuple[Tensor, Tensor, Tensor]:
        return linear_divergence(hidden, weight, bias, *teacher, mask, divergence, coefficient, *options,
                                 given_row_stats)

    def backward(student, upstream, saved, needs):
        if options[1] == 0:  # a padding shard: no part of grad h, but its share of the all-reduce
            grads = _InputGradients(*student, tuple(needs), 0).result()
        else:
            grads = linear_divergence_backward(*student, *teacher, mask, upstream[0], *saved, divergence, coefficient,
                                               *options, list(needs))
        return _summed_over_ranks(shards, grads, needs)

    family = parallel.KernelFamily(forward, backward, functools.partial(parallel.combine_divergence, divergence),
                                   row_stats=row_stats)
    return parallel.sharded(_vocab_shard(call, family), *call.tensors[:3])[0]


# --------------------------------------------------------------------------------------------------------------
# Validation and the public functions
# --------------------------------------------------------------------------------------------------------------
def _linear_call(
    student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
    target_ids, mask, temperature, vocab_size, chunk_size, backend, process_group,
) -> LinearCall:
    """The validated call (``validation.validate_linear``) of this rank's local tensors (``parallel.vocab_shards``:
    DTensor weights placed ``Shard(0)``, or a ``process_group``)."""
    shards, (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias) = \
        parallel.vocab_shards(process_group, {
            "student_hidden": (student_hidden, None), "student_weight": (student_weight, 0),
            "student_bias": (student_bias, 0), "teacher_hidden": (teacher_hidden, None),
            "teacher_weight": (teacher_weight, 0), "teacher_bias": (teacher_bias, 0),
        })
    return validate_linear(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                           target_ids, mask, temperature, vocab_size, chunk_size, backend, shards)


def _checked_softcaps(student_softcap: object, teacher_softcap: object, call: LinearCall) -> Softcaps:
    """``(student_softcap, teacher_softcap)``, each None or a finite c > 0 (``validation.as_softcap``); refused with
    a vocabulary-sharded lm_head, whose ops do not take them yet."""
    softcaps = as_softcap("student_softcap", student_softcap), as_softcap("teacher_softcap", teacher_softcap)
    if call.shards is not None and softcaps != (None, None):
        raise NotImplementedError(
            "student_softcap / teacher_softcap with a vocabulary-sharded lm_head (process_group, or DTensor weights) "
            "are not supported yet: pass unsharded weights, or leave the soft caps None")
    return softcaps


def _needs_grad(student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor]) -> list[bool]:
    """Which of the student's inputs get a gradient (none while grad mode is off)."""
    return [torch.is_grad_enabled() and x is not None and x.requires_grad
            for x in (student_hidden, student_weight, student_bias)]


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
    student_softcap: Optional[float] = None,
    teacher_softcap: Optional[float] = None,
    reduction: str = "mean",
    vocab_size: Optional[int] = None,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
    process_group: Optional[torch.distributed.ProcessGroup] = None,
) -> Tensor:
    """``fused_reverse_kld`` of the logits ``h_s W_s^T + b_s`` and ``h_t W_t^T + b_t``, without the [N, V] logits.

    KL_t = sum_v q_v (log q_v - log p_v) with q = softmax(s / T), p = softmax(t / T) over the first
    ``vocab_size`` columns, s = c_s tanh((h_s W_s^T + b_s) / c_s) with a soft cap c_s (likewise t with c_t; without
    one, the plain logits), reduced as ``reduction`` says; the gradients reach ``student_hidden``,
    ``student_weight`` and ``student_bias`` (the teacher's inputs get none). See the module docstring for how.

    Args:
        student_hidden: ``[..., H_s]`` the student's last hidden states (what its lm_head takes).
        student_weight: ``[V_s, H_s]`` the student's lm_head weight (``nn.Linear.weight``).
        teacher_hidden: ``[..., H_t]``, same leading shape; H_t may differ from H_s.
        teacher_weight: ``[V_t, H_t]``.
        student_bias, teacher_bias: optional ``[V_s]`` / ``[V_t]`` lm_head biases.
        student_softcap, teacher_softcap: each model's soft cap c (Gemma-2's ``final_logit_softcapping``): its logits
            z = h W^T + b become c tanh(z / c) before the temperature, and the student's gradient goes through it,
            dL/dz = dL/ds (1 - tanh(z / c)^2). A finite c > 0, or None (no cap). Not with ``process_group`` yet.
        chunk_size: tokens per chunk (default: ``default_chunk_size``, from V, the dtype and free GPU memory).
        mask, temperature, reduction, vocab_size, backend: as in ``fused_reverse_kld``.
        process_group: a vocabulary sharded over this group's P ranks (a column-parallel lm_head): both weights
            (and biases) are this rank's rows [r W, (r + 1) W), W the same on every rank and for both models, the
            hidden states replicated; ``vocab_size`` (default P W) is global. Every rank returns the same loss and
            gets its slice of grad W and grad b and the full grad h (its part all-reduced over the group in the
            backward, as a column-parallel layer's input is: do not all-reduce it again). DTensor weights placed
            ``Shard(0)`` (after ``ColwiseParallel``) bring their mesh's group. See ``parallel.py``.
        Any float dtypes: each model's matmul runs in its weight's dtype (see the module docstring).

    Returns:
        The loss, float32 (float64 if a weight is float64): ``[...]`` for "none", else a scalar.
    """
    check_reduction(reduction)
    call = _linear_call(
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
        None, mask, temperature, vocab_size, chunk_size, backend, process_group,
    )
    softcaps = _checked_softcaps(student_softcap, teacher_softcap, call)
    if reduction == "none":
        return _token_stats(call, softcaps)[0].reshape(call.lead_shape)
    needs = _needs_grad(*call.tensors[:3])
    if call.shards is not None:
        return _sharded_reverse_kld_sum(call, reduction == "mean", needs)
    return differentiable_linear_reverse_kld_sum(*call.tensors, call.mask, *call.options, reduction == "mean",
                                                 needs, *softcaps)[0]


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
    student_softcap: Optional[float] = None,
    teacher_softcap: Optional[float] = None,
    mix_alpha: float = 0.0,
    weight_clip: Optional[tuple[float, float]] = None,
    with_entropy: bool = False,
    vocab_size: Optional[int] = None,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
    process_group: Optional[torch.distributed.ProcessGroup] = None,
) -> TokenStats:
    """``fused_token_stats`` of the logits ``h_s W_s^T + b_s`` and ``h_t W_t^T + b_t``, without the [N, V] logits.

    Every per-token MiniLLM term (reverse KL, log q(y), log p(y), log-ratio, importance weight, entropy) of the
    sampled tokens ``target_ids``; gradients through reverse_kld, student_logprob and entropy reach
    ``student_hidden``, ``student_weight`` and ``student_bias``. The backward recomputes each chunk's logits.
    Arguments as in ``fused_linear_reverse_kld`` (the soft caps too: the terms are those of the capped logits) and
    ``fused_token_stats``.

    Returns:
        ``TokenStats`` of ``[...]`` tensors (float32, float64 if a weight is float64), 0 where masked.
    """
    mix_alpha, weight_clip = check_sampling_args(target_ids, mix_alpha, weight_clip)
    call = _linear_call(
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
        target_ids, mask, temperature, vocab_size, chunk_size, backend, process_group,
    )
    kl, student_logprob, teacher_logprob, entropy = _token_stats(
        call, _checked_softcaps(student_softcap, teacher_softcap, call))
    return assemble_token_stats(
        kl, student_logprob, teacher_logprob, entropy if with_entropy else None,
        call.mask, call.lead_shape, mix_alpha, weight_clip,
    )


# --------------------------------------------------------------------------------------------------------------
# The divergence family (ops/divergence.py) from hidden states: the same chunk loop, per-token upstreams.
# --------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("minillm_kernels::linear_divergence", mutates_args=())
def linear_divergence(
    student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor],
    teacher_hidden: Tensor, teacher_weight: Tensor, teacher_bias: Optional[Tensor], mask: Optional[Tensor],
    divergence: str, coefficient: float, temperature: float, vocab_size: int, chunk_size: int, backend: str,
    given_row_stats: Optional[Tensor] = None, student_softcap: Optional[float] = None,
    teacher_softcap: Optional[float] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token ``(value, mean_partial, row_stats)``, ``[N]``, ``[N]`` and ``[N, 4]``; 0 for tokens the mask leaves
    out. ``given_row_stats`` ``[N, 4]``: the terms from those log-normalisers (a vocabulary shard's share of the
    global terms, ``parallel.combine_divergence``)."""
    check_coefficient(divergence, coefficient)  # (first: under torch.compile its only check)
    loop = _ChunkLoop((student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias),
                      None, mask, temperature, vocab_size, chunk_size, backend, (student_softcap, teacher_softcap))
    outputs = _linear_divergence_outputs(student_hidden, student_weight, teacher_weight, zeros=True)
    return loop.per_token(outputs, lambda chunk: _chunk_divergence(
        chunk, loop.plan, divergence, coefficient, None if given_row_stats is None else given_row_stats[chunk.rows]))


@linear_divergence.register_fake
def _(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, mask, divergence,
      coefficient, temperature, vocab_size, chunk_size, backend, given_row_stats=None, student_softcap=None,
      teacher_softcap=None):
    return _linear_divergence_outputs(student_hidden, student_weight, teacher_weight, zeros=False)


def _linear_divergence_outputs(student_hidden: Tensor, student_weight: Tensor, teacher_weight: Tensor, *,
                               zeros: bool) -> tuple[Tensor, Tensor, Tensor]:
    n_tokens, dtype = student_hidden.shape[0], compute_dtype(student_weight.dtype, teacher_weight.dtype)
    make = student_hidden.new_zeros if zeros else student_hidden.new_empty
    return make(n_tokens, dtype=dtype), make(n_tokens, dtype=dtype), make(n_tokens, 4, dtype=dtype)


@torch.library.custom_op("minillm_kernels::linear_divergence_backward", mutates_args=())
def linear_divergence_backward(
    student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor],
    teacher_hidden: Tensor, teacher_weight: Tensor, teacher_bias: Optional[Tensor], mask: Optional[Tensor],
    grad_value: Tensor, mean_partial: Tensor, row_stats: Tensor,
    divergence: str, coefficient: float, temperature: float, vocab_size: int, chunk_size: int, backend: str,
    needs: list[bool], student_softcap: Optional[float] = None, teacher_softcap: Optional[float] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_hidden, grad_weight, grad_bias)`` of sum_t g_t D_t, the chunks' logits recomputed; ``needs`` says which
    of the three to compute (the others are empty)."""
    loop = _ChunkLoop((student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias),
                      None, mask, temperature, vocab_size, chunk_size, backend, (student_softcap, teacher_softcap))
    return loop.input_gradients(needs, lambda chunk: _chunk_divergence_gradient(
        chunk, loop.plan, grad_value[chunk.rows], (mean_partial[chunk.rows], row_stats[chunk.rows]), divergence,
        coefficient))


@linear_divergence_backward.register_fake
def _(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, mask, grad_value,
      mean_partial, row_stats, divergence, coefficient, temperature, vocab_size, chunk_size, backend, needs,
      student_softcap=None, teacher_softcap=None):
    return _input_gradients_like(student_hidden, student_weight, student_bias, needs)


def _setup_divergence(ctx, inputs, output) -> None:
    *tensors, mask, divergence, coefficient, temperature, vocab_size, chunk_size, backend, _, student_softcap, \
        teacher_softcap = inputs
    _, mean_partial, row_stats = output
    ctx.save_for_backward(*tensors, mask, mean_partial, row_stats)
    ctx.arguments = (divergence, coefficient, temperature, vocab_size, chunk_size, backend)
    ctx.softcaps = (student_softcap, teacher_softcap)
    ctx.mark_non_differentiable(mean_partial, row_stats)


def _divergence_backward(ctx, grad_value, grad_mean_partial, grad_row_stats):
    *tensors, mask, mean_partial, row_stats = ctx.saved_tensors
    grad_value = grad_value.to(mean_partial.dtype).contiguous()  # (expanded, from .sum())
    needs = list(ctx.needs_input_grad[:3])
    grads = linear_divergence_backward(*tensors, mask, grad_value, mean_partial, row_stats, *ctx.arguments, needs,
                                       *ctx.softcaps)
    return (*(g if need else None for g, need in zip(grads, needs)), *(None,) * 13)


differentiable_linear_divergence = differentiable(linear_divergence, _divergence_backward, _setup_divergence)


@torch.library.custom_op("minillm_kernels::linear_divergence_sum", mutates_args=())
def linear_divergence_sum(
    student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor],
    teacher_hidden: Tensor, teacher_weight: Tensor, teacher_bias: Optional[Tensor], mask: Optional[Tensor],
    divergence: str, coefficient: float, temperature: float, vocab_size: int, chunk_size: int, backend: str,
    mean: bool, needs: list[bool], student_softcap: Optional[float] = None, teacher_softcap: Optional[float] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(loss, grad_hidden, grad_weight, grad_bias)``: loss = scale sum_t D_t over the counted tokens (scale = 1, or
    1 / their count with ``mean``), and its gradients for an upstream gradient of 1, computed in the forward (four
    matmuls per chunk, as ``linear_reverse_kld_sum``; those ``needs`` leaves out are empty)."""
    check_coefficient(divergence, coefficient)  # (first: under torch.compile its only check)
    loop = _ChunkLoop((student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias),
                      None, mask, temperature, vocab_size, chunk_size, backend, (student_softcap, teacher_softcap))

    def terms(chunk: _Chunk) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        value, mean_partial, row_stats = _chunk_divergence(chunk, loop.plan, divergence, coefficient)
        return value, lambda upstream: _chunk_divergence_gradient(chunk, loop.plan, upstream, (mean_partial, row_stats),
                                                                  divergence, coefficient)

    return _sum_and_gradients(loop, mean, needs, terms)


@linear_divergence_sum.register_fake
def _(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, mask, divergence,
      coefficient, temperature, vocab_size, chunk_size, backend, mean, needs, student_softcap=None,
      teacher_softcap=None):
    return _sum_outputs_like(student_hidden, student_weight, student_bias, teacher_weight, needs)


differentiable_linear_divergence_sum = differentiable(linear_divergence_sum, _sum_backward, _setup_sum)


def fused_linear_divergence(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    *,
    divergence: str = "reverse_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    student_bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    temperature: float = 1.0,
    student_softcap: Optional[float] = None,
    teacher_softcap: Optional[float] = None,
    reduction: str = "mean",
    vocab_size: Optional[int] = None,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
    process_group: Optional[torch.distributed.ProcessGroup] = None,
) -> Tensor:
    """``fused_divergence`` of the logits ``s = h_s W_s^T + b_s`` and ``t = h_t W_t^T + b_t``, without the [N, V] logits.

    With q = softmax(s / T), p = softmax(t / T) over the first ``vocab_size`` columns (s = c_s tanh(z_s / c_s) with
    a soft cap c_s, likewise t: ``fused_linear_reverse_kld``), per token one of
        "reverse_kl"       KL(q || p) = sum_v q_v (log q_v - log p_v)          (``fused_linear_reverse_kld``)
        "forward_kl"       KL(p || q) = sum_v p_v (log p_v - log q_v)
        "jsd"              beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q
        "skew_forward_kl"  KL(p || m),  m = skew p + (1 - skew) q
        "skew_reverse_kl"  KL(q || m),  m = skew q + (1 - skew) p
        "tvd"              1/2 sum_v |p_v - q_v|
    reduced as ``reduction`` says. The logit gradient dD/ds_v = (1/T) q_v (a_v - sum_u q_u a_u) (a_v = dD/dq_v) reaches
    ``student_hidden`` (G W_s), ``student_weight`` (G^T h_s) and ``student_bias`` (sum of G over tokens) chunk by
    chunk; the teacher's inputs get none. The forward keeps per token the value, sum_u q_u a_u and the row
    statistics; the backward recomputes each chunk's logits (six matmuls per chunk). With reduction "sum" or "mean"
    the gradients are formed in the forward instead and the backward scales them (four matmuls per chunk, as
    ``fused_linear_reverse_kld``, which the reverse KL runs).

    Args:
        divergence, beta, skew: as in ``fused_divergence``.
        Other arguments as in ``fused_linear_reverse_kld``. With ``process_group`` (or DTensor weights placed
        ``Shard(0)``) every rank returns the unsharded loss and gets its slice of grad W and grad b and the full grad h
        (all-reduced in the backward); the per-token statistics are combined as ``fused_divergence``'s (one all-gather
        for the KLs, two for the mixtures and the TVD, whose forward runs the chunk loop twice: first for the
        log-normalisers, then for the terms, 4 matmuls a chunk instead of 2); backends "cpu" and "triton".

    Returns:
        The loss, float32 (float64 if a weight is float64): ``[...]`` for "none", else a scalar.
    """
    check_reduction(reduction)
    divergence, coefficient = divergence_coefficient(divergence, beta, skew)
    if divergence == "reverse_kl":
        return fused_linear_reverse_kld(
            student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias=student_bias,
            teacher_bias=teacher_bias, mask=mask, temperature=temperature, student_softcap=student_softcap,
            teacher_softcap=teacher_softcap, reduction=reduction, vocab_size=vocab_size, chunk_size=chunk_size,
            backend=backend, process_group=process_group)
    call = _linear_call(
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
        None, mask, temperature, vocab_size, chunk_size, backend, process_group,
    )
    softcaps = _checked_softcaps(student_softcap, teacher_softcap, call)
    if call.shards is not None:
        value = _sharded_divergence(call, divergence, coefficient)
    elif reduction == "none":
        value = differentiable_linear_divergence(*call.tensors, call.mask, divergence, coefficient, *call.options,
                                                 None, *softcaps)[0]
    else:
        return differentiable_linear_divergence_sum(*call.tensors, call.mask, divergence, coefficient, *call.options,
                                                    reduction == "mean", _needs_grad(*call.tensors[:3]), *softcaps)[0]
    return reduce_per_token(value, call.mask, call.lead_shape, reduction)


# --------------------------------------------------------------------------------------------------------------
# The sparse teacher's family (ops/sparse.py) from the student's hidden states: the same chunk loop, with no teacher
# lm_head; each chunk reads its tokens' rows of the teacher's top-k (the ids are vocabulary columns, the same in
# every chunk: the chunks split the tokens, never the vocabulary).
# --------------------------------------------------------------------------------------------------------------
class _SparseTeacher(NamedTuple):
    """The teacher as its top-k entries, ``[N, K]`` each (-inf log-probabilities: no entry), and the divergence taken
    against it with its tail completed (``fused_sparse_divergence``)."""

    ids: Tensor
    logprobs: Tensor
    divergence: str
    tail: str
    coefficient: float

    def rows(self, chunk: _Chunk) -> tuple[Tensor, Tensor]:
        """The chunk's tokens' ``(ids, logprobs)``, ``[C, K]`` contiguous each (the kernels' layout)."""
        return self.ids[chunk.rows].contiguous(), self.logprobs[chunk.rows].contiguous()


def _sparse_chunk_loop(student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor],
                       mask: Optional[Tensor], temperature: float, vocab_size: int, chunk_size: int, backend: str,
                       student_softcap: Optional[float]) -> _ChunkLoop:
    """The chunk loop over the student's projection alone (two [C, vocab] buffers: its logits and their gradient)."""
    return _ChunkLoop((student_hidden, student_weight, student_bias, None, None, None), None, mask, temperature,
                      vocab_size, chunk_size, backend, (student_softcap, None))


def _chunk_sparse_divergence(chunk: _Chunk, plan: _Plan, teacher: _SparseTeacher,
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(value, entropy, mean_partial, row_stats)`` of a chunk against its rows of the teacher, from the plan's
    backend (the chunk's tokens are all counted: no mask)."""
    value, _, entropy, mean_partial, row_stats = sparse_ops.sparse_divergence(
        chunk.student_logits, *teacher.rows(chunk), None, None, teacher.divergence, teacher.tail,
        teacher.coefficient, 1.0 / plan.temperature, plan.vocab_size, plan.backend)
    return value, entropy, mean_partial, row_stats


def _chunk_sparse_divergence_gradient(chunk: _Chunk, plan: _Plan, teacher: _SparseTeacher, grad_value: Tensor,
                                      saved: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """d/ds of sum_i g_i D_i over a chunk, ``[C, vocab]`` in the logits' dtype, from ``grad_value = g`` and the
    forward's ``saved = (entropy, mean_partial, row_stats)`` of its rows."""
    no_upstream = torch.zeros_like(grad_value)  # (log q(y) and H have none here)
    return sparse_ops.sparse_divergence_backward(
        chunk.student_logits, *teacher.rows(chunk), None, None, grad_value, no_upstream, no_upstream, *saved,
        teacher.divergence, teacher.tail, teacher.coefficient, 1.0 / plan.temperature, plan.vocab_size, plan.backend)


@torch.library.custom_op("minillm_kernels::linear_sparse_divergence", mutates_args=())
def linear_sparse_divergence(
    student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor], teacher_ids: Tensor,
    teacher_logprobs: Tensor, mask: Optional[Tensor], divergence: str, tail: str, coefficient: float,
    temperature: float, vocab_size: int, chunk_size: int, backend: str, student_softcap: Optional[float] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-token ``(value, entropy, mean_partial, row_stats)``, ``[N]`` each and ``[N, 4]``, of the student's logits
    against ``[N, K]`` teacher ids and log-probabilities; 0 for tokens the mask leaves out."""
    check_coefficient(divergence, coefficient)  # (first: under torch.compile its only check)
    loop = _sparse_chunk_loop(student_hidden, student_weight, student_bias, mask, temperature, vocab_size, chunk_size,
                              backend, student_softcap)
    teacher = _SparseTeacher(teacher_ids, teacher_logprobs, divergence, tail, coefficient)
    outputs = _linear_sparse_outputs(student_hidden, student_weight, teacher_logprobs, zeros=True)
    return loop.per_token(outputs, lambda chunk: _chunk_sparse_divergence(chunk, loop.plan, teacher))


@linear_sparse_divergence.register_fake
def _(student_hidden, student_weight, student_bias, teacher_ids, teacher_logprobs, mask, divergence, tail,
      coefficient, temperature, vocab_size, chunk_size, backend, student_softcap=None):
    return _linear_sparse_outputs(student_hidden, student_weight, teacher_logprobs, zeros=False)


def _linear_sparse_outputs(student_hidden: Tensor, student_weight: Tensor, teacher_logprobs: Tensor, *,
                           zeros: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    n_tokens, dtype = student_hidden.shape[0], compute_dtype(student_weight.dtype, teacher_logprobs.dtype)
    make = student_hidden.new_zeros if zeros else student_hidden.new_empty
    return (*(make(n_tokens, dtype=dtype) for _ in range(3)), make(n_tokens, 4, dtype=dtype))


@torch.library.custom_op("minillm_kernels::linear_sparse_divergence_backward", mutates_args=())
def linear_sparse_divergence_backward(
    student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor], teacher_ids: Tensor,
    teacher_logprobs: Tensor, mask: Optional[Tensor], grad_value: Tensor, entropy: Tensor, mean_partial: Tensor,
    row_stats: Tensor, divergence: str, tail: str, coefficient: float, temperature: float, vocab_size: int,
    chunk_size: int, backend: str, needs: list[bool], student_softcap: Optional[float] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_hidden, grad_weight, grad_bias)`` of sum_t g_t D_t, the chunks' logits recomputed; ``needs`` says which
    of the three to compute (the others are empty)."""
    loop = _sparse_chunk_loop(student_hidden, student_weight, student_bias, mask, temperature, vocab_size, chunk_size,
                              backend, student_softcap)
    teacher = _SparseTeacher(teacher_ids, teacher_logprobs, divergence, tail, coefficient)
    saved = (entropy, mean_partial, row_stats)
    return loop.input_gradients(needs, lambda chunk: _chunk_sparse_divergence_gradient(
        chunk, loop.plan, teacher, grad_value[chunk.rows], tuple(x[chunk.rows] for x in saved)))


@linear_sparse_divergence_backward.register_fake
def _(student_hidden, student_weight, student_bias, teacher_ids, teacher_logprobs, mask, grad_value, entropy,
      mean_partial, row_stats, divergence, tail, coefficient, temperature, vocab_size, chunk_size, backend, needs,
      student_softcap=None):
    return _input_gradients_like(student_hidden, student_weight, student_bias, needs)


def _setup_sparse(ctx, inputs, output) -> None:
    *tensors, mask, divergence, tail, coefficient, temperature, vocab_size, chunk_size, backend, softcap = inputs
    _, entropy, mean_partial, row_stats = output
    ctx.save_for_backward(*tensors, mask, entropy, mean_partial, row_stats)
    ctx.arguments = (divergence, tail, coefficient, temperature, vocab_size, chunk_size, backend)
    ctx.student_softcap = softcap
    ctx.mark_non_differentiable(entropy, mean_partial, row_stats)


def _sparse_backward(ctx, grad_value, grad_entropy, grad_mean_partial, grad_row_stats):
    *tensors, mask, entropy, mean_partial, row_stats = ctx.saved_tensors
    grad_value = grad_value.to(mean_partial.dtype).contiguous()  # (expanded, from .sum())
    needs = list(ctx.needs_input_grad[:3])
    grads = linear_sparse_divergence_backward(*tensors, mask, grad_value, entropy, mean_partial, row_stats,
                                              *ctx.arguments, needs, ctx.student_softcap)
    return (*(g if need else None for g, need in zip(grads, needs)), *(None,) * 11)


differentiable_linear_sparse_divergence = differentiable(linear_sparse_divergence, _sparse_backward, _setup_sparse)


def fused_linear_sparse_divergence(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    *,
    divergence: str = "reverse_kl",
    tail: str = "bin",
    beta: float = 0.5,
    skew: float = 0.1,
    student_bias: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    temperature: float = 1.0,
    student_softcap: Optional[float] = None,
    reduction: str = "mean",
    vocab_size: Optional[int] = None,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
    process_group: Optional[torch.distributed.ProcessGroup] = None,
) -> Tensor:
    """``fused_sparse_divergence`` of the logits ``s = h W^T + b``, without the [N, V] logits.

    With q = softmax(s / T) over the first ``vocab_size`` columns (s = c tanh(z / c) of z = h W^T + b with a soft cap
    c: ``fused_linear_reverse_kld``), I a token's live teacher entries (log p > -inf), R the other columns,
    P_R = 1 - sum_I p_k and Q_R = sum_R q_v, per token the divergence D of q from the teacher completed on R by
    ``tail`` ("bin": over the K' + 1 outcomes (p_I, P_R) vs (q_I, Q_R); "uniform": p_v = P_R / (V - K') on R;
    "renormalized": both restricted to I and renormalised; see ``fused_sparse_divergence``), reduced as
    ``reduction`` says. Chunk by chunk of tokens (``_ChunkLoop``: two [C, V] buffers, the logits and their gradient),
    the logit gradient dD/ds_v = (1/T) q_v (a_v - sum_u q_u a_u) (a_v = dD/dq_v) becomes
        grad h = G W,    grad W = sum over chunks of G^T h,    grad b = sum over tokens of G.
    The forward keeps per token the value, sum_u q_u a_u, the entropy and the row statistics; the backward recomputes
    each chunk's logits (four matmuls per chunk in all).

    Args:
        student_hidden: ``[..., H]`` the student's last hidden states (what its lm_head takes).
        student_weight: ``[V, H]`` its lm_head weight; ``student_bias``: an optional ``[V]`` bias.
        teacher_ids: integer ``[..., K]`` (int32 or int64) ids of the teacher's entries, the hidden states' leading
            shape; in each row the mask keeps, the ids of live entries lie in [0, vocab_size) and do not repeat.
        teacher_logprobs: ``[..., K]`` float log-probabilities of those ids, normalised over the teacher's full
            vocabulary (``topk_teacher``); -inf marks "no entry" (whatever its id). Taken as given: ``temperature``
            applies to the student only. Frozen (no gradient).
        divergence, tail, beta, skew: as in ``fused_sparse_divergence``.
        student_softcap: the student's soft cap c (``fused_linear_reverse_kld``), or None.
        mask, temperature, reduction, vocab_size (the real vocabulary when the weight's rows are padded; K <= it),
            chunk_size, backend: as in ``fused_linear_reverse_kld``.
        process_group: the lm_head sharded by vocabulary rows over this group's ranks, as in
            ``fused_linear_reverse_kld`` (or DTensor weight and bias placed ``Shard(0)``): ``teacher_ids`` global, the
            hidden states, ids, log-probabilities and mask replicated; grad h is the full one on every rank. Chunk
            by chunk each rank projects its rows and sends ``fused_sparse_divergence``'s per-token numbers (one
            all-gather for the call; "uniform" two); its backward recomputes the chunks' logits. No soft cap yet.
        Any float dtypes: the matmul runs in the weight's dtype (hidden states of another dtype are cast chunk by
        chunk), the log-probabilities are read in theirs.

    Returns:
        The loss, float32 (float64 if the weight or the log-probabilities are float64): ``[...]`` for "none", else a
        scalar. ``ValueError`` in eager mode for a teacher ``fused_sparse_divergence`` refuses.
    """
    check_reduction(reduction)
    divergence, coefficient = divergence_coefficient(divergence, beta, skew)
    shards, (student_hidden, student_weight, student_bias) = parallel.vocab_shards(process_group, {
        "student_hidden": (student_hidden, None), "student_weight": (student_weight, 0),
        "student_bias": (student_bias, 0)})
    student_softcap = as_softcap("student_softcap", student_softcap)
    if shards is not None and student_softcap is not None:
        raise NotImplementedError(
            "student_softcap with a vocabulary-sharded lm_head (process_group, or DTensor weights) is not supported "
            "yet: pass unsharded weights, or leave the soft cap None")
    call = validate_linear_sparse(student_hidden, student_weight, student_bias, teacher_ids, teacher_logprobs, mask,
                                  temperature, vocab_size, chunk_size, backend, tail, shards)
    if shards is None:
        value = differentiable_linear_sparse_divergence(
            *call.student, call.ids, call.logprobs, call.mask, divergence, tail, coefficient, *call.options,
            student_softcap)[0]
    else:
        value = _sharded_sparse_divergence(shards, call, divergence, tail, coefficient)
    return reduce_per_token(value, call.mask, call.lead_shape, reduction)


@torch.compiler.disable  # collectives and data-dependent checks: eager (a graph break under torch.compile)
def _sharded_sparse_divergence(shards: parallel.VocabShards, call: LinearSparseCall, divergence: str, tail: str,
                               coefficient: float) -> Tensor:
    """``fused_linear_sparse_divergence`` of this rank's rows [r W, (r + 1) W) of the lm_head (the hidden states
    replicated): ``parallel.combine_sparse_divergence`` of the logits' family run chunk by chunk of tokens, each
    chunk's logits [C, W] made by one matmul (forward, and "uniform"'s tail terms) and again in the backward, whose
    logit gradient G becomes grad h = G W_r (summed over the ranks), grad W_r = G^T h, grad b_r = sum of G."""
    hidden, weight, bias = call.student
    temperature, vocab_size, chunk_size, backend = call.options
    width, n_tokens = weight.shape[0], hidden.shape[0]
    parallel.check_sparse_shard(shards, width, n_tokens, call.ids, call.logprobs, None, call.mask, vocab_size,
                                hidden.device, student_hidden=hidden)
    real_columns = shards.real_columns(width, vocab_size)
    teacher = parallel.SparseShardTeacher.of(shards, call.ids, call.logprobs, None, call.mask, width, real_columns,
                                             divergence, tail, coefficient)
    counted = n_tokens if call.mask is None else int(call.mask.sum())
    step = chunk_size or default_chunk_size(counted, width, weight.dtype, hidden.device)
    chunks = [slice(start, min(start + step, n_tokens)) for start in range(0, n_tokens, step)]

    def chunk_mask(rows: slice) -> Optional[Tensor]:
        return None if call.mask is None else call.mask[rows]

    def logits(student: Sequence[Tensor], rows: slice) -> Tensor:
        hidden, weight, bias = student
        projected = hidden[rows].to(weight.dtype) @ weight.t()
        return projected if bias is None else projected + bias

    def forward(*student: Tensor) -> Tensor:
        return torch.cat([parallel.sparse_shard_numbers(logits(student, rows), teacher.rows(rows), chunk_mask(rows),
                                                        temperature, real_columns, backend) for rows in chunks])

    def tail_partials(student: Sequence[Tensor], lse: Tensor, log_pi: Tensor) -> Tensor:
        return torch.cat([parallel.uniform_tail_partials(logits(student, rows), teacher.rows(rows), temperature,
                                                         real_columns, lse[rows], log_pi[rows]) for rows in chunks])

    def backward(student, upstream, saved, needs):
        hidden, weight, bias = student
        grads = [torch.zeros_like(x) if need else x for x, need in zip(student, needs)]
        for rows in chunks:
            grad_logits = parallel.sparse_logit_gradient(
                logits(student, rows), teacher.rows(rows), tuple(u[rows] for u in upstream),
                tuple(x[rows] for x in saved), chunk_mask(rows), temperature, real_columns)
            if needs[0]:
                grads[0][rows] = (grad_logits @ weight).to(hidden.dtype)
            if needs[1]:
                grads[1] += (grad_logits.t() @ hidden[rows].to(weight.dtype)).to(weight.dtype)
            if needs[2]:
                grads[2] += grad_logits.sum(0).to(bias.dtype)
        return _summed_over_ranks(shards, grads, needs)

    dtype = compute_dtype(weight.dtype, call.logprobs.dtype)
    family = parallel.KernelFamily(forward, backward, functools.partial(parallel.combine_sparse_divergence, teacher,
                                                                        tail_partials, dtype))
    shard = parallel.VocabShard(shards, family, width, vocab_size, temperature, None, call.mask)
    return parallel.sharded(shard, *call.student)[0]
