"""The training methods, one class each, in one table (``METHODS``): what a method trains on, its batches and its
loss. The trainer's loop asks the run's method for a step's micro-batches and for each one's loss; nothing else
in it depends on the method.

    sft      cross-entropy on the pool's gold responses
    kd       token-level D(p, q) to the teacher (``fused_divergence``: the forward KL by default), teacher-forced on
             the gold responses (--teacher-answers: on the teacher's answers, as seqkd's)
    seqkd    cross-entropy on the teacher's answers (sampled once per pool prompt at T = 1, cached on disk)
    minillm  a buffer of --num-rollouts responses sampled from p~ = alpha p + (1 - alpha) q, rewards
             r_t = log p(y_t) - log q(y_t), then --ppo-epochs passes over it in shuffled minibatches of --batch-size,
             one optimizer step of L = L_pg + L_single each (``minillm_loss``)
    gkd      on-policy GKD (lambda = 1): fresh samples of the student each step, D(p, q) of --divergence (JSD(0.5)
             by default) teacher-forced on them (``response_divergence``)
    opd      on-policy distillation: fresh samples of the student each step, the teacher scores every sampled token;
             --opd-estimator sampled (advantage log p(y_t) - log q(y_t), importance-sampled policy gradient) or exact
             (the per-token reverse KL over the vocabulary, or under --teacher-tail with a top-k teacher)

The teacher's form (``config.TeacherConfig``): in memory (every method), its top-k through the served-teacher
interface (``training/teacher.py``: over the loaded teacher with --teacher-top-k, or --teacher-server; kd, opd, and
minillm at alpha 0), or an offline top-k cache (``training/cache.py``, --teacher-cache; kd and seqkd). A cached or
served teacher is not loaded; a top-k teacher's losses are ``fused_sparse_divergence``'s, with no [tokens x V] teacher
tensor on the trainer's side.

A new method is one class here, added to ``METHODS``: a subclass of ``TeacherForced`` (batches of prompt/response
pairs: the gold answers or the teacher's) or ``OnPolicy`` (rollouts of the student's own samples), with its
``loss``; flags of its own go in its ``Options`` dataclass (``config.flag`` fields), which the parser adds.
L_PT (``pretrain_loss``, --lm-data) is added to every method's loss by the loop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Optional

import torch
import torch.nn.functional as F

import minillm_kernels as mk
from minillm_kernels import objective
from minillm_kernels.reference import DIVERGENCES
from minillm_kernels.training.flags import at_least, flag
from minillm_kernels.training.data import IGNORE_INDEX, TeacherForcedBatch, causal_lm_logits, teacher_forced_batch
from minillm_kernels.training.rollout import epoch_minibatches, make_rollout
from minillm_kernels.training.teacher import SparseTeacher, sparse_response_divergence, sparse_response_token_stats

if TYPE_CHECKING:
    from minillm_kernels.training.config import TrainConfig
    from minillm_kernels.training.run import Run

GOLD_ANSWERS, TEACHER_ANSWERS, OWN_SAMPLES = "gold answers", "teacher answers", "own samples"  # what a method trains on
LossParts = tuple[torch.Tensor, dict[str, torch.Tensor]]  # (the loss, its detached parts to log)


@dataclass(frozen=True)
class DivergenceOptions:
    """kd and gkd: the divergence"""

    divergence: Optional[str] = flag(None, "kd's and gkd's per-token D(p, q) (fused_divergence; default: forward_kl "
                                           "for kd, jsd for gkd)", type=str, choices=DIVERGENCES)
    beta: float = flag(0.5, "--divergence jsd: beta (0.5: the symmetric JSD)")
    skew: float = flag(0.1, "--divergence skew_forward_kl / skew_reverse_kl: alpha")


@dataclass(frozen=True)
class MiniLLMOptions:
    """minillm (reference-code defaults; their sources are in minillm_kernels/objective.py)"""

    alpha: float = flag(0.2, "teacher share of the sampling mixture")
    num_rollouts: Optional[int] = flag(None, "the rollout buffer: sequences sampled at once (per process), a multiple "
                                             "of --batch-size (default: --batch-size, each epoch one full-batch "
                                             "step; the reference code's --num-rollouts)", type=at_least(1))
    ppo_epochs: int = flag(4, "passes over each rollout buffer, each in shuffled minibatches of --batch-size, one "
                              "optimizer step per minibatch", type=at_least(1))
    ppo_clip: float = flag(objective.PPO_CLIP, "PPO clip range on the ratio")
    gamma: float = flag(objective.GAMMA, "discount of the future rewards")
    reward_scaling: float = flag(objective.REWARD_SCALING, "rewards are divided by it")
    reward_clip: float = flag(objective.REWARD_CLIP, "then clipped to +-this")
    no_whiten: bool = flag(False, "do not whiten the advantages")
    whiten_over: str = flag("valid", "whitening statistics over the valid tokens (ours), or over the whole padded "
                                     "[B, T] tensor with the unbiased variance (the reference code's)",
                            choices=objective.WHITEN_OVER)
    single_step: str = flag("weighted", "L_single: mean of w_t KL_t (the paper's) or of KL_t (the reference code's)",
                            choices=("weighted", "unweighted"))
    single_step_coef: float = flag(objective.SINGLE_STEP_COEF, "weight of L_single")
    dropout: bool = flag(False, "the student's dropout on in the PPO and L_PT passes (reference: off, eval() mode; "
                                "rollouts are always sampled in eval() mode)")


class Method:
    """A training method: what it trains on, its micro-batches and its loss, with the settings of one run."""

    name: ClassVar[str]
    targets: ClassVar[str]  # what it trains on: GOLD_ANSWERS, TEACHER_ANSWERS or OWN_SAMPLES
    shown_loss: ClassVar[str]  # the loss part the progress bar shows
    Options: ClassVar[Optional[type]] = None  # its own flags: a dataclass of config.flag fields
    default_divergence: ClassVar[Optional[str]] = None  # a method of the divergence family: --divergence's default
    takes_teacher_answers: ClassVar[bool] = False  # --teacher-answers switches its gold answers to the teacher's
    teacher_forms: ClassVar[frozenset] = frozenset()  # the teacher's forms it takes besides the dense one in memory

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.options: Any = config.options(self.Options) if self.Options else None

    @property
    def trains_on(self) -> str:
        """GOLD_ANSWERS, TEACHER_ANSWERS (with --teacher-answers where the method takes it) or OWN_SAMPLES."""
        return TEACHER_ANSWERS if self.takes_teacher_answers and self.config.run.teacher_answers else self.targets

    @property
    def label(self) -> str:
        """The run's name in the results: the method, and what it trains on where a flag changed it."""
        return f"{self.name} (teacher answers)" if self.trains_on != self.targets else self.name

    @property
    def trains_with_dropout(self) -> bool:
        """Whether the student's dropout is on in the updates (fine-tuning's default)."""
        return True

    def argument_error(self) -> Optional[str]:
        """What is wrong with the flags for this method, or None."""
        run, options = self.config.run, self.config.options(DivergenceOptions)
        if run.teacher_answers and not self.takes_teacher_answers:
            owners = " and ".join(f"{name}'s" for name, method in METHODS.items() if method.takes_teacher_answers)
            return (f"--teacher-answers is {owners} (seqkd always trains on the teacher's answers), not --method "
                    f"{self.name}")
        if options.divergence is not None and self.default_divergence is None:
            owners = " and ".join(f"{name}'s" for name, method in METHODS.items() if method.default_divergence)
            return f"--divergence is {owners}, not --method {self.name}"
        form = self.config.teacher.form
        if form is not None and form not in self.teacher_forms:
            flag = {"cache": "--teacher-cache", "server": "--teacher-server", "top-k": "--teacher-top-k"}[form]
            owners = ", ".join(name for name, method in METHODS.items() if form in method.teacher_forms)
            return f"{flag} is for --method {owners}, not {self.name}"
        return None

    def micro_batches(self, run: Run) -> list:
        """This step's --grad-accum micro-batches of --batch-size / --grad-accum rows, for ``loss``."""
        raise NotImplementedError

    def loss(self, run: Run, micro_batch: Any) -> LossParts:
        """The method's loss on one micro-batch (a scalar with its graph) and its parts to log."""
        raise NotImplementedError

    def divergence_options(self) -> dict:
        """--divergence (unset: this method's default) and its parameters, as ``fused_divergence`` takes them."""
        options = self.config.options(DivergenceOptions)
        return {"divergence": options.divergence or self.default_divergence, "beta": options.beta,
                "skew": options.skew, "temperature": self.config.sampling.temperature}


class TeacherForced(Method):
    """Trained on prompt/response pairs of the pool (the gold answers, or the teacher's), teacher-forced."""

    def micro_batches(self, run: Run) -> list[TeacherForcedBatch]:
        optim, max_length = self.config.optim, self.config.data.max_length
        micro = optim.batch_size // optim.grad_accum
        pairs = [run.samplers["pairs"].next(micro) for _ in range(optim.grad_accum)]
        return [run.to_device(teacher_forced_batch(run.tokenizer, [e.prompt for e in examples],
                                                   [e.response for e in examples], max_length=max_length))
                for examples in pairs]


class OnPolicy(Method):
    """Trained on rollouts of the student's own samples, drawn from alpha p + (1 - alpha) q with alpha =
    ``sampling_alpha``: a buffer (``Rollout``) of ``rollout_size`` sequences, then ``epochs_per_rollout`` passes over
    it, each in shuffled minibatches of --batch-size (``epoch_minibatches``), one optimizer step per minibatch; then a
    fresh buffer."""

    targets = OWN_SAMPLES

    @property
    def sampling_alpha(self) -> float:
        """The teacher's share of the sampling mixture: 0, the student alone."""
        return 0.0

    @property
    def rollout_size(self) -> int:
        """Sequences sampled into one buffer: --batch-size, one step's."""
        return self.config.optim.batch_size

    @property
    def epochs_per_rollout(self) -> int:
        """Passes over one buffer: 1, fresh samples for every minibatch."""
        return 1

    @property
    def steps_per_rollout(self) -> int:
        """Optimizer steps on one buffer: its epochs times its minibatches of --batch-size."""
        return self.epochs_per_rollout * self.rollout_size // self.config.optim.batch_size

    @property
    def reads_teacher_distribution(self) -> bool:
        """Whether the loss reads the teacher's distribution at the response positions (its logits, hidden states or
        top-k), not only log p(y_t) of the sampled tokens."""
        return True

    def argument_error(self) -> Optional[str]:
        batch_size = self.config.optim.batch_size
        if self.rollout_size % batch_size:
            return (f"--num-rollouts {self.rollout_size} must be a multiple of --batch-size {batch_size} (the buffer "
                    "is taken in minibatches of --batch-size)")
        if self.sampling_alpha and self.config.teacher.form is not None:
            return (f"--alpha {self.sampling_alpha} samples from the teacher mixture, which needs the teacher's whole "
                    "distribution at every step: with a top-k or served teacher give --alpha 0 (the student samples "
                    "alone), or drop --teacher-top-k / --teacher-server")
        return super().argument_error()

    def micro_batches(self, run: Run) -> list:
        """This step's minibatch of the buffer in --grad-accum micro-batches ``(sample, rewards, teacher_outputs,
        teacher_head)``, after a fresh buffer every ``steps_per_rollout`` steps (which stops first if a weight is not
        finite: a diverged update or a bad checkpoint would fail inside the sampler's multinomial)."""
        config = self.config
        position = run.step % self.steps_per_rollout  # steps taken on the current buffer
        first_step = run.step - position
        if position == 0:
            run.stop_if_not_finite(run.largest_parameter(), "student parameter (largest |value|) before the rollout",
                                   {})
            generator = torch.Generator(run.device).manual_seed(
                config.run.seed * 1_000_003 + run.step * 1009 + run.rank)
            minillm = config.options(MiniLLMOptions)
            with run.autocast():
                run.rollout = make_rollout(run.model, run.teacher, run.tokenizer,
                                           run.samplers["prompts"].next(self.rollout_size), generator,
                                           run.vocab_size, config, alpha=self.sampling_alpha,
                                           reward_scaling=minillm.reward_scaling, reward_clip=minillm.reward_clip,
                                           scorer=run.scorer, distribution=self.reads_teacher_distribution)
            # a dense teacher ran on every token while sampling, then once more on the sequences if the loss reads its
            # distribution (response_logits); a scoring teacher scores the sequences once
            passes = 1 if run.scorer is not None or not self.reads_teacher_distribution else 2
            run.compute["teacher_forward_tokens"] += passes * int(run.rollout.sample.attention_mask.sum())
            run.compute["generated_tokens"] += int(run.rollout.sample.response_mask.sum())
        per_epoch = run.rollout.size // config.optim.batch_size
        epoch, minibatch = divmod(position, per_epoch)
        rows = epoch_minibatches(run.rollout.size, config.optim.batch_size,
                                 seed=f"seed {config.run.seed} step {first_step} rank {run.rank} epoch {epoch}")
        return list(run.rollout.chunks(config.optim.grad_accum, rows[minibatch]))


def token_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` log q(label) per position (0 where the label is IGNORE_INDEX), float32 (float64 for float64
    logits)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return -F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none",
                            ignore_index=IGNORE_INDEX).view(labels.shape)


def cross_entropy_loss(model, batch: TeacherForcedBatch) -> torch.Tensor:
    """Mean -log q(y_t) over a teacher-forced batch's labelled tokens."""
    logits = causal_lm_logits(model, batch.input_ids, batch.attention_mask)
    return mk.language_modeling_loss(token_logprob(logits, batch.labels), batch.labels != IGNORE_INDEX)


def pretrain_loss(run: Run, batch: TeacherForcedBatch) -> torch.Tensor:
    """L_PT on pre-training text: the student's cross-entropy (the paper's), or with --lm-kd-ratio r the reference
    code's (1 - r) CE + r (-mean_t sum_v p_v log q_v), a soft cross-entropy to the teacher on the same text."""
    ratio = run.config.lm.lm_kd_ratio
    logits = causal_lm_logits(run.model, batch.input_ids, batch.attention_mask)
    mask = batch.labels != IGNORE_INDEX
    loss = mk.language_modeling_loss(token_logprob(logits, batch.labels), mask)
    if not ratio:
        return loss
    soft_targets = run.teacher_logits(batch)[mask].float().softmax(-1)
    soft = F.cross_entropy(logits[..., : run.vocab_size][mask].float(), soft_targets)
    return (1 - ratio) * loss + ratio * soft


class SFT(TeacherForced):
    """sft: cross-entropy on the gold responses."""

    name, targets, shown_loss = "sft", GOLD_ANSWERS, "sft_loss"

    def loss(self, run: Run, batch: TeacherForcedBatch) -> LossParts:
        loss = cross_entropy_loss(run.model, batch)
        return loss, {"sft_loss": loss.detach()}


class SeqKD(SFT):
    """seqkd: cross-entropy on the teacher's answers (Kim and Rush, 2016); with --teacher-cache the cache's answers,
    no teacher loaded."""

    name, targets, teacher_forms = "seqkd", TEACHER_ANSWERS, frozenset({"cache"})


class KD(TeacherForced):
    """kd: token-level D(p, q) of --divergence, teacher-forced, mean over the response tokens (``fused_divergence``:
    by default the forward KL(p || q) = sum_v p_v (log p_v - log q_v)); with a top-k teacher (a cache, a server or
    --teacher-top-k) ``fused_sparse_divergence`` under --teacher-tail. The reverse KL of the same positions is
    logged for comparison."""

    name, targets, shown_loss, Options = "kd", GOLD_ANSWERS, "kd_loss", DivergenceOptions
    default_divergence, takes_teacher_answers = "forward_kl", True
    teacher_forms = frozenset({"top-k", "cache", "server"})

    def loss(self, run: Run, batch: TeacherForcedBatch) -> LossParts:
        logits = causal_lm_logits(run.model, batch.input_ids, batch.attention_mask)
        mask = batch.labels != IGNORE_INDEX
        sparse = run.sparse_teacher(batch)
        if sparse is None:
            teacher = run.teacher_logits(batch)
            loss = mk.fused_divergence(logits, teacher, mask=mask, vocab_size=run.vocab_size,
                                       **self.divergence_options())
            with torch.no_grad():
                reverse = mk.fused_reverse_kld(logits, teacher, mask=mask,
                                               temperature=self.config.sampling.temperature, vocab_size=run.vocab_size)
            return loss, {"kd_loss": loss.detach(), "reverse_kld": reverse}
        options = {**self.divergence_options(), "mask": mask, "vocab_size": run.vocab_size,
                   "tail": self.config.teacher.teacher_tail}
        loss = mk.fused_sparse_divergence(logits, sparse.ids, sparse.logprobs, **options)
        with torch.no_grad():
            reverse = mk.fused_sparse_divergence(logits, sparse.ids, sparse.logprobs,
                                                 **{**options, "divergence": "reverse_kl"})
        return loss, {"kd_loss": loss.detach(), "reverse_kld": reverse}


def owned_token_stats(student, *args, **options) -> mk.TokenStats:
    """``mk.response_token_stats(student, *args, **options)`` with each [B, N] field in its own storage (a clone of a
    few numbers per token): FSDP2 warns about every view its root's forward returns (an in-place op on one would
    bypass its backward hook), and the kernels' per-token outputs are views."""
    stats = mk.response_token_stats(student, *args, **options)
    return mk.TokenStats(*(None if x is None else x.clone() for x in stats))


class MiniLLM(OnPolicy):
    """minillm: L_pg + L_single (``mk.minillm_loss``) on a buffer of --num-rollouts samples of the teacher mixture,
    --ppo-epochs passes over it in shuffled minibatches of --batch-size (one optimizer step each; the advantages
    whitened per micro-batch), the student in eval() mode (no dropout, as the reference code: the first epoch's
    ratio is 1)."""

    name, shown_loss, Options = "minillm", "reward", MiniLLMOptions
    teacher_forms = frozenset({"top-k", "server"})

    @property
    def sampling_alpha(self) -> float:
        return self.options.alpha

    @property
    def rollout_size(self) -> int:
        return self.options.num_rollouts or self.config.optim.batch_size

    @property
    def epochs_per_rollout(self) -> int:
        return self.options.ppo_epochs

    @property
    def trains_with_dropout(self) -> bool:
        return self.options.dropout

    def loss(self, run: Run, micro_batch) -> LossParts:
        """Every vocabulary-wide term through ``mk.response_token_stats`` inside the student's ModelRunner forward
        (``run.model``): fused_token_stats from the logits, or with --fused-linear (a ``teacher_head``)
        fused_linear_token_stats from the last hidden states and output layers, so that DDP all-reduces and FSDP2
        gathers the lm_head as for any forward."""
        sample, rewards, teacher_outputs, teacher_head = micro_batch
        options = self.options
        if isinstance(teacher_outputs, SparseTeacher):  # (alpha 0: argument_error)
            stats = run.model(sparse_response_token_stats, sample, teacher_outputs,
                              temperature=self.config.sampling.temperature, vocab_size=run.vocab_size,
                              tail=self.config.teacher.teacher_tail)
        else:
            stats = run.model(owned_token_stats, sample, teacher_outputs, teacher_head,
                              temperature=self.config.sampling.temperature, mix_alpha=options.alpha,
                              vocab_size=run.vocab_size)
        return mk.minillm_loss(
            stats, sample.student_logprob, rewards, sample.importance_weight, sample.response_mask,
            gamma=options.gamma, whiten=not options.no_whiten, whiten_over=options.whiten_over,
            clip=options.ppo_clip, single_step_coef=options.single_step_coef,
            weighted_single_step=options.single_step == "weighted",
        )


class GKD(OnPolicy):
    """gkd: on-policy GKD (Agarwal et al., 2024, with lambda = 1): D(p, q) of --divergence (default the JSD(beta)) on
    the student's own samples, teacher-forced, mean over the response tokens; the gradient through q only (no policy
    gradient). ``mk.response_divergence`` inside the student's ModelRunner forward, from the logits or with
    --fused-linear from the hidden states."""

    name, shown_loss, Options, default_divergence = "gkd", "gkd_loss", DivergenceOptions, "jsd"

    def loss(self, run: Run, micro_batch) -> LossParts:
        sample, _, teacher_outputs, teacher_head = micro_batch
        loss = run.model(mk.response_divergence, sample, teacher_outputs, teacher_head, vocab_size=run.vocab_size,
                         **self.divergence_options())
        return loss, {"gkd_loss": loss.detach()}


OPD_ESTIMATORS = ("sampled", "exact")


@dataclass(frozen=True)
class OPDOptions:
    """opd: the estimator"""

    opd_estimator: str = flag("sampled", "sampled: the policy gradient with advantage log p(y_t) - log q(y_t) (needs "
                                         "log p of the sampled tokens only); exact: the per-token reverse KL over "
                                         "the vocabulary (or under --teacher-tail with a top-k teacher)",
                              choices=OPD_ESTIMATORS)


def response_logprob(model: torch.nn.Module, sample: mk.TeacherMixedSample, *, temperature: float,
                     vocab_size: int) -> torch.Tensor:
    """``[B, N]`` log q(y_t) = log softmax(s[:vocab_size] / T)(y_t) of the student ``model`` on ``sample``'s responses
    (a fresh forward pass, with its graph; 0 where masked): what the sampler recorded as log q_old."""
    logits = mk.response_logits(model, sample)[..., :vocab_size] / temperature
    return token_logprob(logits, sample.response_ids.masked_fill(~sample.response_mask, IGNORE_INDEX))


class OPD(OnPolicy):
    """opd: on-policy distillation (Agarwal et al., 2024, GKD with lambda = 1; Thinking Machines, "On-Policy
    Distillation", 2025; Qwen3): fresh samples y ~ q of the student each step (alpha 0), every sampled token scored by
    the teacher, no reward model; the updates in eval() mode (no dropout: the ratio below is 1 before the update).

    --opd-estimator sampled (the Tinker cookbook's on-policy distillation recipe): the per-token advantage
        A_t = -(log q_old(y_t) - log p(y_t)), with discount 0 (no future tokens in it) and the importance-sampled
        policy-gradient loss L = -mean_t exp(log q(y_t) - log q_old(y_t)) A_t (``mk.ppo_policy_loss`` with
        clip=None: Tinker's ``importance_sampling`` loss). Its expected gradient over y_t ~ q(. | y_<t) is the gradient
        of the per-token reverse KL: E[(log q - log p)(y) d log q(y)] = d KL(q || p), as E[d log q(y)] = 0. It needs
        log p of the sampled tokens only (a served teacher's ``prompt_logprobs`` of them).
    --opd-estimator exact: L = mean_t KL(q || p)_t over the whole vocabulary, differentiated directly (GKD's
        on-policy reverse KL; TRL's GKDTrainer / DistillationTrainer with beta = 1, lambda = 1):
        ``mk.response_divergence`` with the teacher in memory, ``fused_sparse_divergence`` under --teacher-tail with a
        top-k teacher. The same gradient in expectation, without the sampling noise of y_t; it needs the teacher's
        distribution.

    Both take the mean over the response tokens of the batch; the enumeration test (tests/test_opd.py) checks that the
    sampled estimator's expected gradient is the exact one's for responses of a fixed length (a length that depends
    on the sample makes the mean's divisor random, as in any token-mean policy gradient)."""

    name, shown_loss, Options = "opd", "opd_loss", OPDOptions
    teacher_forms = frozenset({"top-k", "server"})

    @property
    def trains_with_dropout(self) -> bool:
        return False

    @property
    def reads_teacher_distribution(self) -> bool:
        return self.options.opd_estimator == "exact"

    def loss(self, run: Run, micro_batch) -> LossParts:
        """The estimator's loss and, logged, the per-token reverse KL (exact) or its sampled estimate
        mean_t (log q_old - log p)(y_t) (sampled)."""
        sample, _, teacher_outputs, teacher_head = micro_batch
        temperature, mask = self.config.sampling.temperature, sample.response_mask
        if self.options.opd_estimator == "exact":
            if isinstance(teacher_outputs, SparseTeacher):
                loss = run.model(sparse_response_divergence, sample, teacher_outputs, divergence="reverse_kl",
                                 tail=self.config.teacher.teacher_tail, temperature=temperature,
                                 vocab_size=run.vocab_size)
            else:
                loss = run.model(mk.response_divergence, sample, teacher_outputs, teacher_head,
                                 divergence="reverse_kl", temperature=temperature, vocab_size=run.vocab_size)
            return loss, {"opd_loss": loss.detach(), "reverse_kld": loss.detach()}
        advantages = mk.log_ratio_rewards(sample.teacher_logprob - sample.student_logprob, mask, reward_scaling=None,
                                          reward_clip=None)
        logprob = run.model(response_logprob, sample, temperature=temperature, vocab_size=run.vocab_size)
        loss = mk.ppo_policy_loss(logprob, sample.student_logprob, advantages, mask, clip=None)
        return loss, {"opd_loss": loss.detach(), "reverse_kld": -advantages.sum() / mask.sum().clamp(min=1)}


METHODS: dict[str, type[Method]] = {method.name: method for method in (SFT, KD, SeqKD, MiniLLM, GKD, OPD)}
