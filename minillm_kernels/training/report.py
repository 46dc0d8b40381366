"""The results of a training run or of the method comparison: what they were measured with (``setup``) and the
markdown tables (``results_markdown``): a summary of each method's scores beside its cost, then gold tasks, open
tasks, long tasks and ExAccErr with its two parts, the last checkpoints, the teacher answers' cost, per task.

``results`` is what results.json holds: ``{"setup", "teacher", "student (start)", "gold answers", "runs"}``, the
second and third the test split's ``final_scores`` of the teacher (None where it was cached or served, not loaded)
and the start student, then the scores of the
test split's gold answers, "runs" one record per run: ``{"name", "method", "teacher_answers", "seed", "args",
"history" (validation), "selected" (the chosen checkpoint's step and validation score), "compute", "test":
{"chosen_step", "chosen", "last"} (the test split's ``final_scores`` of the chosen and the last checkpoint)}``.
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from pathlib import Path
from typing import Optional

import torch

from minillm_kernels.training.checkpoint import read_records
from minillm_kernels.training.config import TrainConfig
from minillm_kernels.training.data import TrainingData
from minillm_kernels.training.evaluation import markdown_table


def setup(config: TrainConfig, device: torch.device, world: int, data: TrainingData) -> dict:
    """What the results were measured with: the arguments, the data's sizes, the machine and the versions, the date."""
    import platform

    import transformers

    cpu = platform.processor()
    with contextlib.suppress(OSError, StopIteration):  # Linux: the model name, family and AVX-512
        info = dict(line.split(":", 1) for line in open("/proc/cpuinfo").read().split("\n\n")[0].splitlines())
        info = {key.strip(): value.strip() for key, value in info.items()}
        cpu = (f"{info['model name']}, family {info['cpu family']}"
               + (", AVX-512" if "avx512f" in info["flags"].split() else "") + f", {os.cpu_count()} cores")
    return {"args": config.flags(), "prompts": len(data.pool), "gold pairs": len(data.pairs),
            "validation": len(data.validation), "heldout": len(data.heldout), "date": time.strftime("%Y-%m-%d %H:%M %Z"), "device": str(device), "cpu": cpu,
            "threads": torch.get_num_threads(), "processes": world, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


# (column, decoding, group of evaluate's scores, metric): the tables' columns; "sampled" is the mean over the samples
GOLD_COLUMNS = (("R-L", "greedy", "gold", "rouge_l"), ("EM", "greedy", "gold", "exact_match"),
                ("R-L T=1", "sampled", "gold", "rouge_l"), ("EM T=1", "sampled", "gold", "exact_match"),
                ("ECE", "greedy", "gold", "ece"), ("ECE T=1", "sampled", "gold", "ece"))
OPEN_COLUMNS = (("valid", "greedy", "open", "valid"), ("valid T=1", "sampled", "open", "valid"),
                ("distinct-2", "greedy", "open", "distinct_2"), ("distinct-2 T=1", "sampled", "open", "distinct_2"))
LONG_COLUMNS = (("countup EM", "greedy", "countup", "exact_match"), ("countup EM T=1", "sampled", "countup",
                                                                     "exact_match"),
                ("story valid", "greedy", "story", "valid"), ("story valid T=1", "sampled", "story", "valid"),
                ("ExAccErr(20) %", "exposure_bias", None, "ex_acc_err"),
                ("error on own prefixes R(20), nats", "exposure_bias", None, "regret"),
                ("on the teacher's l eps(20), nats", "exposure_bias", None, "oracle_error"))
# a run's flags that change neither what it trains nor how it is evaluated: a finished run is read back across them
WHERE_AND_HOW_FAST = frozenset({"out_dir", "resume", "threads", "cache_dir", "save_every"})


def figure(final: dict, decoding: str, group: str | None, metric: str) -> float | None:
    """One figure of a run's ``final_scores`` (None where it was not measured)."""
    if decoding == "exposure_bias":
        return None if final["exposure_bias"] is None else final["exposure_bias"][metric]
    scores = [final["greedy"]] if decoding == "greedy" else final["sampled"]
    values = [s[group][metric] for s in scores if metric in s.get(group, {})]
    return statistics.fmean(values) if values else None


def mean_sd(values: list) -> str:
    """``mean ± sd`` of the values that are not None (sd over 2 or more), "-" if there are none."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{statistics.fmean(values):.1f}" + (f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else "")


def grouped(results: dict, checkpoint: str = "chosen") -> dict[str, list[dict]]:
    """``{row name: [final_scores, ...]}``: the teacher (unless it was cached or served: None), the start student,
    then each run's name over its seeds, the test scores of its ``checkpoint`` ("chosen" on validation, or "last")."""
    rows = {"teacher": [results["teacher"]]} if results["teacher"] is not None else {}
    rows["student (start)"] = [results["student (start)"]]
    for record in results["runs"]:
        rows.setdefault(f"student after {record['name']}", []).append(record["test"][checkpoint])
    return rows


def runs_by_name(results: dict) -> dict[str, list[dict]]:
    """``{run name: [its record for each seed]}``, in the order of the runs."""
    named: dict[str, list[dict]] = {}
    for record in results["runs"]:
        named.setdefault(record["name"], []).append(record)
    return named


def summary_table(results: dict) -> str:
    """Per run name, over its seeds: the learning rate, the chosen checkpoints' steps and validation scores, the test
    split's greedy Rouge-L of the chosen and of the last checkpoint and ExAccErr (chosen), beside what the run cost
    (teacher forward tokens, generated tokens, training seconds)."""
    select_by = results["setup"]["args"]["select_by"]
    lines = [f"| method | lr | chosen steps | validation {select_by} | test R-L | test R-L, last | ExAccErr(20) % | "
             "teacher forward tokens | generated tokens | training s |", "|---" * 10 + "|"]
    for name, records in runs_by_name(results).items():
        computes = [record["compute"] for record in records]
        chosen = [figure(r["test"]["chosen"], "greedy", "gold", "rouge_l") for r in records]
        last = [figure(r["test"]["last"], "greedy", "gold", "rouge_l") for r in records]
        bias = [figure(r["test"]["chosen"], "exposure_bias", None, "ex_acc_err") for r in records]
        scores = [r["selected"]["score"] for r in records if r["selected"] is not None]
        rates = ", ".join(sorted({format(r["args"]["lr"], "g") for r in records}))
        lines.append(f"| {name} | {rates} | "
                     f"{', '.join(str(r['test']['chosen_step']) for r in records)} | {mean_sd(scores)} | "
                     f"{mean_sd(chosen)} | {mean_sd(last)} | {mean_sd(bias)} | "
                     f"{statistics.fmean(c['teacher_forward_tokens'] for c in computes):,.0f} | "
                     f"{statistics.fmean(c['generated_tokens'] for c in computes):,.0f} | "
                     f"{mean_sd([c['seconds'] for c in computes])} |")
    return "\n".join(lines)


def table(rows: dict[str, list[dict]], columns: tuple) -> str:
    """A markdown table of ``rows`` (mean ± sd over each row's runs), with the columns that any row has."""
    kept = [column for column in columns
            if any(figure(final, *column[1:]) is not None for finals in rows.values() for final in finals)]
    lines = ["| model | " + " | ".join(name for name, *_ in kept) + " |", "|---" * (len(kept) + 1) + "|"]
    for row, finals in rows.items():
        lines.append(f"| {row} | " + " | ".join(mean_sd([figure(f, *c[1:]) for f in finals]) for c in kept) + " |")
    return "\n".join(lines)


def mean_scores(all_scores: list[dict]) -> dict:
    """The mean of each (task, metric) of several ``evaluate`` results."""
    pairs = {(task, metric) for scores in all_scores for task, metrics in scores.items() for metric in metrics}
    means: dict[str, dict[str, float]] = {}
    for task, metric in sorted(pairs):
        values = [s[task][metric] for s in all_scores if metric in s.get(task, {})]
        means.setdefault(task, {})[metric] = statistics.fmean(values)
    return means


def answers_table(results: dict) -> str:
    """Per run name that trains on the teacher's answers: what generating them cost, once per seed (mean over the
    seeds), beside the runs' own cost in ``summary_table``; "" if no run does."""
    lines = ["| method | teacher forward tokens | generated tokens | s |", "|---|---|---|---|"]
    for name, records in runs_by_name(results).items():
        answers = [r["compute"]["answers"] for r in records if r["compute"]["answers"]]
        if answers:
            lines.append(f"| {name} | {statistics.fmean(a['teacher_forward_tokens'] for a in answers):,.0f} | "
                         f"{statistics.fmean(a['generated_tokens'] for a in answers):,.0f} | "
                         f"{mean_sd([a['seconds'] for a in answers])} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def results_markdown(results: dict) -> str:
    """The results' tables: the summary (scores beside cost), gold tasks, open tasks, long tasks and ExAccErr with its
    parts (each of the chosen checkpoints), gold tasks of the last checkpoints, the teacher answers' cost, per task."""
    a, setup, rows = results["setup"]["args"], results["setup"], grouped(results)
    seeds = sorted({record["seed"] for record in results["runs"]})
    lm = (f"L_PT coefficient {a['lm_coef']:g} on {a['lm_data']}" if a["lm_coef"] else
          "no L_PT (no pre-training text given, --lm-data: none for any method)")
    evaluated = f"every {a['eval_every']} steps" if a["eval_every"] else "before and after training"
    text = (f"Test scores (%) on {setup['heldout']} held-out prompts, of each run's checkpoint chosen on "
            f"{setup['validation']} validation prompts (greedy {a['select_by']}, evaluated {evaluated}) unless a "
            f"table says the last; every method trained on the same {setup['prompts']} prompts "
            f"({setup['gold pairs']} with a gold answer); mean ± sd over training seeds {seeds}; T=1: the mean over "
            f"{a['eval_samples']} sample seeds. {a['steps']} steps x {a['batch_size']} sequences x "
            f"{setup['processes']} process(es), {a['warmup_steps']} warm-up steps, {lm}; {setup['cpu']}, "
            f"{setup['threads']} thread(s), torch {setup['torch']}, {setup['date']}.\n\n"
            f"Summary: scores and what they cost (teacher forward tokens and generated tokens per run, training "
            f"seconds without the evaluations)\n\n{summary_table(results)}\n\n"
            f"Tasks with one gold answer: Rouge-L, exact match, expected calibration error\n\n"
            f"{table(rows, GOLD_COLUMNS)}\n\n")
    if any(figure(finals[0], *OPEN_COLUMNS[0][1:]) is not None for finals in rows.values()):
        gold = {"greedy": results["gold answers"], "sampled": [], "exposure_bias": None}
        text += (f"Open tasks: validity rate, distinct-2 (the held-out gold answers: one right answer each, drawn "
                 f"at random)\n\n{table({'gold answers': [gold], **rows}, OPEN_COLUMNS)}\n\n")
    if any(figure(finals[0], *c[1:]) is not None for c in LONG_COLUMNS for finals in rows.values()):
        text += (f"Long responses: exact match, validity, ExAccErr(20) = R(20) / l eps(20) - 1: the student's error "
                 f"(teacher-to-student KL summed over 20 steps) on its own prefixes over that on the teacher's\n\n"
                 f"{table(rows, LONG_COLUMNS)}\n\n")
    text += f"The last checkpoints: tasks with one gold answer\n\n{table(grouped(results, 'last'), GOLD_COLUMNS)}\n\n"
    answers = answers_table(results)
    if answers:
        text += f"What the teacher's answers cost to generate (once per seed)\n\n{answers}\n\n"
    for decoding in ("greedy", "sampled"):
        per_task = {row: mean_scores([s for f in finals for s in ([f["greedy"]] if decoding == "greedy"
                                                                  else f["sampled"])]) for row, finals in rows.items()}
        per_task = {row: scores for row, scores in per_task.items() if scores}
        if per_task:
            text += (f"Per task, {'greedy' if decoding == 'greedy' else 'T=1'} (gold: R-L / EM; open: valid / "
                     f"distinct-2)\n\n{markdown_table(per_task)}\n\n")
    return text


def write_results(out_dir: Path, results: dict, file_name: str, appendix: str = "") -> None:
    """results.json and the tables (``results_markdown``, then ``appendix``) as ``file_name`` in ``out_dir``; the
    tables printed too."""
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    text = results_markdown(results) + appendix
    (out_dir / file_name).write_text(text, encoding="utf-8")
    print("\n" + text)


def same_settings(recorded: dict, config: TrainConfig) -> bool:
    """Whether a run recorded with the flags ``recorded`` trained and is evaluated as ``config`` would be (every flag
    but ``WHERE_AND_HOW_FAST``)."""
    flags = config.flags()
    return all(recorded.get(name) == value for name, value in flags.items() if name not in WHERE_AND_HOW_FAST)


def finished_run(run_dir: Path, config: TrainConfig) -> Optional[dict]:
    """The record of the run of ``config`` that already ended in ``run_dir`` (its log.jsonl's last "trained" record
    has the same settings, ``same_settings``), with its test scores (None if they were not measured yet); None if
    there is no such run: what examples/compare.py reads back instead of training again."""
    records = read_records(run_dir / "log.jsonl")
    ends = [index for index, record in enumerate(records) if "trained" in record]
    if not ends or not same_settings(records[ends[-1]]["trained"]["args"], config):
        return None
    tests = [record["test"] for record in records[ends[-1]:] if "test" in record]
    return {**records[ends[-1]]["trained"], "test": tests[-1] if tests else None}
