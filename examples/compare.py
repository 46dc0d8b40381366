"""The tuned comparison: every row of the plan (``comparison.PLAN``: sft, kd, seqkd, kd on the teacher's answers,
minillm, gkd with the reverse KL, and the planned rows once their methods exist) tuned on the validation split, then
trained with --seeds at the settings chosen, and evaluated on the test split; one table over the seeds.

    python examples/compare.py                                   # tune, then test: the whole comparison, one process
    python examples/compare.py --lrs 1e-4 3e-4 --seeds 0 1 --steps 100 --rows sft minillm   # a smaller grid
    bash scripts/compare.sh                                      # the same in parallel processes (--shard)

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
checkpoints). --shard K/N trains the K-th of every N runs of its phase only and writes no table: N processes at once
(scripts/compare.sh), then one without --shard reads every run back and writes the tables.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import train  # examples/train.py: the loop
from minillm_kernels.training import comparison
from minillm_kernels.training.comparison import PLAN, Row
from minillm_kernels.training.config import TrainConfig, argument_parser, config_from
from minillm_kernels.training.data import load_training_data
from minillm_kernels.training.methods import GOLD_ANSWERS, METHODS
from minillm_kernels.training.report import WHERE_AND_HOW_FAST, write_results

SET_PER_RUN = ("--method", "--lr", "--seed", "--num-rollouts", "--teacher-answers")


def shard(text: str) -> tuple[int, int]:
    """--shard K/N: (K, N) with 0 <= K < N."""
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise argparse.ArgumentTypeError(f"give K/N with 0 <= K < N (e.g. 0/2), got {text!r}")
    return int(index), int(count)


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
    own.add_argument("--shard", type=shard, help="K/N: run the K-th of every N runs of the phase only, no tables")
    return parser


def run_config(parser: argparse.ArgumentParser, argv: list[str], row: Row, settings: tuple[str, ...], seed: int,
               out_dir: Path) -> TrainConfig:
    """The config of one run: the command line, then the row's flags, the grid point's and the run's own."""
    args = parser.parse_args([*argv, *row.flags, *settings, "--method", row.method, "--seed", str(seed),
                              "--out-dir", str(comparison.run_folder(out_dir, row, settings, seed))])
    return config_from(parser, args)


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
    if base.run.fsdp:
        parser.error("the teacher's answers (seqkd, kd on them) are generated by one process with the whole teacher: "
                     "drop --fsdp (DDP or one process)")
    unknown = set(args.rows or ()) - {row.name for row in PLAN}
    if unknown:
        parser.error(f"--rows {', '.join(sorted(unknown))}: not in the plan ({', '.join(r.name for r in PLAN)})")
    chosen_rows = [row for row in PLAN if not args.rows or row.name in args.rows]
    rows = [row for row in chosen_rows if available(parser, row)]
    planned = [row.name for row in chosen_rows if row not in rows]
    out_dir = Path(base.run.out_dir)
    data = load_training_data(base.data, seed=base.run.seed,  # read (and checked) before any model loads
                              gold_answers_for=[row.name for row in rows if METHODS[row.method].targets == GOLD_ANSWERS
                                                and "--teacher-answers" not in row.flags])
    if not data.validation:
        parser.error("the comparison tunes and chooses on a validation split: give --validation-size > 0 (and data "
                     "with gold answers to draw it from)")
    plan_grid = {row.name: comparison.grid(row, args.lrs, args.buffers) for row in rows}
    context = {"args": {name: value for name, value in base.flags().items()
                        if name not in WHERE_AND_HOW_FAST | {"eval_samples"}},
               "lrs": list(args.lrs), "buffers": list(args.buffers), "tuning_seed": args.tuning_seed,
               "validation": len(data.validation), "validation_seed": base.data.validation_seed,
               "select_by": base.run.select_by, "steps": base.optim.steps, "plan": list(plan_grid),
               "planned": planned}
    rank_of_shard, shards = args.shard or (0, 1)

    def share(runs: list) -> list:
        return runs[rank_of_shard::shards]

    if args.phase in ("tune", "all"):
        tuning_runs = [(row, settings) for row in rows for settings in plan_grid[row.name]]
        results = train.distill(base, data, share([
            (row.name, run_config(parser, argv, row, settings, args.tuning_seed, out_dir),
             comparison.run_folder(out_dir, row, settings, args.tuning_seed)) for row, settings in tuning_runs]),
            read_finished=True, references=False, test=False)
        if results is not None and args.shard is None:  # rank 0, every tuning run done: choose on validation
            records = {(row.name, settings): record for (row, settings), record in zip(tuning_runs, results["runs"])}
            comparison.write_tuning(out_dir, comparison.choose(plan_grid, records, context))
    if args.phase in ("test", "all"):
        tuning = comparison.read_tuning(out_dir, context)
        test_runs = [(row, tuple(tuning["rows"][row.name]["chosen"]), seed) for row in rows for seed in args.seeds]
        results = train.distill(base, data, share([
            (row.name, run_config(parser, argv, row, settings, seed, out_dir),
             comparison.run_folder(out_dir, row, settings, seed)) for row, settings, seed in test_runs]),
            read_finished=True, references=args.shard is None, test=True)
        if results is not None and args.shard is None:  # the tables, and the settings chosen beside them
            write_results(out_dir, results, "compare.md",
                          appendix=(out_dir / comparison.TUNING_TABLE).read_text(encoding="utf-8"))

if __name__ == "__main__":
    main()
