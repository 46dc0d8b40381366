"""Checkpoints, resume and the log: what a run needs to stop at any point and go on as if uninterrupted.

Every file is written to a temporary name and renamed (a crash never leaves half a file); a failed write (a full
disk) removes the partial file and says where it was going. ``checkpoint.pt`` holds plain types only (tensors,
numbers, strings, lists, dicts: ``torch.load(weights_only=True)`` reads it); under --fsdp ``checkpoint/<k>/`` holds
the weights and optimizer as ``torch.distributed.checkpoint`` shards and each process's part as ``rank-<r>.pt``.
``resume`` refuses a checkpoint of another method or one past --steps, and lists the arguments that changed.
``JsonlLog`` is log.jsonl: one record per line, flushed as written, cut back to the checkpoint's step on resume.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from minillm_kernels.distributed import load_sharded, save_sharded
from minillm_kernels.training.rollout import Rollout
from minillm_kernels.training.run import Run

# arguments that do not change what is trained: a resumed run may change them without a warning
NOT_HYPERPARAMETERS = frozenset({"out_dir", "resume", "steps", "threads", "eval_every", "save_every", "method",
                                 "eval_samples", "cache_dir"})


def checkpoint_state(run: Run) -> dict:
    """What --resume needs, in types that ``torch.load(weights_only=True)`` reads (tensors, numbers, strings,
    lists, tuples and dicts). Under --fsdp this process's part, without the weights and optimizer (saved sharded)."""
    fsdp = run.config.run.fsdp
    weights = {} if fsdp else {"student": run.student.state_dict(), "optimizer": run.optimizer.state_dict()}
    return {
        "method": run.method.name, "step": run.step, "args": run.config.flags(), "history": run.history,
        "best": run.best, "compute": run.compute, **weights,
        "rollout": None if run.rollout is None else run.rollout.state(),
        "data_rng": {name: sampler.rng.getstate() for name, sampler in run.samplers.items()},
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(run.device) if run.device.type == "cuda" else None,
    }


def write_failure(path: Path, error: Exception) -> OSError:
    """An OSError naming the file that could not be written and the free space where it goes."""
    free = shutil.disk_usage(path.parent).free / 2**20
    return OSError(f"could not write {path} ({type(error).__name__}: {error}); the partial file was removed. "
                   f"{free:.1f} MiB are free on the file system of {path.parent}: if it is full, free some space "
                   "or pass another --out-dir")


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to ``path.tmp``, then an atomic rename: a crash never leaves a half-written checkpoint, and a
    failed write (a full disk) removes the partial file and says where it was going."""
    temporary = path.with_suffix(".tmp")
    try:
        torch.save(state, temporary)
    except (OSError, RuntimeError) as error:  # a full disk: OSError, or torch's RuntimeError from its C++ writer
        failure = write_failure(temporary, error)  # the free space with the partial file still there
        temporary.unlink(missing_ok=True)
        raise failure from error
    os.replace(temporary, path)


def save_sharded_checkpoint(run: Run, state: dict) -> None:
    """--fsdp: save number k into checkpoint/<k>/ (6 digits): the weights and optimizer by
    torch.distributed.checkpoint (each process its shards) and each process's ``state`` (its rollout and RNG) as
    rank-<r>.pt. Written as <k>.tmp/ and renamed by rank 0 once every process is done, then the older saves are
    removed: a crash at any point leaves the newest complete save in place (and --resume reads it)."""
    latest = run.checkpoint
    folder = run.checkpoint_path / f"{int(latest.name) + 1 if latest else 1:06d}"
    temporary = folder.with_name(folder.name + ".tmp")
    try:
        save_sharded(temporary, run.student, run.optimizer)
        save_checkpoint(temporary / f"rank-{run.rank}.pt", state)
    except (OSError, RuntimeError) as error:  # a full disk
        failure = write_failure(temporary, error)
        shutil.rmtree(temporary, ignore_errors=True)
        raise failure from error
    dist.barrier()
    if run.rank == 0:
        os.replace(temporary, folder)
        for old in run.checkpoint_path.iterdir():
            if old != folder:
                shutil.rmtree(old)


def save(run: Run) -> None:
    """The checkpoint of ``run``: rank 0 writes checkpoint.pt, or under --fsdp every process its part of the sharded
    checkpoint; every rank waits."""
    if run.config.run.fsdp:
        save_sharded_checkpoint(run, checkpoint_state(run))
    elif run.rank == 0:
        save_checkpoint(run.checkpoint_path, checkpoint_state(run))
    if run.world > 1:
        dist.barrier()


def save_model(model, state: dict, tokenizer, directory: Path) -> None:
    """``save_pretrained`` of the model (its whole ``state`` dict) and tokenizer into a temp directory, then renamed
    to ``directory``."""
    temporary = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        model.save_pretrained(temporary, state_dict=state)
        tokenizer.save_pretrained(temporary)
    except (OSError, RuntimeError) as error:
        failure = write_failure(temporary, error)
        shutil.rmtree(temporary, ignore_errors=True)
        raise failure from error
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(temporary, directory)


def load_checkpoint(path: Path, device: torch.device) -> dict:
    """The checkpoint at ``path`` (``weights_only=True``); SystemExit naming the file if it cannot be read."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # torch.load fails in many ways (OSError, RuntimeError, UnpicklingError, EOFError...)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else "no message"
        empty = " It is empty (0 bytes)." if path.is_file() and path.stat().st_size == 0 else ""
        raise SystemExit(
            f"--resume: cannot read the checkpoint {path} ({type(error).__name__}: {reason}).{empty} "
            "It is truncated or corrupt, or not a checkpoint of this trainer: delete it to start from step 0, "
            "or put a good copy in its place") from error
    if not isinstance(state, dict) or "args" not in state:
        raise SystemExit(f"--resume: {path} is not a checkpoint of this version of the trainer: delete it to start "
                         "from step 0, or resume it with the version that wrote it")
    return state


def resume_file(checkpoint: Path, rank: int, world: int) -> Path:
    """The file of the checkpoint this process reads: ``checkpoint`` (checkpoint.pt), or in a sharded save its
    rank-<r>.pt; SystemExit if another number of processes wrote the sharded save."""
    if checkpoint.is_file():
        return checkpoint
    written = len(list(checkpoint.glob("rank-*.pt")))
    if written != world:
        raise SystemExit(f"--resume: {checkpoint} was written by {written} processes, this run has {world}: "
                         f"resume with torchrun --nproc_per_node {written}")
    return checkpoint / f"rank-{rank}.pt"


def resume(run: Run) -> None:
    """With --resume, ``run`` restored from its checkpoint (``restore``); SystemExit if its folder holds the other
    kind (checkpoint.pt without --fsdp, checkpoint/ with it), a warning if it holds none. Without --resume, a warning
    if this fresh run overwrites a checkpoint."""
    fsdp, out_dir = run.config.run.fsdp, run.checkpoint_path.parent
    other = out_dir / ("checkpoint.pt" if fsdp else "checkpoint")
    if not run.config.run.resume:
        if run.checkpoint is not None and run.rank == 0:
            warnings.warn(f"{run.checkpoint_path} exists: this fresh run overwrites it and starts a new log.jsonl "
                          "(pass --resume to continue it)")
    elif run.checkpoint is not None:
        restore(run, load_checkpoint(resume_file(run.checkpoint, run.rank, run.world), run.device))
    elif other.exists():
        flag = "without" if fsdp else "with"
        raise SystemExit(f"--resume: {out_dir} holds {other.name}, the checkpoint of a run {flag} --fsdp: resume it "
                         f"{flag} --fsdp, or start this run in another --out-dir")
    elif run.rank == 0:
        warnings.warn(f"--resume: no checkpoint at {run.checkpoint_path}; starting {run.method.name} from step 0")


def restore(run: Run, state: dict) -> None:
    """Restore ``state`` into ``run`` (under --fsdp, the weights and optimizer from the sharded save). SystemExit for
    another method, or a checkpoint past --steps; a warning lists the arguments that changed (they apply from here
    on: the learning rate, betas and weight decay are set on the restored optimizer)."""
    path, config, method = run.checkpoint, run.config, run.method.name
    if state["method"] != method:
        raise SystemExit(f"--resume: {path} is a {state['method']} run; --method {method} cannot continue it. "
                         f"Resume with --method {state['method']}, or start {method} in another --out-dir")
    if state["step"] > config.optim.steps:
        raise SystemExit(f"--resume: {path} is at step {state['step']}, past --steps {config.optim.steps}: resume "
                         f"with --steps >= {state['step']}, or start fresh in another --out-dir")
    changed = [f"--{name.replace('_', '-')} {state['args'].get(name)} -> {value}"
               for name, value in config.flags().items()
               if name not in NOT_HYPERPARAMETERS and state["args"].get(name) != value]
    if changed and run.rank == 0:
        warnings.warn(f"--resume: arguments changed since {path} was written; from step {state['step']} on: "
                      + ", ".join(changed))
    if config.run.fsdp:
        load_sharded(path, run.student, run.optimizer)
    else:
        run.student.load_state_dict(state["student"])
        run.optimizer.load_state_dict(state["optimizer"])
    for group in run.optimizer.param_groups:  # what the optimizer restored gives way to the arguments
        group.update(betas=config.optim.betas, weight_decay=config.optim.weight_decay)
    for name, sampler in run.samplers.items():
        sampler.rng.setstate(state["data_rng"][name])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and run.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], run.device)
    run.step, run.history, run.best, run.compute = state["step"], state["history"], state["best"], state["compute"]
    run.resumed = True
    if state["rollout"] is not None:
        run.rollout = Rollout.from_state(state["rollout"], run.teacher, run.scorer,
                                         fused_linear=config.run.fused_linear,
                                         distribution=run.method.reads_teacher_distribution)
    run.say(f"resumed {method} at step {run.step} from {path}"
            + (f": the run is finished (--steps {config.optim.steps}); raise --steps to train further"
               if run.step == config.optim.steps else ""))


class JsonlLog:
    """log.jsonl: one JSON record per line, each flushed as it is written (a kill loses no record written).

    Opening it keeps, for a resumed run (``through_step``: its checkpoint's step), the records up to that step
    and drops those written after the checkpoint (atomic rewrite), so that the resumed run logs each step once;
    a fresh run (``through_step=None``) starts it empty. Only rank 0 writes (``enabled``)."""

    def __init__(self, path: Path, through_step: int | None, enabled: bool) -> None:
        self.path, self.file = path, None
        if not enabled:
            return
        kept = records_through(path, through_step) if through_step is not None and path.exists() else []
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(temporary, path)
        self.file = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def records_through(path: Path, step: int) -> list[str]:
    """The lines of the log at ``path`` whose record's step is at most ``step`` (a line cut short is dropped)."""
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError):  # json.JSONDecodeError: the last line, cut short by a kill
            if json.loads(line)["step"] <= step:
                kept.append(line)
    return kept


def append_record(path: Path, record: dict) -> None:
    """One more record at the end of the log at ``path`` (a finished run's test scores)."""
    with open(path, "a", encoding="utf-8") as file:
        file.write(json.dumps(record) + "\n")


def read_records(path: Path) -> list[dict]:
    """Every record of the log at ``path`` (none if there is no file)."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
