"""Distillation of a Hugging Face causal LM: MiniLLM, with the paper's SFT, KD and SeqKD baselines on equal terms, and
on-policy GKD.

    python examples/train.py                                   # tiny default: teacher + SFT student + data, shipped
    python examples/train.py --method kd --divergence jsd      # another method (minillm_kernels/training/methods.py)
    python examples/train.py --teacher smollm2 --student smollm2 --student-layers 6   # SmolLM2-135M-Instruct
    torchrun --nproc_per_node 2 examples/train.py ...          # DDP (gloo on CPU, NCCL on GPU)
    torchrun --nproc_per_node 2 examples/train.py --fsdp ...   # FSDP2: student and teacher sharded
    python examples/compare.py                                 # every method x 3 seeds on the same budget, one table

Every method gets the same prompt pool, start, number of optimizer steps of --batch-size sequences, learning rate
and schedule, and the same L_PT (--lm-data: lm_coef x cross-entropy on pre-training text added to every method's
loss; none without it). A step: the method's micro-batches (teacher-forced pairs, or the rows of a rollout of the
student's own samples), each one's L_PT and loss and their backward, gradient clipping, AdamW; then the log, the
held-out evaluation every --eval-every steps and the checkpoint every --save-every steps. The methods, their losses
and their defaults are in minillm_kernels/training/methods.py; the flags in minillm_kernels/training/config.py
(MiniLLM's are the reference code's, microsoft/LMOps minillm/, with one departure for the tiny default: lr 1e-4).

Evaluation: held-out greedy scores every --eval-every steps; at the end the whole protocol: greedy, sampled at T = 1
with each of --eval-samples seeds, and (tiny default) the exposure-bias measure ExAccErr on the long tasks
(minillm_kernels/training/evaluation.py).

Outputs in --out-dir: log.jsonl (one JSON record per step and per eval, flushed as written), checkpoint.pt (written
to a temp file and renamed; loadable with torch.load(weights_only=True)), student/ (the final model), results.json
(the scores and compute: teacher forward tokens, generated tokens, wall time) and results.md, the tables. --resume
continues from checkpoint.pt: weights, optimizer, data order, RNG, step and the current rollout; it refuses another
--method, lists the arguments that changed (they apply from the checkpoint's step on), and drops the log records
past the checkpoint's step (minillm_kernels/training/checkpoint.py). A fresh run starts a new log.jsonl.

Under torchrun every use of a model goes through one wrapper's forward (``minillm_kernels.distributed``): with DDP
the student's ModelRunner is wrapped by DDP (the fused-linear terms included, so their gradients are all-reduced);
with --fsdp the student and the frozen teacher are sharded by FSDP2, every process samples, evaluates and
checkpoints in step with the others, and checkpoint/ (sharded) replaces checkpoint.pt.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

import minillm_kernels as mk
from minillm_kernels.distributed import full_state_dict, full_tensor, parallelize
from minillm_kernels.training import methods
from minillm_kernels.training.checkpoint import JsonlLog, resume, save, save_model
from minillm_kernels.training.config import TrainConfig, parse_args
from minillm_kernels.training.data import (
    TrainingData, load_training_data, teacher_answers, teacher_forced_batch, with_chat_template,
)
from minillm_kernels.training.evaluation import evaluate, exposure_bias, score_responses
from minillm_kernels.training.models import load_student, load_teacher
from minillm_kernels.training.report import finished_run, results_markdown, setup
from minillm_kernels.training.run import Run, new_run

PlannedRun = tuple[str, TrainConfig, Path]  # (name in the results, its config, its folder)


# ----------------------------------------------------------------------------------------------- the loop

def train(config: TrainConfig, out_dir: Path, teacher, tokenizer, data: TrainingData, rank: int, world: int) -> dict:
    """Train a fresh copy of the start student with --method (or resume it), then evaluate it (``final_scores``).

    Returns ``{"history": [{"step", "heldout"}, ...], "final": final_scores, "compute": {"teacher_forward_tokens",
    "generated_tokens", "seconds" (training: the steps and their batches, not the evaluations), "answers" (what the
    teacher's answers cost to generate, or None)}}``, the counts summed over the processes.
    """
    run = new_run(config, out_dir, teacher, tokenizer, data, rank, world)
    resume(run)  # with --resume, from its checkpoint
    steps, method = config.optim.steps, run.method
    log = JsonlLog(out_dir / "log.jsonl", run.step if run.resumed else None, enabled=rank == 0)
    if run.step == 0:
        evaluate_run(run, data, log)
    bar = tqdm(range(run.step, steps), desc=method.name, disable=rank != 0, initial=run.step, total=steps)
    for _ in bar:
        started = time.time()
        parts = optimizer_step(run, pretrain_batches(run), method.micro_batches(run))
        run.compute["seconds"] += time.time() - started
        log.write({"method": method.name, "step": run.step, **parts, "seconds": run.compute["seconds"]})
        bar.set_postfix({name: f"{parts[name]:.4f}" for name in ("total_loss", method.shown_loss)})
        if config.run.eval_every and run.step % config.run.eval_every == 0:
            evaluate_run(run, data, log)
        if run.step % config.run.save_every == 0 or run.step == steps:
            save(run)
    if run.history[-1]["step"] != run.step:  # the final greedy eval, unless --eval-every just ran it
        evaluate_run(run, data, log)
        save(run)
    final = final_scores(config, run.model, teacher, tokenizer, data, rank, world, greedy=run.history[-1]["heldout"])
    compute = dict(run.compute)
    if world > 1:
        log.write({"method": method.name, "step": run.step, "replica_max_difference": replica_difference(run.student)})
        counts = torch.tensor([compute["teacher_forward_tokens"], compute["generated_tokens"]], device=run.device)
        dist.all_reduce(counts)
        compute.update(teacher_forward_tokens=int(counts[0]), generated_tokens=int(counts[1]))
    compute["answers"] = data.answers
    log.write({"method": method.name, "step": run.step, "final": final, "compute": compute})
    state = full_state_dict(run.student)  # (gathered from every process under --fsdp)
    if rank == 0:
        save_model(run.student, state, tokenizer, out_dir / "student")
    log.close()
    return {"history": run.history, "final": final, "compute": compute}


def optimizer_step(run: Run, pretrain: list, micro_batches: list) -> dict[str, float]:
    """One optimizer step: each micro-batch's L_PT (``pretrain``: its text batch, or None) and method loss and their
    backward (each / --grad-accum; DDP all-reduces on the last micro-batch only, FSDP2 reduce-scatters every time;
    L_PT's backward comes first, so that its graph is freed before the method's), gradient clipping, AdamW at this
    step's learning rate. FloatingPointError before the update if a loss or the gradient norm is not finite.
    Returns the logged figures: the loss parts averaged over the micro-batches and processes, lr, grad_norm."""
    optim, lm_coef, parts = run.config.optim, run.config.lm.lm_coef, {}
    for index, (micro_batch, lm_batch) in enumerate(zip(micro_batches, pretrain)):
        micro_parts = {}
        with run.autocast():
            if lm_batch is not None:
                with run.no_sync():
                    lm_loss = methods.pretrain_loss(run, lm_batch)
                    run.stop_if_not_finite(lm_coef * lm_loss, "loss", {"lm_loss": lm_loss})
                    (lm_coef * lm_loss / optim.grad_accum).backward()
                micro_parts["lm_loss"] = lm_loss.detach()
            loss, method_parts = run.method.loss(run, micro_batch)
        micro_parts.update(method_parts)
        run.stop_if_not_finite(loss, "loss", micro_parts)
        with run.no_sync(skip=index < len(micro_batches) - 1):
            (loss / optim.grad_accum).backward()
        micro_parts["total_loss"] = loss.detach() + lm_coef * micro_parts.get("lm_loss", 0.0)
        for name, value in micro_parts.items():
            parts[name] = parts.get(name, 0.0) + float(value) / len(micro_batches)
    grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(run.student.parameters(), optim.grad_clip))
    run.stop_if_not_finite(grad_norm, "gradient norm", parts)
    lr = optim.learning_rate(run.step)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.world > 1:  # average the logged figures over the processes
        values = torch.tensor(list(parts.values()), dtype=torch.float64, device=run.device)
        dist.all_reduce(values)
        parts = dict(zip(parts, (values / run.world).tolist()))
    run.step += 1
    return {"lr": lr, "grad_norm": float(grad_norm), **parts}


def pretrain_batches(run: Run) -> list:
    """This step's L_PT text batches, one per micro-batch (None each without L_PT)."""
    config = run.config
    micro = config.optim.batch_size // config.optim.grad_accum
    texts = [run.samplers["lm"].next(micro) if config.lm.lm_coef else None for _ in range(config.optim.grad_accum)]
    return [None if t is None else
            run.to_device(teacher_forced_batch(run.tokenizer, t, None, max_length=config.data.max_length))
            for t in texts]


# ----------------------------------------------------------------------------------------------- its wiring

def held_out_scores(config: TrainConfig, model, tokenizer, data: TrainingData, rank: int, world: int,
                    sample_seed: int | None = None) -> dict:
    """``evaluate`` of a ModelRunner's model on the held-out split, greedy (or sampled with ``sample_seed``), on rank
    0, or under --fsdp on every rank (each generation step is a collective there: every rank generates the same
    answers, with generate's synced_gpus); rank 0's scores, on every rank. Under no_grad from the wrapper's forward
    on, so that DDP expects no backward after it."""
    fsdp = config.run.fsdp
    with torch.no_grad():
        scores = [model(evaluate, tokenizer, data.heldout, max_new_tokens=config.data.max_new_tokens,
                        checkers=data.checkers, sample_seed=sample_seed, progress=rank == 0, synced_gpus=fsdp)
                  if rank == 0 or fsdp else None]
    if world > 1:
        dist.broadcast_object_list(scores)
    return scores[0]


def final_scores(config: TrainConfig, model, teacher, tokenizer, data: TrainingData, rank: int, world: int,
                 greedy: dict | None = None) -> dict:
    """The whole evaluation protocol of ``model`` (a ModelRunner): ``{"greedy": scores (``greedy`` if given),
    "sampled": [the scores of each of the --eval-samples seeds 0, 1, ...], "exposure_bias": ExAccErr or None}``.
    ExAccErr (the tiny default's long tasks) is measured against ``teacher`` (None: the teacher itself, for which it
    is 0 / 0), on rank 0 with the unwrapped models, not under --fsdp."""
    samples = config.run.eval_samples
    scores = {"greedy": greedy or held_out_scores(config, model, tokenizer, data, rank, world),
              "sampled": [held_out_scores(config, model, tokenizer, data, rank, world, seed)
                          for seed in range(samples)], "exposure_bias": [None]}
    if teacher is not None and data.long_prompts and samples and not config.run.fsdp:
        if rank == 0:
            scores["exposure_bias"] = [exposure_bias(mk.sampling.unwrapped(model), teacher.module, tokenizer,
                                                     data.long_prompts, max_new_tokens=config.data.max_new_tokens)]
        if world > 1:
            dist.broadcast_object_list(scores["exposure_bias"])
    return {**scores, "exposure_bias": scores["exposure_bias"][0]}


def evaluate_run(run: Run, data: TrainingData, log: JsonlLog) -> None:
    """Held-out greedy scores of the student at ``run.step``, recorded by every rank."""
    scores = held_out_scores(run.config, run.model, run.tokenizer, data, run.rank, run.world)
    run.history.append({"step": run.step, "heldout": scores})
    log.write({"method": run.method.name, "step": run.step, "eval": scores})


def replica_difference(student: torch.nn.Module) -> float:
    """The largest difference between the processes' copies of ``student``'s full parameters (a per-tensor sum and
    sum of squares, gathered): DDP keeps them equal, and FSDP2 gathers one copy of each shard."""
    fingerprint = torch.stack([torch.stack([full.double().sum(), full.double().square().sum()])
                               for full in map(full_tensor, student.parameters())]).flatten()
    gathered = [torch.empty_like(fingerprint) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, fingerprint)
    return max(float((g - gathered[0]).abs().max()) for g in gathered)


def with_teacher_answers(config: TrainConfig, data: TrainingData, teacher, tokenizer, rank: int,
                         world: int) -> TrainingData:
    """``data`` whose ``pairs`` are the teacher's answers to every pool prompt (``teacher_answers``: sampled at T=1
    with --seed, cached in --cache-dir), with ``answers`` (what they cost to generate). Under DDP rank 0 generates
    them and the others read them from the cache."""
    options = dict(seed=config.run.seed, max_new_tokens=config.data.max_new_tokens,
                   cache_dir=Path(config.data.cache_dir))
    if rank == 0:
        answers, meta = teacher_answers(teacher.module, tokenizer, data.pool, progress=True, **options)
    if world > 1:
        dist.barrier()
    if rank != 0:
        answers, meta = teacher_answers(teacher.module, tokenizer, data.pool, cached_only=True, **options)
    return dataclasses.replace(data, pairs=answers, answers=meta)


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises the process group under torchrun (gloo on CPU, NCCL on GPU)."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local_rank)
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), torch.device("cpu")


def distill(config: TrainConfig, data: TrainingData, planned: list[PlannedRun], summary: str, *,
            read_finished: bool = False) -> None:
    """The teacher's and the start student's scores, then each planned run (``train``; with ``read_finished`` a run
    already finished is read back from its log.jsonl instead), then the results: rank 0 writes results.json and
    the tables (``summary``: their file name) in --out-dir. In the processes of torchrun, if launched by it."""
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    rank, world, device = init_distributed()
    try:
        run_planned(config, data, planned, summary, rank, world, device, read_finished)
        if world > 1:  # every process done (rank 0 writes the results last): gloo aborts one whose peer is still busy
            dist.barrier()
    finally:  # after an error too: the other processes' collectives fail instead of waiting
        if world > 1:
            dist.destroy_process_group()


def run_planned(config: TrainConfig, data: TrainingData, planned: list[PlannedRun], summary: str, rank: int,
                world: int, device: torch.device, read_finished: bool) -> None:
    """What ``distill`` does in each process."""
    started, fsdp, out_dir = time.time(), config.run.fsdp, Path(config.run.out_dir)
    torch.manual_seed(config.run.seed)
    teacher, tokenizer = load_teacher(config.model, device)
    teacher = parallelize(teacher, fsdp=fsdp, trainable=False)
    data = with_chat_template(data, tokenizer) if config.data.chat_template else data
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        print(f"teacher {config.model.teacher}, student {config.model.student}, data {config.data.data}: "
              f"{len(data.pool)} prompts ({len(data.pairs)} with a gold answer), {len(data.heldout)} held-out; "
              f"{world} process(es) on {device}; kernels: {mk.available_backends()}", file=sys.stderr)
    start = parallelize(load_student(config.model, device), fsdp=fsdp, trainable=False)
    results = {"setup": setup(config, device, world, data),
               "teacher": final_scores(config, teacher, None, tokenizer, data, rank, world),
               "student (start)": final_scores(config, start, teacher, tokenizer, data, rank, world),
               "gold answers": score_responses(data.heldout, [e.response for e in data.heldout],
                                               checkers=data.checkers), "runs": []}
    del start
    for name, run_config, run_dir in planned:
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
        record = finished_run(run_dir, run_config.run.method, run_config.optim.steps) if read_finished else None
        if record is None:
            answers = run_config.method.trains_on == methods.TEACHER_ANSWERS
            run_data = with_teacher_answers(run_config, data, teacher, tokenizer, rank, world) if answers else data
            record = train(run_config, run_dir, teacher, tokenizer, run_data, rank, world)
        elif rank == 0:
            print(f"{name}, seed {run_config.run.seed}: finished in {run_dir}, its results read from log.jsonl",
                  file=sys.stderr)
        results["runs"].append({"name": name, "method": run_config.run.method,
                                "teacher_answers": run_config.run.teacher_answers, "seed": run_config.run.seed,
                                **record})
    if rank == 0:
        results["setup"]["seconds"] = time.time() - started
        (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        text = results_markdown(results)
        (out_dir / summary).write_text(text)
        print("\n" + text)


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv, __doc__)
    method = config.method
    data = load_training_data(config.data, seed=config.run.seed,  # read (and checked) before any model loads
                              gold_answers_for=[method.label] if method.trains_on == methods.GOLD_ANSWERS else [])
    distill(config, data, [(method.label, config, Path(config.run.out_dir))], "results.md")


if __name__ == "__main__":
    main()
