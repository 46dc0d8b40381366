"""``python -m benchmarks``: time and peak memory of the reverse-KL variants, side by side.

For every (op, variant, tokens, vocab, dtype) it measures the forward and the forward+backward time (median
of repeats after a warm-up; on the GPU with ``triton.testing.do_bench``, CUDA events) and the peak memory that
one forward+backward adds on top of its inputs: on the CPU as the peak resident set of a fresh process per
case (the high-water mark is reset after the warm-up), on the GPU with ``torch.cuda.max_memory_allocated``.
On the GPU it also gives the fraction of the memory-bandwidth floor: the bytes any implementation must move
(forward: read both logits, 2 N V elements; forward+backward: read both once and write the gradient once,
3 N V elements) over the measured time, against the bandwidth of a large device-to-device copy measured in
the same run. Speed-ups are against the naive loss of the same shape in the same run (for vocab_parallel: against
all-gathering the logits). Before a variant is timed, its value and gradient are checked against the float64
reference on a small input of the case (``variants.disagreement``): one that disagrees is reported as an error and
not timed, and the run exits non-zero.
Results: a markdown table on stdout, and ``table.md``, ``results.csv`` and one PNG plot per (op, dtype) under
``--out``, by default ``out/benchmarks/<device>-<date>/`` (git-ignored: a run is committed on purpose, by copying
its folder to ``benchmarks/results/``, where the README's figures come from). ``--replot DIR`` redraws the plots
of a committed run from its ``results.csv``. The op ``linear_reverse_kld`` starts from hidden states of size
``--hidden`` and lm_head weights instead of logits (its bound is the matmuls' compute, so it gets no bandwidth
fraction). The op ``minillm_step`` is one MiniLLM step's loss, forward and backward through a student, on a rollout
of ``--models`` (``benchmarks/minillm_step.py``): its variants are checked against its naive variant, and it gets
no plot (one shape per model). The op ``vocab_parallel`` is the reverse KL of logits sharded over the vocabulary
across 2 gloo processes, ours against all-gathering the logits (``benchmarks/vocab_parallel.py``), with the bytes
each process receives per step (``received_bytes``). The op ``divergence`` is ``fused_divergence`` against the naive
loss of each ``--divergences`` of the family (one row per divergence, named in the ``divergence`` column; beta and skew
from ``variants.DIVERGENCE_PARAMS``), one plot per (divergence, dtype). The op ``sparse_divergence`` is
``fused_sparse_divergence`` (``tail="bin"``) against a teacher given as its top-``--k`` log-probabilities, beside the
naive PyTorch top-k loss (gather + log_softmax, the tail appended) and the dense ``fused_divergence`` against the
whole teacher, one row per (``--divergences`` of ``variants.SPARSE_DIVERGENCES``, K), with the bytes per token the
teacher side takes (``teacher_bytes_per_token``: K int32 ids and float32 log-probabilities, or V dense logits). The op
``linear_divergence`` is ``fused_linear_divergence`` from hidden states of size ``--hidden`` against the naive loss on
the full logits, TRL 1.16's chunked divergence and Liger-Kernel's chunked JSD loss where installed, one row per
``--divergences`` (default: ``variants.LINEAR_DIVERGENCES``, those TRL computes). The op ``distillation_step`` is one
step of TRL's ``DistillationTrainer`` loss, forward and backward, with TRL's loss (its baseline) and with ours, on a
batch of ``--models`` (``benchmarks/distillation_step.py``), one row per ``--divergences`` of TRL's (default: TRL's
default beta, the reverse KL); both need TRL (the ``trl`` extra).
``--preset regression`` is the check before a release: ours against the compiled naive loss only, at one size
(``DEFAULTS["regression"]``), speed-ups against the compiled loss, about a minute per op on two CPU cores; its folder
is named by the device, the CPU kernel's instruction-set build and the thread count, and is committed under
``benchmarks/results/regression/``.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from benchmarks.variants import LINEAR_DIVERGENCES, SPARSE_DIVERGENCES
from minillm_kernels.reference import DIVERGENCES

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VOCABS = [32000, 128256, 151936, 262144]  # Llama 2, Llama 3, Qwen 2.5, Gemma
DEFAULTS = {  # tokens, vocabs, dtypes, repeats, hidden size (linear_reverse_kld)
    "cpu": dict(tokens=[256, 1024], vocab=VOCABS, dtype=["fp32", "bf16"], repeats=7, hidden=512,
                models=["tiny", "llama-128k"]),
    "cuda": dict(tokens=[4096, 16384], vocab=VOCABS, dtype=["bf16", "fp32"], hidden=4096,  # do_bench: repeats
                 models=["tiny", "llama-128k"]),
    "quick": dict(tokens=[256], vocab=[4099], dtype=["fp32"], repeats=2, hidden=64, models=["llama-4k"], k=[16]),
    "regression": dict(tokens=[2048], vocab=[32000], dtype=["fp32"], repeats=5, hidden=512, models=["llama-4k"],
                       k=[16]),
}
SPARSE_K = [16, 64, 256]  # the sparse op's K (default --k)
REGRESSION_BASELINE = "naive_compile"  # --preset regression: the variant its speed-ups refer to, and the only other one
CPU_WARMUP_MS = 1000.0  # on the CPU, warm-up calls until at least this long (and two calls)
CPU_TIMING_BUDGET_MS = 3000.0  # then timed calls: at least 3, up to --repeats, until this long
ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "out" / "benchmarks"  # the default --out's parent, git-ignored; committed runs live in benchmarks/results
WRONG = "error: disagrees with the float64 reference"  # the status of a variant that computes something else
FIELDS = (
    "op", "divergence", "variant", "tokens", "vocab", "hidden", "dtype", "status", "fwd_ms", "fwd_bwd_ms", "peak_extra_mb",
    "peak_extra_nv", "fwd_bandwidth_frac", "fwd_bwd_bandwidth_frac", "model", "held_nv", "world", "received_bytes",
    "k", "teacher_bytes_per_token",
)
# the variant each op's speed-ups refer to (default: "naive")
BASELINES = {"vocab_parallel": "all_gather", "sparse_divergence": "naive_topk", "distillation_step": "trl"}
STEP_OPS = ("minillm_step", "distillation_step")  # one row per model (its batch sets N and V), no plot


def _proc_status_kb(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def median_ms(fn: Callable[[], None], device: str, repeats: int) -> float:
    """Median wall time of ``fn`` in ms: CUDA events through ``do_bench`` on the GPU, a host clock on the CPU."""
    if device == "cuda":
        import triton

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    times: list[float] = []

    def timed() -> None:
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)

    # Warm up to the steady state of a training loop: the first calls also pay for the kernel's setting up of
    # fresh (huge) pages, 80-160 ms instead of 16-23 ms for a 1024 x 32000 float32 gradient here.
    while len(times) < 2 or (sum(times) < CPU_WARMUP_MS and len(times) < 20):
        timed()
    times.clear()
    while len(times) < min(3, repeats) or (len(times) < repeats and sum(times) < CPU_TIMING_BUDGET_MS):
        timed()
    return statistics.median(times)


def peak_extra_bytes(fn: Callable[[], None], device: str) -> int:
    """The memory one call of ``fn`` adds at its peak over what is held before it: on the GPU from
    ``torch.cuda.max_memory_allocated``, on the CPU from the peak resident set (reset just before the call).

    Python's garbage is collected before the baseline and not during the call: tensors held by reference cycles of
    the warm-up (torch.compile's, autograd's) were otherwise freed by whichever collection happened to run inside the
    call, and their pages hid the call's own (a quick run under load read 0.0 [N, V] for the compiled naive loss)."""
    gc.collect()
    collecting = gc.isenabled()
    gc.disable()
    try:
        if device == "cuda":
            torch.cuda.synchronize()
            baseline = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - baseline
        baseline = _proc_status_kb("VmRSS") * 1024
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak resident set (VmHWM) to the current one
        fn()
        return _proc_status_kb("VmHWM") * 1024 - baseline
    finally:
        if collecting:
            gc.enable()


def copy_bandwidth_gbps(n_bytes: int = 2**31) -> float:
    """GB/s of a device-to-device copy of ``n_bytes``, counting bytes read plus bytes written."""
    source = torch.empty(n_bytes, dtype=torch.uint8, device="cuda")
    dest = torch.empty_like(source)
    ms = median_ms(lambda: dest.copy_(source), "cuda", 0)
    return 2 * n_bytes / (ms * 1e-3) / 1e9


def measure(op: str, variant: str, tokens: int, vocab: int, dtype: str, device: str, repeats: int,
            hidden: int = 0, divergence: str | None = None, k: int | None = None) -> dict:
    """One case, in this process: its status, times in ms, peak extra memory in MB and in [N, V] float32 tensors
    (for ``sparse_divergence`` also the teacher side's bytes per token). The variant is checked against the float64
    reference first; one that disagrees is not timed."""
    from benchmarks.variants import disagreement, inputs, variants

    loss_fn = variants(op, device, divergence, only=variant)[variant]
    dense = variant.startswith("dense_")
    wrong = disagreement(op, loss_fn, vocab, hidden, DTYPES[dtype], device, divergence, k, dense)
    if wrong:
        return dict(status=f"{WRONG}: {wrong}")
    args, leaves = inputs(op, tokens, vocab, hidden, DTYPES[dtype], device, k)

    def forward() -> None:
        with torch.no_grad():
            loss_fn(*args)

    def forward_backward() -> None:
        for x in leaves:
            x.grad = None
        loss_fn(*args).backward()

    forward_backward()  # warm-up: builds, compiles, autotunes
    forward()
    for x in leaves:
        x.grad = None
    peak_extra = peak_extra_bytes(forward_backward, device)
    result = dict(
        status="ok",
        fwd_ms=median_ms(forward, device, repeats),
        fwd_bwd_ms=median_ms(forward_backward, device, repeats),
        peak_extra_mb=peak_extra / 2**20,
        peak_extra_nv=peak_extra / (tokens * vocab * 4),
    )
    if op == "sparse_divergence":  # what the teacher side takes per token: its dense logits, or K ids and log-probs
        teacher, ids, logprobs = args[1:]
        per_row = teacher[0] if dense else (ids[0], logprobs[0])
        result["teacher_bytes_per_token"] = sum(x.numel() * x.element_size() for x in
                                                (per_row if isinstance(per_row, tuple) else (per_row,)))
    return result


def measure_case(case: dict, device: str, repeats: int) -> dict:
    """``measure`` of an op's case, or ``minillm_step.measure_step`` of a ``minillm_step`` case (its ``model``),
    ``distillation_step.measure_distillation_step`` of a ``distillation_step`` one, or
    ``vocab_parallel.measure_vocab_parallel`` of a ``vocab_parallel`` one (CPU)."""
    if case["op"] == "minillm_step":
        from benchmarks.minillm_step import measure_step

        return measure_step(case["model"], case["variant"], device, repeats)
    if case["op"] == "distillation_step":
        from benchmarks.distillation_step import measure_distillation_step

        return measure_distillation_step(case["model"], case["variant"], case["divergence"], device, repeats)
    if case["op"] == "vocab_parallel":
        from benchmarks.vocab_parallel import measure_vocab_parallel

        return measure_vocab_parallel(case["variant"], case["tokens"], case["vocab"], case["dtype"], repeats)
    keys = ("op", "variant", "tokens", "vocab", "dtype")
    return measure(*(case[key] for key in keys), device, repeats, case.get("hidden", 0), case.get("divergence"),
                   case.get("k"))


def run_case(op: str, variant: str, tokens: int, vocab: int, dtype: str, device: str, repeats: int,
             hidden: int = 0, model: str | None = None, divergence: str | None = None, k: int | None = None) -> dict:
    """Measure one case: on the CPU in a fresh process, so that no case's allocations hide another's.
    Running out of memory is a result (status "OOM"), not a crash. A ``minillm_step`` case is its ``model``'s (its
    tokens and vocabulary come from the measurement, as a ``distillation_step`` one's); a ``divergence`` case is its
    ``divergence``'s."""
    case = dict(op=op, variant=variant, tokens=tokens, vocab=vocab, dtype=dtype)
    if op in ("linear_reverse_kld", "linear_divergence"):
        case["hidden"] = hidden
    if op in ("divergence", "sparse_divergence", "linear_divergence"):
        case["divergence"] = divergence
    if op == "sparse_divergence":
        case["k"] = k
    if op == "minillm_step":
        case = dict(op=op, variant=variant, model=model, dtype=dtype)
    if op == "distillation_step":
        case = dict(op=op, variant=variant, model=model, dtype=dtype, divergence=divergence)
    if device == "cuda":
        try:
            return {**case, **measure_case(case, device, repeats)}
        except (torch.cuda.OutOfMemoryError, RuntimeError) as error:  # Triton raises a RuntimeError on OOM
            if "out of memory" not in str(error).lower():
                return {**case, "status": f"error: {type(error).__name__}: {str(error)[:200]}"}
            return {**case, "status": "OOM"}
        finally:
            torch.cuda.empty_cache()
    # A fixed mmap threshold: glibc otherwise raises it after large frees (up to 32 MB) and serves later
    # [N, V] tensors from memory it kept resident, which hides them from the peak resident set.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--worker", json.dumps({**case, "repeats": repeats})],
        capture_output=True, text=True, cwd=ROOT, env=env, check=False,
    )
    if done.returncode != 0:
        killed = done.returncode == -9 or "out of memory" in done.stderr.lower()
        return {**case, "status": "OOM" if killed else "error: " + done.stderr.strip()[-300:]}
    return {**case, **json.loads(done.stdout.splitlines()[-1])}


def read_results(path: Path) -> tuple[str, list[dict]]:
    """The header line (device, versions, date) and the rows of a ``results.csv`` this module wrote, with its
    numbers as numbers (an empty cell is left out of its row)."""
    with open(path, newline="") as f:
        header = f.readline().removeprefix("#").strip()
        rows = [{key: value for key, value in row.items() if value != ""} for row in csv.DictReader(f)]
    for row in rows:
        for key, value in row.items():
            if key in ("tokens", "vocab", "hidden", "world", "received_bytes", "k", "teacher_bytes_per_token"):
                row[key] = int(value)
            elif key not in ("op", "divergence", "variant", "dtype", "status", "model"):
                row[key] = float(value)
    return header, rows


def add_bandwidth_fractions(row: dict, bandwidth_gbps: float) -> dict:
    """The floor's bytes over the measured time, as a fraction of the copy bandwidth."""
    element_bytes = torch.empty((), dtype=DTYPES[row["dtype"]]).element_size()
    elements = row["tokens"] * row["vocab"]
    for key, n_tensors in (("fwd", 2), ("fwd_bwd", 3)):
        floor_bytes = n_tensors * elements * element_bytes
        row[f"{key}_bandwidth_frac"] = floor_bytes / (row[f"{key}_ms"] * 1e-3) / 1e9 / bandwidth_gbps
    return row


def gpu_backend_choice(rows: list[dict], header: str) -> dict | None:
    """The measured choice between the GPU kernels, in the format of ``minillm_kernels/gpu_backend_choice.json``
    (see ``backends.load_gpu_backend_choice``): per dtype and vocabulary size, the backend of "triton" and "cuda"
    with the smaller forward+backward time of ``fused_reverse_kld`` summed over the token counts; a rule starts at
    each measured vocabulary where the choice changes. None unless both were measured."""
    times: dict[tuple[str, int], dict[str, float]] = {}
    for r in rows:
        if r["op"] == "reverse_kld" and r["variant"] in ("triton", "cuda") and r["status"] == "ok":
            cell = times.setdefault((r["dtype"], r["vocab"]), {})
            cell[r["variant"]] = cell.get(r["variant"], 0.0) + r["fwd_bwd_ms"]
    rules = []
    for dtype in sorted({d for d, _ in times}):
        previous = None
        for vocab in sorted(v for d, v in times if d == dtype):
            cell = times[(dtype, vocab)]
            if len(cell) < 2:
                continue
            faster = min(cell, key=cell.get)
            if faster != previous:
                rules.append(dict(dtype=str(DTYPES[dtype]).removeprefix("torch."), min_vocab=0 if previous is None else vocab,
                                  backend=faster, measured_at_vocab=vocab, triton_ms=cell["triton"], cuda_ms=cell["cuda"]))
                previous = faster
    return dict(device=header, rules=rules) if rules else None


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"model name\s*:\s*(.*)", cpuinfo)
    family = re.search(r"cpu family\s*:\s*(\d+)", cpuinfo)
    flags = re.search(r"flags\s*:\s*(.*)", cpuinfo)
    details = [f"family {family.group(1)}"] if family else []
    details += ["AVX-512"] if flags and "avx512f" in flags.group(1).split() else []
    name = model.group(1).strip() if model else platform.processor()
    if details:
        name += f" ({', '.join(details)})"
    from minillm_kernels._build import host_isa_level

    return f"{name}, {torch.get_num_threads()} threads, {host_isa_level()} build of the CPU kernel"


def default_results_dir(device: str, date: str, preset: str | None = None) -> Path:
    """``out/benchmarks/<device>-<model>-<date>``, the device named by its model, e.g.
    ``cuda-nvidia-h100-80gb-hbm3`` or ``cpu-amd-epyc``; for a preset ``out/benchmarks/<preset>/<device>-<model>[-<CPU
    build>-<threads>t]-<date>``, e.g. ``regression/cpu-amd-epyc-family-25-x86-64-v3-2t-2026-12-07``."""
    model = re.sub(r"\(.*?\)", "", device_name(device)).split(",")[0]  # "AMD EPYC (family 26, ...), 2 threads"
    model = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")
    if preset is None:
        return OUT / f"{device}-{model}-{date}"
    if device == "cpu":
        from minillm_kernels._build import host_isa_level

        family = re.search(r"family (\d+)", device_name(device))
        model += (f"-family-{family.group(1)}" if family else "") + f"-{host_isa_level()}-{torch.get_num_threads()}t"
    return OUT / preset / f"{device}-{model}-{date}"


def versions() -> str:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return f"torch {torch.__version__}, triton {triton_version}, Python {platform.python_version()}; {source_commit()}"


def source_commit() -> str:
    """The commit the figures were measured on, ``commit <sha>`` (``+ uncommitted changes`` where the tree differs
    from it), or ``commit unknown`` outside a git checkout."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    sha = git("rev-parse", "--short=12", "HEAD")
    if not sha:
        return "commit unknown"
    return f"commit {sha}" + (" + uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def markdown_table(rows: list[dict], baseline_variant: str | None = None) -> str:
    """One line per case, with the forward+backward speed-up and memory against the baseline of its shape (the naive
    loss; for ``vocab_parallel``, all-gathering the logits: ``BASELINES``; ``baseline_variant`` for every op if given);
    for ``minillm_step`` rows (named by their model) also what the rollout holds (``held_nv``), for ``vocab_parallel``
    rows what each process receives."""
    def baseline_of(op: str) -> str:
        return baseline_variant or BASELINES.get(op, "naive")

    baseline = {
        (r["op"], r.get("divergence"), r.get("k"), r.get("tokens"), r.get("vocab"), r["dtype"]): r
        for r in rows if r["variant"] == baseline_of(r["op"]) and r["status"] == "ok"
    }
    against = " / ".join(dict.fromkeys(baseline_of(r["op"]) for r in rows)) or "naive"
    gpu = any("fwd_bwd_bandwidth_frac" in r for r in rows)
    held = any("held_nv" in r for r in rows)
    received = any("received_bytes" in r for r in rows)
    teacher_bytes = any("teacher_bytes_per_token" in r for r in rows)
    header = (f"| op | tokens | vocab | dtype | variant | fwd ms | fwd+bwd ms | fwd+bwd speed-up vs {against} | "
              "peak extra MB | extra [N,V] fp32 |")
    rule = "|---|---:|---:|---|---|---:|---:|---:|---:|---:|"
    if held:
        header += " held by the rollout [N,V] fp32 |"
        rule += "---:|"
    if received:
        header += " received per process per step | bytes per token |"
        rule += "---:|---:|"
    if teacher_bytes:
        header += " teacher bytes per token |"
        rule += "---:|"
    if gpu:
        header += " fwd % of bandwidth floor | fwd+bwd % of floor |"
        rule += "---:|---:|"
    lines = [header, rule]
    for r in rows:
        head = f"| {_row_label(r)} | {r.get('tokens', '-')} | {r.get('vocab', '-')} | {r['dtype']} | {r['variant']} |"
        if r["status"] != "ok":
            lines.append(f"{head} {r['status']} |" + " |" * (4 + 2 * gpu + held + 2 * received + teacher_bytes))
            continue
        base = baseline.get((r["op"], r.get("divergence"), r.get("k"), r["tokens"], r["vocab"], r["dtype"]))
        speedup = f"{base['fwd_bwd_ms'] / r['fwd_bwd_ms']:.2f}x" if base else "-"
        line = (
            f"{head} {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | {speedup} | {r['peak_extra_mb']:.0f} | "
            f"{r['peak_extra_nv']:.2f} |"
        )
        if held:
            line += f" {r['held_nv']:.2f} |" if "held_nv" in r else " - |"
        if received:
            line += (f" {_bytes(r['received_bytes'])} | {r['received_bytes'] / r['tokens']:,.1f} |"
                     if "received_bytes" in r else " - | - |")
        if teacher_bytes:
            line += f" {r['teacher_bytes_per_token']:,} |" if "teacher_bytes_per_token" in r else " - |"
        if gpu and "fwd_bandwidth_frac" in r:
            line += f" {100 * r['fwd_bandwidth_frac']:.0f}% | {100 * r['fwd_bwd_bandwidth_frac']:.0f}% |"
        elif gpu:
            line += " - | - |"
        lines.append(line)
    return "\n".join(lines)


def _row_label(row: dict) -> str:
    """The op column of a table row: the op and what sets its case apart (model, divergence, H, K, processes)."""
    details = [row.get("model"), row.get("divergence"), row.get("hidden") and f"H={row['hidden']}",
               row.get("k") and f"K={row['k']}", row.get("world") and f"{row['world']} processes"]
    if row.get("model"):
        details[2] = None  # (the model sets H)
    details = [d for d in details if d]
    return row["op"] + (f" ({', '.join(details)})" if details else "")


def _bytes(count: float) -> str:
    """1.2 GB, 33 KB, 56 B."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if count >= size:
            return f"{count / size:.3g} {unit}"
    return f"{count:.0f} B"


def _progress(items: list, device: str):
    """A tqdm bar over the cases where tqdm is installed, plain lines otherwise."""
    try:
        from tqdm import tqdm

        return tqdm(items, desc=f"benchmark ({device})", unit="case", file=sys.stderr)
    except ImportError:
        return items


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test (the test suite runs it)")
    parser.add_argument("--preset", choices=("regression",),
                        help="regression: ours against the compiled naive loss only, at one size (2048 x 32000 fp32), "
                        "speed-ups against it; about a minute per op")
    parser.add_argument("--op", nargs="+", choices=("reverse_kld", "token_stats", "linear_reverse_kld", "divergence",
                                                    "sparse_divergence", "linear_divergence", "minillm_step",
                                                    "distillation_step", "vocab_parallel"),
                        default=["reverse_kld"])
    parser.add_argument("--divergences", nargs="+", choices=DIVERGENCES,
                        help="the divergence op's divergences, one row each (default: all), the sparse_divergence "
                             f"op's (of {SPARSE_DIVERGENCES}; default: both), the linear_divergence op's (default: "
                             f"{LINEAR_DIVERGENCES}) and the distillation_step op's (of those; default: reverse_kl)")
    parser.add_argument("--k", type=int, nargs="+", help=f"the sparse_divergence op's K (default: {SPARSE_K})")
    parser.add_argument("--hidden", type=int, help="hidden size H of linear_reverse_kld's inputs (default: per device)")
    parser.add_argument("--models", nargs="+", choices=("tiny", "llama-128k", "llama-32k", "llama-8k", "llama-4k"),
                        help="the models of minillm_step and distillation_step, each op taking those of its MODELS "
                             "(default: tiny and llama-128k; --quick: llama-4k)")
    parser.add_argument("--tokens", type=int, nargs="+", help="token counts N (default: per device)")
    parser.add_argument("--vocab", type=int, nargs="+", help=f"vocabulary sizes V (default: {VOCABS})")
    parser.add_argument("--dtype", choices=tuple(DTYPES), nargs="+", help="logits dtypes (default: per device)")
    parser.add_argument("--variants", nargs="+", help="a subset of the variants (default: all that run here); each "
                        "must run for at least one of the ops (and divergences)")
    parser.add_argument("--repeats", type=int, help="timed repeats per case on the CPU (default: per device)")
    parser.add_argument("--out", type=Path, help="results folder (default: out/benchmarks/<device>-<model>-<date>, "
                        "git-ignored; copy a run to benchmarks/results/ to commit it)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--replot", type=Path, nargs="+", metavar="DIR",
                        help="measure nothing: redraw the plots of each DIR from its results.csv, into DIR")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # one CPU case in a fresh process: JSON in, JSON out
    args = parser.parse_args(argv)
    if args.quick and args.preset:
        parser.error("--quick and --preset are exclusive")
    if args.preset:
        args.no_plots = True  # one size: nothing to draw
    for key, value in DEFAULTS["quick" if args.quick else args.preset or args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.k is None:
        args.k = SPARSE_K
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.replot:
        from benchmarks.plots import plot_results

        for folder in args.replot:
            header, rows = read_results(folder / "results.csv")
            for path in plot_results(rows, header, folder):
                print(f"plot: {path}", file=sys.stderr)
        return
    if args.worker:
        case = json.loads(args.worker)
        print(json.dumps(measure_case(case, "cpu", case["repeats"])))
        return

    from benchmarks import distillation_step, minillm_step
    from benchmarks.variants import variants
    from benchmarks.vocab_parallel import VARIANTS as PARALLEL_VARIANTS

    if "vocab_parallel" in args.op and args.device != "cpu":
        raise SystemExit("--op vocab_parallel runs on the CPU (gloo processes)")
    if "distillation_step" in args.op and not distillation_step.trl_available():
        raise SystemExit("--op distillation_step needs TRL, in the version minillm_kernels.integrations.trl is tested "
                         "with: pip install 'minillm-kernels[trl]'")
    cases = []  # (op, variant, tokens, vocab, dtype, model, divergence, k)
    runnable: set[str] = set()  # every variant of every selection: --variants may name one that runs for some only
    divergences = {"divergence": args.divergences or list(DIVERGENCES),
                   "sparse_divergence": args.divergences or list(SPARSE_DIVERGENCES),
                   "linear_divergence": args.divergences or list(LINEAR_DIVERGENCES),
                   "distillation_step": args.divergences or ["reverse_kl"]}
    step_modules = {"minillm_step": minillm_step, "distillation_step": distillation_step}
    for op, divergence in [(op, d) for op in args.op for d in divergences.get(op, [None])]:
        special = {"minillm_step": minillm_step.VARIANTS, "distillation_step": distillation_step.VARIANTS,
                   "vocab_parallel": PARALLEL_VARIANTS}
        if op == "distillation_step" and divergence not in distillation_step.BETAS:
            raise SystemExit(f"--op distillation_step takes the divergences TRL computes, "
                             f"{tuple(distillation_step.BETAS)}, got {divergence!r}")
        available = list(special[op] if op in special else variants(op, args.device, divergence))
        runnable.update(available)
        names = [v for v in available if not args.variants or v in args.variants]
        if args.preset == "regression":  # the compiled naive loss and ours
            names = [v for v in names if v == REGRESSION_BASELINE or v in ("cpu", "triton", "cuda")]
        if op in STEP_OPS:  # float32, at each model's own batch size
            models = [model for model in args.models if model in step_modules[op].MODELS]
            if not models:
                raise SystemExit(f"--op {op} takes the models {tuple(step_modules[op].MODELS)}, got {args.models}")
            cases += [(op, v, None, None, "fp32", model, divergence, None) for model in models for v in names]
        else:
            shapes = [(n, V, d) for d in args.dtype for V in args.vocab for n in args.tokens]
            ks = args.k if op == "sparse_divergence" else [None]
            cases += [(op, v, n, V, d, None, divergence, k) for n, V, d in shapes for k in ks for v in names]
    unknown = set(args.variants or ()) - runnable
    if unknown:
        raise SystemExit(f"variants {sorted(unknown)} do not run here; available: {sorted(runnable)}")
    bandwidth = copy_bandwidth_gbps() if args.device == "cuda" else None
    today = datetime.date.today().isoformat()
    header = f"Device: {device_name(args.device)}; {versions()}; {today}"
    if bandwidth:
        header += f"; device-to-device copy bandwidth {bandwidth:.0f} GB/s (read + write)"
    out = args.out or default_results_dir(args.device, today, args.preset)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with open(out / "results.csv", "w", newline="") as f:  # row by row: a run cut short keeps what it measured
        f.write(f"# {header}\n")
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        for op, variant, tokens, vocab, dtype, model, divergence, k in (bar := _progress(cases, args.device)):
            if hasattr(bar, "set_postfix_str"):
                shape = model or f"N={tokens} V={vocab}" + (f" K={k}" if k else "")
                bar.set_postfix_str(f"{op} {divergence + ' ' if divergence else ''}{variant} {shape} {dtype}")
            row = run_case(op, variant, tokens, vocab, dtype, args.device, args.repeats, args.hidden, model, divergence,
                           k)
            with_floor = bandwidth and row["status"] == "ok" and op in ("reverse_kld", "token_stats")
            rows.append(add_bandwidth_fractions(row, bandwidth) if with_floor else row)
            writer.writerow(rows[-1])
            f.flush()
    table = markdown_table(rows, REGRESSION_BASELINE if args.preset == "regression" else None)
    print(f"{header}\n\n{table}")
    (out / "table.md").write_text(f"{header}\n\n{table}\n")
    choice = gpu_backend_choice(rows, header)
    if choice:  # to be committed as minillm_kernels/gpu_backend_choice.json, which backend="auto" reads
        (out / "gpu_backend_choice.json").write_text(json.dumps(choice, indent=1) + "\n")
    if not args.no_plots:
        from benchmarks.plots import plot_results

        for path in plot_results([r for r in rows if r["op"] not in STEP_OPS], header, out):
            print(f"plot: {path}", file=sys.stderr)
    print(f"\nwritten to {out}", file=sys.stderr)
    wrong = [f"{r['op']} {r['divergence'] + ' ' if r.get('divergence') else ''}{r['variant']} N={r.get('tokens')} V={r.get('vocab')} {r['dtype']}" for r in rows
             if r["status"].startswith(WRONG)]
    if wrong:
        raise SystemExit(f"{len(wrong)} variant(s) disagree with their reference (the float64 one; minillm_step's "
                         f"naive variant; distillation_step's trl), not timed: {'; '.join(wrong)}")


if __name__ == "__main__":
    main()
