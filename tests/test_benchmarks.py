"""The benchmark never rots: a --quick run writes a table, a CSV and plots with every variant and sane numbers;
a variant that computes something else is reported and not timed; results go to a git-ignored folder by default;
the plots show every variant with plain-number ticks."""
from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import plots, run
from benchmarks import variants as variants_module
from benchmarks.run import WRONG, add_bandwidth_fractions, markdown_table, measure, read_results
from benchmarks.variants import LINEAR_DIVERGENCES, OPS, SPARSE_DIVERGENCES, disagreement, variants
from minillm_kernels.reference import DIVERGENCES

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "benchmarks" / "results" / "cpu-amd-epyc-2026-11-26"


def test_quick_run_measures_every_variant(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user runs it
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--device", "cpu", "--quick", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "results.csv") as f:
        header = f.readline()
        rows = list(csv.DictReader(f))
    assert header.startswith("# Device: ") and "torch " in header
    expected = set(variants("reverse_kld", "cpu"))
    assert {"naive", "naive_compile", "cpu"} <= expected
    assert {r["variant"] for r in rows} == expected
    by_variant = {r["variant"]: r for r in rows}
    for row in rows:
        assert row["status"] == "ok", row
        for key in ("fwd_ms", "fwd_bwd_ms"):
            assert 0 < float(row[key]) < 60_000 and math.isfinite(float(row[key])), row
    # The naive loss keeps several [N, V] float32 tensors; the fused kernel only the gradient (1 [N, V]).
    assert float(by_variant["naive"]["peak_extra_nv"]) > 2.5
    assert 0.5 < float(by_variant["cpu"]["peak_extra_nv"]) < 1.5
    assert "| naive |" in done.stdout and "| cpu |" in done.stdout
    assert (tmp_path / "table.md").read_text().startswith("Device: ")
    assert (tmp_path / "plot-reverse_kld-fp32.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_divergence_run_gives_each_divergence_its_rows_and_baseline(tmp_path):
    """--op divergence: one row per (divergence, variant), each checked and timed, speed-ups against the naive loss
    of the same divergence, a plot per divergence; two divergences here (a mixture, the TVD) and no compiled naive
    loss (--variants: its compile takes most of a quick run), to keep it quick: every divergence's variants are
    checked by test_every_variant_agrees_with_the_reference, a compiled one timed by
    test_quick_run_measures_every_variant."""
    assert {"naive", "naive_compile", "cpu"} <= set(variants("divergence", "cpu", "jsd"))
    names = ("naive", "cpu")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--device", "cpu", "--quick", "--op", "divergence",
         "--divergences", "jsd", "tvd", "--variants", *names, "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    _, rows = read_results(tmp_path / "results.csv")
    assert {(r["divergence"], r["variant"]) for r in rows} == {(d, v) for d in ("jsd", "tvd") for v in names}
    for row in rows:
        assert row["op"] == "divergence" and row["status"] == "ok", row
        assert 0 < row["fwd_bwd_ms"] < 60_000, row
    by_case = {(r["divergence"], r["variant"]): r for r in rows}
    for divergence in ("jsd", "tvd"):  # the naive loss keeps several [N, V] tensors, ours at most the gradient
        assert by_case[(divergence, "naive")]["peak_extra_nv"] > 2.5  # (a 4 MB gradient reads 0.5-1.0 here: pages)
        assert by_case[(divergence, "cpu")]["peak_extra_nv"] < 1.5
    table = (tmp_path / "table.md").read_text()
    assert "| divergence (jsd) | 256 | 4099 | fp32 | naive |" in table and "| divergence (tvd) | 256 | 4099 | fp32 | cpu |" in table
    assert table.count("| 1.00x |") == 2  # each divergence's naive row is its own baseline
    assert (tmp_path / "plot-divergence-jsd-fp32.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bandwidth_fraction_and_table():
    row = dict(op="reverse_kld", variant="naive", tokens=1000, vocab=1000, dtype="bf16", status="ok",
               fwd_ms=1.0, fwd_bwd_ms=2.0, peak_extra_mb=20.0, peak_extra_nv=5.0)
    add_bandwidth_fractions(row, bandwidth_gbps=10.0)
    # forward: 2 tensors x 1e6 bf16 elements = 4 MB in 1 ms = 4 GB/s of 10; forward+backward: 6 MB in 2 ms.
    assert row["fwd_bandwidth_frac"] == pytest.approx(0.4)
    assert row["fwd_bwd_bandwidth_frac"] == pytest.approx(0.3)
    fast = dict(row, variant="triton", fwd_bwd_ms=0.5)
    oom = dict(op="reverse_kld", variant="liger", tokens=1000, vocab=1000, dtype="bf16", status="OOM")
    table = markdown_table([row, fast, oom]).splitlines()
    assert "| 4.00x |" in table[3] and "| 40% | 30% |" in table[2]
    assert "OOM" in table[4] and table[4].count("|") == table[0].count("|")


def test_gpu_backend_choice_is_read_back_by_the_dispatcher(tmp_path):
    from benchmarks.run import gpu_backend_choice
    from minillm_kernels import backends

    def row(variant, vocab, ms, dtype="bf16", tokens=4096):
        return dict(op="reverse_kld", variant=variant, tokens=tokens, vocab=vocab, dtype=dtype, status="ok", fwd_bwd_ms=ms)

    rows = [
        row("triton", 32000, 1.0), row("cuda", 32000, 2.0),
        row("triton", 128256, 3.0), row("cuda", 128256, 2.0), row("triton", 128256, 3.0, tokens=16384),
        row("cuda", 128256, 5.0, tokens=16384),  # summed over token counts: triton 6.0 < cuda 7.0
        row("triton", 262144, 9.0), row("cuda", 262144, 4.0),
        row("triton", 32000, 1.0, dtype="fp32"), row("cuda", 32000, 0.5, dtype="fp32"),
        row("naive", 32000, 9.0),
    ]
    choice = gpu_backend_choice(rows, "Device: test")
    path = tmp_path / "choice.json"
    path.write_text(json.dumps(choice))
    import torch

    rules = backends.load_gpu_backend_choice(path)
    assert rules == {torch.bfloat16: ((0, "triton"), (262144, "cuda")), torch.float32: ((0, "cuda"),)}
    assert gpu_backend_choice([row("triton", 32000, 1.0)], "Device: test") is None


# Planted bugs: a benchmark variant that computes another loss must not get a timing.
def divergence_of_the_student_from_itself(naive):
    """D(q, q) = 0, with a zero gradient."""
    return lambda student, teacher, target: naive(student, student, target)


def doubled_gradient(naive):
    """The right value, twice the gradient."""
    def loss(student, teacher, target):
        value = naive(student, teacher, target)
        return value + (value - value.detach())

    return loss


@pytest.mark.parametrize("op, divergence", [("reverse_kld", None), ("divergence", "jsd"), ("divergence", "tvd")])
@pytest.mark.parametrize("bug", [divergence_of_the_student_from_itself, doubled_gradient])
def test_a_wrong_variant_is_reported_and_not_timed(monkeypatch, bug, op, divergence):
    table, key = (variants_module.NAIVE_DIVERGENCE, divergence) if divergence else (variants_module.NAIVE, op)
    monkeypatch.setitem(table, key, bug(table[key]))
    compiled_losses = variants_module.compiled.cache_info().currsize
    row = measure(op, "naive", 64, 1000, "fp32", "cpu", repeats=1, divergence=divergence)
    assert row["status"].startswith(WRONG), row
    assert "fwd_ms" not in row and "peak_extra_mb" not in row
    # No compiled loss was built (and cached) from the planted one: a later naive_compile would have measured it.
    assert variants_module.compiled.cache_info().currsize == compiled_losses


def test_a_wrong_variant_fails_the_run_and_shows_in_the_table(monkeypatch, tmp_path, capsys):
    def run_case(op, variant, tokens, vocab, dtype, device, repeats, hidden=0, model=None, divergence=None, k=None):
        case = dict(op=op, variant=variant, tokens=tokens, vocab=vocab, dtype=dtype)
        if variant == "naive":
            return {**case, "status": f"{WRONG}: loss 0, float64 reference 8.1"}
        return {**case, "status": "ok", "fwd_ms": 1.0, "fwd_bwd_ms": 2.0, "peak_extra_mb": 1.0, "peak_extra_nv": 1.0}

    monkeypatch.setattr(run, "run_case", run_case)
    with pytest.raises(SystemExit, match="1 variant.* disagree"):
        run.main(["--device", "cpu", "--quick", "--no-plots", "--out", str(tmp_path)])
    assert f"| naive | {WRONG}: loss 0" in (tmp_path / "table.md").read_text()
    assert read_results(tmp_path / "results.csv")[1][0]["status"].startswith(WRONG)


def test_the_regression_preset_runs_ours_against_the_compiled_loss_at_one_size(monkeypatch, tmp_path):
    """--preset regression: 2048 x 32000 fp32, only the compiled naive loss and our kernels, speed-ups against the
    compiled loss; its default folder names the CPU kernel's build and the threads (the committed results' name)."""
    cases = []

    def run_case(op, variant, tokens, vocab, dtype, device, repeats, hidden=0, model=None, divergence=None, k=None):
        cases.append((op, variant, tokens, vocab, dtype, divergence))
        times = {"naive_compile": (3.0, 9.0), "cpu": (1.0, 3.0)}[variant]
        return dict(op=op, variant=variant, tokens=tokens, vocab=vocab, dtype=dtype, divergence=divergence,
                    status="ok", fwd_ms=times[0], fwd_bwd_ms=times[1], peak_extra_mb=1.0, peak_extra_nv=1.0)

    monkeypatch.setattr(run, "run_case", run_case)
    run.main(["--device", "cpu", "--preset", "regression", "--op", "reverse_kld", "divergence", "--divergences", "jsd",
              "--out", str(tmp_path)])
    assert cases == [("reverse_kld", v, 2048, 32000, "fp32", None) for v in ("naive_compile", "cpu")] + \
        [("divergence", v, 2048, 32000, "fp32", "jsd") for v in ("naive_compile", "cpu")]
    table = (tmp_path / "table.md").read_text()
    assert "speed-up vs naive_compile" in table and table.count("| 3.00x |") == 2 and "build of the CPU kernel" in table
    assert re.search(r"; commit [0-9a-f]{12}( \+ uncommitted changes)?;", table), table.splitlines()[0]  # its source
    assert not list(tmp_path.glob("*.png"))
    from minillm_kernels._build import host_isa_level

    folder = run.default_results_dir("cpu", "2026-12-07", "regression")
    assert folder.parent == ROOT / "out" / "benchmarks" / "regression"
    assert folder.name.startswith("cpu-") and f"-{host_isa_level()}-{torch.get_num_threads()}t-" in folder.name


@pytest.mark.parametrize("op, divergence", [(op, None) for op in OPS
                                            if op not in ("divergence", "sparse_divergence", "linear_divergence")]
                         + [("divergence", d) for d in DIVERGENCES]
                         + [("sparse_divergence", d) for d in SPARSE_DIVERGENCES]
                         + [("linear_divergence", d) for d in (*LINEAR_DIVERGENCES, "tvd")])
def test_every_variant_agrees_with_the_reference(op, divergence):
    for name, loss in variants(op, "cpu", divergence).items():
        assert disagreement(op, loss, 4099, 64, torch.float32, "cpu", divergence, k=16,
                            dense=name.startswith("dense_")) is None, name


def test_quick_sparse_run_gives_each_divergence_and_k_its_rows_baseline_and_teacher_bytes(tmp_path):
    """--op sparse_divergence: one row per (divergence, K, variant), each checked and timed, speed-ups against the naive
    top-k loss of the same divergence and K, the teacher side's bytes per token (K int32 ids and float32
    log-probabilities against the V float32 logits of the dense baseline), a plot per (divergence, K). Without the
    compiled naive loss (--variants: its compile takes most of a quick run; test_every_variant_agrees_with_the_reference
    checks it, the other ops' quick runs time a compiled variant)."""
    assert {"naive_topk", "naive_topk_compile", "cpu", "dense_cpu"} <= set(variants("sparse_divergence", "cpu",
                                                                                  "reverse_kl"))
    names = ("naive_topk", "cpu", "dense_cpu")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--device", "cpu", "--quick", "--op", "sparse_divergence",
         "--divergences", "reverse_kl", "--k", "8", "32", "--variants", *names, "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    _, rows = read_results(tmp_path / "results.csv")
    assert {(r["k"], r["variant"]) for r in rows} == {(k, v) for k in (8, 32) for v in names}
    for row in rows:
        assert row["op"] == "sparse_divergence" and row["divergence"] == "reverse_kl" and row["status"] == "ok", row
        assert 0 < row["fwd_bwd_ms"] < 60_000, row
        dense = row["variant"].startswith("dense_")
        assert row["teacher_bytes_per_token"] == (4 * 4099 if dense else 8 * row["k"]), row
    by_case = {(r["k"], r["variant"]): r for r in rows}
    assert by_case[(8, "naive_topk")]["peak_extra_nv"] > 1.5  # (a float32 log_softmax over [N, V] and its gradient)
    assert by_case[(8, "cpu")]["peak_extra_nv"] < 1.5  # (the gradient alone)
    table = (tmp_path / "table.md").read_text()
    assert "| sparse_divergence (reverse_kl, K=32) | 256 | 4099 | fp32 | cpu |" in table
    assert table.count("| 1.00x |") == 2  # each K's naive top-k row is its own baseline
    assert (tmp_path / "plot-sparse_divergence-reverse_kl-k8-fp32.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_results_go_to_a_git_ignored_folder_by_default():
    """Under out/, which .gitignore lists (read from the file: the test needs no git checkout)."""
    folder = run.default_results_dir("cpu", "2026-12-01")
    assert folder.is_relative_to(ROOT / "out") and folder.name.startswith("cpu-") and folder.name.endswith("-2026-12-01")
    ignored = {line.strip().strip("/") for line in (ROOT / ".gitignore").read_text().splitlines()}
    assert "out" in ignored, ".gitignore must list out/, where the benchmark writes by default"


def test_plots_show_every_variant_with_plain_ticks(monkeypatch, tmp_path):
    """Redrawn from the committed raw results, where the compiled naive loss and the CPU kernel add the same
    memory: each variant has its own marker, size and dash pattern, and no tick reads like 6x10^1."""
    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)
    header, rows = read_results(COMMITTED / "results.csv")
    paths = plots.plot_results(rows, header, tmp_path)
    assert {p.name for p in paths} == {"plot-reverse_kld-fp32.png", "plot-reverse_kld-bf16.png"}
    for figure in figures:
        for ax in figure.axes:
            styles = [(line.get_marker(), line.get_linestyle(), line.get_markersize()) for line in ax.get_lines()]
            assert len(styles) == 3 and len(set(styles)) == len(styles), styles
            labels = [t.get_text() for t in ax.get_xticklabels() + ax.get_yticklabels(minor=True) + ax.get_yticklabels()]
            assert labels and all(text == "" or text.replace(",", "").replace(".", "").isdigit() for text in labels), labels


def test_replot_redraws_a_committed_run_from_its_csv(tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(COMMITTED / "linear-h256-v32000", copy)
    (copy / "plot-linear_reverse_kld-fp32.png").unlink()
    run.main(["--replot", str(copy)])
    assert (copy / "plot-linear_reverse_kld-fp32.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_minillm_step_variants_agree_with_naive():
    """On the quick model's rollout, ours on the logits and ours fused-linear give naive's loss and gradient norm."""
    from benchmarks import minillm_step

    setup = minillm_step.setup("llama-4k", "cpu")
    for variant in minillm_step.VARIANTS:
        assert minillm_step.disagreement(variant, setup) is None, variant
    assert minillm_step.held_nv("ours", setup) == 1.0  # the teacher's [B, N, V] logits
    assert minillm_step.held_nv("ours_fused_linear", setup) == 64 / 4096  # its [B, N, H] hidden states


def test_a_wrong_minillm_step_variant_is_reported_and_not_timed(monkeypatch):
    """A per-token KL of the student from itself (0): reported, not timed, and the row still names its model."""
    from benchmarks import minillm_step

    def kl_of_the_student_from_itself(student, s):
        stats = minillm_step.naive_token_stats(student, s)
        return stats._replace(reverse_kld=stats.reverse_kld * 0)

    monkeypatch.setitem(minillm_step.STATS, "ours", kl_of_the_student_from_itself)
    row = minillm_step.measure_step("llama-4k", "ours", "cpu", repeats=1)
    assert row["status"].startswith(WRONG) and "loss" in row["status"], row
    assert "fwd_ms" not in row and row["model"] == "llama-4k" and row["vocab"] == 4096
    line = markdown_table([{**row, "op": "minillm_step", "variant": "ours", "dtype": "fp32"}]).splitlines()[2]
    assert line.startswith("| minillm_step (llama-4k) | 32 | 4096 | fp32 | ours | error")
    assert line.count("|") == markdown_table([]).splitlines()[0].count("|") + 1  # + the held column


def test_linear_divergence_compares_ours_with_trls_chunked_loss_where_trl_is_installed():
    """The op's variants: the naive loss (eager, compiled), ours on the CPU, and, with TRL, our integration's loss
    (with the entropy) and TRL's own chunked loss; Liger's where installed; TRL's only for the divergences it has."""
    names = set(variants("linear_divergence", "cpu", "jsd"))
    assert {"naive", "naive_compile", "cpu"} <= names
    from benchmarks.distillation_step import trl_available

    if trl_available():
        assert {"cpu+entropy", "trl_chunked"} <= names
        assert not {"cpu+entropy", "trl_chunked"} & set(variants("linear_divergence", "cpu", "tvd"))


@pytest.mark.parametrize("op, divergence", [("linear_reverse_kld", None), ("linear_divergence", "jsd"),
                                            ("divergence", "jsd")])
def test_a_worker_builds_only_the_variant_it_measures(monkeypatch, op, divergence):
    """``variants(..., only=name)`` gives that variant alone, for every name of the full table, without Liger's
    numerical checks or TRL's import unless it is theirs (a CPU benchmark measures each case in a fresh process)."""
    names = list(variants(op, "cpu", divergence))

    def not_for_this_variant(*args, **kwargs):
        raise AssertionError("built for a variant that is not Liger's or TRL's")

    for name in names:
        with monkeypatch.context() as patch:
            if not name.startswith("liger"):
                patch.setattr(variants_module, "liger_linear", not_for_this_variant)
                patch.setattr(variants_module, "liger_linear_divergence", not_for_this_variant)
            if not (name.startswith("trl") or name.endswith("+entropy")):
                patch.setattr(variants_module, "trl_linear_divergence", not_for_this_variant)
            assert list(variants(op, "cpu", divergence, only=name)) == [name]


def test_distillation_step_variants_agree_with_trl_and_their_rows_name_model_and_divergence():
    """One DistillationTrainer step with our loss gives TRL's loss and gradient norm (the quick model); its table row
    names the model and the divergence."""
    pytest.importorskip("trl", reason="TRL is not installed: pip install 'minillm-kernels[trl]'")
    from benchmarks import distillation_step

    assert distillation_step.disagreement("llama-4k", "ours", "jsd", "cpu") is None
    row = dict(op="distillation_step", variant="ours", model="llama-4k", divergence="jsd", tokens=32, vocab=4096,
               hidden=64, dtype="fp32", status="ok", fwd_ms=1.0, fwd_bwd_ms=2.0, peak_extra_mb=1.0, peak_extra_nv=1.0)
    assert markdown_table([row]).splitlines()[2].startswith("| distillation_step (llama-4k, jsd) | 32 | 4096 | fp32 |")


def test_vocab_parallel_variants_are_checked_and_their_bytes_counted():
    """On 2 gloo processes, both variants agree with the float64 reference (status ok) and the bytes each process
    receives are what each sends by design: ours 8 float32 numbers per token plus the call's check (6 float64);
    all-gathering the logits, both models' other half (vocabulary 1001, padded to 1002 columns: 501 per process)."""
    from benchmarks.vocab_parallel import measure_vocab_parallel

    tokens = 64
    ours, gathered = (measure_vocab_parallel(variant, tokens, 1001, "fp32", repeats=1) for variant in ("ours", "all_gather"))
    assert ours["status"] == "ok" and gathered["status"] == "ok", (ours, gathered)
    assert ours["received_bytes"] == tokens * 8 * 4 + 6 * 8
    assert gathered["received_bytes"] == 2 * tokens * 501 * 4
    assert ours["world"] == 2 and 0 < ours["fwd_bwd_ms"] < 60_000
