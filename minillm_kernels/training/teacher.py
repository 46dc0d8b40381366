"""The teacher as a scoring function (the served-teacher interface): token sequences in, per position the teacher's
top-k next-token log-probabilities and the log-probability of the token that follows, out. With it the trainer holds
K numbers per token of the teacher, never a ``[tokens x V]`` teacher tensor, and the teacher may live elsewhere.

    SparseTeacher     the teacher at each position: top-k ids and log-probabilities [..., K], log p of the given
                      token [...], and (the offline cache) the tail's log-mass [...]
    ScoringTeacher    the interface: ``score(sequences, attention_mask, first) -> SparseTeacher``
    InProcessTeacher  over a Hugging Face causal LM in this process (the loaded --teacher, with --teacher-top-k)
    HTTPTeacher       a served teacher (--teacher-server): vLLM's OpenAI-compatible completions with prompt_logprobs
    sparse_scores     logits -> SparseTeacher: what the in-process teacher returns and the offline cache stores

The log-probabilities are normalised over the teacher's full vocabulary (the top-k of log_softmax(t / T)), as
``mk.fused_sparse_divergence`` and ``mk.fused_sparse_token_stats`` take them (their ``tail=`` completes the rest);
``sparse_response_divergence`` and ``sparse_response_token_stats`` are those on an on-policy sample.

The HTTP shape (vLLM's completions endpoint; ``prompt_logprobs`` is vLLM's extension of the OpenAI API)::

    POST {url}/completions
    {"model": NAME, "prompt": [[id, ...], ...], "max_tokens": 1, "temperature": 1.0, "prompt_logprobs": K}
    -> {"choices": [{"index": i, "prompt_logprobs": [null, {"<id>": {"logprob": lp, "rank": r, ...}, ...], ...}, ...]}

one prompt per sequence (its attended tokens, unpadded); ``prompt_logprobs[j]`` (j >= 1) is the teacher's
distribution of token j given the tokens before it: its K most likely ids (ranks 1..K) and token j itself, added with
its rank when it is not among them; entry 0 is null. The generated token (``max_tokens`` 1) is not used. Serve it with
``vllm serve MODEL --max-logprobs K`` (vLLM refuses a K above --max-logprobs, 20 by default). vLLM's prompt
log-probabilities are the model's raw ones (T = 1, before any sampling temperature), so the HTTP teacher scores at
T = 1 only.
"""
from __future__ import annotations

import dataclasses
import json
import math
import urllib.error
import urllib.request
from typing import Optional, Protocol, Union

import torch

import minillm_kernels as mk
from minillm_kernels.training.data import causal_lm_logits


@dataclasses.dataclass(frozen=True)
class SparseTeacher:
    """The teacher at each of ``[...]`` positions, as its top-k: ``ids`` and ``logprobs`` ``[..., K]`` (int64 or int32
    ids; log p normalised over the full vocabulary, in decreasing order; -inf marks no entry), ``token_logprob``
    ``[...]`` log p of the token that follows the position (None where not scored; 0 at positions without one) and
    ``tail_logprob`` ``[...]`` log P_R = log sum_{v not in top-k} p_v, from the full softmax (the offline cache's;
    -inf where the top-k is the whole vocabulary)."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    token_logprob: Optional[torch.Tensor] = None
    tail_logprob: Optional[torch.Tensor] = None

    @property
    def top_k(self) -> int:
        return self.ids.shape[-1]

    def map(self, function) -> SparseTeacher:
        """This teacher with ``function`` applied to each of its tensors (a row selection, a move to a device)."""
        return SparseTeacher(*(None if x is None else function(x) for x in dataclasses.astuple(self)))

    def rows(self, index: Union[slice, torch.Tensor]) -> SparseTeacher:
        """The rows (first dimension) that ``index`` selects."""
        return self.map(lambda x: x[index])


def empty_teacher(shape: tuple[int, ...], top_k: int, device: torch.device) -> SparseTeacher:
    """A ``SparseTeacher`` of ``shape`` positions with no entry anywhere (ids 0..K-1, log-probabilities -inf, the
    given token's 0): the filler of the positions a loss masks out, which the kernels do not read."""
    ids = torch.arange(top_k, device=device).expand(*shape, top_k).clone()
    return SparseTeacher(ids, torch.full((*shape, top_k), -math.inf, device=device), torch.zeros(shape, device=device))


CHUNK_ELEMENTS = 1 << 25  # sparse_scores' float64 log-softmax: rows x vocabulary per chunk (256 MiB)


@torch.no_grad()
def sparse_scores(logits: torch.Tensor, next_ids: torch.Tensor, top_k: int, temperature: float,
                  vocab_size: int) -> SparseTeacher:
    """The top-k teacher of ``[..., W]`` logits, as ``mk.topk_teacher`` defines it: the k largest of log p =
    log_softmax(t / T) over the first ``vocab_size`` columns, in decreasing order; with log p of ``next_ids`` ``[...]``
    (ids below ``vocab_size``) and the tail's log-mass log P_R = lse_{v not in top-k}(log p_v), summed over the tail
    itself (no 1 - sum: P_R keeps its relative precision however small it is; -inf when k = vocab_size).

    The log-softmax runs in float64 (in chunks of rows, ``CHUNK_ELEMENTS``), and the log-probabilities are returned
    in float32 (float64 for float64 logits): so each is its correctly rounded value, and 1 - sum_k p_k, which the
    sparse kernels derive P_R from, errs only by the rounding of the stored values, about eps_32 / 2 sum_k p_k
    |log p_k|, where a float32 log-softmax adds a few eps_32 (1 + log V) to every log p_k (docs/design.md)."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    flat, targets = logits[..., :vocab_size].reshape(-1, vocab_size), next_ids.reshape(-1)
    parts = []
    for start in range(0, max(flat.shape[0], 1), max(1, CHUNK_ELEMENTS // vocab_size)):  # (no row: one empty part)
        rows = slice(start, start + max(1, CHUNK_ELEMENTS // vocab_size))
        full = torch.log_softmax(flat[rows].double() / temperature, dim=-1)
        logprobs, ids = full.topk(top_k, dim=-1)
        token_logprob = full.gather(-1, targets[rows].clamp(0, vocab_size - 1).unsqueeze(-1)).squeeze(-1)
        tail_logprob = full.scatter(-1, ids, -math.inf).logsumexp(-1)
        parts.append((ids, logprobs.to(dtype), token_logprob.to(dtype), tail_logprob.to(dtype)))
    lead = logits.shape[:-1]
    ids, logprobs, token_logprob, tail_logprob = (torch.cat(part) for part in zip(*parts))
    return SparseTeacher(ids.view(*lead, top_k), logprobs.view(*lead, top_k), token_logprob.view(lead),
                         tail_logprob.view(lead))


class ScoringTeacher(Protocol):
    """A teacher that scores token sequences (the served-teacher interface).

    ``score(sequences, attention_mask, first)``: for ``[B, L]`` token ids and their 0/1 attention mask (left or right
    padding: each row's attended tokens are one contiguous run), the ``SparseTeacher`` of positions i = first, ...,
    L - 2 (``[B, L - 1 - first, K]``, ``token_logprob`` included): the teacher's distribution of the token after
    sequences[b, : i + 1] and log p of sequences[b, i + 1], for every position whose token and next token are attended
    (the others: ``empty_teacher``'s filler, or whatever the model gives there; a loss masks them out)."""

    top_k: int
    temperature: float

    def score(self, sequences: torch.Tensor, attention_mask: torch.Tensor, first: int) -> SparseTeacher:
        ...


class InProcessTeacher:
    """``ScoringTeacher`` over a Hugging Face causal LM in this process (its ``ModelRunner``, so that a sharded teacher
    runs as a whole): one forward pass over the batch, then ``sparse_scores`` of the logits at the scored positions.
    The teacher's own forward builds its logits, as a server does; what leaves it is K numbers per token."""

    def __init__(self, model: torch.nn.Module, top_k: int, temperature: float, vocab_size: int) -> None:
        self.model, self.top_k, self.temperature, self.vocab_size = model, top_k, temperature, vocab_size

    def score(self, sequences: torch.Tensor, attention_mask: torch.Tensor, first: int) -> SparseTeacher:
        with torch.no_grad():
            logits = self.model(causal_lm_logits, sequences, attention_mask)[:, first:-1]
        scores = sparse_scores(logits, sequences[:, first + 1 :], self.top_k, self.temperature, self.vocab_size)
        scored = (attention_mask[:, first:-1] * attention_mask[:, first + 1 :]).bool()
        return dataclasses.replace(scores, token_logprob=torch.where(scored, scores.token_logprob, 0.0))


class HTTPTeacher:
    """``ScoringTeacher`` served over HTTP in vLLM's shape (the module docstring): one request per ``score`` call,
    one prompt per sequence. ``url`` is the API root (``http://host:8000/v1``); ``model`` the served model's name."""

    def __init__(self, url: str, model: str, top_k: int, temperature: float = 1.0, timeout: float = 600.0) -> None:
        if temperature != 1.0:
            raise ValueError(f"--temperature {temperature}: a served teacher's prompt log-probabilities are the "
                             "model's raw ones (T = 1); train with --temperature 1, or load the teacher here "
                             "(--teacher-top-k without --teacher-server)")
        self.url, self.model, self.top_k, self.temperature, self.timeout = url.rstrip("/"), model, top_k, 1.0, timeout

    def score(self, sequences: torch.Tensor, attention_mask: torch.Tensor, first: int) -> SparseTeacher:
        batch, length = sequences.shape
        spans = [attended_span(row) for row in attention_mask]
        prompts = [sequences[b, start:end].tolist() for b, (start, end) in enumerate(spans)]
        choices = self.post({"model": self.model, "prompt": prompts, "max_tokens": 1, "temperature": 1.0,
                             "prompt_logprobs": self.top_k})
        scores = empty_teacher((batch, length - 1 - first), self.top_k, torch.device("cpu"))
        for b, ((start, end), choice) in enumerate(zip(spans, choices)):
            positions = choice.get("prompt_logprobs")
            if not isinstance(positions, list) or len(positions) != end - start:
                raise ValueError(f"{self.url}: the answer to prompt {b} has no prompt_logprobs of its {end - start} "
                                 "tokens (is the server a vLLM with prompt_logprobs?)")
            for j in range(max(1, first + 1 - start), end - start):  # token start + j, predicted at position start+j-1
                ranked = sorted((entry["rank"], int(token), entry["logprob"]) for token, entry in positions[j].items())
                given = positions[j].get(str(prompts[b][j]))
                if given is None or len(ranked) < self.top_k:
                    raise ValueError(f"{self.url}: prompt {b}, token {j}: expected the top {self.top_k} and the given "
                                     f"token {prompts[b][j]}, got ids {sorted(int(t) for t in positions[j])}")
                n = start + j - 1 - first
                scores.ids[b, n] = torch.tensor([token for _, token, _ in ranked[: self.top_k]])
                scores.logprobs[b, n] = torch.tensor([logprob for _, _, logprob in ranked[: self.top_k]])
                scores.token_logprob[b, n] = given["logprob"]
        return scores.map(lambda x: x.to(sequences.device))

    def post(self, body: dict) -> list[dict]:
        """The choices of a completions request, in prompt order; ConnectionError / ValueError naming the URL."""
        request = urllib.request.Request(f"{self.url}/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as error:
            raise ValueError(f"{self.url}/completions answered {error.code}: {error.read()[:500]!r}") from None
        except urllib.error.URLError as error:
            raise ConnectionError(f"{self.url}/completions: {error.reason} (is the teacher served there? "
                                  f"`vllm serve {self.model} --max-logprobs {self.top_k}`)") from None
        choices = sorted(answer.get("choices", []), key=lambda choice: choice["index"])
        if len(choices) != len(body["prompt"]):
            raise ValueError(f"{self.url}: {len(choices)} choices for {len(body['prompt'])} prompts")
        return choices


def attended_span(mask_row: torch.Tensor) -> tuple[int, int]:
    """``(start, end)`` of a row's attended tokens; ValueError unless they are one contiguous run."""
    attended = mask_row.nonzero().flatten().tolist()
    if not attended or attended[-1] - attended[0] + 1 != len(attended):
        raise ValueError("each attention-mask row must be one contiguous run of 1s (left or right padding)")
    return attended[0], attended[-1] + 1


def sparse_response_divergence(model: torch.nn.Module, sample: mk.TeacherMixedSample, teacher: SparseTeacher,
                               **options) -> torch.Tensor:
    """``mk.fused_sparse_divergence`` of the student ``model`` on ``sample``'s responses (a fresh forward pass:
    ``mk.response_logits``) against the teacher's top-k at the response positions, over ``sample.response_mask``:
    ``mk.response_divergence`` with a sparse teacher. ``options``: divergence, tail, temperature, vocab_size, ..."""
    logits = mk.response_logits(model, sample)
    return mk.fused_sparse_divergence(logits, teacher.ids, teacher.logprobs, mask=sample.response_mask, **options)


def sparse_response_token_stats(model: torch.nn.Module, sample: mk.TeacherMixedSample, teacher: SparseTeacher,
                                **options) -> mk.TokenStats:
    """``mk.fused_sparse_token_stats`` of the student ``model`` on ``sample``'s responses against the teacher's top-k
    and its log p of each sampled token (``teacher.token_logprob``): ``mk.response_token_stats`` with a sparse
    teacher, each field in its own storage (as ``methods.owned_token_stats``, for FSDP2)."""
    mask = sample.response_mask
    stats = mk.fused_sparse_token_stats(mk.response_logits(model, sample), teacher.ids, teacher.logprobs,
                                        sample.response_ids.masked_fill(~mask, 0), teacher.token_logprob, mask=mask,
                                        **options)
    return mk.TokenStats(*(None if x is None else x.clone() for x in stats))
