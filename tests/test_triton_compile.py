"""The Triton kernels compile for the H100 (sm_90) even on a machine without a GPU.

The interpreter runs the kernels as numpy and misses what only the compiler rejects (globals that
are not constexpr, loop-carried type changes, ...); ``triton.compile`` with an explicit target uses
the ptxas bundled with Triton and needs no GPU. It runs in a fresh process without
``TRITON_INTERPRET`` (under which ``@triton.jit`` gives interpreted functions).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

DTYPES = ("bf16", "fp16", "fp32", "fp64")
SHARED = dict(student_ptr="*{student}", teacher_ptr="*{teacher}", target_ptr="*i64", mask_ptr="*i1")
# Each tensor's rows (rows_per_outer, outer_stride, inner_stride): some i32 and some i64, as Triton types them by
# whether they fit in 32 bits (the offsets are int64 either way: they come from the int64 row index).
ROW_STRIDES = dict(
    student_rows_per_outer="i32", student_outer_stride="i64", student_inner_stride="i32",
    teacher_rows_per_outer="i32", teacher_outer_stride="i32", teacher_inner_stride="i64",
)
SIGNATURES = {
    "forward": dict(
        SHARED, kl_ptr="*{stats}", student_logprob_ptr="*{stats}", teacher_logprob_ptr="*{stats}",
        entropy_ptr="*{stats}", row_stats_ptr="*{stats}", **ROW_STRIDES, vocab_size="i32", inv_temperature="fp64",
    ),
    "backward": dict(
        SHARED, grad_kl_ptr="*{stats}", grad_student_logprob_ptr="*{stats}", grad_entropy_ptr="*{stats}",
        kl_ptr="*{stats}", entropy_ptr="*{stats}", row_stats_ptr="*{stats}", grad_student_ptr="*{student}",
        **ROW_STRIDES, student_width="i32", vocab_size="i32", inv_temperature="fp64",
    ),
}
# Every (student, teacher) dtype pair with a target and a mask; the same-dtype pairs also without.
CASES = [
    (kernel, student, teacher, flags)
    for kernel in SIGNATURES
    for student in DTYPES
    for teacher in DTYPES
    for flags in ((True, False) if student == teacher else (True,))
]
# The divergence family (ops/divergence_triton.py): every divergence, with a mask, on the dtype pairs that take each
# path (float32, a bfloat16 student and its rounded store, a float16 teacher, float64 accumulation); fp32 unmasked.
DIVERGENCE_SIGNATURES = {
    "forward": dict(
        student_ptr="*{student}", teacher_ptr="*{teacher}", mask_ptr="*i1", value_ptr="*{stats}",
        mean_partial_ptr="*{stats}", row_stats_ptr="*{stats}", **ROW_STRIDES, vocab_size="i32",
        coefficient="fp64", teacher_weight="fp64", inv_temperature="fp64",
    ),
    "backward": dict(
        student_ptr="*{student}", teacher_ptr="*{teacher}", mask_ptr="*i1", grad_divergence_ptr="*{stats}",
        mean_partial_ptr="*{stats}", row_stats_ptr="*{stats}", grad_student_ptr="*{student}", **ROW_STRIDES,
        student_width="i32", vocab_size="i32", coefficient="fp64", teacher_weight="fp64", inv_temperature="fp64",
    ),
}
DIVERGENCE_DTYPE_PAIRS = (("fp32", "fp32"), ("bf16", "fp32"), ("fp32", "fp16"), ("fp64", "bf16"))
DIVERGENCE_CASES = [
    ("divergence_" + kernel, divergence, student, teacher, has_mask)
    for kernel in DIVERGENCE_SIGNATURES
    for divergence in range(5)
    for student, teacher in DIVERGENCE_DTYPE_PAIRS
    for has_mask in ((True, False) if student == teacher else (True,))
]


def compile_all() -> dict[str, str]:
    """Compile every case for sm_90: ``{case: "ok" or the error}``."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget

    from minillm_kernels.ops import divergence_triton, reverse_kld_triton

    def compile_case(case, kernel, signature_kinds, student, teacher, constexprs):
        acc = "fp64" if "fp64" in (student, teacher) else "fp32"
        constexprs = {**constexprs, "ACC_DTYPE": tl.float64 if acc == "fp64" else tl.float32}
        signature = {name: kind.format(student=student, teacher=teacher, stats=acc)
                     for name, kind in signature_kinds.items()}
        signature.update(dict.fromkeys(constexprs, "constexpr"))
        try:
            source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
            results[str(case)] = "ok" if compiled.asm["cubin"] else "no cubin"
        except Exception as error:  # reported per case by the test
            results[str(case)] = f"{type(error).__name__}: {error}"

    results = {}
    for case in DIVERGENCE_CASES:
        name, divergence, student, teacher, has_mask = case
        compile_case(case, getattr(divergence_triton, f"_{name}_kernel"),
                     DIVERGENCE_SIGNATURES[name.removeprefix("divergence_")], student, teacher,
                     {"DIVERGENCE": divergence, "HAS_MASK": has_mask, "BLOCK_V": 4096,
                      # the forward with given row statistics (a sharded vocabulary's) where masked
                      **({"GIVEN_STATS": has_mask} if name == "divergence_forward" else {})})
    for case in CASES:
        kernel_name, student, teacher, flags = case
        compile_case(case, getattr(reverse_kld_triton, f"_reverse_kld_{kernel_name}_kernel"), SIGNATURES[kernel_name],
                     student, teacher, {"HAS_TARGET": flags, "HAS_MASK": flags, "BLOCK_V": 4096})
    return results


@pytest.fixture(scope="module")
def compile_results() -> dict[str, str]:
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    if done.returncode != 0:
        pytest.fail(f"the compile run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("case", CASES + DIVERGENCE_CASES, ids=lambda case: "-".join(map(str, case)))
def test_kernel_compiles_for_sm90(compile_results, case):
    result = compile_results[str(case)]
    if result.startswith(("ImportError", "TypeError")) and "ASTSource" in result:
        pytest.skip(f"this Triton's compile API differs: {result}")
    assert result == "ok", result


if __name__ == "__main__":
    print(json.dumps(compile_all()))
