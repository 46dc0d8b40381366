"""The losses the benchmark compares, for each of the two operations it measures.

- ``reverse_kld``: the mean reverse KL over tokens, KL(q || p) = sum_v q_v (log q_v - log p_v): the naive
  PyTorch loss a user writes by hand (eager and under ``torch.compile``), ``fused_reverse_kld`` on each backend
  of ours, and Liger-Kernel's ``LigerJSD(beta=1)`` where it is installed (GPU only).
- ``token_stats``: every per-token MiniLLM term of sampled tokens (reverse KL, log q(y), log p(y), entropy),
  with a loss that back-propagates through the three differentiable ones: the naive formulas
  (``minillm_kernels.reference``, eager and compiled) and ``fused_token_stats`` on each backend.

Each variant is ``loss(student, teacher, target) -> scalar``.
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable, Optional

import torch

import minillm_kernels as mk
from minillm_kernels import reference

Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
OPS = ("reverse_kld", "token_stats")


def naive_reverse_kld(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """What a user writes by hand: two log-softmaxes, a softmax, a product and a sum over [N, V]."""
    student_logq = torch.log_softmax(student.float(), dim=-1)
    teacher_logp = torch.log_softmax(teacher.float(), dim=-1)
    return (student_logq.exp() * (student_logq - teacher_logp)).sum(-1).mean()


def naive_token_stats(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    kl, student_logprob, _, entropy = reference.token_stats(student, teacher, target, None, 1.0, student.shape[-1])
    return (kl + student_logprob + entropy).mean()


def ours(op: str, backend: str) -> Loss:
    if op == "reverse_kld":
        return lambda student, teacher, target: mk.fused_reverse_kld(student, teacher, backend=backend)

    def loss(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        stats = mk.fused_token_stats(student, teacher, target, with_entropy=True, backend=backend)
        return (stats.reverse_kld + stats.student_logprob + stats.entropy).mean()

    return loss


@functools.cache
def compiled(op: str) -> Loss:
    """The naive loss under ``torch.compile``, with dynamic shapes: one compilation serves every size."""
    return torch.compile({"reverse_kld": naive_reverse_kld, "token_stats": naive_token_stats}[op], dynamic=True)


@functools.cache
def liger() -> Optional[Loss]:
    """Liger's fused JSD at beta = 1, if installed and if, in the installed version's convention, it computes
    the mean reverse KL (checked against the naive loss on a small input before use); else None."""
    try:
        from liger_kernel.transformers import LigerJSD

        jsd = LigerJSD(beta=1.0)
    except Exception:  # noqa: BLE001 (not installed, or a version that refuses beta = 1)
        return None

    def loss(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # LigerJSD(log_q, log_p): input = the student's log-probabilities, target = the teacher's.
        return jsd(torch.log_softmax(student, -1), torch.log_softmax(teacher, -1))

    student = torch.randn(8, 1000, device="cuda") * 3
    teacher = torch.randn(8, 1000, device="cuda") * 3
    got, want = loss(student, teacher, None), naive_reverse_kld(student, teacher, None)
    if not torch.allclose(got.float(), want, rtol=1e-3, atol=1e-4):
        warnings.warn(f"LigerJSD(beta=1) gives {got.item():.6f}, the mean reverse KL is {want.item():.6f}: "
                      "not benchmarked", RuntimeWarning, stacklevel=2)
        return None
    return loss


def variants(op: str, device: str) -> dict[str, Loss]:
    """Every variant of ``op`` that can run on ``device`` here, by name (``naive`` first: ratios refer to it)."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    table: dict[str, Loss] = {
        "naive": naive_reverse_kld if op == "reverse_kld" else naive_token_stats,
        "naive_compile": compiled(op),
    }
    for backend in mk.available_backends():
        # The CPU kernel on CPU tensors; Triton and CUDA on the GPU (Triton's interpreter is no benchmark).
        if backend != "reference" and (backend == "cpu") == (device == "cpu"):
            table[backend] = ours(op, backend)
    if op == "reverse_kld" and device == "cuda" and liger() is not None:
        table["liger"] = liger()
    return table
