"""Teacher-mixed sampling: the mixture it draws from, the numbers it records, EOS/padding, and HF models."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import transformers  # a declared test extra: a missing one must fail, not skip

import minillm_kernels as mk

WIDE = 1e4  # logits for the padding columns past vocab_size: any leak would dominate the draws


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: a second intra-op thread only adds contention (10x slower on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class FixedLogitsLM(torch.nn.Module):
    """A causal LM with the Hugging Face interface (the 4.x ``past_key_values`` keyword) whose next-token
    logits are the same at every position. Its "cache" counts the tokens seen, so that the test fails
    if the sampler does not hand the cache back or sends a mask of the wrong length."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("next_logits", logits)

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None):
        seen = 0 if past_key_values is None else past_key_values
        assert attention_mask.shape[1] == seen + input_ids.shape[1] and position_ids.shape == input_ids.shape
        logits = self.next_logits.expand(input_ids.shape[0], input_ids.shape[1], -1)
        return SimpleNamespace(logits=logits, past_key_values=seen + input_ids.shape[1])


def prompts(batch: int, length: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of different lengths (row 0 is padded by 2)."""
    ids = torch.randint(0, 8, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :2] = 0
    return ids, mask


def slow_filtered_probs(logits: list[float], temperature: float, top_k: int, top_p: float) -> list[float]:
    """softmax(logits / T) restricted to the top-k, then to the smallest top set reaching top_p, renormalised."""
    scaled = [x / temperature for x in logits]
    order = sorted(range(len(scaled)), key=lambda v: -scaled[v])
    kept = order[:top_k] if top_k else order
    total = sum(math.exp(scaled[v]) for v in kept)
    nucleus, mass = [], 0.0
    for v in kept:
        if mass >= top_p:
            break
        nucleus.append(v)
        mass += math.exp(scaled[v]) / total
    total = sum(math.exp(scaled[v]) for v in nucleus)
    return [math.exp(scaled[v]) / total if v in nucleus else 0.0 for v in range(len(logits))]


def within_bound(frequency: torch.Tensor, expected: torch.Tensor, draws: int) -> torch.Tensor:
    """|f - pi| <= 5 standard errors per token (and f = 0 where pi = 0): a false alarm has p < 1e-5."""
    return (frequency - expected).abs() <= 5 * (expected * (1 - expected) / draws).sqrt()


SETTINGS = [  # (temperature, top_k, top_p)
    (1.0, 0, 1.0),  # the reference code's defaults
    (0.7, 5, 1.0),
    (1.3, 0, 0.8),
    (1.0, 4, 0.9),
]


@pytest.mark.parametrize("temperature, top_k, top_p", SETTINGS)
@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.7, 1.0])
def test_draws_follow_the_mixture_and_record_its_weights(alpha, temperature, top_k, top_p):
    vocab = 8
    student_logits = torch.randn(vocab, dtype=torch.float64) * 1.5
    teacher_logits = -student_logits + torch.randn(vocab, dtype=torch.float64) * 0.5  # far from the student
    student = FixedLogitsLM(torch.cat([student_logits, torch.full((1,), WIDE, dtype=torch.float64)]))  # width 9
    teacher = FixedLogitsLM(torch.cat([teacher_logits, torch.full((3,), WIDE, dtype=torch.float64)]))  # width 11
    rows, steps = 2000, 10
    sample = mk.sample_teacher_mixed(student, teacher, *prompts(rows), alpha=alpha, max_new_tokens=steps,
                                     temperature=temperature, top_k=top_k, top_p=top_p, vocab_size=vocab)
    assert sample.response_mask.all() and sample.response_ids.shape == (rows, steps)

    q_f = torch.tensor(slow_filtered_probs(student_logits.tolist(), temperature, top_k, top_p), dtype=torch.float64)
    p_f = torch.tensor(slow_filtered_probs(teacher_logits.tolist(), temperature, top_k, top_p), dtype=torch.float64)
    mixture = alpha * p_f + (1 - alpha) * q_f
    draws = rows * steps
    frequency = torch.bincount(sample.response_ids.flatten(), minlength=vocab).double() / draws
    assert frequency.shape == (vocab,), "a padding column past vocab_size was sampled"
    assert within_bound(frequency, mixture, draws).all(), (frequency, mixture)
    if alpha > 0:  # the bound can fail: the student alone is far outside it, and vice versa
        assert not within_bound(q_f, mixture, draws).all()
    if alpha < 1:
        assert not within_bound(p_f, mixture, draws).all()

    ids = sample.response_ids
    torch.testing.assert_close(sample.importance_weight, (q_f / mixture)[ids], rtol=1e-12, atol=0)
    if alpha == 0:
        assert (sample.importance_weight == 1).all()
    log_q = torch.log_softmax(student_logits[:vocab] / temperature, -1)  # unfiltered, at the temperature
    log_p = torch.log_softmax(teacher_logits[:vocab] / temperature, -1)
    torch.testing.assert_close(sample.student_logprob, log_q[ids], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sample.teacher_logprob, log_p[ids], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("alpha, support", [(0.0, range(0, 4)), (1.0, range(4, 8))])
def test_alpha_0_samples_only_the_student_and_alpha_1_only_the_teacher(alpha, support):
    inf = math.inf
    student = FixedLogitsLM(torch.tensor([0.5, 0.0, -0.3, 0.2, -inf, -inf, -inf, -inf]))
    teacher = FixedLogitsLM(torch.tensor([-inf, -inf, -inf, -inf, 0.1, 0.4, -0.2, 0.0]))
    sample = mk.sample_teacher_mixed(student, teacher, *prompts(200), alpha=alpha, max_new_tokens=5)
    assert torch.isin(sample.response_ids, torch.tensor(list(support))).all()
    if alpha == 0:
        assert (sample.importance_weight == 1).all() and torch.isfinite(sample.student_logprob).all()
    else:  # teacher tokens the student gives no mass: w = q / p~ = 0, log q = -inf
        assert (sample.importance_weight == 0).all() and (sample.student_logprob == -inf).all()


def test_eos_ends_each_row_and_the_loop_stops_when_all_rows_have():
    eos_ids, pad = [2, 5], 7
    logits = torch.log(torch.tensor([0.2, 0.2, 0.15, 0.15, 0.1, 0.15, 0.05, 0.0]))  # stop w.p. 0.3 per step
    model = FixedLogitsLM(logits)
    ids, prompt_mask = prompts(64)
    sample = mk.sample_teacher_mixed(model, model, ids, prompt_mask, max_new_tokens=200, eos_token_id=eos_ids,
                                     pad_token_id=pad)
    response = sample.response_ids
    is_eos = torch.isin(response, torch.tensor(eos_ids)) & sample.response_mask
    assert (is_eos.sum(-1) == 1).all(), "every row ends with exactly one counted EOS"
    first_eos = is_eos.int().argmax(-1)
    positions = torch.arange(response.shape[1])
    torch.testing.assert_close(sample.response_mask, positions <= first_eos.unsqueeze(-1))
    assert response.shape[1] == int(first_eos.max()) + 1 < 200, "the loop stops once every row has ended"
    after = ~sample.response_mask
    assert (response[after] == pad).all()
    for name in ("student_logprob", "teacher_logprob", "importance_weight"):
        assert (getattr(sample, name)[after] == 0).all(), name
    assert (sample.importance_weight[sample.response_mask] == 1).all()  # same model twice: w = 1
    torch.testing.assert_close(sample.attention_mask, torch.cat([prompt_mask, sample.response_mask.long()], -1))
    torch.testing.assert_close(sample.sequences[:, :4], ids)


def test_length_one_responses_and_max_new_tokens():
    always_eos = FixedLogitsLM(torch.tensor([-math.inf, 0.0, -math.inf]))
    sample = mk.sample_teacher_mixed(always_eos, always_eos, *prompts(3), max_new_tokens=6, eos_token_id=1)
    assert sample.response_ids.tolist() == [[1]] * 3 and sample.response_mask.all()
    assert (sample.student_logprob == 0).all() and (sample.importance_weight == 1).all()

    never_eos = FixedLogitsLM(torch.zeros(5))
    sample = mk.sample_teacher_mixed(never_eos, never_eos, *prompts(3), max_new_tokens=6, eos_token_id=None)
    assert sample.response_ids.shape == (3, 6) and sample.response_mask.all()
    torch.testing.assert_close(sample.student_logprob, torch.full((3, 6), -math.log(5)))


@pytest.mark.parametrize(
    "change, words",
    [
        (dict(alpha=1.5), "alpha"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=0.0), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(eos_token_id="x"), "eos_token_id"),
        (dict(right_padded=True), "left-padded"),
        (dict(teacher_width=6), "vocab_size"),
        (dict(teacher_width=6, vocab_size=6), "vocab_size"),
    ],
)
def test_bad_arguments_are_named(change, words):
    ids, mask = prompts(2)
    if change.pop("right_padded", False):
        mask = mask.flip(-1)
    student = FixedLogitsLM(torch.zeros(5))
    teacher = FixedLogitsLM(torch.zeros(change.pop("teacher_width", 5)))
    kwargs = dict(max_new_tokens=3) | change
    with pytest.raises(ValueError, match=words):
        mk.sample_teacher_mixed(student, teacher, ids, mask, **kwargs)


# ---- stock Hugging Face models: KV caches, left padding, padded vocabularies, a fresh forward pass ----


def tiny_hf_pair():
    """A GPT-2 student (40 logit columns) and a Llama teacher (44), float64, for a 37-token vocabulary."""
    student = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=40, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                bos_token_id=0, eos_token_id=3)
    )
    teacher = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(vocab_size=44, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, bos_token_id=0, eos_token_id=3)
    )
    return student.double().eval(), teacher.double().eval().requires_grad_(False)  # a frozen teacher


def test_hf_models_logprobs_equal_a_fresh_forward_pass():
    student, teacher = tiny_hf_pair()
    vocab, temperature, alpha = 37, 0.8, 0.2
    prompt_ids = torch.randint(4, vocab, (4, 7))
    prompt_mask = torch.ones(4, 7, dtype=torch.long)
    for row, padding in enumerate([3, 0, 5, 1]):
        prompt_mask[row, :padding] = 0
        prompt_ids[row, :padding] = 0
    sample = mk.sample_teacher_mixed(student, teacher, prompt_ids, prompt_mask, alpha=alpha, max_new_tokens=12,
                                     temperature=temperature, eos_token_id=3, vocab_size=vocab)
    mask, response = sample.response_mask, sample.response_ids
    assert (response[mask] < vocab).all()

    # The padded batch in one forward pass, positions counting attended tokens only.
    for model, recorded in ((student, sample.student_logprob), (teacher, sample.teacher_logprob)):
        positions = (sample.attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=sample.sequences, attention_mask=sample.attention_mask, position_ids=positions).logits
        logits = logits[:, prompt_ids.shape[1] - 1 : -1, :vocab] / temperature
        fresh = torch.log_softmax(logits, -1).gather(-1, response.clamp(max=vocab - 1).unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(recorded[mask], fresh[mask], rtol=0, atol=1e-10)

    # Each row alone, unpadded: left padding changed nothing.
    for row in range(4):
        tokens = torch.cat([prompt_ids[row][prompt_mask[row].bool()], response[row][mask[row]]]).unsqueeze(0)
        logits = student(input_ids=tokens).logits[0, -int(mask[row].sum()) - 1 : -1, :vocab] / temperature
        alone = torch.log_softmax(logits, -1).gather(-1, response[row][mask[row]].unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(sample.student_logprob[row][mask[row]], alone, rtol=0, atol=1e-10)

    # What the trainer computes on the rollout: the fused per-token terms at the same temperature.
    stats = mk.fused_token_stats(mk.response_logits(student, sample), mk.response_logits(teacher, sample), response,
                                 mask=mask, temperature=temperature, mix_alpha=alpha, vocab_size=vocab,
                                 backend="reference")
    for name in ("student_logprob", "teacher_logprob", "importance_weight"):
        torch.testing.assert_close(getattr(stats, name).detach(), getattr(sample, name), rtol=0, atol=1e-10)

    # The same from hidden states and the output layers (the trainer's --fused-linear), GPT-2 and Llama alike.
    fused = mk.fused_linear_token_stats(
        *(x for model in (student, teacher)
          for x in (mk.response_hidden_states(model, sample), model.get_output_embeddings().weight)),
        response, mask=mask, temperature=temperature, mix_alpha=alpha, vocab_size=vocab, backend="reference",
    )
    for name in mk.TokenStats._fields[:-1]:
        torch.testing.assert_close(getattr(fused, name).detach(), getattr(stats, name).detach(), rtol=0, atol=1e-10)


def test_hf_sampling_is_reproducible_with_a_generator():
    student, teacher = tiny_hf_pair()
    prompt_ids, prompt_mask = prompts(3)
    runs = [
        mk.sample_teacher_mixed(student, teacher, prompt_ids, prompt_mask, max_new_tokens=6, vocab_size=37,
                                generator=torch.Generator().manual_seed(11))
        for _ in range(2)
    ]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert torch.equal(runs[0].importance_weight, runs[1].importance_weight)


def test_without_a_teacher_the_student_samples_alone_the_same_draws_as_at_alpha_0():
    """teacher=None (a served teacher scores afterwards): the sequences and log q of a teacher at alpha = 0 with the
    same generator (the mixture is then q_f exactly), w_t = 1 on every response token, no log p; alpha > 0 refused."""
    student, teacher = tiny_hf_pair()
    prompt_ids, prompt_mask = prompts(3)
    options = dict(alpha=0.0, max_new_tokens=6, vocab_size=37, eos_token_id=3, temperature=0.9, top_k=3, top_p=0.9)
    with_teacher, alone = (mk.sample_teacher_mixed(student, model, prompt_ids, prompt_mask,
                                                   generator=torch.Generator().manual_seed(5), **options)
                           for model in (teacher, None))
    assert torch.equal(alone.sequences, with_teacher.sequences) and alone.teacher_logprob is None
    assert torch.equal(alone.student_logprob, with_teacher.student_logprob)
    assert torch.equal(alone.importance_weight, alone.response_mask.double())
    with pytest.raises(ValueError, match="alpha = 0.2 samples from the teacher, but teacher is None"):
        mk.sample_teacher_mixed(student, None, prompt_ids, prompt_mask, **{**options, "alpha": 0.2})


@pytest.mark.parametrize("bad_id", (-1, 37 + 3, 10**6))
def test_prompt_ids_outside_either_embedding_are_named(bad_id):
    student, teacher = tiny_hf_pair()  # input embeddings of 40 and 44 rows
    ids, mask = prompts(2)
    ids[1, 2] = bad_id
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 40\) \(the student's input embedding rows\)"):
        mk.sample_teacher_mixed(student, teacher, ids, mask, max_new_tokens=2)


@pytest.mark.parametrize("pad_token_id, words", [(-100, r"pad_token_id \(or None\) must be an int in \[0, inf\]"),
                                                 (40, r"pad_token_id must lie in \[0, 40\) \(the student's"),
                                                 (10**6, r"pad_token_id must lie in \[0, 40\) \(the student's")])
def test_a_pad_token_id_outside_either_embedding_is_named(pad_token_id, words):
    """The pad id fills a row after its EOS and is fed to both models: it must be a row of both embeddings."""
    student, teacher = tiny_hf_pair()  # input embeddings of 40 and 44 rows
    ids, mask = prompts(2)
    with pytest.raises(ValueError, match=words):
        mk.sample_teacher_mixed(student, teacher, ids, mask, max_new_tokens=2, eos_token_id=3,
                                pad_token_id=pad_token_id, vocab_size=37)


def test_an_empty_batch_is_named():
    student, teacher = tiny_hf_pair()
    with pytest.raises(ValueError, match=r"input_ids holds no prompt \(shape \(0, 5\)\): give at least one"):
        mk.sample_teacher_mixed(student, teacher, torch.zeros(0, 5, dtype=torch.long),
                                torch.ones(0, 5, dtype=torch.long), max_new_tokens=2)


def test_a_temperature_whose_reciprocal_overflows_the_compute_dtype_is_named():
    """1e-39: 1 / T overflows float32 (the logits' compute dtype) but not float64, where sampling goes on."""
    student, teacher = tiny_hf_pair()
    ids, mask = prompts(2)
    with pytest.raises(ValueError, match=r"temperature must be >= 2.93873\d*e-39 for logits computed in float32 .*"
                                         r"got 1e-39"):
        mk.sample_teacher_mixed(student.float(), teacher.float(), ids, mask, max_new_tokens=2, vocab_size=37,
                                temperature=1e-39)
    sample = mk.sample_teacher_mixed(student.double(), teacher.double(), ids, mask, max_new_tokens=2, vocab_size=37,
                                     temperature=1e-39)
    assert sample.student_logprob.isfinite().all()


def test_wrapped_models_still_get_logits_to_keep(tmp_path):
    """Through DistributedDataParallel and torch.compile (whose forward takes **kwargs), response_logits still asks
    for the response positions' logits only: the same logits, and the model's forward saw logits_to_keep."""
    import torch.distributed as dist

    student, teacher = tiny_hf_pair()
    ids, mask = prompts(2)
    sample = mk.sample_teacher_mixed(student, teacher, ids, mask, max_new_tokens=3, vocab_size=37)
    want = mk.response_logits(student, sample)
    seen = []
    student.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs.get("logits_to_keep")),
                                      with_kwargs=True)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for wrapped in (torch.nn.parallel.DistributedDataParallel(student), torch.compile(student)):
            assert "logits_to_keep" in mk.sampling.forward_parameters(wrapped)
            seen.clear()
            got = mk.response_logits(wrapped, sample)
            length, new_tokens = sample.sequences.shape[1], sample.response_mask.shape[1]
            assert seen and all(k.tolist() == list(range(length - new_tokens - 1, length - 1)) for k in seen)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    finally:
        dist.destroy_process_group()
