"""examples/compare.py and minillm_kernels/training/comparison.py: the tuning on validation (the same grid for every
row, MiniLLM's buffer too), the settings chosen from validation scores only and written before any test run, the
test phase at those settings for each seed (the tuning run of a seed reused), the tables, read-back and workers, the
planned rows, the flags the comparison owns."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from minillm_kernels.training import comparison
from minillm_kernels.training.comparison import PLAN, Row
from minillm_kernels.training.config import parse_args
from minillm_kernels.training.data import load_training_data
from minillm_kernels.training.tiny import tiny_splits

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--batch-size", "8", "--max-new-tokens", "8", "--threads", "1", "--warmup-steps", "0", "--eval-samples", "1",
         "--pool-size", "40", "--validation-size", "10", "--steps", "2", "--eval-every", "1"]
PLANNED = Row("a later method", "not-a-method-yet")  # a planned row whose method this version does not have
ROWS = ["--rows", "sft", "kd (teacher answers)", "minillm", PLANNED.name]
GRID = ["--lrs", "1e-4", "3e-4", "--buffers", "8", "16"]


@pytest.fixture(scope="module")
def compare(tmp_path_factory):
    """examples/compare.py as a module (its ``import train`` finds examples/train.py), its plan with a row of a method
    that does not exist yet (``PLANNED``), and a 10-prompt test file."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        spec = importlib.util.spec_from_file_location("example_compare", ROOT / "examples" / "compare.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "examples"))
    test_file = tmp_path_factory.mktemp("data") / "test.jsonl"
    test_file.write_text("".join(json.dumps(e._asdict()) + "\n" for e in tiny_splits()["heldout"][:10]))
    module.test_file = test_file
    module.PLAN = (*PLAN, PLANNED)
    return module


def argv(compare, out_dir: Path, *extra: str) -> list[str]:
    return [*SMALL, "--eval-data", str(compare.test_file), "--out-dir", str(out_dir), "--cache-dir",
            str(out_dir / "cache"), *ROWS, *GRID, "--seeds", "0", "1", *extra]


def logs(out_dir: Path) -> dict[Path, str]:
    return {path: path.read_text() for path in sorted((out_dir / "runs").rglob("log.jsonl"))}


def test_the_comparison_tunes_on_validation_then_tests_the_chosen_settings(compare, tmp_path, monkeypatch, capsys):
    """The grid: 2 lrs for sft and kd on the teacher's answers, 2 lrs x 2 buffers for minillm (8 runs). A tuning worker
    trains the runs that no other worker has claimed (3 are, here), evaluating validation prompts only; the tuning
    without --worker trains the 3 left, reads the 5 back and writes tuning.json, each row's chosen settings the grid
    point with the best validation score. Only then is the test split evaluated: each row at its chosen settings for
    seeds 0 (the tuning run, not trained again) and 1, chosen and last checkpoints. The tables give every row,
    ExAccErr's parts and the cost; the planned row is listed, not run. Run again, everything is read back and the
    tables are the same."""
    train = sys.modules["train"]
    splits = load_training_data(parse_args([*SMALL, "--eval-data", str(compare.test_file)]).data, seed=0)
    validation, test = ({e.prompt for e in split} for split in (splits.validation, splits.heldout))
    evaluated, evaluate = [], train.evaluate

    def spy(model, tokenizer, examples, **options):
        prompts = {e.prompt for e in examples}
        split = "validation" if prompts <= validation else "test" if prompts <= test else "other"
        evaluated.append((split, (tmp_path / "tuning.json").exists()))
        return evaluate(model, tokenizer, examples, **options)

    monkeypatch.setattr(train, "evaluate", spy)
    taken = [tmp_path / "claims" / "tune" / folder / "seed-0" for folder in
             ("sft/lr-0.0003", "minillm/lr-0.0001-num-rollouts-16", "minillm/lr-0.0003-num-rollouts-8")]
    for claim in taken:  # by another worker
        claim.mkdir(parents=True)
    compare.main(argv(compare, tmp_path, "--phase", "tune", "--worker"))
    by_worker = {log.parent.relative_to(tmp_path / "runs") for log in logs(tmp_path)}
    assert len(by_worker) == 5 and not by_worker & {claim.relative_to(tmp_path / "claims" / "tune") for claim in taken}
    assert not (tmp_path / "tuning.json").exists()
    compare.main(argv(compare, tmp_path, "--phase", "tune"))
    assert len(logs(tmp_path)) == 8 and (tmp_path / "tuning.json").exists()
    assert {split for split, _ in evaluated} == {"validation"}
    tuned = logs(tmp_path)
    compare.main(argv(compare, tmp_path))
    after = logs(tmp_path)
    assert all(after[log].startswith(text) for log, text in tuned.items())  # no tuning run trained again
    assert sum(after[log] != text for log, text in tuned.items()) == 3  # the test scores of each chosen one, seed 0
    assert all(written for split, written in evaluated if split != "validation")  # the test split after tuning.json
    assert {split for split, _ in evaluated} == {"validation", "test"}

    tuning = json.loads((tmp_path / "tuning.json").read_text())
    assert list(tuning["rows"]) == ["sft", "kd (teacher answers)", "minillm"]
    assert tuning["planned"] == [PLANNED.name]
    for name, row in tuning["rows"].items():
        scores = {tuple(c["settings"]): c["selected"]["score"] for c in row["candidates"]}
        assert len(scores) == (4 if name == "minillm" else 2)
        assert scores[tuple(row["chosen"])] == max(scores.values())
    results = json.loads((tmp_path / "results.json").read_text())
    runs = [(r["name"], r["seed"], r["args"]["lr"], r["args"]["num_rollouts"]) for r in results["runs"]]
    chosen = {name: dict(zip(row["chosen"][::2], row["chosen"][1::2])) for name, row in tuning["rows"].items()}
    assert [(name, seed) for name, seed, *_ in runs] == [(n, s) for n in chosen for s in (0, 1)]
    for name, _, lr, buffer in runs:
        assert lr == float(chosen[name]["--lr"])
        assert (buffer is None) if name != "minillm" else buffer == int(chosen[name]["--num-rollouts"])
    for record in results["runs"]:
        assert record["test"]["chosen_step"] == record["selected"]["step"] in (1, 2)
        assert record["test"]["last"]["exposure_bias"]["oracle_error"] > 0
    text = (tmp_path / "compare.md").read_text()
    for line in ("| sft | ", "| kd (teacher answers) | ", "| minillm | ", "ExAccErr(20) %",
                 "error on own prefixes R(20), nats", "on the teacher's l eps(20), nats", "teacher forward tokens",
                 "The last checkpoints", "Settings chosen on the validation split", "| yes |",
                 f"Planned, not in this version yet (not run): {PLANNED.name}."):
        assert line in text, line
    assert "no L_PT" in text

    capsys.readouterr()
    finished = logs(tmp_path)
    compare.main(argv(compare, tmp_path))
    said = capsys.readouterr().err
    assert said.count("read from log.jsonl") == 8 + 6 and logs(tmp_path) == finished
    assert (tmp_path / "compare.md").read_text().split("\n", 1)[1] == text.split("\n", 1)[1]


def test_the_choice_reads_validation_scores_only():
    """Planted: test scores in the records that favour the other grid point: the choice follows validation; equal
    validation scores keep the first grid point; a row without any validation score is an error."""
    def record(validation: float, test: float) -> dict:
        return {"args": {"select_by": "gold.rouge_l"}, "selected": {"step": 2, "score": validation},
                "compute": {"seconds": 1.0},
                "history": [{"step": 2, "validation": {"gold": {"rouge_l": validation}}}],
                "test": {"chosen": {"greedy": {"gold": {"rouge_l": test}}}}}

    low, high = ("--lr", "1e-05"), ("--lr", "0.0001")
    grid = {"sft": [low, high]}
    assert comparison.choose(grid, {("sft", low): record(60.0, 99.0), ("sft", high): record(70.0, 1.0)},
                             {})["rows"]["sft"]["chosen"] == list(high)
    assert comparison.choose(grid, {("sft", low): record(70.0, 1.0), ("sft", high): record(70.0, 99.0)},
                             {})["rows"]["sft"]["chosen"] == list(low)
    unscored = {**record(0.0, 0.0), "selected": None, "history": []}
    with pytest.raises(ValueError, match="no candidate has a validation score"):
        comparison.choose(grid, {("sft", low): unscored, ("sft", high): unscored}, {})


def test_the_grid_is_the_same_learning_rates_for_every_row_and_minillm_s_buffers_with_each():
    lrs, buffers = [1e-5, 3e-4], [32, 128]
    assert comparison.grid(Row("kd", "kd"), lrs, buffers) == [("--lr", "1e-05"), ("--lr", "0.0003")]
    minillm = next(row for row in PLAN if row.method == "minillm")
    assert comparison.grid(minillm, lrs, buffers) == [
        ("--lr", "1e-05", "--num-rollouts", "32"), ("--lr", "1e-05", "--num-rollouts", "128"),
        ("--lr", "0.0003", "--num-rollouts", "32"), ("--lr", "0.0003", "--num-rollouts", "128")]
    assert comparison.run_folder(Path("out"), minillm, ("--lr", "1e-05", "--num-rollouts", "32"), 3) == \
        Path("out/runs/minillm/lr-1e-05-num-rollouts-32/seed-3")


def test_the_test_phase_needs_the_tuning_of_the_same_plan(compare, tmp_path, capsys):
    """Without tuning.json, or with one tuned for another grid, the test phase stops before training anything."""
    with pytest.raises(SystemExit, match="no tuning yet; run the tuning phase first"):
        compare.main(argv(compare, tmp_path, "--phase", "test"))
    (tmp_path / "tuning.json").write_text(json.dumps({"lrs": [1e-5]}))
    with pytest.raises(SystemExit, match=r"was tuned for another plan \(.*lrs: tuned with \[1e-05\], now \[0.0001, "
                                          r"0.0003\]"):
        compare.main(argv(compare, tmp_path, "--phase", "test"))
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("flag", [["--lr", "1e-4"], ["--seed", "3"], ["--method", "sft"], ["--num-rollouts", "16"],
                                  ["--teacher-answers"]])
def test_the_flags_the_comparison_sets_per_run_are_refused(compare, tmp_path, capsys, flag):
    with pytest.raises(SystemExit):
        compare.main(argv(compare, tmp_path, *flag))
    assert "the comparison sets these per run" in capsys.readouterr().err
