"""The ``tiny`` default's instruction data: seeded, templated tasks whose answers can be checked.

Each task turns a ``random.Random`` into one ``Example(task, prompt, response)``. Prompts end with
``"\\nA:"`` and responses start with a space, so a response's words are the same BPE tokens as in the
prompt. Items are words from a small list and two-digit numbers, so every item is one or a few tokens
and a 4-layer teacher can master the tasks (sorting, tried earlier, stayed at 0%: it is not here).
Lookup answered with the bare value stayed near chance (about 20%) after 2,000 teacher steps; its
answer now restates the key, so that the value is a copy of what follows "dog=" in the table.

=========  ======================================  ===========
task       prompt                                  response
=========  ======================================  ===========
copy       ``Repeat: moon fish red\\nA:``           `` moon fish red``
reverse    ``Reverse: moon fish red\\nA:``          `` red fish moon``
count      ``Count cat: cat dog cat sun\\nA:``      `` 2``
max        ``Max: 37 12 85\\nA:``                   `` 85``
lookup     ``Lookup dog: cat=41 dog=73\\nA:``      `` dog=73``
=========  ======================================  ===========

``make_splits`` draws the three splits the default uses: ``labelled`` (prompt + gold response: the
student's SFT data), ``prompts`` (prompts only, answers dropped: what distillation may add) and
``heldout`` (evaluation), with no prompt shared between held-out and the training splits.
"""
from __future__ import annotations

import random
from typing import Callable

from minillm_kernels.data import Example

WORDS = (
    "cat", "dog", "sun", "moon", "red", "blue", "tree", "fish",
    "bird", "star", "rock", "leaf", "king", "frog", "milk", "rain",
)
COUNT_WORDS = WORDS[:4]  # a small set, so that counts of 0..8 all occur


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


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "copy": _copy,
    "reverse": _reverse,
    "count": _count,
    "max": _max,
    "lookup": _lookup,
}
ANSWER_CUE = "\nA:"


def sample_example(task: str, rng: random.Random) -> Example:
    """One fresh example of ``task`` (a key of ``TASKS``) drawn from ``rng``."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {tuple(TASKS)}, got {task!r}")
    question, answer = TASKS[task](rng)
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


def make_splits(
    *, labelled_per_task: int = 100, prompts_per_task: int = 2000, heldout_per_task: int = 50, seed: int = 0
) -> dict[str, list[Example]]:
    """The ``tiny`` splits: ``heldout`` first, then ``labelled`` and ``prompts`` drawn apart from it.

    ``prompts`` keeps only the prompts (``response`` is ""): prompts are cheap, gold answers are not.
    The same arguments always give the same splits.
    """
    rng = random.Random(seed)
    heldout = sample_examples(heldout_per_task, rng)
    labelled = sample_examples(labelled_per_task, rng, exclude=frozenset(e.prompt for e in heldout))
    taken = frozenset(e.prompt for e in heldout + labelled)
    prompts = [e._replace(response="") for e in sample_examples(prompts_per_task, rng, exclude=taken)]
    return {"labelled": labelled, "prompts": prompts, "heldout": heldout}
