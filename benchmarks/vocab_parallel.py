"""``python -m benchmarks --op vocab_parallel``: the reverse KL of logits sharded over the vocabulary, on 2 processes.

Each of ``WORLD`` gloo processes (one thread each) holds its [N, V / P] slice of both models' logits. Each variant is
the forward and backward of the mean reverse KL over the N tokens, leaving each process its slice of the gradient:

- ``ours``: ``fused_reverse_kld(..., process_group=...)`` on the slices: the CPU kernel on each shard, then one
  all-gather of 8 numbers per token (and the call's check: one all-gather of 6 numbers);
- ``all_gather``: all-gather both models' slices into the [N, V] logits on every process, then the unsharded
  ``fused_reverse_kld`` (the same CPU kernel) there, and each process keeps its slice of the gradient.

V is the case's vocabulary, padded to a multiple of P (``vocab_size`` passes the real size). Communication is
measured: ``received_bytes``, what each process receives from the others in the collectives of one forward+backward
(each all-gather's output less its own input), counted by wrapping ``torch.distributed.all_gather_single``, the one
collective either variant issues. Times: the median over the timed steps of the slowest process (each step between
two barriers), after two warm-up steps; peak memory: rank 0's, as ``run.peak_extra_bytes`` measures it. Before it is
timed, a variant's loss and its gradient (the slices side by side) are checked against the float64 reference on the
whole logits of a small input (``variants.CHECK_TOKENS`` tokens, the case's vocabulary and dtype).
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import minillm_kernels as mk

WORLD = 2
VARIANTS = ("ours", "all_gather")


def ours(student: torch.Tensor, teacher: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return mk.fused_reverse_kld(student, teacher, vocab_size=vocab_size, backend="cpu", process_group=dist.group.WORLD)


def all_gather(student: torch.Tensor, teacher: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The logits gathered whole on every process, then the unsharded loss; the gradient flows back to the slice."""
    return mk.fused_reverse_kld(_GatherColumns.apply(student), _GatherColumns.apply(teacher.detach()),
                                vocab_size=vocab_size, backend="cpu")


class _GatherColumns(torch.autograd.Function):
    """[N, W] slices -> the [N, P W] logits, rank r's at columns [r W, (r + 1) W); backward: the own columns."""

    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:
        every = local.new_empty((WORLD * local.shape[0], local.shape[1]))
        dist.all_gather_single(every, local.contiguous())
        return every.view(WORLD, *local.shape).permute(1, 0, 2).reshape(local.shape[0], -1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.view(grad.shape[0], WORLD, -1)[:, dist.get_rank()]


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]] = {"ours": ours, "all_gather": all_gather}


class ReceivedBytes:
    """Counts what this process receives in ``dist.all_gather_single`` calls while active (output less own input)."""

    def __init__(self) -> None:
        self.count = 0

    def __enter__(self) -> "ReceivedBytes":
        self._original = dist.all_gather_single

        def counted(output, input, *args, **kwargs):
            self.count += output.numel() * output.element_size() - input.numel() * input.element_size()
            return self._original(output, input, *args, **kwargs)

        dist.all_gather_single = counted
        return self

    def __exit__(self, *exc) -> None:
        dist.all_gather_single = self._original


def padded(vocab: int) -> int:
    """The logits' width: ``vocab`` padded to a multiple of the number of processes."""
    return -(-vocab // WORLD) * WORLD


def slices(tokens: int, vocab: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                            torch.Tensor]:
    """The whole logits ~ N(0, 9) ([N, V padded]; the same on every process) and this process's slices of them."""
    generator = torch.Generator().manual_seed(seed)
    student, teacher = (torch.randn(tokens, padded(vocab), generator=generator).mul_(3).to(dtype) for _ in range(2))
    rank = dist.get_rank()
    return student, teacher, *(x.chunk(WORLD, -1)[rank].contiguous() for x in (student, teacher))


def disagreement(variant: str, vocab: int, dtype: torch.dtype) -> Optional[str]:
    """None if the variant gives the float64 reference's loss and gradient on a small input, else what differs
    (collective: every process runs it)."""
    from benchmarks.variants import CHECK_RTOL, CHECK_TOKENS

    student, teacher, local_student, local_teacher = slices(CHECK_TOKENS, vocab, dtype, seed=1)
    leaf = local_student.detach().requires_grad_()
    loss = LOSSES[variant](leaf, local_teacher, vocab)
    loss.backward()
    loss = loss.detach()
    grad = _GatherColumns.apply(leaf.grad).double()
    reference_student = student.double().requires_grad_()
    want = mk.fused_reverse_kld(reference_student, teacher.double(), vocab_size=vocab, backend="reference")
    want.backward()
    want = want.detach()
    rtol = CHECK_RTOL[dtype]
    if not abs(float(loss) - float(want)) <= rtol * abs(float(want)):
        return f"loss {float(loss):.6g}, float64 reference {float(want):.6g}"
    error = float((grad - reference_student.grad).norm() / reference_student.grad.norm())
    if not error <= rtol:
        return f"gradient: relative error {error:.2g} from the float64 reference (tolerance {rtol:.2g})"
    return None


def _rank_main(rank: int, folder: str, variant: str, tokens: int, vocab: int, dtype: torch.dtype,
               repeats: int) -> None:
    from benchmarks.run import WRONG, peak_extra_bytes

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=WORLD)
    try:
        wrong = disagreement(variant, vocab, dtype)
        if wrong:
            result = dict(status=f"{WRONG}: {wrong}")
        else:
            result = _measure_here(variant, tokens, vocab, dtype, repeats, peak_extra_bytes)
        torch.save(result, os.path.join(folder, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _measure_here(variant: str, tokens: int, vocab: int, dtype: torch.dtype, repeats: int,
                  peak_extra_bytes: Callable) -> dict:
    """Times, received bytes and rank 0's peak extra memory of one case, in this process (collective)."""
    _, _, local_student, local_teacher = slices(tokens, vocab, dtype, seed=0)
    leaf = local_student.requires_grad_()
    loss_fn = LOSSES[variant]

    def forward() -> None:
        with torch.no_grad():
            loss_fn(leaf, local_teacher, vocab)

    def forward_backward() -> None:
        leaf.grad = None
        loss_fn(leaf, local_teacher, vocab).backward()

    def slowest_ms(fn: Callable[[], None]) -> float:
        """Median over ``repeats`` steps of the step's time on the slowest process (barriers around each)."""
        times = []
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            fn()
            dist.barrier()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    for _ in range(2):  # warm-up: the kernel's first calls, fresh pages
        forward_backward()
    with ReceivedBytes() as received:
        forward_backward()
    leaf.grad = None
    peak = peak_extra_bytes(forward_backward, "cpu")
    return dict(status="ok", fwd_ms=slowest_ms(forward), fwd_bwd_ms=slowest_ms(forward_backward),
                peak_extra_mb=peak / 2**20, peak_extra_nv=peak / (tokens * padded(vocab) * 4), world=WORLD,
                received_bytes=received.count)


def measure_vocab_parallel(variant: str, tokens: int, vocab: int, dtype: str, repeats: int) -> dict:
    """One case on ``WORLD`` fresh gloo processes: rank 0's row of ``benchmarks.run``, with ``world`` and
    ``received_bytes`` (per process, one forward+backward)."""
    from benchmarks.run import DTYPES

    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(_rank_main, args=(folder, variant, tokens, vocab, DTYPES[dtype], max(repeats, 1)),
                           nprocs=WORLD, join=True, start_method="spawn")
        return torch.load(os.path.join(folder, "rank0.pt"))
