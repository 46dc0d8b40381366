"""Distillation of a Hugging Face causal LM: MiniLLM, with the paper's SFT, KD and SeqKD baselines on equal terms, and
on-policy GKD.

    python examples/train.py                                   # tiny default: teacher + SFT student + data, shipped
    python examples/train.py --method kd --divergence jsd      # another method (minillm_kernels/training/methods.py)
    python examples/train.py --method kd --teacher-cache CACHE # kd from an offline top-k cache, no teacher loaded
    python examples/train.py --method opd --teacher-server http://host:8000/v1 --teacher-top-k 20   # a served teacher
    python examples/train.py --teacher smollm2 --student smollm2 --student-layers 6   # SmolLM2-135M-Instruct
    torchrun --nproc_per_node 2 examples/train.py ...          # DDP (gloo on CPU, NCCL on GPU)
    torchrun --nproc_per_node 2 examples/train.py --fsdp ...   # FSDP2: student and teacher sharded
    python examples/compare.py                                 # every method tuned on validation, then 5 seeds

Every method gets the same prompt pool, start, number of optimizer steps of --batch-size sequences, learning rate
and schedule, and the same L_PT (--lm-data: lm_coef x cross-entropy on pre-training text added to every method's
loss; none without it). A step: the method's micro-batches (teacher-forced pairs, or a minibatch of a buffer of the
student's own samples), each one's L_PT and loss and their backward, gradient clipping, AdamW; then the log, the
validation evaluation every --eval-every steps and the checkpoint every --save-every steps. The methods, their losses
and their defaults are in minillm_kernels/training/methods.py; the flags in minillm_kernels/training/config.py
(MiniLLM's are the reference code's, microsoft/LMOps minillm/, with one departure for the tiny default: lr 1e-4).

Evaluation: greedy scores on the validation split (--validation-size gold pairs drawn from the pool, which no method
trains on) every --eval-every steps; the evaluation with the best --select-by score is the chosen checkpoint (its
weights kept in best/), as the MiniLLM paper chooses. Then, and only then, the test split (the held-out prompts):
the whole protocol for the chosen checkpoint and for the last one: greedy, sampled at T = 1 with each of
--eval-samples seeds, and (tiny default) the exposure-bias measure ExAccErr on the long tasks
(minillm_kernels/training/evaluation.py).

Outputs in --out-dir: log.jsonl (one JSON record per step and per eval, flushed as written), checkpoint.pt (written
to a temp file and renamed; loadable with torch.load(weights_only=True)), best/ (the chosen checkpoint's model),
student/ (the last model), results.json (the scores and compute: teacher forward tokens, generated tokens, wall
time) and results.md, the tables. --resume
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
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

import minillm_kernels as mk
from minillm_kernels.distributed import end_process_group, full_state_dict, full_tensor, parallelize
from minillm_kernels.training import methods
from minillm_kernels.training.cache import CacheError, TeacherCache, run_settings
from minillm_kernels.training.checkpoint import JsonlLog, append_record, resume, save, save_model
from minillm_kernels.training.config import TrainConfig, parse_args
from minillm_kernels.training.data import (
    TrainingData, load_training_data, teacher_answers, teacher_forced_batch, with_chat_template,
)
from minillm_kernels.training.evaluation import evaluate, exposure_bias, score_responses
from minillm_kernels.training.models import (
    load_student, load_teacher, load_tokenizer, teacher_directory, weights_sha256,
)
from minillm_kernels.training.report import finished_run, setup, write_results
from minillm_kernels.training.run import Run, new_run
from minillm_kernels.training.selection import improves, selection_score

PlannedRun = tuple[str, TrainConfig, Path]  # (name in the results, its config, its folder)


# ----------------------------------------------------------------------------------------------- the loop

def train(config: TrainConfig, out_dir: Path, teacher, tokenizer, data: TrainingData, rank: int, world: int, *,
          cache: Optional[TeacherCache] = None, device: Optional[torch.device] = None) -> dict:
    """Train a fresh copy of the start student with --method (or resume it), evaluating it on the validation split
    every --eval-every steps and keeping the weights of its best evaluation (``evaluate_run``); the test split is not
    looked at (``test_scores`` does that once the run is done).

    Returns the run's record: ``{"args": the flags, "history": [{"step", "validation"}, ...], "selected": {"step",
    "score"} of the chosen checkpoint (its weights in out_dir/best/; None without a validation split: the last one),
    "compute": {"teacher_forward_tokens", "generated_tokens", "seconds" (training: the steps and their batches, not
    the evaluations), "answers" (what the teacher's answers cost to generate, or None), "teacher_cache" (with
    --teacher-cache: its k, bytes per token and what its build cost; else None)}}``, the counts summed over the
    processes; the last weights are in out_dir/student/. ``teacher`` is None where it is cached (``cache``) or served.
    """
    run = new_run(config, out_dir, teacher, tokenizer, data, rank, world, cache=cache, device=device)
    resume(run)  # with --resume, from its checkpoint
    steps, method = config.optim.steps, run.method
    log = JsonlLog(out_dir / "log.jsonl", run.step if run.resumed else None, enabled=rank == 0)
    if run.step == 0:
        if rank == 0:
            shutil.rmtree(run.out_dir / "best", ignore_errors=True)  # an earlier run's
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
    if data.validation and run.history[-1]["step"] != run.step:  # the last validation eval, unless one just ran
        evaluate_run(run, data, log)
        save(run)
    compute = dict(run.compute)
    if world > 1:
        log.write({"method": method.name, "step": run.step, "replica_max_difference": replica_difference(run.student)})
        counts = torch.tensor([compute["teacher_forward_tokens"], compute["generated_tokens"]], device=run.device)
        dist.all_reduce(counts)
        compute.update(teacher_forward_tokens=int(counts[0]), generated_tokens=int(counts[1]))
    compute["answers"] = data.answers
    compute["teacher_cache"] = None if cache is None else cache.summary()
    state = full_state_dict(run.student)  # (gathered from every process under --fsdp)
    if rank == 0:
        save_model(run.student, state, tokenizer, out_dir / "student")
    if world > 1:  # (every process reads it, and best/, for the test split's scores)
        dist.barrier()
    record = {"args": config.flags(), "history": run.history, "selected": run.best, "compute": compute}
    log.write({"method": method.name, "step": run.step, "trained": record})
    log.close()
    return record


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

def scores_on(examples: list, config: TrainConfig, model, tokenizer, data: TrainingData, rank: int, world: int,
              sample_seed: int | None = None) -> dict:
    """``evaluate`` of a ModelRunner's model on ``examples`` (the validation or the test split), greedy (or sampled
    with ``sample_seed``), on rank 0, or under --fsdp on every rank (each generation step is a collective there: every
    rank generates the same answers, with generate's synced_gpus); rank 0's scores, on every rank. Under no_grad from
    the wrapper's forward on, so that DDP expects no backward after it."""
    fsdp = config.run.fsdp
    with torch.no_grad():
        scores = [model(evaluate, tokenizer, examples, max_new_tokens=config.data.max_new_tokens,
                        checkers=data.checkers, sample_seed=sample_seed, progress=rank == 0, synced_gpus=fsdp)
                  if rank == 0 or fsdp else None]
    if world > 1:
        dist.broadcast_object_list(scores)
    return scores[0]


def final_scores(config: TrainConfig, model, teacher, tokenizer, data: TrainingData, rank: int, world: int) -> dict:
    """The whole evaluation protocol of ``model`` (a ModelRunner) on the test split: ``{"greedy": scores, "sampled":
    [the scores of each of the --eval-samples seeds 0, 1, ...], "exposure_bias": ExAccErr or None}``. ExAccErr (the
    tiny default's long tasks) is measured against ``teacher`` (None: the teacher itself, for which it is 0 / 0), on
    rank 0 with the unwrapped models, not under --fsdp."""
    samples, test = config.run.eval_samples, data.heldout
    scores = {"greedy": scores_on(test, config, model, tokenizer, data, rank, world),
              "sampled": [scores_on(test, config, model, tokenizer, data, rank, world, seed)
                          for seed in range(samples)], "exposure_bias": [None]}
    if teacher is not None and data.long_prompts and samples and not config.run.fsdp:
        if rank == 0:
            scores["exposure_bias"] = [exposure_bias(mk.sampling.unwrapped(model), teacher.module, tokenizer,
                                                     data.long_prompts, max_new_tokens=config.data.max_new_tokens)]
        if world > 1:
            dist.broadcast_object_list(scores["exposure_bias"])
    return {**scores, "exposure_bias": scores["exposure_bias"][0]}


def evaluate_run(run: Run, data: TrainingData, log: JsonlLog) -> None:
    """Greedy validation scores of the student at ``run.step``, recorded by every rank (nothing without a validation
    split). At a step past 0 whose --select-by score improves on the best so far, the student's weights become the
    chosen checkpoint: ``run.best`` and --out-dir/best/ (its weights, gathered under --fsdp)."""
    if not data.validation:
        return
    scores = scores_on(data.validation, run.config, run.model, run.tokenizer, data, run.rank, run.world)
    run.history.append({"step": run.step, "validation": scores})
    log.write({"method": run.method.name, "step": run.step, "validation": scores})
    score = selection_score(scores, run.config.run.select_by)
    if run.step > 0 and improves(score, None if run.best is None else run.best["score"]):
        run.best = {"step": run.step, "score": score}
        state = full_state_dict(run.student)
        if run.rank == 0:
            save_model(run.student, state, run.tokenizer, run.out_dir / "best")


def test_scores(config: TrainConfig, run_dir: Path, record: dict, teacher, tokenizer, data: TrainingData, rank: int,
                world: int, device: torch.device) -> dict:
    """The test split's scores (``final_scores``) of a finished run's chosen checkpoint (``record["selected"]``, its
    weights in run_dir/best/) and of its last one (run_dir/student/): ``{"chosen_step", "chosen", "last"}``, the
    chosen one evaluated once when it is the last (or when the run had no validation split)."""
    def scores_of(folder: Path) -> dict:
        model = load_student(dataclasses.replace(config.model, student=str(folder)), device)
        return final_scores(config, parallelize(model, fsdp=config.run.fsdp, trainable=False), teacher, tokenizer,
                            data, rank, world)

    steps, selected = config.optim.steps, record["selected"]
    chosen_step = steps if selected is None else selected["step"]
    last = scores_of(run_dir / "student")
    return {"chosen_step": chosen_step, "chosen": last if chosen_step == steps else scores_of(run_dir / "best"),
            "last": last}


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


def open_cache(directory: str) -> TeacherCache:
    """The verified teacher cache of --teacher-cache; SystemExit naming what is wrong with it."""
    try:
        return TeacherCache(directory)
    except CacheError as error:
        raise SystemExit(str(error)) from None


def cached_data(config: TrainConfig, data: TrainingData, cache: TeacherCache, tokenizer,
                teacher_sha256: Optional[str]) -> TrainingData:
    """``data`` for a run from ``cache``: checked against the run (its teacher, tokenizer, temperature, length, k),
    its pairs the cache's teacher answers to the pool prompts where it trains on them (and what they cost, from the
    build), else its gold pairs, each of which must be in the cache. SystemExit naming what differs."""
    try:
        cache.check(run_settings(config, tokenizer, teacher_sha256), top_k=config.teacher.teacher_top_k)
        if config.method.trains_on == methods.TEACHER_ANSWERS:
            return dataclasses.replace(data, pairs=cache.answers(data.pool),
                                       answers={**cache.manifest["answers"], "cached": True})
        cache.pairs_for(data.pairs)
        return data
    except CacheError as error:
        raise SystemExit(str(error)) from None


def teacher_form(config: TrainConfig, cache: Optional[TeacherCache]) -> str:
    """The teacher's form in words, for the log line that names the kernels."""
    form = config.teacher
    if cache is not None:
        return (f"not loaded: the offline top-{cache.top_k} cache {form.teacher_cache}, {form.teacher_tail} tail, "
                "fused_sparse_divergence")
    if form.teacher_server:
        return (f"not loaded: served at {form.teacher_server}, its top-{form.teacher_top_k}, {form.teacher_tail} tail, "
                "fused_sparse_divergence")
    if form.teacher_top_k:
        return f"loaded, as its top-{form.teacher_top_k}, {form.teacher_tail} tail, fused_sparse_divergence"
    return "loaded"


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


def distill(config: TrainConfig, data: TrainingData, planned: list[PlannedRun], *, read_finished: bool = False,
            references: bool = True, test: bool = True,
            claim: Optional[Callable[[PlannedRun], bool]] = None) -> Optional[dict]:
    """``run_planned`` in the processes of torchrun, if launched by it (else in this one): rank 0's results."""
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    rank, world, device = init_distributed()
    try:
        results = run_planned(config, data, planned, rank, world, device, read_finished=read_finished,
                              references=references, test=test, claim=claim)
        if world > 1:  # every process done (rank 0 writes the results last): gloo aborts one whose peer is still busy
            dist.barrier()
        return results
    finally:  # after an error too: the other processes' collectives fail instead of waiting
        if world > 1:
            end_process_group()


def run_planned(config: TrainConfig, data: TrainingData, planned: list[PlannedRun], rank: int, world: int,
                device: torch.device, *, read_finished: bool, references: bool, test: bool,
                claim: Optional[Callable[[PlannedRun], bool]] = None) -> Optional[dict]:
    """Each planned run (``train``; with ``read_finished`` a run already finished with the same settings is read
    back from its log.jsonl instead), and with ``test`` its chosen and last checkpoints' test scores
    (``test_scores``, appended to its log, or read back); then with ``references`` the teacher's and the start
    student's test scores. Rank 0 returns the results (what results.json holds; ``report.write_results`` writes
    them), the others None. With ``claim`` (a worker of several processes) only the runs it takes, asked when the
    loop comes to each; the teacher is set up for every planned run."""
    started, fsdp, out_dir = time.time(), config.run.fsdp, Path(config.run.out_dir)
    torch.manual_seed(config.run.seed)
    if config.teacher.loaded or any(run_config.teacher.loaded for _, run_config, _ in planned):
        teacher, tokenizer = load_teacher(config.model, device)
        teacher = parallelize(teacher, fsdp=fsdp, trainable=False)
    else:  # (every run's teacher is cached or served)
        teacher, tokenizer = None, load_tokenizer(config.model)
    caches: dict[str, TeacherCache] = {}  # --teacher-cache -> the cache, opened (and verified) once
    for cached in dict.fromkeys(c.teacher.teacher_cache for c in (config, *(c for _, c, _ in planned))):
        if cached:
            caches[cached] = open_cache(cached)
    data = with_chat_template(data, tokenizer) if config.data.chat_template else data
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        form = teacher_form(config, caches.get(config.teacher.teacher_cache))
        print(f"teacher {config.model.teacher} ({form}), student {config.model.student}, data "
              f"{config.data.data}: {len(data.pool)} prompts ({len(data.pairs)} with a gold answer), "
              f"{len(data.validation)} validation, {len(data.heldout)} test; {world} process(es) on {device}; "
              f"kernels: {mk.available_backends()}", file=sys.stderr)
    directory = teacher_directory(config.model) if caches else None
    teacher_sha256 = weights_sha256(directory) if directory is not None else None
    results = {"setup": setup(config, device, world, data), "runs": []}
    for name, run_config, run_dir in planned:
        if claim is not None and not claim((name, run_config, run_dir)):
            continue
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
        record = finished_run(run_dir, run_config) if read_finished else None
        cache = caches.get(run_config.teacher.teacher_cache)
        if record is None and rank == 0 and run_config.teacher != config.teacher:
            print(f"{name}: teacher {config.model.teacher} ({teacher_form(run_config, cache)})", file=sys.stderr)
        if record is None:
            answers = run_config.method.trains_on == methods.TEACHER_ANSWERS
            if cache is not None:
                run_data = cached_data(run_config, data, cache, tokenizer, teacher_sha256)
            else:
                run_data = with_teacher_answers(run_config, data, teacher, tokenizer, rank, world) if answers else data
            record = {**train(run_config, run_dir, teacher, tokenizer, run_data, rank, world, cache=cache,
                              device=device), "test": None}
        elif rank == 0:
            print(f"{name}, seed {run_config.run.seed}: finished in {run_dir}, read from log.jsonl", file=sys.stderr)
        if test and record["test"] is None:
            record["test"] = test_scores(run_config, run_dir, record, teacher, tokenizer, data, rank, world, device)
            if rank == 0:
                append_record(run_dir / "log.jsonl", {"method": run_config.run.method, "step": run_config.optim.steps,
                                                      "test": record["test"]})
        results["runs"].append({"name": name, "method": run_config.run.method,
                                "teacher_answers": run_config.run.teacher_answers, "seed": run_config.run.seed,
                                **record})
    if references:  # after every run: the test split is looked at once the runs are done
        start = parallelize(load_student(config.model, device), fsdp=fsdp, trainable=False)
        results.update({"teacher": None if teacher is None else
                        final_scores(config, teacher, None, tokenizer, data, rank, world),
                        "student (start)": final_scores(config, start, teacher, tokenizer, data, rank, world),
                        "gold answers": score_responses(data.heldout, [e.response for e in data.heldout],
                                                        checkers=data.checkers)})
        del start
    if rank != 0:
        return None
    results["setup"]["seconds"] = time.time() - started
    return results


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv, __doc__)
    method = config.method
    data = load_training_data(config.data, seed=config.run.seed,  # read (and checked) before any model loads
                              gold_answers_for=[method.label] if method.trains_on == methods.GOLD_ANSWERS else [])
    results = distill(config, data, [(method.label, config, Path(config.run.out_dir))])
    if results is not None:
        write_results(Path(config.run.out_dir), results, "results.md")


if __name__ == "__main__":
    main()
