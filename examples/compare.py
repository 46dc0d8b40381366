"""The tuned comparison: every row of the plan (``comparison.PLAN``: sft, kd, seqkd, kd on the teacher's answers,
minillm, gkd with the reverse KL, opd with each estimator, kd from the teacher's top 16; a planned row whose method
does not exist yet is listed, not run) tuned on the validation split, then
trained with --seeds at the settings chosen, and evaluated on the test split; one table over the seeds.

    python examples/compare.py                                   # tune, then test: the whole comparison, one process
    python examples/compare.py --lrs 1e-4 3e-4 --seeds 0 1 --steps 100 --rows sft minillm   # a smaller grid
    bash scripts/compare.sh                                      # the same in parallel processes (--worker)

1. Tuning (--phase tune): each row at every point of its grid, with the training seed --tuning-seed: the same
   learning rates (--lrs) and number of steps for every row; MiniLLM also its rollout buffer (--buffers: its
   --num-rollouts, taken in minibatches of --batch-size, within the same steps). Each run is evaluated on the
   validation split (gold pairs drawn from the training pool, which no run trains on) every --eval-every steps and
   keeps its best checkpoint; no run looks at the test split. Each row's settings are the grid point whose chosen
   checkpoint scored best: --out-dir/tuning.json (every validation figure) and tuning.md, written before any test run.
2. Test (--phase test): each row at its chosen settings (read from tuning.json only) for each of --seeds (the tuning
   run is the run of its seed: not trained twice), then the test split's whole protocol for each run's chosen
   checkpoint and its last one; --out-dir/results.json and compare.md (mean ± sd over the seeds, each method's cost
   beside its scores).
--phase all (the default) does both. Any flag of examples/train.py goes to every run, except those the comparison
sets per run (--method, --lr, --seed, --num-rollouts, --teacher-answers). L_PT: for every run with --lm-data, for
none without (the tiny default has no pre-training text: none).

Runs write in --out-dir/runs/<row>/<settings>/seed-<s>/ (log.jsonl, checkpoint.pt, best/, student/). A run that
already finished there with the same settings is read back instead of trained again, and its test scores too once
measured: an interrupted comparison goes on with the same command (--resume: interrupted runs go on from their
checkpoints). Several processes at once (scripts/compare.sh) share a phase's runs with --worker: each takes the next
run that no other has claimed (a folder under --out-dir/claims/<phase>/, made atomically; clear it before starting
them) and writes no table; then one process without --worker reads every run back (and trains any that is left) and
writes the tables.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import train  # examples/train.py: the loop
from minillm_kernels.training import comparison
from minillm_kernels.training.comparison import PLAN, Row
from minillm_kernels.training.config import TrainConfig, argument_parser, config_from
from minillm_kernels.training.data import load_training_data
from minillm_kernels.training.methods import GOLD_ANSWERS, METHODS
from minillm_kernels.training.report import WHERE_AND_HOW_FAST, write_results

SET_PER_RUN = ("--method", "--lr", "--seed", "--num-rollouts", "--teacher-answers")


def comparison_parser() -> argparse.ArgumentParser:
    """examples/train.py's flags and the comparison's own."""
    parser = argument_parser(__doc__)
    parser.allow_abbrev = False  # (a prefix of a flag the comparison sets per run must not slip through)
    own = parser.add_argument_group("the comparison")
    own.add_argument("--phase", choices=("tune", "test", "all"), default="all", help="tune on validation, test the "
                     "chosen settings, or both")
    own.add_argument("--rows", nargs="+", metavar="NAME", help=f"these rows of the plan only (default: every row: "
                     f"{', '.join(row.name for row in PLAN)})")
    own.add_argument("--lrs", type=float, nargs="+", default=comparison.DEFAULT_LRS, help="the learning-rate grid, "
                     "the same for every row")
    own.add_argument("--buffers", type=int, nargs="+", default=comparison.DEFAULT_BUFFERS, help="minillm's "
                     "rollout-buffer grid (--num-rollouts, multiples of --batch-size), with each learning rate")
    own.add_argument("--seeds", type=int, nargs="+", default=(0, 1, 2, 3, 4), help="the test phase's training seeds")
    own.add_argument("--tuning-seed", type=int, default=0, help="the tuning runs' training seed")
    own.add_argument("--worker", action="store_true", help="one of several processes at once: take the runs of the "
                     "phase that no other worker has claimed (--out-dir/claims/<phase>/), write no table")
    return parser


def run_config(parser: argparse.ArgumentParser, argv: list[str], row: Row, settings: tuple[str, ...], seed: int,
               out_dir: Path) -> TrainConfig:
    """The config of one run: the command line, then the row's flags, the grid point's and the run's own."""
    args = parser.parse_args([*argv, *row.flags, *settings, "--method", row.method, "--seed", str(seed),
                              "--out-dir", str(comparison.run_folder(out_dir, row, settings, seed))])
    return config_from(parser, args)


def claim(claims: Path, out_dir: Path) -> Callable[[train.PlannedRun], bool]:
    """Whether this worker takes a run, asked when the loop comes to it: a run is the worker's that made its folder
    under ``claims`` (mkdir is atomic: one worker makes it, the others find it made and go on to the next run)."""
    def take(run: train.PlannedRun) -> bool:
        folder = claims / run[2].relative_to(out_dir / "runs")
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            folder.mkdir()
        except FileExistsError:
            return False
        return True

    return take


def available(parser: argparse.ArgumentParser, row: Row) -> bool:
    """Whether this version has the row's method and knows its flags."""
    return row.method in METHODS and not parser.parse_known_args(list(row.flags))[1]


def main(argv: list[str] | None = None) -> None:
    parser = comparison_parser()
    args = parser.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    given = {arg.split("=")[0] for arg in argv}
    if given & set(SET_PER_RUN):
        parser.error(f"{', '.join(sorted(given & set(SET_PER_RUN)))}: the comparison sets these per run (the grid: "
                     "--lrs and --buffers; the seeds: --seeds and --tuning-seed)")
    base = config_from(parser, args)
    if args.worker and "RANK" in os.environ:
        parser.error("--worker: one process per worker (the claims are per process): drop torchrun or --worker")
    if base.run.fsdp:
        parser.error("the teacher's answers (seqkd, kd on them) are generated by one process with the whole teacher: "
                     "drop --fsdp (DDP or one process)")
    unknown = set(args.rows or ()) - {row.name for row in PLAN}
    if unknown:
        parser.error(f"--rows {', '.join(sorted(unknown))}: not in the plan ({', '.join(r.name for r in PLAN)})")
    asked = [row for row in PLAN if not args.rows or row.name in args.rows]
    rows = [row for row in asked if available(parser, row)]
    not_yet = [row.name for row in asked if row not in rows]  # planned rows whose method or flags do not exist yet
    out_dir = Path(base.run.out_dir)
    gold = [row.name for row in rows if run_config(parser, argv, row, (), 0, out_dir).method.trains_on == GOLD_ANSWERS]
    data = load_training_data(base.data, seed=base.run.seed, gold_answers_for=gold)  # checked before a model loads
    if not data.validation:
        parser.error("the comparison tunes and chooses on a validation split: give --validation-size > 0 (and data "
                     "with gold answers to draw it from)")
    plan_grid = {row.name: comparison.grid(row, args.lrs, args.buffers) for row in rows}
    context = {"args": {name: value for name, value in base.flags().items()
                        if name not in WHERE_AND_HOW_FAST | {"eval_samples"}},
               "lrs": list(args.lrs), "buffers": list(args.buffers), "tuning_seed": args.tuning_seed,
               "validation": len(data.validation), "validation_seed": base.data.validation_seed,
               "select_by": base.run.select_by, "steps": base.optim.steps, "plan": list(plan_grid),
               "planned": not_yet}

    def share(phase: str) -> Optional[Callable[[train.PlannedRun], bool]]:
        return claim(out_dir / "claims" / phase, out_dir) if args.worker else None

    if args.phase in ("tune", "all"):
        tuning_runs = [(row, settings) for row in rows for settings in plan_grid[row.name]]
        planned = [(row.name, run_config(parser, argv, row, settings, args.tuning_seed, out_dir),
                    comparison.run_folder(out_dir, row, settings, args.tuning_seed)) for row, settings in tuning_runs]
        results = train.distill(base, data, planned, claim=share("tune"), read_finished=True, references=False, test=False)
        if results is not None and not args.worker:  # rank 0, every tuning run done: choose on validation
            records = {(row.name, settings): record for (row, settings), record in zip(tuning_runs, results["runs"])}
            comparison.write_tuning(out_dir, comparison.choose(plan_grid, records, context))
    if args.phase in ("test", "all"):
        tuning = comparison.read_tuning(out_dir, context)
        chosen = {row.name: tuple(tuning["rows"][row.name]["chosen"]) for row in rows}
        planned = [(row.name, run_config(parser, argv, row, chosen[row.name], seed, out_dir),
                    comparison.run_folder(out_dir, row, chosen[row.name], seed)) for row in rows for seed in args.seeds]
        if args.worker:  # the costliest rows first (their tuning run's training time): the workers end together
            planned.sort(key=lambda run: -comparison.training_seconds(tuning, run[0]))
        results = train.distill(base, data, planned, claim=share("test"), read_finished=True, references=not args.worker,
                                test=True)
        if results is not None and not args.worker:  # the tables, and the settings chosen beside them
            write_results(out_dir, results, "compare.md",
                          appendix=(out_dir / comparison.TUNING_TABLE).read_text(encoding="utf-8"))

if __name__ == "__main__":
    main()
