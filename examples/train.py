"""MiniLLM distillation of a Hugging Face causal LM, with the paper's SFT, KD and SeqKD baselines on equal terms.

    python examples/train.py                                   # tiny default: teacher + SFT student + data, shipped
    python examples/train.py --compare                         # every method x 3 seeds on the same budget, one table
    python examples/train.py --teacher smollm2 --student smollm2 --student-layers 6   # SmolLM2-135M-Instruct
    torchrun --nproc_per_node 2 examples/train.py ...          # DDP (gloo on CPU, NCCL on GPU)
    torchrun --nproc_per_node 2 examples/train.py --fsdp ...   # FSDP2: student and teacher sharded

Methods (the same prompt pool, start, number of optimizer steps of --batch-size sequences, learning rate and
schedule, and the same L_PT for every one):
    sft      cross-entropy on the pool's gold responses
    kd       token-level forward KL(p || q) to the teacher (fused_divergence; --divergence another of the family:
             jsd, skew_forward_kl, ...), teacher-forced on the gold responses (--teacher-answers: on the teacher's
             answers, as seqkd's)
    seqkd    cross-entropy on the teacher's answers: one per pool prompt, sampled at T = 1 (top-k 0, top-p 1),
             generated once and cached on disk (--cache-dir), keyed by the teacher's weights, the prompts, the
             seed and the generation settings (a changed teacher never reuses a stale cache)
    minillm  on the pool's prompts: responses sampled from p~ = alpha p + (1 - alpha) q (sample_teacher_mixed),
             rewards r_t = log p(y_t) - log q(y_t), then --ppo-epochs optimizer steps of
             L = L_pg + L_single (minillm_loss, per-token terms from fused_token_stats)
    gkd      on-policy GKD (lambda = 1): a fresh batch of the student's own samples (T = --temperature) every step,
             then D(p, q) of --divergence (default JSD(beta = 0.5)) teacher-forced on them (response_divergence);
             not in --compare
A method that needs gold answers trains on the pool's prompts that have one (every prompt of the tiny default).
L_PT (--lm-data, pre-training text): lm_coef x cross-entropy added to every method's loss (none without --lm-data).

MiniLLM defaults are the reference code's (microsoft/LMOps minillm/, see minillm_kernels/objective.py):
alpha 0.2, PPO clip 0.2, gamma 0.95, rewards / 0.5 clipped to +-100, whitened advantages, 4 PPO epochs,
lr 5e-6 constant after 100 linear warm-up steps, AdamW betas (0.9, 0.95), weight decay 1e-6, grad clip 1.0,
top-k 0, top-p 1, T 1, and the student in eval() mode (no dropout) for the rollouts and for the PPO and L_PT
passes, so that the first PPO epoch's ratio q / q_old is exactly 1 (--dropout turns dropout on in those passes;
sft, kd and seqkd train with the model's dropout, as fine-tuning does). Where the paper and the reference code
differ, the default and the other's flag:
    advantage whitening   over the valid tokens (ours)          --whiten-over padded: the whole padded tensor,
                                                                 unbiased variance (reference)
    single-step term      w-weighted mean (paper)               --single-step unweighted (reference)
    L_PT                  cross-entropy (paper)                 --lm-kd-ratio 0.5: 0.5 CE + 0.5 teacher soft-CE
                                                                 (reference's --kd-ratio)
One departure, for the tiny default only: lr 1e-4 (5e-6 is tuned for 0.1-13B models and moves a 0.44M-parameter
student by nothing in a few hundred steps); every method of --compare uses it.

Evaluation: held-out greedy scores every --eval-every steps; at the end the whole protocol: greedy, sampled at T = 1
with each of --eval-samples seeds, and (tiny default) the exposure-bias measure ExAccErr on the long tasks. Gold tasks
are scored by Rouge-L, exact match and calibration (ECE), open tasks (many right answers) by their validity rule
and distinct-n (minillm_kernels/training/evaluation.py).

Outputs in --out-dir (per method and seed with --compare: <method>/seed-<s>/): log.jsonl (one JSON record per step and
per eval, flushed as written), checkpoint.pt (written to a temp file and renamed; loadable with
torch.load(weights_only=True)), student/ (the final model); in --out-dir itself results.json (every run's scores and
compute: teacher forward tokens, generated tokens, wall time) and results.md (compare.md), the tables. --resume
continues from checkpoint.pt: weights, optimizer, data order, RNG, step and the current rollout; it refuses another
--method, lists the arguments that changed (they apply from the checkpoint's step on), and drops the log records
past the checkpoint's step, so that every step appears in log.jsonl once. A fresh run (no --resume) starts a new
log.jsonl.

Under torchrun every use of a model goes through one wrapper's forward (``minillm_kernels.distributed``): with DDP
the student's ModelRunner is wrapped by DDP (the fused-linear terms included, so their gradients are all-reduced);
with --fsdp the student and the frozen teacher are sharded by FSDP2 (per decoder layer, the rest in the root), every
process samples, evaluates and checkpoints in step with the others, and checkpoint/ (a sharded
torch.distributed.checkpoint of the weights and optimizer, and each process's rollout and RNG) replaces checkpoint.pt.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

import minillm_kernels as mk
from minillm_kernels.training.data import (
    IGNORE_INDEX, Example, causal_lm_logits, load_jsonl, load_texts, prompt_batch, teacher_answers,
    teacher_forced_batch,
)
from minillm_kernels.distributed import (
    full_state_dict, full_tensor, load_sharded, local_tensor, parallelize, save_sharded,
)
from minillm_kernels.training.evaluation import eval_mode, evaluate, exposure_bias, markdown_table, score_responses

METHODS = ("sft", "kd", "seqkd", "minillm", "gkd")
ROLLOUT_METHODS = ("minillm", "gkd")  # trained on their own samples
DEFAULT_DIVERGENCE = {"kd": "forward_kl", "gkd": "jsd"}  # --divergence unset
# --compare: (name, --method, --teacher-answers), every one for each of --seeds
COMPARED = (("sft", "sft", False), ("kd", "kd", False), ("seqkd", "seqkd", True),
            ("kd (teacher answers)", "kd", True), ("minillm", "minillm", False))
TINY_LR = 1e-4  # the one departure from the reference defaults (see the docstring)
NAMED_MODELS = ("tiny", "smollm2")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # what from_pretrained may fetch from the Hub
# arguments that do not change what is trained: a resumed run may change them without a warning
NOT_HYPERPARAMETERS = frozenset({"out_dir", "resume", "steps", "threads", "eval_every", "save_every", "compare",
                                 "method", "seeds", "eval_samples", "cache_dir"})
SHARDED_CHECKPOINT = re.compile(r"\d{6}")  # checkpoint/<save number>/ under --fsdp (see save_sharded_checkpoint)
# on the progress bar
LOSS_SHOWN = {"sft": "sft_loss", "seqkd": "sft_loss", "kd": "kd_loss", "minillm": "reward", "gkd": "gkd_loss"}


def default_cache_dir() -> Path:
    """``$MINILLM_CACHE/teacher-answers`` or ``~/.cache/minillm_kernels/teacher-answers``."""
    return Path(os.environ.get("MINILLM_CACHE") or Path.home() / ".cache" / "minillm_kernels") / "teacher-answers"


# ----------------------------------------------------------------------------------------------- set-up

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="tiny",
                   help="'tiny', 'smollm2', a saved model directory or a Hugging Face Hub id")
    p.add_argument("--student", default="tiny", help="'tiny' (the shipped SFT student), 'smollm2' (the teacher cut "
                                                     "to --student-layers), a saved model directory or a Hub id")
    p.add_argument("--student-layers", type=int, default=6, help="smollm2 student: layers kept (evenly spaced)")
    p.add_argument("--method", choices=METHODS, default="minillm")
    p.add_argument("--teacher-answers", action="store_true",
                   help="kd: teacher-forced on the teacher's cached T=1 answers (seqkd's targets) instead of the gold")
    p.add_argument("--compare", action="store_true",
                   help="run every method (sft, kd, seqkd, kd --teacher-answers, minillm) for each of --seeds")
    p.add_argument("--seeds", type=int, nargs="+", default=(0, 1, 2), help="--compare: the training seeds")
    p.add_argument("--data", default="tiny",
                   help="'tiny' or a JSONL of {prompt, response?, task?}; a row without response is a prompt only")
    p.add_argument("--eval-data", default=None, help="JSONL of held-out {prompt, response, task?} (tiny: its split); "
                                                     "a row without a response is an error naming its line")
    p.add_argument("--eval-size", type=int, default=None, help="evaluate on the first N held-out examples only")
    p.add_argument("--pool-size", type=int, default=None, help="train on the first N prompts of the pool only")
    p.add_argument("--eval-samples", type=int, default=3,
                   help="the final evaluation samples at T=1 with this many seeds (0, 1, ...) besides greedy")
    p.add_argument("--chat-template", action="store_true",
                   help="wrap every prompt in the tokenizer's chat template (always on for --teacher smollm2)")
    p.add_argument("--lm-data", default=None, help="JSONL of {text} pre-training text for L_PT, in every method")
    p.add_argument("--out-dir", default="out/train")
    p.add_argument("--cache-dir", default=None, help="the teacher's cached answers (default: $MINILLM_CACHE/"
                                                     "teacher-answers or ~/.cache/minillm_kernels/teacher-answers)")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per optimizer step (per process)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=None, help="default: 5e-6 (reference); 1e-4 for the tiny student")
    p.add_argument("--warmup-steps", type=int, default=100,
                   help="linear warm-up, then constant (reference MiniLLM scripts: --warmup-iters 100)")
    p.add_argument("--weight-decay", type=float, default=1e-6)
    p.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.95))
    p.add_argument("--grad-clip", type=float, default=1.0)
    # MiniLLM (reference-code defaults; their sources are in minillm_kernels/objective.py)
    p.add_argument("--divergence", choices=mk.reference.DIVERGENCES, default=None,
                   help="kd's and gkd's per-token D(p, q) (fused_divergence; default: forward_kl for kd, jsd for gkd)")
    p.add_argument("--beta", type=float, default=0.5, help="--divergence jsd: beta (0.5: the symmetric JSD)")
    p.add_argument("--skew", type=float, default=0.1, help="--divergence skew_forward_kl / skew_reverse_kl: alpha")
    p.add_argument("--alpha", type=float, default=0.2, help="teacher share of the sampling mixture")
    p.add_argument("--ppo-epochs", type=int, default=4, help="optimizer steps per rollout batch")
    p.add_argument("--ppo-clip", type=float, default=mk.objective.PPO_CLIP)
    p.add_argument("--gamma", type=float, default=mk.objective.GAMMA)
    p.add_argument("--reward-scaling", type=float, default=mk.objective.REWARD_SCALING)
    p.add_argument("--reward-clip", type=float, default=mk.objective.REWARD_CLIP)
    p.add_argument("--no-whiten", action="store_true", help="do not whiten the advantages")
    p.add_argument("--whiten-over", choices=mk.objective.WHITEN_OVER, default="valid",
                   help="whitening statistics over the valid tokens (ours), or over the whole padded [B, T] tensor "
                        "with the unbiased variance (the reference code's)")
    p.add_argument("--single-step", choices=("weighted", "unweighted"), default="weighted",
                   help="L_single: mean of w_t KL_t (the paper's) or of KL_t (the reference code's)")
    p.add_argument("--single-step-coef", type=float, default=mk.objective.SINGLE_STEP_COEF)
    p.add_argument("--lm-coef", type=float, default=None, help="weight of L_PT (default: 1, the reference's, with "
                                                               "--lm-data; 0 without)")
    p.add_argument("--lm-kd-ratio", type=float, default=0.0,
                   help="L_PT = (1 - r) CE + r teacher soft-CE -sum_v p_v log q_v (paper: 0; reference code: 0.5)")
    p.add_argument("--dropout", action="store_true",
                   help="minillm: the student's dropout on in the PPO and L_PT passes (reference: off, eval() mode; "
                        "rollouts are always sampled in eval() mode)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="rollout, teacher-answer and eval length (tiny: 40; else 128)")
    p.add_argument("--max-length", type=int, default=512, help="teacher-forced sequences are cut to this")
    p.add_argument("--fused-linear", action="store_true",
                   help="minillm: per-token terms from the models' last hidden states and output layers "
                        "(fused_linear_token_stats), so the rollout's [tokens x V] logits are never built")
    # practicalities
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (GPU; slow on most CPUs)")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the student (per decoder layer and as a whole) and the frozen teacher "
                        "with FSDP2 instead of DDP; on GPU bf16 compute, fp32 weights and gradient reduction; "
                        "sharded checkpoints (checkpoint/ instead of checkpoint.pt)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=100, help="held-out eval every N steps (0: before/after only)")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (and at the end)")
    p.add_argument("--resume", action="store_true",
                   help="continue from --out-dir's checkpoint.pt (checkpoint/ with --fsdp; none there: a warning, "
                        "then a fresh start); with --compare, runs already finished are read back from their log.jsonl")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.fsdp and "RANK" not in os.environ:
        p.error("--fsdp shards the models over the processes of torchrun: run "
                "`torchrun --nproc_per_node N examples/train.py --fsdp ...` (or drop --fsdp for one process)")
    if args.fsdp and (args.compare or args.method == "seqkd" or args.teacher_answers):
        p.error("the teacher's answers (seqkd, --teacher-answers, --compare) are generated by one process with the "
                "whole teacher: drop --fsdp (DDP or one process)")
    if args.teacher_answers and args.method != "kd":
        p.error(f"--teacher-answers is kd's (seqkd always trains on the teacher's answers), not --method {args.method}")
    if args.divergence is not None and args.method not in DEFAULT_DIVERGENCE:
        p.error(f"--divergence is kd's and gkd's, not --method {args.method}")
    if args.grad_accum < 1 or args.batch_size % args.grad_accum:
        p.error(f"--batch-size ({args.batch_size}) must be a multiple of --grad-accum ({args.grad_accum})")
    if args.student == "smollm2" and args.teacher != "smollm2":
        p.error("--student smollm2 is the smollm2 teacher cut to fewer layers: use --teacher smollm2")
    for flag in ("teacher", "student"):
        value = getattr(args, flag)
        if value not in NAMED_MODELS and not Path(value).exists() and not HUB_ID.fullmatch(value):
            p.error(f"--{flag} {value}: no such directory (give a saved model directory, a Hugging Face Hub id "
                    f"such as 'namespace/name', or one of {NAMED_MODELS})")
    for flag, value in (("data", None if args.data == "tiny" else args.data), ("eval-data", args.eval_data),
                        ("lm-data", args.lm_data)):
        if value is not None and not Path(value).is_file():
            p.error(f"--{flag} {value}: no such file")
    if args.lm_coef is None:
        args.lm_coef = mk.objective.LM_COEF if args.lm_data else 0.0
    elif args.lm_coef != 0 and not args.lm_data:
        p.error(f"--lm-coef {args.lm_coef}: L_PT needs pre-training text, --lm-data")
    args.lr = args.lr if args.lr is not None else (TINY_LR if args.student == "tiny" else 5e-6)
    args.chat_template = args.chat_template or args.teacher == "smollm2"
    args.cache_dir = args.cache_dir or str(default_cache_dir())
    if args.max_new_tokens is None:
        from minillm_kernels.training.tiny import MAX_NEW_TOKENS

        args.max_new_tokens = MAX_NEW_TOKENS if args.data == "tiny" else 128
    return args


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


def load_teacher(args, device):
    """(teacher, tokenizer): the frozen teacher in eval mode and the tokenizer both models share."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.teacher == "smollm2":
        from minillm_kernels.training.smollm2 import load_smollm2

        teacher, tokenizer = load_smollm2()
    else:
        if args.teacher == "tiny":
            from minillm_kernels.training.tiny import checkpoint_dir

            path = checkpoint_dir("teacher")
        else:
            path = args.teacher
        teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return teacher.to(device).eval().requires_grad_(False), tokenizer


def load_student(args, device):
    """A fresh float32 copy of the start student, in train mode."""
    from transformers import AutoModelForCausalLM

    if args.student == "smollm2":
        from minillm_kernels.training.smollm2 import cut_layers, load_smollm2

        student = cut_layers(load_smollm2()[0], args.student_layers)  # from a fresh copy: the teacher may be sharded
    elif args.student == "tiny":
        from minillm_kernels.training.tiny import checkpoint_dir

        student = AutoModelForCausalLM.from_pretrained(checkpoint_dir("student-sft"), dtype=torch.float32)
    else:
        student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)
    return student.to(device).train().requires_grad_(True)


def load_data(args, tokenizer) -> dict:
    """The training prompt ``pool`` (examples; the tiny default's all have a gold answer, a user's rows may lack one),
    ``pairs`` (its gold pairs: what sft and kd train on), ``prompts`` (every pool prompt: minillm's and the teacher's
    answers'), ``heldout``, ``lm`` (L_PT text), ``checkers`` (the open tasks' validity rules: tiny only) and
    ``long_prompts`` (the held-out prompts of the long tasks, where ExAccErr is measured: tiny only)."""
    heldout = load_jsonl(args.eval_data, require_response=True) if args.eval_data else None
    checkers, long_tasks = {}, ()
    if args.data == "tiny":
        from minillm_kernels.training.tiny import LONG_TASKS, tiny_checkers, tiny_splits

        splits = tiny_splits()
        pool, heldout = splits["prompts"], heldout or splits["heldout"]
        checkers, long_tasks = tiny_checkers(), LONG_TASKS
    else:
        pool = load_jsonl(args.data)
        if heldout is None:  # hold out 5% of the gold pairs (at least one), drawn with the seed
            labelled = [e for e in pool if e.response]
            heldout = random.Random(args.seed).sample(labelled, len(labelled))[: max(1, len(labelled) // 20)]
            pool = [e for e in pool if e not in set(heldout)]
    pool, heldout = pool[: args.pool_size], heldout[: args.eval_size]
    if not any(e.response for e in pool):
        raise SystemExit(f"{args.data}: no example has a response; sft and kd, and the held-out split, need gold pairs")
    if args.chat_template:  # an instruct model's prompts go through its chat template
        def chat(example: Example) -> Example:
            message = [{"role": "user", "content": example.prompt}]
            return example._replace(prompt=tokenizer.apply_chat_template(message, tokenize=False,
                                                                          add_generation_prompt=True))

        pool, heldout = ([chat(e) for e in split] for split in (pool, heldout))
    return {"pool": pool, "pairs": [e for e in pool if e.response], "prompts": [e.prompt for e in pool],
            "heldout": heldout, "lm": load_texts(args.lm_data) if args.lm_data else [], "checkers": checkers,
            "long_prompts": [e.prompt for e in heldout if e.task in long_tasks]}


def with_teacher_answers(args, data: dict, teacher, tokenizer, rank: int, world: int) -> dict:
    """``data`` whose ``pairs`` are the teacher's answers to every pool prompt (``teacher_answers``: sampled at T=1
    with --seed, cached in --cache-dir), with ``answers`` (what they cost to generate). Under DDP rank 0 generates
    them and the others read them from the cache."""
    options = dict(seed=args.seed, max_new_tokens=args.max_new_tokens, cache_dir=Path(args.cache_dir))
    if rank == 0:
        answers, meta = teacher_answers(teacher.module, tokenizer, data["pool"], progress=True, **options)
    if world > 1:
        dist.barrier()
    if rank != 0:
        answers, meta = teacher_answers(teacher.module, tokenizer, data["pool"], cached_only=True, **options)
    return {**data, "pairs": answers, "answers": meta}


class Sampler:
    """Seeded draws of global batches; each process keeps its rank's slice (prompts sharded by rank)."""

    def __init__(self, items: list, seed: int, rank: int, world: int) -> None:
        self.items, self.rank, self.world = items, rank, world
        self.rng = random.Random(seed)

    def next(self, per_rank: int) -> list:
        drawn = [self.items[self.rng.randrange(len(self.items))] for _ in range(per_rank * self.world)]
        return drawn[self.rank * per_rank : (self.rank + 1) * per_rank]


# ----------------------------------------------------------------------------------------------- losses

def token_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` log q(label) per position (0 where the label is IGNORE_INDEX)."""
    return -F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none",
                            ignore_index=IGNORE_INDEX).view(labels.shape)


def sft_loss(run: Run, batch) -> tuple[torch.Tensor, dict]:
    """Cross-entropy on the response tokens (sft: the gold ones; seqkd: the teacher's answers)."""
    logits = causal_lm_logits(run.model, batch.input_ids, batch.attention_mask)
    mask = batch.labels != IGNORE_INDEX
    loss = mk.language_modeling_loss(token_logprob(logits, batch.labels), mask)
    return loss, {"sft_loss": loss.detach()}


def teacher_logits(run: Run, batch) -> torch.Tensor:
    """The frozen teacher's logits on a teacher-forced batch (counted in ``run.compute``)."""
    with torch.no_grad():
        logits = causal_lm_logits(run.teacher, batch.input_ids, batch.attention_mask)
    run.compute["teacher_forward_tokens"] += int(batch.attention_mask.sum())
    return logits[..., : run.vocab_size]


def divergence_options(args, method: str, vocab_size: int) -> dict:
    """--divergence (unset: ``method``'s default) and its parameters, as ``fused_divergence`` takes them."""
    return {"divergence": args.divergence or DEFAULT_DIVERGENCE[method], "beta": args.beta, "skew": args.skew, "temperature": args.temperature,
            "vocab_size": vocab_size}


def kd_loss(args, run: Run, batch) -> tuple[torch.Tensor, dict]:
    """Token-level D(p, q) of --divergence, teacher-forced, mean over the response tokens (``fused_divergence``: by
    default the forward KL(p || q) = sum_v p_v (log p_v - log q_v)). The reverse KL of the same positions is logged
    for comparison."""
    logits = causal_lm_logits(run.model, batch.input_ids, batch.attention_mask)
    teacher = teacher_logits(run, batch)
    mask = batch.labels != IGNORE_INDEX
    loss = mk.fused_divergence(logits, teacher, mask=mask, **divergence_options(args, run.method, run.vocab_size))
    with torch.no_grad():
        reverse = mk.fused_reverse_kld(logits, teacher, mask=mask, temperature=args.temperature,
                                       vocab_size=run.vocab_size)
    return loss, {"kd_loss": loss.detach(), "reverse_kld": reverse}


def gkd_loss(args, model, sample, teacher_outputs, teacher_head, vocab_size: int) -> tuple[torch.Tensor, dict]:
    """On-policy GKD (Agarwal et al., 2024, with lambda = 1): D(p, q) of --divergence (default the JSD(beta)) on the
    student's own samples, teacher-forced, mean over the response tokens; the gradient through q only (no policy
    gradient). ``mk.response_divergence`` inside the student's ModelRunner forward, from the logits or with
    --fused-linear from the hidden states."""
    loss = model(mk.response_divergence, sample, teacher_outputs, teacher_head, **divergence_options(args, "gkd", vocab_size))
    return loss, {"gkd_loss": loss.detach()}


def pretrain_loss(args, run: Run, batch) -> torch.Tensor:
    """L_PT on pre-training text: the student's cross-entropy (the paper's), or with --lm-kd-ratio r the reference
    code's (1 - r) CE + r (-mean_t sum_v p_v log q_v), a soft cross-entropy to the teacher on the same text."""
    logits = causal_lm_logits(run.model, batch.input_ids, batch.attention_mask)
    mask = batch.labels != IGNORE_INDEX
    loss = mk.language_modeling_loss(token_logprob(logits, batch.labels), mask)
    if not args.lm_kd_ratio:
        return loss
    soft_targets = teacher_logits(run, batch)[mask].float().softmax(-1)
    soft = F.cross_entropy(logits[..., : run.vocab_size][mask].float(), soft_targets)
    return (1 - args.lm_kd_ratio) * loss + args.lm_kd_ratio * soft


class Rollout:
    """One batch of teacher-mixed samples with its rewards and the teacher's outputs at the response
    positions: its logits, or with --fused-linear its last hidden states and its output layer (``teacher_head``:
    (weight, bias), gathered whole under --fsdp). Computed once through the teacher's ModelRunner, reused by every
    PPO epoch; not stored in checkpoints: recomputed."""

    def __init__(self, sample: mk.TeacherMixedSample, rewards: torch.Tensor, teacher, fused_linear: bool) -> None:
        self.sample, self.rewards, self.teacher_head = sample, rewards, None
        with torch.no_grad():
            self.teacher_outputs = teacher(mk.response_hidden_states if fused_linear else mk.response_logits, sample)
            if fused_linear:
                head = teacher.module.get_output_embeddings()
                self.teacher_head = (full_tensor(head.weight), full_tensor(head.bias))

    def state(self) -> dict:
        """Tensors, an int and dicts only: ``torch.load(weights_only=True)`` reads them back."""
        return {"sample": {field.name: getattr(self.sample, field.name)
                           for field in dataclasses.fields(self.sample)}, "rewards": self.rewards}

    @classmethod
    def from_state(cls, state: dict, teacher, fused_linear: bool) -> Rollout:
        return cls(mk.TeacherMixedSample(**state["sample"]), state["rewards"], teacher, fused_linear)

    def chunks(self, count: int):
        """``(sample, rewards, teacher_outputs, teacher_head)`` for each of ``count`` micro-batches of rows (sizes
        differ by at most one row, e.g. after a resume with another --batch-size or --grad-accum)."""
        s, rows = self.sample, self.sample.sequences.shape[0]
        for index in range(count):
            part = slice(index * rows // count, (index + 1) * rows // count)
            yield mk.TeacherMixedSample(
                sequences=s.sequences[part], attention_mask=s.attention_mask[part],
                response_mask=s.response_mask[part], student_logprob=s.student_logprob[part],
                teacher_logprob=s.teacher_logprob[part], importance_weight=s.importance_weight[part],
                prompt_length=s.prompt_length,
            ), self.rewards[part], self.teacher_outputs[part], self.teacher_head


def make_rollout(args, student, teacher, tokenizer, prompts: list[str], generator, vocab_size: int,
                 alpha: float) -> Rollout:
    """Sample responses from p~ = alpha p + (1 - alpha) q_old (the student in eval() mode; alpha: --alpha for minillm,
    0 for gkd) and score them: r_t = log p(y_t) - log q(y_t). Under --fsdp every process takes the same number of
    sampling steps."""
    input_ids, attention_mask = prompt_batch(tokenizer, prompts, max_length=args.max_length)
    device = next(student.parameters()).device
    with eval_mode(student):
        sample = mk.sample_teacher_mixed(
            student, teacher, input_ids.to(device), attention_mask.to(device), alpha=alpha,
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, vocab_size=vocab_size,
            generator=generator, synced_processes=args.fsdp,
        )
    rewards = mk.log_ratio_rewards(sample.teacher_logprob - sample.student_logprob, sample.response_mask,
                                   reward_scaling=args.reward_scaling, reward_clip=args.reward_clip)
    return Rollout(sample, rewards, teacher, args.fused_linear)


def owned_token_stats(student, *args, **options) -> mk.TokenStats:
    """``mk.response_token_stats(student, *args, **options)`` with each [B, N] field in its own storage (a clone of a
    few numbers per token): FSDP2 warns about every view its root's forward returns (an in-place op on one would
    bypass its backward hook), and the kernels' per-token outputs are views."""
    stats = mk.response_token_stats(student, *args, **options)
    return mk.TokenStats(*(None if x is None else x.clone() for x in stats))


def rollout_loss(args, model, sample, rewards, teacher_outputs, teacher_head,
                 vocab_size: int) -> tuple[torch.Tensor, dict]:
    """L_pg + L_single (``mk.minillm_loss``) on one micro-batch of a rollout; every vocabulary-wide term through
    ``mk.response_token_stats`` inside the student's ModelRunner forward (``model``): fused_token_stats from the
    logits, or with --fused-linear (a ``teacher_head``) fused_linear_token_stats from the last hidden states and
    output layers, so that DDP all-reduces and FSDP2 gathers the lm_head as for any forward."""
    stats = model(owned_token_stats, sample, teacher_outputs, teacher_head, temperature=args.temperature,
                  mix_alpha=args.alpha, vocab_size=vocab_size)
    return mk.minillm_loss(
        stats, sample.student_logprob, rewards, sample.importance_weight, sample.response_mask, gamma=args.gamma,
        whiten=not args.no_whiten, whiten_over=args.whiten_over, clip=args.ppo_clip,
        single_step_coef=args.single_step_coef, weighted_single_step=args.single_step == "weighted",
    )


# ----------------------------------------------------------------------------------------------- the run

@dataclasses.dataclass
class Run:
    """One method's training run: the models, the optimizer and data draws, and where it stands."""

    method: str
    student: torch.nn.Module  # the Hugging Face model (its parameters sharded under --fsdp)
    model: torch.nn.Module  # every use of the student goes through it: its ModelRunner (DDP'd or sharded)
    teacher: torch.nn.Module  # the teacher's ModelRunner (sharded under --fsdp)
    tokenizer: object
    optimizer: torch.optim.Optimizer
    samplers: dict[str, Sampler]  # "pairs" (sft / kd / seqkd), "prompts" (rollouts), "lm" (L_PT text)
    vocab_size: int
    checkpoint_path: Path  # checkpoint.pt, or under --fsdp the folder checkpoint/ (see save_sharded_checkpoint)
    rank: int
    world: int
    step: int = 0
    resumed: bool = False
    rollout: Rollout | None = None
    history: list[dict] = dataclasses.field(default_factory=list)  # [{"step", "heldout"}], the same on every rank
    # this process's teacher forward tokens (non-padding), generated (rollout) tokens and training seconds so far
    compute: dict = dataclasses.field(
        default_factory=lambda: {"teacher_forward_tokens": 0, "generated_tokens": 0, "seconds": 0.0})

    @property
    def device(self) -> torch.device:
        return next(self.student.parameters()).device

    @property
    def checkpoint(self) -> Path | None:
        """What --resume reads: checkpoint.pt, or under --fsdp the newest complete save in checkpoint/; None if there
        is none yet."""
        if self.checkpoint_path.suffix == ".pt":
            return self.checkpoint_path if self.checkpoint_path.exists() else None
        saves = [p for p in self.checkpoint_path.glob("*") if SHARDED_CHECKPOINT.fullmatch(p.name) and p.is_dir()]
        return max(saves, default=None)

    def say(self, text: str) -> None:
        if self.rank == 0:
            tqdm.write(text, file=sys.stderr)

    def no_sync(self, skip: bool = True):
        """DDP's no_sync() (gradients not all-reduced in this backward) if ``skip`` and under DDP. FSDP2
        reduce-scatters after every backward instead: its sharded gradients accumulate (skipping the reduction
        would keep whole, unsharded gradients until the last backward)."""
        skip = skip and isinstance(self.model, torch.nn.parallel.DistributedDataParallel)
        return self.model.no_sync() if skip else contextlib.nullcontext()


def start_run(args, out_dir: Path, teacher, tokenizer, data: dict, rank: int, world: int) -> Run:
    """A fresh run of --method, or with --resume the one that ``out_dir``'s checkpoint holds (SystemExit if it holds
    the other kind: checkpoint.pt without --fsdp, checkpoint/ with it). The pairs and the prompts are drawn with the
    same seed, so that every method of a seed sees the pool's prompts in the same order."""
    method = args.method
    student = load_student(args, teacher.module.device)
    student.train(method != "minillm" or args.dropout)  # MiniLLM updates in eval() mode, as the reference code
    model = parallelize(student, fsdp=args.fsdp, trainable=True)  # before the optimizer: FSDP2 replaces parameters
    run = Run(
        method=method, student=student, model=model, teacher=teacher, tokenizer=tokenizer,
        optimizer=torch.optim.AdamW(student.parameters(), lr=args.lr, betas=tuple(args.betas),
                                    weight_decay=args.weight_decay),
        samplers={name: Sampler(data[name], args.seed + offset, rank, world)
                  for name, offset in (("pairs", 0), ("prompts", 0), ("lm", 2))},
        vocab_size=min(len(tokenizer), student.get_output_embeddings().weight.shape[0],
                       teacher.module.get_output_embeddings().weight.shape[0]),
        checkpoint_path=out_dir / ("checkpoint" if args.fsdp else "checkpoint.pt"), rank=rank, world=world,
    )
    other = out_dir / ("checkpoint.pt" if args.fsdp else "checkpoint")
    if args.resume and run.checkpoint is None and other.exists():
        flag = "without" if args.fsdp else "with"
        raise SystemExit(f"--resume: {out_dir} holds {other.name}, the checkpoint of a run {flag} --fsdp: resume it "
                         f"{flag} --fsdp, or start this run in another --out-dir")
    if args.resume and run.checkpoint is not None:
        resume(args, run, load_checkpoint(resume_file(run), run.device))
    elif args.resume:
        if rank == 0:
            warnings.warn(f"--resume: no checkpoint at {run.checkpoint_path}; starting {method} from step 0")
    elif run.checkpoint is not None and rank == 0:
        warnings.warn(f"{run.checkpoint_path} exists: this fresh run overwrites it and starts a new log.jsonl "
                      "(pass --resume to continue it)")
    return run


def plain(arguments: argparse.Namespace) -> dict:
    """The arguments as JSON values (tuples become lists), as a checkpoint stores them."""
    return json.loads(json.dumps(vars(arguments)))


def checkpoint_state(args, run: Run) -> dict:
    """What --resume needs, in types that ``torch.load(weights_only=True)`` reads (tensors, numbers, strings,
    lists, tuples and dicts). Under --fsdp this process's part, without the weights and optimizer (saved sharded)."""
    weights = {} if args.fsdp else {"student": run.student.state_dict(), "optimizer": run.optimizer.state_dict()}
    return {
        "method": run.method, "step": run.step, "args": plain(args), "history": run.history, "compute": run.compute,
        **weights,
        "rollout": None if run.rollout is None else run.rollout.state(),
        "data_rng": {name: sampler.rng.getstate() for name, sampler in run.samplers.items()},
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(run.device) if run.device.type == "cuda" else None,
    }


def load_checkpoint(path: Path, device: torch.device) -> dict:
    """The checkpoint at ``path`` (``weights_only=True``); SystemExit naming the file if it cannot be read."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # torch.load fails in many ways (OSError, RuntimeError, UnpicklingError, EOFError...)
        raise SystemExit(
            f"--resume: cannot read the checkpoint {path} ({type(error).__name__}: {str(error).splitlines()[0]}). "
            "It is truncated or corrupt, or not a checkpoint of this trainer: delete it to start from step 0, "
            "or put a good copy in its place") from error
    if not isinstance(state, dict) or "args" not in state:
        raise SystemExit(f"--resume: {path} is not a checkpoint of this version of the trainer: delete it to start "
                         "from step 0, or resume it with the version that wrote it")
    return state


def resume_file(run: Run) -> Path:
    """The file of ``run.checkpoint`` this process reads: checkpoint.pt, or under --fsdp its rank-<r>.pt; SystemExit
    if another number of processes wrote the sharded checkpoint."""
    if run.checkpoint.is_file():
        return run.checkpoint
    written = len(list(run.checkpoint.glob("rank-*.pt")))
    if written != run.world:
        raise SystemExit(f"--resume: {run.checkpoint} was written by {written} processes, this run has {run.world}: "
                         f"resume with torchrun --nproc_per_node {written}")
    return run.checkpoint / f"rank-{run.rank}.pt"


def resume(args, run: Run, state: dict) -> None:
    """Restore ``state`` into ``run`` (under --fsdp, the weights and optimizer from the sharded save). SystemExit for
    another method, or a checkpoint past --steps; a warning lists the arguments that changed (they apply from here
    on: the learning rate, betas and weight decay are set on the restored optimizer)."""
    path = run.checkpoint
    if state["method"] != run.method:
        raise SystemExit(f"--resume: {path} is a {state['method']} run; --method {run.method} cannot continue it. "
                         f"Resume with --method {state['method']}, or start {run.method} in another --out-dir")
    if state["step"] > args.steps:
        raise SystemExit(f"--resume: {path} is at step {state['step']}, past --steps {args.steps}: resume with "
                         f"--steps >= {state['step']}, or start fresh in another --out-dir")
    changed = [f"--{name.replace('_', '-')} {state['args'].get(name)} -> {value}"
               for name, value in plain(args).items()
               if name not in NOT_HYPERPARAMETERS and state["args"].get(name) != value]
    if changed and run.rank == 0:
        warnings.warn(f"--resume: arguments changed since {path} was written; from step {state['step']} on: "
                      + ", ".join(changed))
    if args.fsdp:
        load_sharded(path, run.student, run.optimizer)
    else:
        run.student.load_state_dict(state["student"])
        run.optimizer.load_state_dict(state["optimizer"])
    for group in run.optimizer.param_groups:  # what the optimizer restored gives way to the arguments
        group.update(betas=tuple(args.betas), weight_decay=args.weight_decay)
    for name, sampler in run.samplers.items():
        sampler.rng.setstate(state["data_rng"][name])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and run.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], run.device)
    run.step, run.history, run.compute, run.resumed = state["step"], state["history"], state["compute"], True
    if state["rollout"] is not None:
        run.rollout = Rollout.from_state(state["rollout"], run.teacher, args.fused_linear)
    run.say(f"resumed {run.method} at step {run.step} from {path}"
            + (f": the run is finished (--steps {args.steps}); raise --steps to train further"
               if run.step == args.steps else ""))


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


def save(args, run: Run) -> None:
    """The checkpoint of ``run``: rank 0 writes checkpoint.pt, or under --fsdp every process its part of the sharded
    checkpoint; every rank waits."""
    if args.fsdp:
        save_sharded_checkpoint(run, checkpoint_state(args, run))
    elif run.rank == 0:
        save_checkpoint(run.checkpoint_path, checkpoint_state(args, run))
    if run.world > 1:
        dist.barrier()


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


def autocast(args, device: torch.device):
    """bfloat16 autocast with --bf16, else nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()


def learning_rate(args, step: int) -> float:
    """--lr, after a linear warm-up over the first --warmup-steps steps: lr * min(1, (step + 1) / warmup)."""
    return args.lr * min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else args.lr


def stop_if_not_finite(value: torch.Tensor, what: str, parts: dict, run: Run) -> None:
    """Raise FloatingPointError naming the step, the loss parts and the last checkpoint if ``value`` is NaN/inf."""
    if not torch.isfinite(value):
        listed = ", ".join(f"{name}={float(torch.as_tensor(part).detach()):.4g}" for name, part in parts.items())
        raise FloatingPointError(
            f"{run.method}: non-finite {what} {value.item()} at step {run.step}"
            + (f"; parts: {listed}" if listed else "")
            + f". Last checkpoint: {run.checkpoint or 'none'}")


def held_out_scores(args, model, tokenizer, data: dict, rank: int, world: int,
                    sample_seed: int | None = None) -> dict:
    """``evaluate`` of a ModelRunner's model on the held-out split, greedy (or sampled with ``sample_seed``), on rank
    0, or under --fsdp on every rank (each generation step is a collective there: every rank generates the same
    answers, with generate's synced_gpus); rank 0's scores, on every rank. Under no_grad from the wrapper's forward
    on, so that DDP expects no backward after it."""
    with torch.no_grad():
        scores = [model(evaluate, tokenizer, data["heldout"], max_new_tokens=args.max_new_tokens,
                        checkers=data["checkers"], sample_seed=sample_seed, progress=rank == 0, synced_gpus=args.fsdp)
                  if rank == 0 or args.fsdp else None]
    if world > 1:
        dist.broadcast_object_list(scores)
    return scores[0]


def final_scores(args, model, teacher, tokenizer, data: dict, rank: int, world: int,
                 greedy: dict | None = None) -> dict:
    """The whole evaluation protocol of ``model`` (a ModelRunner): ``{"greedy": scores (``greedy`` if given), "sampled":
    [the scores of each of the --eval-samples seeds 0, 1, ...], "exposure_bias": ExAccErr or None}``. ExAccErr (the
    tiny default's long tasks) is measured against ``teacher`` (None: the teacher itself, for which it is 0 / 0), on
    rank 0 with the unwrapped models, not under --fsdp."""
    scores = {"greedy": greedy or held_out_scores(args, model, tokenizer, data, rank, world),
              "sampled": [held_out_scores(args, model, tokenizer, data, rank, world, seed)
                          for seed in range(args.eval_samples)], "exposure_bias": [None]}
    if teacher is not None and data["long_prompts"] and args.eval_samples and not args.fsdp:
        if rank == 0:
            scores["exposure_bias"] = [exposure_bias(mk.sampling.unwrapped(model), teacher.module, tokenizer,
                                                     data["long_prompts"], max_new_tokens=args.max_new_tokens)]
        if world > 1:
            dist.broadcast_object_list(scores["exposure_bias"])
    return {**scores, "exposure_bias": scores["exposure_bias"][0]}


def evaluate_run(args, run: Run, data: dict, log: JsonlLog) -> None:
    """Held-out greedy scores of the student at ``run.step``, recorded by every rank."""
    scores = held_out_scores(args, run.model, run.tokenizer, data, run.rank, run.world)
    run.history.append({"step": run.step, "heldout": scores})
    log.write({"method": run.method, "step": run.step, "eval": scores})


def next_batch(args, run: Run) -> list:
    """This step's micro-batches, each ``(the method's part, an L_PT text batch or None)``: for minillm rows of the
    rollout, a fresh one every --ppo-epochs steps; for sft, kd and seqkd teacher-forced batches of their pairs."""
    micro, device = args.batch_size // args.grad_accum, run.device
    texts = [run.samplers["lm"].next(micro) if args.lm_coef else None for _ in range(args.grad_accum)]
    lm_batches = [None if t is None else _to(teacher_forced_batch(run.tokenizer, t, None, max_length=args.max_length),
                                             device) for t in texts]
    if run.method not in ROLLOUT_METHODS:
        pairs = [run.samplers["pairs"].next(micro) for _ in range(args.grad_accum)]
        return [(_to(teacher_forced_batch(run.tokenizer, [e.prompt for e in examples], [e.response for e in examples],
                                          max_length=args.max_length), device), lm)
                for examples, lm in zip(pairs, lm_batches)]
    if run.method == "gkd" or run.step % args.ppo_epochs == 0:  # gkd: fresh samples every step
        # non-finite weights (a diverged update, a bad checkpoint) would fail inside the sampler's multinomial
        stop_if_not_finite(largest_parameter(run), "student parameter (largest |value|) before the rollout", {}, run)
        generator = torch.Generator(device).manual_seed(args.seed * 1_000_003 + run.step * 1009 + run.rank)
        with autocast(args, device):
            run.rollout = make_rollout(args, run.model, run.teacher, run.tokenizer,
                                       run.samplers["prompts"].next(args.batch_size), generator, run.vocab_size,
                                       alpha=args.alpha if run.method == "minillm" else 0.0)
        # the teacher ran on every token while sampling, then once more on the sequences (response_logits)
        run.compute["teacher_forward_tokens"] += 2 * int(run.rollout.sample.attention_mask.sum())
        run.compute["generated_tokens"] += int(run.rollout.sample.response_mask.sum())
    return list(zip(run.rollout.chunks(args.grad_accum), lm_batches))


def backward(args, run: Run, micro_batch, sync: bool) -> dict[str, torch.Tensor]:
    """The loss of one micro-batch, its backward (divided by --grad-accum; DDP all-reduces if ``sync``, FSDP2
    reduce-scatters every time) and its detached parts. L_PT gets its own backward first, so that its graph is freed
    before the method's."""
    part, lm_batch = micro_batch
    parts = {}
    with autocast(args, run.device):
        if lm_batch is not None:
            with run.no_sync():
                pretrain = pretrain_loss(args, run, lm_batch)
                stop_if_not_finite(args.lm_coef * pretrain, "loss", {"lm_loss": pretrain}, run)
                (args.lm_coef * pretrain / args.grad_accum).backward()
            parts["lm_loss"] = pretrain.detach()
        if run.method == "minillm":
            loss, method_parts = rollout_loss(args, run.model, *part, run.vocab_size)
        elif run.method == "gkd":
            sample, _, teacher_outputs, teacher_head = part
            loss, method_parts = gkd_loss(args, run.model, sample, teacher_outputs, teacher_head, run.vocab_size)
        elif run.method == "kd":
            loss, method_parts = kd_loss(args, run, part)
        else:
            loss, method_parts = sft_loss(run, part)
    parts.update(method_parts)
    stop_if_not_finite(loss, "loss", parts, run)
    with run.no_sync(skip=not sync):
        (loss / args.grad_accum).backward()
    parts["total_loss"] = loss.detach() + args.lm_coef * parts.get("lm_loss", 0.0)
    return parts


def step(args, run: Run, batch: list) -> dict[str, float]:
    """One optimizer step on ``batch``: every micro-batch's backward, gradient clipping, AdamW at this step's
    learning rate. FloatingPointError before the update if the gradient norm is not finite. Returns the logged
    figures (the loss parts averaged over the micro-batches and processes, lr, grad_norm)."""
    parts: dict[str, float] = {}
    for index, micro_batch in enumerate(batch):
        for name, value in backward(args, run, micro_batch, sync=index == len(batch) - 1).items():
            parts[name] = parts.get(name, 0.0) + float(value) / len(batch)
    grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(run.student.parameters(), args.grad_clip))
    stop_if_not_finite(grad_norm, "gradient norm", parts, run)
    lr = learning_rate(args, run.step)
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


def largest_parameter(run: Run) -> torch.Tensor:
    """max |p| over the student's parameters (NaN if any is NaN), over every process's shards under --fsdp
    (gathered: gloo's MAX reduction may drop a NaN)."""
    shards = [local_tensor(p).detach() for p in run.student.parameters()]
    largest = torch.stack([shard.abs().max() for shard in shards if shard.numel()]).max()
    if run.world == 1:
        return largest
    gathered = [torch.empty_like(largest) for _ in range(run.world)]
    dist.all_gather(gathered, largest)
    return torch.stack(gathered).max()


def replica_difference(student: torch.nn.Module) -> float:
    """The largest difference between the processes' copies of ``student``'s full parameters (a per-tensor sum and
    sum of squares, gathered): DDP keeps them equal, and FSDP2 gathers one copy of each shard."""
    fingerprint = torch.stack([torch.stack([full.double().sum(), full.double().square().sum()])
                               for full in map(full_tensor, student.parameters())]).flatten()
    gathered = [torch.empty_like(fingerprint) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, fingerprint)
    return max(float((g - gathered[0]).abs().max()) for g in gathered)


def train(args, out_dir: Path, teacher, tokenizer, data: dict, rank: int, world: int) -> dict:
    """Train a fresh copy of the start student with --method (or resume it), then evaluate it (``final_scores``).

    Returns ``{"history": [{"step", "heldout"}, ...], "final": final_scores, "compute": {"teacher_forward_tokens",
    "generated_tokens", "seconds" (training: the steps and their batches, not the evaluations), "answers" (what the
    teacher's answers cost to generate, or None)}}``, the counts summed over the processes.
    """
    run = start_run(args, out_dir, teacher, tokenizer, data, rank, world)
    log = JsonlLog(out_dir / "log.jsonl", run.step if run.resumed else None, enabled=rank == 0)
    if run.step == 0:
        evaluate_run(args, run, data, log)
    bar = tqdm(range(run.step, args.steps), desc=run.method, disable=rank != 0, initial=run.step, total=args.steps)
    for _ in bar:
        started = time.time()
        parts = step(args, run, next_batch(args, run))
        run.compute["seconds"] += time.time() - started
        log.write({"method": run.method, "step": run.step, **parts, "seconds": run.compute["seconds"]})
        bar.set_postfix({name: f"{parts[name]:.4f}" for name in ("total_loss", LOSS_SHOWN[run.method])})
        if args.eval_every and run.step % args.eval_every == 0:
            evaluate_run(args, run, data, log)
        if run.step % args.save_every == 0 or run.step == args.steps:
            save(args, run)
    if run.history[-1]["step"] != run.step:  # the final greedy eval, unless --eval-every just ran it
        evaluate_run(args, run, data, log)
        save(args, run)
    final = final_scores(args, run.model, teacher, tokenizer, data, rank, world, greedy=run.history[-1]["heldout"])
    compute = dict(run.compute)
    if world > 1:
        log.write({"method": run.method, "step": run.step, "replica_max_difference": replica_difference(run.student)})
        counts = torch.tensor([compute["teacher_forward_tokens"], compute["generated_tokens"]], device=run.device)
        dist.all_reduce(counts)
        compute.update(teacher_forward_tokens=int(counts[0]), generated_tokens=int(counts[1]))
    compute["answers"] = data.get("answers")
    log.write({"method": run.method, "step": run.step, "final": final, "compute": compute})
    state = full_state_dict(run.student)  # (gathered from every process under --fsdp)
    if rank == 0:
        save_model(run.student, state, tokenizer, out_dir / "student")
    log.close()
    return {"history": run.history, "final": final, "compute": compute}


def _to(batch, device):
    return type(batch)(*(t.to(device) for t in batch))


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = init_distributed()
    try:
        distill(args, rank, world, device)
        if world > 1:  # every process done (rank 0 writes the results last): gloo aborts one whose peer is still busy
            dist.barrier()
    finally:  # after an error too: the other processes' collectives fail instead of waiting
        if world > 1:
            dist.destroy_process_group()


def planned_runs(args) -> list[tuple[str, argparse.Namespace]]:
    """``(name, arguments)`` of each run: with --compare every method of ``COMPARED`` for each of --seeds (seed by
    seed), else the one --method."""
    if not args.compare:
        return [("kd (teacher answers)" if args.teacher_answers else args.method, args)]
    return [(name, argparse.Namespace(**{**vars(args), "method": method, "teacher_answers": answers, "seed": seed}))
            for seed in args.seeds for name, method, answers in COMPARED]


def finished_run(run_dir: Path, args) -> dict | None:
    """What ``train`` returned for the run of ``args`` that already ended in ``run_dir`` (its log.jsonl ends with the
    final record of --method at --steps), else None: --compare --resume goes on from the first unfinished run, and
    several --compare processes (different --seeds, one --out-dir) end with one --compare --resume that writes the
    whole table."""
    path = run_dir / "log.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    if not records or "final" not in records[-1] or records[-1]["method"] != args.method \
            or records[-1]["step"] != args.steps:
        return None
    history = [{"step": r["step"], "heldout": r["eval"]} for r in records if "eval" in r]
    return {"history": history, "final": records[-1]["final"], "compute": records[-1]["compute"]}


def distill(args, rank: int, world: int, device: torch.device) -> None:
    """The teacher's and the start student's scores, then each run (``train``), then the results (rank 0 writes
    results.json and the tables)."""
    started = time.time()
    torch.manual_seed(args.seed)
    teacher, tokenizer = load_teacher(args, device)
    teacher = parallelize(teacher, fsdp=args.fsdp, trainable=False)
    data = load_data(args, tokenizer)
    out_dir = Path(args.out_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        print(f"teacher {args.teacher}, student {args.student}, data {args.data}: {len(data['prompts'])} prompts "
              f"({len(data['pairs'])} with a gold answer), {len(data['heldout'])} held-out; {world} process(es) on "
              f"{device}; kernels: {mk.available_backends()}", file=sys.stderr)
    start = parallelize(load_student(args, device), fsdp=args.fsdp, trainable=False)
    results = {"setup": setup(args, device, world, data),
               "teacher": final_scores(args, teacher, None, tokenizer, data, rank, world),
               "student (start)": final_scores(args, start, teacher, tokenizer, data, rank, world),
               "gold answers": score_responses(data["heldout"], [e.response for e in data["heldout"]],
                                               checkers=data["checkers"]), "runs": []}
    del start
    for name, run_args in planned_runs(args):
        run_dir = out_dir / re.sub(r"\W+", "-", name).strip("-") / f"seed-{run_args.seed}" if args.compare else out_dir
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
        record = finished_run(run_dir, run_args) if args.resume and args.compare else None
        if record is None:
            needs_answers = run_args.method == "seqkd" or run_args.teacher_answers
            run_data = with_teacher_answers(run_args, data, teacher, tokenizer, rank, world) if needs_answers else data
            record = train(run_args, run_dir, teacher, tokenizer, run_data, rank, world)
        elif rank == 0:
            print(f"{name}, seed {run_args.seed}: finished in {run_dir}, its results read from log.jsonl", file=sys.stderr)
        results["runs"].append({"name": name, "method": run_args.method, "teacher_answers": run_args.teacher_answers,
                                "seed": run_args.seed, **record})
    if rank == 0:
        results["setup"]["seconds"] = time.time() - started
        (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        summary = results_markdown(results)
        (out_dir / ("compare.md" if args.compare else "results.md")).write_text(summary)
        print("\n" + summary)


# ----------------------------------------------------------------------------------------------- the results

def setup(args, device: torch.device, world: int, data: dict) -> dict:
    """What the results were measured with: the arguments, the data's sizes, the machine and the versions, the date."""
    import platform

    import transformers

    cpu = platform.processor()
    with contextlib.suppress(OSError, StopIteration):  # Linux: the model name, family and AVX-512
        info = dict(line.split(":", 1) for line in open("/proc/cpuinfo").read().split("\n\n")[0].splitlines())
        info = {key.strip(): value.strip() for key, value in info.items()}
        cpu = (f"{info['model name']}, family {info['cpu family']}"
               + (", AVX-512" if "avx512f" in info["flags"].split() else "") + f", {os.cpu_count()} cores")
    return {"args": plain(args), "prompts": len(data["prompts"]), "gold pairs": len(data["pairs"]),
            "heldout": len(data["heldout"]), "date": time.strftime("%Y-%m-%d %H:%M %Z"), "device": str(device), "cpu": cpu,
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
    kept = [c for c in columns if any(figure(final, *c[1:]) is not None for finals in rows.values() for final in finals)]
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


if __name__ == "__main__":
    main()
