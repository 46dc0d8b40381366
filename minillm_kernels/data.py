"""Instruction data for the trainer: prompt/response examples, JSONL loading and the batches the losses take.

Teacher-forced batches (SFT, KD, the LM loss) are right-padded with labels -100 on the prompt and the
padding; prompt batches (rollouts, evaluation) are left-padded so that generation continues every row at
the same column. Position ids always come from the attention mask (``position_ids_from_attention_mask``),
so both paddings give a model the positions it was trained with.
"""
from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from minillm_kernels.sampling import position_ids_from_attention_mask

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding), as in torch's cross_entropy


class Example(NamedTuple):
    """One instruction example; ``response`` is "" where the gold answer is not available."""

    task: str
    prompt: str
    response: str


def jsonl_objects(path: str | Path) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line of a JSONL file.

    A line that is not valid JSON, or not a JSON object, is a ValueError naming ``path:line``.
    """
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: each line must be a JSON object, got {type(record).__name__}")
            yield number, record


def load_jsonl(path: str | Path, *, require_response: bool = False) -> list[Example]:
    """Examples from a JSONL file of objects with "prompt", optional "response" and optional "task" fields.

    A missing "response" (or "") marks a prompt without a gold answer; with ``require_response`` (held-out
    data, which is scored against it) it is a ValueError naming ``path:line``. A missing "task" groups the
    example under "all".
    """
    examples = []
    for number, record in jsonl_objects(path):
        if not isinstance(record.get("prompt"), str):
            raise ValueError(f"{path}:{number}: each line must be a JSON object with a string 'prompt' field")
        example = Example(str(record.get("task", "all")), record["prompt"], str(record.get("response", "")))
        if require_response and not example.response:
            raise ValueError(f"{path}:{number}: no 'response': every held-out example needs the answer it is "
                             "scored against")
        examples.append(example)
    return examples


def load_texts(path: str | Path) -> list[str]:
    """The "text" field of each line of a JSONL file of plain (pre-training) text; ValueError naming
    ``path:line`` for a line without a string "text"."""
    texts = []
    for number, record in jsonl_objects(path):
        if not isinstance(record.get("text"), str):
            raise ValueError(f"{path}:{number}: each line must be a JSON object with a string 'text' field")
        texts.append(record["text"])
    return texts


def causal_lm_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[batch, seq, V]`` logits of a Hugging Face causal LM, positions taken from the mask."""
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_attention_mask(attention_mask)).logits


class TeacherForcedBatch(NamedTuple):
    input_ids: torch.Tensor  # [batch, seq], right-padded with the pad id
    attention_mask: torch.Tensor  # [batch, seq], 1 on real tokens
    labels: torch.Tensor  # [batch, seq]: the next token at each position, IGNORE_INDEX where no loss


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer needs an EOS token (it ends every response)")
    return tokenizer.eos_token_id


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _eos_id(tokenizer)


def teacher_forced_batch(
    tokenizer, prompts: Sequence[str], responses: Sequence[str] | None, *, max_length: int
) -> TeacherForcedBatch:
    """Prompt + response + EOS, truncated to ``max_length`` tokens, right-padded.

    With ``responses`` the labels cover the response and its EOS (the SFT / KD target); with
    ``responses=None`` the prompts are plain text and every token but the first is a label (the LM loss).
    Labels are already shifted: ``labels[:, i]`` is the token that position ``i`` must predict.
    """
    if responses is not None and len(responses) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
    eos, pad = _eos_id(tokenizer), _pad_id(tokenizer)
    rows, targets = [], []
    for index, prompt in enumerate(prompts):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if responses is None:
            ids, first_target = prompt_ids + [eos], 1
        else:
            ids = prompt_ids + tokenizer(responses[index], add_special_tokens=False)["input_ids"] + [eos]
            first_target = len(prompt_ids)
        ids = ids[:max_length]
        rows.append(ids)
        # position i predicts ids[i + 1]; only targets at index >= first_target carry a loss
        targets.append([t if i + 1 >= first_target else IGNORE_INDEX for i, t in enumerate(ids[1:])] + [IGNORE_INDEX])
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, target) in enumerate(zip(rows, targets)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        labels[i, : len(ids)] = torch.tensor(target)
    return TeacherForcedBatch(input_ids, attention_mask, labels)


def prompt_batch(tokenizer, prompts: Sequence[str], *, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``(input_ids, attention_mask)`` of the prompts, each cut to its last ``max_length`` tokens."""
    pad = _pad_id(tokenizer)
    rows = [tokenizer(p, add_special_tokens=False)["input_ids"][-max_length:] for p in prompts]
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, width - len(ids) :] = torch.tensor(ids)
        attention_mask[i, width - len(ids) :] = 1
    return input_ids, attention_mask
