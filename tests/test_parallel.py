"""Vocabulary-parallel losses (process_group=, DTensor inputs) on 2 and 4 gloo processes against the unsharded float64
oracle: values and gradients of every public loss function, masks, temperature, targets on every shard, -inf columns
(a whole shard's included), a padding shard whose columns all lie past vocab_size, every reduction, fused-linear (its
per-chunk combine included), DTensors from ColwiseParallel, and the errors a mismatched rank gets; the divergence
family (fused_divergence and fused_linear_divergence: every divergence and reduction, on the CPU kernel) in processes
of its own.

The processes of one world size are started once per test session (``ranks``), each running every case of that size
(``CASES``); a case's inputs are made here, whole, and each rank takes its shard of them. Results come back through
files; a rank that fails, or a collective that hangs, fails every case of its world with that rank's traceback.
"""
from __future__ import annotations

import math
import os
import random
import re
import tempfile
import time
from typing import Callable

import pytest
import torch
import torch.distributed as dist

import minillm_kernels as mk
from conftest import (
    ROOT,
    Exact,
    accumulation_dtype,
    assert_gradient_within,
    assert_within,
    exact_token_stats,
    per_token_bound,
    require_backend,
    start_processes,
    tolerance,
    torchrun,
)

RANKS_TIMEOUT_S = 240
BATCH, SEQ = 2, 5  # 10 tokens, as [2, 5]: leading dimensions reshaped like a model's
HIDDEN = 8
F64 = torch.float64


# ---------------------------------------------------------------------------------------------------------------
# Running a function on every rank
# ---------------------------------------------------------------------------------------------------------------
def run_on_ranks(world: int, jobs: dict[str, tuple[str, dict]], timeout_s: float = RANKS_TIMEOUT_S) -> list[dict]:
    """Every rank's ``{case: result}`` of ``jobs`` (``{case: (kind, inputs)}``, see ``RANK_JOBS``), on ``world`` gloo
    processes (fresh ones, as torchrun's are: ``conftest.start_processes``). Killed after ``timeout_s``."""
    with tempfile.TemporaryDirectory() as folder:
        context = start_processes(_rank_main, (world, folder, jobs), world, join=False)
        deadline = time.monotonic() + timeout_s
        while not context.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                raise TimeoutError(f"the {world} ranks did not finish in {timeout_s} s (a collective that hangs?)")
        return [torch.load(os.path.join(folder, f"rank{rank}.pt")) for rank in range(world)]


def _rank_main(rank: int, world: int, folder: str, jobs: dict[str, tuple[str, dict]]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=world)
    try:
        results = {}
        for case, (kind, inputs) in jobs.items():
            try:
                results[case] = RANK_JOBS[kind](rank, world, **inputs)
            except ValueError as error:  # an expected error: raised on every rank alike (the checks are collective)
                results[case] = {"error": str(error)}
        torch.save(results, os.path.join(folder, f"rank{rank}.pt"))
        dist.barrier()  # (no rank tears gloo down while another still needs it)
    finally:
        dist.destroy_process_group()


def shard(x: torch.Tensor, rank: int, world: int, dim: int = -1) -> torch.Tensor:
    """Rank ``rank``'s contiguous slice of ``x`` along ``dim``."""
    return x.chunk(world, dim)[rank].contiguous()


def leaf(x):
    return None if x is None else x.detach().clone().requires_grad_()


def grad_of(x):
    return None if x is None else x.grad


# ---------------------------------------------------------------------------------------------------------------
# What a rank runs, per kind of case
# ---------------------------------------------------------------------------------------------------------------
def rank_logits(rank, world, *, student, teacher, target, mask, upstream, options, widths=None):
    """fused_token_stats and fused_reverse_kld (every reduction) of this rank's slice of the logits; the gradient of
    sum(a KL + b log q(y) + c H) and of each reduction times its upstream. ``widths`` (per rank) overrides the even
    split, to make unequal shards."""
    if widths is None:
        local_student, local_teacher = shard(student, rank, world), shard(teacher, rank, world)
    else:
        start = sum(widths[:rank])
        local_student, local_teacher = (x[..., start:start + widths[rank]].contiguous() for x in (student, teacher))
    group = dist.group.WORLD
    s = leaf(local_student)
    stats = mk.fused_token_stats(s, local_teacher, target, mask=mask, with_entropy=True, process_group=group,
                                 **options)
    a, b, c = (u.to(stats.reverse_kld.dtype) for u in upstream)
    (a * stats.reverse_kld + b * stats.student_logprob + c * stats.entropy).sum().backward()
    out = dict(stats=stats._asdict(), grad=s.grad)
    options = {k: v for k, v in options.items() if k != "mix_alpha"}
    for reduction in ("none", "sum", "mean"):
        s = leaf(local_student)
        loss = mk.fused_reverse_kld(s, local_teacher, mask=mask, reduction=reduction, process_group=group, **options)
        (loss * (a if reduction == "none" else a.sum()).to(loss.dtype)).sum().backward()
        out[reduction] = (loss.detach(), s.grad)
    return out


def rank_linear(rank, world, *, student, teacher, target, mask, upstream, options):
    """fused_linear_token_stats and fused_linear_reverse_kld (every reduction) of this rank's rows of both lm_heads,
    the hidden states replicated; the gradients of the hidden states, of this rank's weight rows and bias."""
    (student_hidden, student_weight, student_bias), (teacher_hidden, teacher_weight, teacher_bias) = student, teacher
    group = dist.group.WORLD
    teacher_args = (teacher_hidden, shard(teacher_weight, rank, world, 0))
    teacher_kwargs = dict(teacher_bias=shard(teacher_bias, rank, world, 0))

    def leaves():
        return leaf(student_hidden), leaf(shard(student_weight, rank, world, 0)), leaf(shard(student_bias, rank, world, 0))

    h, w, b_ = leaves()
    stats = mk.fused_linear_token_stats(h, w, *teacher_args, target, student_bias=b_, mask=mask, with_entropy=True,
                                        process_group=group, **teacher_kwargs, **options)
    a, b, c = (u.to(stats.reverse_kld.dtype) for u in upstream)
    (a * stats.reverse_kld + b * stats.student_logprob + c * stats.entropy).sum().backward()
    out = dict(stats=stats._asdict(), grads=tuple(map(grad_of, (h, w, b_))))
    options = {k: v for k, v in options.items() if k != "mix_alpha"}
    for reduction in ("none", "sum", "mean"):
        h, w, b_ = leaves()
        loss = mk.fused_linear_reverse_kld(h, w, *teacher_args, student_bias=b_, mask=mask, reduction=reduction,
                                           process_group=group, **teacher_kwargs, **options)
        (loss * (a if reduction == "none" else a.sum()).to(loss.dtype)).sum().backward()
        out[reduction] = (loss.detach(), tuple(map(grad_of, (h, w, b_))))
    return out


def rank_dtensor(rank, world, *, student, teacher, target, mask, upstream, options):
    """Both lm_heads parallelised with ColwiseParallel(use_local_output=False): the logits-level loss on the DTensor
    logits it returns, and fused_linear_token_stats on its DTensor weight and bias; no process_group passed."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (world,))
    heads = []
    for hidden, weight, bias in (student, teacher):
        head = torch.nn.Linear(weight.shape[1], weight.shape[0], dtype=weight.dtype)
        with torch.no_grad():
            head.weight.copy_(weight)
            head.bias.copy_(bias)
        heads.append(parallelize_module(head, mesh, ColwiseParallel(use_local_output=False)))
    student_head, teacher_head = heads
    teacher_hidden = teacher[0]
    a, b, c = upstream

    h = leaf(student[0])
    logits = student_head(h)
    with torch.no_grad():
        teacher_logits = teacher_head(teacher_hidden)
    assert isinstance(logits, torch.distributed.tensor.DTensor)
    logits_options = {k: v for k, v in options.items() if k != "chunk_size"}
    stats = mk.fused_token_stats(logits, teacher_logits, target, mask=mask, with_entropy=True, **logits_options)
    (a * stats.reverse_kld + b * stats.student_logprob + c * stats.entropy).sum().backward()
    out = dict(logits=(stats._asdict(), (h.grad, student_head.weight.grad.to_local(), student_head.bias.grad.to_local())))

    student_head.zero_grad()
    h = leaf(student[0])
    stats = mk.fused_linear_token_stats(h, student_head.weight, teacher_hidden, teacher_head.weight, target,
                                        student_bias=student_head.bias, teacher_bias=teacher_head.bias, mask=mask,
                                        with_entropy=True, **options)
    (a * stats.reverse_kld + b * stats.student_logprob + c * stats.entropy).sum().backward()
    out["linear"] = (stats._asdict(), (h.grad, student_head.weight.grad.to_local(), student_head.bias.grad.to_local()))
    return out


def rank_edges(rank, world, *, student, teacher, target, mask, upstream, options):
    """Forward only (their gradients hold inf and NaN): fused_token_stats of logits where a whole shard has no
    teacher mass or no student mass, and NaN logits."""
    stats = mk.fused_token_stats(shard(student, rank, world), shard(teacher, rank, world), target, mask=mask,
                                 with_entropy=True, process_group=dist.group.WORLD, **options)
    return dict(stats=stats._asdict())


def rank_op_level(rank, world, *, student, teacher, target, mask, upstream, options):
    """``parallel.logits_token_stats`` itself, with the ids no eager check has seen (as inside torch.compile):
    global ids out of [0, vocab_size), one of them owned by the padding shard; values and the gradient."""
    from minillm_kernels import parallel

    local = leaf(shard(student, rank, world))
    s = local.view(-1, local.shape[-1])
    shards = parallel.VocabShards(dist.group.WORLD)
    terms = parallel.logits_token_stats(shards, s, shard(teacher, rank, world).view(s.shape), target.reshape(-1),
                                        mask.reshape(-1), options["temperature"], options["vocab_size"],
                                        options["backend"])
    kl, student_logprob, teacher_logprob, entropy = terms
    a, b, c = upstream.reshape(3, -1)
    (a * kl + b * student_logprob + c * entropy).sum().backward()
    return dict(terms=terms, grad=local.grad)


def rank_errors(rank, world, *, student, teacher, target, mask, upstream, options):
    """Calls that must fail on every rank with a message naming the argument: ``{call: message}``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    group = dist.group.WORLD
    width = student.shape[-1] // world
    local_student, local_teacher = shard(student, rank, world), shard(teacher, rank, world)
    hidden = torch.randn(*mask.shape, HIDDEN, dtype=F64) if rank else torch.zeros(*mask.shape, HIDDEN, dtype=F64)
    weight = torch.randn(width, HIDDEN, dtype=F64)
    mesh = init_device_mesh("cpu", (world,))
    uneven = distribute_tensor(student[..., :-1], mesh, [Shard(-1)])
    calls = {
        "unequal widths": lambda: mk.fused_reverse_kld(local_student[..., : width - rank], local_teacher[..., : width - rank],
                                                       process_group=group),
        "vocab_size past the shards": lambda: mk.fused_reverse_kld(local_student, local_teacher,
                                                                   vocab_size=world * width + 1, process_group=group),
        "student and teacher widths": lambda: mk.fused_reverse_kld(local_student, local_teacher[..., :-1],
                                                                   vocab_size=width, process_group=group),
        "target_ids of another rank": lambda: mk.fused_token_stats(local_student, local_teacher, (target + rank) % width,
                                                                   process_group=group),
        "mask of another rank": lambda: mk.fused_reverse_kld(local_student, local_teacher, mask=mask ^ bool(rank),
                                                             process_group=group),
        "hidden states not replicated": lambda: mk.fused_linear_reverse_kld(hidden, weight, hidden, weight,
                                                                            process_group=group),
        "a DTensor split unevenly": lambda: mk.fused_reverse_kld(uneven, uneven),
        "not a process group": lambda: mk.fused_reverse_kld(local_student, local_teacher, process_group=mesh),
    }
    messages = {}
    for call, run in calls.items():
        try:
            run()
            messages[call] = "no error"
        except (TypeError, ValueError) as error:
            messages[call] = f"{type(error).__name__}: {error}"
    return messages


RANK_JOBS: dict[str, Callable] = {"logits": rank_logits, "linear": rank_linear, "dtensor": rank_dtensor,
                                  "edges": rank_edges, "op_level": rank_op_level, "errors": rank_errors}


# ---------------------------------------------------------------------------------------------------------------
# The cases: inputs made here, whole
# ---------------------------------------------------------------------------------------------------------------
def logits_inputs(generator, world, width, vocab_size, dtype, *, temperature=0.7, backend="cpu", infinities=False):
    """Logits ~ N(0, 9) of ``world * width`` columns, the first ``vocab_size`` real, as [2, 5, world * width]; a mask;
    targets on every shard that holds real columns (each one's first and last real column, then random ones);
    upstream gradients. ``infinities``: -inf columns in both models and in the student only (never a target), and
    rank 1's whole shard -inf in both models in token 0, in the student only in token 1."""
    columns = world * width
    n = BATCH * SEQ
    student, teacher = (torch.randn(n, columns, generator=generator, dtype=F64) * 3 for _ in range(2))
    targets = list(range(vocab_size))
    if infinities:
        both, student_only = [1, width + 2, vocab_size - 2], [3, width + 1]
        student[:, both + student_only] = -math.inf
        teacher[:, both] = -math.inf
        student[0, width:2 * width] = teacher[0, width:2 * width] = -math.inf
        student[1, width:2 * width] = -math.inf
        targets = [c for c in targets if c not in both + student_only]
    owned = [c for r in range(world) for c in (r * width, min((r + 1) * width, vocab_size) - 1) if r * width < vocab_size]
    target = torch.tensor(targets)[torch.randint(0, len(targets), (n,), generator=generator)]
    target[: len(owned)] = torch.tensor(owned)
    mask = torch.rand(n, generator=generator) < 0.8
    mask[: len(owned)] = True
    mask[-1] = False
    target[-1] = -100  # an ignore id where masked
    lead = (BATCH, SEQ)
    return dict(
        student=student.to(dtype).view(*lead, columns), teacher=teacher.to(dtype).view(*lead, columns),
        target=target.view(lead), mask=mask.view(lead), upstream=torch.randn(3, *lead, generator=generator, dtype=F64),
        options=dict(temperature=temperature, vocab_size=vocab_size, backend=backend, mix_alpha=0.2),
    )


def linear_inputs(generator, world, width, vocab_size, dtype, *, backend="cpu", chunk_size=3):
    """Hidden states [2, 5, 8] and lm_heads of ``world * width`` rows with biases, logits ~ N(0, 9); the rest as
    ``logits_inputs``. ``chunk_size`` 3: several chunks, each combined over the ranks in the reduction-"sum" loop."""
    rows = world * width
    base = logits_inputs(generator, world, width, vocab_size, dtype, backend=backend)

    def projection():
        hidden = torch.randn(BATCH, SEQ, HIDDEN, generator=generator, dtype=F64)
        weight = torch.randn(rows, HIDDEN, generator=generator, dtype=F64) * (3 / HIDDEN**0.5)
        return tuple(x.to(dtype) for x in (hidden, weight, torch.randn(rows, generator=generator, dtype=F64)))

    return {**base, "student": projection(), "teacher": projection(),
            "options": {**base["options"], "chunk_size": chunk_size}}


def edge_inputs(generator):
    """Token 0: the teacher's rank-1 shard all -inf (KL = +inf); token 1: the student's, and its target there (log q(y)
    = -inf); token 2: the teacher's again, its target there (log p(y) = -inf); token 3: a NaN in rank 1's student
    logits, token 4 in rank 0's teacher logits (NaN in their rows only)."""
    inputs = logits_inputs(generator, 2, 8, 16, F64)
    student, teacher, target = (inputs[k].view(BATCH * SEQ, -1) for k in ("student", "teacher", "target"))
    teacher[0, 8:] = student[1, 8:] = teacher[2, 8:] = -math.inf
    target[1], target[2] = 9, 12
    student[3, 10], teacher[4, 2] = math.nan, math.nan
    inputs["mask"][:] = True
    target[-1] = 0
    return inputs


def out_of_range_inputs(generator):
    """4 ranks of 4 columns, 10 real; ids 10 (past vocab_size, owned by rank 2), 13 (the padding shard's), -1, 10^9."""
    inputs = logits_inputs(generator, 4, 4, 10, F64)
    inputs["target"].view(-1)[4:8] = torch.tensor([10, 13, -1, 10**9])
    inputs["mask"].view(-1)[4:8] = True
    return inputs


CASES = {  # name: (world, kind, make inputs from a generator)
    "2-logits-cpu-fp64": (2, "logits", lambda g: logits_inputs(g, 2, 8, 13, F64)),
    "2-logits-cpu-fp32": (2, "logits", lambda g: logits_inputs(g, 2, 64, 120, torch.float32)),
    "2-logits-reference-fp64": (2, "logits", lambda g: logits_inputs(g, 2, 8, 13, F64, backend="reference")),
    "2-logits-reference-fp32": (2, "logits", lambda g: logits_inputs(g, 2, 64, 120, torch.float32,
                                                                     backend="reference")),
    "2-logits-triton-fp32": (2, "logits", lambda g: logits_inputs(g, 2, 64, 120, torch.float32, backend="triton")),
    "2-logits-cpu-T2-infinities": (2, "logits", lambda g: logits_inputs(g, 2, 8, 16, F64, temperature=2.0,
                                                                        infinities=True)),
    "2-logits-reference-infinities": (2, "logits", lambda g: logits_inputs(g, 2, 8, 16, F64, backend="reference",
                                                                           infinities=True)),
    "2-linear-cpu-fp64": (2, "linear", lambda g: linear_inputs(g, 2, 8, 13, F64)),
    "2-linear-reference-fp64": (2, "linear", lambda g: linear_inputs(g, 2, 8, 13, F64, backend="reference")),
    "2-dtensor-cpu-fp64": (2, "dtensor", lambda g: linear_inputs(g, 2, 8, 13, F64)),
    # 4 ranks of 4 columns, 10 real: rank 2 holds 2 real columns, rank 3 none (a padding shard)
    "4-logits-cpu-padding-shard": (4, "logits", lambda g: logits_inputs(g, 4, 4, 10, F64)),
    "4-logits-reference-padding-shard": (4, "logits", lambda g: logits_inputs(g, 4, 4, 10, F64,
                                                                              backend="reference")),
    "4-linear-cpu-padding-shard": (4, "linear", lambda g: linear_inputs(g, 4, 4, 10, F64)),
    "2-edges": (2, "edges", edge_inputs),
    "4-out-of-range-ids": (4, "op_level", out_of_range_inputs),
    "2-errors": (2, "errors", lambda g: logits_inputs(g, 2, 8, 16, F64)),
}
BACKEND_OF = {name: make(torch.Generator().manual_seed(0))["options"]["backend"] for name, (_, _, make) in CASES.items()}


def world_results(cases, request):
    """``results(world) -> (inputs per case, per-rank results)`` of ``cases`` (``{name: (world, kind, make inputs
    from a generator)}``): the world's processes run, once, on first use, its cases whose backend is usable here and
    which a test of the session reads (its ``case`` or ``name`` parameter, in the tests that use the fixture
    ``request`` is of: a run of a few tests, as the mutation harness makes, starts no case it does not check)."""
    read = {item.callspec.params.get("case", item.callspec.params.get("name")) for item in request.session.items
            if request.fixturename in getattr(item, "fixturenames", ()) and hasattr(item, "callspec")}
    seed = random.randrange(2**31)
    cache = {}

    def results(world):
        if world not in cache:
            print(f"inputs seed {seed}")
            generator = torch.Generator().manual_seed(seed + world)
            inputs = {name: make(generator) for name, (w, _, make) in cases.items() if w == world and name in read}
            usable = {name: x for name, x in inputs.items() if x["options"]["backend"] in mk.available_backends()}
            jobs = {name: (cases[name][1], x) for name, x in usable.items()}
            try:
                cache[world] = (inputs, run_on_ranks(world, jobs))
            except Exception as error:  # every case of this world fails with it, not only the first
                cache[world] = error
        if isinstance(cache[world], Exception):
            raise cache[world]
        return cache[world]

    return results


@pytest.fixture(scope="session")
def ranks(request):
    return world_results(CASES, request)


# ---------------------------------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------------------------------
def assert_same_on_every_rank(per_rank: list) -> None:
    """Every rank returned bit for bit what rank 0 did (NaN where rank 0 has NaN): the combine runs on the same
    numbers everywhere."""
    first = torch.utils._pytree.tree_leaves(per_rank[0])
    for rank, result in enumerate(per_rank[1:], 1):
        for x, y in zip(first, torch.utils._pytree.tree_leaves(result), strict=True):
            same = torch.equal(x.isnan(), y.isnan()) and torch.equal(x.nan_to_num(), y.nan_to_num())
            assert same, f"rank {rank} differs from rank 0"


def exact_of(inputs, logits=None, *, upstream=None) -> Exact:
    """The oracle on the whole (unsharded) logits of a case, with its upstream gradients unless given."""
    student, teacher = logits if logits is not None else (inputs["student"], inputs["teacher"])
    options = inputs["options"]
    return exact_token_stats(student, teacher, inputs["target"], inputs["upstream"] if upstream is None else upstream,
                             mask=inputs["mask"], temperature=options["temperature"],
                             vocab_size=options["vocab_size"], mix_alpha=options["mix_alpha"])


def combined_bound(exact: torch.Tensor, local_width: int, acc_dtype: torch.dtype, *, naive: bool) -> torch.Tensor:
    """How far a combined per-token term may be from the oracle: twice its ``per_token_bound``, plus 4 u log W.

    Each shard's terms are within ``per_token_bound`` of their exact values, and the combine adds up a convex
    combination of them (the weights w_r sum to 1; KL = sum w_r KL_r + KL(w || v) >= sum w_r KL_r, H likewise) and the
    log-shares log w_r, log v_r: at most twice the bound of the global term. The log-normalisers L^r = c k + log Z
    reach the combine through log Z, rounded to the per-row dtype (u log Z, and log Z <= log W: its W terms are <= 1),
    twice in each log w_r = L^r - lse, and a KL term has two log-shares. (Measured in float32, 2 ranks of 64 columns,
    6 seeds, CPU and Triton: the errors reach 0.16 of this bound, 0.49 of the single-process one.)"""
    u = torch.finfo(acc_dtype).eps / 2
    return 2 * per_token_bound(exact, acc_dtype, naive=naive) + 4 * u * math.log(local_width)


def assert_stats_close(stats: dict, exact: Exact, local_width: int, acc_dtype: torch.dtype, *, naive: bool) -> None:
    """``conftest.assert_stats_within`` with ``combined_bound`` for the per-token terms."""
    bound = {name: combined_bound(getattr(exact, name), local_width, acc_dtype, naive=naive)
             for name in ("reverse_kld", "student_logprob", "teacher_logprob", "entropy")}
    for name, name_bound in bound.items():
        assert_within(stats[name], getattr(exact, name), name_bound, name)
    u = torch.finfo(acc_dtype).eps / 2
    ratio_bound = bound["student_logprob"] + bound["teacher_logprob"] + u * exact.log_ratio.abs()
    assert_within(stats["log_ratio"], exact.log_ratio, ratio_bound, "log_ratio")
    weight = exact.importance_weight
    assert_within(stats["importance_weight"], weight, weight.abs() * (ratio_bound + 4 * u), "importance_weight")


def reduction_upstream(reduction: str, a: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The per-token (a, b, c) of a reduction of the KL whose upstream is ``a`` ("none") or ``a.sum()``."""
    count = mask.sum().clamp(min=1)
    per_token = {"none": a, "sum": a.sum().expand_as(a), "mean": a.sum().expand_as(a) / count}[reduction]
    return torch.stack((per_token, 0 * a, 0 * a))


def reduced(reduction: str, kl: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return kl if reduction == "none" else kl.sum() / (mask.sum().clamp(min=1) if reduction == "mean" else 1)


def gathered(per_rank: list, pick: Callable, dim: int = -1) -> torch.Tensor:
    return torch.cat([pick(result) for result in per_rank], dim)


def case_results(ranks, name):
    world, kind, _ = CASES[name]
    require_backend(BACKEND_OF[name])
    inputs, per_rank = ranks(world)
    return inputs[name], [result[name] for result in per_rank]


@pytest.mark.parametrize("name", [n for n, (_, kind, _) in CASES.items() if kind == "logits"])
def test_logits_losses_match_the_unsharded_oracle(ranks, name):
    """fused_token_stats and fused_reverse_kld (every reduction) with process_group: every rank returns the unsharded
    values, the same bits on every rank, and the ranks' gradients side by side are the unsharded gradient."""
    inputs, per_rank = case_results(ranks, name)
    assert_same_on_every_rank([(r["stats"], *(r[reduction][0] for reduction in ("none", "sum", "mean")))
                               for r in per_rank])
    world = CASES[name][0]
    local_width = inputs["student"].shape[-1] // world
    acc = accumulation_dtype(inputs["student"].dtype)
    naive = inputs["options"]["backend"] == "reference"
    exact = exact_of(inputs)
    assert_stats_close(per_rank[0]["stats"], exact, local_width, acc, naive=naive)
    assert_gradient_within(gathered(per_rank, lambda r: r["grad"]), exact, acc, naive=naive)

    mask, a = inputs["mask"], inputs["upstream"][0]
    for reduction in ("none", "sum", "mean"):
        exact = exact_of(inputs, upstream=reduction_upstream(reduction, a, mask))
        bound = combined_bound(exact.reverse_kld, local_width, acc, naive=naive)
        if reduction != "none":  # the per-token bounds add up, plus the rounding of the sum (one u per term)
            u = torch.finfo(acc).eps / 2
            bound = reduced(reduction, bound + mask.numel() * u * exact.reverse_kld.abs(), mask)
        assert_within(per_rank[0][reduction][0], reduced(reduction, exact.reverse_kld, mask), bound, reduction)
        assert_gradient_within(gathered(per_rank, lambda r: r[reduction][1]), exact, acc, naive=naive)


@pytest.mark.parametrize("name", [n for n, (_, kind, _) in CASES.items() if kind in ("linear", "dtensor")])
def test_fused_linear_losses_match_the_unsharded_oracle(ranks, name):
    """fused_linear_token_stats and fused_linear_reverse_kld (every reduction) with process_group, and both loss
    families on DTensor lm_heads: the unsharded values on every rank, the full grad h on every rank (all-reduced inside
    the backward), the ranks' grad W and grad b side by side the unsharded ones."""
    inputs, per_rank = case_results(ranks, name)
    tol = tolerance(F64)
    student, teacher = inputs["student"], inputs["teacher"]
    logits = tuple(h.reshape(-1, h.shape[-1]) @ w.t() + b for h, w, b in (student, teacher))
    lead = inputs["mask"].shape

    def input_grads(exact):
        grad_logits = exact.grad.reshape(-1, logits[0].shape[-1])
        h = student[0].reshape(-1, HIDDEN)
        return (grad_logits @ student[1]).view(*lead, HIDDEN), grad_logits.t() @ h, grad_logits.sum(0)

    def check_gradients(grads, exact):
        want = input_grads(exact)
        for rank, (grad_hidden, _, _) in enumerate(grads):
            torch.testing.assert_close(grad_hidden, want[0], **tol, msg=f"grad h on rank {rank}")
        torch.testing.assert_close(torch.cat([g[1] for g in grads]), want[1], **tol, msg="grad W")
        torch.testing.assert_close(torch.cat([g[2] for g in grads]), want[2], **tol, msg="grad b")

    def check(stats, grads, exact):
        for field in ("reverse_kld", "student_logprob", "teacher_logprob", "entropy", "log_ratio", "importance_weight"):
            torch.testing.assert_close(stats[field], getattr(exact, field), **tol, equal_nan=True, msg=field)
        check_gradients(grads, exact)

    exact = exact_of(inputs, [x.view(*lead, -1) for x in logits])
    if CASES[name][1] == "dtensor":
        for family in ("logits", "linear"):
            assert_same_on_every_rank([r[family][0] for r in per_rank])
            check(per_rank[0][family][0], [r[family][1] for r in per_rank], exact)
        return
    assert_same_on_every_rank([r["stats"] for r in per_rank])
    check(per_rank[0]["stats"], [r["grads"] for r in per_rank], exact)
    mask, a = inputs["mask"], inputs["upstream"][0]
    for reduction in ("none", "sum", "mean"):
        exact = exact_of(inputs, [x.view(*lead, -1) for x in logits], upstream=reduction_upstream(reduction, a, mask))
        for rank, result in enumerate(per_rank):
            torch.testing.assert_close(result[reduction][0], reduced(reduction, exact.reverse_kld, mask), **tol,
                                       msg=f"{reduction} on rank {rank}")
        check_gradients([r[reduction][1] for r in per_rank], exact)


@pytest.mark.parametrize("case", ["2-edges"])
def test_shards_without_mass_and_nan_logits(ranks, case):
    """A shard where the teacher has no mass but the student has: KL = +inf (not NaN); a target on a shard where the
    student's logits are all -inf: log q(y) = -inf; the teacher's likewise; NaN logits on one rank: NaN in that row,
    on every rank, and nowhere else."""
    inputs, per_rank = case_results(ranks, case)
    assert "stats" in per_rank[0], per_rank[0]
    assert_same_on_every_rank([r["stats"] for r in per_rank])
    stats, exact = per_rank[0]["stats"], exact_of(inputs, upstream=None)
    flat = {name: stats[name].reshape(-1) for name in stats}
    assert flat["reverse_kld"][0] == math.inf and flat["reverse_kld"][2] == math.inf
    assert flat["student_logprob"][1] == -math.inf and flat["teacher_logprob"][2] == -math.inf
    nan_rows = {"reverse_kld": [3, 4], "student_logprob": [3], "teacher_logprob": [4], "entropy": [3]}
    for name, rows in nan_rows.items():  # what the NaN reaches, as in one process
        assert [r for r in (3, 4) if flat[name][r].isnan()] == rows, name
    others = torch.tensor([0, 1, 2, 5, 6, 7, 8, 9])  # (the oracle has no NaN rows: it counts NaN terms as dead)
    for name in nan_rows:
        got, want = flat[name][others], getattr(exact, name).reshape(-1)[others]
        finite = want.isfinite()
        assert torch.equal(got.isfinite(), finite) and torch.equal(got[~finite], want[~finite]), name
        assert_within(got[finite], want[finite], combined_bound(want[finite], 8, F64, naive=False), name)


@pytest.mark.parametrize("case", ["4-out-of-range-ids"])
def test_out_of_range_ids_give_nan_log_probabilities_and_the_gradient_without_the_one_hot(ranks, case):
    """At the op level (what a compiled graph, which skips the eager check, gets): an id out of [0, vocab_size) has
    NaN log-probabilities on every rank, also one past vocab_size on a partly real shard and one on the padding shard,
    and its gradient is -b q_v everywhere with no one-hot, as in one process."""
    inputs, per_rank = case_results(ranks, case)
    assert_same_on_every_rank([r["terms"] for r in per_rank])
    exact = exact_of(inputs)
    kl, student_logprob, teacher_logprob, entropy = per_rank[0]["terms"]
    assert student_logprob[4:8].isnan().all() and teacher_logprob[4:8].isnan().all()
    for name, got in (("reverse_kld", kl), ("student_logprob", student_logprob), ("teacher_logprob", teacher_logprob),
                      ("entropy", entropy)):
        want = getattr(exact, name).reshape(-1)
        assert_within(got, want, combined_bound(want, 4, F64, naive=False), name)
    assert_gradient_within(gathered(per_rank, lambda r: r["grad"]), exact, F64)


ERRORS = {  # call: (exception type, what the message must say)
    "unequal widths": ("ValueError", "the local vocabulary width differs across the 2 ranks .* pad the vocabulary"),
    "vocab_size past the shards": ("ValueError", r"vocab_size \(global: 2 ranks x 8 columns at most\)"),
    "student and teacher widths": ("ValueError", "must cover the same vocabulary columns.* pad both"),
    "target_ids of another rank": ("ValueError", "target_ids differs across the 2 ranks.*same global token ids"),
    "mask of another rank": ("ValueError", "mask differs across the 2 ranks"),
    "hidden states not replicated": ("ValueError", "student_hidden differs across the 2 ranks.*replicated"),
    "a DTensor split unevenly": ("ValueError", "do not split evenly over 2 ranks"),
    "not a process group": ("TypeError", "process_group must be a torch.distributed ProcessGroup"),
}


@pytest.mark.parametrize("case", ["2-errors"])
@pytest.mark.parametrize("call", ERRORS)
def test_a_mismatched_call_fails_on_every_rank_naming_the_argument(ranks, call, case):
    """Mismatches across ranks are errors on every rank (not a wrong loss, nor a hang), naming what differs and
    the fix."""
    _, per_rank = case_results(ranks, case)
    kind, pattern = ERRORS[call]
    for rank, messages in enumerate(per_rank):
        assert messages[call].startswith(kind) and re.search(pattern, messages[call]), (rank, messages[call])


def test_the_readme_torchrun_example_matches_the_unsharded_loss():
    """``torchrun --nproc_per_node 2 examples/vocab_parallel.py``, as the README shows it: the losses from the sharded
    logits and from the sharded lm_heads (DTensors) and their gradients against the unsharded ones, on each process."""
    stdout = torchrun(ROOT / "examples" / "vocab_parallel.py", timeout=RANKS_TIMEOUT_S, what="the example")
    assert re.search(r"2 processes: loss \d+\.\d+ from the sharded logits and from the sharded lm_heads", stdout), stdout


# ---------------------------------------------------------------------------------------------------------------
# The divergence family (fused_divergence, fused_linear_divergence) on a sharded vocabulary: its own processes
# (``divergence_ranks``), so that ``-k divergence`` runs these cases alone
# ---------------------------------------------------------------------------------------------------------------
# (name, beta, skew): every kernel divergence, a skew of 0 (the plain KL's path) and the reverse KL.
DIVERGENCE_CALLS = (("forward_kl", 0.5, 0.1), ("jsd", 0.3, 0.1), ("skew_forward_kl", 0.5, 0.25),
                    ("skew_reverse_kl", 0.5, 0.1), ("tvd", 0.5, 0.1), ("skew_forward_kl", 0.5, 0.0),
                    ("reverse_kl", 0.5, 0.1))
REDUCTIONS = ("none", "sum", "mean")


def _divergence_upstream(reduction, a):
    return a if reduction == "none" else a.sum()


def rank_divergence_logits(rank, world, *, student, teacher, target, mask, upstream, options):
    """fused_divergence of this rank's slice of the logits, every divergence and reduction: (loss, gradient)."""
    options = {k: v for k, v in options.items() if k != "mix_alpha"}
    out = {}
    for name, beta, skew in DIVERGENCE_CALLS:
        for reduction in REDUCTIONS:
            s = leaf(shard(student, rank, world))
            loss = mk.fused_divergence(s, shard(teacher, rank, world), divergence=name, beta=beta, skew=skew,
                                       mask=mask, reduction=reduction, process_group=dist.group.WORLD, **options)
            (loss * _divergence_upstream(reduction, upstream[0]).to(loss.dtype)).sum().backward()
            out[name, skew, reduction] = (loss.detach(), s.grad)
    return out


def rank_divergence_linear(rank, world, *, student, teacher, target, mask, upstream, options):
    """fused_linear_divergence of this rank's rows of both lm_heads: (loss, (grad h, grad W_r, grad b_r))."""
    (student_hidden, student_weight, student_bias), (teacher_hidden, teacher_weight, teacher_bias) = student, teacher
    options = {k: v for k, v in options.items() if k != "mix_alpha"}
    out = {}
    for name, beta, skew in DIVERGENCE_CALLS:
        for reduction in REDUCTIONS:
            h, w, b_ = leaf(student_hidden), leaf(shard(student_weight, rank, world, 0)), \
                leaf(shard(student_bias, rank, world, 0))
            loss = mk.fused_linear_divergence(
                h, w, teacher_hidden, shard(teacher_weight, rank, world, 0), divergence=name, beta=beta, skew=skew,
                student_bias=b_, teacher_bias=shard(teacher_bias, rank, world, 0), mask=mask, reduction=reduction,
                process_group=dist.group.WORLD, **options)
            (loss * _divergence_upstream(reduction, upstream[0]).to(loss.dtype)).sum().backward()
            out[name, skew, reduction] = (loss.detach(), tuple(map(grad_of, (h, w, b_))))
    return out


def rank_divergence_dtensor(rank, world, *, student, teacher, target, mask, upstream, options):
    """The JSD on the DTensor logits of a ColwiseParallel lm_head, and the TVD on its DTensor weight and bias (no
    process_group passed): (loss, (grad h, grad W_r, grad b_r)) of reduction "none"."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (world,))
    heads = []
    for hidden, weight, bias in (student, teacher):
        head = torch.nn.Linear(weight.shape[1], weight.shape[0], dtype=weight.dtype)
        with torch.no_grad():
            head.weight.copy_(weight)
            head.bias.copy_(bias)
        heads.append(parallelize_module(head, mesh, ColwiseParallel(use_local_output=False)))
    student_head, teacher_head = heads
    options = {k: v for k, v in options.items() if k != "mix_alpha"}
    out = {}
    for kind, name in (("logits", "jsd"), ("linear", "tvd")):
        student_head.zero_grad()
        h = leaf(student[0])
        if kind == "logits":
            with torch.no_grad():
                teacher_logits = teacher_head(teacher[0])
            loss = mk.fused_divergence(student_head(h), teacher_logits, divergence=name, mask=mask, reduction="none",
                                       **{k: v for k, v in options.items() if k != "chunk_size"})
        else:
            loss = mk.fused_linear_divergence(h, student_head.weight, teacher[0], teacher_head.weight, divergence=name,
                                              student_bias=student_head.bias, teacher_bias=teacher_head.bias,
                                              mask=mask, reduction="none", **options)
        (loss * upstream[0].to(loss.dtype)).sum().backward()
        out[kind] = (loss.detach(), (h.grad, student_head.weight.grad.to_local(), student_head.bias.grad.to_local()))
    return out


RANK_JOBS.update(divergence_logits=rank_divergence_logits, divergence_linear=rank_divergence_linear,
                 divergence_dtensor=rank_divergence_dtensor)

DIVERGENCE_CASES = {  # name: (world, kind, make inputs)
    "2-logits-cpu-fp64-infinities": (2, "divergence_logits",
                                     lambda g: logits_inputs(g, 2, 8, 13, F64, infinities=True)),
    "2-logits-cpu-fp32": (2, "divergence_logits", lambda g: logits_inputs(g, 2, 64, 120, torch.float32)),
    "4-logits-cpu-fp64-padding-shard": (4, "divergence_logits",
                                        lambda g: logits_inputs(g, 4, 4, 11, F64, temperature=1.3, infinities=True)),
    "2-linear-cpu-fp64": (2, "divergence_linear", lambda g: linear_inputs(g, 2, 8, 13, F64)),
    "4-linear-cpu-fp64-padding-shard": (4, "divergence_linear", lambda g: linear_inputs(g, 4, 4, 11, F64)),
    "2-dtensor-cpu-fp64": (2, "divergence_dtensor", lambda g: linear_inputs(g, 2, 8, 16, F64)),
}


@pytest.fixture(scope="session")
def divergence_ranks(request):
    return world_results(DIVERGENCE_CASES, request)


def exact_divergence(student, teacher, mask, options, name, beta, skew, reduction, upstream):
    """The unsharded float64 loss of ``reference.divergence`` and the gradients of loss * upstream (autograd) with
    respect to ``student`` (a tuple of leaves: the logits, or the hidden states, weight and bias)."""
    from minillm_kernels import reference

    if skew == 0 and name.startswith("skew_"):  # the plain KL (the mixture's autograd is NaN where q = 0 < p)
        name = name.removeprefix("skew_")
    leaves = tuple(x.detach().double().requires_grad_() for x in student)
    if len(leaves) == 1:
        logits, teacher_logits = leaves[0], teacher.double()
    else:
        (h, w, b), (th, tw, tb) = leaves, (x.double() for x in teacher)
        logits, teacher_logits = h @ w.t() + b, th @ tw.t() + tb
    flat = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731
    per_token = reference.divergence(flat(logits), flat(teacher_logits), mask.reshape(-1), options["temperature"],
                                     options["vocab_size"], name, beta=beta, skew=skew)
    if reduction == "none":
        loss = per_token.view(mask.shape)
    elif reduction == "sum":
        loss = per_token.sum()
    else:
        loss = per_token.sum() / mask.sum().clamp(min=1)
    (loss * _divergence_upstream(reduction, upstream[0])).sum().backward()
    return loss.detach(), tuple(x.grad for x in leaves)


def check_divergence_case(divergence_ranks, case):
    world = DIVERGENCE_CASES[case][0]
    require_backend("cpu")
    inputs, per_rank = divergence_ranks(world)
    results = [r[case] for r in per_rank]
    assert_same_on_every_rank([{k: v[0] for k, v in r.items()} for r in results])
    return inputs[case], results


@pytest.mark.parametrize("case", [c for c, (_, kind, _) in DIVERGENCE_CASES.items() if kind == "divergence_logits"])
def test_divergences_of_sharded_logits_match_the_unsharded_oracle(divergence_ranks, case):
    inputs, results = check_divergence_case(divergence_ranks, case)
    tol = tolerance(inputs["student"].dtype)
    world = len(results)
    for (name, skew, reduction), _ in results[0].items():
        beta = next(b for n, b, s in DIVERGENCE_CALLS if n == name and s == skew)
        loss, (grad,) = exact_divergence((inputs["student"],), inputs["teacher"], inputs["mask"], inputs["options"],
                                         name, beta, skew, reduction, inputs["upstream"])
        what = f"{name} skew={skew} {reduction}"
        torch.testing.assert_close(results[0][name, skew, reduction][0].double(), loss, **tol, msg=what)
        got = torch.cat([r[name, skew, reduction][1] for r in results], -1).double()
        torch.testing.assert_close(got, grad, **tol, msg=f"{what}: gradient ({world} slices)")


@pytest.mark.parametrize("case", [c for c, (_, kind, _) in DIVERGENCE_CASES.items() if kind == "divergence_linear"])
def test_divergences_of_a_sharded_lm_head_match_the_unsharded_oracle(divergence_ranks, case):
    inputs, results = check_divergence_case(divergence_ranks, case)
    tol = tolerance(inputs["student"][1].dtype)
    for (name, skew, reduction), _ in results[0].items():
        beta = next(b for n, b, s in DIVERGENCE_CALLS if n == name and s == skew)
        loss, (grad_h, grad_w, grad_b) = exact_divergence(inputs["student"], inputs["teacher"], inputs["mask"],
                                                          inputs["options"], name, beta, skew, reduction,
                                                          inputs["upstream"])
        what = f"{name} skew={skew} {reduction}"
        torch.testing.assert_close(results[0][name, skew, reduction][0].double(), loss, **tol, msg=what)
        for rank, result in enumerate(results):  # grad h is the full one on every rank (all-reduced)
            torch.testing.assert_close(result[name, skew, reduction][1][0].double(), grad_h, **tol,
                                       msg=f"{what}: grad h on rank {rank}")
        for index, exact in ((1, grad_w), (2, grad_b)):
            got = torch.cat([r[name, skew, reduction][1][index] for r in results], 0).double()
            torch.testing.assert_close(got, exact, **tol, msg=f"{what}: grad {'Wb'[index - 1]} (the ranks' slices)")


@pytest.mark.parametrize("case", ["2-dtensor-cpu-fp64"])
def test_divergences_of_dtensor_logits_and_weights_match_the_unsharded_oracle(divergence_ranks, case):
    inputs, results = check_divergence_case(divergence_ranks, case)
    tol = tolerance(F64)
    for kind, name in (("logits", "jsd"), ("linear", "tvd")):
        loss, (grad_h, grad_w, grad_b) = exact_divergence(inputs["student"], inputs["teacher"], inputs["mask"],
                                                          inputs["options"], name, 0.5, 0.1, "none",
                                                          inputs["upstream"])
        torch.testing.assert_close(results[0][kind][0].double(), loss, **tol, msg=kind)
        torch.testing.assert_close(results[0][kind][1][0].double(), grad_h, **tol, msg=f"{kind}: grad h")
        for index, exact in ((1, grad_w), (2, grad_b)):
            got = torch.cat([r[kind][1][index] for r in results], 0).double()
            torch.testing.assert_close(got, exact, **tol, msg=f"{kind}: grad {'Wb'[index - 1]}")


# ---------------------------------------------------------------------------------------------------------------
# The sparse teacher: fused_sparse_divergence of sharded student logits, every divergence x tail mode
# ---------------------------------------------------------------------------------------------------------------
SPARSE_TAILS = ("bin", "uniform", "renormalized")
SPARSE_DIVERGENCES = (("reverse_kl", 0.5, 0.1), ("forward_kl", 0.5, 0.1), ("jsd", 0.3, 0.1),
                      ("skew_forward_kl", 0.5, 0.25), ("skew_reverse_kl", 0.5, 0.1), ("tvd", 0.5, 0.1))


def sparse_inputs(generator, world, width, vocab_size, k, dtype, *, backend="cpu", temperature=0.7):
    """``logits_inputs``' student and mask, and a sparse teacher of ``k`` entries: the top-k of teacher logits ~ N(0,
    9) at temperature 1, all of token 0's on rank 0's columns (its largest logits: the other ranks own none of its
    ids), token 1 with
    fewer than k live entries where k < vocab_size (the last -inf, their ids out of range), token 2's ids in reverse
    order."""
    base = logits_inputs(generator, world, width, vocab_size, dtype, backend=backend, temperature=temperature)
    n = BATCH * SEQ
    teacher = torch.randn(n, vocab_size, generator=generator, dtype=F64) * 3
    teacher[0, :min(k, width)] = teacher[0].max() + torch.rand(min(k, width), generator=generator, dtype=F64)
    ids, logprobs = mk.topk_teacher(teacher, k, vocab_size=vocab_size)
    if 2 < k < vocab_size:
        logprobs[1, k // 2:] = -math.inf
        ids[1, k // 2:] = 10**6
    ids[2], logprobs[2] = ids[2].flip(0), logprobs[2].flip(0)
    lead = (BATCH, SEQ)
    return dict(student=base["student"], ids=ids.view(*lead, k), logprobs=logprobs.view(*lead, k), mask=base["mask"],
                target=base["target"], target_logprobs=-torch.rand(lead, generator=generator, dtype=F64) * 5,
                upstream=base["upstream"], options=dict(temperature=temperature, vocab_size=vocab_size,
                                                        backend=backend))


def rank_sparse(rank, world, *, student, ids, logprobs, target, target_logprobs, mask, upstream, options):
    """fused_sparse_divergence of this rank's slice of the student's logits, every divergence x tail mode, reduction
    "none" (and "mean" for the default call): (loss, gradient of sum(loss * upstream[0])); fused_sparse_token_stats
    of every tail mode: (stats, gradient of sum(a KL + b log q(y) + c H))."""
    out = {}
    for tail in SPARSE_TAILS:
        s = leaf(shard(student, rank, world))
        stats = mk.fused_sparse_token_stats(s, ids, logprobs, target, target_logprobs, tail=tail, mask=mask,
                                            mix_alpha=0.2, with_entropy=True, process_group=dist.group.WORLD,
                                            **options)
        a, b, c = (u.to(stats.reverse_kld.dtype) for u in upstream)
        (a * stats.reverse_kld + b * stats.student_logprob + c * stats.entropy).sum().backward()
        out["token_stats", tail] = (stats._asdict(), s.grad)
    for name, beta, skew in SPARSE_DIVERGENCES:
        for tail in SPARSE_TAILS:
            for reduction in ("none", "mean") if (name, tail) == ("reverse_kl", "bin") else ("none",):
                s = leaf(shard(student, rank, world))
                loss = mk.fused_sparse_divergence(s, ids, logprobs, divergence=name, tail=tail, beta=beta, skew=skew,
                                                  mask=mask, reduction=reduction, process_group=dist.group.WORLD,
                                                  **options)
                (loss * _divergence_upstream(reduction, upstream[0]).to(loss.dtype)).sum().backward()
                out[name, tail, reduction] = (loss.detach(), s.grad)
    return out


def rank_sparse_dtensor(rank, world, *, student, ids, logprobs, target, target_logprobs, mask, upstream, options):
    """The JSD with the uniform tail of DTensor logits placed Shard(-1) (no process_group passed), the errors of a
    rank whose teacher log-probabilities (of the entries, of the sampled tokens) differ from the others', and every
    tail of logits with a NaN."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (world,))
    local = leaf(shard(student, rank, world))
    logits = DTensor.from_local(local, mesh, [Shard(-1)])
    loss = mk.fused_sparse_divergence(logits, ids, logprobs, divergence="jsd", tail="uniform", mask=mask,
                                      reduction="none", **options)
    (loss * upstream[0].to(loss.dtype)).sum().backward()
    out = dict(dtensor=(loss.detach(), local.grad))
    hidden, weight, bias = dtensor_projection(student.shape)
    head = torch.nn.Linear(weight.shape[1], weight.shape[0], dtype=F64)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    head = parallelize_module(head, mesh, ColwiseParallel(use_local_output=False))
    h = leaf(hidden)
    loss = mk.fused_linear_sparse_divergence(h, head.weight, ids, logprobs, student_bias=head.bias, divergence="tvd",
                                             tail="bin", mask=mask, reduction="none", **options)
    (loss * upstream[0].to(loss.dtype)).sum().backward()
    out["linear_dtensor"] = (loss.detach(), (h.grad, head.weight.grad.to_local(), head.bias.grad.to_local()))
    for name, call in (
            ("teacher_logprobs", lambda: mk.fused_sparse_divergence(
                shard(student, rank, world), ids, logprobs - 0.01 * rank, mask=mask, process_group=dist.group.WORLD,
                **options)),
            ("target_teacher_logprobs", lambda: mk.fused_sparse_token_stats(
                shard(student, rank, world), ids, logprobs, target, target_logprobs - 0.01 * rank, mask=mask,
                process_group=dist.group.WORLD, **options))):
        try:
            call()
            out["error", name] = None
        except ValueError as error:
            out["error", name] = str(error)
    with_nan = student.clone()
    outside = [c for c in range(student.shape[-1] // world, student.shape[-1]) if c not in ids[0, 0].tolist()]
    with_nan[0, 0, outside[0]] = math.nan  # (token 0 in rank 1's shard, outside its entries)
    for tail in SPARSE_TAILS:
        s = leaf(shard(with_nan, rank, world))
        loss = mk.fused_sparse_divergence(s, ids, logprobs, tail=tail, mask=mask, reduction="none",
                                          process_group=dist.group.WORLD, **options)
        loss.sum().backward()
        out["nan", tail] = (loss.detach(), s.grad)
    return out


def rank_sparse_linear(rank, world, *, student, ids, logprobs, target, target_logprobs, mask, upstream, options):
    """fused_linear_sparse_divergence of this rank's rows of the lm_head and bias (the hidden states replicated),
    every divergence x tail mode, reduction "none": (loss, (grad h, grad W_r, grad b_r)); and a soft cap's error."""
    hidden, weight, bias = student
    out = {}
    for name, beta, skew in SPARSE_DIVERGENCES:
        for tail in SPARSE_TAILS:
            h, w, b_ = leaf(hidden), leaf(shard(weight, rank, world, 0)), leaf(shard(bias, rank, world, 0))
            loss = mk.fused_linear_sparse_divergence(h, w, ids, logprobs, divergence=name, tail=tail, beta=beta,
                                                     skew=skew, student_bias=b_, mask=mask, reduction="none",
                                                     process_group=dist.group.WORLD, **options)
            (loss * upstream[0].to(loss.dtype)).sum().backward()
            out[name, tail] = (loss.detach(), tuple(map(grad_of, (h, w, b_))))
    try:
        mk.fused_linear_sparse_divergence(hidden, shard(weight, rank, world, 0), ids, logprobs, student_softcap=30.0,
                                          process_group=dist.group.WORLD, **options)
    except NotImplementedError as error:
        out["softcap"] = str(error)
    return out


def dtensor_projection(logits_shape):
    """Hidden states ``[..., 8]``, an lm_head ``[V, 8]`` and bias for logits of ``logits_shape``, float64, the same on
    every rank and in the test (a fixed seed)."""
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(*logits_shape[:-1], HIDDEN, generator=generator, dtype=F64)
    weight = torch.randn(logits_shape[-1], HIDDEN, generator=generator, dtype=F64) * (3 / HIDDEN**0.5)
    return hidden, weight, torch.randn(logits_shape[-1], generator=generator, dtype=F64)


RANK_JOBS.update(sparse=rank_sparse, sparse_dtensor=rank_sparse_dtensor, sparse_linear=rank_sparse_linear)


def sparse_linear_inputs(generator, world, width, vocab_size, k, dtype, *, backend="cpu", chunk_size=3):
    """``sparse_inputs``' teacher and ``linear_inputs``' student projection (hidden states, lm_head, bias)."""
    return {**sparse_inputs(generator, world, width, vocab_size, k, dtype, backend=backend),
            "student": linear_inputs(generator, world, width, vocab_size, dtype)["student"],
            "options": dict(temperature=0.7, vocab_size=vocab_size, backend=backend, chunk_size=chunk_size)}

SPARSE_CASES = {  # name: (world, kind, make inputs)
    "2-cpu-fp64": (2, "sparse", lambda g: sparse_inputs(g, 2, 8, 13, 4, F64)),
    "2-triton-fp32": (2, "sparse", lambda g: sparse_inputs(g, 2, 32, 60, 8, torch.float32, backend="triton")),
    "2-dtensor-cpu-fp64": (2, "sparse_dtensor", lambda g: sparse_inputs(g, 2, 8, 16, 4, F64)),
    "4-reference-fp64-padding-shard": (4, "sparse", lambda g: sparse_inputs(g, 4, 4, 11, 5, F64, backend="reference",
                                                                            temperature=1.3)),
    "4-cpu-fp64-k-equals-v": (4, "sparse", lambda g: sparse_inputs(g, 4, 4, 14, 14, F64)),
    "2-linear-cpu-fp64": (2, "sparse_linear", lambda g: sparse_linear_inputs(g, 2, 8, 13, 4, F64)),
    "4-linear-reference-fp64-padding-shard": (4, "sparse_linear", lambda g: sparse_linear_inputs(
        g, 4, 4, 11, 3, F64, backend="reference")),
}


@pytest.fixture(scope="session")
def sparse_ranks(request):
    return world_results(SPARSE_CASES, request)


def sparse_case_results(sparse_ranks, case):
    world, _, make = SPARSE_CASES[case]
    require_backend(make(torch.Generator().manual_seed(0))["options"]["backend"])
    inputs, per_rank = sparse_ranks(world)
    results = [r[case] for r in per_rank]
    assert_same_on_every_rank([{key: v[0] for key, v in r.items() if isinstance(v, tuple)} for r in results])
    return inputs[case], results


def exact_sparse(inputs, name, tail, beta, skew, reduction):
    """The unsharded float64 loss of ``reference.sparse_divergence`` (the teacher completed explicitly) on the whole
    student logits and the gradient of loss * upstream (autograd)."""
    from minillm_kernels import reference

    student = inputs["student"].detach().double().requires_grad_()
    options, mask = inputs["options"], inputs["mask"].reshape(-1)
    k = inputs["ids"].shape[-1]
    per_token = reference.sparse_divergence(student.reshape(-1, student.shape[-1]), inputs["ids"].reshape(-1, k),
                                            inputs["logprobs"].reshape(-1, k), mask, options["temperature"],
                                            options["vocab_size"], name, tail, beta=beta, skew=skew)
    loss = per_token.view(inputs["mask"].shape) if reduction == "none" else per_token.sum() / mask.sum().clamp(min=1)
    (loss * _divergence_upstream(reduction, inputs["upstream"][0])).sum().backward()
    return loss.detach(), student.grad


@pytest.mark.parametrize("case", [c for c, (_, kind, _) in SPARSE_CASES.items() if kind == "sparse"])
def test_sparse_divergences_of_sharded_logits_match_the_unsharded_oracle(sparse_ranks, case):
    """Every divergence x tail mode of a student sharded over 2 or 4 ranks: the loss on every rank and the ranks'
    gradient slices together equal the unsharded float64 oracle's; with K = V every tail equals the dense divergence
    (``reference.divergence`` of the teacher logits)."""
    inputs, results = sparse_case_results(sparse_ranks, case)
    tol = tolerance(inputs["student"].dtype)
    k, vocab_size = inputs["ids"].shape[-1], inputs["options"]["vocab_size"]
    divergences = {key: value for key, value in results[0].items() if key[0] != "token_stats"}
    for (name, tail, reduction), (loss, _) in divergences.items():
        beta, skew = next((b, s) for n, b, s in SPARSE_DIVERGENCES if n == name)
        exact, grad = exact_sparse(inputs, name, tail, beta, skew, reduction)
        what = f"{name} tail={tail} {reduction}"
        torch.testing.assert_close(loss.double(), exact, **tol, msg=what)
        got = torch.cat([r[name, tail, reduction][1] for r in results], -1).double()
        torch.testing.assert_close(got, grad, **tol, msg=f"{what}: gradient ({len(results)} slices)")
        if k == vocab_size and reduction == "none":
            from minillm_kernels import reference

            mask = inputs["mask"].reshape(-1)
            live = inputs["logprobs"].reshape(-1, k)
            dense_teacher = torch.full((live.shape[0], vocab_size), -math.inf, dtype=F64).scatter(
                1, inputs["ids"].reshape(-1, k), live.double())  # (log p itself: logits at temperature 1)
            student = inputs["student"].double().reshape(-1, inputs["student"].shape[-1])[:, :vocab_size]
            assert bool((live[mask] > -math.inf).all())  # (every kept row has K = V live entries)
            dense = reference.divergence(student, dense_teacher * inputs["options"]["temperature"], mask,
                                         inputs["options"]["temperature"], vocab_size, name, beta=beta, skew=skew)
            torch.testing.assert_close(loss.double().reshape(-1), dense, **tol, msg=f"{what}: the dense divergence")


@pytest.mark.parametrize("case", [c for c, (_, kind, _) in SPARSE_CASES.items() if kind == "sparse"])
def test_sparse_token_stats_of_sharded_logits_match_the_unsharded_oracle(sparse_ranks, case):
    """fused_sparse_token_stats of every tail mode, targets on every shard: the per-token terms on every rank and the
    gradient slices of sum(a KL + b log q(y) + c H) equal those of ``reference.sparse_token_stats`` on the whole
    float64 logits."""
    from minillm_kernels import reference

    inputs, results = sparse_case_results(sparse_ranks, case)
    tol = tolerance(inputs["student"].dtype)
    options, mask = inputs["options"], inputs["mask"].reshape(-1)
    k = inputs["ids"].shape[-1]
    for tail in SPARSE_TAILS:
        student = inputs["student"].detach().double().requires_grad_()
        terms = reference.sparse_token_stats(student.reshape(-1, student.shape[-1]), inputs["ids"].reshape(-1, k),
                                             inputs["logprobs"].reshape(-1, k), inputs["target"].reshape(-1), mask,
                                             options["temperature"], options["vocab_size"], tail)
        sum(u.reshape(-1) * x for u, x in zip(inputs["upstream"], terms)).sum().backward()
        stats = results[0]["token_stats", tail][0]
        for name, exact in zip(("reverse_kld", "student_logprob", "entropy"), terms):
            torch.testing.assert_close(stats[name].double().reshape(-1), exact.detach(), **tol, msg=f"{tail}: {name}")
        teacher_logprob = torch.where(inputs["mask"], inputs["target_logprobs"], 0.0)
        torch.testing.assert_close(stats["teacher_logprob"].double(), teacher_logprob, **tol, msg=f"{tail}: log p(y)")
        got = torch.cat([r["token_stats", tail][1] for r in results], -1).double()
        torch.testing.assert_close(got, student.grad, **tol, msg=f"{tail}: gradient ({len(results)} slices)")


@pytest.mark.parametrize("case", [c for c, (_, kind, _) in SPARSE_CASES.items() if kind == "sparse_linear"])
def test_sparse_divergences_of_a_sharded_lm_head_match_the_unsharded_oracle(sparse_ranks, case):
    """fused_linear_sparse_divergence, every divergence x tail mode, the lm_head's rows over 2 or 4 ranks (a padding
    shard; chunks of 3 tokens): the loss on every rank, grad h on every rank and the ranks' slices of grad W and
    grad b equal the float64 oracle's on the whole projection; a soft cap is refused, naming it."""
    from minillm_kernels import reference

    inputs, results = sparse_case_results(sparse_ranks, case)
    tol = tolerance(F64)
    options, mask = inputs["options"], inputs["mask"].reshape(-1)
    k = inputs["ids"].shape[-1]
    for name, tail in (key for key in results[0] if key != "softcap"):
        beta, skew = next((b, s) for n, b, s in SPARSE_DIVERGENCES if n == name)
        hidden, weight, bias = (x.detach().double().requires_grad_() for x in inputs["student"])
        logits = (hidden @ weight.t() + bias).reshape(-1, weight.shape[0])
        loss = reference.sparse_divergence(logits, inputs["ids"].reshape(-1, k), inputs["logprobs"].reshape(-1, k),
                                           mask, options["temperature"], options["vocab_size"], name, tail,
                                           beta=beta, skew=skew)
        (loss * inputs["upstream"][0].reshape(-1)).sum().backward()
        what = f"{name} tail={tail}"
        torch.testing.assert_close(results[0][name, tail][0].double().reshape(-1), loss.detach(), **tol, msg=what)
        for rank, result in enumerate(results):
            torch.testing.assert_close(result[name, tail][1][0].double(), hidden.grad, **tol,
                                       msg=f"{what}: grad h on rank {rank}")
        for index, exact in ((1, weight.grad), (2, bias.grad)):
            got = torch.cat([r[name, tail][1][index] for r in results], 0).double()
            torch.testing.assert_close(got, exact, **tol, msg=f"{what}: grad {'Wb'[index - 1]} (the ranks' slices)")
    assert all("student_softcap with a vocabulary-sharded lm_head" in r["softcap"] for r in results)


@pytest.mark.parametrize("case", ["2-dtensor-cpu-fp64"])
def test_sparse_divergence_of_dtensor_logits_and_weights_and_a_mismatched_teacher(sparse_ranks, case):
    """DTensor logits placed Shard(-1), and the DTensor weight and bias of a ColwiseParallel lm_head, need no
    process_group (fused_sparse_divergence; fused_linear_sparse_divergence, the TVD with the bin tail, against the
    float64 oracle); a rank whose teacher differs gets a ValueError that names teacher_logprobs, on every rank; a NaN
    logit outside a token's entries makes it NaN where the unsharded call does (bin, uniform; not renormalized, which
    reads the entries only)."""
    inputs, results = sparse_case_results(sparse_ranks, case)
    loss, grad = exact_sparse(inputs, "jsd", "uniform", 0.5, 0.1, "none")
    torch.testing.assert_close(results[0]["dtensor"][0].double(), loss, **tolerance(F64))
    torch.testing.assert_close(torch.cat([r["dtensor"][1] for r in results], -1).double(), grad, **tolerance(F64))
    from minillm_kernels import reference

    hidden, weight, bias = (x.requires_grad_() for x in dtensor_projection(inputs["student"].shape))
    k = inputs["ids"].shape[-1]
    options = inputs["options"]
    loss = reference.sparse_divergence((hidden @ weight.t() + bias).reshape(-1, weight.shape[0]),
                                       inputs["ids"].reshape(-1, k), inputs["logprobs"].reshape(-1, k),
                                       inputs["mask"].reshape(-1), options["temperature"], options["vocab_size"], "tvd",
                                       "bin")
    (loss * inputs["upstream"][0].reshape(-1)).sum().backward()
    torch.testing.assert_close(results[0]["linear_dtensor"][0].reshape(-1), loss.detach(), **tolerance(F64))
    for rank, result in enumerate(results):
        torch.testing.assert_close(result["linear_dtensor"][1][0], hidden.grad, **tolerance(F64), msg=f"rank {rank}")
    for index, exact in ((1, weight.grad), (2, bias.grad)):
        got = torch.cat([r["linear_dtensor"][1][index] for r in results], 0)
        torch.testing.assert_close(got, exact, **tolerance(F64), msg=f"grad {'Wb'[index - 1]}")
    for result in results:  # (a mismatched teacher named on every rank)
        for name in ("teacher_logprobs", "target_teacher_logprobs"):
            assert result["error", name] is not None and result["error", name].startswith(f"{name} differs"), name
    with_nan = inputs["student"].clone()
    outside = [c for c in range(with_nan.shape[-1] // 2, with_nan.shape[-1]) if c not in inputs["ids"][0, 0].tolist()]
    with_nan[0, 0, outside[0]] = math.nan
    for tail in SPARSE_TAILS:  # NaN where the unsharded call has it: "renormalized" does not read the column
        s = leaf(with_nan)
        loss = mk.fused_sparse_divergence(s, inputs["ids"], inputs["logprobs"], tail=tail, mask=inputs["mask"],
                                          reduction="none", **inputs["options"])
        loss.sum().backward()
        torch.testing.assert_close(results[0]["nan", tail][0], loss, equal_nan=True, **tolerance(F64), msg=tail)
        got = torch.cat([r["nan", tail][1] for r in results], -1)
        torch.testing.assert_close(got, s.grad, equal_nan=True, **tolerance(F64), msg=f"{tail}: gradient")
