"""On-policy distillation (``--method opd``) and the served-teacher interface (minillm_kernels/training/teacher.py):
the sampled estimator's expected gradient is the exact per-token reverse KL's (by enumeration of every response);
the HTTP teacher, against a fake vLLM server on localhost, scores as the teacher in process; opd (both estimators)
and minillm at alpha 0 through the served teacher train as with the teacher in memory, no teacher loaded; the flags
that do not fit together are named."""
from __future__ import annotations

import contextlib
import importlib.util
import itertools
import json
import math
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers

import minillm_kernels as mk
from minillm_kernels.distributed import ModelRunner
from minillm_kernels.training.config import ModelConfig, parse_args
from minillm_kernels.training.data import causal_lm_logits
from minillm_kernels.training.methods import OPD
from minillm_kernels.training.models import load_teacher
from minillm_kernels.training.teacher import HTTPTeacher, InProcessTeacher

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 449  # the tiny tokenizer's
FAST = ["--pool-size", "40", "--validation-size", "10", "--threads", "1", "--batch-size", "8", "--max-new-tokens", "8",
        "--eval-every", "0", "--warmup-steps", "0", "--eval-samples", "0", "--eval-size", "4", "--steps", "3"]


def load_train():
    spec = importlib.util.spec_from_file_location("example_train_for_opd", ROOT / "examples" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TRAIN = load_train()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: a second intra-op thread only adds contention on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- the estimators, by enumeration

def tiny_gpt2(seed: int, vocab: int) -> transformers.GPT2LMHeadModel:
    """A float64 GPT-2 (every op in float64: Llama's RMSNorm would round to float32)."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=vocab, n_embd=8, n_layer=1, n_head=2, n_positions=8, bos_token_id=0,
                                     eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).double().eval()


def test_the_sampled_estimator_s_expected_gradient_is_the_exact_per_token_reverse_kl_s():
    """A float64 student and teacher over 4 tokens, every response of 3 tokens after a 2-token prompt (64 of them):
    sum_y q(y) d L_sampled(y) = sum_y q(y) d L_exact(y), with L_sampled = -mean_t exp(log q - log q_old)(y_t) A_t,
    A_t = log p(y_t) - log q_old(y_t), and L_exact = mean_t KL(q || p)_t at T = 0.8: E[(log q - log p)(y_t)
    d log q(y_t) | y_<t] = d KL_t, as E[d log q(y_t) | y_<t] = 0. Per response the two gradients differ (the sampled
    one is noisy); in expectation they agree to float64 rounding (a few 1e-16 per term, 64 terms: 1e-12)."""
    vocab, temperature = 4, 0.8
    student, teacher = tiny_gpt2(0, vocab), tiny_gpt2(1, vocab).requires_grad_(False)
    prompt = torch.tensor([[1, 2]])
    gradients = {}
    for estimator in ("sampled", "exact"):
        config = parse_args(["--method", "opd", "--opd-estimator", estimator, "--temperature", str(temperature)])
        method, run = OPD(config), SimpleNamespace(model=ModelRunner(student), vocab_size=vocab)
        expected = [torch.zeros_like(p) for p in student.parameters()]
        per_response = []
        for response in itertools.product(range(vocab), repeat=3):
            sequences = torch.cat([prompt, torch.tensor([response])], dim=1)
            sample = mk.TeacherMixedSample(sequences, torch.ones_like(sequences), torch.ones(1, 3, dtype=torch.bool),
                                           prompt.shape[1])
            with torch.no_grad():
                logprobs = [torch.log_softmax(mk.response_logits(model, sample) / temperature, -1)
                            .gather(-1, sample.response_ids.unsqueeze(-1)).squeeze(-1) for model in (student, teacher)]
                teacher_logits = mk.response_logits(teacher, sample)
            sample = mk.TeacherMixedSample(sequences, torch.ones_like(sequences), sample.response_mask,
                                           prompt.shape[1], *logprobs, torch.ones(1, 3, dtype=torch.float64))
            student.zero_grad()
            loss, _ = method.loss(run, (sample, None, teacher_logits, None))
            loss.backward()
            probability = float(logprobs[0].sum().exp())
            per_response.append(torch.cat([p.grad.flatten() for p in student.parameters()]))
            for total, parameter in zip(expected, student.parameters()):
                total += probability * parameter.grad
        gradients[estimator] = (torch.cat([g.flatten() for g in expected]), torch.stack(per_response))
    (sampled, sampled_each), (exact, exact_each) = gradients["sampled"], gradients["exact"]
    assert not torch.allclose(sampled_each, exact_each, rtol=0.1)
    assert exact.abs().max() > 1e-3
    torch.testing.assert_close(sampled, exact, rtol=0, atol=1e-12)


# ---- the served teacher: a fake vLLM server on localhost

def vllm_prompt_logprobs(model, tokens: list[int], top_k: int, shuffle: random.Random) -> list:
    """What vLLM's completions endpoint returns as ``prompt_logprobs`` for ``tokens`` (its raw, T = 1, logprobs):
    None, then per token j >= 1 a dict {str(id): {"logprob", "rank", "decoded_token"}} of the top ``top_k`` ids and
    token j with its rank when it is not among them; the entries in an arbitrary order."""
    ids = torch.tensor([tokens])
    with torch.no_grad():
        logprobs = torch.log_softmax(causal_lm_logits(model, ids, torch.ones_like(ids))[0, :-1].float(), -1)
    answer = [None]
    for j, row in enumerate(logprobs, start=1):
        order = row.argsort(descending=True).tolist()
        entries = {str(token): {"logprob": float(row[token]), "rank": rank, "decoded_token": "?"}
                   for rank, token in enumerate(order[:top_k], start=1)}
        entries.setdefault(str(tokens[j]), {"logprob": float(row[tokens[j]]), "rank": order.index(tokens[j]) + 1,
                                            "decoded_token": "?"})
        items = list(entries.items())
        shuffle.shuffle(items)
        answer.append(dict(items))
    return answer


@contextlib.contextmanager
def fake_vllm(model):
    """A server on localhost answering POST /v1/completions as vLLM does with prompt_logprobs (token-id prompts,
    max_tokens 1): yields its API root URL and the request bodies it got."""
    requests, shuffle = [], random.Random(0)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests.append(body)
            assert self.path == "/v1/completions" and body["max_tokens"] == 1 and body["temperature"] == 1.0
            choices = [{"index": i, "text": "x", "finish_reason": "length",
                        "prompt_logprobs": vllm_prompt_logprobs(model, prompt, body["prompt_logprobs"], shuffle)}
                       for i, prompt in enumerate(body["prompt"])]
            shuffle.shuffle(choices)
            data = json.dumps({"id": "cmpl-1", "object": "text_completion", "model": body["model"],
                               "choices": choices}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", requests
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def tiny_teacher():
    return load_teacher(ModelConfig(), torch.device("cpu"))


def test_the_http_teacher_scores_as_the_teacher_in_process(tiny_teacher):
    """Left-padded sequences (a rollout's), K = 5 < V: the HTTP client's top-k ids and log-probabilities and log p of
    each given token (often outside the top-k: vLLM adds it with its rank) equal the in-process teacher's at every
    position whose token is attended, from the position given on; one request, one unpadded prompt per row."""
    teacher, _ = tiny_teacher
    generator = torch.Generator().manual_seed(0)
    sequences = torch.randint(1, VOCAB, (3, 12), generator=generator)
    mask = torch.ones_like(sequences)
    mask[0, :4], mask[2, :2], mask[2, -3:] = 0, 0, 0  # left padding; row 2 ended early (padding after its EOS)
    first = 5
    local = InProcessTeacher(ModelRunner(teacher), 5, 1.0, VOCAB).score(sequences, mask, first)
    with fake_vllm(teacher) as (url, requests):
        served = HTTPTeacher(url, "tiny", 5).score(sequences, mask, first)
    assert len(requests) == 1 and requests[0]["prompt"][0] == sequences[0, 4:].tolist()
    scored = (mask[:, first:-1] * mask[:, first + 1 :]).bool()
    assert served.ids.shape == local.ids.shape == (3, 12 - 1 - first, 5)
    assert torch.equal(served.ids[scored], local.ids[scored])
    torch.testing.assert_close(served.logprobs[scored], local.logprobs[scored], rtol=0, atol=1e-5)
    torch.testing.assert_close(served.token_logprob[scored], local.token_logprob[scored], rtol=0, atol=1e-5)
    outside = ~(local.ids == sequences[:, first + 1 :, None]).any(-1) & scored
    assert outside.any()  # some given tokens were outside the top 5: their log p came from vLLM's extra entry


def test_a_server_that_is_not_there_or_answers_another_shape_is_named():
    with pytest.raises(ConnectionError, match=r"http://127.0.0.1:9/v1/completions: .*\(is the teacher served there\?"):
        HTTPTeacher("http://127.0.0.1:9/v1", "tiny", 4, timeout=5).score(torch.ones(1, 3, dtype=torch.long),
                                                                         torch.ones(1, 3, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="a served teacher's prompt log-probabilities are the model's raw ones"):
        HTTPTeacher("http://127.0.0.1:9/v1", "tiny", 4, temperature=0.7)


def steps(log: list[dict], *keys: str) -> list[tuple]:
    return [tuple(record[key] for key in keys) for record in log if "total_loss" in record]


@pytest.mark.parametrize("flags, keys, rollouts", [
    (["--method", "opd", "--opd-estimator", "sampled"], ("opd_loss", "reverse_kld", "grad_norm"), 3),
    (["--method", "opd", "--opd-estimator", "exact"], ("opd_loss", "grad_norm"), 3),
    (["--method", "minillm", "--alpha", "0"], ("pg_loss", "single_step_loss", "reward", "grad_norm"), 1),
    (["--method", "kd"], ("kd_loss", "reverse_kld", "grad_norm"), 3),
], ids=["opd-sampled", "opd-exact", "minillm-alpha-0", "kd"])
def test_training_through_the_served_teacher_equals_training_with_it_in_memory(tiny_teacher, tmp_path, monkeypatch,
                                                                                flags, keys, rollouts):
    """The same samples (the student samples alone: the draws of a teacher at alpha 0), the teacher's top-V and log p
    of the sampled tokens from the fake vLLM server (one request per rollout: opd's every step, minillm's every 4
    PPO epochs; kd's: its teacher-forced batch every step) instead of its dense logits: every logged figure of 3
    steps equals
    the in-memory run's up to the float32 log-softmax's error, 8 eps_32 (1 + log V) relative (the server's log p come
    from one forward pass over the whole sequence, the sampler's step by step with a KV cache); no teacher loaded,
    and the log line says where the teacher is."""
    teacher, _ = tiny_teacher
    memory = TRAIN.main([*FAST, *flags, "--out-dir", str(tmp_path / "memory")])
    memory = [json.loads(line) for line in (tmp_path / "memory" / "log.jsonl").read_text().splitlines()]
    monkeypatch.setattr(TRAIN, "load_teacher", lambda *args: pytest.fail("the teacher was loaded"))
    with fake_vllm(teacher) as (url, requests):
        TRAIN.main([*FAST, *flags, "--out-dir", str(tmp_path / "served"), "--teacher-server", url, "--teacher-top-k",
                    str(VOCAB)])
    served = [json.loads(line) for line in (tmp_path / "served" / "log.jsonl").read_text().splitlines()]
    assert len(requests) == rollouts and all(len(body["prompt"]) == 8 for body in requests)
    bound = 8 * torch.finfo(torch.float32).eps * (1 + math.log(VOCAB))
    assert len(steps(memory, *keys)) == 3
    for one, two in zip(steps(memory, *keys), steps(served, *keys)):
        assert one == pytest.approx(two, rel=bound, abs=bound)
    compute = next(r["trained"] for r in served if "trained" in r)["compute"]
    assert compute["teacher_forward_tokens"] == sum(sum(map(len, body["prompt"])) for body in requests)


@pytest.mark.parametrize("flags, words", [
    (["--method", "opd", "--teacher-server", "http://h/v1"], "--teacher-server: give --teacher-top-k K"),
    (["--method", "minillm", "--teacher-top-k", "8"], "--alpha 0.2 samples from the teacher mixture"),
    (["--method", "gkd", "--teacher-top-k", "8"], "--teacher-top-k is for --method kd, minillm, opd, not gkd"),
    (["--method", "opd", "--teacher-cache", "."], "--teacher-cache is for --method kd, seqkd, not opd"),
    (["--method", "opd", "--teacher-top-k", "8", "--fused-linear"], "--fused-linear reads the teacher's hidden"),
    (["--method", "opd", "--divergence", "jsd"], "--divergence is kd's and gkd's, not --method opd"),
])
def test_flags_that_do_not_fit_together_are_named(flags, words, capsys):
    with pytest.raises(SystemExit):
        parse_args(flags)
    assert words in capsys.readouterr().err
