"""TRL's distillation trainers on our kernels (minillm_kernels/integrations/trl.py, trl_experimental.py): each loss
is TRL 1.16's, value and gradients, against TRL's own code run here on the CPU and the float64 reference; each trainer
trains as TRL's does (same losses and gradients over two steps on the shipped tiny models); logit scales read from
real model configs (logit scales, Gemma-2's soft cap) are exact; a trainer step holds fewer [N, V] bytes than TRL's.

TRL's own tests for these trainers do not run here: its 1.16 test suite is not in the wheel, its trainer tests load
models and data sets from the Hugging Face Hub (no network here), and its loss tests need an accelerator
(``require_torch_accelerator``). The tests below run TRL's loss code itself instead, on the CPU, as the oracle.

Bounds: float32 throughout (the models, TRL's tiles, our kernels). ``FLOAT32`` (conftest's ``tolerance``) bounds a
float32 result against float64; two float32 implementations each within it of the exact value are within twice it of
each other (``FLOAT32_PAIR``).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is not installed: pip install 'minillm-kernels[trl]' (scripts/env.sh "
                                        "installs the `trl` extra)")

import minillm_kernels as mk  # noqa: E402
from conftest import tolerance  # noqa: E402
from minillm_kernels import reference  # noqa: E402
from minillm_kernels.integrations import trl as ours  # noqa: E402 (checks the TRL version: fails, not skips)
from minillm_kernels.integrations import trl_experimental as ours_experimental  # noqa: E402
from trl.experimental.gkd import GKDConfig  # noqa: E402
from trl.experimental.gkd import GKDTrainer as TrlGKDTrainer  # noqa: E402
from trl.experimental.server_distillation import ServerDistillationConfig as TrlServerDistillationConfig  # noqa: E402
from trl.experimental.server_distillation import ServerDistillationTrainer as TrlServerDistillationTrainer  # noqa: E402
from trl.trainer.distillation_trainer import _chunked_divergence_loss as trl_chunked_divergence_loss  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FLOAT32 = tolerance(torch.float32)
FLOAT32_PAIR = {key: 2 * value for key, value in FLOAT32.items()}
TRL_BETAS = {"forward_kl": 0.0, "jsd": 0.3, "reverse_kl": 1.0}  # beta = 0 forward KL, 1 reverse KL, else the JSD


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: a second intra-op thread only adds contention (10x slower on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_tested_trl_is_installed_and_importing_the_package_does_not_import_it():
    assert trl.__version__ in ours.TESTED_TRL_VERSIONS
    done = subprocess.run([sys.executable, "-c", "import sys, minillm_kernels; print('trl' in sys.modules)"],
                          cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_an_untested_trl_version_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(trl, "__version__", "1.17.0")
    monkeypatch.delitem(sys.modules, "minillm_kernels.integrations.trl")
    with pytest.raises(ImportError, match=r"tested with TRL 1\.16\.0 only; the installed TRL is 1\.17\.0"):
        import minillm_kernels.integrations.trl  # noqa: F401


# ---------------------------------------------------------------------------------------------------------------
# DistillationTrainer's loss: TRL's `_chunked_divergence_loss`.
# ---------------------------------------------------------------------------------------------------------------
def chunked_loss_inputs(vocab: int = 50) -> dict:
    """TRL's `_chunked_divergence_loss` arguments: [2, 5, H] hidden states (the teacher wider), [V, H] heads with
    biases (logits ~ N(0, 9)), a completion mask with zeros."""
    def head(hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(vocab, hidden) * (3 / hidden**0.5), torch.randn(vocab)

    (student_weight, student_bias), (teacher_weight, teacher_bias) = head(16), head(24)
    mask = (torch.rand(2, 5) < 0.7).long()
    mask[0, 0], mask[1, -1] = 1, 0
    return dict(student_hidden_states=torch.randn(2, 5, 16), teacher_hidden_states=torch.randn(2, 5, 24),
                student_lm_head_weight=student_weight, teacher_lm_head_weight=teacher_weight, completion_mask=mask,
                student_lm_head_bias=student_bias, teacher_lm_head_bias=teacher_bias)


STUDENT_INPUTS = ("student_hidden_states", "student_lm_head_weight", "student_lm_head_bias")


def loss_and_gradients(loss_fn, inputs: dict, **kwargs) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """(loss, entropy sum, gradients of the loss for the student's inputs) of a `_chunked_divergence_loss`."""
    inputs = {k: v.clone().requires_grad_(k in STUDENT_INPUTS) for k, v in inputs.items()}
    loss, entropy_sum, n_valid = loss_fn(**inputs, **kwargs)
    assert int(n_valid) == int(inputs["completion_mask"].sum())
    return loss.detach(), entropy_sum, torch.autograd.grad(loss, [inputs[k] for k in STUDENT_INPUTS])


def softcapped(logits: torch.Tensor, softcap) -> torch.Tensor:
    """Gemma-2's ``final_logit_softcapping`` c tanh(z / c) (by autograd), or z without a cap."""
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def exact_chunked_loss(inputs: dict, divergence: str, *, num_items_in_batch=None, temperature: float = 1.0,
                       student_logit_scale: float = 1.0, teacher_logit_scale: float = 1.0,
                       student_final_logit_softcapping=None, teacher_final_logit_softcapping=None, **coefficients):
    """The float64 loss, entropy sum and gradients, from ``reference.divergence`` on the full scaled, then soft-capped
    logits (TRL's order)."""
    inputs = {k: v.double().requires_grad_(k in STUDENT_INPUTS) if v.is_floating_point() else v
              for k, v in inputs.items()}
    student = softcapped(student_logit_scale * (inputs["student_hidden_states"] @ inputs["student_lm_head_weight"].t()
                                                + inputs["student_lm_head_bias"]), student_final_logit_softcapping)
    teacher = softcapped(teacher_logit_scale * (inputs["teacher_hidden_states"] @ inputs["teacher_lm_head_weight"].t()
                                                + inputs["teacher_lm_head_bias"]), teacher_final_logit_softcapping)
    mask = inputs["completion_mask"].reshape(-1) != 0
    vocab = student.shape[-1]
    per_token = reference.divergence(student.reshape(-1, vocab), teacher.reshape(-1, vocab), mask, temperature, vocab,
                                     divergence, **coefficients)
    loss = per_token.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
    log_q = torch.log_softmax(student.reshape(-1, vocab).detach() / temperature, -1)
    entropy_sum = -(log_q.exp() * log_q).sum(-1)[mask].sum()
    return loss.detach(), entropy_sum, torch.autograd.grad(loss, [inputs[k] for k in STUDENT_INPUTS])


def assert_loss_entropy_gradients_close(got, want, bounds: dict) -> None:
    torch.testing.assert_close(got[0].double(), want[0].double(), **bounds)
    torch.testing.assert_close(got[1].double(), want[1].double(), **bounds)
    for grad, expected in zip(got[2], want[2]):
        torch.testing.assert_close(grad.double(), expected.double(), **bounds)


@pytest.mark.parametrize("divergence", TRL_BETAS)
@pytest.mark.parametrize(("num_items_in_batch", "logit_scales"), [(None, (1.0, 1.0)), (11.0, (0.7, 1.3)),
                                                                  (None, (0.125, 0.125))],
                         ids=["unscaled", "scaled-num_items", "same-scale"])
def test_chunked_divergence_loss_is_trls_loss_entropy_and_gradients(divergence, num_items_in_batch, logit_scales):
    """TRL's beta convention, its num_items_in_batch reduction, its entropy, and both models' logit scales (folded into
    the temperature and the teacher's hidden states), at a temperature: ours and TRL's both within the float32 bound
    of the float64 loss, entropy and gradients (our chunks of 3 tokens, TRL's CPU tiles)."""
    beta = TRL_BETAS[divergence]
    inputs = chunked_loss_inputs()
    scales = dict(student_logit_scale=logit_scales[0], teacher_logit_scale=logit_scales[1])
    kwargs = dict(beta=beta, num_items_in_batch=num_items_in_batch, temperature=0.7, **scales)
    exact = exact_chunked_loss(inputs, divergence, num_items_in_batch=num_items_in_batch, temperature=0.7,
                               beta=beta, **scales)
    got = loss_and_gradients(ours.chunked_divergence_loss, inputs, chunk_size=3, **kwargs)
    assert_loss_entropy_gradients_close(got, exact, FLOAT32)
    assert_loss_entropy_gradients_close(loss_and_gradients(trl_chunked_divergence_loss, inputs, **kwargs), exact,
                                        FLOAT32)


@pytest.mark.parametrize("divergence", ["skew_forward_kl", "skew_reverse_kl", "tvd"])
def test_chunked_divergence_loss_gives_the_divergences_trl_lacks(divergence):
    inputs = chunked_loss_inputs()
    got = loss_and_gradients(ours.chunked_divergence_loss, inputs, beta=1.0, divergence=divergence, skew=0.2)
    exact = exact_chunked_loss(inputs, divergence, skew=0.2)
    assert_loss_entropy_gradients_close(got, exact, FLOAT32)


def test_a_fully_masked_micro_batch_gives_zero_with_a_graph():
    inputs = chunked_loss_inputs()
    inputs["completion_mask"] = torch.zeros_like(inputs["completion_mask"])
    loss, entropy_sum, grads = loss_and_gradients(ours.chunked_divergence_loss, inputs, beta=0.5)
    assert float(loss) == 0.0 and float(entropy_sum) == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in grads)


@pytest.mark.parametrize("divergence", TRL_BETAS)
@pytest.mark.parametrize("softcaps", [(1.5, None), (None, 2.0), (1.5, 2.0)], ids=["student", "teacher", "both"])
def test_soft_capped_logits_are_trls_loss_entropy_and_gradients(divergence, softcaps):
    """Gemma-2's ``final_logit_softcapping`` on either model or both, after the logit scales (0.7 and 1.3: the caps
    fold with them, ``fold_logit_scales``), on logits up to ~7 times the caps: ours and TRL's both within the float32
    bound of the float64 loss, entropy and gradients with the caps applied by autograd."""
    beta = TRL_BETAS[divergence]
    inputs = chunked_loss_inputs()
    transforms = dict(student_logit_scale=0.7, teacher_logit_scale=1.3, student_final_logit_softcapping=softcaps[0],
                      teacher_final_logit_softcapping=softcaps[1])
    exact = exact_chunked_loss(inputs, divergence, temperature=0.7, beta=beta, **transforms)
    kwargs = dict(beta=beta, temperature=0.7, **transforms)
    assert_loss_entropy_gradients_close(loss_and_gradients(ours.chunked_divergence_loss, inputs, chunk_size=3,
                                                           **kwargs), exact, FLOAT32)
    assert_loss_entropy_gradients_close(loss_and_gradients(trl_chunked_divergence_loss, inputs, **kwargs), exact,
                                        FLOAT32)


@pytest.mark.parametrize("model", ["student", "teacher"])
def test_a_soft_cap_that_is_not_positive_is_refused_by_its_config_field(model):
    with pytest.raises(ValueError, match=f"{model}_final_logit_softcapping must be a finite number > 0"):
        ours.chunked_divergence_loss(**chunked_loss_inputs(), beta=1.0, **{f"{model}_final_logit_softcapping": 0.0})


@pytest.mark.parametrize("scale", [0.0, -1.0, math.inf])
def test_a_logit_scale_that_is_no_temperature_is_refused_by_name(scale):
    with pytest.raises(ValueError, match="student_logit_scale must be a finite number > 0.*logits_scaling"):
        ours.chunked_divergence_loss(**chunked_loss_inputs(), beta=1.0, student_logit_scale=scale)


def test_the_divergence_option_is_checked_by_name():
    with pytest.raises(ValueError, match="divergence must be None"):
        ours.divergence_arguments(1.0, "kl")
    with pytest.raises(ValueError, match="divergence='jsd' takes the config's beta"):
        ours.divergence_arguments(1.0, "jsd")


# ---------------------------------------------------------------------------------------------------------------
# The experimental trainers' losses: GKD's `generalized_jsd_loss`, the server trainer's sparse losses.
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("divergence", TRL_BETAS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "num_items_in_batch", "no labels"])
def test_generalized_jsd_loss_is_gkds(divergence, reduction):
    student, teacher = torch.randn(2, 6, 40) * 3, torch.randn(2, 6, 40) * 3
    labels = torch.randint(0, 40, (2, 6)).masked_fill(torch.rand(2, 6) < 0.3, -100)
    kwargs = dict(labels=labels, beta=TRL_BETAS[divergence], temperature=0.8, reduction=reduction)
    if reduction == "num_items_in_batch":
        kwargs.update(reduction="batchmean", num_items_in_batch=torch.tensor(9))
    if reduction == "no labels":
        kwargs.update(reduction="batchmean", labels=None)
    results = []
    for loss_fn in (ours_experimental.generalized_jsd_loss, TrlGKDTrainer.generalized_jsd_loss):
        logits = student.clone().requires_grad_()
        loss = loss_fn(logits, teacher, **kwargs)
        results.append((loss.detach(), torch.autograd.grad(loss, logits)[0]))
    torch.testing.assert_close(results[0][0], results[1][0], **FLOAT32_PAIR)
    torch.testing.assert_close(results[0][1], results[1][1], **FLOAT32_PAIR)


def server_teacher_result(teacher_logits: torch.Tensor, sampled_ids: torch.Tensor, labels: torch.Tensor, top_k: int,
                          temperature: float) -> dict[str, torch.Tensor]:
    """What TRL's `_get_teacher_token_logprobs_from_server` returns: the teacher's top-k and sampled tokens'
    log-probabilities at the temperature, -inf (ids 0) where ``labels`` are -100 (the server's padding)."""
    log_p = torch.log_softmax(teacher_logits / temperature, -1)
    top = log_p.topk(top_k, -1)
    padding = labels == -100
    return {"topk_logprobs": top.values.masked_fill(padding.unsqueeze(-1), -math.inf),
            "topk_token_ids": top.indices.masked_fill(padding.unsqueeze(-1), 0),
            "actual_logprobs": log_p.gather(-1, sampled_ids.unsqueeze(-1)).squeeze(-1).masked_fill(padding, -math.inf)}


def trl_server_loss(student_logits, teacher_result, sampled_ids, labels, *, beta, add_tail, temperature):
    """TRL 1.16's server loss (`ServerDistillationTrainer.compute_loss`'s branch on beta), its methods on a trainer
    that has only the attributes they read."""
    trainer = object.__new__(TrlServerDistillationTrainer)
    trainer.beta, trainer.loss_add_tail, trainer.reverse_kl_top_1_mode = beta, add_tail, "sampled"
    log_q = torch.log_softmax(student_logits / temperature, -1)
    if beta > 0:
        return trainer._compute_server_sparse_top_1_divergence_loss(teacher_result, log_q, sampled_ids, labels)
    return trainer._compute_server_forward_kl_loss(teacher_result, log_q, labels)


@pytest.mark.parametrize(("beta", "top_k"), [(0.0, 4), (0.0, 1), (1.0, 1), (0.4, 1)])
@pytest.mark.parametrize("add_tail", [True, False], ids=["tail", "renormalized"])
def test_server_sparse_loss_is_trls_where_trl_runs(beta, top_k, add_tail):
    """TRL's supports (beta 0: the top-k; 1: the sampled token; between: the top-1 and the sampled token, once if
    they are one), its tail element or renormalisation, padding rows; one row's teacher certain of its top-1 (log p =
    0), where TRL clamps the tail (TRL_MAX_LOG_MASS)."""
    temperature = 0.9
    student, teacher = torch.randn(3, 7, 30) * 3, torch.randn(3, 7, 30) * 3
    teacher[0, 1, 5] = 1e4
    sampled_ids = torch.randint(0, 30, (3, 7))
    sampled_ids[0, 1] = 5  # the sampled token is the certain teacher's top-1
    sampled_ids[1, :3] = teacher[1, :3].argmax(-1)  # the sampled token is the top-1: one outcome
    labels = sampled_ids.masked_fill(torch.rand(3, 7) < 0.3, -100)
    labels[0, 1] = 5
    teacher_result = server_teacher_result(teacher, sampled_ids, labels, top_k, temperature)
    results = []
    for loss_fn in (ours_experimental.server_sparse_divergence_loss, trl_server_loss):
        logits = student.clone().requires_grad_()
        loss = loss_fn(logits, teacher_result, sampled_ids, labels, beta=beta, add_tail=add_tail,
                       temperature=temperature)
        results.append((loss.detach(), torch.autograd.grad(loss, logits)[0]))
    torch.testing.assert_close(results[0][0], results[1][0], **FLOAT32_PAIR)
    torch.testing.assert_close(results[0][1], results[1][1], **FLOAT32_PAIR)


@pytest.mark.parametrize("beta", [1.0, 0.4])
def test_server_sparse_loss_lifts_trls_top_1_limit(beta):
    """beta > 0 with a top-4 (TRL refuses it): the divergence against the top-4 and the sampled token, the tail as one
    outcome: reference.sparse_divergence on those entries, in float64. One token's student puts all but e^-30 of its
    mass on the entries, where TRL would clamp its tail at 1e-7: ours stays the exact divergence."""
    student, teacher = torch.randn(2, 5, 30) * 3, torch.randn(2, 5, 30) * 3
    sampled_ids = torch.randint(0, 30, (2, 5))
    labels = sampled_ids.masked_fill(torch.rand(2, 5) < 0.3, -100)
    labels[0, 0] = sampled_ids[0, 0]
    teacher_result = server_teacher_result(teacher, sampled_ids, labels, 4, 1.0)
    student[0, 0, teacher_result["topk_token_ids"][0, 0]] += 30.0
    logits = student.clone().requires_grad_()
    loss = ours_experimental.server_sparse_divergence_loss(logits, teacher_result, sampled_ids, labels, beta=beta)
    ids, logprobs = ours_experimental.server_teacher_entries(
        teacher_result["topk_token_ids"], teacher_result["topk_logprobs"], sampled_ids,
        teacher_result["actual_logprobs"], use_top_k=True, use_sampled=True)
    mask = (labels != -100).reshape(-1)
    logits64 = student.double().requires_grad_()
    per_token = reference.sparse_divergence(logits64.reshape(-1, 30), ids.reshape(-1, 5),
                                            logprobs.double().reshape(-1, 5), mask, 1.0, 30,
                                            **ours.divergence_arguments(beta), tail="bin")
    exact = per_token.sum() / mask.sum()
    torch.testing.assert_close(loss.detach().double(), exact.detach(), **FLOAT32)
    torch.testing.assert_close(torch.autograd.grad(loss, logits)[0].double(), torch.autograd.grad(exact, logits64)[0],
                               **FLOAT32)
    config = dict(output_dir="unused", teacher_model_server_url="http://teacher", beta=beta, loss_top_k=4, use_cpu=True)
    with pytest.raises(ValueError, match="loss_top_k must be 1 with beta>0"):
        TrlServerDistillationConfig(**config)
    assert ours_experimental.ServerDistillationConfig(**config).loss_top_k == 4


# ---------------------------------------------------------------------------------------------------------------
# The trainers: two training steps with TRL's loss and with ours.
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_tokenizer():
    """The shipped tiny models' tokenizer, with a pad token and a chat template (GKD's collator formats messages)."""
    from transformers import AutoTokenizer

    from minillm_kernels.training.tiny import checkpoint_dir

    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir("teacher"))
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    tokenizer.chat_template = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    return tokenizer


@pytest.fixture(scope="module")
def tiny_examples() -> list:
    from minillm_kernels.training.tiny import tiny_splits

    return tiny_splits()["prompts"][:8]


def tiny_model(name: str) -> torch.nn.Module:
    """A fresh float32 copy of the shipped ``"teacher"`` or ``"student-sft"``."""
    from transformers import AutoModelForCausalLM

    from minillm_kernels.training.tiny import checkpoint_dir

    return AutoModelForCausalLM.from_pretrained(checkpoint_dir(name), dtype=torch.float32)


def training_arguments(tmp_path: Path) -> dict:
    """Two steps of plain SGD (a parameter's change is -lr times its summed gradients), 2 micro-batches each, in
    float32 (TRL's configs default to bf16 autocast, on the CPU too: see
    test_gkd_trainer_under_trls_default_bf16_autocast_trains_as_trls); no gradient checkpointing (TRL's default for
    DistillationTrainer: the same gradients, from a second forward pass)."""
    return dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                optim="sgd", learning_rate=0.1, lr_scheduler_type="constant", logging_steps=1, report_to="none",
                save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True, gradient_checkpointing=False, bf16=False)


def train_two_steps(trainer) -> tuple[list[dict], torch.Tensor]:
    """The trainer's logs of its two steps and the change of the student's parameters (the trainer seeds itself:
    the same sampling either way)."""
    start = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    change = torch.cat([(p.detach() - s).reshape(-1) for p, s in zip(trainer.model.parameters(), start)])
    return logs, change


def assert_trains_as_trl(ours_run, trl_run, metrics: tuple[str, ...]) -> None:
    """Same logged metrics per step and the same parameter change (the gradients), within FLOAT32_PAIR."""
    (our_logs, our_change), (trl_logs, trl_change) = ours_run, trl_run
    assert len(our_logs) == len(trl_logs) == 2
    for ours_entry, trl_entry in zip(our_logs, trl_logs):
        for metric in metrics:
            torch.testing.assert_close(ours_entry[metric], trl_entry[metric], **FLOAT32_PAIR, msg=metric)
    assert trl_change.abs().max() > 0
    torch.testing.assert_close(our_change, trl_change, rtol=FLOAT32_PAIR["rtol"],
                               atol=FLOAT32_PAIR["atol"] * float(trl_change.abs().max()))


def soft_capped(model: torch.nn.Module, softcap) -> torch.nn.Module:
    """``model`` with ``final_logit_softcapping`` set in its config (what TRL's loss reads; None leaves it unset)."""
    if softcap is not None:
        model.config.final_logit_softcapping = softcap
    return model


@pytest.mark.parametrize(("beta", "softcaps"), [(1.0, (None, None)), (0.5, (None, None)), (0.5, (5.0, 8.0))],
                         ids=["reverse_kl", "jsd", "jsd-soft-capped"])
def test_distillation_trainer_trains_as_trls(beta, softcaps, tmp_path, tiny_tokenizer, tiny_examples):
    """On-policy: the student samples 8 tokens per prompt; the loss over the generated tokens, divided by
    num_items_in_batch (2 micro-batches per step); the logged entropy. Soft-capped: the tiny models' configs set
    ``final_logit_softcapping`` 5 (student) and 8 (teacher), below their largest logits (~14 and ~12), which TRL's
    loss and ours apply (their sampling does not: a Llama's forward ignores the field, alike in both runs)."""
    from datasets import Dataset

    dataset = Dataset.from_list([{"prompt": example.prompt} for example in tiny_examples])
    args = trl.DistillationConfig(beta=beta, max_completion_length=8, **training_arguments(tmp_path))
    runs = [train_two_steps(trainer_class(model=soft_capped(tiny_model("student-sft"), softcaps[0]),
                                          teacher_model=soft_capped(tiny_model("teacher"), softcaps[1]),
                                          args=args, train_dataset=dataset, processing_class=tiny_tokenizer))
            for trainer_class in (ours.DistillationTrainer, trl.DistillationTrainer)]
    assert_trains_as_trl(*runs, metrics=("loss", "grad_norm", "entropy"))


def test_gkd_trainer_trains_as_trls(tmp_path, tiny_tokenizer, tiny_examples):
    """Off-policy (lmbda 0): the data set's answers, the JSD at beta 0.5 over their tokens."""
    from datasets import Dataset

    dataset = Dataset.from_list([{"messages": [{"role": "user", "content": e.prompt},
                                               {"role": "assistant", "content": e.response}]} for e in tiny_examples])
    args = GKDConfig(lmbda=0.0, beta=0.5, max_new_tokens=8, max_length=64, **training_arguments(tmp_path))
    runs = [train_two_steps(trainer_class(model=tiny_model("student-sft"), teacher_model=tiny_model("teacher"),
                                          args=args, train_dataset=dataset, processing_class=tiny_tokenizer))
            for trainer_class in (ours_experimental.GKDTrainer, TrlGKDTrainer)]
    assert_trains_as_trl(*runs, metrics=("loss", "grad_norm"))


def test_gkd_trainer_under_trls_default_bf16_autocast_trains_as_trls(tmp_path, tiny_tokenizer, tiny_examples):
    """TRL's configs default to bf16 autocast (on the CPU too): the models' logits are bf16, and so is their gradient,
    which ours and TRL's round from float32 values a few float32 ulps apart; a rounding that goes the other way moves
    an element by one bf16 ulp, 2^-8 of it. So the losses agree to float32 at the first step, the parameters' change
    to 2^-8 of its largest element."""
    from datasets import Dataset

    dataset = Dataset.from_list([{"messages": [{"role": "user", "content": e.prompt},
                                               {"role": "assistant", "content": e.response}]} for e in tiny_examples])
    args = GKDConfig(lmbda=0.0, beta=0.5, max_new_tokens=8, max_length=64, **{**training_arguments(tmp_path),
                                                                              "bf16": True})
    (our_logs, our_change), (trl_logs, trl_change) = [
        train_two_steps(trainer_class(model=tiny_model("student-sft"), teacher_model=tiny_model("teacher"),
                                      args=args, train_dataset=dataset, processing_class=tiny_tokenizer))
        for trainer_class in (ours_experimental.GKDTrainer, TrlGKDTrainer)]
    torch.testing.assert_close(our_logs[0]["loss"], trl_logs[0]["loss"], **FLOAT32_PAIR)
    bf16_ulp = torch.finfo(torch.bfloat16).eps
    torch.testing.assert_close(our_change, trl_change, rtol=bf16_ulp, atol=bf16_ulp * float(trl_change.abs().max()))


class LocalTeacherServer:
    """Stands for TRL's ``VLLMClient`` with the tiny teacher: ``get_sequence_logprobs`` as a vLLM server gives them
    (the teacher's top-k and actual-token log-probabilities at the temperature, per completion token)."""

    def __init__(self, base_url: str, connection_timeout: float = 0.0) -> None:
        self.teacher = tiny_model("teacher").eval()

    @torch.no_grad()
    def get_sequence_logprobs(self, sequences, prompt_lengths, top_logprobs, temperature, **unused):
        result = {"logprobs": [], "logprob_token_ids": [], "actual_logprobs": [], "actual_token_ids": []}
        for sequence, prompt_length in zip(sequences, prompt_lengths):
            ids = torch.tensor(sequence)
            log_p = torch.log_softmax(self.teacher(ids[None]).logits[0, prompt_length - 1 : -1] / temperature, -1)
            top, completion = log_p.topk(top_logprobs, -1), ids[prompt_length:, None]
            result["logprobs"].append(top.values.tolist())
            result["logprob_token_ids"].append(top.indices.tolist())
            result["actual_logprobs"].append(log_p.gather(-1, completion).tolist())
            result["actual_token_ids"].append(completion.tolist())
        return result


@pytest.mark.parametrize(("beta", "top_k"), [(0.0, 3), (0.5, 1)])
def test_server_distillation_trainer_trains_as_trls(beta, top_k, tmp_path, tiny_tokenizer, tiny_examples,
                                                     monkeypatch):
    """A served teacher (``LocalTeacherServer``): TRL's forward KL on the top-3 with the tail element, its mixed
    top-1 loss."""
    from datasets import Dataset

    import trl.generation.vllm_client

    monkeypatch.setattr(trl.generation.vllm_client, "VLLMClient", LocalTeacherServer)
    dataset = Dataset.from_list([{"prompt": example.prompt} for example in tiny_examples])
    config = dict(teacher_model_server_url="http://teacher", beta=beta, loss_top_k=top_k, max_completion_length=8,
                  **training_arguments(tmp_path))
    runs = [train_two_steps(trainer_class(model=tiny_model("student-sft"), args=config_class(**config),
                                          train_dataset=dataset, processing_class=tiny_tokenizer))
            for trainer_class, config_class in ((ours_experimental.ServerDistillationTrainer,
                                                 ours_experimental.ServerDistillationConfig),
                                                (TrlServerDistillationTrainer, TrlServerDistillationConfig))]
    assert_trains_as_trl(*runs, metrics=("loss", "grad_norm"))


# ---------------------------------------------------------------------------------------------------------------
# Logit transforms read from real models' configs.
# ---------------------------------------------------------------------------------------------------------------
def tiny_config(family: str, transform: float):
    """A one-layer ``family`` config over the tiny tokenizer's vocabulary with its logit transform set to
    ``transform``: Cohere's ``logit_scale`` (a factor), Granite's ``logits_scaling`` (a divisor), Falcon-H1's
    ``lm_head_multiplier`` (a factor), Gemma-2's ``final_logit_softcapping``."""
    import transformers

    shape = dict(vocab_size=449, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=2, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    if family == "cohere":
        return transformers.CohereConfig(**shape, logit_scale=transform)
    if family == "granite":
        return transformers.GraniteConfig(**shape, logits_scaling=transform)
    if family == "falcon_h1":
        return transformers.FalconH1Config(**shape, lm_head_multiplier=transform, mamba_d_ssm=32, mamba_n_heads=2,
                                           mamba_d_head=16, mamba_d_state=8, mamba_chunk_size=16)
    return transformers.Gemma2Config(**shape, head_dim=16, final_logit_softcapping=transform)


@pytest.mark.parametrize(("family", "student_transform", "teacher_transform"),
                         [("cohere", 0.125, 0.5), ("granite", 8.0, 2.0), ("falcon_h1", 0.3, 1.7), ("gemma2", 0.1, 0.2)])
def test_distillation_loss_is_the_divergence_of_the_models_own_logits(family, student_transform, teacher_transform,
                                                                      tmp_path, tiny_tokenizer, tiny_examples):
    """The models' scales as TRL reads them from their configs (a divisor for Granite), folded into the temperature,
    and Gemma-2's soft caps (0.1 and 0.2, below these random models' largest logits, ~0.5): the trainer's loss from
    hidden states is the float64 divergence of the logits the models compute themselves."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    student, teacher = (AutoModelForCausalLM.from_config(tiny_config(family, transform))
                        for transform in (student_transform, teacher_transform))
    args = trl.DistillationConfig(beta=0.5, temperature=0.8, **training_arguments(tmp_path))
    trainer = ours.DistillationTrainer(model=student, teacher_model=teacher, args=args, processing_class=tiny_tokenizer,
                                       train_dataset=Dataset.from_list([{"prompt": tiny_examples[0].prompt}]))
    prompt_ids, completion_ids = torch.randint(1, 449, (2, 6)), torch.randint(1, 449, (2, 5))
    completion_mask = torch.ones_like(completion_ids)
    completion_mask[1, 3:] = 0
    inputs = dict(prompt_ids=prompt_ids, prompt_mask=torch.ones_like(prompt_ids), completion_ids=completion_ids,
                  completion_mask=completion_mask)
    loss, _, _ = trainer._compute_loss(trainer.model, inputs, None)
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    with torch.no_grad():
        student_logits, teacher_logits = (model(input_ids).logits[:, 5:-1].double() for model in (student, teacher))
    mask = completion_mask.reshape(-1) != 0
    exact = reference.divergence(student_logits.reshape(-1, 449), teacher_logits.reshape(-1, 449), mask, 0.8, 449,
                                 "jsd", beta=0.5).sum() / mask.sum()
    torch.testing.assert_close(loss.detach().double(), exact, **FLOAT32)


# ---------------------------------------------------------------------------------------------------------------
# Memory of a trainer step.
# ---------------------------------------------------------------------------------------------------------------
def test_a_distillation_step_holds_fewer_vocabulary_sized_tensors_than_trls():
    """One DistillationTrainer step (compute_loss and its backward; benchmarks/distillation_step.py, model llama-8k:
    N = 256 completion tokens, V = 8192) in a fresh process: its peak extra resident memory in [N, V] float32 units.
    TRL 1.16's CPU tiles (two [N, 32768] float32 buffers and their temporaries) against our chunk's three [C, V]
    buffers (one chunk here: C = N): measured ~11.5 and ~3.2."""
    script = ("import json; from benchmarks.distillation_step import peak_step_bytes\n"
              "print(json.dumps({v: peak_step_bytes('llama-8k', v, 'reverse_kl', 'cpu') for v in ('ours', 'trl')}))")
    # Large tensors mmapped, so that the resident set sees them; one thread (the memory is the same).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    peak_nv = {variant: peak / (256 * 8192 * 4) for variant, peak in json.loads(done.stdout.splitlines()[-1]).items()}
    assert peak_nv["ours"] < 4.5 and peak_nv["trl"] > peak_nv["ours"] + 5, peak_nv
