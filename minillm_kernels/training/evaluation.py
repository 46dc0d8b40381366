"""Evaluation of instruction following on held-out prompts: greedy or sampled generation, then per task either
the gold answer's scores (Rouge-L, exact match, calibration) or, for open tasks, a validity rule's (validity
rate, distinct-n); and the exposure-bias measure ExAccErr of the MiniLLM paper.

Rouge-L is the paper's metric. ``rouge_l`` is an exact longest-common-subsequence implementation of
the ``rouge-score`` package's ``rougeL`` F-measure with its default tokenizer (lower-cased runs of
[a-z0-9], no stemming); the tests check it against that package.

Sampling is at temperature 1 from the full distribution (top-k 0, top-p 1), seeded: the same seed gives the
same samples, and torch's global random state is left as it was.
"""
from __future__ import annotations

import contextlib
import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Optional, Protocol

import torch

from minillm_kernels.sampling import TeacherMixedSample
from minillm_kernels.training.data import causal_lm_logits

_NON_ALPHANUMERIC = re.compile(r"[^a-z0-9]+")
CALIBRATION_BINS = 10  # equal-width confidence bins of the expected calibration error
EXPOSURE_BIAS_LENGTH = 20  # l of ExAccErr(l): every response of the tiny default's long tasks has more tokens


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


def distinct_n(responses: Sequence[str], n: int) -> Optional[float]:
    """Distinct-n (Li et al., 2016): the number of different word n-grams over all ``responses`` divided by the
    number of n-grams (words: whitespace-separated), in [0, 1]; None if no response has n words."""
    grams = [tuple(words[i : i + n]) for words in map(str.split, responses) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[float],
                               bins: int = CALIBRATION_BINS) -> float:
    """ECE = sum_b (n_b / N) |accuracy_b - mean confidence_b| over ``bins`` equal-width confidence bins of [0, 1]
    (a confidence of exactly 1 in the last bin), in [0, 1]; NaN if a confidence is NaN (a broken model's)."""
    if len(confidences) != len(correct) or not confidences:
        raise ValueError(f"need as many confidences as correctness flags (and some), got {len(confidences)} and "
                         f"{len(correct)}")
    if any(math.isnan(c) for c in confidences):
        return math.nan
    binned: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for confidence, right in zip(confidences, correct):
        binned[min(int(confidence * bins), bins - 1)].append((confidence, right))
    return sum(abs(sum(c for c, _ in pairs) - sum(r for _, r in pairs)) for pairs in binned.values()) / len(correct)


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


@contextlib.contextmanager
def seeded(seed: Optional[int], device: torch.device) -> Iterator[None]:
    """torch's global random state set from ``seed`` inside the block and restored after (nothing if None)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, sample: bool,
             synced_gpus: bool = False) -> TeacherMixedSample:
    """Greedy (``sample=False``) or sampled (temperature 1, top-k 0, top-p 1) continuations of ``prompts``, one
    left-padded batch, stopped at the tokenizer's EOS, the model in eval() mode. ``synced_gpus``: ``generate``'s,
    every process of the ``torch.distributed`` group steps until all have finished (a model sharded by FSDP2
    all-gathers its parameters in every forward pass: each process must call them all). The sample's per-token
    log-probabilities and weights are None; its rows are padded after their first EOS, and ``response_mask`` is
    True up to and including it."""
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        batch = tokenizer(list(prompts), return_tensors="pt", padding=True).to(next(model.parameters()).device)
    finally:
        tokenizer.padding_side = padding_side
    sampling = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0} if sample else {"do_sample": False}
    with eval_mode(model):
        sequences = model.generate(**batch, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id, synced_gpus=synced_gpus, **sampling)
    prompt_length = batch["input_ids"].shape[1]
    is_eos = sequences[:, prompt_length:] == tokenizer.eos_token_id
    response_mask = (is_eos.long().cumsum(-1) - is_eos.long()) == 0  # no EOS before the token
    attention_mask = torch.cat([batch["attention_mask"], response_mask.long()], dim=1)
    return TeacherMixedSample(sequences, attention_mask, response_mask, prompt_length)


@torch.no_grad()
def response_log_probs(model, generation: TeacherMixedSample, vocab_size: int) -> torch.Tensor:
    """``[B, N, vocab_size]`` float32 log-distributions log q(. | prompt, y_<t) of ``model`` at each response position
    t (one forward pass over the sequences, in eval() mode)."""
    with eval_mode(model):
        logits = causal_lm_logits(model, generation.sequences, generation.attention_mask)
    return logits[:, generation.prompt_length - 1 : -1, :vocab_size].float().log_softmax(-1)


def generate_all(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, sample_seed: Optional[int] = None,
                 batch_size: int = 64, progress: bool = False, synced_gpus: bool = False) -> list[TeacherMixedSample]:
    """``generate`` over ``prompts`` in batches of ``batch_size``, in order: greedy if ``sample_seed`` is None, else
    sampled, torch's random state seeded with ``sample_seed`` before the first batch (and restored after)."""
    from tqdm.auto import tqdm

    with seeded(sample_seed, next(model.parameters()).device):
        return [generate(model, tokenizer, prompts[start : start + batch_size], max_new_tokens=max_new_tokens,
                         sample=sample_seed is not None, synced_gpus=synced_gpus)
                for start in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress,
                                  leave=False)]


def responses_and_confidences(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int,
                              sample_seed: Optional[int] = None, batch_size: int = 64, progress: bool = False,
                              synced_gpus: bool = False) -> tuple[list[str], list[float]]:
    """The decoded responses to ``prompts`` (``generate_all``) and each one's probability under the model,
    exp(sum_t log q(y_t | prompt, y_<t)) over its tokens and EOS."""
    vocab_size = min(len(tokenizer), model.get_output_embeddings().weight.shape[0])
    responses: list[str] = []
    confidences: list[float] = []
    for generation in generate_all(model, tokenizer, prompts, max_new_tokens=max_new_tokens, sample_seed=sample_seed,
                                   batch_size=batch_size, progress=progress, synced_gpus=synced_gpus):
        ids = generation.response_ids.clamp(max=vocab_size - 1)
        token_log_probs = response_log_probs(model, generation, vocab_size).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        confidences += torch.where(generation.response_mask, token_log_probs, 0.0).sum(-1).exp().tolist()
        responses += tokenizer.batch_decode(generation.response_ids, skip_special_tokens=True)
    return responses, confidences


Checker = Callable[[str, str], bool]  # (prompt, response) -> whether the response is a right answer


def evaluate(
    model, tokenizer, examples: Sequence[PromptResponse], *, max_new_tokens: int,
    checkers: Optional[Mapping[str, Checker]] = None, sample_seed: Optional[int] = None, batch_size: int = 64,
    progress: bool = False, synced_gpus: bool = False,
) -> dict[str, dict[str, float]]:
    """Held-out scores (``score_responses``) of the model's responses, greedy or sampled with ``sample_seed``
    (``responses_and_confidences``). ``synced_gpus``: see ``generate``."""
    if not examples:
        raise ValueError("examples must not be empty")
    responses, confidences = responses_and_confidences(
        model, tokenizer, [e.prompt for e in examples], max_new_tokens=max_new_tokens, sample_seed=sample_seed,
        batch_size=batch_size, progress=progress, synced_gpus=synced_gpus,
    )
    return score_responses(examples, responses, confidences, checkers)


def score_responses(examples: Sequence[PromptResponse], responses: Sequence[str],
                    confidences: Optional[Sequence[float]] = None,
                    checkers: Optional[Mapping[str, Checker]] = None) -> dict[str, dict[str, float]]:
    """The scores of ``responses`` to ``examples``' prompts, per task and per group, in percent.

    A task with a checker in ``checkers`` is open (many right answers): ``{"valid": % accepted, "distinct_1",
    "distinct_2": distinct-n of its responses x 100}``. Any other task is scored against its gold response:
    ``{"rouge_l": mean Rouge-L x 100 (as the paper reports it), "exact_match": %}``. Then the groups: "gold" (every
    gold-scored example; with ``confidences``, each response's probability, "ece": the expected calibration error x
    100 of the confidence that it is the gold one) and "open" (the open tasks' means), each present if it has a task.
    """
    checkers = checkers or {}
    by_task: dict[str, list[tuple[PromptResponse, str, Optional[float]]]] = defaultdict(list)
    for example, response, confidence in zip(examples, responses, confidences or [None] * len(examples)):
        by_task[example.task].append((example, response, confidence))
    scores: dict[str, dict[str, float]] = {}
    for task, rows in by_task.items():
        if task in checkers:
            scores[task] = {"valid": 100 * sum(checkers[task](e.prompt, r) for e, r, _ in rows) / len(rows)}
            for n in (1, 2):
                value = distinct_n([r for _, r, _ in rows], n)
                if value is not None:
                    scores[task][f"distinct_{n}"] = 100 * value
        else:
            scores[task] = {"rouge_l": 100 * sum(rouge_l(r, e.response) for e, r, _ in rows) / len(rows),
                            "exact_match": 100 * sum(exact_match(r, e.response) for e, r, _ in rows) / len(rows)}
    gold = [row for task, rows in by_task.items() if task not in checkers for row in rows]
    if gold:
        correct = [exact_match(r, e.response) for e, r, _ in gold]
        scores["gold"] = {"rouge_l": 100 * sum(rouge_l(r, e.response) for e, r, _ in gold) / len(gold),
                          "exact_match": 100 * sum(correct) / len(gold)}
        if confidences is not None:
            scores["gold"]["ece"] = 100 * expected_calibration_error([c for _, _, c in gold], correct)
    open_tasks = [scores[task] for task in by_task if task in checkers]
    if open_tasks:
        scores["open"] = {name: sum(s[name] for s in open_tasks if name in s) / sum(name in s for s in open_tasks)
                          for name in ("valid", "distinct_1", "distinct_2") if any(name in s for s in open_tasks)}
    return scores


@torch.no_grad()
def exposure_bias(student, teacher, tokenizer, prompts: Sequence[str], *, max_new_tokens: int,
                  length: int = EXPOSURE_BIAS_LENGTH, samples: int = 4, seed: int = 0,
                  batch_size: int = 64) -> dict[str, float]:
    """ExAccErr(l), the excess accumulated error of the MiniLLM paper (Gu et al., 2024, section 4.4, after Arora et
    al., 2022), at l = ``length``, in percent:

        ExAccErr(l) = (R(l) - l eps(l)) / (l eps(l)) x 100
        R(l)        = sum_{t=1}^{l} E_{y_<t ~ q(.|x)} [ KL(p(.|x, y_<t) || q(.|x, y_<t)) ]   (the student's own prefixes)
        l eps(l)    = sum_{t=1}^{l} E_{y_<t ~ p(.|x)} [ KL(p(.|x, y_<t) || q(.|x, y_<t)) ]   (the teacher's prefixes)

    with p the teacher, q the student, and E_{y_t ~ p} log p(y_t) / q(y_t) = KL(p || q) at each step. Each expectation
    is the mean over ``samples`` responses per prompt drawn at temperature 1 (seeded: the teacher's prefixes are
    the same for every student), over the samples whose response is still running at step t (a step past every
    sample's EOS adds 0), then averaged over ``prompts``. As the reference code (microsoft/LMOps
    ``minillm/evaluate_exposure_bias.py``), except that it starts at the second response token; here t = 1 is the
    first. ExAccErr > 0: the student's errors grow on its own prefixes beyond those on the teacher's.

    Returns ``{"ex_acc_err": %, "regret": R(l), "oracle_error": l eps(l)}`` (nats).
    """
    if not prompts or samples < 1 or length < 1:
        raise ValueError(f"need prompts, samples >= 1 and length >= 1; got {len(prompts)} prompts, samples={samples}, "
                         f"length={length}")
    vocab_size = min(len(tokenizer), student.get_output_embeddings().weight.shape[0],
                     teacher.get_output_embeddings().weight.shape[0])
    device = next(student.parameters()).device
    totals = {}
    for name, source in (("regret", student), ("oracle_error", teacher)):
        per_prompt = []
        for start in range(0, len(prompts), batch_size):
            batch = list(prompts[start : start + batch_size])
            error_sum = torch.zeros(len(batch), max_new_tokens, device=device)
            running = torch.zeros(len(batch), max_new_tokens, device=device)
            for sample in range(samples):
                generation, = generate_all(source, tokenizer, batch, max_new_tokens=max_new_tokens,
                                           sample_seed=seed * 1_000_003 + start * 1009 + sample, batch_size=len(batch))
                log_q = response_log_probs(student, generation, vocab_size)
                log_p = response_log_probs(teacher, generation, vocab_size)
                kl = (log_p.exp() * (log_p - log_q)).sum(-1)
                steps = kl.shape[1]
                error_sum[:, :steps] += torch.where(generation.response_mask, kl, 0.0)
                running[:, :steps] += generation.response_mask
            mean_error = torch.where(running > 0, error_sum / running.clamp(min=1), 0.0)
            per_prompt.append(mean_error[:, :length].sum(-1))
        totals[name] = float(torch.cat(per_prompt).mean())
    return {"ex_acc_err": 100 * (totals["regret"] - totals["oracle_error"]) / totals["oracle_error"], **totals}


def markdown_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """One markdown table: a row per model (``results``' keys), a column per task (Rouge-L / EM of gold tasks,
    validity / distinct-2 of open ones), then the "gold" and "open" groups."""
    groups = [group for group in ("gold", "open") if any(group in scores for scores in results.values())]
    tasks = sorted({task for scores in results.values() for task in scores} - set(groups)) + groups
    is_open = {task: any("valid" in scores.get(task, {}) for scores in results.values()) for task in tasks}

    def cell(scores: dict[str, float]) -> str:
        if "valid" in scores:
            return f"{scores['valid']:.1f} / " + (f"{scores['distinct_2']:.1f}" if "distinct_2" in scores else "-")
        return f"{scores['rouge_l']:.1f} / {scores['exact_match']:.1f}"

    header = "| model | " + " | ".join(f"{task} {'valid / D-2' if is_open[task] else 'R-L / EM'}" for task in tasks) + " |"
    lines = [header, "|---" * (len(tasks) + 1) + "|"]
    for name, scores in results.items():
        lines.append(f"| {name} | " + " | ".join(cell(scores[task]) if task in scores else "-" for task in tasks) + " |")
    return "\n".join(lines)
