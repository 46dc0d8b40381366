"""Evaluation of instruction following: greedy generation on held-out prompts, exact match and Rouge-L.

Rouge-L is the paper's metric. ``rouge_l`` is an exact longest-common-subsequence implementation of
the ``rouge-score`` package's ``rougeL`` F-measure with its default tokenizer (lower-cased runs of
[a-z0-9], no stemming); the tests check it against that package.
"""
from __future__ import annotations

import contextlib
import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Protocol

import torch

_NON_ALPHANUMERIC = re.compile(r"[^a-z0-9]+")


class PromptResponse(Protocol):
    task: str
    prompt: str
    response: str


def rouge_tokens(text: str) -> list[str]:
    """``rouge-score``'s default tokenization: lower-case, non-[a-z0-9] runs become spaces, split."""
    return _NON_ALPHANUMERIC.sub(" ", text.lower()).split()


def longest_common_subsequence(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of ``a`` and ``b`` (dynamic programming, O(len a * len b))."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """Rouge-L F-measure in [0, 1]: with L = LCS(prediction tokens, reference tokens),
    P = L / |prediction|, R = L / |reference|, F = 2PR / (P + R); 0 when either side has no token."""
    predicted, expected = rouge_tokens(prediction), rouge_tokens(reference)
    if not predicted or not expected:
        return 0.0
    common = longest_common_subsequence(predicted, expected)
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the two strings are equal after stripping surrounding whitespace, else 0.0."""
    return float(prediction.strip() == reference.strip())


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` in ``eval()`` mode (no dropout) inside the block; the previous mode of each of its modules is
    restored after (a wrapper's own flag, e.g. DDP's, says nothing about the model inside it)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


@torch.no_grad()
def greedy_responses(
    model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int = 64, progress: bool = False,
    synced_gpus: bool = False,
) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches, stopped at the tokenizer's EOS), decoded.

    ``synced_gpus``: ``generate``'s, every process of the ``torch.distributed`` group steps until all have finished
    (a model sharded by FSDP2 all-gathers its parameters in every forward pass: each process must call them all).
    """
    from tqdm.auto import tqdm

    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    device = next(model.parameters()).device
    responses: list[str] = []
    try:
        with eval_mode(model):
            for start in tqdm(range(0, len(prompts), batch_size), desc="eval", disable=not progress, leave=False):
                batch = tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True)
                generated = model.generate(
                    **batch.to(device), max_new_tokens=max_new_tokens, do_sample=False,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, synced_gpus=synced_gpus,
                )
                responses += tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1] :],
                                                    skip_special_tokens=True)
    finally:
        tokenizer.padding_side = padding_side
    return responses


def evaluate(
    model, tokenizer, examples: Sequence[PromptResponse], *, max_new_tokens: int, batch_size: int = 64,
    progress: bool = False, synced_gpus: bool = False,
) -> dict[str, dict[str, float]]:
    """Held-out scores per task and over all examples: ``{task: {"rouge_l": %, "exact_match": %}, "all": ...}``.

    Both are means over the examples, in percent (Rouge-L x 100, as the paper reports it). ``synced_gpus``: see
    ``greedy_responses``.
    """
    if not examples:
        raise ValueError("examples must not be empty")
    predictions = greedy_responses(
        model, tokenizer, [e.prompt for e in examples], max_new_tokens=max_new_tokens, batch_size=batch_size,
        progress=progress, synced_gpus=synced_gpus,
    )
    scores: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for example, prediction in zip(examples, predictions):
        pair = (rouge_l(prediction, example.response), exact_match(prediction, example.response))
        scores[example.task].append(pair)
        scores["all"].append(pair)
    return {
        task: {
            "rouge_l": 100 * sum(r for r, _ in pairs) / len(pairs),
            "exact_match": 100 * sum(e for _, e in pairs) / len(pairs),
        }
        for task, pairs in scores.items()
    }


def markdown_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """One markdown table: a row per model (``results``' keys), Rouge-L / EM columns per task, then "all"."""
    tasks = sorted({task for scores in results.values() for task in scores} - {"all"}) + ["all"]
    header = "| model | " + " | ".join(f"{task} R-L / EM" for task in tasks) + " |"
    lines = [header, "|---" * (len(tasks) + 1) + "|"]
    for name, scores in results.items():
        cells = [
            f"{scores[task]['rouge_l']:.1f} / {scores[task]['exact_match']:.1f}" if task in scores else "-"
            for task in tasks
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
