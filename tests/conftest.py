"""Shared fixtures: fresh random logits each run, backends, devices, the float64 oracle and the error bounds.

The oracle (``exact_token_stats``) is the closed form of SPEC's per-token terms and of their gradient, evaluated in
float64 on the inputs as the kernels see them (already rounded to their dtypes), with no autograd and nothing from
``minillm_kernels``: it checks the reference backend as much as the kernels. The bounds say how far a correct
backend may be from it, derived from the dtypes (see ``per_token_bound`` and ``gradient_bound``).
"""
from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple, Optional

import pytest
import torch

# Without a GPU the Triton kernels run under the interpreter, on CPU tensors. It must be set before
# triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import minillm_kernels as mk  # noqa: E402

KERNEL_BACKENDS = ("cpu", "triton", "cuda")
ALL_BACKENDS = ("reference", *KERNEL_BACKENDS)
FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def require_backend(backend: str) -> None:
    if backend not in mk.available_backends():
        pytest.skip(f"backend {backend!r} is not available here (available: {mk.available_backends()})")


def device_for(backend: str) -> torch.device:
    """Where a backend's tensors live in the tests: CUDA for GPU backends when there is a GPU."""
    on_gpu = backend in ("triton", "cuda") and torch.cuda.is_available()
    return torch.device("cuda" if on_gpu else "cpu")


def accumulation_dtype(*logits_dtypes: torch.dtype) -> torch.dtype:
    """The dtype every backend computes in (the reference, and the CPU, Triton and CUDA kernels alike): float64 if
    any of the logits is float64, else float32. It is also the per-token outputs' dtype."""
    dtype = torch.float32
    for logits_dtype in logits_dtypes:
        dtype = torch.promote_types(dtype, logits_dtype)
    return dtype


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """rtol/atol for results composed from the per-token terms by further floating-point work (the fused-linear
    matmuls, sums over tokens), against float64 on the same rounded inputs (every backend accumulates alike:
    ``accumulation_dtype``).

    float64: 1e-9 / 1e-10, far above the ~1e-15 a float64 computation reaches and far below any float32 error.
    float32: 2e-5, room for float32 matmuls and reductions over ~1e2 terms (about 100 float32 ulps) on top of the
    per-token error (``per_token_bound``). Per-token terms and logit gradients have their own, tighter bounds.
    """
    if accumulation_dtype(dtype) == torch.float64:
        return dict(rtol=1e-9, atol=1e-10)
    return dict(rtol=2e-5, atol=2e-5)


# ---------------------------------------------------------------------------------------------------------------
# Per-token terms.
# ---------------------------------------------------------------------------------------------------------------
PER_TOKEN_RTOL = {torch.float32: 2.5e-7, torch.float64: 1e-12}
NAIVE_FLOAT32_RTOL = 2e-5
PER_TOKEN_FLOOR = 1.0  # nats


def per_token_bound(exact: torch.Tensor, acc_dtype: torch.dtype, *, naive: bool = False,
                    floor: float = PER_TOKEN_FLOOR) -> torch.Tensor:
    """How far a per-token KL, entropy or log-probability may be from the exact value: rtol * max(|exact|, floor), the
    floor 1 nat unless given.

    float32 accumulation, rtol 2.5e-7 (about 2 float32 ulps): each term e_v = exp(k u_v) is computed in float32 from
    exact inputs (a few roundings, relative ~1e-7, independent from term to term) and added into float64 sums, so
    the sums carry no float32 accumulation error; the per-row formulas (KL = k A / Z_s - log Z_s + log Z_t, ...) are
    evaluated in float64 and rounded once to float32 (half an ulp). What remains is the float32 error of the few
    largest terms, ~1e-7 of the result (measured: <= 1e-7 at 4096 x 32000). The floor of 1 nat: the results are
    sums and differences of log Z's (log Z_s >= 0: its largest term is 1) whose float32 errors are absolute, about
    1e-7 nats, so a KL near 0 is held to 2.5e-7 nats, not to a fraction of itself.
    float64 accumulation, rtol 1e-12: the same analysis with u = 2^-53, but the float64 sums have no wider
    accumulator: their error is at most V u relative (1e-13 at V = 1031, 4e-12 at V = 32000, where sqrt(V) u ~ 2e-14
    is what is seen).
    naive (the reference backend, the formulas as a user writes them) with float32 accumulation, rtol 2e-5: float32
    log-softmaxes (each log q_v within a few u of its magnitude, up to ~30 nats) summed over the vocabulary by
    float32 reductions (~log2 V = 10 levels of rounding): about 300 u of the result.
    """
    rtol = NAIVE_FLOAT32_RTOL if naive and acc_dtype == torch.float32 else PER_TOKEN_RTOL[acc_dtype]
    return rtol * exact.abs().clamp(min=floor)


def assert_within(got: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor, name: str) -> None:
    """|got - exact| <= bound elementwise (got on any device and dtype), NaN exactly where exact is NaN."""
    got = got.detach().cpu().double()
    assert got.shape == exact.shape, f"{name}: shape {tuple(got.shape)} != {tuple(exact.shape)}"
    nan = exact.isnan()
    assert torch.equal(got.isnan(), nan), f"{name}: NaN at {got.isnan().nonzero().tolist()}, expected at {nan.nonzero().tolist()}"
    error = torch.where(nan, 0.0, (got - exact).abs())
    excess = error - torch.where(nan, 0.0, bound)
    worst = int(excess.argmax())
    assert excess.max() <= 0, (
        f"{name}: |got - exact| = {error.reshape(-1)[worst].item():.3g} > bound {bound.reshape(-1)[worst].item():.3g} at "
        f"flat index {worst} (got {got.reshape(-1)[worst].item():.10g}, exact {exact.reshape(-1)[worst].item():.10g}); "
        f"{int((excess > 0).sum())} of {excess.numel()} elements out of bounds"
    )


# ---------------------------------------------------------------------------------------------------------------
# Gradients.
# ---------------------------------------------------------------------------------------------------------------
GRADIENT_ROUNDINGS = 16  # kappa below
NAIVE_FLOAT32_ROUNDINGS = round(NAIVE_FLOAT32_RTOL / 2**-24)  # the naive float32 KL's error, in u (~335)


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype``'s numbers at |x| (float64): 2^floor(log2 |x|) * eps, and the subnormal spacing
    tiny * eps below the smallest normal (0 included)."""
    info = torch.finfo(dtype)
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp(min=info.tiny)))) * info.eps


def gradient_bound(got: torch.Tensor, error_scale: GradientErrorScale, acc_dtype: torch.dtype, *,
                   naive: bool = False) -> torch.Tensor:
    """How far a logit gradient ``got`` (in its dtype) may be from the exact float64 gradient on the same inputs:

        |got - exact| <= 1/2 ulp_got(got) + kappa u_acc S_v + tiny_acc k M_v  [+ u_32 |got|]

    - 1/2 ulp of the result's dtype: the one rounding to nearest even of the stored result (taken at |got|,
      whose binade is at least that of the value rounded). A store that truncates errs by up to a whole ulp and fails.
    - kappa u_acc S_v, the accumulation dtype's computation error (u = 2^-24 for float32, 2^-53 for float64). The
      kernels compute g_v = k (q_v B_v + b [v = y]) with B_v = a (log q - log p - KL) - b - c (log q + H) from exact
      inputs. First-order error analysis, each rounding relative u of its operand's magnitude:
        log q_v = k (s_v - c_s) - log Z_s: with k (s_v - c_s) <= 0 <= log Z_s, |k (s - c_s)| + log Z_s = |log q_v|, so
          its three or four roundings (the difference, k's rounding, the product, the subtraction) err <= 4 u |log q_v|;
          likewise log p_v; KL and H carry the per-token error (a few u, relative to max(|.|, 1));
        q_v = exp(log q_v): relative error <= 4 u |log q_v| + 2 u (the exp itself, ~1 ulp);
        B_v: its terms, each with the errors above plus ~5 roundings of the combination, err
          <= ~8 u M_v, M_v = |a| (|log q_v| + |log p_v| + max(|KL|, 1)) + |b| + |c| (|log q_v| + max(|H|, 1));
        g_v: |q_v B_v| (4 |log q_v| + 2) u + q_v 8 u M_v + a few u for the products <= 16 u q_v (1 + |log q_v|) M_v;
          the one-hot column adds u k |b|.
      So S_v = k (q_v (1 + |log q_v|) M_v + |b| [v = y]) and kappa = 16 (GRADIENT_ROUNDINGS); the bound holds for
      float32 upstream gradients a, b, c too (their rounding is one more u of M_v).
    - tiny_acc k M_v: the kernels' exps flush results below the smallest normal to 0 (q_v < 1.2e-38 for float32).
    - u_32 |got| where the accumulation is float64 and the result narrower than float32: the kernels round a float64
      result to bf16 / fp16 through float32, which can move a value on a midpoint by up to 2^-24 relative.
    For bf16 gradients of randn logits the computation term is ~1e-6 relative, against half an ulp of 2^-9..2^-8:
    the bound is set by the rounding, as it should be.
    float64 accumulation: kappa doubles, as the oracle is itself a float64 computation with the same error analysis
    (measured: float64 kernels up to ~7 u S from it, the float64 reference up to ~13; float32 kernels up to 1.5 u S).
    naive (the reference backend) with float32 accumulation: kappa = 335, as its KL and entropy carry up to
    NAIVE_FLOAT32_RTOL (see ``per_token_bound``) into B_v.
    """
    bound = 0.5 * ulp(got.detach().cpu().double(), got.dtype)
    acc = torch.finfo(acc_dtype)
    if acc_dtype == torch.float64:
        kappa = 2 * GRADIENT_ROUNDINGS
    else:
        kappa = NAIVE_FLOAT32_ROUNDINGS if naive else GRADIENT_ROUNDINGS
    bound = bound + kappa * (acc.eps / 2) * error_scale.scale + acc.tiny * error_scale.magnitude
    if acc_dtype == torch.float64 and torch.finfo(got.dtype).bits < 32:
        bound = bound + (torch.finfo(torch.float32).eps / 2) * got.detach().cpu().double().abs()
    return bound


class GradientErrorScale(NamedTuple):
    """Per element of the gradient: S_v and k M_v of ``gradient_bound``."""

    scale: torch.Tensor
    magnitude: torch.Tensor


class Exact(NamedTuple):
    """The oracle's per-token terms (float64, of the logits' leading shape, 0 where masked), the gradient of
    sum(a KL + b log q(y) + c H) with respect to the student logits (float64, the student's shape) and its error
    scale (for ``gradient_bound``)."""

    reverse_kld: torch.Tensor
    student_logprob: torch.Tensor
    teacher_logprob: torch.Tensor
    log_ratio: torch.Tensor
    importance_weight: torch.Tensor
    entropy: torch.Tensor
    grad: torch.Tensor
    grad_error: GradientErrorScale


def exact_token_stats(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: Optional[torch.Tensor],
    upstream: Optional[torch.Tensor] = None,
    *,
    mask: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    vocab_size: Optional[int] = None,
    mix_alpha: float = 0.0,
) -> Exact:
    """SPEC's per-token terms and their gradient, in closed form, in float64 on the CPU.

    With s' = s / T, t' = t / T over the first V = vocab_size columns, log q = log_softmax(s'), log p likewise:
        KL = sum_v q_v (log q_v - log p_v),  H = -sum_v q_v log q_v  (terms with q_v = 0 count 0),
        log q(y), log p(y) (NaN for y outside [0, V)),  r = log p(y) - log q(y),
        w = q(y) / (alpha p(y) + (1 - alpha) q(y))  (exactly 1 at alpha = 0),
        d/ds_v = (1/T) (a q_v (log q_v - log p_v - KL) + b ([v = y] - q_v) - c q_v (log q_v + H))
    with upstream = (a, b, c) (each of the leading shape), and no one-hot [v = y] where y is out of range; without
    upstream, only the per-token terms (grad and grad_error None). Masked rows: every term and the gradient 0.
    Padding columns (past V) of the student: gradient 0.
    """
    lead, width = student.shape[:-1], student.shape[-1]
    vocab = width if vocab_size is None else vocab_size
    s = student.detach().cpu().double().reshape(-1, width)[:, :vocab] / temperature
    t = teacher.detach().cpu().double().reshape(-1, teacher.shape[-1])[:, :vocab] / temperature
    n = s.shape[0]
    # log_softmax centres on the row's largest value first: s - logsumexp(s) would lose log Z to the rounding of
    # logsumexp's result where |s| is large (|s| ~ 3e38: float64's ulp is 4e22, a tie's log 2 gone).
    log_q = s.log_softmax(-1)
    log_p = t.log_softmax(-1)
    q = log_q.exp()
    live = q > 0
    kl = torch.where(live, q * (log_q - log_p), 0.0).sum(-1)
    entropy = -torch.where(live, q * log_q, 0.0).sum(-1)

    if target is None:
        in_range = torch.zeros(n, dtype=torch.bool)
        student_logprob = teacher_logprob = torch.zeros(n, dtype=torch.float64)
        column = torch.zeros(n, dtype=torch.long)
    else:
        y = target.detach().cpu().reshape(-1).long()
        in_range = (y >= 0) & (y < vocab)
        column = torch.where(in_range, y, 0)
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        student_logprob = torch.where(in_range, log_q.gather(-1, column[:, None])[:, 0], nan)
        teacher_logprob = torch.where(in_range, log_p.gather(-1, column[:, None])[:, 0], nan)
    log_ratio = teacher_logprob - student_logprob
    if mix_alpha == 0.0:
        importance_weight = torch.where(log_ratio.isnan(), log_ratio, 1.0)
    else:
        q_y, p_y = student_logprob.exp(), teacher_logprob.exp()
        importance_weight = q_y / (mix_alpha * p_y + (1 - mix_alpha) * q_y)

    if upstream is None:  # the per-token terms only
        per_token = (kl, student_logprob, teacher_logprob, log_ratio, importance_weight, entropy)
        if mask is not None:
            per_token = tuple(torch.where(mask.detach().cpu().reshape(-1), x, 0.0) for x in per_token)
        return Exact(*(x.reshape(lead) for x in per_token), None, None)
    a, b, c = upstream.detach().cpu().double().reshape(3, n)
    if target is None:
        b = torch.zeros_like(b)  # no log q(y): nothing for b to act on
    one_hot = torch.zeros_like(q)
    one_hot[torch.arange(n), column] = in_range.double()
    a_, b_, c_, kl_, h_ = (x[:, None] for x in (a, b, c, kl, entropy))
    k = 1.0 / temperature
    grad = k * (torch.where(live, q * (a_ * (log_q - log_p - kl_) - b_ - c_ * (log_q + h_)), 0.0) + b_ * one_hot)
    magnitude = a_.abs() * (log_q.abs() + log_p.abs() + kl_.abs().clamp(min=1)) + b_.abs() \
        + c_.abs() * (log_q.abs() + h_.abs().clamp(min=1))
    magnitude = torch.where(live, magnitude, 0.0)
    scale = k * (torch.where(live, q * (1 + log_q.abs()), 0.0) * magnitude + b_.abs() * one_hot)

    if mask is not None:
        keep = mask.detach().cpu().reshape(-1)
        kl, student_logprob, teacher_logprob, log_ratio, importance_weight, entropy = (
            torch.where(keep, x, 0.0)
            for x in (kl, student_logprob, teacher_logprob, log_ratio, importance_weight, entropy)
        )
        grad, scale, magnitude = (torch.where(keep[:, None], x, 0.0) for x in (grad, scale, magnitude))
    pad = lambda x: torch.nn.functional.pad(x, (0, width - vocab)).reshape(*lead, width)  # noqa: E731
    per_token = (kl, student_logprob, teacher_logprob, log_ratio, importance_weight, entropy)
    return Exact(*(x.reshape(lead) for x in per_token), pad(grad),
                 GradientErrorScale(pad(scale), pad(k * magnitude)))


def assert_stats_within(stats, exact: Exact, acc_dtype: torch.dtype, *, naive: bool = False) -> None:
    """Every field of a ``TokenStats`` (entropy may be None) against the oracle (``naive``: from the reference
    backend). KL, the log-probabilities and the entropy within ``per_token_bound``; log_ratio within the sum of its two log-probabilities' bounds (plus its own
    rounding); the importance weight w = 1 / (alpha e^r + 1 - alpha) within w times the log-ratio's bound
    (|dw/dr| = w (1 - (1 - alpha) w) <= w) plus its rounding."""
    for name in ("reverse_kld", "student_logprob", "teacher_logprob", "entropy"):
        got = getattr(stats, name)
        if got is not None:
            want = getattr(exact, name)
            assert_within(got, want, per_token_bound(want, acc_dtype, naive=naive), name)
    u = torch.finfo(acc_dtype).eps / 2
    ratio_bound = (per_token_bound(exact.student_logprob, acc_dtype, naive=naive)
                   + per_token_bound(exact.teacher_logprob, acc_dtype, naive=naive) + u * exact.log_ratio.abs())
    assert_within(stats.log_ratio, exact.log_ratio, ratio_bound, "log_ratio")
    weight = exact.importance_weight
    assert_within(stats.importance_weight, weight, weight.abs() * (ratio_bound + 4 * u), "importance_weight")


def naive_gradient_may_overflow(exact: Exact, acc_dtype: torch.dtype, temperature: float = 1.0) -> torch.Tensor:
    """The rows (bool, the logits' leading shape) where the reference backend's gradient may be NaN or inf although
    the exact gradient is finite: what the reference promises at the edge of the accumulation dtype's range.

    The reference is the naive formulas under autograd: its backward forms the gradient's terms before they cancel,
    products of an upstream gradient and a log-probability such as a (log q_v - log p_v) in every column where
    q_v > 0, and a KL, each at most M_v of ``gradient_bound`` (its k M_v times T: they are formed before the
    division by T), then sums of two such. Where 2 max(1, T) k M_v reaches the dtype's largest value (float32:
    3.4e38; e.g. |log p_v| ~ 1.4e38 under a = 2.5, from logits of ~4e37), one of them overflows and the row's
    gradient becomes inf - inf = NaN. So the reference promises its bound where every row stays below that, and in
    the rows this names a gradient that may be NaN or inf, within the bound where it is finite. (The kernels keep
    each column's terms together, k q_v (a (log q_v - log p_v - KL) - ...), and owe the bound in every row.)"""
    largest = torch.finfo(acc_dtype).max
    return 2 * max(1.0, temperature) * exact.grad_error.magnitude.amax(-1) >= largest


def assert_gradient_within(got: torch.Tensor, exact: Exact, acc_dtype: torch.dtype, *, naive: bool = False,
                           temperature: float = 1.0) -> None:
    """``got`` within ``gradient_bound`` of the oracle's gradient; from the reference backend (``naive``), non-finite
    entries are accepted in the rows ``naive_gradient_may_overflow`` names (``temperature``: the call's)."""
    if naive:
        overflow = naive_gradient_may_overflow(exact, acc_dtype, temperature).to(got.device)
        got = torch.where(overflow[..., None] & ~got.isfinite(), exact.grad.to(got.device, got.dtype), got)
    assert_within(got, exact.grad, gradient_bound(got, exact.grad_error, acc_dtype, naive=naive), "gradient")


# ---------------------------------------------------------------------------------------------------------------
# Inputs.
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session", autouse=True)
def kernels_built() -> tuple[str, ...]:
    """The kernels built (or found built) once, in this process, before the first test: a test that starts a
    process of its own (the benchmark, the README, torchrun) then finds them built instead of building them inside
    its time limit, and a limit that kills such a process cannot leave the build's lock file behind, which would
    make every later build in the cache wait forever."""
    return mk.available_backends()


@pytest.fixture(autouse=True)
def fresh_seed() -> int:
    """A new seed per test, printed so that a failure can be replayed (``MINILLM_TEST_SEED=<seed> pytest ...``)."""
    seed = int(os.environ["MINILLM_TEST_SEED"]) if "MINILLM_TEST_SEED" in os.environ else random.randrange(2**31)
    torch.manual_seed(seed)
    print(f"torch seed {seed}")
    return seed


def random_logits(rows: int, width: int, dtype: torch.dtype, device: torch.device, scale: float = 3.0) -> torch.Tensor:
    """Logits ~ N(0, scale^2) in ``dtype``: a peaked but not degenerate softmax."""
    return (torch.randn(rows, width, dtype=torch.float64) * scale).to(dtype).to(device)


def random_mask(rows: int, device: torch.device) -> torch.Tensor:
    """A mask with at least one True and one False."""
    mask = torch.rand(rows) < 0.7
    mask[0], mask[-1] = True, False
    return mask.to(device)


# ---------------------------------------------------------------------------------------------------------------
# Processes.
# ---------------------------------------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parent.parent


def start_processes(fn, args: tuple, nprocs: int, *, join: bool):
    """``torch.multiprocessing.start_processes`` of ``fn(rank, *args)`` on ``nprocs`` processes forked from a server
    that has imported this module and ``fn``'s (torch, minillm_kernels, the test's helpers): each a fresh process as
    torchrun's are (none of pytest's threads, seeds or state), without the seconds a fresh interpreter spends on
    those imports (~4 CPU s a process)."""
    import multiprocessing

    multiprocessing.set_forkserver_preload(["conftest", fn.__module__])
    return torch.multiprocessing.start_processes(fn, args=args, nprocs=nprocs, join=join, start_method="forkserver")


def torchrun(script: Path, *args: str, timeout: float, what: str) -> str:
    """``script`` on 2 gloo CPU processes under torchrun (one thread each, the repository importable): its stdout.
    Fails with the processes' stderr if the run fails, and kills the whole process group (torchrun and its workers)
    after ``timeout`` seconds: a collective that hangs fails. ``what`` names the run in the failure."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               *args]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # its own process group: torchrun and its 2 workers
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"{what} did not finish in {timeout} s", pytrace=False)
    assert process.returncode == 0, stderr[-6000:]
    return stdout


def underflow_slack(student, exact_grad, acc, *, temperature=1.0, vocab_size=None, **_):
    """|d_v| where q_v is below the accumulation dtype's smallest normal number, else 0: there the kernel's q_v is
    subnormal or flushed to 0 and may keep none of its digits, and the column's gradient, proportional to q_v (times
    |log q_v - log p_v - KL| ~ 3e4 at logits ~1e4, which lifts it back above the smallest normal), with them."""
    width = student.shape[-1]
    vocab = vocab_size or width
    log_q = (student.detach().cpu().double().reshape(-1, width)[:, :vocab] / temperature).log_softmax(-1)
    below = torch.nn.functional.pad(log_q < math.log(torch.finfo(acc).tiny), (0, width - vocab))
    d = exact_grad.detach().cpu().double().reshape(-1, width)
    return torch.where(below & d.isfinite(), d.abs(), 0.0).reshape(student.shape)
