"""Metrics against their definitions: LCS by brute force, Rouge-L against the rouge-score package, distinct-n and ECE
by hand, ExAccErr by enumeration; seeded generation; the scores of gold and open tasks."""
from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from minillm_kernels.training.evaluation import (
    distinct_n, evaluate, exact_match, expected_calibration_error, exposure_bias, longest_common_subsequence,
    markdown_table, responses_and_confidences, rouge_l, rouge_tokens,
)


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


def test_lcs_matches_brute_force(fresh_seed):
    rng = random.Random(fresh_seed)  # (conftest's seed: a failure replays)
    for _ in range(300):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 7))]
        b = [rng.choice("abcd") for _ in range(rng.randint(0, 7))]
        assert longest_common_subsequence(a, b) == brute_force_lcs(a, b), (a, b)


def test_rouge_l_matches_rouge_score_package(fresh_seed):
    """(rouge-score, a test extra, is imported here, not at the top: on a machine without it, such as the lent GPU
    machine, this test skips and the others of the file run.)"""
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer",
                                       reason="rouge-score is not installed: pip install 'minillm-kernels[test]'")

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rng = random.Random(fresh_seed)  # (conftest's seed: a failure replays)
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


def test_markdown_table_has_a_row_per_model_and_the_groups_last():
    scores = {"copy": {"rouge_l": 90.0, "exact_match": 80.0}, "gold": {"rouge_l": 90.0, "exact_match": 80.0},
              "pick": {"valid": 50.0, "distinct_1": 40.0, "distinct_2": 30.0}, "open": {"valid": 50.0}}
    table = markdown_table({"teacher": scores, "student": scores}).splitlines()
    assert table[0] == "| model | copy R-L / EM | pick valid / D-2 | gold R-L / EM | open valid / D-2 |"
    assert table[2] == "| teacher | 90.0 / 80.0 | 50.0 / 30.0 | 90.0 / 80.0 | 50.0 / - |" and len(table) == 4


def test_distinct_n_counts_different_word_n_grams():
    assert distinct_n([" cat dog", " cat dog", " dog cat"], 1) == pytest.approx(2 / 6)
    assert distinct_n([" cat dog", " cat dog", " dog cat"], 2) == pytest.approx(2 / 3)
    assert distinct_n([" the cat sees the cat"], 2) == pytest.approx(3 / 4)  # "the cat" twice
    assert distinct_n([" 30", " 32"], 2) is None and distinct_n([], 1) is None


def test_expected_calibration_error_known_values():
    assert expected_calibration_error([0.95, 0.95, 0.25, 0.25], [1, 1, 0, 0]) == pytest.approx((0.05 * 2 + 0.25 * 2) / 4)
    assert expected_calibration_error([1.0, 1.0], [0, 0]) == 1.0  # a confidence of 1 falls in the last bin
    # a calibrated bin: 4 answers at confidence 0.75, 3 right
    assert expected_calibration_error([0.75] * 4, [1, 1, 1, 0]) == pytest.approx(0.0)
    assert math.isnan(expected_calibration_error([0.5, math.nan], [1, 0]))
    with pytest.raises(ValueError, match="as many confidences"):
        expected_calibration_error([0.5], [])


@pytest.fixture(scope="module")
def tokenizer():
    from minillm_kernels.training.tiny.tasks import make_splits
    from minillm_kernels.training.tiny.tokenizer import train_bpe_tokenizer

    corpus = make_splits(prompts_per_task=20, heldout_per_task=0, seed=1)["prompts"]
    return train_bpe_tokenizer([e.prompt + e.response for e in corpus], vocab_size=300)


def random_llama(tokenizer, seed: int, scale: float):
    """A one-layer random Llama over the tokenizer's vocabulary; ``scale``: the weights' init std (large: peaked)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, initializer_range=scale,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config).eval()


def test_generation_is_seeded_and_leaves_the_global_random_state_alone(tokenizer):
    model = random_llama(tokenizer, seed=0, scale=0.5)
    prompts = ["Max: 1 2\nA:", "Repeat: cat dog sun\nA:", "Pick two food: egg\nA:"]
    state = torch.get_rng_state()
    first, again, other = (responses_and_confidences(model, tokenizer, prompts, max_new_tokens=6, sample_seed=seed)
                           for seed in (3, 3, 4))
    assert torch.equal(torch.get_rng_state(), state)
    assert first == again and first[0] != other[0]
    greedy, confidences = responses_and_confidences(model, tokenizer, prompts, max_new_tokens=6)
    assert greedy == responses_and_confidences(model, tokenizer, prompts, max_new_tokens=6)[0]
    assert all(0 < c <= 1 for c in confidences)


def test_evaluate_scores_gold_tasks_against_the_gold_and_open_tasks_by_their_checker(tokenizer):
    from minillm_kernels.training.data import Example

    model = random_llama(tokenizer, seed=0, scale=0.5)
    examples = [Example("copy", "Repeat: cat\nA:", " cat"), Example("pick", "Pick two food: egg rice\nA:", " egg rice"),
                Example("pick", "Pick two food: egg cake\nA:", " egg cake")]
    for accept in (True, False):
        scores = evaluate(model, tokenizer, examples, max_new_tokens=4, checkers={"pick": lambda p, r: accept})
        assert scores["pick"]["valid"] == scores["open"]["valid"] == (100.0 if accept else 0.0)
        assert set(scores["copy"]) == {"rouge_l", "exact_match"} and set(scores["gold"]) == {"rouge_l", "exact_match", "ece"}
    assert set(evaluate(model, tokenizer, examples, max_new_tokens=4)) == {"copy", "pick", "gold"}  # no checker


def test_exposure_bias_matches_its_definition_by_enumeration(tokenizer):
    """ExAccErr of a flat random student against a peaked random teacher, 2 response tokens: the step-1 and step-2
    parts of R(l) and l eps(l) against the exact expectations, enumerated over the first response token. t = 1: the
    prompt's KL(p || q), the same for both; t = 2: the mean of KL(p || q) after y_1 over y_1 ~ q (R), resp. y_1 ~ p
    (eps), given that y_1 is not EOS. (The samples are seeded. At t = 1 every sample sees the prompt alone, so l = 1
    is exact from one sample, and l = 2 less l = 1 is the step-2 part.)"""
    from minillm_kernels.training.data import causal_lm_logits

    student, teacher = random_llama(tokenizer, seed=1, scale=0.05), random_llama(tokenizer, seed=2, scale=1.0)
    prompts = ["Max: 1 2\nA:", "Repeat: cat dog sun\nA:"]

    def log_probs(model, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return causal_lm_logits(model, ids, torch.ones_like(ids))[:, -1].double().log_softmax(-1)

    def kl(log_p, log_q):
        return (log_p.exp() * (log_p - log_q)).sum(-1)

    first = second_regret = second_oracle = 0.0
    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        first_q, first_p = log_probs(student, ids)[0], log_probs(teacher, ids)[0]
        continued = torch.cat([ids.expand(len(tokenizer), -1), torch.arange(len(tokenizer)).unsqueeze(1)], dim=1)
        second = kl(log_probs(teacher, continued), log_probs(student, continued))  # [V]: KL at t = 2 after each y_1
        running = torch.arange(len(tokenizer)) != tokenizer.eos_token_id
        first += float(kl(first_p, first_q)) / len(prompts)
        second_regret += float((first_q.exp() * second)[running].sum() / first_q.exp()[running].sum()) / len(prompts)
        second_oracle += float((first_p.exp() * second)[running].sum() / first_p.exp()[running].sum()) / len(prompts)
    assert abs(second_regret - second_oracle) > 0.1 * second_oracle  # the prefixes' source matters here
    got = [exposure_bias(student, teacher, tokenizer, prompts, max_new_tokens=2, length=1, samples=1)]
    for name in ("regret", "oracle_error"):
        assert got[0][name] == pytest.approx(first, rel=1e-5)  # t = 1: exact, every sample is running
    got.append(exposure_bias(student, teacher, tokenizer, prompts, max_new_tokens=2, length=2, samples=64))
    assert got[1]["regret"] - got[0]["regret"] == pytest.approx(second_regret, rel=0.05)
    assert got[1]["oracle_error"] - got[0]["oracle_error"] == pytest.approx(second_oracle, rel=0.05)
    assert got[1]["ex_acc_err"] == pytest.approx(100 * (got[1]["regret"] - got[1]["oracle_error"]) / got[1]["oracle_error"])
