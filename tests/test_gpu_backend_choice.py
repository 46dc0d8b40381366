"""``backend="auto"`` on CUDA tensors: the faster GPU kernel per dtype and vocabulary size, from the measured table.

No GPU is needed: the table is read from temporary files and the available backends are set by hand.
"""
from __future__ import annotations

import json

import pytest
import torch

from minillm_kernels import backends

CUDA = torch.device("cuda")  # only compared, never allocated on


def write_table(tmp_path, rules):
    path = tmp_path / "gpu_backend_choice.json"
    path.write_text(json.dumps({"device": "a test GPU", "rules": rules}))
    return path


@pytest.fixture
def measured(monkeypatch, tmp_path):
    """A table: bf16 Triton below V = 32768 and CUDA from there; fp32 CUDA everywhere; no fp16 rule."""
    rules = [
        {"dtype": "bfloat16", "min_vocab": 32768, "backend": "cuda", "triton_ms": 2.0, "cuda_ms": 1.5},
        {"dtype": "bfloat16", "min_vocab": 0, "backend": "triton"},
        {"dtype": "float32", "min_vocab": 0, "backend": "cuda"},
    ]
    monkeypatch.setattr(backends, "_gpu_backend_choice", backends.load_gpu_backend_choice(write_table(tmp_path, rules)))


def set_available(monkeypatch, *names):
    monkeypatch.setattr(backends, "_usable", {name: name in ("reference", *names) for name in backends.BACKENDS})


def test_table_is_read_into_sorted_rules_per_dtype(tmp_path):
    path = write_table(tmp_path, [
        {"dtype": "bfloat16", "min_vocab": 65536, "backend": "cuda"},
        {"dtype": "bfloat16", "min_vocab": 0, "backend": "triton"},
        {"dtype": "float16", "min_vocab": 1000, "backend": "cuda"},
    ])
    assert backends.load_gpu_backend_choice(path) == {
        torch.bfloat16: ((0, "triton"), (65536, "cuda")),
        torch.float16: ((1000, "cuda"),),
    }


def test_no_table_means_no_rules(tmp_path):
    assert backends.load_gpu_backend_choice(tmp_path / "absent.json") == {}


def test_the_committed_table_is_what_auto_reads():
    """A committed table has rules and says which device measured them; without one, auto has no rules (Triton)."""
    path = backends.GPU_BACKEND_CHOICE_FILE
    assert backends._gpu_backend_choice == backends.load_gpu_backend_choice(path)
    if path.is_file():
        assert json.loads(path.read_text())["device"] and backends._gpu_backend_choice
    else:
        assert backends._gpu_backend_choice == {}


@pytest.mark.parametrize(
    "rule, complaint",
    [
        ({"dtype": "bfloat17", "min_vocab": 0, "backend": "cuda"}, "dtype"),
        ({"dtype": "int64", "min_vocab": 0, "backend": "cuda"}, "dtype"),
        ({"dtype": "bfloat16", "min_vocab": -1, "backend": "cuda"}, "min_vocab"),
        ({"dtype": "bfloat16", "min_vocab": 1.5, "backend": "cuda"}, "min_vocab"),
        ({"dtype": "bfloat16", "min_vocab": 0, "backend": "cpu"}, "backend"),
    ],
)
def test_malformed_rules_are_refused(tmp_path, rule, complaint):
    with pytest.raises(ValueError, match=complaint):
        backends.load_gpu_backend_choice(write_table(tmp_path, [rule]))


@pytest.mark.parametrize(
    "dtype, vocab_size, expected",
    [
        (torch.bfloat16, 32000, "triton"),
        (torch.bfloat16, 32768, "cuda"),
        (torch.bfloat16, 151936, "cuda"),
        (torch.float32, 7, "cuda"),
        (torch.float16, 151936, "triton"),  # no rule: Triton
    ],
)
def test_auto_picks_the_measured_faster_kernel(measured, monkeypatch, dtype, vocab_size, expected):
    set_available(monkeypatch, "triton", "cuda")
    assert backends.choose_backend("auto", CUDA, dtype, vocab_size) == expected


def test_auto_without_a_table_picks_triton(monkeypatch):
    monkeypatch.setattr(backends, "_gpu_backend_choice", {})
    set_available(monkeypatch, "triton", "cuda")
    assert backends.choose_backend("auto", CUDA, torch.bfloat16, 151936) == "triton"


def test_auto_falls_back_to_the_other_gpu_kernel_then_the_reference(measured, monkeypatch):
    set_available(monkeypatch, "triton")
    assert backends.choose_backend("auto", CUDA, torch.float32, 4096) == "triton"
    set_available(monkeypatch, "cuda")
    assert backends.choose_backend("auto", CUDA, torch.bfloat16, 1024) == "cuda"
    set_available(monkeypatch, "cpu")
    assert backends.choose_backend("auto", CUDA, torch.bfloat16, 1024) == "reference"


def test_auto_on_cpu_tensors_ignores_the_table(measured, monkeypatch):
    set_available(monkeypatch, "cpu", "triton", "cuda")
    assert backends.choose_backend("auto", torch.device("cpu"), torch.float32, 4096) == "cpu"


def test_cuda_backend_refuses_cpu_tensors(monkeypatch):
    set_available(monkeypatch, "cpu", "cuda")
    with pytest.raises(ValueError, match="'cuda' needs CUDA tensors"):
        backends.choose_backend("cuda", torch.device("cpu"), torch.float32, 4096)


def test_the_choice_traces_under_torch_compile(measured, monkeypatch):
    """The lookup runs inside torch.compile(fullgraph=True) (the dispatcher is traced with the loss)."""
    set_available(monkeypatch, "triton", "cuda")

    def branch(x):
        return x + 1 if backends.choose_backend("auto", CUDA, x.dtype, x.shape[-1]) == "cuda" else x - 1

    compiled = torch.compile(branch, fullgraph=True, backend="eager")
    x = torch.randn(2, 40000, dtype=torch.bfloat16)
    torch.testing.assert_close(compiled(x), x + 1)
    y = torch.randn(2, 100, dtype=torch.bfloat16)
    torch.testing.assert_close(compiled(y), y - 1)
