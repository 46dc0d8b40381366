"""Mutation harness: plants known bugs, one at a time, in a scratch copy of the project and checks that the tests
meant to catch each one fail.

    python scripts/mutations.py              # every mutation (run by scripts/test.sh after the suite)
    python scripts/mutations.py --list       # what is planted where, and which tests should catch it
    python scripts/mutations.py --only reference-dead-terms cpu-bf16-truncates

A mutation replaces one exact snippet of one file (which must occur exactly once, so that a refactoring that moves
the code fails the harness loudly instead of planting nothing) and names the tests that should catch it: node ids or
a ``-k`` that select only tests that catch it, so that each costs seconds. The harness checks every snippet, copies
the working tree once per job (``--jobs``, default: one per CPU), runs the union of the named tests on the unmutated
copy (they must pass: a test that already fails would "catch" anything; ``--skip-baseline`` where the whole suite
has just passed on this tree, as in scripts/test.sh), then, the jobs in parallel, for each mutation applies it to a
copy, runs its tests with ``-x`` and restores the file.

Cost: each pytest run forks from a server that has imported torch, triton and transformers (``PRELOADED``), so it
starts in a fraction of a second. Each copy has its own C++ build cache, the kernel's own build (its flags: a faster
-O0 or -O1 build forms no fused multiply-adds and does not vectorise as -O3 does, so its numbers are not the suite's);
ninja updates it incrementally, so a mutation of the CPU kernel recompiles only the translation units it touches,
and a mutation of a header names the units its tests exercise (``built_in``): the others keep their unmutated
objects. A unit whose sources are the suite's is not compiled but copied from the suite's build
(``compile_or_reuse``, the workers' $CXX): each worker's first build, and the rebuild after a mutation is restored.
Those mutations run first, each unit's on one worker in a row (the restore and the next plant in one rebuild); the
others then fill the workers.

A mutation is caught when its tests fail (or crash, or hang); a selection that pytest cannot run (a node id that no
longer exists, a ``-k`` that selects nothing) is an error, not a catch. It prints caught/missed per mutation as each
finishes, with its wall and CPU seconds, and, last, the count and the names of the missed ones; it exits 1 if any is
missed or could not run.
"""
from __future__ import annotations

import argparse
import ast
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from queue import Empty, Queue
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
SKIPPED_IN_COPY = (".git", ".venv", "out", "build", "__pycache__", ".pytest_cache", "*.egg-info", ".torch_ext")
TIMEOUT_S = 900


class Mutation(NamedTuple):
    name: str
    path: str  # relative to the repository root
    old: str  # the exact snippet, present once
    new: str
    tests: tuple[str, ...]  # pytest arguments: node ids or files relative to the repository root, "-k", "expr"
    bug: str  # what the planted bug is, in words
    # For a mutation in a header of the CPU kernel: the translation units (.cpp) rebuilt with it, those its tests
    # exercise; the others keep their unmutated objects (``rewrite``). (): none, its tests compile the header
    # themselves; None: every unit that includes it.
    built_in: tuple[str, ...] | None = None


MUTATIONS = (
    # ---- the C++ CPU kernel (each gets a fresh build)
    Mutation(
        "cpu-divergence-backward-drops-the-mean", "csrc/cpu/divergence_backward.cpp",
        "store_rounded(out, v, scale * (c.partial - c.q * mean));",
        "store_rounded(out, v, scale * c.partial);",
        ("tests/test_divergence.py::test_every_divergence_matches_the_float64_reference", "-k", "cpu"),
        "the CPU divergence backward drops -q_v sum_u q_u a_u (the softmax's chain rule)",
    ),
    Mutation(
        "cpu-divergence-mixture-weights-swapped", "csrc/cpu/divergence_kernel.h",
        "const acc_t m = r.teacher_weight.times(p) + r.student_weight.times(q);",
        "const acc_t m = r.student_weight.times(p) + r.teacher_weight.times(q);",
        ("tests/test_divergence.py::test_every_divergence_matches_the_float64_reference", "-k", "cpu"),
        "the CPU mixture m = w p + (1 - w) q takes each model's weight for the other's",
        built_in=("csrc/cpu/divergence_backward.cpp",),
    ),
    Mutation(
        "cpu-divergence-mixture-weights-one-float", "csrc/cpu/divergence_kernel.h",
        "const acc_t m = r.teacher_weight.times(p) + r.student_weight.times(q);",
        "const acc_t m = r.teacher_weight.hi * p + r.student_weight.hi * q;",
        ("tests/test_divergence.py::test_cpu_float32_per_token_contract_for_a_student_near_its_teacher",
         "-k", "skew_forward_kl"),
        "the CPU mixture's weights rounded to one float each: every log(p / m) of a row shifted alike (7e-7 of a skew "
        "KL near 0)",
        built_in=("csrc/cpu/divergence_forward_skew_forward_kl.cpp",),
    ),
    Mutation(
        "cpu-divergence-mixture-log-of-a-rounded-ratio", "csrc/cpu/divergence_kernel.h",
        "const bool own_share = z < 1;",
        "const bool own_share = false;",
        ("tests/test_divergence.py::test_per_token_contract_at_peaked_distributions", "-k",
         "cpu and skew_reverse_kl and 0.9"),
        "the CPU mixtures' log(q / m) always the log of the float ratio: near log(1 / 0.9) it errs by half an ulp of "
        "the ratio, 7e-7 of a skew KL at alpha = 0.9 on peaked rows",
        built_in=("csrc/cpu/divergence_forward_skew_reverse_kl.cpp",),
    ),
    Mutation(
        "cpu-divergence-mixture-log-weight-one-float", "csrc/cpu/divergence_kernel.h",
        "return own_share ? -((log_weight.hi + log1p_z) + log_weight.lo) : log_arg;",
        "return own_share ? -(log_weight.hi + log1p_z) : log_arg;",
        ("tests/test_divergence.py::test_cpu_float32_per_token_contract_for_a_student_near_its_teacher", "-k", "jsd"),
        "the CPU mixtures' log w rounded to one float: where -log w - log1p(z) cancels (a student near its teacher), "
        "every column of a row shifted alike (7e-7 of a JSD near 0.01)",
        built_in=("csrc/cpu/divergence_forward_jsd.cpp",),
    ),
    Mutation(
        "cpu-divergence-normaliser-one-float", "csrc/cpu/divergence_kernel.h",
        "const acc_t q = r.inv_z_s.times(fast_exp(u * r.k)), p = r.inv_z_t.times(fast_exp(w * r.k));",
        "const acc_t q = fast_exp(u * r.k) * r.inv_z_s.hi, p = fast_exp(w * r.k) * r.inv_z_t.hi;",
        ("tests/test_divergence.py::test_cpu_float32_per_token_contract_for_a_student_near_its_teacher", "-k",
         "skew_forward_kl"),
        "the CPU divergences' 1 / Z rounded to one float: every probability of a row scaled by the same rounding",
        built_in=("csrc/cpu/divergence_forward_skew_forward_kl.cpp",),
    ),
    Mutation(
        "cpu-row-factor-relies-on-contraction", "csrc/cpu/row_factor.h",
        "      return std::fma(x, hi, x * lo);\n#else\n      return static_cast<acc_t>(double(x) * double(hi) + double(x * lo));",
        "      return x * hi + x * lo;\n#else\n      return x * hi + x * lo;",
        ("tests/test_divergence.py::test_cpu_row_factor_rounds_its_product_once_in_every_build",),
        "a per-row factor's product written x * hi + x * lo: rounded once only where the compiler contracts it into an "
        "FMA (CI's -O3 build at the host's level), else x * hi is rounded first and lo is lost (x86-64-v2, -O0: the JSD's "
        "and skew KLs' near-teacher contract tests failed 9x over)",
        built_in=(),  # (the test compiles a probe of the header itself)
    ),
    Mutation(
        "cpu-row-factor-double-sum-of-two-products", "csrc/cpu/row_factor.h",
        "      return static_cast<acc_t>(double(x) * double(hi) + double(x * lo));",
        "      return static_cast<acc_t>(double(x) * double(hi) + double(x) * double(lo));",
        ("tests/test_divergence.py::test_cpu_row_factor_rounds_its_product_once_in_every_build",),
        "the build without FMA adds x hi and x lo exactly in double: the products x 0.7 that lie on a float midpoint "
        "(2.5%) all round one way, by lo's own rounding (a 0.025 ulp bias: the JSD near its teacher at 1.08x the bound)",
        built_in=(),  # (the test compiles a probe of the header itself)
    ),
    Mutation(
        "cpu-fast-log-float-series-dropped", "csrc/cpu/streaming.h",
        "const float log_m = 2.0f * f + 2.0f * f * s * series;",
        "const float log_m = 2.0f * f;",
        ("tests/test_divergence.py::test_every_divergence_matches_the_float64_reference", "-k", "cpu and jsd"),
        "the float fast_log keeps only the first term of its atanh series (log m off by up to 3e-3)",
        built_in=("csrc/cpu/divergence_backward.cpp",),
    ),
    Mutation(
        "cpu-fast-log-double-coarse", "csrc/cpu/streaming.h",
        "  series = series * s + 1.0 / 3.0;\n",
        "  series = series * s + 0.3333334;\n",
        ("tests/test_divergence.py::test_every_divergence_matches_the_float64_reference", "-k", "cpu and jsd"),
        "the double fast_log's series off by 1e-7 in its first coefficient (float64 accuracy lost)",
        built_in=("csrc/cpu/divergence_backward.cpp",),
    ),
    Mutation(
        "cpu-bf16-truncates", "csrc/cpu/streaming.h",
        "const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;",
        "const uint32_t rounded = u >> 16;",
        ("tests/test_reverse_kld.py::test_token_stats_and_gradient_match_the_oracle", "-k", "cpu and bf16"),
        "the bf16 gradient store truncates instead of rounding to nearest even",
        built_in=("csrc/cpu/reverse_kld.cpp",),
    ),
    Mutation(
        "cpu-build-fails", "csrc/cpu/reverse_kld.cpp",
        "namespace {",
        "#error planted build failure\nnamespace {",
        ("tests/test_reverse_kld.py::test_the_cpu_kernel_builds_where_a_compiler_and_ninja_are",),
        "the CPU kernel does not compile (the suite must fail, not skip every cpu row)",
    ),
    Mutation(
        "cpu-rescale-forgets-the-shift", "csrc/cpu/kl_row.h",
        "    a_sum = move_a.factor * a_sum + move_a.shift * norm_a.z;",
        "    a_sum = move_a.factor * a_sum;",
        ("tests/test_reverse_kld.py::test_cpu_float32_per_token_accuracy_at_4096_by_32000[1.0]",),
        "when a later chunk raises the student's maximum, A is rescaled but not shifted to the new centre",
        built_in=("csrc/cpu/reverse_kld.cpp",),
    ),
    Mutation(
        "cpu-row-sums-in-float", "csrc/cpu/streaming.h",  # (scalar: in float lanes a 2048-column chunk's sums err
        # too little to see at AVX-512, 32 terms a lane; a build that does not vectorise them adds 512 per sum)
        "  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;\n#pragma omp simd reduction(+ : s0, s1, s2, s3)\n",
        "  float s0 = 0, s1 = 0, s2 = 0, s3 = 0;\n",
        ("tests/test_reverse_kld.py::test_cpu_float32_per_token_accuracy_at_4096_by_32000[1.0]",),
        "the CPU row sums accumulate in four float sums (each rounded at its running total) instead of double",
        built_in=("csrc/cpu/reverse_kld.cpp",),
    ),
    Mutation(
        "cpu-row-sums-drop-the-tail", "csrc/cpu/streaming.h",
        "  for (int64_t j = 4 * quarter; j < n; ++j) {",
        "  for (int64_t j = 4 * quarter; j < 4 * quarter; ++j) {",
        ("tests/test_divergence.py::test_every_divergence_matches_the_float64_reference", "-k",
         "cpu and float32-float32 and tvd"),
        "the CPU row sums skip the last n mod 4 columns of a chunk (the scalar tail after the groups of four)",
        built_in=("csrc/cpu/divergence_forward_tvd.cpp",),
    ),
    Mutation(
        "cpu-fast-exp-unmasked", "csrc/cpu/streaming.h",
        "  return where_live(!(x < kLo), p * scale);  // 0 below kLo (-inf included), NaN for NaN",
        "  return p * scale;",
        ("tests/test_divergence.py::test_minus_infinity_and_extreme_logits", "-k", "cpu and float32"),
        "the float exp keeps the garbage 2^k below log(FLT_MIN) (-inf logits) instead of masking it to 0",
        built_in=("csrc/cpu/divergence_backward.cpp",),
    ),
    Mutation(
        "cpu-padding-gradient-unwritten", "csrc/cpu/reverse_kld.cpp",
        "          std::memset(static_cast<void*>(out + vocab_size), 0, sizeof(student_t) * (width - vocab_size));",
        "",
        ("tests/test_reverse_kld.py::test_vocab_size_ignores_padding_columns[teacher-cpu]", "tests/test_reverse_kld.py::test_vocab_size_ignores_padding_columns[student-cpu]"),
        "the gradient's padding columns past vocab_size are left uninitialised",
    ),
    Mutation(
        "cpu-out-of-range-target-clamped", "csrc/cpu/reverse_kld.cpp",
        "        } else if (tgt[i] >= 0 && tgt[i] < vocab_size) {\n          const int64_t y = tgt[i];",
        "        } else if (true) {\n          const int64_t y = std::min(std::max<int64_t>(tgt[i], 0), vocab_size - 1);",
        ("tests/test_reverse_kld.py::test_out_of_range_targets_give_nan_log_probabilities_and_a_gradient_without_the_one_hot[cpu]",),
        "an out-of-range target is clamped to the last column: a silently wrong log-probability",
    ),
    Mutation(
        "cpu-out-of-range-target-drops-b", "csrc/cpu/reverse_kld.cpp",
        "(b_p != nullptr && tgt != nullptr) ? b_p[i] : acc_t(0),",
        "(b_p != nullptr && in_vocab) ? b_p[i] : acc_t(0),",
        ("tests/test_reverse_kld.py::test_out_of_range_targets_give_nan_log_probabilities_and_a_gradient_without_the_one_hot[cpu]",),
        "an out-of-range target drops its whole b, the -b q_v term too (what a vocabulary shard without the target needs)",
    ),
    Mutation(
        "cpu-row-offset-ignores-the-outer-stride", "csrc/common/row_strides.h",
        "    return (row / rows_per_outer) * outer_stride + (row % rows_per_outer) * inner_stride;",
        "    return row * inner_stride;",
        ("tests/test_reverse_kld.py::test_strided_views_match_the_oracle", "-k", "cpu"),
        "strided rows addressed with the inner stride only: a [B, L, V][:, a:b] slice reads the wrong rows",
        built_in=("csrc/cpu/reverse_kld.cpp",),
    ),
    Mutation(
        "cpu-empty-sum-recentred", "csrc/cpu/streaming.h",
        "    const Recentring move{shift, z > 0 ? std::exp(shift * k) : 1.0};",
        "    const Recentring move{shift, std::exp(shift * k)};",
        ("tests/test_divergence.py::test_rows_whose_first_blocks_are_minus_infinity", "-k", "cpu"),
        "an empty sum (a row's leading chunks all -inf, centred on 0) is re-centred by exp(k (0 - c')), inf where the "
        "first finite maximum c' is far below 0: Z = inf * 0 = NaN",
        built_in=("csrc/cpu/reverse_kld.cpp",),
    ),
    # ---- the Triton kernels (under the interpreter here)
    Mutation(
        "triton-empty-sum-recentred", "minillm_kernels/ops/triton_common.py",
        "    shift = tl.minimum(old_centre - centre.to(tl.float64), 0.0)",
        "    shift = old_centre - centre.to(tl.float64)",
        ("tests/test_divergence.py::test_rows_whose_first_blocks_are_minus_infinity", "-k", "triton"),
        "the online log-normaliser re-centres an empty sum (a row's leading blocks all -inf, centred on 0) by "
        "exp(k (0 - c')), inf where the first finite maximum c' is far below 0: Z = inf * 0 = NaN",
    ),
    Mutation(
        "triton-row-offset-ignores-the-outer-stride", "minillm_kernels/ops/triton_common.py",
        "    return (row // rows_per_outer) * outer_stride + (row % rows_per_outer) * inner_stride",
        "    return row * inner_stride",
        ("tests/test_reverse_kld.py::test_strided_views_match_the_oracle", "-k", "triton"),
        "strided rows addressed with the inner stride only",
    ),
    Mutation(
        "triton-one-hot-dropped", "minillm_kernels/ops/reverse_kld_triton.py",
        "        grad = (grad + tl.where(cols == target, b, 0.0)) * k",
        "        grad = grad * k",
        ("tests/test_reverse_kld.py::test_token_stats_and_gradient_match_the_oracle[1.0-fp32-fp32-triton]",),
        "the backward forgets the b [v == y] term of the student log-probability's gradient",
    ),
    Mutation(
        "triton-out-of-range-target-clamped", "minillm_kernels/ops/reverse_kld_triton.py",
        "        column = tl.where(in_range, target, 0)",
        "        column = tl.minimum(tl.maximum(target, 0), vocab_size - 1)\n        in_range = valid",
        ("tests/test_reverse_kld.py::test_out_of_range_targets_give_nan_log_probabilities_and_a_gradient_without_the_one_hot[triton]",),
        "an out-of-range target is clamped: a silently wrong log-probability",
    ),
    Mutation(
        "triton-out-of-range-target-drops-b", "minillm_kernels/ops/reverse_kld_triton.py",
        "        b = tl.load(grad_student_logprob_ptr + row).to(ACC_DTYPE)",
        "        b = tl.where(in_range, tl.load(grad_student_logprob_ptr + row).to(ACC_DTYPE), 0.0)",
        ("tests/test_reverse_kld.py::test_out_of_range_targets_give_nan_log_probabilities_and_a_gradient_without_the_one_hot[triton]",),
        "an out-of-range target drops its whole b, the -b q_v term too",
    ),
    Mutation(
        "triton-float32-sums", "minillm_kernels/ops/triton_common.py",
        "    normaliser = normaliser * ratio + tl.sum(terms.to(tl.float64), axis=0)",
        "    normaliser = normaliser * ratio + tl.sum(terms, axis=0).to(tl.float32)",
        ("tests/test_reverse_kld.py::test_token_stats_and_gradient_match_the_oracle[1.0-fp64-fp64-triton]",),
        "the online log-normaliser's Z summed in float32: float64 logits get float32 accuracy",
    ),
    Mutation(
        "triton-gradient-products-before-differences", "minillm_kernels/ops/reverse_kld_triton.py",
        "grad = tl.where(q > 0, q * (a * ((log_q - log_p) - kl) - b - c * (log_q + entropy)), 0.0)",
        "grad = tl.where(q > 0, q * ((a - c) * log_q - a * log_p - a * kl - b - c * entropy), 0.0)",
        ("tests/test_reverse_kld.py::test_gradient_terms_near_the_float32_limit_are_differenced_before_scaling[triton]",),
        "the backward multiplies log p_v and KL by a before their difference: NaN (inf - inf) where they pass ~1e38",
    ),
    Mutation(
        "reference-out-of-range-target-zero", "minillm_kernels/reference.py",
        '        nan = student_logq.new_full((), float("nan"))',
        '        nan = student_logq.new_full((), 0.0)',
        ("tests/test_reverse_kld.py::test_out_of_range_targets_give_nan_log_probabilities_and_a_gradient_without_the_one_hot[reference]",),
        "the reference gives log-probability 0 (probability 1) for an out-of-range target instead of NaN",
    ),
    Mutation(
        "reference-out-of-range-target-drops-b", "minillm_kernels/reference.py",
        "        no_column = nan - torch.logsumexp(_scaled(student, vocab_size, temperature, dtype), -1)",
        "        no_column = nan",
        ("tests/test_reverse_kld.py::test_out_of_range_targets_give_nan_log_probabilities_and_a_gradient_without_the_one_hot[reference]",),
        "the reference's out-of-range log q(y) has no gradient at all (its -lse part dropped)",
    ),
    # ---- the divergence family's Triton kernels and fused-linear form
    Mutation(
        "triton-divergence-skew-reverse-weight", "minillm_kernels/ops/divergence_triton.py",
        "return code, float(coefficient), 1.0 - coefficient if code == SKEW_REVERSE_KL else float(coefficient)",
        "return code, float(coefficient), float(coefficient)",
        ("tests/test_divergence.py::test_every_divergence_matches_the_float64_reference", "-k",
         "triton and skew_reverse_kl and float32-float32"),
        "the skew reverse KL's mixture gives the teacher the skew's weight (m = alpha p + (1 - alpha) q)",
    ),
    Mutation(
        "triton-divergence-backward-drops-the-mean", "minillm_kernels/ops/divergence_triton.py",
        "grad = tl.where(in_row, scale * (partials - q * mean), 0.0)",
        "grad = tl.where(in_row, scale * partials, 0.0)",
        ("tests/test_divergence.py::test_every_divergence_matches_the_float64_reference", "-k",
         "triton and jsd and float32-float32"),
        "the Triton backward forgets the softmax's -q_v sum_u q_u a_u",
    ),
    Mutation(
        "triton-mixture-middle-form-on-subnormals", "minillm_kernels/ops/triton_common.py",
        "low, high = d < -0.6931471805599453, d > 64.0",
        "low, high = d < -110.0, d > 64.0",
        ("tests/test_divergence.py::test_mixtures_where_the_models_are_a_subnormal_factor_apart", "-k", "triton"),
        "log((1 - w) + w e^d) as log1p(w expm1(d)) down to where e^d is subnormal: Kahan's expm1 divides by log e^d, "
        "off by up to 1e-2 where the models are 88-103 nats apart (float32)",
    ),
    Mutation(
        "triton-mixture-complement-rounded", "minillm_kernels/ops/triton_common.py",
        "log_rest_hi, log_rest_lo = _split(tl.log(1.0 - weight), d.dtype)",
        "log_rest_hi, log_rest_lo = _split(tl.log((1.0 - weight.to(d.dtype)).to(tl.float64)), d.dtype)",
        ("tests/test_divergence.py::test_per_token_contract_at_peaked_distributions", "-k", "triton and 0.9"),
        "the mixture's log(1 - w) of a float 1 - w (1 - 0.9f: 2.4e-7 relative), in every column where p << q",
    ),
    Mutation(
        "triton-divergence-row-constant-rounding-dropped", "minillm_kernels/ops/triton_common.py",
        "return hi, tl.where(tl.abs(hi) < float(\"inf\"), lo, 0.0)",
        "return hi, tl.zeros_like(hi)",
        ("tests/test_divergence.py::test_gpu_kernels_per_token_contract_at_32000_columns", "-k", "triton"),
        "a column's log-probability minus a row constant rounded to one float, alike for a binade's columns: the row's "
        "q, p and delta shifted together (5e-7 of a forward KL at 32000 columns, 1e-5 near the teacher)",
    ),
    Mutation(
        "linear-divergence-saved-rows-misaligned", "minillm_kernels/linear.py",
        "(mean_partial[chunk.rows], row_stats[chunk.rows])",
        "(mean_partial[: _rows_count(chunk.rows)], row_stats[: _rows_count(chunk.rows)])",
        ("tests/test_fused_linear_divergence.py::test_every_divergence_matches_the_unfused_composition", "-k",
         "cpu and forward_kl and none"),
        "the fused-linear divergence's backward reads the saved statistics of the first rows, not the chunk's tokens",
    ),
    # ---- the CUDA kernels: only compiled here (no GPU), so only a build break can be caught
    Mutation(
        "cuda-does-not-compile", "csrc/cuda/device_math.cuh",
        "constexpr int kWarpSize = 32;",
        "constexpr int kWarpSize = 32",
        ("tests/test_cuda_compile.py::test_cuda_source_compiles_for_sm90[csrc/cuda/reverse_kld.cu]",),
        "a CUDA source that nvcc cannot compile",
    ),
    # ---- the reference (the oracle): its bugs must be caught by independent checks, not by itself
    Mutation(
        "reference-reads-masked-rows", "minillm_kernels/reference.py",
        "    return logits if mask is None else torch.where(mask.unsqueeze(-1), logits, 0.0)",
        "    return logits",
        ("tests/test_reverse_kld.py::test_the_oracle_does_not_read_masked_rows_either",),
        "the reference computes masked rows and zeroes their values after: NaN logits there give a NaN gradient",
    ),
    Mutation(
        "reference-undefined-rows-finite", "minillm_kernels/reference.py",
        "    value = terms.sum(-1) + torch.where(undefined, math.nan, 0.0) * log_q.exp().sum(-1)",
        "    value = terms.sum(-1)",
        ("tests/test_divergence.py::test_undefined_rows_give_nan_and_masked_rows_give_zero_whatever_they_hold",
         "-k", "reference"),
        "the reference's terms skip NaN probabilities: a NaN teacher row gives a forward KL of 0.0",
    ),
    Mutation(
        "custom-ops-without-their-function", "minillm_kernels/ops/autograd.py",
        "    return apply\n",
        "    return op\n",
        ("tests/test_autograd.py::test_torch_func_grad_vjp_and_jacrev_give_the_autograd_gradient", "-k",
         "cpu and fused_reverse_kld"),
        "the package calls the custom ops themselves: torch.func.grad / jacrev fail ('must override setup_context')",
    ),
    Mutation(
        "kernel-gradients-silently-without-a-graph", "minillm_kernels/ops/autograd.py",
        "            if not torch.is_grad_enabled():\n",
        "            if True:\n",
        ("tests/test_autograd.py::test_differentiating_a_kernels_gradient_again_is_a_clear_error", "-k",
         "cpu and (fused_divergence or fused_linear_reverse_kld)"),
        "create_graph=True: a gradient with no graph (fused-linear mean) or torch's 'no autograd formula' error, not "
        "the first-order error that names what is supported",
    ),
    Mutation(
        "divergence-op-trusts-its-coefficient", "minillm_kernels/ops/divergence.py",
        "    check_coefficient(divergence, coefficient)\n    if n_rows(student) == 0:",
        "    if n_rows(student) == 0:",
        ("tests/test_compile.py::test_a_bad_symbolic_beta_or_skew_is_the_eager_value_error", "-k",
         "(cpu or reference) and logits"),
        "under torch.compile a bad beta reaches the kernel unchecked: the kernel's RuntimeError (the reference's NaN), "
        "not eager's ValueError",
    ),
    Mutation(
        "compiled-scalar-tensor-item", "minillm_kernels/validation.py",
        "        if torch.compiler.is_compiling():\n            raise TypeError(",
        "        if False:\n            raise TypeError(",
        ("tests/test_compile.py::test_a_bad_symbolic_beta_or_skew_is_the_eager_value_error", "-k",
         "reference and logits and beta"),
        "a 0-dim tensor beta under torch.compile is .item()'d: a data-dependent guard error instead of the fix",
    ),
    Mutation(
        "reference-dead-terms", "minillm_kernels/reference.py",
        "kl = (q * torch.where(live, student_logq - teacher_logp, zero)).sum(-1)",
        "kl = (q * (student_logq - teacher_logp)).sum(-1)",
        ("tests/test_reverse_kld.py::test_negative_infinity_columns",),
        "columns that are -inf in both models give 0 * inf = NaN instead of 0",
    ),
    # ---- validation and the logits-level functions
    Mutation(
        "mean-over-all-tokens", "minillm_kernels/losses.py",
        "count = per_token.new_tensor(per_token.numel()) if mask is None else mask.sum()",
        "count = per_token.new_tensor(per_token.numel())",
        ("tests/test_validation.py::test_reductions_follow_their_definitions",),
        "reduction='mean' divides by every token instead of the unmasked ones",
    ),
    Mutation(
        "strided-logits-copied", "minillm_kernels/validation.py",
        "    return logits if logits.stride(-1) == 1 or logits.shape[-1] == 1 else logits.contiguous()",
        "    return logits.contiguous()",
        ("tests/test_reverse_kld.py::test_a_response_slice_allocates_only_its_gradient",),
        "the response slice of a model's logits is copied before the kernel (3 [N, V] tensors instead of 1)",
    ),
    Mutation(
        "response-logits-slice-instead-of-positions", "minillm_kernels/sampling.py",
        '        **({"logits_to_keep": positions} if keeps_positions else {}),\n    ).logits\n'
        "    return logits if keeps_positions else logits[:, -(new_tokens + 1) : -1]  # (a view)",
        '        **({"logits_to_keep": new_tokens + 1} if keeps_positions else {}),\n    ).logits\n'
        "    return logits[:, -(new_tokens + 1) : -1]",
        ("tests/test_train.py::test_the_step_allocates_no_tokens_x_vocab_tensor_but_those_the_design_needs",),
        "response_logits builds N + 1 positions' logits and slices them: slice_backward's [B, N + 1, V] in the step",
    ),
    Mutation(
        "importance-weight-nan-at-alpha-0", "minillm_kernels/losses.py",
        "    if mix_alpha == 0:\n",
        "    if mix_alpha == -1:\n",
        ("tests/test_validation.py::test_importance_weight_where_the_student_gives_the_target_no_mass",),
        "alpha = 0 goes through the general formula: NaN where the student's target logit is -inf",
    ),
    Mutation(
        "teacher-not-detached", "minillm_kernels/losses.py",
        "    teacher_logprob = teacher_logprob.detach()\n",
        "",
        ("tests/test_validation.py::test_a_teacher_that_requires_grad_is_warned_about_once_and_gets_none",
         "tests/test_fused_linear.py::test_token_stats_match_unfused_composition"),
        "teacher_logprob reports requires_grad=True although no gradient can flow",
    ),
    Mutation(
        "temperature-isfinite", "minillm_kernels/validation.py",
        "if not (above_low and below_high and -math.inf < value < math.inf):",
        "if not (above_low and below_high and math.isfinite(value)):",
        ("tests/test_compile.py::test_fullgraph_matches_eager[dynamic-reference-logits]",),
        "math.isfinite in the checks: torch.compile(dynamic=True) cannot trace a symbolic float",
    ),
    # ---- fused lm_head + loss
    Mutation(
        "temperature-reciprocal-unchecked", "minillm_kernels/validation.py",
        "    if not temperature >= smallest:\n",
        "    if False:\n",
        ("tests/test_validation.py::test_a_temperature_whose_reciprocal_overflows_is_refused_by_name",),
        "a temperature whose 1/T overflows float32 passes: every backend then returns NaN or 0.0",
    ),
    Mutation(
        "reference-logits-not-centred", "minillm_kernels/reference.py",
        "    return (x - torch.where(centre == -math.inf, 0.0, centre)) * (1.0 / temperature)",
        "    return x / temperature",
        ("tests/test_validation.py::test_the_smallest_temperature_gives_the_float64_answer_on_every_backend",),
        "the reference scales the raw logits by 1/T: at the smallest temperature allowed they overflow (NaN, 0.0)",
    ),
    Mutation(
        "scalar-tensor-gradient-dropped", "minillm_kernels/validation.py",
        "        if value.requires_grad:\n",
        "        if False:\n",
        ("tests/test_validation.py::test_a_scalar_tensor_that_requires_grad_is_refused_on_every_backend",),
        "a 0-dim temperature (beta, skew) that requires grad is taken as its number: the gradient it asked for is "
        "silently dropped",
    ),
    Mutation(
        "linear-bias-gradient-overwritten", "minillm_kernels/linear.py",
        "self.bias[: self.vocab_size] += grad_logits.sum(0, dtype=self.bias.dtype)",
        "self.bias[: self.vocab_size] = grad_logits.sum(0, dtype=self.bias.dtype)",
        ("tests/test_fused_linear.py::test_reverse_kld_matches_unfused_composition",),
        "grad bias keeps only the last chunk's sum",
    ),
    Mutation(
        "linear-softcap-without-its-derivative", "minillm_kernels/linear.py",
        "        grad_logits = student.uncapped_gradient(grad_logits, chunk.student_logits)\n",
        "",
        ("tests/test_fused_linear_softcap.py::test_softcaps_match_the_unfused_composition", "-k", "cpu and student"),
        "the student's logit gradient skips the soft cap's derivative 1 - tanh(z / c)^2 on its way back to h, W, b",
    ),
    Mutation(
        "linear-softcap-teacher-gets-the-students", "minillm_kernels/linear.py",
        "vocab_size, softcaps[1])",
        "vocab_size, softcaps[0])",
        ("tests/test_fused_linear_softcap.py::test_softcaps_match_the_unfused_composition", "-k", "cpu and teacher"),
        "the teacher's logits are capped with the student's cap (none when only the teacher has one)",
    ),
    Mutation(
        "linear-mean-counts-masked-tokens", "minillm_kernels/linear.py",
        "scale = 1.0 / max(loop.plan.n_counted, 1) if mean else 1.0",
        "scale = 1.0 / max(loop.student.hidden.shape[0], 1) if mean else 1.0",
        ("tests/test_fused_linear.py::test_reverse_kld_matches_unfused_composition",),
        "the fused-linear mean divides by every token, masked ones included",
    ),
    Mutation(
        "linear-sum-returns-the-saved-gradients", "minillm_kernels/linear.py",
        "    return tuple(g * grad_total.to(g.dtype) if need else None for g, need in zip(grads, needs))",
        "    unit = bool(grad_total == 1)\n"
        "    return tuple((g if unit else g * grad_total.to(g.dtype)) if need else None for g, need in zip(grads, needs))",
        ("tests/test_fused_linear.py::test_the_gradients_returned_are_not_the_ones_saved_for_the_next_backward",),
        "reduction sum / mean hands the caller the gradients saved for the next backward when the upstream is 1: "
        "zeroing them (zero_grad, .data.zero_()) zeroes or breaks a retained graph's next gradient",
    ),
    Mutation(
        "linear-no-version-check", "minillm_kernels/linear.py",
        "    ctx.save_for_backward(*inputs[:3], *output[1:])",
        "    ctx.save_for_backward(None, None, None, *output[1:])",
        ("tests/test_fused_linear.py::test_a_weight_changed_in_place_before_the_backward_is_an_error",),
        "a weight changed in place between forward and backward silently gets the old weight's gradient",
    ),
    # ---- vocabulary-parallel losses (2 and 4 gloo processes)
    Mutation(
        "parallel-kl-without-the-shares", "minillm_kernels/parallel.py",
        "math.inf, w * (kl_r + log_w - log_v))",
        "math.inf, w * kl_r)",
        ("tests/test_parallel.py::test_logits_losses_match_the_unsharded_oracle", "-k", "2-logits-cpu-fp64"),
        "KL = sum_r w_r KL_r: the shards' local KLs weighted, without the KL between the shares",
    ),
    Mutation(
        "parallel-backward-local-normaliser", "minillm_kernels/parallel.py",
        "global_row_stats = torch.stack((own_s, lse_s - own_s * k, own_t, lse_t - own_t * k), -1)",
        "global_row_stats = torch.stack((own_s, log_z_s[rank], own_t, log_z_t[rank]), -1)",
        ("tests/test_parallel.py::test_logits_losses_match_the_unsharded_oracle", "-k", "2-logits-cpu-fp64"),
        "the backward recomputes each shard's own softmax (its local log Z) instead of the global one",
    ),
    Mutation(
        "parallel-dead-shards-counted", "minillm_kernels/parallel.py",
        "    dead = w == 0  # (not \"w > 0\": NaN logits keep their NaN)",
        "    dead = w < 0",
        ("tests/test_parallel.py::test_logits_losses_match_the_unsharded_oracle", "-k", "infinities or padding"),
        "a shard with no student mass (all -inf, or the padding shard) enters the sums as 0 * NaN",
    ),
    Mutation(
        "parallel-teacher-gap-nan", "minillm_kernels/parallel.py",
        "torch.where(log_norm_t == -math.inf, math.inf, w * (kl_r + log_w - log_v))",
        "w * (kl_r + log_w - log_v)",
        ("tests/test_parallel.py::test_shards_without_mass_and_nan_logits",),
        "a shard where the teacher has no mass and the student has gives KL = NaN instead of +inf",
    ),
    Mutation(
        "parallel-owner-rank-0", "minillm_kernels/parallel.py",
        'owner = target.div(width, rounding_mode="floor").clamp(0, shards.world - 1).unsqueeze(0)',
        "owner = torch.zeros_like(target).unsqueeze(0)",
        ("tests/test_parallel.py::test_logits_losses_match_the_unsharded_oracle", "-k", "2-logits-cpu-fp64"),
        "log q(y) read from rank 0 whatever shard owns y",
    ),
    Mutation(
        "parallel-mask-forgotten", "minillm_kernels/parallel.py",
        "        outputs = tuple(torch.where(mask, x, 0.0) for x in outputs)",
        "        pass",
        ("tests/test_parallel.py::test_logits_losses_match_the_unsharded_oracle", "-k", "2-logits-cpu-fp64"),
        "masked tokens get the combine of zeros (entropy log P) instead of 0",
    ),
    Mutation(
        "parallel-ids-unchecked", "minillm_kernels/parallel.py",
        '"the number of tokens": math.prod(student.shape[:-1]), "target_ids": fingerprint(target, mask),',
        '"the number of tokens": math.prod(student.shape[:-1]), "target_ids": 0.0,',
        ("tests/test_parallel.py::test_a_mismatched_call_fails_on_every_rank_naming_the_argument",),
        "ranks passing different target ids get a silently wrong log q(y) instead of an error",
    ),
    Mutation(
        "padding-shard-has-mass", "minillm_kernels/ops/reverse_kld.py",
        "        row_stats[:, 1::2] = -math.inf",
        "",
        ("tests/test_parallel.py::test_logits_losses_match_the_unsharded_oracle", "-k", "padding"),
        "a shard with no real column has log Z = 0 (one unit of mass) instead of -inf",
    ),
    Mutation(
        "parallel-linear-grad-hidden-not-summed", "minillm_kernels/linear.py",
        "    if needs[0]:\n        shards.sum(grads[0])",
        "    if False:\n        shards.sum(grads[0])",
        ("tests/test_parallel.py::test_fused_linear_losses_match_the_unsharded_oracle", "-k", "2-linear-cpu"),
        "each rank gets only its shard's part of grad h (G_r W_r), not their sum",
    ),
    Mutation(
        "parallel-linear-sum-chunks-not-combined", "minillm_kernels/linear.py",
        "kl, _, _, entropy, row_stats = stats if combine is None else combine(stats)",
        "kl, _, _, entropy, row_stats = stats",
        ("tests/test_parallel.py::test_fused_linear_losses_match_the_unsharded_oracle", "-k", "2-linear-cpu"),
        "reduction sum/mean over a sharded lm_head sums each shard's local KL",
    ),
    # ---- the MiniLLM objective
    Mutation(
        "returns-normalised-by-length", "minillm_kernels/objective.py",
        "remaining = mask.flip(-1).cumsum(-1).flip(-1)  # valid tokens from t on",
        "remaining = mask.sum(-1, keepdim=True).expand_as(mask)",
        ("tests/test_objective.py::test_length_normalized_returns_match_the_formula",),
        "R_t divided by the whole response length instead of the tokens left from t",
    ),
    Mutation(
        "whitening-counts-padding", "minillm_kernels/objective.py",
        "count = sum_and_count[1].clamp(min=1)",
        "count = torch.tensor(float(mask.numel()), dtype=values.dtype)",
        ("tests/test_objective.py::test_whiten_advantages_over_valid_tokens",),
        "the whitening mean and variance divide by every position, padding included",
    ),
    Mutation(
        "ppo-max-instead-of-min", "minillm_kernels/objective.py",
        "surrogate = torch.minimum(ratio * advantages, ratio.clamp(1.0 - clip, 1.0 + clip) * advantages)",
        "surrogate = torch.maximum(ratio * advantages, ratio.clamp(1.0 - clip, 1.0 + clip) * advantages)",
        ("tests/test_objective.py::test_ppo_policy_loss_matches_the_formula_and_its_gradient",),
        "the PPO surrogate takes the optimistic bound",
    ),
    Mutation(
        "whiten-padded-with-the-population-variance", "minillm_kernels/objective.py",
        'unbiased = over == "padded" and not across_processes',
        "unbiased = False",
        ("tests/test_objective.py::test_whiten_advantages_over_the_padded_tensor_as_the_reference_code",),
        "whiten_advantages(over='padded') ignores the reference's unbiased variance on one process",
    ),
    Mutation(
        "single-step-switch-ignored", "minillm_kernels/objective.py",
        "importance_weight=importance_weight if weighted_single_step else None)",
        "importance_weight=importance_weight)",
        ("tests/test_objective.py::test_minillm_loss_with_the_reference_code_switches",),
        "weighted_single_step=False (the reference's unweighted mean of KL_t) still weights by w_t",
    ),
    # ---- teacher-mixed sampling
    Mutation(
        "mixture-swapped", "minillm_kernels/sampling.py",
        "mixture = alpha * teacher_filtered.exp() + (1.0 - alpha) * student_filtered.exp()",
        "mixture = (1.0 - alpha) * teacher_filtered.exp() + alpha * student_filtered.exp()",
        ("tests/test_sampling.py::test_draws_follow_the_mixture_and_record_its_weights",),
        "the sampler draws from (1 - alpha) p + alpha q",
    ),
    Mutation(
        "sampler-pad-id-outside-the-embedding", "minillm_kernels/sampling.py",
        "        if rows is not None and pad_token_id >= rows:\n",
        "        if False:\n",
        ("tests/test_sampling.py::test_a_pad_token_id_outside_either_embedding_is_named",),
        "a pad_token_id past a model's embedding is fed to it after a row's EOS: a raw index error mid-sampling",
    ),
    Mutation(
        "sampler-empty-batch-unchecked", "minillm_kernels/sampling.py",
        "    if input_ids.shape[0] == 0:\n",
        "    if False:\n",
        ("tests/test_sampling.py::test_an_empty_batch_is_named",),
        "a batch of 0 prompts reaches the prompt-id check: a raw 'min(): Expected reduction dim' error",
    ),
    Mutation(
        "sampler-temperature-overflow-unchecked", "minillm_kernels/sampling.py",
        "    temperature = as_temperature(temperature, compute_dtype)\n",
        "",
        ("tests/test_sampling.py::test_a_temperature_whose_reciprocal_overflows_the_compute_dtype_is_named",),
        "temperature=1e-39 with float32 logits: 1/T overflows, the mixture is NaN, a raw multinomial error",
    ),
    # ---- the trainer
    Mutation(
        "trainer-reward-sign", "minillm_kernels/training/rollout.py",
        "sample.teacher_logprob - sample.student_logprob",
        "sample.student_logprob - sample.teacher_logprob",
        ("tests/test_train.py::test_rollout_rewards_are_the_teacher_student_log_ratio",),
        "the reward is log q - log p instead of log p - log q",
    ),
    Mutation(
        "trainer-optimizer-not-restored", "minillm_kernels/training/checkpoint.py",
        '        run.optimizer.load_state_dict(state["optimizer"])\n',
        "",
        ("tests/test_train.py::test_resume_continues_as_if_uninterrupted",),
        "--resume restores the weights but not AdamW's moments",
    ),
    Mutation(
        "trainer-warmup-restarts", "examples/train.py",
        "lr = optim.learning_rate(run.step)",
        "lr = optim.learning_rate(run.step - (3 if run.resumed else 0))",
        ("tests/test_train.py::test_resume_continues_as_if_uninterrupted",),
        "the learning-rate schedule restarts on resume",
    ),
    Mutation(
        "trainer-log-not-flushed", "minillm_kernels/training/checkpoint.py",
        "            self.file.flush()\n",
        "",
        ("tests/test_train.py::test_a_killed_run_resumes_with_every_step_logged_once",),
        "log records stay buffered: a SIGKILL loses them",
    ),
    Mutation(
        "trainer-log-not-truncated", "minillm_kernels/training/checkpoint.py",
        'if json.loads(line)["step"] <= step:',
        "if True:",
        ("tests/test_train.py::test_a_killed_run_resumes_with_every_step_logged_once",),
        "after a resume the steps past the checkpoint are logged twice",
    ),
    Mutation(
        "trainer-dropout-in-ppo", "minillm_kernels/training/run.py",
        "student.train(method.trains_with_dropout)",
        "student.train()",
        ("tests/test_train.py::test_minillm_updates_run_without_dropout",),
        "the student's dropout is on during the PPO epochs: the first ratio is not 1",
    ),
    Mutation(
        "trainer-resumes-another-method", "minillm_kernels/training/checkpoint.py",
        'if state["method"] != method:',
        "if False:",
        ("tests/test_train.py::test_resume_checks_what_it_resumes",),
        "a minillm checkpoint resumed with --method sft runs as sft",
    ),
    Mutation(
        "trainer-no-grad-norm-check", "examples/train.py",
        '    run.stop_if_not_finite(grad_norm, "gradient norm", parts)\n',
        "",
        ("tests/test_train.py::test_a_diverging_step_stops_before_the_update_and_the_rollout",),
        "a diverging step updates the weights with a non-finite gradient",
    ),
    Mutation(
        "trainer-full-disk-raw", "minillm_kernels/training/checkpoint.py",
        "        failure = write_failure(temporary, error)  # the free space with the partial file still there\n        temporary.unlink(missing_ok=True)\n        raise failure from error\n",
        "        raise\n",
        ("tests/test_train.py::test_a_full_disk_names_the_file_and_removes_the_partial_checkpoint",),
        "a full disk gives a raw iostream error and leaves checkpoint.tmp",
    ),
    Mutation(
        "data-eval-row-without-response", "minillm_kernels/training/data.py",
        "if require_response and not example.response:",
        "if False:",
        ("tests/test_train.py::test_bad_paths_and_data_are_named",),
        "an --eval-data row without a response is silently counted",
    ),
    Mutation(
        "validation-split-seen-by-the-start", "minillm_kernels/training/data.py",
        "validation = random.Random(seed).sample(labelled, size)",
        "validation = random.Random(seed + 1).sample(labelled, size)",
        ("tests/test_data.py::test_the_shipped_student_start_never_trained_on_the_default_validation_split",),
        "the default validation split is another draw than the one the shipped start left out: the start has seen it",
    ),
    Mutation(
        "process-group-kept-by-the-device-mesh", "minillm_kernels/distributed.py",
        'getattr(mesh, "_pg_registry", {}).clear()',
        "pass",
        ("tests/test_distributed.py::test_end_process_group_ends_the_gloo_threads_of_an_fsdp_run",),
        "after FSDP2, the gloo backend outlives end_process_group into the interpreter's shutdown (where it can abort)",
    ),
    Mutation(
        "killed-build-lock-left-in-place", "minillm_kernels/_build.py",
        "            leftover.unlink()",
        "            pass",
        ("tests/test_reverse_kld.py::test_a_build_killed_mid_way_does_not_block_the_next_one",),
        "the lock file of a killed build stays: every later build of the extension waits for ever",
    ),
    Mutation(
        "jsonl-null-response-read-as-text", "minillm_kernels/training/data.py",
        'example = Example("all" if task is None else task, record["prompt"], "" if response is None else response)',
        'example = Example(str(record.get("task", "all")), record["prompt"], str(record.get("response", "")))',
        ("tests/test_data.py::test_null_response_and_task_are_missing_and_other_types_are_named",),
        '"response": null becomes the gold answer "None" (and is accepted where a response is required)',
    ),
    Mutation(
        "empty-checkpoint-error-handler-crashes", "minillm_kernels/training/checkpoint.py",
        'reason = str(error).strip().splitlines()[0] if str(error).strip() else "no message"',
        "reason = str(error).splitlines()[0]",
        ("tests/test_train.py::test_an_empty_checkpoint_is_named",),
        "a zero-byte checkpoint.pt (EOFError without a message) crashes the error handler with an IndexError",
    ),
    Mutation(
        "gold-pairs-required-by-every-method", "examples/train.py",
        "gold_answers_for=[method.label] if method.trains_on == methods.GOLD_ANSWERS else [])",
        "gold_answers_for=[method.label])",
        ("tests/test_train.py::test_prompts_only_data_trains_the_methods_that_need_no_gold_answer",),
        "prompt-only data is refused for minillm (which samples its own answers) as if it trained on gold pairs",
    ),
    Mutation(
        "eval-size-checked-after-loading", "minillm_kernels/training/config.py",
        'eval_size: Optional[int] = flag(None, "evaluate on the first N held-out examples only", type=at_least(1))',
        'eval_size: Optional[int] = flag(None, "evaluate on the first N held-out examples only", type=int)',
        ("tests/test_train.py::test_arguments_and_data_are_checked_before_any_model_loads",),
        "--eval-size 0 passes the parser: the run fails later, not with the flag's error",
    ),
    # ---- the fair comparison: the tiny tasks' validity rules, the teacher's answers, the evaluation protocol
    Mutation(
        "checker-accepts-a-range-bound", "minillm_kernels/training/tiny/tasks.py",
        "return int(low) < n < int(high) and n % 2 == (parity == \"Odd\")",
        "return int(low) <= n <= int(high) and n % 2 == (parity == \"Odd\")",
        ("tests/test_data.py::test_open_task_checkers_accept_exactly_the_right_answers",),
        "the number checker accepts the range's bounds, which the prompt excludes",
    ),
    Mutation(
        "checker-accepts-an-unasked-sentence", "minillm_kernels/training/tiny/tasks.py",
        "and _is_grammatical(words) and set(asked) <= set(words)",
        "and _is_grammatical(words)",
        ("tests/test_data.py::test_open_task_checkers_reject_wrong_answers",),
        "the sentence checker accepts a grammatical sentence without the words the prompt asks for",
    ),
    Mutation(
        "seqkd-trains-on-gold", "examples/train.py",
        "run_data = with_teacher_answers(run_config, data, teacher, tokenizer, rank, world) if answers else data",
        "run_data = dataclasses.replace(data, answers={\"cached\": True}) if answers else data",
        ("tests/test_train.py::test_seqkd_and_kd_with_teacher_answers_train_on_the_cached_teacher_answers",),
        "seqkd (and kd --teacher-answers) train on the gold answers instead of the teacher's",
    ),
    Mutation(
        "kd-teacher-answers-flag-ignored", "minillm_kernels/training/methods.py",
        "return TEACHER_ANSWERS if self.takes_teacher_answers and self.config.run.teacher_answers else self.targets",
        "return self.targets",
        ("tests/test_train.py::test_seqkd_and_kd_with_teacher_answers_train_on_the_cached_teacher_answers",),
        "kd --teacher-answers trains on the gold answers",
    ),
    Mutation(
        "kd-ignores-the-divergence", "minillm_kernels/training/methods.py",
        '"divergence": options.divergence or self.default_divergence,',
        '"divergence": KD.default_divergence,',
        ("tests/test_train.py::test_kd_and_gkd_train_on_the_fused_divergence_they_are_given",),
        "kd and gkd train on the forward KL whatever --divergence says",
    ),
    Mutation(
        "gkd-samples-the-teacher-mixture", "minillm_kernels/training/methods.py",
        '"""The teacher\'s share of the sampling mixture: 0, the student alone."""\n        return 0.0\n',
        '"""The teacher\'s share of the sampling mixture: 0, the student alone."""\n'
        "        return self.config.options(MiniLLMOptions).alpha\n",
        ("tests/test_train.py::test_kd_and_gkd_train_on_the_fused_divergence_they_are_given",),
        "gkd samples from MiniLLM's teacher mixture instead of the student alone",
    ),
    Mutation(
        "gkd-reuses-its-samples", "minillm_kernels/training/methods.py",
        '"""Passes over one buffer: 1, fresh samples for every minibatch."""\n        return 1\n',
        '"""Passes over one buffer: 1, fresh samples for every minibatch."""\n'
        "        return self.config.options(MiniLLMOptions).ppo_epochs\n",
        ("tests/test_train.py::test_kd_and_gkd_train_on_the_fused_divergence_they_are_given",),
        "gkd trains --ppo-epochs steps on the same samples instead of fresh ones every step",
    ),
    Mutation(
        "cache-key-ignores-the-teacher", "minillm_kernels/training/data.py",
        "    for name, tensor in sorted(model.state_dict().items()):",
        "    for name, tensor in []:",
        ("tests/test_data.py::test_teacher_answers_are_cached_under_a_key_of_the_teacher_the_prompts_and_the_seed",),
        "the teacher-answer cache key leaves the teacher out: a retrained teacher reads the stale answers",
    ),
    Mutation(
        "pool-prompts-drawn-apart", "minillm_kernels/training/run.py",
        '("prompts", data.prompts, 0)',
        '("prompts", data.prompts, 1)',
        ("tests/test_train.py::test_every_method_draws_the_same_prompts_of_the_pool",),
        "minillm's rollouts draw the pool's prompts in another order than the other methods' pairs",
    ),
    Mutation(
        "lm-kd-ratio-ignored", "minillm_kernels/training/methods.py",
        "    if not ratio:\n",
        "    if True:\n",
        ("tests/test_train.py::test_pretrain_loss_mixes_in_the_teachers_soft_cross_entropy_as_the_reference_code",),
        "--lm-kd-ratio (the reference's 0.5 CE + 0.5 teacher soft-CE L_PT) is ignored",
    ),
    Mutation(
        "warmup-default-zero", "minillm_kernels/training/config.py",
        "warmup_steps: int = flag(100,",
        "warmup_steps: int = flag(0,",
        ("tests/test_train.py::test_the_reference_code_switches_reach_the_objective",),
        "the warm-up default is 0, not the reference scripts' 100 steps",
    ),
    Mutation(
        "exposure-bias-reverse-kl", "minillm_kernels/training/evaluation.py",
        "kl = (log_p.exp() * (log_p - log_q)).sum(-1)",
        "kl = (log_q.exp() * (log_q - log_p)).sum(-1)",
        ("tests/test_evaluation.py::test_exposure_bias_matches_its_definition_by_enumeration",),
        "ExAccErr accumulates KL(q || p) instead of the paper's E_p log p / q",
    ),
    Mutation(
        "exposure-bias-oracle-on-student-prefixes", "minillm_kernels/training/evaluation.py",
        '(("regret", student), ("oracle_error", teacher))',
        '(("regret", student), ("oracle_error", student))',
        ("tests/test_evaluation.py::test_exposure_bias_matches_its_definition_by_enumeration",),
        "eps(l) is measured on the student's prefixes instead of the teacher's",
    ),
    Mutation(
        "sampled-evaluation-unseeded", "minillm_kernels/training/evaluation.py",
        "    with seeded(sample_seed, next(model.parameters()).device):",
        "    with seeded(None, next(model.parameters()).device):",
        ("tests/test_evaluation.py::test_generation_is_seeded_and_leaves_the_global_random_state_alone",),
        "sampled evaluation ignores its seed: another run samples other answers",
    ),
    # ---- the tuned comparison: validation, checkpoint choice, the rollout buffer
    Mutation(
        "validation-is-the-test-split", "examples/train.py",
        "    scores = scores_on(data.validation, run.config, run.model, run.tokenizer, data, run.rank, run.world)",
        "    scores = scores_on(data.heldout, run.config, run.model, run.tokenizer, data, run.rank, run.world)",
        ("tests/test_comparison.py::test_the_comparison_tunes_on_validation_then_tests_the_chosen_settings",
         "tests/test_train.py::test_the_chosen_checkpoint_is_the_best_validation_step_and_the_test_split_scores_it_and_the_last"),
        "test-set leakage: the evaluations during training, which choose the checkpoint and the tuned settings, run on "
        "the test split",
    ),
    Mutation(
        "validation-left-in-the-training-pool", "minillm_kernels/training/data.py",
        "    return validation, [e for e in pool if e.prompt not in prompts]",
        "    return validation, pool",
        ("tests/test_data.py::test_the_validation_split_is_drawn_from_the_pool_fixed_by_its_seed_and_disjoint_from_training_and_test",),
        "the validation prompts stay in the training pool: the methods train on what chooses them",
    ),
    Mutation(
        "chosen-checkpoint-picked-on-test", "examples/train.py",
        '"chosen": last if chosen_step == steps else scores_of(run_dir / "best"),',
        '"chosen": max((scores_of(run_dir / "best"), last), key=lambda s: s["greedy"]["gold"]["rouge_l"]),',
        ("tests/test_train.py::test_the_chosen_checkpoint_is_the_best_validation_step_and_the_test_split_scores_it_and_the_last",),
        "the checkpoint reported as chosen is the better of the chosen and the last one on the test split",
    ),
    Mutation(
        "chosen-checkpoint-is-the-last", "examples/train.py",
        '    if run.step > 0 and improves(score, None if run.best is None else run.best["score"]):',
        "    if run.step > 0:",
        ("tests/test_train.py::test_the_chosen_checkpoint_is_the_best_validation_step_and_the_test_split_scores_it_and_the_last",),
        "every validation evaluation replaces the chosen checkpoint: the last one is reported as the best",
    ),
    Mutation(
        "rollout-buffer-not-shuffled", "minillm_kernels/training/rollout.py",
        "    order = torch.tensor(random.Random(seed).sample(range(size), size))",
        "    order = torch.arange(size)",
        ("tests/test_train.py::test_the_rollout_buffer_is_taken_in_shuffled_minibatches_that_cover_it_every_epoch",
         "tests/test_train.py::test_epoch_minibatches_partition_the_buffer_in_a_seeded_order"),
        "the buffer's minibatches are the same consecutive rows every PPO epoch (the reference code shuffles them)",
    ),
    # ---- the benchmarks
    Mutation(
        "benchmark-naive-kl-q-q", "benchmarks/variants.py",
        "teacher_logp = torch.log_softmax(teacher.float(), dim=-1)",
        "teacher_logp = torch.log_softmax(student.float(), dim=-1)",
        ("tests/test_benchmarks.py::test_every_variant_agrees_with_the_reference",),
        "the benchmark's naive variant computes KL(q || q) = 0 (and would be timed as if right)",
    ),
    Mutation(
        "benchmark-compiles-every-naive-loss", "benchmarks/variants.py",
        '    if only in (None, f"{naive_name}_compile"):  # (cached: built from the naive loss only where it is measured)\n'
        '        table[f"{naive_name}_compile"] = compiled(op, divergence)\n',
        '    table[f"{naive_name}_compile"] = compiled(op, divergence)\n',
        ("tests/test_benchmarks.py::test_a_wrong_variant_is_reported_and_not_timed", "-k", "student_from_itself"),
        "every variants() call compiles (and caches) the naive loss, also for a worker measuring another variant: "
        "the naive loss a test planted stayed compiled, and a later naive_compile measured it (a CI failure)",
    ),
    Mutation(
        "benchmark-naive-tvd-q-q", "benchmarks/variants.py",
        "return (0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)).mean()",
        "return (0.5 * (log_q.exp() - log_q.exp()).abs().sum(-1)).mean()",
        ("tests/test_benchmarks.py::test_every_variant_agrees_with_the_reference[divergence-tvd]",),
        "the divergence benchmark's naive TVD is the student's from itself, 0 (and would be timed as if right)",
    ),
    Mutation(
        "benchmark-step-naive-kl-q-q", "benchmarks/minillm_step.py",
        "teacher_logp = s.teacher_logits[..., : s.vocab_size].float().log_softmax(-1)",
        "teacher_logp = student_logq.detach()",
        ("tests/test_benchmarks.py::test_minillm_step_variants_agree_with_naive",),
        "the minillm_step benchmark's naive variant computes KL(q || q) = 0, the reference the others are checked by",
    ),
    Mutation(
        "benchmark-all-gather-kl-q-q", "benchmarks/vocab_parallel.py",
        "    return mk.fused_reverse_kld(_GatherColumns.apply(student), _GatherColumns.apply(teacher.detach()),",
        "    return mk.fused_reverse_kld(_GatherColumns.apply(student), _GatherColumns.apply(student.detach()),",
        ("tests/test_benchmarks.py::test_vocab_parallel_variants_are_checked_and_their_bytes_counted",),
        "the vocab_parallel benchmark's all-gather baseline computes KL(q || q) = 0 (and would be timed as if right)",
    ),
    # ---- the divergence family on a sharded vocabulary (parallel.combine_divergence)
    Mutation(
        "parallel-forward-kl-drops-log-share", "minillm_kernels/parallel.py",
        "v * (every[..., 4] + norms.log_v - norms.log_w))",
        "v * (every[..., 4] + norms.log_v))",
        ("tests/test_parallel.py::test_divergences_of_sharded_logits_match_the_unsharded_oracle",),
        "the sharded forward KL leaves out -log w_r, the student's share of each shard: sum_r v_r (FKL_r + log v_r)",
    ),
    Mutation(
        "parallel-mixture-terms-use-the-shard-softmax", "minillm_kernels/parallel.py",
        "        given = norms.global_row_stats.to(row_stats.dtype)\n",
        "        given = row_stats\n",
        ("tests/test_parallel.py::test_divergences_of_a_sharded_lm_head_match_the_unsharded_oracle",),
        "the mixtures' and TVD's terms are evaluated with each shard's own log-normalisers, not the whole vocabulary's",
    ),
    # ---- the sparse teacher on a sharded vocabulary (parallel.combine_sparse_divergence)
    Mutation(
        "parallel-sparse-entries-on-every-rank", "minillm_kernels/parallel.py",
        "            local = global_ids - shards.rank * width\n",
        "            local = global_ids % width\n",
        ("tests/test_parallel.py::test_sparse_divergences_of_sharded_logits_match_the_unsharded_oracle", "-k",
         "2-cpu-fp64"),
        "every rank counts every entry (and sampled token) as its own, at the id's column within a shard: the entries' "
        "logits and the tails' exclusions read the wrong columns",
    ),
    Mutation(
        "parallel-sparse-tail-holds-the-entries", "minillm_kernels/parallel.py",
        "    owned_logprobs = torch.where(teacher.owned, teacher.logprobs, -math.inf)\n",
        "    owned_logprobs = torch.full_like(teacher.logprobs, -math.inf)\n",
        ("tests/test_parallel.py::test_sparse_divergences_of_sharded_logits_match_the_unsharded_oracle", "-k",
         "2-cpu-fp64"),
        "each shard's tail statistics (c_R, log Z_R) include the entries it owns: Q_R = 1 - Q_I + Q_I",
    ),
    Mutation(
        "parallel-sparse-bin-tail-gradient-dropped", "minillm_kernels/parallel.py",
        "        factor = (g * tail_coefficient).to(dtype)[:, None]\n",
        "        factor = 0.0 * g.to(dtype)[:, None]\n",
        ("tests/test_parallel.py::test_sparse_divergences_of_sharded_logits_match_the_unsharded_oracle", "-k",
         "2-cpu-fp64"),
        "bin's gradient reaches the entries only, not the tail's columns through Q_R",
    ),
    Mutation(
        "parallel-sparse-entropy-without-the-shares", "minillm_kernels/parallel.py",
        "    entropy = torch.where(w == 0, 0.0, w * (every[..., 5 + n_entries] - log_w)).sum(0)\n",
        "    entropy = torch.where(w == 0, 0.0, w * every[..., 5 + n_entries]).sum(0)\n",
        ("tests/test_parallel.py::test_sparse_token_stats_of_sharded_logits_match_the_unsharded_oracle", "-k",
         "2-cpu-fp64"),
        "the sparse token statistics' entropy sum_r w_r H_r leaves out the shares' own entropy -sum_r w_r log w_r",
    ),
    Mutation(
        "parallel-sparse-linear-chunk-logits-without-bias", "minillm_kernels/linear.py",
        "        return projected if bias is None else projected + bias\n",
        "        return projected\n",
        ("tests/test_parallel.py::test_sparse_divergences_of_a_sharded_lm_head_match_the_unsharded_oracle", "-k",
         "2-linear-cpu"),
        "a sharded lm_head's chunk logits leave out the bias rows (forward and backward alike: a consistent wrong "
        "loss)",
    ),
    Mutation(
        "parallel-sparse-renormalized-nan-from-the-tail", "minillm_kernels/parallel.py",
        "        undefined = torch.zeros_like(has_entries[:, 0])  #",
        "        undefined = lse.isnan()  #",
        ("tests/test_parallel.py::test_sparse_divergence_of_dtensor_logits_and_weights_and_a_mismatched_teacher",),
        "\"renormalized\" on a sharded vocabulary is NaN for a NaN logit outside the entries, which it does not read "
        "(the unsharded kernels' contract: finite)",
    ),
    Mutation(
        "parallel-sparse-target-teacher-logprobs-unchecked", "minillm_kernels/parallel.py",
        ' "target_teacher_logprobs": fingerprint(finite(target_logprobs), mask),',
        "",
        ("tests/test_parallel.py::test_sparse_divergence_of_dtensor_logits_and_weights_and_a_mismatched_teacher",),
        "the sampled tokens' teacher log-probabilities (target_teacher_logprobs of fused_sparse_token_stats) are not "
        "checked across the ranks: a rank given others gets other rewards and weights, silently",
    ),
    Mutation(
        "parallel-divergence-backward-gets-shard-stats", "minillm_kernels/parallel.py",
        "    return (value.to(dtype),), (mean_partial.to(dtype), norms.global_row_stats.to(dtype))",
        "    return (value.to(dtype),), (mean_partial.to(dtype), row_stats)",
        ("tests/test_parallel.py::test_divergences_of_sharded_logits_match_the_unsharded_oracle",),
        "the divergences' backward gets the shard's own row statistics: right values, each slice's gradient of its "
        "own softmax",
    ),
    # ---- the sparse teacher (issue 23): kernels, reference, validation, benchmark
    Mutation(
        "cpu-sparse-entries-not-excluded", "csrc/cpu/sparse_forward.cpp",
        "    buf[sorted[next] - start] = -std::numeric_limits<acc_t>::infinity();\n",
        "",
        ("tests/test_sparse.py::test_every_divergence_and_tail_matches_the_float64_oracle", "-k",
         "cpu and float32-float32"),
        "the streaming pass over R does not skip the entries' columns: Z counts them twice (log q and log Q_R wrong)",
    ),
    Mutation(
        "cpu-sparse-bin-tail-gradient-dropped", "csrc/cpu/sparse_backward.cpp",
        "divergence_part = fast_exp((x - c_r) * ka - log_z_r) * tail_qa - q * mean_a;",
        "divergence_part = -q * mean_a;",
        ("tests/test_sparse.py::test_every_divergence_and_tail_matches_the_float64_oracle", "-k",
         "cpu and bin and float32-float32"),
        "the bin tail's q_v a_R dropped: the tail logits get no gradient through Q_R (what a clamp on 1 - Q_I does)",
    ),
    Mutation(
        "cpu-sparse-uniform-tail-counts-the-entries", "csrc/cpu/sparse_kernel.h",
        "return n_tail > 0 ? e.log_tail_mass(vocab_size) - std::log(double(n_tail)) : kNegInf;",
        "return n_tail > 0 ? e.log_tail_mass(vocab_size) - std::log(double(vocab_size)) : kNegInf;",
        ("tests/test_sparse.py::test_every_divergence_and_tail_matches_the_float64_oracle", "-k",
         "cpu and uniform and float32-float32"),
        "the uniform completion spreads P_R over V columns instead of V - K' (its tail mass is not P_R)",
        built_in=("csrc/cpu/sparse_forward.cpp",),
    ),
    Mutation(
        "cpu-sparse-renormalized-teacher-not-renormalized", "csrc/cpu/sparse_forward.cpp",
        "const Outcome<double> o = div(e.log_p[j] - log_mass,",
        "const Outcome<double> o = div(e.log_p[j],",
        ("tests/test_sparse.py::test_every_divergence_and_tail_matches_the_float64_oracle", "-k",
         "cpu and renormalized and float32-float32"),
        "the renormalized mode renormalises the student on I but not the teacher",
    ),
    Mutation(
        "cpu-sparse-entry-gradient-drops-the-mean", "csrc/cpu/sparse_backward.cpp",
        "qa_minus_mean = div(e.log_p[j], log_q).qa - q * mean;",
        "qa_minus_mean = div(e.log_p[j], log_q).qa;",
        ("tests/test_sparse.py::test_every_divergence_and_tail_matches_the_float64_oracle", "-k",
         "cpu and bin and float32-float32"),
        "the entries' columns of the backward forget the softmax's -q_v M",
    ),
    Mutation(
        "triton-sparse-tail-mass-by-subtraction", "minillm_kernels/ops/sparse_triton.py",
        'log_student_tail = tl.where(z_r == 0, float("-inf"), (c_r64 - c64) * k64 + log_z_r64 - log_z64)',
        'log_student_tail = tl.where(z_r == 0, float("-inf"), tl.log(1.0 - z_i / z))',
        ("tests/test_sparse.py::test_tail_masses_near_zero_and_one_and_a_student_sure_of_the_entries[bin-triton]",),
        "log Q_R as log(1 - Q_I) (float64): right where Q_R is large, no digit left of Q_R ~ 1e-15",
    ),
    Mutation(
        "triton-sparse-exclusion-checks-one-chunk", "minillm_kernels/ops/sparse_triton.py",
        "    for start in range(first, last, ID_CHUNK):",
        "    for start in range(first, tl.minimum(last, first + ID_CHUNK), ID_CHUNK):",
        ("tests/test_sparse.py::test_k_equal_to_the_vocabulary_is_the_dense_divergence_on_every_tail", "-k",
         "triton and forward_kl"),
        "a block's columns are compared with its first 16 entry columns only: more entries in a block count in R too",
    ),
    Mutation(
        "triton-sparse-token-one-hot-dropped", "minillm_kernels/ops/sparse_triton.py",
        "            grad += b * ((cols == target).to(ACC_DTYPE) - q) - grad_h * tl.where(q > 0, q * (log_q + entropy), 0.0)",
        "            grad += b * (-q) - grad_h * tl.where(q > 0, q * (log_q + entropy), 0.0)",
        ("tests/test_sparse.py::test_token_stats_match_the_float64_oracle", "-k", "triton and bin"),
        "the token statistics' backward forgets b [v = y] on the tail columns",
    ),
    Mutation(
        "reference-sparse-completion-not-normalised-on-the-tail", "minillm_kernels/reference.py",
        "shares = torch.where(no_tail, -n_tail.log(), tail_logits - lse_tail)",
        "shares = torch.where(no_tail, -n_tail.log(), scaled - torch.logsumexp(scaled, -1, keepdim=True))",
        ("tests/test_sparse.py::test_the_reference_matches_the_definitions_term_by_term",),
        "the bin completion as P_R q_v (the student's share of the whole vocabulary, not of R): it sums to P_R Q_R",
    ),
    Mutation(
        "reference-sparse-tail-mass-unclamped", "minillm_kernels/reference.py",
        "tail = torch.where(n_live < vocab_size, (1 - p_entries).clamp(min=0), 0.0)",
        "tail = torch.where(n_live < vocab_size, 1 - p_entries, 0.0)",
        ("tests/test_sparse.py::test_tail_masses_near_zero_and_one_and_a_student_sure_of_the_entries[bin-cpu]",),
        "P_R = 1 - P_I unclamped: a sum a little above 1 (rounding) gives log of a negative, NaN",
    ),
    Mutation(
        "sparse-validation-misses-repeated-ids", "minillm_kernels/validation.py",
        "    if bool(repeated.any()):",
        "    if False:",
        ("tests/test_sparse.py::test_bad_teachers_are_refused_with_errors_that_name_the_fix",),
        "repeated ids in a row are accepted (the entry's column would count twice)",
    ),
    Mutation(
        "sparse-mass-tolerance-ignores-the-dtype", "minillm_kernels/validation.py",
        "    per_entry = (1 + log_p.abs()) * eps + 8 * eps_32 * (1 + math.log(vocab_size))",
        "    per_entry = 8 * eps_32 * (1 + math.log(vocab_size))",
        ("tests/test_sparse.py::test_rounding_of_the_log_probabilities_is_within_the_tolerance",),
        "the mass tolerance ignores the log-probabilities' dtype: a bf16 top-k that rounds above 1 is refused",
    ),
    Mutation(
        "linear-sparse-teacher-rows-misaligned", "minillm_kernels/linear.py",
        "return self.ids[chunk.rows].contiguous(), self.logprobs[chunk.rows].contiguous()",
        "return self.ids[: _rows_count(chunk.rows)].contiguous(), "
        "self.logprobs[: _rows_count(chunk.rows)].contiguous()",
        ("tests/test_fused_linear_sparse.py::test_every_divergence_and_tail_matches_the_logits_version", "-k",
         "cpu and bin"),
        "each chunk of fused_linear_sparse_divergence reads the teacher's first rows, not its own tokens' top-k",
    ),
    Mutation(
        "linear-sparse-upstream-rows-misaligned", "minillm_kernels/linear.py",
        "chunk, loop.plan, teacher, grad_value[chunk.rows],",
        "chunk, loop.plan, teacher, grad_value[: _rows_count(chunk.rows)],",
        ("tests/test_fused_linear_sparse.py::test_every_divergence_and_tail_matches_the_logits_version", "-k",
         "cpu and uniform"),
        "the fused-linear sparse backward scales each chunk's gradient by the upstream of the first tokens, not its "
        "own",
    ),
    Mutation(
        "cuda-sparse-does-not-compile", "csrc/cuda/sparse.cu",
        "constexpr int kTileWords = kTile / 32;",
        "constexpr int kTileWords = kTile / 32",
        ("tests/test_cuda_compile.py::test_cuda_source_compiles_for_sm90[csrc/cuda/sparse.cu]",),
        "the sparse CUDA kernels do not compile for sm_90",
    ),
    Mutation(
        "benchmark-trl-chunked-beta-mirrored", "benchmarks/variants.py",
        "                       TRL_BETAS[divergence])[0]",
        "                       1 - TRL_BETAS[divergence])[0]",
        ("tests/test_benchmarks.py::test_every_variant_agrees_with_the_reference", "-k", "linear_divergence"),
        "the benchmark calls TRL's chunked loss (and our integration's) at the mirrored beta: the forward KL timed as "
        "the reverse KL",
    ),
    Mutation(
        "benchmark-naive-topk-tail-dropped", "benchmarks/variants.py",
        "    return torch.cat((log_entries, tail), -1)",
        "    return log_entries",
        ("tests/test_benchmarks.py::test_every_variant_agrees_with_the_reference[sparse_divergence-reverse_kl]",),
        "the benchmark's naive top-k loss drops the tail outcome (another quantity, timed as if it were ours)",
    ),
    # ---- the TRL integration (minillm_kernels/integrations/)
    Mutation(
        "trl-beta-convention-flipped", "minillm_kernels/integrations/trl.py",
        '        if beta == 0.0:\n            return dict(divergence="forward_kl")\n'
        '        if beta == 1.0:\n            return dict(divergence="reverse_kl")\n'
        '        return dict(divergence="jsd", beta=beta)',
        '        if beta == 0.0:\n            return dict(divergence="reverse_kl")\n'
        '        if beta == 1.0:\n            return dict(divergence="forward_kl")\n'
        '        return dict(divergence="jsd", beta=1 - beta)',
        ("tests/test_trl.py::test_chunked_divergence_loss_is_trls_loss_entropy_and_gradients",),
        "TRL's beta read the other way round: beta = 0 the reverse KL, 1 the forward KL, the JSD's mixture mirrored",
    ),
    Mutation(
        "trl-softcap-not-folded-with-the-scale", "minillm_kernels/integrations/trl.py",
        "as_softcap(name, cap) / student_logit_scale",
        "as_softcap(name, cap)",
        ("tests/test_trl.py::test_soft_capped_logits_are_trls_loss_entropy_and_gradients", "-k", "jsd"),
        "a soft cap c applied after a logit scale a is passed on as c, not c / a_s: the kernels cap the unscaled "
        "logits, so c tanh(a z / c) becomes a c tanh(z / c)",
    ),
    Mutation(
        "trl-num-items-in-batch-ignored", "minillm_kernels/integrations/trl.py",
        "    loss = divide_by_count(total, n_valid.clamp(min=1) if num_items_in_batch is None else num_items_in_batch)",
        "    loss = divide_by_count(total, n_valid.clamp(min=1))",
        ("tests/test_trl.py::test_distillation_trainer_trains_as_trls",),
        "the DistillationTrainer loss is the micro-batch's mean, not its sum over the global token count "
        "(num_items_in_batch): wrong under gradient accumulation",
    ),
    Mutation(
        "trl-logit-scale-not-in-the-temperature", "minillm_kernels/integrations/trl.py",
        "    return FoldedLogitScales(temperature / student_logit_scale, teacher_hidden, teacher_bias, *softcaps)",
        "    return FoldedLogitScales(temperature, teacher_hidden, teacher_bias, *softcaps)",
        ("tests/test_trl.py::test_distillation_loss_is_the_divergence_of_the_models_own_logits",),
        "the student's logit scale is dropped (the teacher's is then off by the student's too): another objective for "
        "Cohere, Granite, Falcon-H1 models",
    ),
    Mutation(
        "trl-server-tail-unclamped", "minillm_kernels/integrations/trl_experimental.py",
        "        logprobs = logprobs - (log_mass - TRL_MAX_LOG_MASS).clamp(min=0)",
        "        pass",
        ("tests/test_trl.py::test_server_sparse_loss_is_trls_where_trl_runs", "-k", "tail"),
        "a served teacher certain of its top-1 (log p = 0) leaves no tail mass: the reverse KL's tail term is infinite "
        "where TRL clamps the tail at 1e-7",
    ),
    Mutation(
        "trl-gkd-mean-over-tokens", "minillm_kernels/integrations/trl_experimental.py",
        "        return divide_by_count(total, tokens * student_logits.shape[-1])",
        "        return divide_by_count(total, tokens)",
        ("tests/test_trl.py::test_generalized_jsd_loss_is_gkds", "-k", "mean and not batchmean"),
        "GKD's reduction 'mean' over tokens instead of TRL's mean over its [tokens, V] elementwise terms",
    ),
    # ---- the offline teacher cache, on-policy distillation and the served teacher (issue 25)
    Mutation(
        "cache-shard-checksum-unchecked", "minillm_kernels/training/cache.py",
        '            if file_sha256(path) != shard["sha256"]:',
        "            if False:",
        ("tests/test_cache.py::test_a_truncated_corrupt_missing_or_incomplete_cache_is_refused",),
        "a shard whose bytes changed since the build (a flipped bit) is read as whole",
    ),
    Mutation(
        "cache-manifest-not-updated-per-shard", "minillm_kernels/training/cache.py",
        '                               "bytes": path.stat().st_size, "sha256": file_sha256(path)})\n'
        '    write_atomically(directory / MANIFEST, json.dumps(manifest, indent=1) + "\\n")',
        '                               "bytes": path.stat().st_size, "sha256": file_sha256(path)})',
        ("tests/test_cache.py::test_a_killed_build_resumes_after_its_last_whole_shard",),
        "the manifest is written only at the end: a killed build keeps no shard and starts over",
    ),
    Mutation(
        "cache-resume-from-the-start", "minillm_kernels/training/cache.py",
        '    start = manifest["shards"][-1]["rows"][1] if manifest["shards"] else 0',
        "    start = 0",
        ("tests/test_cache.py::test_a_killed_build_resumes_after_its_last_whole_shard",),
        "a resumed build starts again from row 0 after its whole shards: the rows of the first shard are cached twice",
    ),
    Mutation(
        "cache-teacher-weights-not-compared", "minillm_kernels/training/cache.py",
        '    return {"teacher": config.model.teacher, "teacher weights sha256": teacher_sha256,',
        '    return {"teacher": config.model.teacher, "teacher weights sha256": None,',
        ("tests/test_cache.py::test_a_cache_built_for_another_run_is_refused_naming_what_differs", "-k", "teacher"),
        "a cache built with another teacher's weights (of the same name or path) trains a run as its teacher",
    ),
    Mutation(
        "cache-teacher-one-position-late", "minillm_kernels/training/cache.py",
        "        scores = sparse_scores(logits[mask], batch.labels[mask],",
        "        scores = sparse_scores(logits.roll(-1, dims=1)[mask], batch.labels[mask],",
        ("tests/test_cache.py::test_kd_from_a_cache_of_the_whole_vocabulary_trains_as_the_live_teacher",),
        "the cache stores the teacher's distribution of the token after the one each position predicts",
    ),
    Mutation(
        "opd-advantage-sign", "minillm_kernels/training/methods.py",
        "        advantages = mk.log_ratio_rewards(sample.teacher_logprob - sample.student_logprob, mask,",
        "        advantages = mk.log_ratio_rewards(sample.student_logprob - sample.teacher_logprob, mask,",
        ("tests/test_opd.py::test_the_sampled_estimator_s_expected_gradient_is_the_exact_per_token_reverse_kl_s",),
        "opd's sampled advantage is log q - log p: its policy gradient climbs the reverse KL",
    ),
    Mutation(
        "opd-sampled-discounted-returns", "minillm_kernels/training/methods.py",
        "        logprob = run.model(response_logprob, sample,",
        "        advantages = mk.length_normalized_returns(advantages, mask, gamma=0.95)\n"
        "        logprob = run.model(response_logprob, sample,",
        ("tests/test_opd.py::test_the_sampled_estimator_s_expected_gradient_is_the_exact_per_token_reverse_kl_s",),
        "opd's sampled advantage sums the later tokens' log-ratios (MiniLLM's returns) instead of discount 0: not the "
        "per-token reverse KL's gradient",
    ),
    Mutation(
        "opd-exact-forward-kl", "minillm_kernels/training/methods.py",
        '                                 divergence="reverse_kl", temperature=temperature, vocab_size=run.vocab_size)',
        '                                 divergence="forward_kl", temperature=temperature, vocab_size=run.vocab_size)',
        ("tests/test_opd.py::test_the_sampled_estimator_s_expected_gradient_is_the_exact_per_token_reverse_kl_s",),
        "opd's exact estimator with the teacher in memory differentiates the forward KL",
    ),
    Mutation(
        "served-teacher-ranks-not-sorted", "minillm_kernels/training/teacher.py",
        '                ranked = sorted((entry["rank"], int(token), entry["logprob"])',
        '                ranked = list((entry["rank"], int(token), entry["logprob"])',
        ("tests/test_opd.py::test_the_http_teacher_scores_as_the_teacher_in_process",),
        "the HTTP teacher takes a position's first K entries as they come in the JSON (vLLM's dict has no order) "
        "instead of the K best ranks",
    ),
    Mutation(
        "served-teacher-last-position-dropped", "minillm_kernels/training/teacher.py",
        "            for j in range(max(1, first + 1 - start), end - start):",
        "            for j in range(max(1, first + 1 - start), end - start - 1):",
        ("tests/test_opd.py::test_the_http_teacher_scores_as_the_teacher_in_process",),
        "the HTTP teacher skips each prompt's last token: the last response token of every row is never scored",
    ),
    Mutation(
        "sampling-without-teacher-unfiltered", "minillm_kernels/sampling.py",
        "            mixture = student_filtered.exp()",
        "            mixture = student_scaled.softmax(-1)",
        ("tests/test_sampling.py::test_without_a_teacher_the_student_samples_alone_the_same_draws_as_at_alpha_0",),
        "the student sampling alone ignores top-k / top-p: other draws than with a teacher at alpha 0",
    ),
    Mutation(
        "ppo-loss-without-clip-clips", "minillm_kernels/objective.py",
        "    if clip is None:\n        return -_masked_mean(ratio * advantages, mask)",
        "    clip = PPO_CLIP if clip is None else clip",
        ("tests/test_objective.py::test_ppo_policy_loss_without_a_clip_is_the_importance_sampling_loss",),
        "ppo_policy_loss(clip=None) clips at the default 0.2 instead of not at all",
    ),
    Mutation(
        "plan-run-takes-the-base-cache", "examples/train.py",
        "        cache = caches.get(run_config.teacher.teacher_cache)",
        "        cache = caches.get(config.teacher.teacher_cache)",
        ("tests/test_cache.py::test_runs_of_one_plan_each_take_their_own_teacher_form",),
        "a planned run's --teacher-cache is ignored under a base config without one: it trains on the dense teacher",
    ),
    # ---- the trainer under DDP and FSDP2 (2 gloo processes)
    Mutation(
        "fused-linear-outside-ddp", "minillm_kernels/training/methods.py",
        "        stats = run.model(owned_token_stats, sample, teacher_outputs, teacher_head,",
        "        stats = owned_token_stats(mk.sampling.unwrapped(run.model), sample, teacher_outputs, teacher_head,",
        ("tests/test_train.py::test_ddp_fused_linear_gives_one_process_losses",),
        "the fused-linear terms run on the student inside DDP, not through it: no gradient is all-reduced",
    ),
    Mutation(
        "eval-mode-restores-the-wrapper-flag", "minillm_kernels/training/evaluation.py",
        "        for module, training in modes:\n            module.training = training",
        "        model.train(modes[0][1])",
        ("tests/test_distributed.py::test_eval_mode_restores_each_module_through_a_wrapper",
         "tests/test_train.py::test_minillm_updates_run_without_dropout"),
        "eval_mode restores the wrapper's flag recursively: a student in eval() mode inside a ModelRunner gets dropout",
    ),
)


def selected_paths(tests: tuple[str, ...]) -> tuple[str, ...]:
    """The node ids and files of a mutation's pytest arguments, without ``-k`` and its expression: the baseline
    runs the union of those (a superset of every mutation's selection)."""
    paths, skip = [], False
    for arg in tests:
        if not skip and arg != "-k":
            paths.append(arg)
        skip = arg == "-k"
    return tuple(paths)


def copy_tree(destination: Path) -> None:
    shutil.copytree(ROOT, destination, ignore=shutil.ignore_patterns(*SKIPPED_IN_COPY), symlinks=True)


def rebuilds_the_cpu_kernel(mutation: Mutation) -> bool:
    """Whether the mutation is in a source of the CPU kernel's build (``csrc/cpu``, ``csrc/common``)."""
    return mutation.path.startswith(("csrc/cpu/", "csrc/common/"))


class Outcome(NamedTuple):
    """How a pytest run ended: ``verdict`` is "passed", "failed" (tests failed, collection errors included: the suite
    would fail), "timeout" or "error" (pytest could not run the selection: a node id that does not exist, a ``-k``
    that selects nothing, an internal error); ``cpu_seconds``: the CPU time of pytest and its subprocesses."""

    verdict: str
    seconds: float
    cpu_seconds: float
    output: str


PYTEST_VERDICTS = {0: "passed", 1: "failed", 2: "failed"}  # pytest's exit codes; 2: interrupted (collection errors)
MUTATION_VERDICTS = {"passed": "MISSED", "failed": "caught", "timeout": "caught", "error": "ERROR"}  # (a hang: caught)

# Each pytest run is a process forked from a server that has imported these (and nothing of this project): torch,
# triton, the distributed tensors minillm_kernels.parallel imports, transformers and its Llama (the tiny default's
# model), matplotlib's pyplot (the benchmarks' plots). A fresh interpreter spends ~5 CPU seconds importing them, more
# than most mutations' tests take. (Not TRL: it starts pyarrow's allocator thread, which a forking server must not
# have.)
PRELOADED = ("torch", "triton", "torch.distributed.tensor", "torch._dynamo", "numpy", "pytest", "transformers",
             "transformers.models.llama.modeling_llama", "matplotlib.pyplot")
CPU_SECONDS_MARK = "[mutation harness] CPU seconds: "


def _pytest_in_this_process(copy: str, args: list[str], env: dict[str, str], log: str) -> None:
    """The forked child: pytest ``args`` in ``copy`` with the environment ``env``, its output to ``log``; exits with
    pytest's exit code. In a session of its own, so that a timeout kills its subprocesses too."""
    os.setsid()
    output = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(output, 1)
    os.dup2(output, 2)
    os.environ.clear()
    os.environ.update(env)
    sys.dont_write_bytecode = True  # (the server's interpreter read its flag at start: worker_environment's, here)
    os.chdir(copy)
    sys.path[:] = [copy, *(entry for entry in sys.path if Path(entry or ".").resolve() != ROOT)]  # the copy's code
    import pytest

    code = pytest.main(args)
    times = os.times()
    print(f"\n{CPU_SECONDS_MARK}{times.user + times.system + times.children_user + times.children_system:.1f}")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code))


def pytest_server() -> multiprocessing.context.BaseContext:
    """The multiprocessing context whose processes fork from a server with ``PRELOADED`` imported. Triton's
    interpreter is chosen as tests/conftest.py chooses it (before triton is imported), here before the server starts."""
    if not torch_sees_a_gpu():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", *PRELOADED])
    return context


def torch_sees_a_gpu() -> bool:
    done = subprocess.run([sys.executable, "-c", "import torch, sys; sys.exit(not torch.cuda.is_available())"],
                          capture_output=True, check=False)
    return done.returncode == 0


class Worker(NamedTuple):
    """One copy of the working tree and its C++ build cache. Every mutation of a worker
    shares the cache: torch's JIT writes the same build file and ninja recompiles only the translation units whose
    sources (headers included) changed since the last build. ``compiler``: the builds' $CXX (``compile_or_reuse``),
    None for the compiler as it is."""

    copy: Path
    extensions: Path
    scratch: Path
    compiler: Path | None = None


def worker_environment(worker: Worker) -> dict[str, str]:
    """The environment of a worker's pytest runs and builds: its copy's code and its build cache (and compiler)."""
    env = {**os.environ, "PYTHONPATH": str(worker.copy), "TORCH_EXTENSIONS_DIR": str(worker.extensions),
           "PYTHONDONTWRITEBYTECODE": "1"}  # (a module's bytecode cached before its plant, stale by then, could run)
    if worker.compiler is not None:
        env.update({"CXX": str(worker.compiler), COMPILER_ENV: os.environ.get("CXX", "c++")})
    return env


# ---- the suite's objects of the CPU kernel, reused by the workers' builds
# Each worker's first build of the kernel would compile every translation unit (~2 CPU min), as would the rebuild of
# a unit after its mutation is restored: both compile sources the suite has just compiled. The workers' $CXX is this
# script (``compile_or_reuse``), which copies the suite's object instead where the unit's source and headers in the
# copy are byte for byte the checkout's, its build flags are the suite's and the object is newer than those sources.
COMPILER_ENV = "MINILLM_MUTATIONS_CXX"  # the compiler the wrapper stands for
SUITE_BUILD_ENV = "MINILLM_MUTATIONS_SUITE_BUILD"  # the suite's build folder of the CPU kernel


def build_flags(build_folder: Path) -> str | None:
    """The ``cflags`` line of a torch JIT build file (None without one)."""
    build_file = build_folder / "build.ninja"
    if not build_file.is_file():
        return None
    return next((line for line in build_file.read_text().splitlines() if line.startswith("cflags = ")), None)


def builds_from(build_folder: Path, source: Path) -> bool:
    """Whether the torch JIT build file in ``build_folder`` compiles ``source`` (its path: a shared cache may hold
    another checkout's build)."""
    build_file = build_folder / "build.ninja"
    return build_file.is_file() and f": compile {source}\n" in build_file.read_text()


def suite_object(source: Path, output: str) -> Path | None:
    """The suite's object for compiling ``source`` (a unit of a copy's csrc/cpu) to ``output`` in the current folder (a
    worker's build folder), if the suite's build compiled the same unit with the same flags: ``reusable`` then says
    whether its sources are the same."""
    suite = os.environ.get(SUITE_BUILD_ENV)
    if not suite or source.parent.name != "cpu" or source.parents[1].name != "csrc":
        return None
    suite_build, built = Path(suite), Path(suite) / output
    if (not built.is_file() or not builds_from(suite_build, ROOT / "csrc" / "cpu" / source.name)
            or build_flags(Path.cwd()) is None or build_flags(suite_build) != build_flags(Path.cwd())):
        return None
    return built


def reusable(built: Path, copy: Path, dependencies: list[str]) -> bool:
    """Whether the suite's object ``built`` stands for a unit of ``copy`` whose ``dependencies`` (its source and
    headers, from the preprocessor) are these: those in the copy byte for byte the checkout's, which the object is newer
    than."""
    for dependency in dependencies:
        if not dependency.startswith(f"{copy}/"):
            continue  # (torch's headers, the same for both)
        ours = ROOT / Path(dependency).relative_to(copy)
        if not ours.is_file() or ours.stat().st_mtime > built.stat().st_mtime:
            return False
        if ours.read_bytes() != Path(dependency).read_bytes():
            return False
    return True


def compile_or_reuse(args: list[str]) -> int:
    """``$CXX args`` of a worker's build: for a compile (``-c SOURCE -o OUTPUT``) of a unit the suite has built
    (``suite_object``), the preprocessor writes the dependency file (``-E`` with the build's ``-MMD -MF``) and, if those
    sources are the suite's (``reusable``), the suite's object is copied; else the compiler itself (linking, the ISA
    macros, a unit with a mutation planted)."""
    compiler = os.environ.get(COMPILER_ENV, "c++")
    if "-c" in args and "-o" in args and "-MF" in args:
        source, output = Path(args[args.index("-c") + 1]), args[args.index("-o") + 1]
        built = suite_object(source, output)
        if built is not None:
            compile_part = {args.index("-c"), args.index("-c") + 1, args.index("-o"), args.index("-o") + 1}
            rest = [arg for i, arg in enumerate(args) if i not in compile_part]
            done = subprocess.run([compiler, *rest, "-MT", output, "-E", str(source), "-o", os.devnull], check=False)
            depfile = Path(args[args.index("-MF") + 1])
            if done.returncode == 0 and depfile.is_file():
                dependencies = depfile.read_text().replace("\\\n", " ").split(":", 1)[-1].split()
                if reusable(built, source.parents[2], dependencies):
                    shutil.copyfile(built, output)
                    return 0
    return subprocess.run([compiler, *args], check=False).returncode


def compiler_wrapper(scratch: Path) -> Path:
    """An executable that runs ``compile_or_reuse`` with its arguments (a worker's $CXX)."""
    wrapper = scratch / "c++"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{Path(__file__).resolve()}" --compile-or-reuse "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def suite_build_folder() -> Path | None:
    """The build folder of the CPU kernel that the test suite (this environment, this checkout) uses."""
    done = subprocess.run(
        [sys.executable, "-c", "from torch.utils.cpp_extension import _get_build_directory; "
         "from minillm_kernels import _build; "
         "print(_get_build_directory(_build.build_config(_build.host_isa_level())[0], False))"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, check=False)
    folder = Path(done.stdout.strip()) if done.returncode == 0 else None
    return folder if folder is not None and folder.is_dir() else None


def run_tests(context, worker: Worker, tests: tuple[str, ...], *, stop_first: bool) -> Outcome:
    """pytest on ``tests`` in the worker's copy, with its C++ build cache."""
    env = worker_environment(worker)
    args = ["-q", "-p", "no:cacheprovider", *(["-x"] if stop_first else []), *tests]
    log = worker.scratch / "pytest.log"
    started = time.time()
    process = context.Process(target=_pytest_in_this_process, args=(str(worker.copy), args, env, str(log)))
    process.start()
    process.join(TIMEOUT_S)
    timed_out = process.is_alive()
    if timed_out:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # (the child leads its own session: its subprocesses go too)
        except ProcessLookupError:  # (it ended meanwhile)
            pass
        process.join()
        for lock in worker.extensions.glob("*/lock"):  # a build killed mid-way leaves its lock: the next would wait
            lock.unlink()
    output = log.read_text(errors="replace") if log.exists() else ""
    cpu = float(output.rsplit(CPU_SECONDS_MARK, 1)[1].split()[0]) if CPU_SECONDS_MARK in output else float("nan")
    if timed_out:
        return Outcome("timeout", time.time() - started, cpu, output + f"\ntimed out after {TIMEOUT_S} s")
    # A crash (a signal) fails the suite as a failed test does.
    verdict = "failed" if process.exitcode < 0 else PYTEST_VERDICTS.get(process.exitcode, "error")
    return Outcome(verdict, time.time() - started, cpu, output)


def failed_tests(output: str) -> list[str]:
    """The FAILED / ERROR lines of pytest's short summary in ``output``."""
    return [line for line in output.splitlines() if line.startswith(("FAILED ", "ERROR "))]


def planted(text: str, mutation: Mutation) -> str:
    """``text`` (of the mutation's file) with the bug planted; exits naming the mutation unless its snippet occurs
    exactly once."""
    if text.count(mutation.old) != 1:
        raise SystemExit(f"mutation {mutation.name}: the snippet occurs {text.count(mutation.old)} times in "
                         f"{mutation.path} (it must occur once):\n{mutation.old}")
    return text.replace(mutation.old, mutation.new)


def rewrite(copy: Path, mutation: Mutation, text: str) -> None:
    """Write ``text`` to the mutation's file in ``copy``. For a mutation ``built_in`` some units, the header keeps its
    modification time and the units' sources are touched instead: ninja, which judges by times, rebuilds those
    only, and the other units keep their unmutated objects (the header's functions are inlined, C10_ALWAYS_INLINE, or
    emitted by a unit linked before the others: a copy of an unmutated unit chosen by the linker would show as a
    missed mutation, not a false catch)."""
    path = copy / mutation.path
    if mutation.built_in is None:
        path.write_text(text)
        return
    stamp = path.stat()
    path.write_text(text)
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    for unit in mutation.built_in:
        (copy / unit).touch()


def check_mutation(context, worker: Worker, mutation: Mutation) -> Outcome:
    """Plant ``mutation`` in the worker's copy, run its tests (stopping at the first failure), restore the file."""
    original = (worker.copy / mutation.path).read_text()
    rewrite(worker.copy, mutation, planted(original, mutation))
    try:
        return run_tests(context, worker, mutation.tests, stop_first=True)
    finally:
        rewrite(worker.copy, mutation, original)


def build_cpu_kernel(worker: Worker) -> None:
    """The worker's copy's CPU kernel, unmutated, in its build cache: a mutation ``built_in`` some units must find the
    other units' objects built from the unmutated sources."""
    env = worker_environment(worker)
    done = subprocess.run([sys.executable, "-c", "from minillm_kernels import _build; "
                           "import sys; sys.exit(_build.load_cpu_extension() is None)"],
                          cwd=worker.copy, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the unmutated CPU kernel did not build in {worker.copy}:\n{done.stdout}{done.stderr}")


def kernel_units() -> tuple[str, ...]:
    """The CPU kernel's translation units, as minillm_kernels/_build.py lists them (``CPU_UNITS``), read from its
    source, not imported: the pytest server preloads this module, and its children import the package from their
    copy."""
    build = ast.parse((ROOT / "minillm_kernels" / "_build.py").read_text())
    units = next(node.value for node in build.body
                 if isinstance(node, ast.Assign) and [ast.unparse(t) for t in node.targets] == ["CPU_UNITS"])
    return tuple(f"csrc/cpu/{unit}" for unit in ast.literal_eval(units))


KERNEL_UNITS = kernel_units()


def units_rebuilt_after(mutation: Mutation) -> tuple[str, ...]:
    """The CPU kernel's translation units that the next build compiles after the mutation is restored."""
    if mutation.built_in is not None:
        return mutation.built_in
    return (mutation.path,) if mutation.path.endswith(".cpp") else KERNEL_UNITS


def share_native_mutations(native: list[Mutation], workers: int) -> list[list[Mutation]]:
    """The CPU kernel's mutations split among ``workers``, those rebuilding the same translation units (a .cpp's, or
    ``built_in``; a header's without it, every unit including it) on one worker in a row: the restore of one and the
    plant of the next cost one build of the units."""
    by_unit: dict[str, list[Mutation]] = {}
    for mutation in native:
        units = mutation.path if mutation.built_in is None else " ".join(mutation.built_in)
        by_unit.setdefault(units, []).append(mutation)
    shares: list[list[Mutation]] = [[] for _ in range(workers)]
    for unit in sorted(by_unit, key=lambda u: -len(by_unit[u])):
        min(shares, key=len).extend(by_unit[unit])
    return shares


def report(index: int, total: int, mutation: Mutation, outcome: Outcome) -> None:
    print(f"[{index:3}/{total}] {MUTATION_VERDICTS[outcome.verdict]:6} {mutation.name:44} {outcome.seconds:4.0f} s "
          f"{outcome.cpu_seconds:4.0f} CPU s  {mutation.bug}"
          + (f" (timed out after {TIMEOUT_S} s: a hang, or a machine far too loaded)"
             if outcome.verdict == "timeout" else ""), flush=True)
    if outcome.verdict == "error":
        print(outcome.output[-3000:])


def check_all(context, workers: list[Worker], chosen: list[Mutation]) -> dict[str, Outcome]:
    """Each mutation checked in one of the workers' copies, one per worker at a time. The CPU kernel's mutations
    first, shared among the workers by file (``share_native_mutations``), then the others from a common queue. Prints
    a line per mutation as it finishes."""
    index = {mutation.name: i for i, mutation in enumerate(chosen, 1)}
    native = [m for m in chosen if rebuilds_the_cpu_kernel(m)]
    others: Queue[Mutation] = Queue()
    for mutation in chosen:
        if not rebuilds_the_cpu_kernel(mutation):
            others.put(mutation)
    outcomes: dict[str, Outcome] = {}
    lock = threading.Lock()

    def record(mutation: Mutation, outcome: Outcome) -> None:
        with lock:
            outcomes[mutation.name] = outcome
            report(index[mutation.name], len(chosen), mutation, outcome)

    def work(worker: Worker, share: list[Mutation]) -> None:
        pending = set(KERNEL_UNITS)  # the units whose sources changed since the worker's last build
        for mutation in share:
            # A mutation built_in some units keeps its header's time: a unit rebuilt during its tests for another
            # reason (left to rebuild by the last restore) would take the planted header into an object that ninja
            # then thinks current. So those are built first, unmutated.
            if mutation.built_in is not None and not pending <= set(mutation.built_in):
                build_cpu_kernel(worker)
            record(mutation, check_mutation(context, worker, mutation))
            pending = set(units_rebuilt_after(mutation))
        while True:
            try:
                mutation = others.get_nowait()
            except Empty:
                return
            record(mutation, check_mutation(context, worker, mutation))

    print(f"{len(chosen)} mutations ({len(native)} in the CPU kernel), {len(workers)} at a time ...", flush=True)
    shares = share_native_mutations(native, len(workers))
    with ThreadPoolExecutor(max_workers=len(workers)) as pool:
        for future in [pool.submit(work, worker, share) for worker, share in zip(workers, shares)]:
            future.result()
    return outcomes


def default_jobs() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--compile-or-reuse"]:  # (a worker's $CXX: compiler_wrapper)
        return compile_or_reuse(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these mutations only")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--jobs", type=int, default=default_jobs(),
                        help="mutations checked at once, each in its own copy of the tree (default: the CPUs here)")
    parser.add_argument("--skip-baseline", action="store_true",
                        help="do not first run the named tests on the unmutated copy: for a tree whose whole suite "
                             "has just passed (scripts/test.sh)")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.only and len(chosen) != len(set(args.only)):
        unknown = set(args.only) - {m.name for m in MUTATIONS}
        parser.error(f"unknown mutation(s): {', '.join(sorted(unknown))}")
    if args.list:
        for m in chosen:
            print(f"{m.name:44} {m.path}: {m.bug}\n{'':44} caught by {' '.join(m.tests)}")
        return 0

    for mutation in chosen:  # every snippet present once, before anything runs
        planted((ROOT / mutation.path).read_text(), mutation)
    started = time.time()
    jobs = max(1, min(args.jobs, len(chosen)))
    context = pytest_server()
    with tempfile.TemporaryDirectory(prefix="minillm-mutations-") as scratch:
        suite_build = suite_build_folder()
        compiler = None
        if suite_build is not None:
            os.environ[SUITE_BUILD_ENV] = str(suite_build)
            compiler = compiler_wrapper(Path(scratch))
        workers = []
        for i in range(jobs):
            folder = Path(scratch) / f"worker-{i}"
            workers.append(Worker(folder / "repo", folder / "extensions", folder, compiler))
            copy_tree(workers[-1].copy)
        if not args.skip_baseline:
            tests = tuple(dict.fromkeys(t for m in chosen for t in selected_paths(m.tests)))
            print(f"baseline: {len(tests)} test selections on the unmutated copy ...", flush=True)
            baseline = run_tests(context, workers[0], tests, stop_first=False)
            if baseline.verdict != "passed":
                print(baseline.output[-3000:])
                failing = failed_tests(baseline.output)
                print(f"baseline {baseline.verdict.upper()} ({baseline.seconds:.0f} s): the tests must pass before any "
                      f"bug is planted" + (":\n" + "\n".join(failing) if failing else ""))
                return 1
            print(f"baseline passed ({baseline.seconds:.0f} s, {baseline.cpu_seconds:.0f} CPU s)")
        outcomes = check_all(context, workers, chosen)
    missed = [m.name for m in chosen if outcomes[m.name].verdict == "passed"]
    broken = [m.name for m in chosen if outcomes[m.name].verdict == "error"]
    print(f"{len(chosen) - len(missed) - len(broken)} of {len(chosen)} planted bugs caught in "
          f"{(time.time() - started) / 60:.1f} min ({jobs} at a time, "
          f"{sum(o.cpu_seconds for o in outcomes.values()) / 60:.1f} CPU min)"
          + (f"; missed: {', '.join(missed)}" if missed else "")
          + (f"; tests could not run (see above): {', '.join(broken)}" if broken else ""))
    return 1 if missed or broken else 0


if __name__ == "__main__":
    sys.exit(main())
