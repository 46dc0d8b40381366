"""Metrics against their definitions: LCS by brute force, Rouge-L against the rouge-score package."""
from __future__ import annotations

import itertools
import random

import pytest
from rouge_score import rouge_scorer

from minillm_kernels.evaluation import exact_match, longest_common_subsequence, markdown_table, rouge_l, rouge_tokens


def brute_force_lcs(a: list[str], b: list[str]) -> int:
    """The longest subsequence of ``a`` (tried from the longest down) that is also a subsequence of ``b``."""
    def is_subsequence(sub, seq):
        remaining = iter(seq)
        return all(x in remaining for x in sub)

    for length in range(len(a), 0, -1):
        if any(is_subsequence(sub, b) for sub in itertools.combinations(a, length)):
            return length
    return 0


def random_text(rng: random.Random) -> str:
    words = ["cat", "Dog", "sun", "moon", "42", "7", "red-blue", "a.b", "", "!!"]
    return rng.choice(["", " ", "\n"]) + " ".join(rng.choice(words) for _ in range(rng.randint(0, 7)))


def test_lcs_matches_brute_force():
    rng = random.Random()
    for _ in range(300):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 7))]
        b = [rng.choice("abcd") for _ in range(rng.randint(0, 7))]
        assert longest_common_subsequence(a, b) == brute_force_lcs(a, b), (a, b)


def test_rouge_l_matches_rouge_score_package():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rng = random.Random()
    nonzero = 0
    for _ in range(500):
        prediction, reference = random_text(rng), random_text(rng)
        expected = scorer.score(reference, prediction)["rougeL"].fmeasure  # score(target, prediction)
        assert rouge_l(prediction, reference) == pytest.approx(expected, abs=1e-12), (prediction, reference)
        nonzero += expected > 0
    assert nonzero > 50  # the comparison exercised real overlaps, not only empty strings


def test_rouge_l_known_values():
    assert rouge_l(" moon fish red", "moon fish red") == 1.0
    assert rouge_l("red fish moon", "moon fish red") == pytest.approx(1 / 3)  # LCS 1 of 3 and 3
    assert rouge_l("", "moon") == 0.0
    assert rouge_tokens("Red-Blue a.b 42") == ["red", "blue", "a", "b", "42"]


def test_exact_match_strips_whitespace_only():
    assert exact_match(" 85\n", "85") == 1.0
    assert exact_match("8 5", "85") == 0.0
    assert exact_match("Cat", "cat") == 0.0


def test_markdown_table_has_a_row_per_model_and_all_column():
    scores = {"copy": {"rouge_l": 90.0, "exact_match": 80.0}, "all": {"rouge_l": 90.0, "exact_match": 80.0}}
    table = markdown_table({"teacher": scores, "student": scores}).splitlines()
    assert table[0] == "| model | copy R-L / EM | all R-L / EM |"
    assert table[2] == "| teacher | 90.0 / 80.0 | 90.0 / 80.0 |" and len(table) == 4
