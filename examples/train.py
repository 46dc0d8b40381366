"""MiniLLM distillation of a Hugging Face causal LM, with the paper's SFT and KD baselines.

    python examples/train.py                                   # tiny default: teacher + SFT student + data, shipped
    python examples/train.py --compare                         # sft, kd and minillm on the same budget, one table
    python examples/train.py --teacher smollm2 --student smollm2 --student-layers 6   # SmolLM2-135M-Instruct
    torchrun --nproc_per_node 2 examples/train.py ...          # DDP (gloo on CPU, NCCL on GPU)

Methods (same data, same number of optimizer steps, each on --batch-size sequences):
    sft      cross-entropy on the data's gold responses
    kd       token-level forward KL(p || q) to the teacher on the data's gold responses (teacher-forced)
    minillm  on prompts only: responses sampled from p~ = alpha p + (1 - alpha) q (sample_teacher_mixed),
             rewards r_t = log p(y_t) - log q(y_t), then --ppo-epochs optimizer steps of
             L = L_pg + L_single (minillm_loss, per-token terms from fused_token_stats) + lm_coef L_PT
             (cross-entropy on pre-training text: the gold pairs' text for the tiny default).

MiniLLM defaults are the reference code's (microsoft/LMOps minillm/, see minillm_kernels/objective.py):
alpha 0.2, PPO clip 0.2, gamma 0.95, rewards / 0.5 clipped to +-100, whitened advantages, 4 PPO epochs,
lr 5e-6 constant, AdamW betas (0.9, 0.95), weight decay 1e-6, grad clip 1.0, top-k 0, top-p 1, T 1.
One departure, for the tiny default only: lr 1e-4 (5e-6 is tuned for 0.1-13B models and moves a
0.6M-parameter student by nothing in a few hundred steps); every method of --compare uses it.

Outputs in --out-dir (per method with --compare): log.jsonl (every loss part, reward, KL, eval figure),
checkpoint.pt (written to a temp file and renamed; --resume continues from it: weights, optimizer,
scheduler, data order, RNG, step, the current rollout), student/ (the final model), eval tables.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

import minillm_kernels as mk
from minillm_kernels.data import (
    IGNORE_INDEX, Example, causal_lm_logits, load_jsonl, prompt_batch, teacher_forced_batch,
)
from minillm_kernels.evaluation import evaluate, markdown_table

METHODS = ("sft", "kd", "minillm")
TINY_LR = 1e-4  # the one departure from the reference defaults (see the docstring)


# ----------------------------------------------------------------------------------------------- set-up

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="tiny", help="'tiny', 'smollm2' or an AutoModelForCausalLM path")
    p.add_argument("--student", default="tiny",
                   help="'tiny' (the shipped SFT student), 'smollm2' (the teacher cut to --student-layers) or a path")
    p.add_argument("--student-layers", type=int, default=6, help="smollm2 student: layers kept (evenly spaced)")
    p.add_argument("--method", choices=METHODS, default="minillm")
    p.add_argument("--compare", action="store_true", help="run sft, kd and minillm on the same budget")
    p.add_argument("--data", default="tiny",
                   help="'tiny' or a JSONL of {prompt, response?, task?}; a row without response is a prompt only")
    p.add_argument("--eval-data", default=None, help="JSONL of held-out {prompt, response, task?} (tiny: its split)")
    p.add_argument("--eval-size", type=int, default=None, help="evaluate on the first N held-out examples only")
    p.add_argument("--chat-template", action="store_true",
                   help="wrap every prompt in the tokenizer's chat template (always on for --teacher smollm2)")
    p.add_argument("--lm-data", default=None,
                   help="JSONL of {text} pre-training text for L_PT (default: the data's prompt + response pairs)")
    p.add_argument("--out-dir", default="out/train")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per optimizer step (per process)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=None, help="default: 5e-6 (reference); 1e-4 for the tiny student")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up, then constant (reference: 0)")
    p.add_argument("--weight-decay", type=float, default=1e-6)
    p.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.95))
    p.add_argument("--grad-clip", type=float, default=1.0)
    # MiniLLM (reference-code defaults; their sources are in minillm_kernels/objective.py)
    p.add_argument("--alpha", type=float, default=0.2, help="teacher share of the sampling mixture")
    p.add_argument("--ppo-epochs", type=int, default=4, help="optimizer steps per rollout batch")
    p.add_argument("--ppo-clip", type=float, default=mk.objective.PPO_CLIP)
    p.add_argument("--gamma", type=float, default=mk.objective.GAMMA)
    p.add_argument("--reward-scaling", type=float, default=mk.objective.REWARD_SCALING)
    p.add_argument("--reward-clip", type=float, default=mk.objective.REWARD_CLIP)
    p.add_argument("--no-whiten", action="store_true", help="do not whiten the advantages")
    p.add_argument("--single-step-coef", type=float, default=mk.objective.SINGLE_STEP_COEF)
    p.add_argument("--lm-coef", type=float, default=mk.objective.LM_COEF)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=None, help="rollout and eval length (tiny: 12; else 128)")
    p.add_argument("--max-length", type=int, default=512, help="teacher-forced sequences are cut to this")
    p.add_argument("--fused-linear", action="store_true",
                   help="minillm: per-token terms from the models' last hidden states and output layers "
                        "(fused_linear_token_stats), so the rollout's [tokens x V] logits are never built")
    # practicalities
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (GPU; slow on most CPUs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=100, help="held-out eval every N steps (0: before/after only)")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (and at the end)")
    p.add_argument("--resume", action="store_true", help="continue from --out-dir's checkpoint.pt")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.fused_linear and "RANK" in os.environ:
        p.error("--fused-linear is single-process for now: under DDP the student must run through its DDP wrapper")
    if args.grad_accum < 1 or args.batch_size % args.grad_accum:
        p.error(f"--batch-size ({args.batch_size}) must be a multiple of --grad-accum ({args.grad_accum})")
    args.lr = args.lr if args.lr is not None else (TINY_LR if args.student == "tiny" else 5e-6)
    args.chat_template = args.chat_template or args.teacher == "smollm2"
    if args.max_new_tokens is None:
        from minillm_kernels.tiny import MAX_NEW_TOKENS

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
        from minillm_kernels.smollm2 import load_smollm2

        teacher, tokenizer = load_smollm2()
    else:
        if args.teacher == "tiny":
            from minillm_kernels.tiny import checkpoint_dir

            path = checkpoint_dir("teacher")
        else:
            path = args.teacher
        teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return teacher.to(device).eval().requires_grad_(False), tokenizer


def load_student(args, teacher, device):
    """A fresh float32 copy of the start student, in train mode."""
    from transformers import AutoModelForCausalLM

    if args.student == "smollm2":
        from minillm_kernels.smollm2 import cut_layers

        if args.teacher != "smollm2":
            raise SystemExit("--student smollm2 is the smollm2 teacher cut to fewer layers: use --teacher smollm2")
        student = cut_layers(teacher, args.student_layers)
    elif args.student == "tiny":
        from minillm_kernels.tiny import checkpoint_dir

        student = AutoModelForCausalLM.from_pretrained(checkpoint_dir("student-sft"), dtype=torch.float32)
    else:
        student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)
    return student.to(device).train().requires_grad_(True)


def load_data(args, tokenizer) -> dict[str, list]:
    """``labelled`` (gold pairs: SFT/KD data), ``prompts`` (every training prompt: MiniLLM's), ``heldout``, ``lm``."""
    if args.data == "tiny":
        from minillm_kernels.tiny import tiny_splits

        splits = tiny_splits()
        labelled, unlabelled = splits["labelled"], splits["prompts"]
        heldout = load_jsonl(args.eval_data) if args.eval_data else splits["heldout"]
    else:
        examples = load_jsonl(args.data)
        labelled = [e for e in examples if e.response]
        unlabelled = [e for e in examples if not e.response]
        if args.eval_data:
            heldout = load_jsonl(args.eval_data)
        else:  # hold out 5% of the gold pairs (at least one), drawn with the seed
            order = random.Random(args.seed).sample(labelled, len(labelled))
            cut = max(1, len(order) // 20)
            heldout, labelled = order[:cut], order[cut:]
    heldout = heldout[: args.eval_size]
    if not labelled:
        raise SystemExit(f"{args.data}: no example has a response; SFT, KD and L_PT need gold pairs")
    if args.lm_data:
        with open(args.lm_data, encoding="utf-8") as lines:
            lm_texts = [json.loads(line)["text"] for line in lines if line.strip()]
    else:
        lm_texts = [e.prompt + e.response for e in labelled]
    if args.chat_template:  # an instruct model's prompts go through its chat template
        def chat(example: Example) -> Example:
            message = [{"role": "user", "content": example.prompt}]
            return example._replace(prompt=tokenizer.apply_chat_template(message, tokenize=False,
                                                                          add_generation_prompt=True))

        labelled, unlabelled, heldout = ([chat(e) for e in split] for split in (labelled, unlabelled, heldout))
    prompts = [e.prompt for e in labelled + unlabelled]
    return {"labelled": labelled, "prompts": prompts, "heldout": heldout, "lm": lm_texts}


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


def sft_loss(student, batch) -> tuple[torch.Tensor, dict]:
    """Cross-entropy on the response tokens."""
    logits = causal_lm_logits(student, batch.input_ids, batch.attention_mask)
    mask = batch.labels != IGNORE_INDEX
    loss = mk.language_modeling_loss(token_logprob(logits, batch.labels), mask)
    return loss, {"sft_loss": loss.detach()}


def kd_loss(student, teacher, batch, temperature: float) -> tuple[torch.Tensor, dict]:
    """Token-level forward KL(p || q) = sum_v p_v (log p_v - log q_v), mean over the response tokens.

    The package's kernels compute the reverse KL (gradient to their first argument); the forward KL of
    this baseline is plain PyTorch (a [tokens x V] tensor, like any KD code). The fused reverse KL of
    the same positions is logged for comparison.
    """
    logits = causal_lm_logits(student, batch.input_ids, batch.attention_mask)
    with torch.no_grad():
        teacher_logits = causal_lm_logits(teacher, batch.input_ids, batch.attention_mask)
    mask = batch.labels != IGNORE_INDEX
    width = min(logits.shape[-1], teacher_logits.shape[-1])
    student_logq = (logits[mask][:, :width].float() / temperature).log_softmax(-1)
    teacher_logp = (teacher_logits[mask][:, :width].float() / temperature).log_softmax(-1)
    loss = F.kl_div(student_logq, teacher_logp, log_target=True, reduction="batchmean")
    with torch.no_grad():
        reverse = mk.fused_reverse_kld(logits[..., :width], teacher_logits[..., :width], mask=mask,
                                       temperature=temperature)
    return loss, {"kd_loss": loss.detach(), "reverse_kld": reverse}


def lm_loss(student, batch) -> torch.Tensor:
    """L_PT: cross-entropy of the student on pre-training text."""
    logits = causal_lm_logits(student, batch.input_ids, batch.attention_mask)
    return mk.language_modeling_loss(token_logprob(logits, batch.labels), batch.labels != IGNORE_INDEX)


class Rollout:
    """One batch of teacher-mixed samples with its rewards and the teacher's outputs at the response
    positions: its logits, or with --fused-linear its last hidden states (computed once, reused by every
    PPO epoch; not stored in checkpoints: recomputed)."""

    def __init__(self, sample: mk.TeacherMixedSample, rewards: torch.Tensor, teacher, fused_linear: bool) -> None:
        self.sample, self.rewards = sample, rewards
        with torch.no_grad():
            self.teacher_outputs = (mk.response_hidden_states if fused_linear else mk.response_logits)(teacher, sample)

    def state(self) -> dict:
        return {"sample": self.sample, "rewards": self.rewards}

    def chunks(self, count: int):
        """``(sample, rewards, teacher_outputs)`` for each of ``count`` micro-batches of rows."""
        s, size = self.sample, self.sample.sequences.shape[0] // count
        for start in range(0, s.sequences.shape[0], size):
            rows = slice(start, start + size)
            part = mk.TeacherMixedSample(
                sequences=s.sequences[rows], attention_mask=s.attention_mask[rows],
                response_mask=s.response_mask[rows], student_logprob=s.student_logprob[rows],
                teacher_logprob=s.teacher_logprob[rows], importance_weight=s.importance_weight[rows],
                prompt_length=s.prompt_length,
            )
            yield part, self.rewards[rows], self.teacher_outputs[rows]


def make_rollout(args, student, teacher, tokenizer, prompts: list[str], generator, vocab_size: int) -> Rollout:
    """Sample responses from p~ = alpha p + (1 - alpha) q_old and score them: r_t = log p(y_t) - log q(y_t)."""
    input_ids, attention_mask = prompt_batch(tokenizer, prompts, max_length=args.max_length)
    device = next(student.parameters()).device
    student.eval()
    sample = mk.sample_teacher_mixed(
        student, teacher, input_ids.to(device), attention_mask.to(device), alpha=args.alpha,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, vocab_size=vocab_size,
        generator=generator,
    )
    student.train()
    rewards = mk.log_ratio_rewards(sample.teacher_logprob - sample.student_logprob, sample.response_mask,
                                   reward_scaling=args.reward_scaling, reward_clip=args.reward_clip)
    return Rollout(sample, rewards, teacher, args.fused_linear)


def minillm_loss(args, student, teacher, sample, rewards, teacher_outputs, vocab_size: int) -> tuple[torch.Tensor, dict]:
    """L_pg + L_single on one micro-batch of a rollout; every vocabulary-wide term through fused_token_stats
    (from the logits) or fused_linear_token_stats (from the last hidden states and output layers)."""
    mask = sample.response_mask
    response_ids = sample.response_ids.masked_fill(~mask, 0)
    token_args = dict(mask=mask, temperature=args.temperature, mix_alpha=args.alpha, vocab_size=vocab_size)
    if args.fused_linear:
        student_head, teacher_head = student.get_output_embeddings(), teacher.get_output_embeddings()
        dtype = student_head.weight.dtype
        stats = mk.fused_linear_token_stats(
            mk.response_hidden_states(student, sample).to(dtype), student_head.weight,
            teacher_outputs.to(dtype), teacher_head.weight.to(dtype), response_ids,
            student_bias=student_head.bias, teacher_bias=teacher_head.bias, **token_args,
        )
    else:
        student_logits = mk.response_logits(student, sample)
        stats = mk.fused_token_stats(student_logits, teacher_outputs.to(student_logits.dtype), response_ids,
                                     **token_args)
    return mk.minillm_loss(
        stats, sample.student_logprob, rewards, sample.importance_weight, mask, gamma=args.gamma,
        whiten=not args.no_whiten, clip=args.ppo_clip, single_step_coef=args.single_step_coef,
    )


# ----------------------------------------------------------------------------------------------- the loop

def stop_if_not_finite(loss: torch.Tensor, parts: dict, method: str, step: int, checkpoint_path: Path) -> None:
    """Raise FloatingPointError naming the step, the loss parts and the last checkpoint if ``loss`` is NaN/inf."""
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"{method}: non-finite loss {loss.item()} at step {step}; parts: "
            + ", ".join(f"{name}={float(torch.as_tensor(value).detach()):.4g}" for name, value in parts.items())
            + f". Last checkpoint: {checkpoint_path if checkpoint_path.exists() else 'none'}")


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to ``path.tmp``, then an atomic rename: a crash never leaves a half-written checkpoint."""
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def save_model(model, tokenizer, directory: Path) -> None:
    import shutil

    temporary = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary)
    tokenizer.save_pretrained(temporary)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(temporary, directory)


def train(args, method: str, out_dir: Path, teacher, tokenizer, data, rank: int, world: int) -> dict:
    """Train a fresh copy of the start student with ``method``.

    Returns (on rank 0) ``{"history": [{"step", "heldout"}, ...], "seconds": training wall time}``.
    """
    device = next(teacher.parameters()).device
    student = load_student(args, teacher, device)
    model = torch.nn.parallel.DistributedDataParallel(student) if world > 1 else student
    vocab_size = min(len(tokenizer), student.get_output_embeddings().weight.shape[0],
                     teacher.get_output_embeddings().weight.shape[0])
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, betas=tuple(args.betas),
                                  weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else 1.0)
    pairs = Sampler(data["labelled"], args.seed, rank, world)
    prompts = Sampler(data["prompts"], args.seed + 1, rank, world)
    lm_texts = Sampler(data["lm"], args.seed + 2, rank, world)
    step, rollout, history = 0, None, []
    checkpoint_path = out_dir / "checkpoint.pt"
    if args.resume and checkpoint_path.exists():
        state = torch.load(checkpoint_path, map_location=device, weights_only=False)
        student.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        for sampler, key in ((pairs, "pairs"), (prompts, "prompts"), (lm_texts, "lm")):
            sampler.rng.setstate(state["data_rng"][key])
        torch.set_rng_state(state["torch_rng"])
        step, history = state["step"], state["history"]
        if state["rollout"] is not None:
            rollout = Rollout(state["rollout"]["sample"], state["rollout"]["rewards"], teacher, args.fused_linear)
        if rank == 0:
            tqdm.write(f"resumed {method} at step {step} from {checkpoint_path}")
    log = open(out_dir / "log.jsonl", "a") if rank == 0 else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
    micro = args.batch_size // args.grad_accum

    evaluated_at = None

    def evaluate_student(at_step: int) -> None:
        nonlocal evaluated_at
        evaluated_at = at_step
        if rank == 0:
            scores = evaluate(student, tokenizer, data["heldout"], max_new_tokens=args.max_new_tokens, progress=True)
            history.append({"step": at_step, "heldout": scores})
            log.write(json.dumps({"method": method, "step": at_step, "eval": scores}) + "\n")
            log.flush()
        if world > 1:
            dist.barrier()

    def checkpoint() -> None:
        if rank == 0:
            save_checkpoint(checkpoint_path, {
                "student": student.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": step, "history": history,
                "rollout": None if rollout is None else rollout.state(),
                "data_rng": {"pairs": pairs.rng.getstate(), "prompts": prompts.rng.getstate(),
                             "lm": lm_texts.rng.getstate()},
                "torch_rng": torch.get_rng_state(), "method": method,
            })
        if world > 1:
            dist.barrier()

    if step == 0:
        evaluate_student(0)
    started = time.time()
    bar = tqdm(range(step, args.steps), desc=method, disable=rank != 0, initial=step, total=args.steps)
    for step in bar:
        parts_sum: dict[str, float] = {}
        if method == "minillm" and step % args.ppo_epochs == 0:  # a fresh rollout every ppo_epochs steps
            bar.set_postfix_str("rollout")
            generator = torch.Generator(device).manual_seed(args.seed * 1_000_003 + step * 1009 + rank)
            with autocast:
                rollout = make_rollout(args, student, teacher, tokenizer, prompts.next(args.batch_size),
                                       generator, vocab_size)
        micro_batches = list(rollout.chunks(args.grad_accum)) if method == "minillm" else [
            pairs.next(micro) for _ in range(args.grad_accum)]
        for index, micro_batch in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            with autocast:
                if method == "minillm":
                    texts = lm_texts.next(micro)
                    lm_batch = _to(teacher_forced_batch(tokenizer, texts, None, max_length=args.max_length), device)
                    # L_PT gets its own backward (DDP all-reduces once, in the last backward of the step)
                    with model.no_sync() if world > 1 else contextlib.nullcontext():
                        pretrain = lm_loss(model, lm_batch)
                        stop_if_not_finite(args.lm_coef * pretrain, {"lm_loss": pretrain}, method, step,
                                           checkpoint_path)
                        (args.lm_coef * pretrain / args.grad_accum).backward()
                    loss, parts = minillm_loss(args, model, teacher, *micro_batch, vocab_size)
                    parts = {**parts, "lm_loss": pretrain.detach(),
                             "total_loss": parts["total_loss"] + args.lm_coef * pretrain.detach()}
                else:
                    examples = micro_batch
                    batch = _to(teacher_forced_batch(tokenizer, [e.prompt for e in examples],
                                                     [e.response for e in examples], max_length=args.max_length),
                                device)
                    loss, parts = sft_loss(model, batch) if method == "sft" else kd_loss(
                        model, teacher, batch, args.temperature)
            stop_if_not_finite(loss, parts, method, step, checkpoint_path)
            with model.no_sync() if world > 1 and not last else contextlib.nullcontext():
                (loss / args.grad_accum).backward()
            for name, value in parts.items():
                parts_sum[name] = parts_sum.get(name, 0.0) + float(value) / len(micro_batches)
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), args.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:  # average the logged figures over the processes
            values = torch.tensor(list(parts_sum.values()), dtype=torch.float64, device=device)
            dist.all_reduce(values)
            parts_sum = dict(zip(parts_sum, (values / world).tolist()))
        step += 1
        if rank == 0:
            record = {"method": method, "step": step, "lr": scheduler.get_last_lr()[0],
                      "grad_norm": float(grad_norm), "seconds": time.time() - started, **parts_sum}
            log.write(json.dumps(record) + "\n")
            shown = "total_loss" if method == "minillm" else f"{method}_loss"
            bar.set_postfix({shown: f"{parts_sum[shown]:.4f}",
                             **({"reward": f"{parts_sum['reward']:.3f}"} if method == "minillm" else {})})
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            evaluate_student(step)
        if step % args.save_every == 0 or step == args.steps:
            checkpoint()
    if evaluated_at != args.steps:  # the same decision on every rank (history lives on rank 0 only)
        evaluate_student(args.steps)
        checkpoint()
    seconds = time.time() - started
    if world > 1:  # DDP keeps the replicas equal; check it (a per-tensor sum and sum of squares, gathered)
        fingerprint = torch.stack([torch.stack([p.double().sum(), p.double().square().sum()])
                                   for p in student.parameters()]).flatten()
        gathered = [torch.empty_like(fingerprint) for _ in range(world)]
        dist.all_gather(gathered, fingerprint)
        replica_difference = max(float((g - gathered[0]).abs().max()) for g in gathered)
        if rank == 0:
            log.write(json.dumps({"method": method, "step": step, "replica_max_difference": replica_difference}) + "\n")
    if rank == 0:
        save_model(student, tokenizer, out_dir / "student")
        log.close()
    return {"history": history, "seconds": seconds}


def _to(batch, device):
    return type(batch)(*(t.to(device) for t in batch))


def plot_curves(runs: dict[str, dict], path: Path) -> None:
    """Held-out exact match and Rouge-L (all tasks) against the step, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, metric, label in zip(axes, ("exact_match", "rouge_l"), ("exact match (%)", "Rouge-L")):
        for method, run in runs.items():
            points = [(h["step"], h["heldout"]["all"][metric]) for h in run["history"]]
            axis.plot(*zip(*points), marker="o", label=method)
        axis.set_xlabel("optimizer step")
        axis.set_ylabel(f"held-out {label}")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = init_distributed()
    torch.manual_seed(args.seed)
    teacher, tokenizer = load_teacher(args, device)
    data = load_data(args, tokenizer)
    out_dir = Path(args.out_dir)
    methods = METHODS if args.compare else (args.method,)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        for method in methods if args.compare else ():
            (out_dir / method).mkdir(exist_ok=True)
        print(f"teacher {args.teacher}, student {args.student}, data {args.data}: {len(data['labelled'])} gold pairs, "
              f"{len(data['prompts'])} prompts, {len(data['heldout'])} held-out; {world} process(es) on {device}; "
              f"kernels: {mk.available_backends()}", file=sys.stderr)
        teacher_scores = evaluate(teacher, tokenizer, data["heldout"], max_new_tokens=args.max_new_tokens,
                                  progress=True)
    if world > 1:
        dist.barrier()
    runs = {method: train(args, method, out_dir / method if args.compare else out_dir, teacher, tokenizer, data,
                          rank, world) for method in methods}
    if rank == 0:
        results = {"teacher": teacher_scores, "student (start)": runs[methods[0]]["history"][0]["heldout"]}
        results.update({f"student after {m}": runs[m]["history"][-1]["heldout"] for m in methods})
        table = markdown_table(results)
        times = ", ".join(f"{m} {runs[m]['seconds']:.0f} s" for m in methods)
        summary = (f"Held-out Rouge-L / exact match (%), {len(data['heldout'])} prompts, greedy; {args.steps} steps "
                   f"x {args.batch_size} sequences x {world} process(es), lr {args.lr:g}; training time: {times}.\n\n"
                   f"{table}\n")
        (out_dir / ("compare.md" if args.compare else "results.md")).write_text(summary)
        if args.compare:
            plot_curves(runs, out_dir / "compare.png")
        print("\n" + summary)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
