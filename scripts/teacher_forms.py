"""Issue 25's measurement at a small budget: kd from the live teacher and from offline top-k caches (k = 1, 4, 16,
64), and opd with each estimator beside gkd with the reverse KL, on the tiny default: one seed, one learning rate
(the tiny default's), the same steps, data and evaluation for every run; the held-out scores, the training time and
what each loss reads of the teacher per token. Not the tuned comparison (examples/compare.py: tuned on validation,
five seeds): what it shows is the cost side, and whether a small k loses anything visible at this budget.

    python scripts/teacher_forms.py --out examples/results/teacher-forms [--steps 60]

Writes --out/caches/k<K>/ (not committed: rebuilt by the script), --out/runs/<row>/ (each run's log.jsonl),
results.json and results.md (examples/train.py's tables, then the teacher's bytes per token per row).
"""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch

from minillm_kernels.training import cache as teacher_cache
from minillm_kernels.training.comparison import slug
from minillm_kernels.training.config import parse_args
from minillm_kernels.training.data import load_training_data
from minillm_kernels.training.report import write_results

ROOT = Path(__file__).resolve().parents[1]
CACHE_KS = (1, 4, 16, 64)


def train_module():
    spec = importlib.util.spec_from_file_location("example_train", ROOT / "examples" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    data_flags = ["--pool-size", "400", "--validation-size", "100", "--threads", str(args.threads)]
    common = [*data_flags, "--steps", str(args.steps), "--batch-size", "16", "--eval-every", str(args.steps // 3),
              "--warmup-steps", "10", "--eval-samples", "0", "--seed", "0"]
    for k in CACHE_KS:
        teacher_cache.main(["build", "--out", str(args.out / "caches" / f"k{k}"), "--teacher-top-k", str(k),
                            *data_flags])
    rows = [("kd (live teacher)", ["--method", "kd"])]
    rows += [(f"kd (top-{k} cache)", ["--method", "kd", "--teacher-cache", str(args.out / "caches" / f"k{k}")])
             for k in CACHE_KS]
    rows += [("opd (sampled estimator)", ["--method", "opd", "--opd-estimator", "sampled"]),
             ("opd (exact estimator)", ["--method", "opd", "--opd-estimator", "exact"]),
             ("gkd (reverse KL)", ["--method", "gkd", "--divergence", "reverse_kl"])]
    train = train_module()
    base = parse_args([*common, "--method", "kd", "--out-dir", str(args.out)])
    planned = [(name, parse_args([*common, *flags, "--out-dir", str(args.out / "runs" / slug(name))]),
                args.out / "runs" / slug(name)) for name, flags in rows]
    data = load_training_data(base.data, seed=0, gold_answers_for=["kd"])
    results = train.distill(base, data, planned, read_finished=True)
    vocab = 449
    lines = ["", "", "What each run's loss reads of the teacher per response token (float32 logits: 4 V bytes; a cache: "
             "its bytes per token on disk, the rows' tokens included; opd's sampled estimator: log p of the sampled "
             "token, 4 bytes, though the teacher in memory computes its logits):", "",
             "| run | teacher bytes per token | teacher forward tokens | training s |", "|---|---|---|---|"]
    for record in results["runs"]:
        compute = record["compute"]
        cached = compute.get("teacher_cache")
        size = (f"{cached['bytes_per_token']:.1f}" if cached else "4" if "sampled" in record["name"] else
                f"{4 * vocab:,}")
        lines.append(f"| {record['name']} | {size} | {compute['teacher_forward_tokens']:,} | "
                     f"{compute['seconds']:.1f} |")
    write_results(args.out, results, "results.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
