"""The results of a training run or of the method comparison: what they were measured with (``setup``) and the
markdown tables (``results_markdown``): gold tasks, open tasks, long tasks and ExAccErr, compute, then per task.

``results`` is what results.json holds: ``{"setup", "teacher", "student (start)", "gold answers", "runs"}``, the
first three the ``final_scores`` of the teacher and the start student and the scores of the held-out gold answers,
"runs" one record per run: ``{"name", "method", "teacher_answers", "seed", "history", "final", "compute"}``.
"""
from __future__ import annotations

import contextlib
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
            "heldout": len(data.heldout), "date": time.strftime("%Y-%m-%d %H:%M %Z"), "device": str(device), "cpu": cpu,
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
                ("ExAccErr(20) %", "exposure_bias", None, "ex_acc_err"))


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


def grouped(results: dict) -> dict[str, list[dict]]:
    """``{row name: [final_scores, ...]}``: the teacher, the start student, then each run's name over its seeds."""
    rows = {"teacher": [results["teacher"]], "student (start)": [results["student (start)"]]}
    for record in results["runs"]:
        rows.setdefault(f"student after {record['name']}", []).append(record["final"])
    return rows


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


def compute_table(results: dict) -> str:
    """Per run name, over its seeds: the teacher forward tokens, generated tokens and training seconds of the runs,
    and what the teacher's answers (where used) cost to generate, once per seed."""
    lines = ["| method | teacher forward tokens | generated tokens | training s | teacher answers: forward tokens, "
             "generated tokens, s |", "|---|---|---|---|---|"]
    names = dict.fromkeys(record["name"] for record in results["runs"])
    for name in names:
        computes = [record["compute"] for record in results["runs"] if record["name"] == name]
        answers = [c["answers"] for c in computes if c["answers"]]
        cost = "-" if not answers else (f"{statistics.fmean(a['teacher_forward_tokens'] for a in answers):,.0f}, "
                                        f"{statistics.fmean(a['generated_tokens'] for a in answers):,.0f}, "
                                        f"{mean_sd([a['seconds'] for a in answers])}")
        lines.append(f"| {name} | {statistics.fmean(c['teacher_forward_tokens'] for c in computes):,.0f} | "
                     f"{statistics.fmean(c['generated_tokens'] for c in computes):,.0f} | "
                     f"{mean_sd([c['seconds'] for c in computes])} | {cost} |")
    return "\n".join(lines)


def results_markdown(results: dict) -> str:
    """The results' tables: gold tasks, open tasks, long tasks and ExAccErr, compute, then per task."""
    a, rows = results["setup"]["args"], grouped(results)
    seeds = sorted({record["seed"] for record in results["runs"]})
    text = (f"Held-out scores (%) on {results['setup']['heldout']} prompts; every method trained on the same "
            f"{results['setup']['prompts']} prompts ({results['setup']['gold pairs']} with a gold answer); mean ± sd "
            f"over training seeds {seeds}; T=1: the mean over {a['eval_samples']} sample seeds. {a['steps']} steps x "
            f"{a['batch_size']} sequences x {results['setup']['processes']} process(es), lr {a['lr']:g} after "
            f"{a['warmup_steps']} warm-up steps, L_PT coefficient {a['lm_coef']:g}; {results['setup']['cpu']}, "
            f"{results['setup']['threads']} thread(s), torch {results['setup']['torch']}, "
            f"{results['setup']['date']}.\n\n"
            f"Tasks with one gold answer: Rouge-L, exact match, expected calibration error\n\n"
            f"{table(rows, GOLD_COLUMNS)}\n\n")
    if any(figure(finals[0], *OPEN_COLUMNS[0][1:]) is not None for finals in rows.values()):
        gold = {"greedy": results["gold answers"], "sampled": [], "exposure_bias": None}
        text += (f"Open tasks: validity rate, distinct-2 (the held-out gold answers: one right answer each, drawn "
                 f"at random)\n\n{table({'gold answers': [gold], **rows}, OPEN_COLUMNS)}\n\n")
    if any(figure(finals[0], *c[1:]) is not None for c in LONG_COLUMNS for finals in rows.values()):
        text += f"Long responses: exact match, validity, ExAccErr(20)\n\n{table(rows, LONG_COLUMNS)}\n\n"
    text += f"Compute per run (mean over seeds)\n\n{compute_table(results)}\n\n"
    for decoding in ("greedy", "sampled"):
        per_task = {row: mean_scores([s for f in finals for s in ([f["greedy"]] if decoding == "greedy"
                                                                  else f["sampled"])]) for row, finals in rows.items()}
        per_task = {row: scores for row, scores in per_task.items() if scores}
        if per_task:
            text += (f"Per task, {'greedy' if decoding == 'greedy' else 'T=1'} (gold: R-L / EM; open: valid / "
                     f"distinct-2)\n\n{markdown_table(per_task)}\n\n")
    return text


def finished_run(run_dir: Path, method: str, steps: int) -> Optional[dict]:
    """The record of the run of ``method`` that already ended in ``run_dir`` (its log.jsonl ends with the final
    record of ``method`` at ``steps``), else None: what ``compare --resume`` reads back instead of training again."""
    records = read_records(run_dir / "log.jsonl")
    if not records or "final" not in records[-1] or records[-1]["method"] != method or records[-1]["step"] != steps:
        return None
    history = [{"step": r["step"], "heldout": r["eval"]} for r in records if "eval" in r]
    return {"history": history, "final": records[-1]["final"], "compute": records[-1]["compute"]}
