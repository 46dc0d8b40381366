"""examples/train.py on the tiny default: each method, checkpoint + resume, NaN stop, DDP on 2 CPU processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="the train extra (transformers) is not installed")
from minillm_kernels.tiny import checkpoint_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import train  # noqa: E402  (examples/train.py)

try:
    checkpoint_dir("student-sft")
except FileNotFoundError as missing:  # the checkpoints ship with the repository; this is a broken checkout
    pytest.fail(str(missing), pytrace=False)

FAST = ["--batch-size", "8", "--max-new-tokens", "8", "--eval-every", "0", "--threads", "1"]


@pytest.fixture(scope="module")
def heldout_file(tmp_path_factory) -> Path:
    """A 10-prompt held-out file, so that the before/after evaluations stay cheap."""
    from minillm_kernels.tiny import tiny_splits

    path = tmp_path_factory.mktemp("data") / "heldout.jsonl"
    path.write_text("".join(json.dumps(e._asdict()) + "\n" for e in tiny_splits()["heldout"][:10]))
    return path


def run(out_dir: Path, heldout_file: Path, *extra: str) -> list[dict]:
    train.main([*FAST, "--eval-data", str(heldout_file), "--out-dir", str(out_dir), *extra])
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def losses(log: list[dict], key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in log if key in r}


@pytest.mark.parametrize("method, loss_key", [("sft", "sft_loss"), ("kd", "kd_loss"), ("minillm", "total_loss")])
def test_each_method_trains(tmp_path, heldout_file, method, loss_key):
    from safetensors.torch import load_file

    log = run(tmp_path, heldout_file, "--method", method, "--steps", "3")
    values = losses(log, loss_key)
    assert sorted(values) == [1, 2, 3] and all(torch.isfinite(torch.tensor(v)) for v in values.values())
    if method == "minillm":
        parts = [r for r in log if "pg_loss" in r]
        for key in ("pg_loss", "single_step_loss", "lm_loss", "reward", "reverse_kld", "importance_weight"):
            assert all(torch.isfinite(torch.tensor(r[key])) for r in parts), key
        assert all(r["reverse_kld"] > 0 for r in parts)
    start = load_file(checkpoint_dir("student-sft") / "model.safetensors")
    after = load_file(tmp_path / "student" / "model.safetensors")
    assert set(after) <= set(start) and "model.embed_tokens.weight" in after
    changed = [name for name in after if not torch.equal(start[name].float(), after[name].float())]
    assert len(changed) > len(after) // 2, f"only {changed} changed"
    evals = [r for r in log if "eval" in r]
    assert [r["step"] for r in evals] == [0, 3]
    assert "| student after " + method in (tmp_path / "results.md").read_text()


def test_resume_gives_the_uninterrupted_next_step_loss(tmp_path, heldout_file):
    """6 steps straight vs 5 steps, stop, --resume to 6: step 6 (mid-rollout: PPO epoch 2 of 4) agrees."""
    straight = losses(run(tmp_path / "straight", heldout_file, "--method", "minillm", "--steps", "6"), "total_loss")
    run(tmp_path / "resumed", heldout_file, "--method", "minillm", "--steps", "5", "--save-every", "5")
    resumed = losses(run(tmp_path / "resumed", heldout_file, "--method", "minillm", "--steps", "6", "--resume"),
                     "total_loss")
    assert resumed[5] == straight[5]  # the first run's steps, logged before the stop
    assert resumed[6] == pytest.approx(straight[6], rel=1e-6, abs=1e-7)


def test_fused_linear_gives_the_logits_path_losses(tmp_path, heldout_file):
    """--fused-linear (hidden states + output layers, no [tokens x V] logits) computes the same MiniLLM loss."""
    keys = ("total_loss", "pg_loss", "single_step_loss", "reverse_kld")
    logits_path = run(tmp_path / "logits", heldout_file, "--method", "minillm", "--steps", "2")
    fused_path = run(tmp_path / "fused", heldout_file, "--method", "minillm", "--steps", "2", "--fused-linear")
    for key in keys:
        expected, got = losses(logits_path, key), losses(fused_path, key)
        assert sorted(got) == [1, 2]
        for step in got:
            assert got[step] == pytest.approx(expected[step], rel=1e-4, abs=1e-5), (key, step)


def test_nan_loss_stops_with_a_clear_error(tmp_path, heldout_file):
    with pytest.raises(FloatingPointError, match="non-finite loss nan at step 0"):
        run(tmp_path, heldout_file, "--method", "minillm", "--steps", "2", "--lm-coef", "nan")


def test_ddp_two_cpu_processes_end_with_identical_weights(tmp_path, heldout_file):
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "examples" / "train.py"), *FAST, "--eval-data", str(heldout_file),
               "--out-dir", str(tmp_path), "--method", "minillm", "--steps", "4", "--batch-size", "4"]
    finished = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    differences = [r["replica_max_difference"] for r in log if "replica_max_difference" in r]
    assert differences == [0.0]
    assert sorted(losses(log, "total_loss")) == [1, 2, 3, 4]
    start = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["student"]
    assert start  # rank 0 wrote the checkpoint


def test_compare_writes_one_table_and_the_curve_plot(tmp_path, heldout_file):
    pytest.importorskip("matplotlib", reason="--compare's plot needs matplotlib (the train extra)")
    train.main([*FAST, "--eval-data", str(heldout_file), "--out-dir", str(tmp_path), "--compare", "--steps", "2",
                "--eval-every", "1"])
    rows = [line.split(" |")[0] for line in (tmp_path / "compare.md").read_text().splitlines() if line.startswith("| ")]
    assert rows == ["| model", "| teacher", "| student (start)", "| student after sft", "| student after kd",
                    "| student after minillm"]
    assert (tmp_path / "compare.png").stat().st_size > 10_000
    for method in train.METHODS:
        evals = [json.loads(line)["step"] for line in (tmp_path / method / "log.jsonl").read_text().splitlines()
                 if '"eval"' in line]
        assert evals == [0, 1, 2]


def test_own_jsonl_data_with_prompt_only_rows(tmp_path):
    """A user's JSONL: gold pairs and prompt-only rows; 5% of the pairs are held out when no --eval-data."""
    from minillm_kernels.tiny import tiny_splits

    splits = tiny_splits()
    rows = [e._asdict() for e in splits["labelled"][:40]] + [{"prompt": e.prompt} for e in splits["prompts"][:20]]
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    for method in ("sft", "minillm"):
        train.main([*FAST, "--data", str(data), "--out-dir", str(tmp_path / method), "--method", method,
                    "--steps", "2"])
        assert "Held-out Rouge-L / exact match (%), 2 prompts" in (tmp_path / method / "results.md").read_text()
