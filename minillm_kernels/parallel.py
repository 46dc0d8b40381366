"""Vocabulary-parallel losses: the logits (or the lm_head) sharded over the vocabulary across processes.

Layout. Given ``process_group`` (P processes; or DTensor inputs sharded on the vocabulary, which bring their mesh's
group), rank r holds the global columns [r W, (r + 1) W) of both models' logits, W its local width, the same on
every rank and for both models; for the fused-linear functions, the rows [r W, (r + 1) W) of each lm_head weight
and bias, the hidden states being replicated. ``target_ids`` (global ids) and ``mask`` are replicated, and
``vocab_size`` is the global real vocabulary: rank r's real columns are the first V_r = clamp(vocab_size - r W, 0, W)
of its shard (V_r = 0: a padding shard, whose kernel is skipped).

The combine. With k = 1/T, rank r's kernel gives, over its V_r columns, the terms of its shard's own softmaxes
q^r = softmax(k s^r) and p^r = softmax(k t^r): KL_r, H_r, log q^r(y), log p^r(y) (meaningful on the owner of y only)
and its row statistics (c_s, log Z_s, c_t, log Z_t), whence the shard's log-normalisers L_s^r = c_s k + log Z_s and
L_t^r = c_t k + log Z_t (-inf for a padding shard, or one where that model's logits are all -inf). Over the whole
vocabulary, with lse_s = logsumexp_r L_s^r, lse_t likewise, and the shards' shares of the two softmaxes
w_r = exp(L_s^r - lse_s), v_r = exp(L_t^r - lse_t) (so log q_v = log q^r_v + log w_r, log p_v = log p^r_v + log v_r
for v in shard r):
    KL = sum_r w_r (KL_r + log w_r - log v_r),          H = sum_r w_r (H_r - log w_r),
    log q(y) = log q^o(y) + log w_o,                    log p(y) = log p^o(y) + log v_o     (o = y // W owns y),
a shard with w_r = 0 counting 0 (KL = +inf where the teacher has no mass on a shard where the student has some; log
q(y) = -inf where the owner's student logits are all -inf). Communication: one all-gather of the 8 per-row numbers
(KL_r, H_r, the two log-probabilities, the row statistics) in the per-row dtype (32 bytes a token and rank in
float32), never the logits; every rank then evaluates the formulas above in float64 on the same numbers, so every
rank returns the same values.

The backward needs no communication: the kernels' backward, given the global KL and H and log Z'_s = lse_s - c_s k
in place of the shard's log Z_s (so that its log q_v = (s_v - c_s) k - log Z'_s is the global log q_v; likewise the
teacher), writes each rank's slice of the unsharded gradient
    grad s_v = k (a q_v (log q_v - log p_v - KL) + b ([v = y] - q_v) - c q_v (log q_v + H))
from the upstream gradients a, b, c, replicated as the loss is (every rank computes the same loss from the same
outputs). The owner of y passes its local id y - r W; on every other rank that id is out of the shard's range, and
the kernels' out-of-range contract (``ops/reverse_kld.py``) adds -b q_v there but no one-hot. The fused-linear
functions turn each rank's logit gradient G_r into its slice of grad W and grad b and into the partial G_r W_r of
grad h, all-reduced (summed) in the backward, as the input of a column-parallel linear layer is: the gradient of
the hidden states that comes back is already the full one on every rank.

Checks: an all-gather of a few numbers per call (the local width, vocab_size, the number of tokens and fingerprints
of target_ids, mask and the hidden states) makes a rank whose shard, ids or replicated inputs differ from the others'
an error that names the argument, instead of a wrong loss or a collective that hangs. The vocabulary-parallel path
runs eagerly: ``torch.compile`` runs it as a graph break (``fullgraph=True`` refuses it).

The divergence family (``combine_divergence``): the forward KL combines from the shards' own values in one all-gather;
the mixtures and the TVD all-gather the row statistics, evaluate each shard's terms with the global log-normalisers
(``given_row_stats``), then all-gather the partial sums. Their backward, too, is the kernel's given the global row
statistics and sum_v q_v a_v, with no communication.

The sparse teacher (``combine_sparse_divergence``): the ids global and replicated, each rank all-gathers its shard's
row statistics over its columns and over those outside the entries it owns, and the logits of those entries (4 + K
numbers a token; with sampled tokens 2 more, the owner's s_y and the shard's entropy), whence every tail mode's
outcomes ("uniform": a second all-gather of the tail terms' partial sums); the backward is a PyTorch expression on the
shard, with no communication (``linear.py`` runs the same chunk by chunk of tokens on a sharded lm_head).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

from minillm_kernels import reference
from minillm_kernels.backends import compute_dtype, n_rows, row_view
from minillm_kernels.ops import divergence as divergence_ops
from minillm_kernels.ops import reverse_kld as ops
from minillm_kernels.ops import sparse as sparse_ops
from minillm_kernels.ops.autograd import first_order

Tensor = torch.Tensor


class VocabShards:
    """The process group a vocabulary is sharded over, and this rank's place in it."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)

    def real_columns(self, width: int, vocab_size: int) -> int:
        """V_r: how many of this rank's ``width`` columns are real, given the global ``vocab_size``."""
        return min(max(vocab_size - self.rank * width, 0), width)

    def local_target(self, target: Optional[Tensor], width: int) -> Optional[Tensor]:
        """Global ids as this shard's column indices (out of [0, V_r) where another rank owns the id)."""
        return None if target is None else target - self.rank * width

    def all_gather(self, rows: Tensor) -> Tensor:
        """``[P, *rows.shape]``: every rank's ``rows``, in rank order."""
        every = rows.new_empty((self.world * rows.shape[0], *rows.shape[1:]))
        dist.all_gather_single(every, rows.contiguous(), group=self.group)
        return every.view(self.world, *rows.shape)

    def sum(self, partial: Tensor) -> Tensor:
        """``partial`` summed over the ranks, in place."""
        dist.all_reduce(partial, group=self.group)
        return partial


# ---------------------------------------------------------------------------------------------------------------
# The inputs: a process group, or DTensors sharded on the vocabulary
# ---------------------------------------------------------------------------------------------------------------
def vocab_shards(process_group: Optional[dist.ProcessGroup],
                 inputs: dict[str, tuple[Optional[Tensor], Optional[int]]]) -> tuple[Optional[VocabShards], list]:
    """The shards of a call and its tensors as this rank's local ones.

    ``inputs`` maps each argument's name to ``(tensor or None, vocab_dim)``: the dimension that runs over the
    vocabulary (-1 for logits, 0 for an lm_head weight or bias), or None for a replicated tensor (hidden states). A
    DTensor must be ``Shard(vocab_dim)`` on one dimension of its mesh, evenly, and ``Replicate()`` on the others (a
    replicated one ``Replicate()`` everywhere); its local tensor is used, and gradients flow back to it through
    ``to_local()``. The group is that mesh dimension's, or ``process_group``: both given, they must be the same.
    ``(None, tensors)`` when neither is given: the call is not vocabulary-parallel.
    """
    groups, local = [], []
    for name, (x, vocab_dim) in inputs.items():
        if isinstance(x, DTensor):
            group, x = _dtensor_shard(name, x, vocab_dim)
            if group is not None:
                groups.append((name, group))
        local.append(x)
    if process_group is not None:
        if not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(f"process_group must be a torch.distributed ProcessGroup (e.g. dist.group.WORLD or "
                            f"device_mesh.get_group()), got {type(process_group).__name__}")
        groups.insert(0, ("process_group", process_group))
    if not groups:
        return None, local
    (first_name, group), *others = groups
    for name, other in others:
        if other is not group:
            raise ValueError(f"{name} is sharded over another process group than {first_name}: pass tensors of one "
                             "device mesh dimension, and process_group=None or that dimension's group")
    return VocabShards(group), local


def _dtensor_shard(name: str, x: DTensor, vocab_dim: Optional[int]) -> tuple[Optional[dist.ProcessGroup], Tensor]:
    """``(the group of the mesh dimension that shards x's vocabulary, or None, x's local tensor)``."""
    want = "Replicate() on every mesh dimension" if vocab_dim is None else \
        f"Shard({vocab_dim}) on one mesh dimension, evenly, and Replicate() on the others"
    dim = None if vocab_dim is None else vocab_dim % x.dim()
    sharding = [i for i, p in enumerate(x.placements) if isinstance(p, Shard) and p.dim % x.dim() == dim]
    others_replicated = all(isinstance(p, Replicate) for i, p in enumerate(x.placements) if i not in sharding)
    if len(sharding) > 1 or not others_replicated or (vocab_dim is not None and not sharding):
        raise ValueError(f"{name} is a DTensor placed {tuple(x.placements)}; the loss takes {want}")
    if not sharding:
        return None, x.to_local()
    mesh_dim = sharding[0]
    parts = x.device_mesh.size(mesh_dim)
    if x.shape[dim] % parts != 0:
        raise ValueError(f"{name} has {x.shape[dim]} vocabulary entries, which do not split evenly over {parts} "
                         "ranks: pad the vocabulary to a multiple of the number of ranks (columns past vocab_size are "
                         "ignored)")
    return x.device_mesh.get_group(mesh_dim), x.to_local()


# ---------------------------------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------------------------------
REPLICATED_FIXES = {
    "the local vocabulary width": "every rank must hold W columns (rows of the lm_head): rank r holds global columns "
                                  "[r W, (r + 1) W); pad the vocabulary to a multiple of the number of ranks",
    "vocab_size": "pass the global vocabulary size on every rank",
    "the number of tokens": "every rank must pass the same tokens (the logits' or hidden states' leading shape)",
    "target_ids": "pass the same global token ids on every rank (not ids local to a shard, not another rank's batch)",
    "mask": "pass the same mask on every rank",
    "teacher_ids": "pass the same global teacher ids on every rank (not ids local to a shard)",
    "teacher_logprobs": "pass the same teacher log-probabilities on every rank",
    "target_teacher_logprobs": "pass the same teacher log-probabilities of the sampled tokens on every rank",
    "student_hidden": "the hidden states must be replicated over the process group (gather sequence-parallel "
                      "activations before the loss)",
    "teacher_hidden": "the hidden states must be replicated over the process group (gather sequence-parallel "
                      "activations before the loss)",
}


def fingerprint(x: Optional[Tensor], mask: Optional[Tensor] = None) -> float:
    """A number that differs, in practice, between two ``[N, ...]`` tensors that differ (rows ``mask`` leaves out
    excluded): the rows' sums in float64, weighted by position. 0 for None."""
    if x is None:
        return 0.0
    rows = x.detach().double() if x.dim() == 1 else x.detach().flatten(1).sum(-1, dtype=torch.float64)  # (no copy)
    if mask is not None:
        rows = torch.where(mask, rows, 0.0)
    weights = torch.arange(rows.numel(), device=rows.device, dtype=torch.float64).remainder_(1021).add_(1)
    return float((rows * weights).sum())


def check_replicated(shards: VocabShards, facts: dict[str, float], device: torch.device, *,
                     least: float = 0.0) -> float:
    """Every rank must have the same value of each fact (one of ``REPLICATED_FIXES``'s keys): one all-gather, and
    a ValueError naming the first fact that differs, every rank's value and the fix. Returns the smallest of the
    ranks' ``least`` (a number they must agree on, such as a chunk size)."""
    mine = torch.tensor([*facts.values(), least], dtype=torch.float64, device=device)
    every = shards.all_gather(mine.unsqueeze(0)).squeeze(1).cpu()
    for column, name in enumerate(facts):
        values = every[:, column]
        if not bool((values == values[0]).all()):
            shown = [int(v) if v == int(v) else v for v in values.tolist()]
            raise ValueError(f"{name} differs across the {shards.world} ranks of the process group "
                             f"(per rank: {shown}): {REPLICATED_FIXES[name]}")
    return float(every[:, -1].min())


# ---------------------------------------------------------------------------------------------------------------
# The combine
# ---------------------------------------------------------------------------------------------------------------
def combine(local: Sequence[Tensor], shards: VocabShards, *, width: int, vocab_size: int, temperature: float,
            target: Optional[Tensor] = None, mask: Optional[Tensor] = None) -> tuple[Tensor, ...]:
    """``(kl, student_logprob, teacher_logprob, entropy, row_stats)`` over the whole vocabulary from this rank's
    ``local`` ones (``ops.backend_token_stats`` of its shard; the module docstring has the formulas), each ``[N]``
    in the local ones' dtype, and the ``[N, 4]`` row statistics that make the kernels' backward compute the global
    log q_v and log p_v on this shard: (c_s, lse_s - c_s k, c_t, lse_t - c_t k). ``target`` holds global ids (NaN
    log-probabilities outside [0, vocab_size)); rows ``mask`` leaves out are 0."""
    kl, student_logprob, teacher_logprob, entropy, row_stats = local
    mine = torch.cat((row_stats, torch.stack((kl, entropy, student_logprob, teacher_logprob), -1)), -1)
    every = shards.all_gather(mine).double()  # [P, N, 8]
    kl_r, entropy_r, student_logprob_r, teacher_logprob_r = every[..., 4:].unbind(-1)
    norms = LogNormalisers.of(every[..., :4], shards.rank, temperature)
    log_norm_t, log_w, log_v = norms.log_norm_t, norms.log_w, norms.log_v
    w = log_w.exp()
    dead = w == 0  # (not "w > 0": NaN logits keep their NaN)
    kl_terms = torch.where(log_norm_t == -math.inf, math.inf, w * (kl_r + log_w - log_v))
    kl = torch.where(dead, 0.0, kl_terms).sum(0)
    entropy = torch.where(dead, 0.0, w * (entropy_r - log_w)).sum(0)
    if target is None:
        student_logprob = teacher_logprob = torch.zeros_like(kl)
    else:
        owner = target.div(width, rounding_mode="floor").clamp(0, shards.world - 1).unsqueeze(0)
        of_owner = lambda x: x.gather(0, owner).squeeze(0)  # noqa: E731
        in_range = (target >= 0) & (target < vocab_size)
        student_logprob = torch.where(of_owner(dead), -math.inf, of_owner(student_logprob_r + log_w))
        teacher_logprob = torch.where(of_owner(log_norm_t) == -math.inf, -math.inf,
                                      of_owner(teacher_logprob_r + log_v))
        student_logprob, teacher_logprob = (torch.where(in_range, x, math.nan)
                                            for x in (student_logprob, teacher_logprob))
    outputs = (kl, student_logprob, teacher_logprob, entropy)
    if mask is not None:
        outputs = tuple(torch.where(mask, x, 0.0) for x in outputs)
    return (*(x.to(row_stats.dtype) for x in outputs), norms.global_row_stats.to(row_stats.dtype))


class LogNormalisers(NamedTuple):
    """The whole vocabulary's log-normalisers from every rank's row statistics, float64: the shards' L^r
    (``[P, N]``), their log shares log w_r = L_s^r - lse_s and log v_r = L_t^r - lse_t of the two softmaxes, and the
    ``[N, 4]`` row statistics (c_s, lse_s - c_s k, c_t, lse_t - c_t k) with this rank's centres, which make its
    kernels compute the global log q_v = k (s_v - c_s) - (lse_s - c_s k) and log p_v on its shard."""

    log_norm_s: Tensor
    log_norm_t: Tensor
    log_w: Tensor
    log_v: Tensor
    global_row_stats: Tensor

    @classmethod
    def of(cls, every_row_stats: Tensor, rank: int, temperature: float) -> "LogNormalisers":
        """From ``every_row_stats`` ``[P, N, 4]`` (every rank's (c_s, log Z_s, c_t, log Z_t), float64)."""
        centre_s, log_z_s, centre_t, log_z_t = every_row_stats.unbind(-1)
        k = 1.0 / temperature
        log_norm_s, log_norm_t = centre_s * k + log_z_s, centre_t * k + log_z_t  # L^r, [P, N]
        lse_s, lse_t = log_norm_s.logsumexp(0), log_norm_t.logsumexp(0)
        own_s, own_t = centre_s[rank], centre_t[rank]
        global_row_stats = torch.stack((own_s, lse_s - own_s * k, own_t, lse_t - own_t * k), -1)
        return cls(log_norm_s, log_norm_t, log_norm_s - lse_s, log_norm_t - lse_t, global_row_stats)


# ---------------------------------------------------------------------------------------------------------------
# One shard type: a rank's shard and the kernel family it runs; one autograd function for every family
# ---------------------------------------------------------------------------------------------------------------
class KernelFamily(NamedTuple):
    """A kernel family as one rank runs it on its shard (of the logits, or of the lm_heads' rows), on the shard's V_r
    real columns. ``student`` is the tuple of the student's tensors that get gradients (the logits; or the hidden
    states, weight and bias); the rest (teacher, ids, mask, options) is bound in the functions.

    - ``forward(*student, ...)``: the shard's local outputs, what ``combine`` reads (``ops.backend_token_stats``'s
      five; a divergence's ``(value, mean_partial, row_stats)``, of the shard's own softmaxes or, with
      ``given_row_stats``, its partial sums of the global terms);
    - ``backward(student, upstream, saved, needs)``: the gradients of ``student`` (None where ``needs`` says none)
      from the upstream gradients of the differentiable outputs and the global statistics ``saved`` by ``combine``;
    - ``combine(shard, student)``: ``(outputs, saved)`` over the whole vocabulary (``combine_token_stats``,
      ``combine_divergence``);
    - ``row_stats(*student)``: the shard's ``[N, 4]`` row statistics alone, for a combine that needs the global
      log-normalisers before the terms (None where it does not);
    - ``non_differentiable``: the indices of the outputs without a gradient (the teacher's log-probability).
    """

    forward: Callable[..., tuple[Tensor, ...]]
    backward: Callable[..., tuple[Optional[Tensor], ...]]
    combine: Callable[["VocabShard", Sequence[Optional[Tensor]]], tuple[tuple[Tensor, ...], tuple[Tensor, ...]]]
    row_stats: Optional[Callable[..., Tensor]] = None
    non_differentiable: tuple[int, ...] = ()


class VocabShard(NamedTuple):
    """One rank's shard of a vocabulary-parallel call and the kernel ``family`` it runs there: ``width`` W (local),
    ``vocab_size`` (global), the replicated ``target`` (global ids) and ``mask``, ``[N]`` each."""

    shards: VocabShards
    family: KernelFamily
    width: int
    vocab_size: int
    temperature: float
    target: Optional[Tensor]
    mask: Optional[Tensor]

    @property
    def real_columns(self) -> int:
        """V_r, the shard's columns below ``vocab_size`` (0: a padding shard)."""
        return self.shards.real_columns(self.width, self.vocab_size)


class _Sharded(torch.autograd.Function):
    """The outputs of a ``VocabShard``'s kernel family over the whole vocabulary (its ``combine``); the backward is
    the family's, from the statistics the combine saved, with no communication."""

    @staticmethod
    def forward(ctx, shard: VocabShard, *student: Optional[Tensor]):
        outputs, saved = shard.family.combine(shard, student)
        ctx.family, ctx.n_student = shard.family, len(student)
        ctx.save_for_backward(*student, *saved)
        ctx.mark_non_differentiable(*(outputs[i] for i in shard.family.non_differentiable))
        return outputs

    @staticmethod
    @first_order("the vocabulary-parallel losses")
    def backward(ctx, *grad_outputs):
        student, saved = ctx.saved_tensors[:ctx.n_student], ctx.saved_tensors[ctx.n_student:]
        per_token = saved[0]  # [N], in the per-row dtype
        # Unused outputs have no gradient; expanded ones (from .sum()) must be made contiguous.
        upstream = tuple(per_token.new_zeros(per_token.shape) if g is None else g.to(per_token.dtype).contiguous()
                         for i, g in enumerate(grad_outputs) if i not in ctx.family.non_differentiable)
        grads = ctx.family.backward(student, upstream, saved, ctx.needs_input_grad[1:])
        return None, *grads


def sharded(shard: VocabShard, *student: Optional[Tensor]) -> tuple[Tensor, ...]:
    """The outputs of ``shard``'s kernel family over the whole vocabulary it shards, differentiable in ``student``."""
    return _Sharded.apply(shard, *student)


def combine_token_stats(shard: VocabShard,
                        student: Sequence[Optional[Tensor]]) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """The token statistics' ``KernelFamily.combine``: ``(kl, student_logprob, teacher_logprob, entropy)`` ``[N]``
    each over the whole vocabulary (``combine`` of the shard's ``forward``), and the ``(kl, entropy, row_stats)`` that
    the kernels' backward reads."""
    kl, student_logprob, teacher_logprob, entropy, row_stats = combine(
        shard.family.forward(*student), shard.shards, width=shard.width, vocab_size=shard.vocab_size,
        temperature=shard.temperature, target=shard.target, mask=shard.mask)
    return (kl, student_logprob, teacher_logprob, entropy), (kl, entropy, row_stats)


def _logits_token_stats_family(teacher: Tensor, local_target: Optional[Tensor], mask: Optional[Tensor],
                               temperature: float, real_columns: int, backend: str) -> KernelFamily:
    """The token statistics on a shard of the logits, ``[..., W]`` each (last-dimension stride 1, any leading
    strides): the kernels of ``ops.reverse_kld`` on its V_r real columns."""
    def forward(student: Tensor) -> tuple[Tensor, ...]:
        return ops.backend_token_stats(student, teacher, local_target, mask, temperature, real_columns, backend)

    def backward(student, upstream, saved, needs):
        if not needs[0]:
            return (None,)
        return (ops.backend_logit_gradient(student[0], teacher, local_target, mask, upstream, saved, temperature,
                                           real_columns, backend),)

    return KernelFamily(forward, backward, combine_token_stats, non_differentiable=(2,))


@torch.compiler.disable  # collectives and data-dependent checks: eager (a graph break under torch.compile)
def logits_token_stats(shards: VocabShards, student: Tensor, teacher: Tensor, target: Optional[Tensor],
                       mask: Optional[Tensor], temperature: float, vocab_size: int,
                       backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(kl, student_logprob, teacher_logprob, entropy)``, ``[N]`` each, of validated vocabulary-sharded logits
    (``losses.fused_token_stats`` and ``fused_reverse_kld`` with a process group), after ``check_replicated``."""
    check_logits_shard(shards, student, target, mask, vocab_size)
    width = student.shape[-1]
    family = _logits_token_stats_family(teacher, shards.local_target(target, width), mask, temperature,
                                        shards.real_columns(width, vocab_size), backend)
    return sharded(VocabShard(shards, family, width, vocab_size, temperature, target, mask), student)


def check_logits_shard(shards: VocabShards, student: Tensor, target: Optional[Tensor], mask: Optional[Tensor],
                       vocab_size: int) -> None:
    """``check_replicated`` of a logits-level call: the local width, vocab_size, the tokens, ids and mask."""
    check_replicated(shards, {
        "the local vocabulary width": student.shape[-1], "vocab_size": vocab_size,
        "the number of tokens": math.prod(student.shape[:-1]), "target_ids": fingerprint(target, mask),
        "mask": fingerprint(mask),
    }, student.device)


# ---------------------------------------------------------------------------------------------------------------
# The divergence family (ops/divergence.py) on a sharded vocabulary
# ---------------------------------------------------------------------------------------------------------------
# How a divergence's shards combine. The forward KL combines from each shard's own one, as the reverse KL does:
#     KL(p || q) = sum_r v_r (KL(p^r || q^r) + log v_r - log w_r),     sum_v q_v a_v = -sum_v p_v = -1,
# one all-gather of 6 numbers a token. The mixtures (log m_v = log(w p_v + (1 - w) q_v) needs the global p_v and
# q_v: no function of a shard's own softmaxes) and the TVD (|p_v - q_v| likewise) need the global log-normalisers
# first: an all-gather of the 4 row statistics, then each shard's kernel evaluates its columns' terms with them
# (one pass: ``given_row_stats``), then an all-gather of its 2 partial sums (the value and sum_v q_v a_v), added in
# float64 in rank order on every rank.
SHARD_COMBINED_DIVERGENCES = ("forward_kl",)
DIVERGENCE_SHARD_BACKENDS = ("cpu", "triton")


def check_divergence_backend(divergence: str, backend: str) -> None:
    if backend not in DIVERGENCE_SHARD_BACKENDS:
        raise NotImplementedError(f"divergence={divergence!r} on a sharded vocabulary runs on the backends "
                                  f"{DIVERGENCE_SHARD_BACKENDS}, not {backend!r} yet")


def combine_divergence(divergence: str, shard: VocabShard,
                       student: Sequence[Optional[Tensor]]) -> tuple[tuple[Tensor], tuple[Tensor, Tensor]]:
    """The ``KernelFamily.combine`` of ``divergence`` (a kernel divergence, not the reverse KL; bound with
    ``functools.partial``): ``((value,), (mean_partial, row_stats))``, ``[N]``, ``[N]``, ``[N, 4]``, over the whole
    vocabulary: the value and sum_v q_v a_v of the unsharded rows (the same on every rank, 0 where masked) and this
    rank's global row statistics (``LogNormalisers``), by one all-gather (``SHARD_COMBINED_DIVERGENCES``) or two (the
    others)."""
    shards, temperature = shard.shards, shard.temperature
    if divergence in SHARD_COMBINED_DIVERGENCES:
        value_r, partial_r, row_stats = _local_divergence(shard, student)
        every = shards.all_gather(torch.cat((row_stats, torch.stack((value_r, partial_r), -1)), -1)).double()
        norms = LogNormalisers.of(every[..., :4], shards.rank, temperature)
        v = norms.log_v.exp()
        teacher_dead = v == 0  # (a shard without teacher mass counts 0, a padding shard included)
        shard_terms = torch.where(norms.log_norm_s == -math.inf, math.inf,  # student without mass where p has some
                                  v * (every[..., 4] + norms.log_v - norms.log_w))
        value = torch.where(teacher_dead, 0.0, shard_terms).sum(0)
        lse_s, lse_t = (x.logsumexp(0) for x in (norms.log_norm_s, norms.log_norm_t))
        mean_partial = torch.where((lse_s + lse_t).isnan(), math.nan, -v.sum(0))  # -sum_v p_v (NaN logits: NaN)
    else:
        row_stats = shard.family.row_stats(*student)
        norms = LogNormalisers.of(shards.all_gather(row_stats).double(), shards.rank, temperature)
        given = norms.global_row_stats.to(row_stats.dtype)
        value_r, partial_r, _ = _local_divergence(shard, student, given)
        value, mean_partial = shards.all_gather(torch.stack((value_r, partial_r), -1)).double().sum(0).unbind(-1)
    if shard.mask is not None:
        value, mean_partial = (torch.where(shard.mask, x, 0.0) for x in (value, mean_partial))
    dtype = row_stats.dtype
    return (value.to(dtype),), (mean_partial.to(dtype), norms.global_row_stats.to(dtype))


def _local_divergence(shard: VocabShard, student: Sequence[Optional[Tensor]],
                      given_row_stats: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """The shard's ``forward``, or for a padding shard (V_r = 0, nothing read) zeros and row statistics
    (0, -inf, 0, -inf): no share of either softmax."""
    if shard.real_columns > 0:
        return shard.family.forward(*student, given_row_stats=given_row_stats)
    row_stats = shard.family.row_stats(*student)
    zeros = row_stats.new_zeros(row_stats.shape[0])
    return zeros, zeros.clone(), row_stats


def _logits_divergence_family(teacher: Tensor, mask: Optional[Tensor], divergence: str, coefficient: float,
                              temperature: float, real_columns: int, backend: str) -> KernelFamily:
    """A divergence of the family on a shard of the logits: the kernels of ``ops.divergence`` on its V_r real
    columns, the row statistics from ``ops.reverse_kld``'s."""
    def row_stats(student: Tensor) -> Tensor:
        return ops.backend_token_stats(student, teacher, None, mask, temperature, real_columns, backend)[4]

    def forward(student: Tensor, given_row_stats: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        return divergence_ops.divergence(student, teacher, mask, divergence, coefficient, 1.0 / temperature,
                                         real_columns, backend, given_row_stats)

    def backward(student, upstream, saved, needs):
        if not needs[0]:
            return (None,)
        if real_columns == 0:
            return (ops.fresh_gradient(student[0]).zero_(),)
        return (divergence_ops.divergence_backward(student[0], teacher, mask, upstream[0], *saved, divergence,
                                                   coefficient, 1.0 / temperature, real_columns, backend),)

    return KernelFamily(forward, backward, functools.partial(combine_divergence, divergence), row_stats=row_stats)


@torch.compiler.disable  # collectives and data-dependent checks: eager (a graph break under torch.compile)
def logits_divergence(shards: VocabShards, student: Tensor, teacher: Tensor, mask: Optional[Tensor],
                      divergence: str, coefficient: float, temperature: float, vocab_size: int, backend: str) -> Tensor:
    """The per-token ``divergence`` ``[N]`` (0 where masked) of validated vocabulary-sharded logits
    (``losses.fused_divergence`` with a process group), after ``check_replicated``."""
    check_divergence_backend(divergence, backend)
    check_logits_shard(shards, student, None, mask, vocab_size)
    width = student.shape[-1]
    family = _logits_divergence_family(teacher, mask, divergence, coefficient, temperature,
                                       shards.real_columns(width, vocab_size), backend)
    return sharded(VocabShard(shards, family, width, vocab_size, temperature, None, mask), student)[0]


# ---------------------------------------------------------------------------------------------------------------
# The sparse teacher (ops/sparse.py) on a sharded vocabulary
# ---------------------------------------------------------------------------------------------------------------
# The teacher's ids are global and replicated; rank r owns the live entries whose ids lie in its real columns
# [r W, r W + V_r). Every tail mode's divergence is a function of a few outcomes (docs/design.md, "The sparse teacher",
# its "Vocabulary shards"): the entries' (p_i, q_i), q_i = exp(k s_i - lse), and bin's tail (P_R, Q_R), Q_R =
# exp(lse_R - lse), or renormalized's entries alone, q^_i = exp(k s_i - lse_I). So each rank sends, per row, its
# shard's row statistics (c, log Z, c_R, log Z_R) over its columns and over its columns outside its entries (the
# sparse kernel's, no 1 - Q_I) and the logits of the entries it owns (-inf at the others): one all-gather of 4 + K
# numbers a token; every rank then has lse = logsumexp_r (c^r k + log Z^r), lse_R likewise and every entry's logit,
# and evaluates the outcomes in float64, the same on every rank. "uniform" sums a term over every column of R against
# the constant pi = P_R / (V - K'): a second all-gather of each rank's 2 partial sums over its tail columns (the value
# and sum q_v a_v), evaluated with the global lse. The backward needs no communication: with M = sum_o q_o a_o,
#     entry i:                    k (q_i a_i - q_i M)   (renormalized: q^ in place of q)
#     tail column v (bin):        k exp(k s_v - lse_R) (Q_R a_R - Q_R M)
#     tail column v (uniform):    k (q_v a_v - q_v M),  a_v of (pi, q_v)
# on the owner's columns, each rank writing its slice.
class SparseShardTeacher(NamedTuple):
    """A sparse teacher as one rank of a sharded vocabulary holds it: the global ids' ``logprobs`` ``[N, K]``
    (float64, -inf where not live or in a row ``mask`` leaves out), ``owned`` (the live entries in this rank's real
    columns) and their ``local_ids`` (``ids - r W`` where owned, 0 elsewhere), the divergence, tail and coefficient;
    with sampled tokens (the token statistics), ``owns_target`` ``[N]`` (y in this rank's real columns, in a kept row)
    and ``target_column`` (y - r W there, 0 elsewhere), else None."""

    logprobs: Tensor
    owned: Tensor
    local_ids: Tensor
    divergence: str
    tail: str
    coefficient: float
    owns_target: Optional[Tensor]
    target_column: Optional[Tensor]

    @classmethod
    def of(cls, shards: VocabShards, ids: Tensor, logprobs: Tensor, target: Optional[Tensor], mask: Optional[Tensor],
           width: int, real_columns: int, divergence: str, tail: str, coefficient: float) -> "SparseShardTeacher":
        def local_columns(global_ids: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
            local = global_ids - shards.rank * width
            here = counts & (local >= 0) & (local < real_columns)
            return here, torch.where(here, local, 0)

        kept = torch.ones_like(logprobs[:, 0], dtype=torch.bool) if mask is None else mask
        live = (logprobs != -math.inf) & kept[:, None]
        owned, local_ids = local_columns(ids, live)
        owns_target, target_column = (None, None) if target is None else local_columns(target, kept)
        log_p = torch.where(live, logprobs.double(), -math.inf)
        return cls(log_p, owned, local_ids, divergence, tail, coefficient, owns_target, target_column)

    def rows(self, rows: slice) -> "SparseShardTeacher":
        """The teacher of the tokens ``rows`` (a chunk of the fused-linear functions)."""
        return self._replace(logprobs=self.logprobs[rows], owned=self.owned[rows], local_ids=self.local_ids[rows],
                             owns_target=None if self.owns_target is None else self.owns_target[rows],
                             target_column=None if self.target_column is None else self.target_column[rows])


def _sparse_shard_stats(student: Tensor, teacher: SparseShardTeacher, mask: Optional[Tensor], temperature: float,
                        real_columns: int, backend: str) -> Tensor:
    """``[N, 4]``: (c, log Z, c_R, log Z_R) of the shard's real columns and of those outside the entries it owns
    (the sparse kernel's row statistics; a padding shard (0, -inf, 0, -inf)); with sampled tokens ``[N, 5]``, the
    entropy H_r of the shard's own softmax after them (0 on a padding shard)."""
    dtype = compute_dtype(student.dtype, teacher.logprobs.dtype)
    with_entropy = teacher.owns_target is not None
    if real_columns == 0:
        empty = [0.0, -math.inf, 0.0, -math.inf] + [0.0] * with_entropy
        return torch.tensor(empty, dtype=dtype, device=student.device).repeat(n_rows(student), 1)
    owned_logprobs = torch.where(teacher.owned, teacher.logprobs, -math.inf)
    _, _, entropy, _, row_stats = sparse_ops.sparse_divergence(
        student, teacher.local_ids, owned_logprobs, teacher.target_column, mask, "reverse_kl", "bin", 0.0,
        1.0 / temperature, real_columns, backend)
    return torch.cat((row_stats, entropy[:, None]), -1).to(dtype) if with_entropy else row_stats.to(dtype)


def _owned_logits(student: Tensor, columns: Tensor, owned: Tensor) -> Tensor:
    """``[N, J]`` float64: the student's logits at this rank's ``columns`` ``[N, J]`` where ``owned``, -inf elsewhere
    (read in place)."""
    rows = row_view(student)
    logits = rows.gather(-1, columns.long().view(*rows.shape[:2], -1)).view(owned.shape)
    return torch.where(owned, logits.double(), -math.inf)


def _sparse_tail_columns(student: Tensor, teacher: SparseShardTeacher, temperature: float,
                         real_columns: int) -> tuple[Tensor, Tensor]:
    """``(x, outside)``: k s_v of the shard's real columns ``[N, V_r]`` in the computing dtype, and where the column is
    outside the entries this rank owns (the shard's part of R)."""
    dtype = compute_dtype(student.dtype, teacher.logprobs.dtype)
    scaled = student.reshape(-1, student.shape[-1])[:, :real_columns].to(dtype) / temperature
    outside = torch.ones_like(scaled, dtype=torch.bool)
    rows, entries = teacher.owned.nonzero(as_tuple=True)
    outside[rows, teacher.local_ids[rows, entries].long()] = False
    return scaled, outside


def uniform_tail_partials(student: Tensor, teacher: SparseShardTeacher, temperature: float, real_columns: int,
                           lse: Tensor, log_pi: Tensor) -> Tensor:
    """``[N, 2]``, float64: this shard's sums over its tail columns of the terms and of q_v a_v against the uniform
    completion log pi, with the global log q_v = k s_v - lse."""
    if real_columns == 0:
        return lse.new_zeros(lse.shape[0], 2)
    scaled, outside = _sparse_tail_columns(student, teacher, temperature, real_columns)
    log_q = scaled - lse.to(scaled.dtype)[:, None]
    log_p = log_pi.to(scaled.dtype)[:, None].expand_as(log_q)
    terms = reference.divergence_terms(log_q, log_p, teacher.divergence, teacher.coefficient, teacher.coefficient)
    qa = reference.outcome_partials(log_q, log_p, teacher.divergence, teacher.coefficient, teacher.coefficient)
    return torch.stack([torch.where(outside, x, 0.0).sum(-1, dtype=torch.float64) for x in (terms, qa)], -1)


def combine_sparse_divergence(teacher: SparseShardTeacher, tail_partials: Callable[..., Tensor], dtype: torch.dtype,
                              shard: VocabShard,
                              student: Sequence[Optional[Tensor]]) -> tuple[tuple[Tensor], tuple[Tensor, ...]]:
    """The sparse teacher's ``KernelFamily.combine``: ``((value,), (tail_coefficient, log_normalisers, entry_grad,
    uniform))`` over the whole vocabulary (the section's comment has the formulas): the value ``[N]`` (0 where
    masked) in the computing dtype; and, float64, for the backward: the factor k (Q_R a_R - Q_R M) of bin's tail
    columns ``[N]``, (lse, lse_R) ``[N, 2]``, each entry's k (q_i a_i - q_i M) ``[N, K]`` and uniform's (log pi, M)
    ``[N, 2]``. With sampled tokens (the shard's local numbers then end with the owner's s_y and H_r) the outputs are
    ``(value, student_logprob, entropy)`` and the entropy is saved last. Bound with ``functools.partial``: the
    ``teacher``, ``tail_partials(student, lse, log_pi)`` (``uniform_tail_partials`` of the shard's logits) and the
    outputs' ``dtype``."""
    shards, k = shard.shards, 1.0 / shard.temperature
    local = shard.family.forward(*student)  # [N, 4 + K] (token statistics: [N, 6 + K])
    every = shards.all_gather(local).double()  # [P, N, 4 + K]
    norms = LogNormalisers.of(every[..., :4], shards.rank, shard.temperature)  # (its "teacher" is the tail R)
    lse, lse_tail = norms.log_norm_s.logsumexp(0), norms.log_norm_t.logsumexp(0)
    n_entries = teacher.logprobs.shape[1]
    entry_logits = every[..., 4:4 + n_entries].amax(0) * k  # k s_i: each live entry's from its owner
    log_p, live = teacher.logprobs, teacher.logprobs != -math.inf
    n_live = live.sum(-1)
    divergence, tail, coefficient = teacher.divergence, teacher.tail, teacher.coefficient
    if tail == "renormalized":
        has_entries = (n_live > 0)[:, None]
        logits = torch.where(live, entry_logits, -math.inf)
        log_q = logits - torch.where(has_entries, logits, 0.0).logsumexp(-1, keepdim=True)
        log_p = log_p - torch.where(has_entries, log_p, 0.0).logsumexp(-1, keepdim=True)
        undefined = torch.zeros_like(has_entries[:, 0])  # (only the entries' logits are read: NaN there, in log_q)
    else:
        log_q = torch.where(live, entry_logits - lse[:, None], -math.inf)
        log_tail_p = reference.sparse_tail_mass(log_p, n_live, shard.vocab_size)
        undefined = lse.isnan() | lse_tail.isnan()
        if tail == "bin":
            log_q = torch.cat((log_q, (lse_tail - lse)[:, None]), -1)
            log_p = torch.cat((log_p, log_tail_p[:, None]), -1)
    terms = reference.divergence_terms(log_q, log_p, divergence, coefficient, coefficient)
    qa = reference.outcome_partials(log_q, log_p, divergence, coefficient, coefficient)
    value, mean_partial = terms.sum(-1), qa.sum(-1)
    log_pi = torch.zeros_like(lse)
    if tail == "uniform":
        log_pi = log_tail_p - (shard.vocab_size - n_live).clamp(min=1).double().log()
        partials = tail_partials(student, lse, log_pi)
        tail_value, tail_partial = shards.all_gather(partials).sum(0).unbind(-1)
        value, mean_partial = value + tail_value, mean_partial + tail_partial
    grads = k * (qa - log_q.exp() * mean_partial[:, None])
    entry_grad, tail_coefficient = grads[:, :n_entries], torch.zeros_like(lse)
    if tail == "bin":
        tail_coefficient = torch.where(lse_tail == -math.inf, 0.0, grads[:, -1])
    value = torch.where(undefined | log_q.isnan().any(-1) | log_p.isnan().any(-1), math.nan, value)
    if shard.mask is not None:
        value = torch.where(shard.mask, value, 0.0)
    saved = (tail_coefficient, torch.stack((lse, lse_tail), -1), entry_grad, torch.stack((log_pi, mean_partial), -1))
    if teacher.owns_target is None:
        return (value.to(dtype),), saved
    # The token statistics: log q(y) = k s_y - lse from y's owner; H = sum_r w_r (H_r - log w_r), as ``combine``.
    student_logprob = every[..., 4 + n_entries].amax(0) * k - lse
    log_w = norms.log_w
    w = log_w.exp()
    entropy = torch.where(w == 0, 0.0, w * (every[..., 5 + n_entries] - log_w)).sum(0)
    if shard.mask is not None:
        student_logprob, entropy = (torch.where(shard.mask, x, 0.0) for x in (student_logprob, entropy))
    return (value.to(dtype), student_logprob.to(dtype), entropy.to(dtype)), (*saved, entropy)


def sparse_logit_gradient(student: Tensor, teacher: SparseShardTeacher, upstream: Sequence[Tensor],
                          saved: Sequence[Tensor], mask: Optional[Tensor], temperature: float,
                          real_columns: int) -> Tensor:
    """This rank's slice of the unsharded gradient of sum_i g_i D_i (``upstream`` (g,), ``[N]``; with sampled tokens
    (g, b, c), adding b_i log q_i(y_i) + c_i H_i) from what ``combine_sparse_divergence`` saved: the tail formula on
    every real column (in place on one copy of the logits), the owned entries' columns overwritten with theirs, then
    the token statistics' k (b ([v = y] - q_v) - c q_v (log q_v + H))."""
    tail_coefficient, log_normalisers, entry_grad, uniform = saved[:4]
    g = upstream[0].double()
    dtype = compute_dtype(student.dtype, teacher.logprobs.dtype)
    grad = student.new_zeros(n_rows(student), student.shape[-1], dtype=dtype)
    real = grad[:, :real_columns]  # (a view: written in place)
    real.copy_(student.reshape(-1, student.shape[-1])[:, :real_columns]).div_(temperature)  # k s_v
    scaled = real.clone() if teacher.owns_target is not None else None
    lse, lse_tail = (x.to(dtype)[:, None] for x in log_normalisers.unbind(-1))
    if teacher.tail == "bin":  # q_v / Q_R = exp(k s_v - lse_R), times the row's factor (0 where R has no mass)
        factor = (g * tail_coefficient).to(dtype)[:, None]
        real.sub_(torch.where(lse_tail == -math.inf, 0.0, lse_tail)).exp_().mul_(factor)
    elif teacher.tail == "uniform":
        log_pi, mean_partial = (x.to(dtype)[:, None] for x in uniform.unbind(-1))
        log_q = real.sub_(lse)
        qa = reference.outcome_partials(log_q, log_pi.expand_as(log_q), teacher.divergence, teacher.coefficient,
                                        teacher.coefficient)
        real.copy_((g / temperature).to(dtype)[:, None] * (qa - log_q.exp() * mean_partial))
    else:
        real.zero_()
    rows, entries = teacher.owned.nonzero(as_tuple=True)
    grad[rows, teacher.local_ids[rows, entries].long()] = (g[:, None] * entry_grad)[rows, entries].to(dtype)
    if scaled is not None and real_columns > 0:
        b, c = (x.to(dtype)[:, None] / temperature for x in upstream[1:])
        log_q = scaled.sub_(lse)
        q = log_q.exp()
        real.sub_(b * q + c * torch.where(q > 0, q * (log_q + saved[4].to(dtype)[:, None]), 0.0))
        rows = teacher.owns_target.nonzero(as_tuple=True)[0]
        grad[rows, teacher.target_column[rows]] += b[rows, 0]
    if mask is not None:
        grad[~mask] = 0.0
    return grad.to(student.dtype).view(student.shape)


def sparse_shard_numbers(student: Tensor, teacher: SparseShardTeacher, mask: Optional[Tensor], temperature: float,
                         real_columns: int, backend: str) -> Tensor:
    """``[N, 4 + K]`` float64, what a shard of the logits sends to ``combine_sparse_divergence``: its row statistics
    (``_sparse_shard_stats``) and the logits of the entries it owns (-inf at the others); with sampled tokens
    ``[N, 6 + K]``, then y's logit (-inf where another rank owns y) and the shard's entropy."""
    stats = _sparse_shard_stats(student, teacher, mask, temperature, real_columns, backend).double()
    entry_logits = _owned_logits(student, teacher.local_ids, teacher.owned)
    if teacher.owns_target is None:
        return torch.cat((stats[:, :4], entry_logits), -1)
    target_logit = _owned_logits(student, teacher.target_column[:, None], teacher.owns_target[:, None])
    return torch.cat((stats[:, :4], entry_logits, target_logit, stats[:, 4:]), -1)


def _logits_sparse_family(teacher: SparseShardTeacher, mask: Optional[Tensor], temperature: float,
                          real_columns: int, backend: str, dtype: torch.dtype) -> KernelFamily:
    """The sparse teacher on a shard of the student's logits: its row statistics from ``ops.sparse``'s kernel and the
    logits of the entries it owns (``combine_sparse_divergence``'s comment)."""
    def forward(student: Tensor) -> Tensor:
        return sparse_shard_numbers(student, teacher, mask, temperature, real_columns, backend)

    def tail_partials(student: Sequence[Tensor], lse: Tensor, log_pi: Tensor) -> Tensor:
        return uniform_tail_partials(student[0], teacher, temperature, real_columns, lse, log_pi)

    def backward(student, upstream, saved, needs):
        if not needs[0]:
            return (None,)
        return (sparse_logit_gradient(student[0], teacher, upstream, saved, mask, temperature, real_columns),)

    return KernelFamily(forward, backward, functools.partial(combine_sparse_divergence, teacher, tail_partials, dtype))


def check_sparse_shard(shards: VocabShards, width: int, n_tokens: int, ids: Tensor, logprobs: Tensor,
                       target: Optional[Tensor], mask: Optional[Tensor], vocab_size: int, device: torch.device, *,
                       target_logprobs: Optional[Tensor] = None, **replicated: Optional[Tensor]) -> None:
    """``check_replicated`` of a sparse call: the local width, vocab_size, the tokens, the teacher's ids and
    log-probabilities, the sampled ids and the teacher's log-probabilities of them (``target_logprobs``), the mask,
    and the ``replicated`` tensors (hidden states) by name."""
    def finite(x: Optional[Tensor]) -> Optional[Tensor]:  # (-inf, a log-probability of 0, counts 0)
        return None if x is None else torch.where(x == -math.inf, 0.0, x.double())

    check_replicated(shards, {
        "the local vocabulary width": width, "vocab_size": vocab_size, "the number of tokens": n_tokens,
        "teacher_ids": fingerprint(ids, mask), "teacher_logprobs": fingerprint(finite(logprobs), mask),
        "target_ids": fingerprint(target, mask), "target_teacher_logprobs": fingerprint(finite(target_logprobs), mask),
        "mask": fingerprint(mask), **{name: fingerprint(x) for name, x in replicated.items()},
    }, device)


@torch.compiler.disable  # collectives and data-dependent checks: eager (a graph break under torch.compile)
def logits_sparse_divergence(shards: VocabShards, student: Tensor, ids: Tensor, logprobs: Tensor,
                             target: Optional[Tensor], mask: Optional[Tensor], divergence: str, tail: str,
                             coefficient: float, temperature: float, vocab_size: int, backend: str,
                             target_logprobs: Optional[Tensor] = None) -> tuple[Tensor, ...]:
    """``(value,)``, or with sampled tokens ``target`` (global ids) ``(value, student_logprob, entropy)``, ``[N]``
    each (0 where masked), of validated vocabulary-sharded student logits and a sparse teacher (global ``[N, K]`` ids
    and log-probabilities, replicated; ``losses.fused_sparse_divergence`` and ``fused_sparse_token_stats`` with a
    process group), after ``check_replicated`` (of ``target_logprobs`` too, ``[N]``: the teacher's log-probabilities of
    the sampled tokens, which the caller uses as they are)."""
    width = student.shape[-1]
    check_sparse_shard(shards, width, math.prod(student.shape[:-1]), ids, logprobs, target, mask, vocab_size,
                       student.device, target_logprobs=target_logprobs)
    real_columns = shards.real_columns(width, vocab_size)
    teacher = SparseShardTeacher.of(shards, ids, logprobs, target, mask, width, real_columns, divergence, tail,
                                    coefficient)
    family = _logits_sparse_family(teacher, mask, temperature, real_columns, backend,
                                   compute_dtype(student.dtype, logprobs.dtype))
    return sharded(VocabShard(shards, family, width, vocab_size, temperature, target, mask), student)
