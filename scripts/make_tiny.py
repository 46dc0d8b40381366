"""Build the ``tiny`` default once: tokenizer + teacher, then the student's SFT start.

    python scripts/make_tiny.py teacher       # tokenizer, then the teacher until it masters the tasks
    python scripts/make_tiny.py student-sft   # the student fine-tuned on the prompt pool's gold answers, but the
                                              # default validation split's (which chooses the comparison's settings)

Writes ``minillm_kernels/training/tiny/checkpoints/<name>/`` (float16 safetensors, config, tokenizer) and a log
``<name>.log.jsonl`` beside it (held-out scores, greedy and sampled at T=1, at every evaluation). The teacher
trains on a seeded stream of fresh examples (never a held-out prompt): it stands for a large model, far better
than the student. It stops when every task reaches ``--target`` on the held-out split (greedy exact match for a
gold task, validity for an open one), or at ``--max-steps``.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time

import torch
from tqdm.auto import tqdm

from minillm_kernels.training.config import DataConfig
from minillm_kernels.training.data import causal_lm_logits, prompts_fingerprint, teacher_forced_batch, validation_split
from minillm_kernels.training.evaluation import evaluate, markdown_table
from minillm_kernels.training.tiny import CHECKPOINTS, MAX_NEW_TOKENS, TASKS, tiny_checkers, tiny_config, tiny_splits
from minillm_kernels.training.tiny.tasks import sample_examples
from minillm_kernels.training.tiny.tokenizer import train_bpe_tokenizer

MAX_LENGTH = 64


def cosine_lr(step: int, *, peak: float, warmup: int, total: int) -> float:
    """Linear warm-up to ``peak``, then cosine decay to ``peak / 10`` at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def save(model, tokenizer, name: str) -> None:
    """float16 safetensors + config + tokenizer, written to a temp dir and renamed into place."""
    import shutil

    final, temporary = CHECKPOINTS / name, CHECKPOINTS / f".{name}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    copy.deepcopy(model).to(torch.float16).save_pretrained(temporary)  # the training copy stays float32
    tokenizer.save_pretrained(temporary)
    shutil.rmtree(final, ignore_errors=True)
    temporary.rename(final)


def task_score(scores: dict) -> float:
    """A task's headline figure: exact match for a gold task, validity for an open one."""
    return scores["valid"] if "valid" in scores else scores["exact_match"]


def train(model, tokenizer, next_examples, *, steps: int, lr: float, eval_every: int, heldout, log, save_as: str,
          target=None):
    """AdamW (betas 0.9/0.95, wd 0.1) on cross-entropy of the responses; held-out eval (greedy and sampled) and a
    checkpoint every ``eval_every`` steps (so a run stopped early keeps its last evaluated state)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    start, scores = time.time(), None
    bar = tqdm(range(steps), desc="train")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, peak=lr, warmup=100, total=steps)
        examples = next_examples()
        batch = teacher_forced_batch(
            tokenizer, [e.prompt for e in examples], [e.response for e in examples], max_length=MAX_LENGTH
        )
        logits = causal_lm_logits(model, batch.input_ids, batch.attention_mask)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            scores, sampled = (evaluate(model, tokenizer, heldout, max_new_tokens=MAX_NEW_TOKENS, checkers=tiny_checkers(),
                                        sample_seed=seed) for seed in (None, 0))
            log({"step": step + 1, "seconds": time.time() - start, "loss": loss.item(), "heldout": scores,
                 "heldout_sampled": sampled})
            save(model, tokenizer, save_as)
            if target is not None and all(task_score(scores[task]) >= target for task in TASKS):
                break
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=("teacher", "student-sft"))
    parser.add_argument("--max-steps", type=int, default=None, help="teacher: 2500; student-sft: 600")
    parser.add_argument("--batch-size", type=int, default=None, help="teacher: 64; student-sft: 32")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--target", type=float, default=95.0,
                        help="teacher: stop once every task has this greedy exact match (open tasks: validity) %%")
    parser.add_argument("--resume", action="store_true", help="teacher: train the saved teacher further")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from transformers import AutoTokenizer, LlamaForCausalLM

    splits = tiny_splits()
    heldout_prompts = frozenset(e.prompt for e in splits["heldout"])
    CHECKPOINTS.mkdir(parents=True, exist_ok=True)
    log_path = CHECKPOINTS / f"{args.name}.log.jsonl"
    log_file = open(log_path, "a" if args.resume else "w")

    def log(record: dict) -> None:
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()
        tqdm.write(f"step {record['step']}  {record['seconds']:.0f}s  loss {record['loss']:.4f}  " + "  ".join(
            f"{t} {task_score(record['heldout'][t]):.0f}/{task_score(record['heldout_sampled'][t]):.0f}" for t in TASKS))

    started = time.time()
    if args.name == "teacher":
        stream = random.Random(args.seed + 1)
        corpus = sample_examples(500, stream, exclude=heldout_prompts)  # (countup has 765 distinct prompts)
        if args.resume:  # more training of the saved teacher (float16 weights, fresh optimizer and stream)
            stream = random.Random(args.seed + 2)
            tokenizer = AutoTokenizer.from_pretrained(CHECKPOINTS / "teacher")
            model = LlamaForCausalLM.from_pretrained(CHECKPOINTS / "teacher", dtype=torch.float32)
        else:
            tokenizer = train_bpe_tokenizer([e.prompt + e.response for e in corpus])
            model = LlamaForCausalLM(tiny_config("teacher", len(tokenizer), tokenizer.eos_token_id))
        batch_size = args.batch_size or 64
        per_task = math.ceil(batch_size / len(TASKS))

        def next_examples():
            return sample_examples(per_task, stream, exclude=heldout_prompts)[:batch_size]

        scores = train(model, tokenizer, next_examples, steps=args.max_steps or 2500, lr=args.lr, eval_every=500,
                       heldout=splits["heldout"], log=log, save_as=args.name, target=args.target)
    else:
        tokenizer = AutoTokenizer.from_pretrained(CHECKPOINTS / "teacher")
        model = LlamaForCausalLM(tiny_config("student", len(tokenizer), tokenizer.eos_token_id))
        # the trainer's default validation split is unseen by the start, as by every run it chooses for
        split = DataConfig()
        validation, pool = validation_split(splits["prompts"], split.validation_size, split.validation_seed)
        unseen = {"seed": split.validation_seed, "prompts": len(validation), "sha256": prompts_fingerprint(validation)}
        log_file.write(json.dumps({"step": 0, "unseen_validation": unseen}) + "\n")
        batch_size, order = args.batch_size or 32, random.Random(args.seed)

        def next_examples():
            return order.sample(pool, batch_size)

        scores = train(model, tokenizer, next_examples, steps=args.max_steps or 600, lr=args.lr, eval_every=100,
                       heldout=splits["heldout"], log=log, save_as=args.name)
    print(f"{args.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
          f"{time.time() - started:.0f} s, written to {CHECKPOINTS / args.name}")
    print(markdown_table({args.name: scores}))


if __name__ == "__main__":
    main()
