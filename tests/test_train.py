"""The trainer (minillm_kernels.training and examples/train.py, its loop) on the tiny default: each method (seqkd and kd
on the teacher's cached answers too, L_PT in every one), the rewards' sign, the reference-code switches, checkpoint +
resume (also after a SIGKILL), faults with clear errors, arguments checked before anything loads, eval() mode in
MiniLLM's updates, NaN stops, examples/compare.py's tables, DDP and FSDP2 on 2 CPU processes.

examples/train.py is loaded from its file (``TRAIN``) and run as a user runs it (``TRAIN.main(argv)``); its step is
measured in ``large_allocations_of_a_step``. What the tests spy on or replace lives in the package."""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import conftest
import minillm_kernels as mk
from minillm_kernels.distributed import ModelRunner, parallelize
from minillm_kernels.training import methods
from minillm_kernels.training.checkpoint import load_checkpoint, resume_file
from minillm_kernels.training.config import TINY_LR, ModelConfig, parse_args
from minillm_kernels.training.data import causal_lm_logits, load_training_data, teacher_forced_batch
from minillm_kernels.training.methods import KD, SFT, MiniLLM, MiniLLMOptions, pretrain_loss
from minillm_kernels.training.models import load_student, load_teacher
from minillm_kernels.training.rollout import Rollout, epoch_minibatches, make_rollout
from minillm_kernels.training.run import make_samplers, new_run
from minillm_kernels.training.tiny import checkpoint_dir, tiny_splits

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def load_example(name: str):
    """examples/<name>.py as a module, loaded from its file (examples/ is not a package on the path)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TRAIN = load_example("train")

try:
    checkpoint_dir("student-sft")
except FileNotFoundError as missing:  # the checkpoints ship with the repository; this is a broken checkout
    pytest.fail(str(missing), pytrace=False)

# small and quick: constant lr (no warm-up), greedy evaluation only, a 40-prompt pool (the teacher's answers to it
# take a second), 10 validation prompts, teacher answers cached per test
FAST = ["--batch-size", "8", "--max-new-tokens", "8", "--eval-every", "0", "--threads", "1", "--warmup-steps", "0",
        "--eval-samples", "0", "--pool-size", "40", "--validation-size", "10"]


@pytest.fixture(scope="module")
def heldout_file(tmp_path_factory) -> Path:
    """A 10-prompt held-out file (one prompt per task), so that the before/after evaluations stay cheap; beside it
    lm.jsonl, 20 texts of pre-training text for L_PT (``lm_flags``)."""
    path = tmp_path_factory.mktemp("data") / "heldout.jsonl"
    path.write_text("".join(json.dumps(e._asdict()) + "\n" for e in tiny_splits()["heldout"][:10]))
    path.with_name("lm.jsonl").write_text("".join(json.dumps({"text": e.prompt + e.response}) + "\n"
                                                  for e in tiny_splits()["prompts"][-20:]))
    return path


def lm_flags(heldout_file: Path) -> list[str]:
    return ["--lm-data", str(heldout_file.with_name("lm.jsonl"))]


def run(out_dir: Path, heldout_file: Path, *extra: str) -> list[dict]:
    """examples/train.py with ``FAST``, L_PT and ``extra``; its log."""
    TRAIN.main([*FAST, *lm_flags(heldout_file), "--eval-data", str(heldout_file), "--out-dir", str(out_dir),
                "--cache-dir", str(out_dir / "cache"), *extra])
    return read_log(out_dir)


def read_log(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def losses(log: list[dict], key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in log if key in r}


def trained(log: list[dict]) -> dict:
    """The record of the finished run: its args, validation history, chosen checkpoint and compute."""
    return next(r["trained"] for r in log if "trained" in r)


@pytest.mark.parametrize("method, loss_key", [("sft", "sft_loss"), ("kd", "kd_loss"), ("seqkd", "sft_loss"),
                                             ("minillm", "pg_loss"), ("gkd", "gkd_loss")])
def test_each_method_trains(tmp_path, heldout_file, method, loss_key):
    """3 steps, L_PT (the same for every method) added to the method's loss; the student changed; what each method
    cost: the teacher's forward tokens and the generated ones (and for seqkd what its teacher answers cost)."""
    from safetensors.torch import load_file

    log = run(tmp_path, heldout_file, "--method", method, "--steps", "3")
    values = losses(log, loss_key)
    assert sorted(values) == [1, 2, 3] and all(torch.isfinite(torch.tensor(v)) for v in values.values())
    for record in (r for r in log if "total_loss" in r):
        method_loss = record["pg_loss"] + record["single_step_loss"] if method == "minillm" else record[loss_key]
        assert record["lm_loss"] > 0 and record["total_loss"] == pytest.approx(method_loss + record["lm_loss"], rel=1e-5)
    if method == "minillm":
        parts = [r for r in log if "pg_loss" in r]
        for key in ("pg_loss", "single_step_loss", "lm_loss", "reward", "reverse_kld", "importance_weight"):
            assert all(torch.isfinite(torch.tensor(r[key])) for r in parts), key
        assert all(r["reverse_kld"] > 0 for r in parts)
    compute = trained(log)["compute"]
    assert (compute["teacher_forward_tokens"] > 0) == (method in ("kd", "minillm", "gkd"))
    assert (compute["generated_tokens"] > 0) == (method in ("minillm", "gkd"))
    assert (compute["answers"] is not None) == (method == "seqkd") and compute["seconds"] > 0
    start = load_file(checkpoint_dir("student-sft") / "model.safetensors")
    after = load_file(tmp_path / "student" / "model.safetensors")
    assert set(after) <= set(start) and "model.embed_tokens.weight" in after
    changed = [name for name in after if not torch.equal(start[name].float(), after[name].float())]
    assert len(changed) > len(after) // 2, f"only {changed} changed"
    assert [r["step"] for r in log if "validation" in r] == [0, 3]
    assert "| student after " + method in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize("method, flags, expected", [
    ("kd", [], {"divergence": "forward_kl"}), ("kd", ["--divergence", "jsd", "--beta", "0.3"], {"divergence": "jsd", "beta": 0.3}),
    ("gkd", [], {"divergence": "jsd", "beta": 0.5}), ("gkd", ["--divergence", "skew_reverse_kl", "--skew", "0.2"],
                                                     {"divergence": "skew_reverse_kl", "skew": 0.2}), ("gkd", ["--fused-linear"], {"divergence": "jsd"})])
def test_kd_and_gkd_train_on_the_fused_divergence_they_are_given(tmp_path, heldout_file, monkeypatch, method, flags,
                                                                  expected):
    """kd (teacher-forced on the gold answers) and gkd (on the student's own samples: alpha 0, every step) call the
    fused divergence with --divergence (kd: forward KL, gkd: JSD(0.5) by default) and its parameters; its value is the
    float64 reference's on the same logits; the logged loss is the one computed."""
    calls, samplers = [], []

    def check(fused, *arguments, **options):
        loss = fused(*arguments, **options)
        if fused.__name__ == "fused_divergence":  # from the logits (the fused-linear form: hidden states and weights)
            student, teacher = arguments
            mask = options["mask"].flatten()
            oracle = mk.reference.divergence(
                student.detach().double().flatten(0, 1), teacher.double().flatten(0, 1), mask, options["temperature"],
                options["vocab_size"], options["divergence"], options["beta"], options["skew"])
            torch.testing.assert_close(loss.double(), oracle[mask].mean(), rtol=1e-5, atol=1e-6)
        calls.append({**options, "loss": float(loss.detach())})
        return loss

    for module, name in ((mk, "fused_divergence"), (mk.sampling, "fused_divergence"),
                         (mk.sampling, "fused_linear_divergence")):
        monkeypatch.setattr(module, name, functools.partial(check, getattr(module, name)))
    sample = mk.sampling.sample_teacher_mixed
    monkeypatch.setattr(mk, "sample_teacher_mixed",
                        lambda *a, **k: samplers.append(k["alpha"]) or sample(*a, **k))
    log = run(tmp_path, heldout_file, "--method", method, "--steps", "2", *flags)
    assert len(calls) == 2 and all(options.items() >= expected.items() for options in calls), calls
    assert [r[f"{method}_loss"] for r in log if "total_loss" in r] == pytest.approx([c["loss"] for c in calls])
    assert samplers == ([0.0, 0.0] if method == "gkd" else [])


def test_divergence_is_kd_and_gkd_s_only():
    with pytest.raises(SystemExit):
        parse_args(["--method", "sft", "--divergence", "jsd"])


def trained_pairs(tokenizer, batch) -> list[tuple[str, str]]:
    """The (prompt, response) pairs of a teacher-forced batch: the tokens before its first label, then its labels
    (the response and EOS) decoded."""
    pairs = []
    for ids, labels in zip(batch.input_ids.tolist(), batch.labels.tolist()):
        first = next(i for i, label in enumerate(labels) if label != -100)
        response = tokenizer.decode([t for t in labels if t != -100], skip_special_tokens=True)
        pairs.append((tokenizer.decode(ids[: first + 1]), response))
    return pairs


@pytest.mark.parametrize("method", [["--method", "seqkd"], ["--method", "kd", "--teacher-answers"]])
def test_seqkd_and_kd_with_teacher_answers_train_on_the_cached_teacher_answers(tmp_path, heldout_file, monkeypatch,
                                                                                method):
    """Every pair they train on is the teacher's answer to a pool prompt, read from the cache (here: written by
    the first run, read by the second), not the gold one (the open tasks' answers differ)."""
    seen = []
    for method_class in (SFT, KD):  # (seqkd's loss is sft's)
        def spy(method, run_, batch, loss=method_class.loss):
            seen.extend(trained_pairs(run_.tokenizer, batch))
            return loss(method, run_, batch)
        monkeypatch.setattr(method_class, "loss", spy)
    cache = ["--cache-dir", str(tmp_path / "cache")]
    run(tmp_path / "first", heldout_file, *method, "--steps", "1", *cache)
    seen.clear()
    log = run(tmp_path / "second", heldout_file, *method, "--steps", "3", *cache)
    assert trained(log)["compute"]["answers"]["cached"]
    cached = json.loads(next((tmp_path / "cache").iterdir()).read_text())["responses"]
    pool = tiny_splits()["prompts"][:40]
    answers = {(e.prompt, response) for e, response in zip(pool, cached)}
    assert len(seen) == 3 * 8 and set(seen) <= answers, set(seen) - answers
    assert set(seen) - {(e.prompt, e.response) for e in pool}  # some are not the gold answer


def test_every_method_draws_the_same_prompts_of_the_pool():
    """One seed, any method: the pairs (sft, kd, seqkd) and the rollout prompts (minillm) come in the same order."""
    config = parse_args([*FAST])
    samplers = make_samplers(load_training_data(config.data, seed=0), config.run.seed, rank=0, world=1)
    assert [e.prompt for e in samplers["pairs"].next(16)] == samplers["prompts"].next(16)


def fresh_run(config, out_dir: Path):
    """A run of ``config`` at step 0 on one CPU process, as examples/train.py starts it."""
    teacher, tokenizer = load_teacher(config.model, CPU)
    data = load_training_data(config.data, seed=config.run.seed)
    return new_run(config, out_dir, parallelize(teacher, fsdp=False, trainable=False), tokenizer, data, rank=0,
                   world=1), data


def test_pretrain_loss_mixes_in_the_teachers_soft_cross_entropy_as_the_reference_code(tmp_path, heldout_file):
    """--lm-kd-ratio r: L_PT = (1 - r) CE + r (-sum_v p_v log q_v) (the reference's --kd-ratio), the teacher's forward
    counted; r = 0 (the default, the paper's): plain cross-entropy."""
    def pretrain(*flags: str):
        run_, data = fresh_run(parse_args([*FAST, *lm_flags(heldout_file), *flags]), tmp_path)
        batch = teacher_forced_batch(run_.tokenizer, data.lm[:4], None, max_length=64)
        return pretrain_loss(run_, batch).item(), run_, batch

    plain, run_, batch = pretrain()
    mixed, mixed_run, _ = pretrain("--lm-kd-ratio", "0.5")
    with torch.no_grad():
        logq = causal_lm_logits(run_.student, batch.input_ids, batch.attention_mask).log_softmax(-1)
        p = causal_lm_logits(run_.teacher, batch.input_ids, batch.attention_mask).softmax(-1)
    mask = batch.labels != -100
    ce = -logq.gather(-1, batch.labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)[mask].mean()
    soft = -(p * logq).sum(-1)[mask].mean()
    assert plain == pytest.approx(ce.item(), rel=1e-5) and run_.compute["teacher_forward_tokens"] == 0
    assert mixed == pytest.approx(0.5 * ce.item() + 0.5 * soft.item(), rel=1e-5)
    assert mixed_run.compute["teacher_forward_tokens"] == int(batch.attention_mask.sum())


def test_the_reference_code_switches_reach_the_objective(tmp_path, heldout_file, monkeypatch):
    """--whiten-over padded and --single-step unweighted go to minillm_loss (the defaults: valid tokens, weighted);
    the warm-up default is the reference scripts' 100 steps; --lm-coef without --lm-data is refused."""
    options = []

    def spy(*args, **kwargs):
        options.append((kwargs["whiten_over"], kwargs["weighted_single_step"]))
        return minillm_loss(*args, **kwargs)

    minillm_loss = mk.minillm_loss
    monkeypatch.setattr(mk, "minillm_loss", spy)
    run(tmp_path / "ours", heldout_file, "--method", "minillm", "--steps", "1")
    run(tmp_path / "reference", heldout_file, "--method", "minillm", "--steps", "1", "--whiten-over", "padded",
        "--single-step", "unweighted")
    assert options == [("valid", True), ("padded", False)]
    assert parse_args([]).optim.warmup_steps == 100 and parse_args([]).lm.lm_coef == 0
    with pytest.raises(SystemExit):
        parse_args(["--lm-coef", "1"])


@pytest.mark.parametrize("buffer", [[], ["--num-rollouts", "16"]], ids=["one-minibatch", "buffer-of-two"])
def test_resume_continues_as_if_uninterrupted(tmp_path, heldout_file, buffer):
    """8 steps straight vs 3 steps, stop (mid-rollout: PPO epoch 3 of 4; with a buffer of two minibatches, epoch 2 of
    its first buffer), --resume to 8: steps 4-8 agree, so the optimizer's moments, the warm-up's position, the rollout
    buffer, its minibatches and the data order were all restored."""
    schedule = ["--method", "minillm", "--warmup-steps", "8", *buffer]
    straight = run(tmp_path / "straight", heldout_file, *schedule, "--steps", "8")
    run(tmp_path / "resumed", heldout_file, *schedule, "--steps", "3", "--save-every", "3")
    state = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)  # plain types only
    assert state["step"] == 3 and state["rollout"] is not None
    resumed = run(tmp_path / "resumed", heldout_file, *schedule, "--steps", "8", "--resume")
    assert [r["step"] for r in resumed if "total_loss" in r] == list(range(1, 9))
    for key in ("total_loss", "pg_loss", "lr"):
        expected, got = losses(straight, key), losses(resumed, key)
        for step in range(4, 9):
            assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), (key, step)
    assert len(set(losses(straight, "lr").values())) == 8  # the warm-up moved the learning rate at every step


def test_resume_checks_what_it_resumes(tmp_path, heldout_file, capsys):
    """Another method is refused, --steps below the checkpoint is refused, a finished run says so, changed
    arguments are listed and take effect (the learning rate too), a missing checkpoint is said."""
    run(tmp_path, heldout_file, "--method", "sft", "--steps", "2")
    with pytest.raises(SystemExit, match="is a sft run; --method kd cannot continue it"):
        run(tmp_path, heldout_file, "--method", "kd", "--steps", "3", "--resume")
    with pytest.raises(SystemExit, match="at step 2, past --steps 1"):
        run(tmp_path, heldout_file, "--method", "sft", "--steps", "1", "--resume")
    capsys.readouterr()
    log = run(tmp_path, heldout_file, "--method", "sft", "--steps", "2", "--resume")
    said = capsys.readouterr().err
    assert "resumed sft at step 2" in said and "the run is finished (--steps 2)" in said
    assert [r["step"] for r in log if "sft_loss" in r] == [1, 2]
    with pytest.warns(UserWarning, match="arguments changed") as warned:
        log = run(tmp_path, heldout_file, "--method", "sft", "--steps", "3", "--resume", "--lr", "3e-4",
                  "--batch-size", "4", "--weight-decay", "0.01")
    message = next(str(w.message) for w in warned if "arguments changed" in str(w.message))
    assert "--batch-size 8 -> 4" in message and "--lr 0.0001 -> 0.0003" in message
    assert "--weight-decay 1e-06 -> 0.01" in message and "--steps" not in message
    assert losses(log, "lr") == {1: 1e-4, 2: 1e-4, 3: 3e-4}
    group = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"][0]
    assert (group["lr"], group["weight_decay"]) == (3e-4, 0.01)
    with pytest.warns(UserWarning, match="--resume: no checkpoint at .*starting sft from step 0"):
        log = run(tmp_path / "empty", heldout_file, "--method", "sft", "--steps", "1", "--resume")
    assert [r["step"] for r in log if "sft_loss" in r] == [1]


def test_a_killed_run_resumes_with_every_step_logged_once(tmp_path, heldout_file):
    """SIGKILL mid-run, just after a step past the checkpoint: every record written before the kill is in
    log.jsonl (each is flushed); the resumed run drops the records past the checkpoint's step and logs every step
    exactly once, in order."""
    steps = ["--method", "minillm", "--steps", "20", "--save-every", "3"]
    command = [sys.executable, str(ROOT / "examples" / "train.py"), *FAST, *lm_flags(heldout_file), "--eval-data",
               str(heldout_file), "--out-dir", str(tmp_path), *steps]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with open(tmp_path / "stderr.txt", "w") as stderr:
        process = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=stderr)
    checkpoint_path = tmp_path / "checkpoint.pt"
    try:
        deadline = time.monotonic() + 240
        while not checkpoint_path.exists():  # step 3's checkpoint (renamed into place when complete)
            assert process.poll() is None, (tmp_path / "stderr.txt").read_text()
            assert time.monotonic() < deadline, "no checkpoint after 240 s"
            time.sleep(0.005)
        first = checkpoint_path.stat()
        while True:  # until step 4's record: it comes before step 6's checkpoint if each record is flushed
            written = checkpoint_path.stat()  # (looked at before the log: a record it follows must be visible)
            if max(logged_steps(tmp_path), default=0) >= 4:
                break
            assert (written.st_ino, written.st_mtime_ns) == (first.st_ino, first.st_mtime_ns), \
                "a later checkpoint came before step 4's record reached log.jsonl: records are not flushed"
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr.txt").read_text()
            time.sleep(0.005)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before the kill"
    before, checkpoint = logged_steps(tmp_path), torch.load(checkpoint_path, weights_only=True)["step"]
    assert before == list(range(1, len(before) + 1)) and len(before) >= checkpoint, (before, checkpoint)
    log = run(tmp_path, heldout_file, *steps, "--resume")
    assert [r["step"] for r in log if "total_loss" in r] == list(range(1, 21)), (before, checkpoint)
    assert [r["step"] for r in log if "validation" in r] == [0, 20]


def logged_steps(out_dir: Path) -> list[int]:
    """The steps of the training records in ``out_dir``'s log.jsonl so far (complete lines only)."""
    path = out_dir / "log.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []  # the text after the last newline may be cut
    return [record["step"] for record in map(json.loads, lines) if "total_loss" in record]


def old_minillm_micro_batches(method: MiniLLM, run_) -> list:
    """The trainer's on-policy batches before the rollout buffer (the executable record of that behaviour): a fresh
    rollout of --batch-size prompts every --ppo-epochs steps, every step on all its rows, in --grad-accum consecutive
    micro-batches."""
    config, options = method.config, method.options
    if run_.step % options.ppo_epochs == 0:
        generator = torch.Generator(run_.device).manual_seed(config.run.seed * 1_000_003 + run_.step * 1009 + run_.rank)
        run_.rollout = make_rollout(run_.model, run_.teacher, run_.tokenizer,
                                    run_.samplers["prompts"].next(config.optim.batch_size), generator, run_.vocab_size,
                                    config, alpha=options.alpha, reward_scaling=options.reward_scaling,
                                    reward_clip=options.reward_clip)
    rollout, count = run_.rollout, config.optim.grad_accum
    rows = rollout.sample.sequences.shape[0]
    parts = [slice(index * rows // count, (index + 1) * rows // count) for index in range(count)]
    return [(rollout.sample.rows(part), rollout.rewards[part], rollout.teacher_outputs[part], rollout.teacher_head)
            for part in parts]


@pytest.mark.parametrize("grad_accum", ["1", "2"])
def test_the_default_rollout_buffer_trains_exactly_as_before(tmp_path, heldout_file, monkeypatch, grad_accum):
    """Without --num-rollouts (a buffer of one minibatch) every logged figure of 6 MiniLLM steps (4 PPO epochs on one
    rollout, then 2 on the next) equals, bit for bit, that of the trainer before the buffer
    (``old_minillm_micro_batches`` in its place), with one micro-batch and with two."""
    flags = ["--method", "minillm", "--steps", "6", "--grad-accum", grad_accum]
    new = run(tmp_path / "buffer", heldout_file, *flags)
    monkeypatch.setattr(MiniLLM, "micro_batches", old_minillm_micro_batches)
    old = run(tmp_path / "before", heldout_file, *flags)
    def steps(log: list[dict]) -> list[dict]:
        return [{key: value for key, value in r.items() if key != "seconds"} for r in log if "total_loss" in r]

    assert len(steps(new)) == 6 and steps(new) == steps(old)


def test_the_rollout_buffer_is_taken_in_shuffled_minibatches_that_cover_it_every_epoch(tmp_path, heldout_file,
                                                                                       monkeypatch):
    """--num-rollouts 16 --batch-size 8 --ppo-epochs 2: a buffer of 16 sampled sequences every 4 steps; each epoch
    (2 steps) takes each row exactly once, its minibatches drawn anew each epoch (not the same split twice, nor the
    buffer's order); the generated tokens and the teacher's forward tokens are counted once per buffer."""
    taken, buffers = [], []
    chunks, sample = Rollout.chunks, mk.sample_teacher_mixed

    def spy_chunks(rollout, count, rows=None):
        taken.append((id(rollout), rows.tolist()))
        return chunks(rollout, count, rows)

    def spy_sample(*args, **kwargs):
        drawn = sample(*args, **kwargs)
        buffers.append(drawn)
        return drawn

    monkeypatch.setattr(Rollout, "chunks", spy_chunks)
    monkeypatch.setattr(mk, "sample_teacher_mixed", spy_sample)
    log = run(tmp_path, heldout_file, "--method", "minillm", "--steps", "8", "--num-rollouts", "16", "--ppo-epochs",
              "2")
    assert len(taken) == 8 and len(buffers) == 2 and [s.sequences.shape[0] for s in buffers] == [16, 16]
    assert len({rollout for rollout, _ in taken[:4]}) == len({rollout for rollout, _ in taken[4:]}) == 1
    splits = []
    for epoch in range(4):
        first, second = taken[2 * epoch][1], taken[2 * epoch + 1][1]
        assert sorted(first + second) == list(range(16)) and first == sorted(first) and second == sorted(second)
        splits.append(frozenset([frozenset(first), frozenset(second)]))
    assert len(set(splits)) == 4 and list(range(8)) not in [rows for _, rows in taken]
    compute = trained(log)["compute"]
    assert compute["generated_tokens"] == sum(int(s.response_mask.sum()) for s in buffers)
    assert compute["teacher_forward_tokens"] == 2 * sum(int(s.attention_mask.sum()) for s in buffers)


def test_epoch_minibatches_partition_the_buffer_in_a_seeded_order():
    """Each epoch's minibatches partition the buffer (rows sorted inside each); the same seed draws the same ones,
    another seed others; a buffer of one minibatch is every row in order; a size that does not split is refused."""
    epoch = epoch_minibatches(12, 4, seed="a")
    assert [len(rows) for rows in epoch] == [4, 4, 4] and sorted(torch.cat(epoch).tolist()) == list(range(12))
    assert all(rows.tolist() == sorted(rows.tolist()) for rows in epoch)
    assert [r.tolist() for r in epoch] == [r.tolist() for r in epoch_minibatches(12, 4, seed="a")]
    assert [r.tolist() for r in epoch] != [r.tolist() for r in epoch_minibatches(12, 4, seed="b")]
    assert [r.tolist() for r in epoch_minibatches(8, 8, seed="a")] == [list(range(8))]
    with pytest.raises(ValueError, match="give a --num-rollouts that is a multiple of --batch-size"):
        epoch_minibatches(12, 5, seed="a")
    with pytest.raises(SystemExit):
        parse_args(["--num-rollouts", "12", "--batch-size", "8"])


def test_the_chosen_checkpoint_is_the_best_validation_step_and_the_test_split_scores_it_and_the_last(
        tmp_path, heldout_file, monkeypatch):
    """Planted validation scores 90 (step 0: the start, never a candidate), 40, 70, 60, 50 at steps 0, 2, ..., 8: the
    chosen checkpoint is step 4, its weights in best/ (those of a run that stopped at step 4); and planted test scores
    that favour the last checkpoint (99) over the chosen one (1): the test split scores each, and the one reported as
    chosen is step 4's, whatever the test says. The test split is evaluated only once the run is trained."""
    from safetensors.torch import load_file

    straight = tmp_path / "straight"
    run(straight, heldout_file, "--method", "sft", "--steps", "4")
    out = tmp_path / "planted"
    validation = {e.prompt for e in load_training_data(parse_args(FAST).data, seed=0).validation}
    planted_validation, calls = iter([90.0, 40.0, 70.0, 60.0, 50.0]), []

    def planted(model, tokenizer, examples, **options):
        embedding = mk.sampling.unwrapped(model).get_input_embeddings().weight
        if {e.prompt for e in examples} <= validation:
            calls.append("validation")
            score = next(planted_validation)
        else:
            calls.append("test")
            last = load_file(out / "student" / "model.safetensors")["model.embed_tokens.weight"]
            score = 99.0 if torch.equal(embedding.detach(), last) else 1.0
        return {"gold": {"rouge_l": score, "exact_match": score}}

    monkeypatch.setattr(TRAIN, "evaluate", planted)
    log = run(out, heldout_file, "--method", "sft", "--steps", "8", "--eval-every", "2")
    assert calls == ["validation"] * 5 + ["test"] * 4  # the chosen, the last, then the teacher and the start student
    assert trained(log)["selected"] == {"step": 4, "score": 70.0}
    test = next(r["test"] for r in log if "test" in r)
    assert test["chosen_step"] == 4
    assert test["chosen"]["greedy"]["gold"]["rouge_l"] == 1.0 and test["last"]["greedy"]["gold"]["rouge_l"] == 99.0
    best, at_step_4 = (load_file(folder / "model.safetensors") for folder in (out / "best", straight / "student"))
    assert best.keys() == at_step_4.keys() and all(torch.equal(best[name], at_step_4[name]) for name in best)


def test_rollout_rewards_are_the_teacher_student_log_ratio():
    """r_t = clip((log p(y_t) - log q(y_t)) / 0.5, +-100), with both log-probabilities recomputed here by a
    plain forward pass of each model over the sampled sequences."""
    config = parse_args(FAST)
    options = config.options(MiniLLMOptions)
    teacher, tokenizer = load_teacher(config.model, CPU)
    student = load_student(config.model, CPU)
    vocab_size = min(len(tokenizer), student.config.vocab_size, teacher.config.vocab_size)
    prompts = [e.prompt for e in tiny_splits()["prompts"][:8]]
    rollout = make_rollout(student, ModelRunner(teacher), tokenizer, prompts, torch.Generator().manual_seed(0),
                           vocab_size, config, alpha=options.alpha, reward_scaling=options.reward_scaling,
                           reward_clip=options.reward_clip)
    sample, mask = rollout.sample, rollout.sample.response_mask
    assert student.training  # make_rollout sampled in eval() mode and gave the student back as it was

    def response_logprob(model) -> torch.Tensor:
        with torch.no_grad():
            logits = causal_lm_logits(model.eval(), sample.sequences, sample.attention_mask)[..., :vocab_size]
        logits = logits[:, sample.prompt_length - 1 : -1].double().log_softmax(-1)
        return logits.gather(-1, sample.response_ids.clamp(max=vocab_size - 1).unsqueeze(-1)).squeeze(-1)

    log_ratio = response_logprob(teacher) - response_logprob(student)
    expected = torch.where(mask, (log_ratio / options.reward_scaling).clamp(-options.reward_clip, options.reward_clip),
                           0.0)
    assert expected[mask].abs().max() > 1  # a flipped sign cannot pass
    torch.testing.assert_close(rollout.rewards.double(), expected, rtol=1e-4, atol=1e-4)


def test_minillm_updates_run_without_dropout(tmp_path, heldout_file, monkeypatch):
    """A GPT-2 student with dropout 0.1: MiniLLM's first PPO epoch sees the sampler's log q_old again (ratio 1),
    as the student is in eval() mode (the reference code's); --dropout turns dropout on in the updates."""
    from transformers import GPT2Config, GPT2LMHeadModel

    _, tokenizer = load_teacher(ModelConfig(), CPU)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.1,
                        embd_pdrop=0.1, attn_pdrop=0.1, bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    log_ratios = []

    def spy(token_stats, old_logprob, rewards, importance_weight, mask, **kwargs):
        log_ratios.append(float((token_stats.student_logprob - old_logprob).detach()[mask].abs().max()))
        return minillm_loss(token_stats, old_logprob, rewards, importance_weight, mask, **kwargs)

    minillm_loss = mk.minillm_loss
    monkeypatch.setattr(mk, "minillm_loss", spy)
    student = ["--student", str(tmp_path / "gpt2"), "--method", "minillm", "--steps", "1", "--lr", "1e-4"]
    run(tmp_path / "eval_mode", heldout_file, *student)
    run(tmp_path / "dropout", heldout_file, *student, "--dropout")
    assert log_ratios[0] < 1e-5, log_ratios  # rho = w exactly: no dropout noise
    assert log_ratios[1] > 1e-2, log_ratios


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


def test_a_diverging_step_stops_before_the_update_and_the_rollout(tmp_path, heldout_file):
    """lr 1e3 makes step 1's gradient NaN: the run stops there, before the optimizer poisons the weights (and
    before the next rollout's sampler, which would fail inside torch.multinomial)."""
    with pytest.raises(FloatingPointError, match="non-finite gradient norm nan at step 1; parts: lm_loss=.*, pg_loss="):
        run(tmp_path, heldout_file, "--method", "minillm", "--steps", "3", "--ppo-epochs", "1", "--lr", "1e3")


def test_non_finite_student_weights_stop_before_the_rollout(tmp_path, heldout_file):
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(checkpoint_dir("student-sft"))
    with torch.no_grad():
        student.model.norm.weight[0] = float("nan")
    student.save_pretrained(tmp_path / "nan-student")
    with pytest.raises(FloatingPointError, match=r"non-finite student parameter \(largest \|value\|\) before the "
                                                 "rollout nan at step 0. Last checkpoint: none"):
        run(tmp_path, heldout_file, "--student", str(tmp_path / "nan-student"), "--method", "minillm", "--steps", "1")


def test_a_corrupt_checkpoint_is_named(tmp_path, heldout_file):
    run(tmp_path, heldout_file, "--method", "sft", "--steps", "1")
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(SystemExit, match=f"cannot read the checkpoint {re.escape(str(path))} .*truncated or corrupt"):
        run(tmp_path, heldout_file, "--method", "sft", "--steps", "2", "--resume")


def test_an_empty_checkpoint_is_named(tmp_path):
    """A zero-byte checkpoint.pt (torch.load: EOFError with no message) gets the same clear error as a corrupt one."""
    path = tmp_path / "checkpoint.pt"
    path.touch()
    with pytest.raises(SystemExit, match=f"cannot read the checkpoint {re.escape(str(path))} \\(EOFError: no message\\)"
                                         r"\. It is empty \(0 bytes\)\. It is truncated or corrupt"):
        load_checkpoint(path, CPU)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux), where every write fails: ENOSPC")
def test_a_full_disk_names_the_file_and_removes_the_partial_checkpoint(tmp_path, heldout_file):
    temporary = tmp_path / "checkpoint.tmp"
    temporary.symlink_to("/dev/full")  # the checkpoint's temp file: writing it runs out of space
    with pytest.raises(OSError, match=f"could not write {re.escape(str(temporary))} .*MiB are free on the file "
                                      f"system of {re.escape(str(tmp_path))}"):
        run(tmp_path, heldout_file, "--method", "sft", "--steps", "1")
    assert not temporary.is_symlink() and not (tmp_path / "checkpoint.pt").exists()


def test_bad_paths_and_data_are_named(tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    for argv, message in ((["--data", str(missing)], f"--data {missing}: no such file"),
                          (["--eval-data", str(missing)], f"--eval-data {missing}: no such file"),
                          (["--lm-data", str(missing)], f"--lm-data {missing}: no such file"),
                          (["--teacher", str(tmp_path / "nope")], f"--teacher {tmp_path / 'nope'}: no such directory"),
                          (["--student", "models/a/b"], "--student models/a/b: no such directory")):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert message in capsys.readouterr().err
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(json.dumps({"prompt": "Max: 1 2\nA:", "response": " 2"}) + "\n" + json.dumps({"prompt": "p"}))
    with pytest.raises(ValueError, match=f"{re.escape(str(heldout))}:2: no 'response'"):
        load_training_data(parse_args(["--eval-data", str(heldout)]).data, seed=0)


def torchrun(out_dir: Path, heldout_file: Path, *extra: str, timeout: float = 240) -> list[dict]:
    """examples/train.py on 2 gloo CPU processes (``FAST``, ``extra``); its log. Fails with the processes' stderr if
    the run fails, and kills the whole process group after ``timeout`` seconds (a collective that hangs fails)."""
    conftest.torchrun(ROOT / "examples" / "train.py", *FAST, *lm_flags(heldout_file), "--eval-data", str(heldout_file),
                      "--out-dir", str(out_dir), *extra, timeout=timeout, what=f"torchrun {' '.join(extra)}")
    return read_log(out_dir)


def test_ddp_two_cpu_processes_end_with_identical_weights(tmp_path, heldout_file):
    log = torchrun(tmp_path, heldout_file, "--method", "minillm", "--steps", "4", "--batch-size", "4")
    differences = [r["replica_max_difference"] for r in log if "replica_max_difference" in r]
    assert differences == [0.0]
    assert sorted(losses(log, "total_loss")) == [1, 2, 3, 4]
    start = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["student"]
    assert start  # rank 0 wrote the checkpoint


# 2 processes against 1 on the same global batch. Every process draws the global batch and keeps its rank's rows
# (training.run.Sampler); one process with --grad-accum 2 has the same rows in its two micro-batches, and every mean the
# loss takes (over a micro-batch's tokens, then over micro-batches or processes) is the same. Two things differ by
# design and are fixed here: each process samples with its own generator (so the rollouts are made deterministic:
# --top-k 1 --alpha 0, the student's most likely token), and whitening pools the processes' rows but not one
# process's micro-batches (--no-whiten). --ppo-epochs 2 over 4 steps: a second rollout from the updated student.
SAME_GLOBAL_BATCH = ["--method", "minillm", "--top-k", "1", "--alpha", "0", "--no-whiten", "--steps", "4",
                     "--ppo-epochs", "2"]
ONE_PROCESS, TWO_PROCESSES = ["--batch-size", "8", "--grad-accum", "2"], ["--batch-size", "4"]
# What remains is float32 rounding: each process pads its prompts to its own longest (other matmul shapes), the
# gradients are summed in another order (all-reduce or reduce-scatter vs accumulation), and Adam carries it through
# 4 steps. Measured: at most 3e-6 relative (AMD EPYC, Zen 5, 2 cores); a missed gradient synchronisation is off by
# 1e-2 or more from step 2 on. The final weights: Adam moves an element whose gradient is near 0 by up to lr per step
# whatever the gradient's size, so rounding there shows at the scale of lr: within 0.1 lr (measured: 0.03 lr, one
# element of 0.44M; a replica trained on its own rows alone is off by about lr in most).
PROCESS_RTOL = 1e-4
WEIGHT_ATOL_IN_LR = 0.1
COMPARED = ("total_loss", "pg_loss", "single_step_loss", "lm_loss", "reverse_kld", "grad_norm")


def assert_same_run(one: list[dict], two: list[dict], one_dir: Path, two_dir: Path, lr: float = TINY_LR) -> None:
    """The same losses at every step (within PROCESS_RTOL), replicas identical, and the same final weights (student/,
    within WEIGHT_ATOL_IN_LR x ``lr``)."""
    from safetensors.torch import load_file

    for key in COMPARED:
        expected, got = losses(one, key), losses(two, key)
        assert sorted(got) == [1, 2, 3, 4], key
        for step in got:
            assert got[step] == pytest.approx(expected[step], rel=PROCESS_RTOL, abs=1e-6), (key, step)
    assert [r["replica_max_difference"] for r in two if "replica_max_difference" in r][-1] == 0.0
    expected, got = (load_file(d / "student" / "model.safetensors") for d in (one_dir, two_dir))
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=WEIGHT_ATOL_IN_LR * lr, msg=name)


def test_ddp_fused_linear_gives_one_process_losses(tmp_path, heldout_file):
    """--fused-linear under DDP: the student's hidden states and lm_head run inside the DDP wrapper's forward, so
    their gradients are all-reduced."""
    flags = [*SAME_GLOBAL_BATCH, "--fused-linear"]
    one = run(tmp_path / "one", heldout_file, *flags, *ONE_PROCESS)
    two = torchrun(tmp_path / "two", heldout_file, *flags, *TWO_PROCESSES)
    assert_same_run(one, two, tmp_path / "one", tmp_path / "two")


def test_fsdp_gives_one_process_losses_and_resumes(tmp_path, heldout_file):
    """--fsdp on the tiny default (logits path): 2 steps, a sharded checkpoint written by both processes, --resume to 4
    steps; the same losses and final weights as one process. A checkpoint of the other kind is refused."""
    flags = [*SAME_GLOBAL_BATCH, "--fsdp"]
    one = run(tmp_path / "one", heldout_file, *SAME_GLOBAL_BATCH, *ONE_PROCESS)
    torchrun(tmp_path / "two", heldout_file, *flags, *TWO_PROCESSES, "--steps", "2", "--save-every", "2")
    saves = list((tmp_path / "two" / "checkpoint").iterdir())
    assert len(saves) == 1 and {"rank-0.pt", "rank-1.pt", ".metadata"} <= {p.name for p in saves[0].iterdir()}
    state = torch.load(saves[0] / "rank-1.pt", weights_only=True)  # this process's part: plain types
    assert state["step"] == 2 and state["rollout"] is not None and "student" not in state
    two = torchrun(tmp_path / "two", heldout_file, *flags, *TWO_PROCESSES, "--resume")
    assert [r["step"] for r in two if "total_loss" in r] == [1, 2, 3, 4]
    assert_same_run(one, two, tmp_path / "one", tmp_path / "two")
    with pytest.raises(SystemExit, match="holds checkpoint, the checkpoint of a run with --fsdp: resume it with"):
        run(tmp_path / "two", heldout_file, *SAME_GLOBAL_BATCH, "--resume")


def random_llama(directory: Path, tokenizer, seed: int, vocab: int = 1000) -> Path:
    """A small random Llama (2 layers, hidden 64, ``vocab`` logit columns for the tokenizer's 449 tokens, untied
    embeddings: an lm_head of its own, sharded apart from them) saved with the tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False, bos_token_id=tokenizer.eos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_fsdp_fused_linear_on_a_random_llama_gives_one_process_losses(tmp_path, heldout_file):
    """--fsdp --fused-linear with a random Llama teacher and student (untied, padded to 1000 columns): the sharded
    lm_heads are gathered inside their models' forwards (the student's) or once per rollout (the teacher's)."""
    _, tokenizer = load_teacher(ModelConfig(), CPU)
    models = ["--teacher", str(random_llama(tmp_path / "teacher", tokenizer, seed=1)),
              "--student", str(random_llama(tmp_path / "student", tokenizer, seed=2)), "--lr", "1e-3"]
    flags = [*SAME_GLOBAL_BATCH, *models, "--fused-linear"]
    one = run(tmp_path / "one", heldout_file, *flags, *ONE_PROCESS)
    two = torchrun(tmp_path / "two", heldout_file, *flags, *TWO_PROCESSES, "--fsdp")
    assert_same_run(one, two, tmp_path / "one", tmp_path / "two", lr=1e-3)


def test_own_jsonl_data_with_prompt_only_rows(tmp_path):
    """A user's JSONL: gold pairs and prompt-only rows; 5% of the pairs are held out for the test split when no
    --eval-data, then the validation split is drawn from the other gold pairs (10 of 38: 28 left in the pool)."""
    splits = tiny_splits()
    rows = [e._asdict() for e in splits["prompts"][:40]] + [{"prompt": e.prompt} for e in splits["prompts"][40:60]]
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    for method in ("sft", "minillm"):
        TRAIN.main([*FAST, "--data", str(data), "--out-dir", str(tmp_path / method), "--method", method,
                    "--steps", "2"])
        text = (tmp_path / method / "results.md").read_text()
        assert "Test scores (%) on 2 held-out prompts, of each run's checkpoint chosen on 10 validation prompts" in text
        assert "every method trained on the same 40 prompts (28 with a gold answer)" in text


def prompts_only_file(directory: Path, count: int = 20) -> Path:
    path = directory / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": e.prompt}) + "\n" for e in tiny_splits()["prompts"][:count]))
    return path


def test_prompts_only_data_trains_the_methods_that_need_no_gold_answer(tmp_path, heldout_file):
    """Prompt-only lines are MiniLLM's (the README): with --eval-data for the held-out split, minillm trains on them;
    without gold pairs there is no validation split (--validation-size 0): the last checkpoint is the chosen one."""
    TRAIN.main([*FAST, "--data", str(prompts_only_file(tmp_path)), "--eval-data", str(heldout_file), "--method",
                "minillm", "--steps", "1", "--validation-size", "0", "--out-dir", str(tmp_path / "out")])
    text = (tmp_path / "out" / "results.md").read_text()
    assert "every method trained on the same 20 prompts (0 with a gold answer)" in text
    assert "| minillm | 0.0001 | 1 | - |" in text  # chosen: the last step, without a validation score


def test_arguments_and_data_are_checked_before_any_model_loads(tmp_path, monkeypatch, capsys):
    """--eval-size 0 and --pool-size 0 are refused by the parser; prompt-only data for a method that trains on gold
    pairs, or without --eval-data to hold some out, or to draw the validation split from, is refused once read: all
    before a model loads."""
    import transformers

    def no_model(*args, **kwargs):
        pytest.fail("a model was loaded before the arguments and the data were checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
    data = prompts_only_file(tmp_path)
    for argv, message in ((["--eval-size", "0"], "argument --eval-size: must be an integer >= 1, got 0"),
                          (["--pool-size", "0"], "argument --pool-size: must be an integer >= 1, got 0"),
                          (["--method", "sft", "--data", str(data), "--eval-data", str(data)],
                           f"{data}:1: no 'response'"),
                          (["--method", "minillm", "--data", str(data)],
                           f"{data}: no example has a response, and the held-out split is drawn from the gold pairs"),
                          (["--method", "minillm", "--data", str(data), "--eval-data", str(tmp_path / "heldout.jsonl")],
                           f"{data}: --validation-size 10: the pool has only 0 gold pairs to draw it from"),
                          (["--method", "kd", "--data", str(data), "--eval-data", str(tmp_path / "heldout.jsonl"),
                            "--validation-size", "0"],
                           f"{data}: no example of the pool has a response, and these runs train on gold pairs "
                           "(prompt and response): kd.")):
        (tmp_path / "heldout.jsonl").write_text(json.dumps({"prompt": "Max: 1 2\nA:", "response": " 2"}) + "\n")
        with pytest.raises((SystemExit, ValueError)) as stopped:
            TRAIN.main([*FAST, *argv, "--out-dir", str(tmp_path / "out")])
        assert message in capsys.readouterr().err + str(stopped.value)


def test_fsdp_needs_torchrun_and_the_number_of_processes_that_wrote_the_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--fsdp"])
    assert "--fsdp shards the models over the processes of torchrun" in capsys.readouterr().err
    save = tmp_path / "checkpoint" / "000001"
    save.mkdir(parents=True)
    for rank in (0, 1):
        (save / f"rank-{rank}.pt").touch()
    with pytest.raises(SystemExit, match="by 2 processes, this run has 1: resume with torchrun --nproc_per_node 2"):
        resume_file(save, rank=0, world=1)


class LargeAllocations(TorchDispatchMode):
    """Every tensor an op allocates with at least ``threshold`` elements, with the op and the current ``phase``: the
    op outputs whose storage is none of the op's inputs' (views and in-place results share an input's, and are
    left out). Runs in the forward and in the backward (autograd runs the CPU backward in this thread, mode and all).
    What a custom op allocates inside itself and frees is not seen (the fused-linear chunk buffers, [C, V] with C
    below N): only what it returns."""

    def __init__(self, threshold: int) -> None:
        super().__init__()
        self.threshold, self.phase, self.found = threshold, "", []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        inputs = {t.untyped_storage().data_ptr() for t in tensors}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() >= self.threshold \
                    and t.untyped_storage().data_ptr() not in inputs:
                self.found.append((self.phase, str(func), tuple(t.shape)))
        return out


def large_allocations_of_a_step(monkeypatch, out_dir: Path, models: list[str], lm_data: str,
                                *flags: str) -> tuple[list, int]:
    """The [N, V]-or-larger allocations of one MiniLLM step of the trainer (examples/train.py's ``optimizer_step`` on
    a fresh rollout of 32 prompts, one micro-batch), by phase: "L_PT" (its forward and backward), "L_pg + L_single"
    (the rollout loss's forward and backward), "update" (clipping, AdamW). N = the micro-batch's response positions
    (rows x response length), V = the logits' width."""
    config = parse_args([*FAST, *models, "--batch-size", "32", "--max-new-tokens", "12", "--lm-data", lm_data, *flags])
    run, _ = fresh_run(config, out_dir)
    pretrain = TRAIN.pretrain_batches(run)
    batch = run.method.micro_batches(run)  # the rollout (sampling and the teacher's outputs) is not part of the step
    positions = run.rollout.sample.response_mask.numel()
    width = run.student.get_output_embeddings().weight.shape[0]
    largest_parameter = max(p.numel() for p in run.student.parameters())
    assert positions * width > largest_parameter  # no parameter-sized tensor (a gradient, an Adam moment) counts
    recorder = LargeAllocations(positions * width)

    def in_phase(phase: str, function):
        def wrapped(*args, **kwargs):
            recorder.phase = phase
            return function(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(methods, "pretrain_loss", in_phase("L_PT", methods.pretrain_loss))
    monkeypatch.setattr(MiniLLM, "loss", in_phase("L_pg + L_single", MiniLLM.loss))
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", in_phase("update", torch.nn.utils.clip_grad_norm_))
    with recorder:
        TRAIN.optimizer_step(run, pretrain, batch)
    return recorder.found, positions


def count_by_phase(found: list) -> dict[str, int]:
    return {phase: sum(1 for f in found if f[0] == phase) for phase in ("L_PT", "L_pg + L_single", "update")}


def test_the_step_allocates_no_tokens_x_vocab_tensor_but_those_the_design_needs(tmp_path, heldout_file, monkeypatch,
                                                                                capsys):
    """The memory promise on the trainer's path: tensors of >= N x V elements allocated during one MiniLLM step.

    On random Llamas with V = 4096 logit columns (for the tokenizer's 449 tokens) and H = 64: as in an LLM, V is far
    above H and the sequence length, so that no activation, weight or gradient but the [tokens x V] ones reaches
    N x V (in the tiny default V = 449 is 3.5 H, and a [B, T, H] activation does).

    L_pg + L_single on the logits path: the student's [B, N, V] logits (response_logits passes the response
    positions as logits_to_keep) and the kernel's [B N, V] gradient: nothing else (a [:, -(N+1):-1] slice of wider
    logits cost 3 more: the copies of both models' views and slice_backward's zero-filled [B, N + 1, V]). With
    --fused-linear: none (the kernels' [C, V] chunk buffers stay inside the op). L_PT, the cross-entropy on pre-training text, is plain PyTorch on its own
    [B, T, V] logits on either path (reported and checked to be the same on both); the update allocates none."""
    _, tokenizer = load_teacher(ModelConfig(), CPU)
    models = ["--teacher", str(random_llama(tmp_path / "teacher", tokenizer, seed=1, vocab=4096)),
              "--student", str(random_llama(tmp_path / "student", tokenizer, seed=2, vocab=4096))]
    lm_data = lm_flags(heldout_file)[1]
    logits_path, positions = large_allocations_of_a_step(monkeypatch, tmp_path, models, lm_data)
    fused_path, _ = large_allocations_of_a_step(monkeypatch, tmp_path, models, lm_data, "--fused-linear")
    with capsys.disabled():
        for name, found in (("logits", logits_path), ("fused-linear", fused_path)):
            print(f"\n{name} path, N = {positions}: {count_by_phase(found)}; " + "; ".join(map(str, found)))
    logits_counts, fused_counts = count_by_phase(logits_path), count_by_phase(fused_path)
    assert logits_counts["L_pg + L_single"] == 2, logits_path
    assert fused_counts["L_pg + L_single"] == 0, fused_path
    assert logits_counts["L_PT"] == fused_counts["L_PT"] > 0 and logits_counts["update"] == fused_counts["update"] == 0
