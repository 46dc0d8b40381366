"""The ``tiny`` default's instruction data: seeded, templated tasks whose answers a rule can check.

Each task turns a ``random.Random`` into one ``Example(task, prompt, response)``. Prompts end with
``"\\nA:"`` and responses start with a space, so a response's words are the same BPE tokens as in the
prompt. Items are words from small lists and two-digit numbers, so that a 4-layer teacher can master
the tasks (sorting, tried earlier, stayed at 0%: it is not here). Lookup answered with the bare value
stayed near chance (about 20%) after 2,000 teacher steps; its answer restates the key, so that the
value is a copy of what follows "dog=" in the table.

Two kinds of task:

- **gold** tasks have one right answer (the response), scored against it (Rouge-L, exact match);
- **open** tasks have many right answers: the response is one of them, drawn at random, and
  ``is_valid(task, prompt, response)`` is the rule that accepts any of them (validity rate and
  distinct-n are their scores). A model that learnt the gold answers' distribution spreads its mass
  over several modes (two words of a category in either order, any even number of a range, any
  sentence of a small grammar).

``countup`` and ``story`` have long responses (24-36 and 21-33 tokens) where errors can accumulate
(exposure bias); the others answer in 1-8 tokens.

========  =========================================  ============================================  =====
task      prompt                                     a response                                    kind
========  =========================================  ============================================  =====
copy      ``Repeat: moon fish red\\nA:``              `` moon fish red``                            gold
reverse   ``Reverse: moon fish red\\nA:``             `` red fish moon``                            gold
count     ``Count cat: cat dog cat sun\\nA:``         `` 2``                                        gold
max       ``Max: 37 12 85\\nA:``                      `` 85``                                       gold
lookup    ``Lookup dog: cat=41 dog=73\\nA:``          `` dog=73``                                   gold
countup   ``Count from 14 to 28 by 2\\nA:``           `` 14 16 18 20 22 24 26 28``                  gold
pick      ``Pick two food: cat egg sun rice cake\\nA:``  `` cake egg`` (two of egg, rice, cake)      open
number    ``Even number between 24 and 41\\nA:``      `` 30`` (any even n, 24 < n < 41)             open
sentence  ``Sentence using: frog king likes\\nA:``    `` the king likes the small frog``            open
story     ``Story using: cat moon tree\\nA:``         3 sentences of the grammar, all three words   open
========  =========================================  ============================================  =====

The grammar of ``sentence`` and ``story``: ``NP VERB NP [PREP NP]`` with ``NP = the [ADJECTIVE] NOUN``,
6 to 10 words; a story is 3 such sentences, each ended by ``.``.

``make_splits`` draws the splits the default uses: ``prompts`` (the prompt pool every method trains on,
each prompt with a gold answer, which only the methods that train on gold answers use) and ``heldout``
(evaluation), with no prompt shared between them.
"""
from __future__ import annotations

import random
import re
from typing import Callable, NamedTuple, Optional

from minillm_kernels.training.data import Example

WORDS = (
    "cat", "dog", "sun", "moon", "red", "blue", "tree", "fish",
    "bird", "star", "rock", "leaf", "king", "frog", "milk", "rain",
)
COUNT_WORDS = WORDS[:4]  # a small set, so that counts of 0..8 all occur
CATEGORIES = {
    "water": ("fish", "frog", "crab", "seal", "duck"),  # "Pick two water: ..." (animals that live in water)
    "sky": ("sun", "moon", "star", "bird", "cloud"),
    "color": ("red", "blue", "green", "pink", "gray"),
    "food": ("milk", "bread", "rice", "egg", "cake"),
}
NOUNS = ("cat", "dog", "bird", "fish", "frog", "king", "tree", "moon", "star", "girl", "boy", "cow")
ADJECTIVES = ("red", "blue", "big", "small", "old", "happy")
VERBS = ("sees", "likes", "finds", "helps")
PREPOSITIONS = ("near", "under", "behind", "with")
SENTENCE_WORDS = (6, 10)  # words per sentence, both included
STORY_SENTENCES = 3
ANSWER_CUE = "\nA:"


def _words(rng: random.Random, low: int, high: int) -> list[str]:
    return [rng.choice(WORDS) for _ in range(rng.randint(low, high))]


def _copy(rng: random.Random) -> tuple[str, str]:
    items = " ".join(_words(rng, 3, 6))
    return f"Repeat: {items}", f" {items}"


def _reverse(rng: random.Random) -> tuple[str, str]:
    items = _words(rng, 3, 5)
    return f"Reverse: {' '.join(items)}", " " + " ".join(reversed(items))


def _count(rng: random.Random) -> tuple[str, str]:
    target = rng.choice(COUNT_WORDS)
    items = [rng.choice(COUNT_WORDS) for _ in range(rng.randint(4, 8))]
    return f"Count {target}: {' '.join(items)}", f" {items.count(target)}"


def _max(rng: random.Random) -> tuple[str, str]:
    numbers = [rng.randint(10, 99) for _ in range(rng.randint(3, 5))]
    return f"Max: {' '.join(map(str, numbers))}", f" {max(numbers)}"


def _lookup(rng: random.Random) -> tuple[str, str]:
    keys = rng.sample(WORDS, rng.randint(3, 5))
    values = [rng.randint(10, 99) for _ in keys]
    asked = rng.randrange(len(keys))
    table = " ".join(f"{key}={value}" for key, value in zip(keys, values))
    # the answer restates the key ("dog=73"), so that its value follows "dog=" as in the table
    return f"Lookup {keys[asked]}: {table}", f" {keys[asked]}={values[asked]}"


def _countup(rng: random.Random) -> tuple[str, str]:
    step, length = rng.choice((1, 2)), rng.randint(8, 12)
    start = rng.randint(10, 99 - step * (length - 1))
    numbers = range(start, start + step * length, step)
    return f"Count from {numbers[0]} to {numbers[-1]} by {step}", " " + " ".join(map(str, numbers))


def _pick(rng: random.Random) -> tuple[str, str]:
    category = rng.choice(tuple(CATEGORIES))
    members = rng.sample(CATEGORIES[category], rng.randint(3, 4))
    others = [word for name, words in CATEGORIES.items() if name != category for word in words]
    listed = members + rng.sample(others, 2)
    rng.shuffle(listed)
    return f"Pick two {category}: {' '.join(listed)}", " " + " ".join(rng.sample(members, 2))


def _number(rng: random.Random) -> tuple[str, str]:
    parity = rng.choice(("Even", "Odd"))
    low = rng.randint(10, 80)
    high = rng.randint(low + 8, min(99, low + 30))
    choices = [n for n in range(low + 1, high) if n % 2 == (parity == "Odd")]
    return f"{parity} number between {low} and {high}", f" {rng.choice(choices)}"


def _noun_phrase(rng: random.Random, noun: str, adjective: Optional[str] = None) -> list[str]:
    if adjective is None and rng.random() < 0.5:
        adjective = rng.choice(ADJECTIVES)
    return ["the", noun] if adjective is None else ["the", adjective, noun]


def _grammar_sentence(rng: random.Random, nouns: list[str], verb: str, adjective: Optional[str] = None) -> list[str]:
    """A sentence of the grammar (6-10 words) with every noun of ``nouns`` (1 or 2) as a noun phrase, the verb,
    and ``adjective`` (if given) on one of the noun phrases; the other slots drawn from ``rng``."""
    while True:
        slots = list(nouns) + [rng.choice(NOUNS) for _ in range(3 - len(nouns))]  # subject, object, PP noun
        rng.shuffle(slots)
        with_preposition = rng.random() < 0.5 or not set(nouns) <= set(slots[:2])
        phrases = slots if with_preposition else slots[:2]
        marked = rng.randrange(len(phrases)) if adjective else None
        built = [_noun_phrase(rng, noun, adjective if i == marked else None) for i, noun in enumerate(phrases)]
        words = [*built[0], verb, *built[1]] + ([rng.choice(PREPOSITIONS), *built[2]] if with_preposition else [])
        if SENTENCE_WORDS[0] <= len(words) <= SENTENCE_WORDS[1]:
            return words


def _sentence(rng: random.Random) -> tuple[str, str]:
    nouns, verb = rng.sample(NOUNS, 2), rng.choice(VERBS)
    adjective = rng.choice(ADJECTIVES) if rng.random() < 0.5 else None
    asked = " ".join(nouns + [verb] + ([adjective] if adjective else []))
    return f"Sentence using: {asked}", " " + " ".join(_grammar_sentence(rng, nouns, verb, adjective))


def _story(rng: random.Random) -> tuple[str, str]:
    nouns = rng.sample(NOUNS, STORY_SENTENCES)
    order = rng.sample(nouns, STORY_SENTENCES)  # each sentence is built around one of the listed nouns
    sentences = [" ".join(_grammar_sentence(rng, [noun], rng.choice(VERBS))) + "." for noun in order]
    return f"Story using: {' '.join(nouns)}", " " + " ".join(sentences)


class Task(NamedTuple):
    make: Callable[[random.Random], tuple[str, str]]  # (question, a gold answer)
    is_valid: Optional[Callable[[str, str], bool]] = None  # (question, response) -> bool; None: gold only


def _is_grammatical(words: list[str]) -> bool:
    """``NP VERB NP [PREP NP]`` with ``NP = the [ADJECTIVE] NOUN``, 6-10 words."""
    classes = "".join("D" if w == "the" else "A" if w in ADJECTIVES else "N" if w in NOUNS else "V" if w in VERBS
                      else "P" if w in PREPOSITIONS else "x" for w in words)
    return (SENTENCE_WORDS[0] <= len(words) <= SENTENCE_WORDS[1]
            and re.fullmatch(r"DA?NVDA?N(PDA?N)?", classes) is not None)


def _valid_pick(question: str, response: str) -> bool:
    head, _, listed = question.partition(": ")
    members = set(CATEGORIES[head.split()[-1]]) & set(listed.split())
    answer = response.split()
    return len(answer) == 2 and answer[0] != answer[1] and set(answer) <= members and response == " " + " ".join(answer)


def _valid_number(question: str, response: str) -> bool:
    parity, low, high = re.fullmatch(r"(Even|Odd) number between (\d+) and (\d+)", question).groups()
    if re.fullmatch(r" [1-9]\d*", response) is None:
        return False
    n = int(response)
    return int(low) < n < int(high) and n % 2 == (parity == "Odd")


def _valid_sentence(question: str, response: str) -> bool:
    asked, words = question.partition(": ")[2].split(), response.split()
    return response == " " + " ".join(words) and _is_grammatical(words) and set(asked) <= set(words)


def _valid_story(question: str, response: str) -> bool:
    if not response.startswith(" ") or not response.endswith("."):
        return False
    sentences = [part.split() for part in response[:-1].split(".")]
    if len(sentences) != STORY_SENTENCES or response != " " + " ".join(" ".join(s) + "." for s in sentences):
        return False
    nouns = question.partition(": ")[2].split()
    return all(map(_is_grammatical, sentences)) and set(nouns) <= {word for s in sentences for word in s}


TASKS: dict[str, Task] = {
    "copy": Task(_copy),
    "reverse": Task(_reverse),
    "count": Task(_count),
    "max": Task(_max),
    "lookup": Task(_lookup),
    "countup": Task(_countup),
    "pick": Task(_pick, _valid_pick),
    "number": Task(_number, _valid_number),
    "sentence": Task(_sentence, _valid_sentence),
    "story": Task(_story, _valid_story),
}
OPEN_TASKS = tuple(name for name, task in TASKS.items() if task.is_valid is not None)
LONG_TASKS = ("countup", "story")  # responses of 20 tokens and more: where ExAccErr is measured


def is_valid(task: str, prompt: str, response: str) -> bool:
    """Whether ``response`` is a right answer to ``prompt`` of the open task ``task`` (a key of ``OPEN_TASKS``)."""
    if task not in OPEN_TASKS:
        raise ValueError(f"task must be one of the open tasks {OPEN_TASKS}, got {task!r}")
    if not prompt.endswith(ANSWER_CUE):
        raise ValueError(f"a tiny prompt ends with {ANSWER_CUE!r}, got {prompt!r}")
    return TASKS[task].is_valid(prompt[: -len(ANSWER_CUE)], response)


def sample_example(task: str, rng: random.Random) -> Example:
    """One fresh example of ``task`` (a key of ``TASKS``) drawn from ``rng``."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {tuple(TASKS)}, got {task!r}")
    question, answer = TASKS[task].make(rng)
    return Example(task, question + ANSWER_CUE, answer)


def sample_examples(per_task: int, rng: random.Random, exclude: frozenset[str] = frozenset()) -> list[Example]:
    """``per_task`` examples of every task (interleaved), with distinct prompts none of which is in ``exclude``."""
    if per_task < 0:
        raise ValueError(f"per_task must be >= 0, got {per_task}")
    seen = set(exclude)
    by_task: dict[str, list[Example]] = {}
    for task in TASKS:
        drawn: list[Example] = []
        for _ in range(1000 * max(per_task, 1)):
            if len(drawn) == per_task:
                break
            example = sample_example(task, rng)
            if example.prompt not in seen:
                seen.add(example.prompt)
                drawn.append(example)
        else:
            raise RuntimeError(f"task {task!r} ran out of distinct prompts after {len(drawn)} of {per_task}")
        by_task[task] = drawn
    return [example for group in zip(*by_task.values()) for example in group]


def make_splits(*, prompts_per_task: int = 500, heldout_per_task: int = 50, seed: int = 0) -> dict[str, list[Example]]:
    """The ``tiny`` splits: ``heldout`` first, then the prompt pool ``prompts`` drawn apart from it.

    Every prompt comes with a gold answer (for the open tasks one right answer drawn at random). The same
    arguments always give the same splits.
    """
    rng = random.Random(seed)
    heldout = sample_examples(heldout_per_task, rng)
    prompts = sample_examples(prompts_per_task, rng, exclude=frozenset(e.prompt for e in heldout))
    return {"prompts": prompts, "heldout": heldout}
