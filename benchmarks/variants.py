"""The losses the benchmark compares, for each of the operations it measures.

- ``reverse_kld``: the mean reverse KL over tokens, KL(q || p) = sum_v q_v (log q_v - log p_v): the naive
  PyTorch loss a user writes by hand (eager and under ``torch.compile``), ``fused_reverse_kld`` on each backend
  of ours, and Liger-Kernel's ``LigerJSD(beta=1)`` where it is installed (GPU only).
- ``token_stats``: every per-token MiniLLM term of sampled tokens (reverse KL, log q(y), log p(y), entropy),
  with a loss that back-propagates through the three differentiable ones: the naive formulas
  (``minillm_kernels.reference``, eager and compiled) and ``fused_token_stats`` on each backend.

- ``linear_reverse_kld``: the mean reverse KL from hidden states [N, H] and lm_head weights [V, H]: the matmuls to
  the full logits then the naive loss (eager and compiled), ``fused_linear_reverse_kld`` on each backend (its
  reduction "mean" computes the gradient in the forward; ``<backend>+recompute`` is reduction "none" then a mean,
  which recomputes each chunk's logits in the backward, the path ``fused_linear_token_stats`` takes), and
  Liger-Kernel's ``LigerFusedLinearJSD`` (GPU) and chunked ``LigerFusedLinearJSDLoss`` where installed, each with
  the beta at which it computes the reverse KL (checked numerically), and TRL's chunked divergence
  (``trl.kernels.chunked_divergence``) at its beta = 1 where installed.
- ``divergence``: for one ``divergence`` of the family (``reference.DIVERGENCES``; beta and skew from
  ``DIVERGENCE_PARAMS``) the mean over tokens: the naive PyTorch loss (``NAIVE_DIVERGENCE``, eager and compiled),
  ``fused_divergence`` on each backend, and on a GPU where installed Liger-Kernel's ``LigerJSD(beta)`` for the JSD
  and its ``LigerTVDLoss`` for the TVD (each used only where ``disagreement`` finds it computes ours).

- ``linear_divergence``: for one ``divergence`` of the family (``LINEAR_DIVERGENCES`` by default: those TRL computes)
  the mean over tokens from hidden states [N, H] and lm_head weights [V, H], as a distillation trainer computes it:
  the matmuls to the full logits then the naive loss (eager and compiled), ``fused_linear_divergence`` on each backend,
  ``<backend>+entropy`` (``minillm_kernels.integrations.trl.chunked_divergence_loss``: the same plus the student's
  entropy, TRL's logged metric, from one more no-grad pass: what our DistillationTrainer runs), TRL 1.16's chunked
  loss (``trl_chunked``: its ``_chunked_divergence_loss``, which also computes the entropy; float32 tiles of 4096 x
  32768, torch operations on each tile off the GPU, Triton on it) and Liger-Kernel's chunked
  ``LigerFusedLinearJSDLoss`` (``liger_chunked``) where installed, each at TRL's beta of the divergence
  (``TRL_BETAS``; the same convention in Liger, checked numerically).
- ``sparse_divergence``: for one ``divergence`` (``SPARSE_DIVERGENCES``) against a teacher given as its top-k
  (``topk_teacher``: int32 ids and float32 log-probabilities, the cache's layout) with the tail as one outcome
  (``tail="bin"``): the naive PyTorch top-k loss as DistillKit and TRL's experimental code write it (a float32
  log_softmax over [N, V], a gather of the K columns, the tail appended as log(1 - sum exp); eager and compiled),
  ``fused_sparse_divergence`` on each backend, and the dense ``fused_divergence`` against the whole teacher's logits
  (``dense_<backend>``, checked against the dense reference: it computes the full-vocabulary divergence).

Each variant is ``loss(*inputs(op, ...)[0]) -> scalar``: ``(student, teacher, target)`` logits for the first two
ops, ``(student_hidden, student_weight, teacher_hidden, teacher_weight)`` for ``linear_reverse_kld`` (``divergence``
ignores the target), ``(student, teacher, teacher_ids, teacher_logprobs)`` for ``sparse_divergence``; the linear
ops take ``(student_hidden, student_weight, teacher_hidden, teacher_weight)``. Before a
variant is timed, ``disagreement`` checks its value and gradient against the float64 reference
(``reference_loss``): a variant that computes something else is reported, not timed.
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import Callable, Optional

import torch

import minillm_kernels as mk
from minillm_kernels import reference

Loss = Callable[..., torch.Tensor]  # (student, teacher, target) or, for linear_reverse_kld, (hidden, weight) x 2
OPS = ("reverse_kld", "token_stats", "linear_reverse_kld", "divergence", "sparse_divergence", "linear_divergence")
DIVERGENCE_PARAMS = dict(beta=0.5, skew=0.1)  # the divergence op's beta (JSD) and skew (skew KLs): the API's defaults
SPARSE_DIVERGENCES = ("forward_kl", "reverse_kl")  # those the naive top-k loss is written for (NAIVE_TOPK)
# TRL's beta of each divergence it computes (0: forward KL, 1: reverse KL, else the JSD at DIVERGENCE_PARAMS' beta):
# the linear_divergence op's default divergences
TRL_BETAS = {"forward_kl": 0.0, "jsd": DIVERGENCE_PARAMS["beta"], "reverse_kl": 1.0}
LINEAR_DIVERGENCES = tuple(TRL_BETAS)


def inputs(op: str, tokens: int, vocab: int, hidden: int, dtype: torch.dtype, device: str,
           k: Optional[int] = None) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """The random inputs of one case and those of them that get a gradient. Logits ~ N(0, 9) either way: for
    ``linear_reverse_kld`` hidden states ~ N(0, 1) and weights ~ N(0, 9 / hidden); for ``sparse_divergence`` also the
    teacher's top-``k`` as a cache holds it (int32 ids, float32 log-probabilities)."""
    if op == "sparse_divergence":
        student = torch.randn(tokens, vocab, device=device, dtype=dtype).mul_(3).requires_grad_()
        teacher = torch.randn(tokens, vocab, device=device, dtype=dtype).mul_(3)
        ids, logprobs = mk.topk_teacher(teacher, k)
        return (student, teacher, ids.to(torch.int32), logprobs.float()), (student,)
    if op in ("linear_reverse_kld", "linear_divergence"):
        def projection() -> tuple[torch.Tensor, torch.Tensor]:
            weight = torch.randn(vocab, hidden, device=device, dtype=dtype).mul_(3 / hidden**0.5)
            return torch.randn(tokens, hidden, device=device, dtype=dtype), weight

        (student_hidden, student_weight), (teacher_hidden, teacher_weight) = projection(), projection()
        student = (student_hidden.requires_grad_(), student_weight.requires_grad_())
        return (*student, teacher_hidden, teacher_weight), student
    student = torch.randn(tokens, vocab, device=device, dtype=dtype).mul_(3).requires_grad_()
    teacher = torch.randn(tokens, vocab, device=device, dtype=dtype).mul_(3)
    target = torch.randint(0, vocab, (tokens,), device=device)
    return (student, teacher, target), (student,)


def naive_reverse_kld(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """What a user writes by hand: two log-softmaxes, a softmax, a product and a sum over [N, V]."""
    student_logq = torch.log_softmax(student.float(), dim=-1)
    teacher_logp = torch.log_softmax(teacher.float(), dim=-1)
    return (student_logq.exp() * (student_logq - teacher_logp)).sum(-1).mean()


def token_stats_loss(kl: torch.Tensor, student_logprob: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
    """The loss every ``token_stats`` variant computes: mean_t (KL_t + log q(y_t) + H_t), a gradient through all three."""
    return (kl + student_logprob + entropy).mean()


def naive_token_stats(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    kl, student_logprob, _, entropy = reference.token_stats(student, teacher, target, None, 1.0, student.shape[-1])
    return token_stats_loss(kl, student_logprob, entropy)


def naive_linear_reverse_kld(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                             teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor) -> torch.Tensor:
    """The unfused composition: both models' full [N, V] logits, then the naive loss."""
    return naive_reverse_kld(student_hidden @ student_weight.t(), teacher_hidden @ teacher_weight.t(), None)


def _naive_log_probs(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log q and log p, float32 log_softmax over [N, V]."""
    return torch.log_softmax(student.float(), dim=-1), torch.log_softmax(teacher.float(), dim=-1)


def _naive_kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per token: sum_v a_v (log a_v - log b_v)."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _naive_log_mixture(weight: float, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """log(w a + (1 - w) b) as logaddexp(log a + log w, log b + log(1 - w))."""
    return torch.logaddexp(log_a + math.log(weight), log_b + math.log1p(-weight))


# The naive mean over tokens of each divergence as a user writes it (beta and skew: DIVERGENCE_PARAMS), one function
# each (torch.compile caches per function: one shared function would recompile per divergence and hit its limit).
def naive_forward_kl(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    log_q, log_p = _naive_log_probs(student, teacher)
    return _naive_kl(log_p, log_q).mean()


def naive_jsd(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    beta = DIVERGENCE_PARAMS["beta"]
    log_q, log_p = _naive_log_probs(student, teacher)
    log_m = _naive_log_mixture(beta, log_p, log_q)
    return (beta * _naive_kl(log_p, log_m) + (1 - beta) * _naive_kl(log_q, log_m)).mean()


def naive_skew_forward_kl(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    log_q, log_p = _naive_log_probs(student, teacher)
    return _naive_kl(log_p, _naive_log_mixture(DIVERGENCE_PARAMS["skew"], log_p, log_q)).mean()


def naive_skew_reverse_kl(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    log_q, log_p = _naive_log_probs(student, teacher)
    return _naive_kl(log_q, _naive_log_mixture(DIVERGENCE_PARAMS["skew"], log_q, log_p)).mean()


def naive_tvd(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    log_q, log_p = _naive_log_probs(student, teacher)
    return (0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)).mean()


NAIVE_DIVERGENCE: dict[str, Loss] = {
    "reverse_kl": naive_reverse_kld, "forward_kl": naive_forward_kl, "jsd": naive_jsd,
    "skew_forward_kl": naive_skew_forward_kl, "skew_reverse_kl": naive_skew_reverse_kl, "tvd": naive_tvd,
}
assert tuple(NAIVE_DIVERGENCE) == reference.DIVERGENCES


def _naive_log_tail(log_entries: torch.Tensor) -> torch.Tensor:
    """The (K+1)-th outcome appended to [N, K] log-probabilities: log(1 - sum exp), as log(-expm1(logsumexp))."""
    tail = torch.log(-torch.expm1(torch.logsumexp(log_entries, -1, keepdim=True)))
    return torch.cat((log_entries, tail), -1)


def _naive_topk_log_probs(student: torch.Tensor, ids: torch.Tensor,
                          logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The naive top-k loss's K + 1 outcomes: (log q, log p), a float32 log_softmax over [N, V] gathered at the ids."""
    log_q = torch.log_softmax(student.float(), dim=-1).gather(-1, ids.long())
    return _naive_log_tail(log_q), _naive_log_tail(logprobs.float())


def naive_topk_forward_kl(student: torch.Tensor, teacher: torch.Tensor, ids: torch.Tensor,
                          logprobs: torch.Tensor) -> torch.Tensor:
    log_q, log_p = _naive_topk_log_probs(student, ids, logprobs)
    return _naive_kl(log_p, log_q).mean()


def naive_topk_reverse_kl(student: torch.Tensor, teacher: torch.Tensor, ids: torch.Tensor,
                          logprobs: torch.Tensor) -> torch.Tensor:
    log_q, log_p = _naive_topk_log_probs(student, ids, logprobs)
    return _naive_kl(log_q, log_p).mean()


NAIVE_TOPK: dict[str, Loss] = {"forward_kl": naive_topk_forward_kl, "reverse_kl": naive_topk_reverse_kl}
assert tuple(NAIVE_TOPK) == SPARSE_DIVERGENCES


NAIVE: dict[str, Loss] = {
    "reverse_kld": naive_reverse_kld, "token_stats": naive_token_stats, "linear_reverse_kld": naive_linear_reverse_kld,
}


def naive_linear(divergence: str) -> Loss:
    """The unfused composition for ``divergence``: both models' full [N, V] logits, then its naive loss."""
    loss = NAIVE_DIVERGENCE[divergence]

    def linear_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                    teacher_weight: torch.Tensor) -> torch.Tensor:
        return loss(student_hidden @ student_weight.t(), teacher_hidden @ teacher_weight.t(), None)

    return linear_loss


def naive(op: str, divergence: Optional[str] = None) -> Loss:
    """``op``'s naive loss (``NAIVE``; for ``divergence``, ``NAIVE_DIVERGENCE[divergence]``; for
    ``sparse_divergence``, ``NAIVE_TOPK[divergence]``; for ``linear_divergence``, ``naive_linear(divergence)``)."""
    if op == "sparse_divergence":
        return NAIVE_TOPK[divergence]
    if op == "linear_divergence":
        return naive_linear(divergence)
    return NAIVE_DIVERGENCE[divergence] if op == "divergence" else NAIVE[op]


def ours(op: str, backend: str, recompute: bool = False, divergence: Optional[str] = None) -> Loss:
    if op == "linear_reverse_kld":
        if recompute:
            return lambda *args: mk.fused_linear_reverse_kld(*args, reduction="none", backend=backend).mean()
        return lambda *args: mk.fused_linear_reverse_kld(*args, backend=backend)
    if op == "reverse_kld":
        return lambda student, teacher, target: mk.fused_reverse_kld(student, teacher, backend=backend)
    if op == "divergence":
        return lambda student, teacher, target: mk.fused_divergence(
            student, teacher, divergence=divergence, **DIVERGENCE_PARAMS, backend=backend)
    if op == "sparse_divergence":
        return lambda student, teacher, ids, logprobs: mk.fused_sparse_divergence(
            student, ids, logprobs, divergence=divergence, tail="bin", backend=backend)
    if op == "linear_divergence":
        return lambda *args: mk.fused_linear_divergence(*args, divergence=divergence, **DIVERGENCE_PARAMS,
                                                        backend=backend)

    def loss(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        stats = mk.fused_token_stats(student, teacher, target, with_entropy=True, backend=backend)
        return token_stats_loss(stats.reverse_kld, stats.student_logprob, stats.entropy)

    return loss


def dense_sparse_variant(student: torch.Tensor, teacher: torch.Tensor, ids: torch.Tensor,
                         logprobs: torch.Tensor, *, divergence: str, backend: str) -> torch.Tensor:
    """The sparse op's dense baseline: ``fused_divergence`` against the whole teacher (ids and log-probabilities
    unused)."""
    return mk.fused_divergence(student, teacher, divergence=divergence, backend=backend)


def reference_loss(op: str, *args: torch.Tensor, divergence: Optional[str] = None,
                   dense: bool = False) -> torch.Tensor:
    """``op``'s loss on ``args`` computed by ``minillm_kernels.reference`` in float64 (the lm_head matmuls too):
    the oracle every variant is checked against (for ``divergence``, the mean of ``reference.divergence``; for
    ``sparse_divergence`` the mean of ``reference.sparse_divergence`` with the bin tail, or, ``dense``, of
    ``reference.divergence`` against the whole teacher)."""
    args = tuple(x.double() if x.is_floating_point() else x for x in args)
    if op == "sparse_divergence":
        student, teacher, ids, logprobs = args
        if dense:
            return reference.divergence(student, teacher, None, 1.0, student.shape[-1], divergence).mean()
        return reference.sparse_divergence(student, ids.long(), logprobs, None, 1.0, student.shape[-1], divergence,
                                           "bin").mean()
    if op == "divergence":
        student, teacher, _ = args
        return reference.divergence(student, teacher, None, 1.0, student.shape[-1], divergence, **DIVERGENCE_PARAMS).mean()
    if op == "linear_divergence":
        student_hidden, student_weight, teacher_hidden, teacher_weight = args
        student, teacher = student_hidden @ student_weight.t(), teacher_hidden @ teacher_weight.t()
        return reference.divergence(student, teacher, None, 1.0, student.shape[-1], divergence,
                                    **DIVERGENCE_PARAMS).mean()
    if op == "linear_reverse_kld":
        student_hidden, student_weight, teacher_hidden, teacher_weight = args
        student, teacher, target = student_hidden @ student_weight.t(), teacher_hidden @ teacher_weight.t(), None
    else:
        student, teacher, target = args
    kl, student_logprob, _, entropy = reference.token_stats(
        student, teacher, target if op == "token_stats" else None, None, 1.0, student.shape[-1]
    )
    return token_stats_loss(kl, student_logprob, entropy) if op == "token_stats" else kl.mean()


CHECK_TOKENS = 16  # the check's input: this many tokens, the case's vocabulary and dtype,
CHECK_HIDDEN = 64  # and at most this hidden size (a float64 [V, H] weight stays small)
# Relative tolerance of the check, 4 ulps of the dtype and at least 1e-3. Measured worst cases here (2 CPU cores,
# 16 tokens): 2.3e-4 for the naive float32 token_stats loss at V = 262144 (float32 row sums), 1.8e-2 for the
# gradient of the bf16 lm_head-fused losses at H = 64 (bf16 logits and matmul outputs).
CHECK_RTOL = {dtype: max(4 * torch.finfo(dtype).eps, 1e-3) for dtype in (torch.float32, torch.bfloat16, torch.float16)}


def disagreement(op: str, loss: Loss, vocab: int, hidden: int, dtype: torch.dtype, device: str,
                 divergence: Optional[str] = None, k: Optional[int] = None, dense: bool = False) -> Optional[str]:
    """None if ``loss`` gives ``reference_loss``'s value and gradients on a fresh random input of this case
    (``CHECK_TOKENS`` tokens), else what differs. The reference is float64 on the same (rounded) inputs. The
    tolerance, relative on the value and on each gradient as a whole (norm of the difference over the norm), is
    ``CHECK_RTOL``: it tells a variant that computes another quantity (e.g. KL(q || q) = 0: off by 100%) from
    rounding; how close each backend comes is the test suite's business, with far tighter bounds. ``k``: the sparse
    op's K; ``dense``: a sparse-op variant that computes the dense divergence (checked against that)."""
    args, leaves = inputs(op, CHECK_TOKENS, vocab, min(hidden, CHECK_HIDDEN), dtype, device, k)
    reference_args = tuple(x.detach().double().requires_grad_() if any(x is y for y in leaves) else x for x in args)
    rtol = CHECK_RTOL[dtype]
    got, want = loss(*args), reference_loss(op, *reference_args, divergence=divergence, dense=dense)
    got_value, want_value = float(got.detach()), float(want.detach())
    if not abs(got_value - want_value) <= rtol * abs(want_value):
        return f"loss {got_value:.6g}, float64 reference {want_value:.6g}"
    grads = torch.autograd.grad(got, leaves, allow_unused=True)
    reference_grads = torch.autograd.grad(want, [x for x in reference_args if x.requires_grad])
    for index, (grad, reference_grad) in enumerate(zip(grads, reference_grads)):
        if grad is None:
            return f"no gradient for input {index}"
        error = float((grad.double() - reference_grad).norm() / reference_grad.norm())
        if not error <= rtol:
            return f"gradient of input {index}: relative error {error:.2g} from the float64 reference (tolerance {rtol:.2g})"
    return None


@functools.cache
def compiled(op: str, divergence: Optional[str] = None) -> Loss:
    """The naive loss under ``torch.compile``, with dynamic shapes: one compilation serves every size."""
    return torch.compile(naive(op, divergence), dynamic=True)


@functools.cache
def liger() -> Optional[Loss]:
    """Liger's fused JSD at beta = 1, if installed and if, in the installed version's convention, it computes
    the mean reverse KL (``disagreement`` on a small float32 input); else None."""
    try:
        from liger_kernel.transformers import LigerJSD

        jsd = LigerJSD(beta=1.0)
    except Exception:  # noqa: BLE001 (not installed, or a version that refuses beta = 1)
        return None

    def loss(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # LigerJSD(log_q, log_p): input = the student's log-probabilities, target = the teacher's.
        return jsd(torch.log_softmax(student, -1), torch.log_softmax(teacher, -1))

    wrong = disagreement("reverse_kld", loss, 1000, 0, torch.float32, "cuda")
    if wrong:
        warnings.warn(f"LigerJSD(beta=1) is not the mean reverse KL ({wrong}): not benchmarked", RuntimeWarning,
                      stacklevel=2)
        return None
    return loss


@functools.cache
def liger_divergence(divergence: str) -> Optional[Loss]:
    """Liger's own kernel for ``divergence`` on the GPU, if installed and if it computes ours (``disagreement`` on a
    small float32 input): ``LigerJSD(beta)(log_q, log_p)`` for "jsd", ``LigerTVDLoss()(q, p)`` (mean over rows) for
    "tvd"; else None (Liger has no kernel for the others)."""
    try:
        if divergence == "jsd":
            from liger_kernel.transformers import LigerJSD

            jsd = LigerJSD(beta=DIVERGENCE_PARAMS["beta"])

            def loss(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
                return jsd(torch.log_softmax(student, -1), torch.log_softmax(teacher, -1))
        elif divergence == "tvd":
            from liger_kernel.transformers.tvd import LigerTVDLoss

            tvd = LigerTVDLoss(reduction="batchmean")

            def loss(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
                return tvd(torch.softmax(student, -1), torch.softmax(teacher, -1))
        else:
            return None
        wrong = disagreement("divergence", loss, 1000, 0, torch.float32, "cuda", divergence)
    except Exception as error:  # noqa: BLE001 (not installed, or a version with another signature)
        if not isinstance(error, ImportError):
            warnings.warn(f"Liger's {divergence} failed ({error}): not benchmarked", RuntimeWarning, stacklevel=2)
        return None
    if wrong:
        warnings.warn(f"Liger's {divergence} is not ours ({wrong}): not benchmarked", RuntimeWarning, stacklevel=2)
        return None
    return loss


@functools.cache
def liger_linear(device: str) -> dict[str, Loss]:
    """Liger's fused-linear JSD losses that run on ``device``, by name, each at the beta (1, else 0: conventions
    differ between its versions and classes) where it gives the mean reverse KL (``disagreement`` on a small
    float32 input); those installed."""
    candidates: dict[str, Callable[[float], Loss]] = {}
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        def chunked(beta: float) -> Loss:
            jsd = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta)
            return lambda sh, sw, th, tw: jsd(sh, sw, th, tw, torch.zeros(sh.shape[0], dtype=torch.long,
                                                                          device=sh.device), None, None)

        candidates["liger_chunked"] = chunked
    except ImportError:
        pass
    if device == "cuda":  # Triton kernels
        try:
            from liger_kernel.transformers import LigerFusedLinearJSD

            candidates["liger_fused"] = lambda beta: LigerFusedLinearJSD(jsd_beta=beta)
        except ImportError:
            pass
    table = {}
    for name, make in candidates.items():
        for beta in (1.0, 0.0):
            try:
                loss = make(beta)
                wrong = disagreement("linear_reverse_kld", loss, 1000, CHECK_HIDDEN, torch.float32, device)
            except Exception as error:  # noqa: BLE001 (an installed version with another signature)
                warnings.warn(f"{name}(beta={beta}) failed ({error}): not benchmarked", RuntimeWarning, stacklevel=2)
                break
            if not wrong:
                table[f"{name}(beta={beta:g})"] = loss
                break
        else:
            warnings.warn(f"{name} gives no mean reverse KL at beta 1 or 0: not benchmarked", RuntimeWarning,
                          stacklevel=2)
    return table


def trl_linear_divergence(divergence: str, backend: Optional[str] = None) -> Optional[Loss]:
    """The mean ``divergence`` through TRL 1.16's ``_chunked_divergence_loss`` (``backend`` None), or through our
    integration's ``chunked_divergence_loss`` on ``backend`` (the same arguments: TRL's beta, a [1, N] mask of ones;
    both also compute the student's entropy); None unless TRL, in the version the integration is tested with, is
    installed and ``divergence`` is one TRL computes (``TRL_BETAS``)."""
    if divergence not in TRL_BETAS:
        return None
    try:
        from minillm_kernels.integrations.trl import chunked_divergence_loss
        from trl.trainer.distillation_trainer import _chunked_divergence_loss
    except ImportError:
        return None
    loss_fn = (_chunked_divergence_loss if backend is None
               else functools.partial(chunked_divergence_loss, backend=backend))

    def loss(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
             teacher_weight: torch.Tensor) -> torch.Tensor:
        mask = torch.ones(1, student_hidden.shape[0], dtype=torch.long, device=student_hidden.device)
        return loss_fn(student_hidden[None], teacher_hidden[None], student_weight, teacher_weight, mask,
                       TRL_BETAS[divergence])[0]

    return loss


def liger_linear_divergence(divergence: str) -> Optional[Loss]:
    """Liger's chunked ``LigerFusedLinearJSDLoss`` (soft loss only) at TRL's beta of ``divergence`` (Liger's mixture
    is TRL's: beta 0 the forward KL, 1 the reverse KL), if installed and ``divergence`` is one of ``TRL_BETAS``."""
    if divergence not in TRL_BETAS:
        return None
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except ImportError:
        return None
    jsd = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=TRL_BETAS[divergence])
    return lambda sh, sw, th, tw: jsd(sh, sw, th, tw, torch.zeros(sh.shape[0], dtype=torch.long, device=sh.device),
                                      None, None)


def variants(op: str, device: str, divergence: Optional[str] = None, only: Optional[str] = None) -> dict[str, Loss]:
    """Every variant of ``op`` (for "divergence" and "sparse_divergence", of its ``divergence``) that can run on
    ``device`` here, by name (``naive`` first, ``naive_topk`` for the sparse op: ratios refer to it); with ``only``,
    that variant alone (what a benchmark worker measures: Liger's numerical checks and TRL's import, tens of seconds
    on a CPU, are then paid only by their own variants)."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if (op in ("divergence", "sparse_divergence", "linear_divergence")) != (divergence is not None):
        raise ValueError(f"ops 'divergence', 'sparse_divergence' and 'linear_divergence', and only they, take a "
                         f"divergence (one of {reference.DIVERGENCES})")
    if op in ("divergence", "linear_divergence") and divergence not in reference.DIVERGENCES:
        raise ValueError(f"divergence must be one of {reference.DIVERGENCES}, got {divergence!r}")
    if op == "sparse_divergence" and divergence not in SPARSE_DIVERGENCES:
        raise ValueError(f"the sparse_divergence op's divergence must be one of {SPARSE_DIVERGENCES}, got "
                         f"{divergence!r}")
    def wanted(prefix: str) -> bool:
        return only is None or only.startswith(prefix)

    naive_name = "naive_topk" if op == "sparse_divergence" else "naive"
    table: dict[str, Loss] = {naive_name: naive(op, divergence)}
    if only in (None, f"{naive_name}_compile"):  # (cached: built from the naive loss only where it is measured)
        table[f"{naive_name}_compile"] = compiled(op, divergence)
    for backend in mk.available_backends():
        # The CPU kernel on CPU tensors; Triton and CUDA on the GPU (Triton's interpreter is no benchmark).
        if backend != "reference" and (backend == "cpu") == (device == "cpu"):
            table[backend] = ours(op, backend, divergence=divergence)
            if op == "linear_reverse_kld":
                table[f"{backend}+recompute"] = ours(op, backend, recompute=True)
            if op == "sparse_divergence":
                table[f"dense_{backend}"] = functools.partial(dense_sparse_variant, divergence=divergence,
                                                              backend=backend)
            if (op == "linear_divergence" and wanted(f"{backend}+entropy")
                    and trl_linear_divergence(divergence, backend) is not None):
                table[f"{backend}+entropy"] = trl_linear_divergence(divergence, backend)
    if op == "reverse_kld" and device == "cuda" and wanted("liger") and liger() is not None:
        table["liger"] = liger()
    if op == "divergence" and device == "cuda" and wanted("liger") and liger_divergence(divergence) is not None:
        table["liger"] = liger_divergence(divergence)
    if op == "linear_reverse_kld":
        if wanted("liger"):
            table.update(liger_linear(device))
        trl = trl_linear_divergence("reverse_kl") if wanted("trl") else None  # TRL 1.16's chunked loss at beta = 1
        if trl is not None:
            table["trl_chunked"] = trl
    if op == "linear_divergence":
        extra = {"trl_chunked": trl_linear_divergence(divergence) if wanted("trl") else None,
                 "liger_chunked": liger_linear_divergence(divergence) if wanted("liger") else None}
        table.update({name: loss for name, loss in extra.items() if loss is not None})
    return table if only is None else {only: table[only]}
