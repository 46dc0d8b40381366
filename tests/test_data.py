"""The tiny tasks (gold answers checked by an independent solver, the open tasks' validity rules against an
independent parser and hand-picked wrong answers), their splits, the teacher-answer cache, and the trainer's
batches."""
from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch

from minillm_kernels.training.config import parse_args
from minillm_kernels.training.data import (
    IGNORE_INDEX, Example, load_jsonl, load_texts, load_training_data, prompt_batch, prompts_fingerprint,
    teacher_forced_batch,
)
from minillm_kernels.sampling import position_ids_from_attention_mask
from minillm_kernels.training.tiny.tasks import (
    ADJECTIVES, ANSWER_CUE, CATEGORIES, NOUNS, OPEN_TASKS, PREPOSITIONS, TASKS, VERBS, is_valid, make_splits,
    sample_example,
)


def solve(prompt: str) -> str:
    """The answer of a tiny prompt, computed from its text alone."""
    assert prompt.endswith(ANSWER_CUE)
    head, _, body = prompt[: -len(ANSWER_CUE)].partition(": ")
    items = body.split()
    if head.startswith("Count from "):
        start, end, step = (int(x) for x in head.split()[2::2])
        return " " + " ".join(str(n) for n in range(start, end + 1, step))
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


def test_every_gold_task_answer_is_correct(fresh_seed):
    rng = random.Random(fresh_seed)  # (conftest's seed: a failure replays)
    for task in TASKS:
        for _ in range(200 if task not in OPEN_TASKS else 0):
            example = sample_example(task, rng)
            assert example.task == task and example.response == solve(example.prompt)


def parse_noun_phrase(words: list[str], at: int) -> int | None:
    """Recursive descent: the position after ``the [ADJECTIVE] NOUN`` at ``at``, or None."""
    if at >= len(words) or words[at] != "the":
        return None
    at += 1
    if at < len(words) and words[at] in ADJECTIVES:
        at += 1
    return at + 1 if at < len(words) and words[at] in NOUNS else None


def parses(words: list[str]) -> bool:
    """NP VERB NP [PREP NP], 6-10 words, by recursive descent."""
    at = parse_noun_phrase(words, 0)
    if at is None or at >= len(words) or words[at] not in VERBS:
        return False
    at = parse_noun_phrase(words, at + 1)
    if at is not None and at < len(words) and words[at] in PREPOSITIONS:
        at = parse_noun_phrase(words, at + 1)
    return at == len(words) and 6 <= len(words) <= 10


def right_answers(prompt: str) -> set[str] | None:
    """Every right answer of a pick or number prompt, enumerated from its text; None for the grammar tasks."""
    question = prompt[: -len(ANSWER_CUE)]
    if question.startswith("Pick two "):
        category, _, listed = question[len("Pick two "):].partition(": ")
        members = [w for w in listed.split() if w in CATEGORIES[category]]
        return {f" {a} {b}" for a in members for b in members if a != b}
    if " number between " in question:
        parity, _, _, low, _, high = question.split()
        return {f" {n}" for n in range(int(low) + 1, int(high)) if (n % 2 == 1) == (parity == "Odd")}
    return None


def test_open_task_checkers_accept_exactly_the_right_answers():
    """Gold answers pass; pick and number against every candidate answer of the lexicon (the enumerated right ones
    pass, no other); sentence and story against the recursive-descent parser on mutated gold answers (a word
    dropped, added, replaced or two swapped), which must also keep every asked word."""
    rng = random.Random(0)
    lexicon = sorted({w for words in CATEGORIES.values() for w in words} | set(NOUNS) | set(ADJECTIVES) | set(VERBS)
                     | set(PREPOSITIONS) | {"the", "."})
    checked = {task: [0, 0] for task in OPEN_TASKS}  # [accepted, rejected] candidates
    for task in OPEN_TASKS:
        for _ in range(100):
            example = sample_example(task, rng)
            assert is_valid(task, example.prompt, example.response), example
            expected = right_answers(example.prompt)
            if expected is not None:
                candidates = ([f" {n}" for n in range(0, 120)] + [f" 0{n}" for n in range(10)] if task == "number"
                              else [f" {a} {b}" for a in lexicon[::3] for b in lexicon[::2]] + list(expected))
                for candidate in candidates:
                    valid = is_valid(task, example.prompt, candidate)
                    assert valid == (candidate in expected), (example.prompt, candidate)
                    checked[task][not valid] += 1
                continue
            for _ in range(30):
                mutated = mutate(example.response, rng, lexicon)
                valid = is_valid(task, example.prompt, mutated)
                assert valid == independently_valid(example.prompt, mutated), (example.prompt, mutated)
                checked[task][not valid] += 1
    assert all(accepted > 100 and rejected > 100 for accepted, rejected in checked.values()), checked


def mutate(response: str, rng: random.Random, lexicon: list[str]) -> str:
    words = response.replace(".", " .").split()
    i, j = rng.randrange(len(words)), rng.randrange(len(words))
    change = rng.choice(("drop", "add", "replace", "swap", "none"))
    if change == "drop":
        del words[i]
    elif change == "add":
        words.insert(i, rng.choice(lexicon))
    elif change == "replace":
        words[i] = rng.choice(lexicon)
    elif change == "swap":
        words[i], words[j] = words[j], words[i]
    return " " + " ".join(words).replace(" .", ".")


def independently_valid(prompt: str, response: str) -> bool:
    """The sentence and story rules: parsed sentences (a story: 3 of them, each ended by a period) using every word
    the prompt asks for."""
    question = prompt[: -len(ANSWER_CUE)]
    asked = question.partition(": ")[2].split()
    if question.startswith("Sentence"):
        words = response.split()
        return response == " " + " ".join(words) and parses(words) and set(asked) <= set(words)
    sentences = [s.split() for s in response[:-1].split(".")] if response.endswith(".") else []
    return (len(sentences) == 3 and response == " " + " ".join(" ".join(s) + "." for s in sentences)
            and all(parses(s) for s in sentences) and set(asked) <= {w for s in sentences for w in s})


@pytest.mark.parametrize("task, question, wrong", [
    ("pick", "Pick two water: cat fish sun frog duck", [" fish", " fish fish", " fish sun", " fish crab", " fish frog duck",
                                                        "fish frog", " fish  frog", " Fish frog"]),
    ("number", "Even number between 24 and 41", [" 24", " 41", " 31", " 42", " 0", " 030", "30", " 30 32", " thirty"]),
    ("sentence", "Sentence using: frog king likes", [" the frog likes the cat", " the frog sees the king",
                                                     " the frog likes king", " frog likes the king the",
                                                     " the big frog likes the old king near the small tree cat",
                                                     " the frog likes the red cat", ""]),
    ("story", "Story using: cat moon tree", [" the cat sees the moon near the tree.",
                                             " the cat sees the moon. the old moon likes the cat. the tree likes the cat",
                                             " the cat sees the moon. the old moon likes the cat. the big dog likes the"
                                             " cat.", " the cat sees the red moon. the old moon likes the cat. the"
                                             " tree likes the cat the.", " the cat sees the red moon. the old moon"
                                             " likes the cat. the tree likes the cat. the dog sees the big cat."]),
])
def test_open_task_checkers_reject_wrong_answers(task, question, wrong):
    right = {"pick": " frog duck", "number": " 30", "sentence": " the king likes the small frog",
             "story": " the cat sees the red moon. the old moon likes the cat. the tree likes the happy cat."}[task]
    assert is_valid(task, question + ANSWER_CUE, right)
    for answer in wrong:
        assert not is_valid(task, question + ANSWER_CUE, answer), answer
    with pytest.raises(ValueError, match="open tasks"):
        is_valid("copy", "Repeat: cat\nA:", " cat")


def test_splits_are_seeded_disjoint_and_sized():
    splits = make_splits(prompts_per_task=30, heldout_per_task=10, seed=3)
    assert splits == make_splits(prompts_per_task=30, heldout_per_task=10, seed=3)
    assert splits != make_splits(prompts_per_task=30, heldout_per_task=10, seed=4)
    assert [len(splits[k]) for k in ("prompts", "heldout")] == [30 * len(TASKS), 10 * len(TASKS)]
    prompts = {k: {e.prompt for e in v} for k, v in splits.items()}
    assert not prompts["heldout"] & prompts["prompts"]
    for example in splits["prompts"] + splits["heldout"]:
        if example.task in OPEN_TASKS:
            assert is_valid(example.task, example.prompt, example.response)
        else:
            assert example.response == solve(example.prompt)


def tiny_data(*flags: str, seed: int = 0):
    """The tiny default's ``TrainingData`` under ``flags`` (the trainer's data flags), read as the trainer reads it."""
    return load_training_data(parse_args(list(flags)).data, seed=seed)


def test_the_validation_split_is_drawn_from_the_pool_fixed_by_its_seed_and_disjoint_from_training_and_test():
    """500 gold pairs of the tiny pool (a tenth), none a test prompt, all out of the training pool (4,500 left); the
    same split for every training seed and --pool-size, another with another --validation-seed; --validation-size 0:
    none."""
    data = tiny_data()
    pool, test = {e.prompt for e in data.pool}, {e.prompt for e in data.heldout}
    validation = [e.prompt for e in data.validation]
    assert len(validation) == len(set(validation)) == 500 and len(pool) == 4500
    assert not set(validation) & pool and not set(validation) & test
    assert all(e.response for e in data.validation) and {e.task for e in data.validation} == set(TASKS)
    assert set(validation) | pool == {e.prompt for e in make_splits()["prompts"]}  # drawn from the pool
    for same in (tiny_data(seed=1), tiny_data("--pool-size", "40")):
        assert same.validation == data.validation
    assert tiny_data("--pool-size", "40").pool == data.pool[:40]
    other = tiny_data("--validation-seed", "1")
    assert other.validation != data.validation and len(other.validation) == 500
    none = tiny_data("--validation-size", "0")
    assert none.validation == [] and len(none.pool) == 5000


def test_the_shipped_student_start_never_trained_on_the_default_validation_split():
    """The student start (scripts/make_tiny.py student-sft) trained on the pool without the default validation
    split, which chooses every run's checkpoint and the comparison's settings: its log names the prompts it left out,
    which must be that split's. (A start remade on the whole pool, or a changed split, fails here.)"""
    from minillm_kernels.training.tiny import CHECKPOINTS

    first = json.loads((CHECKPOINTS / "student-sft.log.jsonl").read_text().splitlines()[0])
    validation = tiny_data().validation
    assert first["unseen_validation"] == {"seed": 0, "prompts": len(validation),
                                          "sha256": prompts_fingerprint(validation)}
    assert prompts_fingerprint(validation[:-1]) != prompts_fingerprint(validation)


@pytest.mark.parametrize("split", ["heldout", "pool"])
def test_a_validation_split_that_shares_a_prompt_with_the_test_split_or_the_training_pool_is_refused(split):
    """A planted leak: one test (or training) prompt in the validation split is a ValueError naming the split."""
    data = tiny_data("--validation-size", "20")
    leaked = [*data.validation[:-1], getattr(data, split)[0]]
    name = "test" if split == "heldout" else "training"
    with pytest.raises(ValueError, match=f"1 validation prompt\\(s\\) are also {name} prompts"):
        dataclasses.replace(data, validation=leaked)


def test_unknown_task_is_rejected():
    with pytest.raises(ValueError, match="task must be one of"):
        sample_example("sort", random.Random(0))


@pytest.fixture(scope="module")
def tokenizer():
    from minillm_kernels.training.tiny.tokenizer import train_bpe_tokenizer

    corpus = make_splits(prompts_per_task=50, heldout_per_task=0, seed=1)["prompts"]
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


def test_null_response_and_task_are_missing_and_other_types_are_named(tmp_path):
    """"response": null is a prompt without a gold answer (never the text "None"), an error naming file:line where a
    response is required; "task": null groups the example under "all"; a number or a list is an error."""
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"prompt": "p1", "response": "r1"}) + "\n"
                    + json.dumps({"prompt": "p2", "response": None, "task": None}) + "\n")
    assert load_jsonl(path) == [Example("all", "p1", "r1"), Example("all", "p2", "")]
    with pytest.raises(ValueError, match=f"{path}:2: no 'response'"):
        load_jsonl(path, require_response=True)
    for field, value in (("response", 42), ("task", ["a"])):
        path.write_text(json.dumps({"prompt": "p1", field: value}) + "\n")
        with pytest.raises(ValueError, match=f"{path}:1: '{field}' must be a string, or null or left out"):
            load_jsonl(path)


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


def test_teacher_answers_are_cached_under_a_key_of_the_teacher_the_prompts_and_the_seed(tokenizer, tmp_path):
    """Generated once (sampled, seeded: the same answers again from a fresh cache), then read back; another seed,
    prompt list or teacher (one weight changed) is another key, never the stale file; ``cached_only`` without a file
    is an error."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from minillm_kernels.training.data import teacher_answers

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.5,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    teacher = LlamaForCausalLM(config).eval()
    examples = make_splits(prompts_per_task=2, heldout_per_task=0, seed=5)["prompts"]
    options = dict(max_new_tokens=6, cache_dir=tmp_path / "cache", batch_size=8)
    answers, meta = teacher_answers(teacher, tokenizer, examples, seed=0, **options)
    assert not meta["cached"] and meta["generated_tokens"] > len(examples) and meta["teacher_forward_tokens"] > 0
    assert [(e.task, e.prompt) for e in answers] == [(e.task, e.prompt) for e in examples]
    assert [e.response for e in answers] != [e.response for e in examples]
    files = list((tmp_path / "cache").iterdir())
    assert [f.name for f in files] == [meta["key"] + ".json"]
    again, cached = teacher_answers(teacher, tokenizer, examples, seed=0, **options)
    assert again == answers and cached["cached"] and cached["seconds"] == meta["seconds"]
    files[0].unlink()
    assert teacher_answers(teacher, tokenizer, examples, seed=0, **options)[0] == answers  # the seed fixes the samples
    other_seed, meta_seed = teacher_answers(teacher, tokenizer, examples, seed=1, **options)
    assert not meta_seed["cached"] and other_seed != answers
    assert not teacher_answers(teacher, tokenizer, examples[:-1], seed=0, **options)[1]["cached"]
    with torch.no_grad():
        teacher.model.norm.weight[0] += 1e-3
    assert not teacher_answers(teacher, tokenizer, examples, seed=0, **options)[1]["cached"]
    assert len(list((tmp_path / "cache").iterdir())) == 4
    with pytest.raises(FileNotFoundError, match="no cached teacher answers"):
        teacher_answers(teacher, tokenizer, examples, seed=2, cached_only=True, **options)
