"""The tuned comparison's plan (``PLAN``: the rows, a method each with its fixed flags), the grid every row is tuned
over on the validation split (the same learning rates and steps for every row; MiniLLM also its rollout buffer), the
choice of each row's settings, and ``tuning.json`` / ``tuning.md``: the chosen settings with the validation scores
that chose them, written before any test run (examples/compare.py runs the plan).

A row of a method that this version does not have (not in ``methods.METHODS``), or with a flag that the trainer does
not know, is planned but not run: the tables list it as such, and it runs once the method (or the flag) exists.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from minillm_kernels.training.selection import best_of


@dataclass(frozen=True)
class Row:
    """One row of the comparison: its name in the tables, its --method and its fixed flags; ``tunes_buffer``: also
    tuned over the rollout buffer (--num-rollouts of each of compare's --buffers)."""

    name: str
    method: str
    flags: tuple[str, ...] = ()
    tunes_buffer: bool = False

    @property
    def folder(self) -> str:
        """Its runs' folder name under --out-dir/runs/."""
        return slug(self.name)


PLAN = (
    Row("sft", "sft"),
    Row("kd", "kd"),
    Row("seqkd", "seqkd"),
    Row("kd (teacher answers)", "kd", ("--teacher-answers",)),
    Row("minillm", "minillm", tunes_buffer=True),
    Row("gkd (reverse KL)", "gkd", ("--divergence", "reverse_kl")),
    Row("opd (sampled estimator)", "opd", ("--opd-estimator", "sampled")),
    Row("opd (exact estimator)", "opd", ("--opd-estimator", "exact")),
    # the loaded teacher's top 16 (the served-teacher interface in process): the numbers a top-16 offline cache gives
    # (tests/test_cache.py), without building one per data split
    Row("kd (top-16 teacher)", "kd", ("--teacher-top-k", "16")),
)
# (1e-3 since the first tuning on the tiny default: sft, kd and seqkd scored best at 3e-4, the grid's top, and were
# still rising there; a best value at the grid's edge is not yet tuned)
DEFAULT_LRS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3)
DEFAULT_BUFFERS = (32, 128)  # --num-rollouts: one minibatch of the default --batch-size (today's), and four
TUNING_FILE, TUNING_TABLE = "tuning.json", "tuning.md"


def slug(text: str) -> str:
    """``text`` as a folder name: runs of other characters than letters, digits, '.' and '-' become one '-'."""
    return re.sub(r"[^\w.-]+", "-", text).strip("-")


def grid(row: Row, lrs: list[float], buffers: list[int]) -> list[tuple[str, ...]]:
    """The settings ``row`` is tuned over, each as the flags that set it: every learning rate of ``lrs`` (the same
    for every row), and for a row that ``tunes_buffer`` each --num-rollouts of ``buffers`` with each."""
    return [("--lr", format(lr, "g"), *(("--num-rollouts", str(buffer)) if row.tunes_buffer else ()))
            for lr in lrs for buffer in (buffers if row.tunes_buffer else [None])]


def settings_folder(settings: tuple[str, ...]) -> str:
    """The folder name of a grid point: its flags without their dashes, e.g. lr-0.0001-num-rollouts-128."""
    return slug(" ".join(part.lstrip("-") for part in settings))


def run_folder(out_dir: Path, row: Row, settings: tuple[str, ...], seed: int) -> Path:
    """Where a run of ``row`` at ``settings`` with ``seed`` writes: the tuning run of a grid point and the test
    run of the same point and seed are one run."""
    return out_dir / "runs" / row.folder / settings_folder(settings) / f"seed-{seed}"


def choose(plan_grid: dict[str, list[tuple[str, ...]]], records: dict[tuple[str, tuple[str, ...]], dict],
           context: dict) -> dict:
    """The tuning's outcome, from the tuning runs' records only (``records[(row name, settings)]``: each one's
    "selected" checkpoint, its validation "history", its args and compute; no test score is read): per row the
    settings whose
    chosen checkpoint scored best on validation (``selection.best_of``: the first of equals, in grid order), with
    every grid point's validation figures. ``context`` (the grid, the steps, the split, the tuning seed) is stored
    with it, for the test phase to check it runs what was tuned."""
    rows = {}
    for name, settings_list in plan_grid.items():
        candidates = []
        for settings in settings_list:
            record = records[(name, settings)]
            select_by = record["args"]["select_by"]
            history = [(entry["step"], score_of(entry["validation"], select_by)) for entry in record["history"]]
            candidates.append({"settings": list(settings), "selected": record["selected"],
                               "last_score": history[-1][1] if history else None, "history": history,
                               "seconds": record["compute"]["seconds"]})
        chosen = best_of([(tuple(c["settings"]), c["selected"] and c["selected"]["score"]) for c in candidates])
        rows[name] = {"chosen": list(chosen), "candidates": candidates}
    return {**context, "rows": rows}


def training_seconds(tuning: dict, name: str) -> float:
    """The training seconds of row ``name``'s tuning run at its chosen settings."""
    row = tuning["rows"][name]
    return next(c["seconds"] for c in row["candidates"] if c["settings"] == row["chosen"])


def score_of(scores: dict, select_by: str) -> Optional[float]:
    """``scores[group][metric]`` of ``select_by``, None where it is absent."""
    group, metric = select_by.split(".")
    return scores.get(group, {}).get(metric)


def write_tuning(out_dir: Path, tuning: dict) -> None:
    """``tuning.json`` (every figure) and ``tuning.md`` (the tables) in ``out_dir``, each written to a temporary file
    and renamed."""
    for name, text in ((TUNING_FILE, json.dumps(tuning, indent=1) + "\n"), (TUNING_TABLE, tuning_markdown(tuning))):
        temporary = out_dir / f"{name}.tmp"
        temporary.write_text(text, encoding="utf-8")
        temporary.replace(out_dir / name)


def read_tuning(out_dir: Path, context: dict) -> dict:
    """``tuning.json`` of ``out_dir``; SystemExit if there is none, or if it was tuned in another ``context`` (grid,
    steps, validation split, tuning seed): the test phase runs only the settings chosen for this plan."""
    path = out_dir / TUNING_FILE
    if not path.is_file():
        raise SystemExit(f"{path}: no tuning yet; run the tuning phase first (examples/compare.py --phase tune, with "
                         "the same flags)")
    tuning = json.loads(path.read_text(encoding="utf-8"))
    changed = [f"{key}: tuned with {tuning.get(key)!r}, now {value!r}" for key, value in context.items()
               if tuning.get(key) != value]
    if changed:
        raise SystemExit(f"{path} was tuned for another plan ({'; '.join(changed)}): rerun the tuning phase with "
                         "these flags, or give the flags it was tuned with")
    return tuning


def tuning_markdown(tuning: dict) -> str:
    """The tuning's tables: per row, each grid point's validation score at its chosen checkpoint (and step) and at
    its last evaluation, the chosen one marked."""
    text = (f"Settings chosen on the validation split ({tuning['validation']} prompts drawn from the training pool "
            f"with seed {tuning['validation_seed']}; greedy {tuning['select_by']}), training seed "
            f"{tuning['tuning_seed']}, "
            f"{tuning['steps']} steps each; the same learning rates for every method, MiniLLM also its rollout "
            f"buffer. Fixed before any test run.\n\n"
            "| method | settings | validation (chosen checkpoint) | its step | validation (last) | chosen |\n"
            "|---|---|---|---|---|---|\n")
    for name, row in tuning["rows"].items():
        for candidate in row["candidates"]:
            selected = candidate["selected"]
            text += (f"| {name} | {' '.join(candidate['settings'])} | "
                     f"{'-' if selected is None else format(selected['score'], '.1f')} | "
                     f"{'-' if selected is None else selected['step']} | "
                     f"{'-' if candidate['last_score'] is None else format(candidate['last_score'], '.1f')} | "
                     f"{'yes' if candidate['settings'] == row['chosen'] else ''} |\n")
    if tuning["planned"]:
        text += f"\nPlanned, not in this version yet (not run): {', '.join(tuning['planned'])}.\n"
    return text
