"""Teacher-mixed sampling for MiniLLM on stock Hugging Face causal LMs.

Each response token is drawn from the mixture p~ = alpha p + (1 - alpha) q of the teacher p and the
student q (the paper's teacher-mixed sampling; the reference code needs a forked ``transformers``
for it). The loop keeps a KV cache for each model, feeds both the same tokens, and records per
token what the MiniLLM objective needs: log q_old(y_t), log p(y_t) and the importance weight
w_t = q(y_t) / p~(y_t).

Any two models with the Hugging Face causal-LM interface work: ``model(input_ids=...,
attention_mask=..., position_ids=..., <cache>=..., use_cache=True)`` returning ``.logits`` and the
cache (``cache`` in transformers >= 5.2x, ``past_key_values`` before; the keyword is read from
``forward``'s signature). Nothing here imports ``transformers``.

Temperature and filtering, and what the returned numbers mean:
- Sampling: each model's logits over the first ``vocab_size`` columns are divided by the
  temperature T, then filtered by top-k and top-p (each model on its own, in this order, as
  ``transformers.generate`` does), turned into probabilities q_f and p_f, and mixed:
  p~ = alpha p_f + (1 - alpha) q_f.
- ``importance_weight`` is w_t = q_f(y_t) / p~(y_t), from the very probabilities that were sampled
  from (0 for a token the student's filter removed).
- ``student_logprob`` and ``teacher_logprob`` are log softmax(logits / T) at the sampled token, at
  the sampling temperature and without top-k/top-p: what ``fused_token_stats(..., temperature=T)``
  gives on a fresh forward pass over the same sequences, so that the PPO ratio
  exp(log q(y_t) - log q_old(y_t)) is exactly 1 before the first update. With top_k = 0 and
  top_p = 1 (the reference defaults) w_t also equals ``fused_token_stats(..., mix_alpha=alpha).importance_weight``.
  (The reference code renormalises both models over the student's top-k/top-p set instead.)
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, fields, replace
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist

from minillm_kernels import reference
from minillm_kernels.linear import fused_linear_divergence, fused_linear_token_stats
from minillm_kernels.losses import TokenStats, fused_divergence, fused_token_stats, importance_weight
from minillm_kernels.validation import as_int, as_real, as_temperature


def position_ids_from_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting only attended tokens, 0 on left padding: ``(cumsum(mask) - 1).clamp(min=0)``."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass(frozen=True)
class TeacherMixedSample:
    """A batch of sampled responses: what ``sample_teacher_mixed`` returns, with the per-token numbers the MiniLLM
    objective needs, or a plain generation (``training.evaluation.generate``), without them (None).
    N = the number of steps taken (<= max_new_tokens).

    sequences:         ``[B, P + N]`` the prompts as given (left-padded), then the response tokens;
                       ``pad_token_id`` after a row's first EOS.
    attention_mask:    ``[B, P + N]`` long: the prompts' mask, then ``response_mask``.
    response_mask:     ``[B, N]`` bool: True for each sampled token up to and including the first EOS.
    prompt_length:     P.
    student_logprob:   ``[B, N]`` log q_old(y_t) = log softmax(s / T)(y_t), 0 where masked.
    teacher_logprob:   ``[B, N]`` log p(y_t) = log softmax(t / T)(y_t), 0 where masked (None if the student
                       sampled alone: a served teacher scores the sequences afterwards).
    importance_weight: ``[B, N]`` w_t = q_f(y_t) / (alpha p_f(y_t) + (1 - alpha) q_f(y_t)), 0 where masked.
    The per-token tensors are aligned with ``response_ids = sequences[:, P:]``, and are float32
    (float64 for float64 logits).
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    prompt_length: int
    student_logprob: Optional[torch.Tensor] = None
    teacher_logprob: Optional[torch.Tensor] = None
    importance_weight: Optional[torch.Tensor] = None

    @property
    def response_ids(self) -> torch.Tensor:
        """``[B, N]`` the sampled tokens (``pad_token_id`` after EOS)."""
        return self.sequences[:, self.prompt_length :]

    @property
    def position_ids(self) -> torch.Tensor:
        """``[B, P + N]`` the positions the models saw while sampling, for a fresh forward pass."""
        return position_ids_from_attention_mask(self.attention_mask)

    def rows(self, index: Union[slice, torch.Tensor]) -> TeacherMixedSample:
        """The sample of the rows that ``index`` selects, in every ``[B, ...]`` field."""
        return replace(self, **{field.name: getattr(self, field.name)[index] for field in fields(self)
                                if isinstance(getattr(self, field.name), torch.Tensor)})


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside wrappers whose ``forward`` takes ``*args, **kwargs``: DistributedDataParallel, DataParallel
    and ``minillm_kernels.distributed.ModelRunner`` (``.module``), ``torch.compile`` (``._orig_mod``). FSDP2's
    ``fully_shard`` keeps a module's own class and forward, so it needs no unwrapping."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def forward_parameters(model: torch.nn.Module) -> set[str]:
    """The keyword arguments the model's own ``forward`` takes, through its wrappers (``unwrapped``), so that a
    wrapped model still gets ``logits_to_keep``."""
    return set(inspect.signature(unwrapped(model).forward).parameters)


class _CachedModel:
    """One causal LM run step by step with its KV cache."""

    def __init__(self, model: torch.nn.Module) -> None:
        parameters = forward_parameters(model)
        self.model = model
        self.cache_keyword = "cache" if "cache" in parameters else "past_key_values"
        self.keeps_last_logits = "logits_to_keep" in parameters
        self.cache = None

    def next_token_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """``[B, W]`` logits for the token after ``input_ids``, extending the cache."""
        kwargs = {self.cache_keyword: self.cache} if self.cache is not None else {}
        if self.keeps_last_logits:
            kwargs["logits_to_keep"] = 1
        output = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True, **kwargs
        )
        self.cache = getattr(output, self.cache_keyword)
        return output.logits[:, -1, :]


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k, then top-p (nucleus) filtering: removed tokens get -inf.

    top-k keeps the k largest logits (ties with the k-th kept); top-p keeps the smallest set of most
    likely tokens whose probability reaches ``top_p`` (at least one token).
    """
    if 0 < top_k < logits.shape[-1]:
        kth_largest = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        remove_sorted = mass_before >= top_p
        remove_sorted[..., 0] = False
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, -math.inf)
    return logits


def _eos_ids(eos_token_id: Union[int, Sequence[int], None], device: torch.device) -> Optional[torch.Tensor]:
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not ids or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
        raise ValueError(f"eos_token_id must be None, an int >= 0 or a non-empty list of them, got {eos_token_id!r}")
    return torch.tensor(ids, device=device)


def _validate(
    input_ids: object,
    attention_mask: object,
    alpha: object,
    max_new_tokens: object,
    temperature: object,
    top_k: object,
    top_p: object,
) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [batch, prompt_length] tensor, got {input_ids!r:.80}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must hold integer token ids with prompt_length >= 1, got {input_ids.dtype} "
                         f"{tuple(input_ids.shape)}")
    if input_ids.shape[0] == 0:
        raise ValueError(f"input_ids holds no prompt (shape {tuple(input_ids.shape)}): give at least one")
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must be a tensor of input_ids' shape {tuple(input_ids.shape)}")
    if attention_mask.device != input_ids.device:
        raise ValueError(f"attention_mask is on {attention_mask.device} but input_ids is on {input_ids.device}")
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 and 1")
    if not bool((attention_mask[:, 1:] >= attention_mask[:, :-1]).all()) or not bool(attention_mask[:, -1].all()):
        raise ValueError("the prompts must be left-padded: each attention_mask row is 0...0 1...1 with at least one 1")
    as_real("alpha", alpha, 0.0, 1.0)
    as_int("max_new_tokens", max_new_tokens, 1)
    as_real("temperature", temperature, 0.0, open_low=True)
    as_int("top_k (0: no top-k)", top_k, 0)
    as_real("top_p (1: no top-p)", top_p, 0.0, 1.0, open_low=True)


def _check_token_ids(input_ids: torch.Tensor, pad_token_id: int, models: dict[str, torch.nn.Module]) -> None:
    """Every prompt id (padding included: the embedding reads it too) and ``pad_token_id`` (fed to both models after
    a row's EOS) must be a row of each model's input embedding."""
    low, high = int(input_ids.min()), int(input_ids.max())
    for name, model in models.items():
        model = unwrapped(model)
        embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        rows = getattr(embedding, "num_embeddings", None)
        if rows is not None and (low < 0 or high >= rows):
            raise ValueError(
                f"input_ids must lie in [0, {rows}) (the {name}'s input embedding rows), got values in [{low}, {high}]; "
                "were the prompts tokenized with another tokenizer, or padded with an id outside the vocabulary?"
            )
        if rows is not None and pad_token_id >= rows:
            raise ValueError(
                f"pad_token_id must lie in [0, {rows}) (the {name}'s input embedding rows: it fills the rows after "
                f"their EOS and is fed to both models), got {pad_token_id}; pass the tokenizer's pad_token_id"
            )


def _real_vocab_size(student_width: int, teacher_width: int, vocab_size: Optional[int]) -> int:
    if vocab_size is None:
        if student_width != teacher_width:
            raise ValueError(
                f"the student's logits have {student_width} columns and the teacher's {teacher_width}; "
                "pass vocab_size= (the tokenizer's real vocabulary size) to compare padded logits"
            )
        return student_width
    return as_int("vocab_size", vocab_size, 1, min(student_width, teacher_width))  # (the narrower logits' width)


def _every_row_stopped(finished: torch.Tensor, synced_processes: bool) -> bool:
    """True when every row has stopped: in this process, or with ``synced_processes`` in every process of the
    default group (one all-reduce of the count of running rows)."""
    if not synced_processes:
        return bool(finished.all())
    running = (~finished).sum().reshape(1)
    dist.all_reduce(running)
    return int(running) == 0


def _next_logits(models: list[_CachedModel], input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The student's and the teacher's (None without one) next-token logits, each model's cache extended."""
    logits = [model.next_token_logits(input_ids, attention_mask, position_ids) for model in models]
    return logits[0], logits[1] if len(logits) > 1 else None


@torch.no_grad()
def sample_teacher_mixed(
    student: torch.nn.Module,
    teacher: Optional[torch.nn.Module],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    alpha: float = 0.2,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: Union[int, Sequence[int], None] = None,
    pad_token_id: Optional[int] = None,
    vocab_size: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    synced_processes: bool = False,
) -> TeacherMixedSample:
    """Sample responses from p~ = alpha p + (1 - alpha) q, token by token, with both models' KV caches.

    At each step, with s, t the student's and teacher's next-token logits over the first
    ``vocab_size`` columns, q_f = softmax(filter(s / T)), p_f = softmax(filter(t / T)) (filter =
    top-k then top-p), the token y_t ~ alpha p_f + (1 - alpha) q_f is recorded with
        log q(y_t) = log softmax(s / T)(y_t),  log p(y_t) = log softmax(t / T)(y_t),
        w_t = q_f(y_t) / (alpha p_f(y_t) + (1 - alpha) q_f(y_t))    (exactly 1 for alpha = 0).
    With ``teacher=None`` (and alpha = 0) the student samples alone: the same draws as with a teacher at alpha = 0
    (the mixture is then q_f exactly), w_t = 1 and ``teacher_logprob`` None; a served or cached teacher scores the
    sequences afterwards.
    A row stops at its first ``eos_token_id`` (which counts as a response token); later tokens are
    ``pad_token_id`` and masked. The loop ends after ``max_new_tokens`` steps or when every row has
    stopped (with ``synced_processes``, every row of every process: see below). Defaults: alpha = 0.2
    (paper and reference code), T = 1, top-k 0, top-p 1 (reference code).

    Put both models in ``eval()`` mode first: with dropout on, a fresh forward pass would not
    reproduce the recorded log-probabilities.

    Args:
        student, teacher: causal LMs sharing a tokenizer (their logits may be padded to different widths); teacher
            None: the student alone (alpha must be 0).
        input_ids: ``[B, P]`` integer prompts, left-padded.
        attention_mask: ``[B, P]`` 0/1 (or bool), 0 on the left padding.
        alpha: the teacher's share in [0, 1].
        max_new_tokens: at most this many response tokens (>= 1).
        temperature: T > 0, 1 / T finite in the logits' compute dtype (float32, or float64 for float64 logits);
            top_k: >= 0 (0 = off); top_p: in (0, 1] (1 = off).
        eos_token_id: an id, a list of ids, or None (never stop early).
        pad_token_id: fills the rows after their EOS (a row of both models' input embeddings); default: the
            (first) EOS id, or 0.
        vocab_size: the real vocabulary size when the two models' logits have different widths.
        generator: optional ``torch.Generator`` for reproducible draws.
        synced_processes: every process of the default ``torch.distributed`` group takes the same number of
            steps (one all-reduce per step): needed where each forward pass is a collective, as with models sharded
            by FSDP2, whose layers all-gather their parameters. A process whose rows have all stopped keeps
            stepping (its extra tokens are padding, masked) until every process's rows have. Every process gets
            the same N. (``generate``'s ``synced_gpus`` does the same.)

    Returns: a ``TeacherMixedSample``.
    """
    _validate(input_ids, attention_mask, alpha, max_new_tokens, temperature, top_k, top_p)
    if teacher is None and alpha != 0:
        raise ValueError(f"alpha = {alpha} samples from the teacher, but teacher is None: pass the teacher, or alpha=0 "
                         "to sample from the student alone")
    if synced_processes and not (dist.is_available() and dist.is_initialized()):
        raise ValueError("synced_processes=True needs an initialised torch.distributed process group "
                         "(torch.distributed.init_process_group, e.g. under torchrun)")
    device = input_ids.device
    eos_ids = _eos_ids(eos_token_id, device)
    if pad_token_id is None:
        pad_token_id = int(eos_ids[0]) if eos_ids is not None else 0
    pad_token_id = as_int("pad_token_id (or None)", pad_token_id, 0)
    named = {"student": student, **({"teacher": teacher} if teacher is not None else {})}
    _check_token_ids(input_ids, pad_token_id, named)
    models = [_CachedModel(model) for model in named.values()]
    batch, prompt_length = input_ids.shape
    full_mask = attention_mask.long()
    position = position_ids_from_attention_mask(full_mask)
    student_logits, teacher_logits = _next_logits(models, input_ids, full_mask, position)
    present = [logits for logits in (student_logits, teacher_logits) if logits is not None]
    vocab_size = _real_vocab_size(present[0].shape[-1], present[-1].shape[-1], vocab_size)
    compute_dtype = reference.compute_dtype(*(logits.dtype for logits in present))
    temperature = as_temperature(temperature, compute_dtype)
    next_position = position[:, -1:] + 1

    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens, valid, student_logprobs, teacher_logprobs, weights = [], [], [], [], []
    for step in range(max_new_tokens):
        student_scaled = student_logits[:, :vocab_size].to(compute_dtype) / temperature
        student_filtered = _filter_logits(student_scaled, top_k, top_p).log_softmax(-1)
        if teacher_logits is None:
            mixture = student_filtered.exp()
        else:
            teacher_scaled = teacher_logits[:, :vocab_size].to(compute_dtype) / temperature
            teacher_filtered = _filter_logits(teacher_scaled, top_k, top_p).log_softmax(-1)
            mixture = alpha * teacher_filtered.exp() + (1.0 - alpha) * student_filtered.exp()
        token = torch.multinomial(mixture, 1, generator=generator).squeeze(-1)
        token = torch.where(finished, pad_token_id, token)
        counts = ~finished
        index = token.clamp(max=vocab_size - 1).unsqueeze(-1)

        def at_token(logprob: torch.Tensor) -> torch.Tensor:
            return logprob.gather(-1, index).squeeze(-1)

        tokens.append(token)
        valid.append(counts)
        student_logprobs.append(torch.where(counts, at_token(student_scaled.log_softmax(-1)), 0.0))
        if teacher_logits is None:
            weights.append(counts.to(compute_dtype))
        else:
            weight = importance_weight(at_token(student_filtered), at_token(teacher_filtered), float(alpha))
            teacher_logprobs.append(torch.where(counts, at_token(teacher_scaled.log_softmax(-1)), 0.0))
            weights.append(torch.where(counts, weight, 0.0))
        if eos_ids is not None:
            finished = finished | torch.isin(token, eos_ids)
        if step + 1 == max_new_tokens or _every_row_stopped(finished, synced_processes):
            break
        full_mask = torch.cat([full_mask, counts.long().unsqueeze(-1)], dim=-1)
        student_logits, teacher_logits = _next_logits(models, token.unsqueeze(-1), full_mask, next_position)
        next_position = next_position + 1

    response_mask = torch.stack(valid, dim=-1)
    return TeacherMixedSample(
        sequences=torch.cat([input_ids, torch.stack(tokens, dim=-1).to(input_ids.dtype)], dim=-1),
        attention_mask=torch.cat([attention_mask.long(), response_mask.long()], dim=-1),
        response_mask=response_mask,
        student_logprob=torch.stack(student_logprobs, dim=-1),
        teacher_logprob=torch.stack(teacher_logprobs, dim=-1) if teacher_logprobs else None,
        importance_weight=torch.stack(weights, dim=-1),
        prompt_length=prompt_length,
    )


def response_hidden_states(model: torch.nn.Module, sample: TeacherMixedSample) -> torch.Tensor:
    """``[B, N, H]`` a fresh forward pass's last hidden states (after the final norm) that predict each
    response token of ``sample``: the input of the output layer, for ``fused_linear_token_stats``.

    The forward pass of ``response_logits`` without the output layer (``model.base_model``, the decoder
    of a Hugging Face causal LM), so that ``response_logits(model, sample)`` equals
    ``response_hidden_states(model, sample) @ W^T (+ b)`` with W, b the weight and bias of
    ``model.get_output_embeddings()``, and the ``[B, N, V]`` logits are never built.

    ``model`` is the causal LM itself, not a DDP or FSDP2 wrapper: its base model and lm_head are not one call
    of the model's forward, which is all that DDP synchronises and FSDP2 gathers. Under them, call it inside
    the wrapper's forward: ``ModelRunner(model)(response_hidden_states, sample)`` with the ModelRunner wrapped by
    DDP or ``fully_shard`` (``minillm_kernels.distributed``). A wrapper given here is a TypeError saying so.
    """
    if not hasattr(model, "base_model") and hasattr(unwrapped(model), "base_model"):
        raise TypeError(
            f"response_hidden_states needs the causal LM itself, got its {type(model).__name__} wrapper: calling the "
            "inner model's base model would bypass the wrapper (DDP would not synchronise the gradients). Run it "
            "inside the wrapper's forward: wrap ModelRunner(model) (minillm_kernels.distributed) with DDP or "
            "fully_shard and call wrapper(response_hidden_states, sample)"
        )
    new_tokens = sample.response_mask.shape[-1]
    hidden = model.base_model(
        input_ids=sample.sequences,
        attention_mask=sample.attention_mask,
        position_ids=sample.position_ids,
        use_cache=False,
    ).last_hidden_state
    return hidden[:, -(new_tokens + 1) : -1, :]


def response_logits(model: torch.nn.Module, sample: TeacherMixedSample) -> torch.Tensor:
    """``[B, N, W]`` a fresh forward pass's logits predicting each response token of ``sample``.

    Runs ``model`` on ``sample.sequences`` with the attention mask and positions the sampler used, and keeps the
    logits at positions P - 1 ... P + N - 2 (those that predict ``response_ids``). Where the model takes
    ``logits_to_keep`` (Hugging Face causal LMs), those positions are passed as a tensor of indices, so that the
    model's output layer runs on them only: the result is a contiguous ``[B, N, W]`` tensor, its gradient the one
    ``[B, N, W]`` tensor of the backward (a slice of wider logits would cost the prompt's logits and a zero-filled
    ``[B, N + 1, W]`` in ``slice_backward``). Other models' logits are sliced (a view of the full logits). Under ``torch.no_grad()`` for the
    teacher; with gradients for the student being trained.
    """
    length, new_tokens = sample.sequences.shape[1], sample.response_mask.shape[-1]
    positions = torch.arange(length - new_tokens - 1, length - 1, device=sample.sequences.device)
    keeps_positions = "logits_to_keep" in forward_parameters(model)
    logits = model(
        input_ids=sample.sequences,
        attention_mask=sample.attention_mask,
        position_ids=sample.position_ids,
        use_cache=False,
        **({"logits_to_keep": positions} if keeps_positions else {}),
    ).logits
    return logits if keeps_positions else logits[:, -(new_tokens + 1) : -1]  # (a view)


def response_token_stats(
    model: torch.nn.Module,
    sample: TeacherMixedSample,
    teacher_outputs: torch.Tensor,
    teacher_head: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None,
    **options,
) -> TokenStats:
    """``[B, N]`` per-token MiniLLM terms of the student ``model`` on ``sample``'s responses (a fresh forward pass).

    Without ``teacher_head``, from the logits: ``fused_token_stats(response_logits(model, sample), teacher_outputs,
    ...)``, ``teacher_outputs`` being the teacher's ``response_logits``. With ``teacher_head = (weight, bias)``, the
    teacher's output layer: ``fused_linear_token_stats`` of ``response_hidden_states(model, sample)`` with the
    model's output layer and of ``teacher_outputs`` (the teacher's ``response_hidden_states``) with
    ``teacher_head``, so that neither model's ``[B, N, V]`` logits are built. Each model's logits (or matmuls) are
    in its own dtype. The targets are ``sample.response_ids`` (0 where masked) and the mask
    ``sample.response_mask``; ``options`` are the other keyword arguments of ``fused_token_stats`` (temperature,
    mix_alpha, vocab_size, ...).

    The fused-linear form reads the model's base model and lm_head weight: as ``response_hidden_states`` it takes
    the causal LM itself, so under DDP or FSDP2 call it inside the wrapper's forward (``ModelRunner``).
    """
    mask = sample.response_mask
    response_ids = sample.response_ids.masked_fill(~mask, 0)
    if teacher_head is None:
        return fused_token_stats(response_logits(model, sample), teacher_outputs, response_ids, mask=mask, **options)
    hidden = response_hidden_states(model, sample)
    student_head, (teacher_weight, teacher_bias) = model.get_output_embeddings(), teacher_head
    return fused_linear_token_stats(
        hidden, student_head.weight, teacher_outputs, teacher_weight, response_ids,
        student_bias=student_head.bias, teacher_bias=teacher_bias, mask=mask, **options,
    )


def response_divergence(
    model: torch.nn.Module,
    sample: TeacherMixedSample,
    teacher_outputs: torch.Tensor,
    teacher_head: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None,
    **options,
) -> torch.Tensor:
    """A divergence D(p, q) of the student ``model`` from the teacher on ``sample``'s responses (a fresh forward pass),
    reduced over ``sample.response_mask``: what GKD's on-policy loss is (the student's own samples, teacher-forced).

    As ``response_token_stats``: without ``teacher_head``, ``fused_divergence(response_logits(model, sample),
    teacher_outputs, ...)``; with ``teacher_head = (weight, bias)``, ``fused_linear_divergence`` of both models' last
    hidden states and output layers, neither model's ``[B, N, V]`` logits built. ``options`` are the other keyword
    arguments of ``fused_divergence`` (divergence, beta, skew, temperature, reduction, vocab_size, ...); call it inside
    the wrapper's forward under DDP or FSDP2.
    """
    mask = sample.response_mask
    if teacher_head is None:
        return fused_divergence(response_logits(model, sample), teacher_outputs, mask=mask, **options)
    student_head, (teacher_weight, teacher_bias) = model.get_output_embeddings(), teacher_head
    return fused_linear_divergence(
        response_hidden_states(model, sample), student_head.weight, teacher_outputs, teacher_weight,
        student_bias=student_head.bias, teacher_bias=teacher_bias, mask=mask, **options,
    )
