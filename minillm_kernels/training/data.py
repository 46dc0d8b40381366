"""Instruction data for the trainer: prompt/response examples, JSONL loading and the batches the losses take.

``teacher_answers`` caches the teacher's sampled answers (SeqKD's targets) on disk. Teacher-forced batches
(SFT, KD, the LM loss) are right-padded with labels -100 on the prompt and the
padding; prompt batches (rollouts, evaluation) are left-padded so that generation continues every row at
the same column. Position ids always come from the attention mask (``position_ids_from_attention_mask``),
so both paddings give a model the positions it was trained with.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Optional

import torch

from minillm_kernels.sampling import position_ids_from_attention_mask

if TYPE_CHECKING:
    from minillm_kernels.training.config import DataConfig

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding), as in torch's cross_entropy
VALIDATION_LIMIT = 500  # the default validation split: a tenth of the pool's gold pairs, at most this many


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

    A missing "response" (or null, or "") marks a prompt without a gold answer; with ``require_response``
    (held-out data, which is scored against it) it is a ValueError naming ``path:line``. A missing (or null)
    "task" groups the example under "all". A field of another type is a ValueError naming ``path:line``.
    """
    examples = []
    for number, record in jsonl_objects(path):
        if not isinstance(record.get("prompt"), str):
            raise ValueError(f"{path}:{number}: each line must be a JSON object with a string 'prompt' field")
        for name in ("response", "task"):
            if record.get(name) is not None and not isinstance(record[name], str):
                raise ValueError(f"{path}:{number}: '{name}' must be a string, or null or left out, got "
                                 f"{type(record[name]).__name__} {record[name]!r:.40}")
        task, response = record.get("task"), record.get("response")
        example = Example("all" if task is None else task, record["prompt"], "" if response is None else response)
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


@dataclasses.dataclass(frozen=True)
class TrainingData:
    """What a run trains and is evaluated on (``load_training_data``)."""

    pool: list[Example]  # the training prompts (the tiny default's all have a gold answer, a user's may lack one)
    pairs: list[Example]  # what teacher-forced methods train on: the pool's gold pairs, or the teacher's answers
    heldout: list[Example]  # the test split: scored only at the end, for the chosen checkpoint and the last one
    validation: list[Example]  # gold pairs drawn from the training pool (and no longer in it): what chooses
    lm: list[str]  # L_PT's pre-training text
    checkers: dict  # the open tasks' validity rules (tiny only)
    long_tasks: tuple[str, ...] = ()  # the tasks where ExAccErr is measured (tiny only)
    answers: Optional[dict] = None  # what the teacher's answers in ``pairs`` cost (``teacher_answers``' meta)

    def __post_init__(self) -> None:
        """ValueError if a validation prompt is also a test or a training prompt: a choice made on it would be made
        on the test set, or on what the methods trained on."""
        validation = {e.prompt for e in self.validation}
        for split, prompts in (("test", {e.prompt for e in self.heldout}), ("training", set(self.prompts))):
            shared = validation & prompts
            if shared:
                raise ValueError(f"{len(shared)} validation prompt(s) are also {split} prompts (e.g. "
                                 f"{min(shared)!r:.60}): the validation split must be disjoint from the test split "
                                 "and from the training pool")

    @property
    def prompts(self) -> list[str]:
        """Every pool prompt: the rollouts' and the teacher's answers'."""
        return [e.prompt for e in self.pool]

    @property
    def long_prompts(self) -> list[str]:
        """The held-out prompts of the long tasks."""
        return [e.prompt for e in self.heldout if e.task in self.long_tasks]


def validation_split(pool: list[Example], size: Optional[int], seed: int) -> tuple[list[Example], list[Example]]:
    """``(validation, training pool)``: ``size`` gold pairs of ``pool`` drawn with ``seed`` (default, None: a tenth of
    its gold pairs, at most ``VALIDATION_LIMIT``), and the pool without every example that has one of their prompts.
    The pool keeps its order, so that a seed's draws from it stay the same for every method. ValueError if the pool
    has fewer than ``size`` gold pairs."""
    labelled = [e for e in pool if e.response]
    size = min(VALIDATION_LIMIT, len(labelled) // 10) if size is None else size
    if size > len(labelled):
        raise ValueError(f"--validation-size {size}: the pool has only {len(labelled)} gold pairs to draw it from")
    validation = random.Random(seed).sample(labelled, size)
    prompts = {e.prompt for e in validation}
    return validation, [e for e in pool if e.prompt not in prompts]


def prompts_fingerprint(examples: Sequence[Example]) -> str:
    """The sha256 of ``examples``' prompts, sorted and joined by NUL: which prompts, in any order."""
    return hashlib.sha256("\0".join(sorted(e.prompt for e in examples)).encode()).hexdigest()


def load_training_data(config: DataConfig, *, seed: int, gold_answers_for: Sequence[str] = ()) -> TrainingData:
    """The prompt pool, its gold pairs, the validation and test (held-out) splits and the L_PT text of --data,
    --eval-data and --lm-data (the tiny default's splits, tasks' validity rules and long tasks for --data tiny), cut
    to --pool-size and --eval-size. Without --eval-data a user's data holds out 5% of its gold pairs (at least one)
    for the test split, drawn with ``seed``. The validation split is then drawn from the rest of the pool
    (``validation_split``, --validation-size and --validation-seed: the same for every training seed), before the
    pool is cut to --pool-size.

    Read before any model loads: SystemExit if the pool or the held-out split is empty, or if the pool has no gold
    pair and ``gold_answers_for`` (the names of the methods that train on them) is not empty; ValueError naming
    ``file:line`` for a malformed line (``load_jsonl``)."""
    heldout = load_jsonl(config.eval_data, require_response=True) if config.eval_data else None
    checkers, long_tasks = {}, ()
    if config.data == "tiny":
        from minillm_kernels.training.tiny import LONG_TASKS, tiny_checkers, tiny_splits  # (tiny imports this module)

        splits = tiny_splits()
        pool, heldout = splits["prompts"], heldout or splits["heldout"]
        checkers, long_tasks = tiny_checkers(), LONG_TASKS
    else:
        pool = load_jsonl(config.data)
        if heldout is None:
            labelled = [e for e in pool if e.response]
            if not labelled:
                raise SystemExit(f"{config.data}: no example has a response, and the held-out split is drawn from the "
                                 "gold pairs: pass --eval-data (held-out prompts with their responses)")
            heldout = random.Random(seed).sample(labelled, len(labelled))[: max(1, len(labelled) // 20)]
            pool = [e for e in pool if e not in set(heldout)]
    try:
        validation, pool = validation_split(pool, config.validation_size, config.validation_seed)
    except ValueError as error:
        raise SystemExit(f"{config.data}: {error}") from None
    pool, heldout = pool[: config.pool_size], heldout[: config.eval_size]
    if not pool:
        raise SystemExit(f"{config.data}: no training prompt (the pool is empty)")
    if not heldout:
        raise SystemExit(f"{config.eval_data}: no held-out example")
    if gold_answers_for and not any(e.response for e in pool):
        raise SystemExit(f"{config.data}: no example of the pool has a response, and these runs train on gold pairs "
                         f"(prompt and response): {', '.join(gold_answers_for)}. Give some responses, or train with a "
                         "method that trains on prompts only (on its own samples or on the teacher's answers)")
    lm = load_texts(config.lm_data) if config.lm_data else []
    return TrainingData(pool, [e for e in pool if e.response], heldout, validation, lm, checkers, long_tasks)


def with_chat_template(data: TrainingData, tokenizer) -> TrainingData:
    """``data`` whose pool, validation and test prompts are wrapped in the tokenizer's chat template (an instruct
    model's)."""
    def chat(example: Example) -> Example:
        message = [{"role": "user", "content": example.prompt}]
        return example._replace(prompt=tokenizer.apply_chat_template(message, tokenize=False,
                                                                      add_generation_prompt=True))

    pool = [chat(e) for e in data.pool]
    return dataclasses.replace(data, pool=pool, pairs=[e for e in pool if e.response],
                               heldout=[chat(e) for e in data.heldout], validation=[chat(e) for e in data.validation])


def causal_lm_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[batch, seq, V]`` logits of a Hugging Face causal LM, positions taken from the mask."""
    positions = position_ids_from_attention_mask(attention_mask)
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).logits


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


def cache_root() -> Path:
    """Where the project caches what it computes once (the teacher's answers, SmolLM2's weights): ``$MINILLM_CACHE``
    or ``~/.cache/minillm_kernels``."""
    return Path(os.environ.get("MINILLM_CACHE") or Path.home() / ".cache" / "minillm_kernels")


def cache_key(model: torch.nn.Module, prompts: Sequence[str], **settings) -> str:
    """A SHA-256 of ``model``'s weights (names, dtypes, shapes and bytes), the prompts and ``settings``: the key of
    what the model generated for them."""
    digest = hashlib.sha256(json.dumps({"prompts": list(prompts), **settings}, sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def teacher_answers(
    teacher, tokenizer, examples: Sequence[Example], *, seed: int, max_new_tokens: int, cache_dir: str | Path,
    batch_size: int = 64, progress: bool = False, cached_only: bool = False,
) -> tuple[list[Example], dict]:
    """The teacher's answer to each example's prompt, one each, sampled at temperature 1 from its full distribution
    (top-k 0, top-p 1) with ``seed``: SeqKD's targets (Kim and Rush, 2016; as the MiniLLM reference code's
    ``generate_data_seqkd.sh``), generated once and cached.

    The cache is ``cache_dir/<key>.json``, the key a hash of the teacher's weights, the prompts, the seed and the
    generation settings (the batches too: they set which random numbers each row draws) (``cache_key``): a changed
    teacher, prompt list, seed or length never reads a stale file. It is written to a temp file and renamed. ``cached_only``: FileNotFoundError instead of generating.

    Returns ``(examples with the teacher's responses, meta)``; ``meta`` holds what generating them cost, read from
    the cache file if it was there: ``{"key", "seconds", "teacher_forward_tokens" (prompt and response tokens the
    teacher ran on), "generated_tokens" (response tokens, EOS included), "cached" (read from the cache)}``.
    """
    from minillm_kernels.training.evaluation import generate_all  # (evaluation imports this module)

    prompts = [e.prompt for e in examples]
    settings = dict(seed=seed, max_new_tokens=max_new_tokens, temperature=1.0, top_k=0, top_p=1.0,
                    batch_size=batch_size, eos_token_id=tokenizer.eos_token_id, vocabulary=len(tokenizer))
    key = cache_key(teacher, prompts, **settings)
    path = Path(cache_dir) / f"{key}.json"
    if path.is_file():
        cached = json.loads(path.read_text(encoding="utf-8"))
        responses, meta = cached["responses"], {**cached["meta"], "cached": True}
    elif cached_only:
        raise FileNotFoundError(f"no cached teacher answers at {path}")
    else:
        started = time.time()
        generations = generate_all(teacher, tokenizer, prompts, max_new_tokens=max_new_tokens, sample_seed=seed,
                                   batch_size=batch_size, progress=progress)
        responses = [r for g in generations for r in tokenizer.batch_decode(g.response_ids, skip_special_tokens=True)]
        meta = {"key": key, "seconds": time.time() - started, "prompts": len(prompts),
                "teacher_forward_tokens": sum(int(g.attention_mask.sum()) for g in generations),
                "generated_tokens": sum(int(g.response_mask.sum()) for g in generations)}
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"{path.name}.tmp{os.getpid()}")
        temporary.write_text(json.dumps({"meta": meta, "settings": settings, "responses": responses}), encoding="utf-8")
        os.replace(temporary, path)
        meta = {**meta, "cached": False}
    if len(responses) != len(examples):
        raise ValueError(f"{path} holds {len(responses)} answers for {len(examples)} prompts: delete it")
    return [e._replace(response=r) for e, r in zip(examples, responses)], meta
