"""The tiny tasks (answers checked by an independent solver), their splits, and the trainer's batches."""
from __future__ import annotations

import json
import random

import pytest

from minillm_kernels.data import IGNORE_INDEX, Example, load_jsonl, load_texts, prompt_batch, teacher_forced_batch
from minillm_kernels.sampling import position_ids_from_attention_mask
from minillm_kernels.tiny.tasks import ANSWER_CUE, TASKS, make_splits, sample_example


def solve(prompt: str) -> str:
    """The answer of a tiny prompt, computed from its text alone."""
    assert prompt.endswith(ANSWER_CUE)
    head, _, body = prompt[: -len(ANSWER_CUE)].partition(": ")
    items = body.split()
    if head == "Repeat":
        return " " + " ".join(items)
    if head == "Reverse":
        return " " + " ".join(items[::-1])
    if head.startswith("Count "):
        return f" {items.count(head.split()[1])}"
    if head == "Max":
        return f" {max(int(x) for x in items)}"
    if head.startswith("Lookup "):
        key = head.split()[1]
        return f" {key}=" + dict(item.split("=") for item in items)[key]
    raise AssertionError(f"unknown prompt {prompt!r}")


def test_every_task_answer_is_correct():
    rng = random.Random()
    for task in TASKS:
        for _ in range(200):
            example = sample_example(task, rng)
            assert example.task == task and example.response == solve(example.prompt)


def test_splits_are_seeded_disjoint_and_sized():
    splits = make_splits(labelled_per_task=20, prompts_per_task=30, heldout_per_task=10, seed=3)
    assert splits == make_splits(labelled_per_task=20, prompts_per_task=30, heldout_per_task=10, seed=3)
    assert splits != make_splits(labelled_per_task=20, prompts_per_task=30, heldout_per_task=10, seed=4)
    assert [len(splits[k]) for k in ("labelled", "prompts", "heldout")] == [20 * len(TASKS), 30 * len(TASKS), 10 * len(TASKS)]
    prompts = {k: {e.prompt for e in v} for k, v in splits.items()}
    assert not prompts["heldout"] & (prompts["labelled"] | prompts["prompts"])
    assert not prompts["labelled"] & prompts["prompts"]
    assert all(e.response == "" for e in splits["prompts"])
    assert all(e.response == solve(e.prompt) for e in splits["labelled"] + splits["heldout"])


def test_unknown_task_is_rejected():
    with pytest.raises(ValueError, match="task must be one of"):
        sample_example("sort", random.Random(0))


@pytest.fixture(scope="module")
def tokenizer():
    from minillm_kernels.tiny.tokenizer import train_bpe_tokenizer

    corpus = make_splits(labelled_per_task=50, prompts_per_task=0, heldout_per_task=0, seed=1)["labelled"]
    return train_bpe_tokenizer([e.prompt + e.response for e in corpus], vocab_size=300)


def test_tokenizer_round_trips_and_splits_digits(tokenizer):
    text = "Max: 37 12 85\nA: 85"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert all(len(token.strip("Ġ")) <= 1 for token in tokenizer.convert_ids_to_tokens(ids) if token.strip("Ġ").isdigit())
    assert len(tokenizer) <= 300 and tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"


def test_teacher_forced_batch_labels_are_the_shifted_response(tokenizer):
    prompts, responses = ["Repeat: cat dog\nA:", "Max: 37 12 85\nA:"], [" cat dog", " 85"]
    batch = teacher_forced_batch(tokenizer, prompts, responses, max_length=64)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        real = batch.attention_mask[row].bool()
        ids = batch.input_ids[row][real].tolist()
        assert tokenizer.decode(ids) == prompt + response + tokenizer.eos_token
        targets = batch.labels[row][batch.labels[row] != IGNORE_INDEX].tolist()
        assert tokenizer.decode(targets) == response + tokenizer.eos_token
        # position i predicts token i + 1
        first = int((batch.labels[row] != IGNORE_INDEX).nonzero()[0])
        assert batch.labels[row, first] == batch.input_ids[row, first + 1]
    lm = teacher_forced_batch(tokenizer, ["cat dog sun"], None, max_length=64)
    assert (lm.labels[0, :-1] == lm.input_ids[0, 1:]).all() and lm.labels[0, -1] == IGNORE_INDEX


def test_prompt_batch_left_pads_and_positions_start_at_zero(tokenizer):
    input_ids, attention_mask = prompt_batch(tokenizer, ["Max: 1 2 3\nA:", "Repeat: cat\nA:"], max_length=64)
    assert attention_mask[:, -1].all() and not attention_mask.all()
    positions = position_ids_from_attention_mask(attention_mask)
    for row in range(2):
        real = attention_mask[row].bool()
        assert positions[row][real].tolist() == list(range(int(real.sum())))
    assert tokenizer.decode(input_ids[1][attention_mask[1].bool()]) == "Repeat: cat\nA:"


def test_load_jsonl(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"prompt": "p1", "response": "r1", "task": "t"}) + "\n\n" + json.dumps({"prompt": "p2"}) + "\n")
    assert load_jsonl(path) == [Example("t", "p1", "r1"), Example("all", "p2", "")]
    path.write_text(json.dumps({"response": "r"}) + "\n")
    with pytest.raises(ValueError, match="'prompt' field"):
        load_jsonl(path)


def test_jsonl_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"prompt": "p1", "response": "r1"}) + "\n\n" + '{"prompt": "p2", "response": }\n')
    with pytest.raises(ValueError, match=f"{path}:3: not valid JSON"):
        load_jsonl(path)
    path.write_text(json.dumps({"prompt": "p1", "response": "r1"}) + "\n" + json.dumps(["p2"]) + "\n")
    with pytest.raises(ValueError, match=f"{path}:2: each line must be a JSON object, got list"):
        load_jsonl(path)
    path.write_text(json.dumps({"prompt": "p1", "response": "r1"}) + "\n" + json.dumps({"prompt": "p2"}) + "\n")
    assert len(load_jsonl(path)) == 2  # training data: a prompt-only row is a prompt for MiniLLM's rollouts
    with pytest.raises(ValueError, match=f"{path}:2: no 'response'"):  # held-out data is scored against it
        load_jsonl(path, require_response=True)


def test_load_texts(tmp_path):
    path = tmp_path / "lm.jsonl"
    path.write_text(json.dumps({"text": "cat dog"}) + "\n\n" + json.dumps({"text": "sun"}) + "\n")
    assert load_texts(path) == ["cat dog", "sun"]
    path.write_text(json.dumps({"text": "cat dog"}) + "\n" + json.dumps({"prompt": "sun"}) + "\n")
    with pytest.raises(ValueError, match=f"{path}:2: each line must be a JSON object with a string 'text' field"):
        load_texts(path)
    path.write_text('{"text": "cat\n')
    with pytest.raises(ValueError, match=f"{path}:1: not valid JSON"):
        load_texts(path)
