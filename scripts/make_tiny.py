"""Build the ``tiny`` default once: tokenizer + teacher, then the student's SFT start.

    python scripts/make_tiny.py teacher       # tokenizer, then the teacher until it masters the tasks
    python scripts/make_tiny.py student-sft   # the student fine-tuned on the labelled split only

Writes ``minillm_kernels/tiny/checkpoints/<name>/`` (float16 safetensors, config, tokenizer) and a log
``<name>.log.jsonl`` beside it. The teacher trains on a seeded stream of fresh examples (never a
held-out prompt): it stands for a large model, far better than the student's few gold answers. It
stops when every task reaches ``--target-em`` exact match on the held-out split, or at ``--max-steps``.
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

from minillm_kernels.data import causal_lm_logits, teacher_forced_batch
from minillm_kernels.evaluation import evaluate, markdown_table
from minillm_kernels.tiny import CHECKPOINTS, MAX_NEW_TOKENS, TASKS, tiny_config, tiny_splits
from minillm_kernels.tiny.tasks import sample_examples
from minillm_kernels.tiny.tokenizer import train_bpe_tokenizer

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


def train(model, tokenizer, next_examples, *, steps: int, lr: float, eval_every: int, heldout, log, save_as: str,
          target_em=None):
    """AdamW (betas 0.9/0.95, wd 0.1) on cross-entropy of the responses; held-out eval and a checkpoint
    every ``eval_every`` steps (so a run stopped early keeps its last evaluated state)."""
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
            scores = evaluate(model, tokenizer, heldout, max_new_tokens=MAX_NEW_TOKENS)
            log({"step": step + 1, "seconds": time.time() - start, "loss": loss.item(), "heldout": scores})
            save(model, tokenizer, save_as)
            if target_em is not None and all(s["exact_match"] >= target_em for s in scores.values()):
                break
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=("teacher", "student-sft"))
    parser.add_argument("--max-steps", type=int, default=None, help="teacher: 3000; student-sft: 600")
    parser.add_argument("--batch-size", type=int, default=None, help="teacher: 64; student-sft: 32")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--target-em", type=float, default=95.0, help="teacher: stop once every task has this EM %%")
    parser.add_argument("--resume", action="store_true", help="teacher: train the saved teacher further")
    parser.add_argument("--threads", type=int, default=2)
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
        tqdm.write(f"step {record['step']}  {record['seconds']:.0f}s  loss {record['loss']:.4f}  "
                   + "  ".join(f"{t} {s['exact_match']:.0f}" for t, s in record["heldout"].items()))

    started = time.time()
    if args.name == "teacher":
        stream = random.Random(args.seed + 1)
        corpus = sample_examples(2000, stream, exclude=heldout_prompts)
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

        scores = train(model, tokenizer, next_examples, steps=args.max_steps or 3000, lr=args.lr, eval_every=250,
                       heldout=splits["heldout"], log=log, save_as=args.name, target_em=args.target_em)
    else:
        tokenizer = AutoTokenizer.from_pretrained(CHECKPOINTS / "teacher")
        model = LlamaForCausalLM(tiny_config("student", len(tokenizer), tokenizer.eos_token_id))
        batch_size, labelled, order = args.batch_size or 32, splits["labelled"], random.Random(args.seed)

        def next_examples():
            return order.sample(labelled, batch_size)

        scores = train(model, tokenizer, next_examples, steps=args.max_steps or 600, lr=args.lr, eval_every=100,
                       heldout=splits["heldout"], log=log, save_as=args.name)
    print(f"{args.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
          f"{time.time() - started:.0f} s, written to {CHECKPOINTS / args.name}")
    print(markdown_table({args.name: scores}))


if __name__ == "__main__":
    main()
