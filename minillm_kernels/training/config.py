"""The trainer's settings: typed groups of plain values, each field one command-line flag (``OptimConfig.batch_size``
is ``--batch-size``), and the checks that run before anything is loaded.

``argument_parser`` builds the flags from the fields (``flags.flag``: their default, help and argparse options sit at
the field), those of the shared groups and of each method's options (``methods.METHODS``: a method that brings flags
declares them as its ``Options`` dataclass); ``config_from`` checks the parsed arguments and resolves the defaults that
depend on others (the learning rate on the student, ``--lm-coef`` on ``--lm-data``, the lengths on the data).
``TrainConfig.flags()`` is the flat ``{flag: value}`` view a checkpoint stores and a resumed run compares.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, TypeVar

from minillm_kernels import objective
from minillm_kernels.reference import SPARSE_TAILS
from minillm_kernels.training.data import cache_root
from minillm_kernels.training.flags import add_flags, at_least, flag, from_args
from minillm_kernels.training.methods import METHODS, TEACHER_ANSWERS, Method
from minillm_kernels.training.tiny import MAX_NEW_TOKENS

TINY_LR = 1e-4  # the one departure from the reference defaults: the tiny student (see the README)
REFERENCE_LR = 5e-6  # the MiniLLM reference scripts' learning rate, tuned for 0.1-13B models
NAMED_MODELS = ("tiny", "smollm2")
SCORE_NAME = re.compile(r"\w+\.\w+")  # --select-by: <group or task>.<metric>
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # what from_pretrained may fetch from the Hub
Options = TypeVar("Options")


@dataclass(frozen=True)
class ModelConfig:
    """models"""

    teacher: str = flag("tiny", "'tiny', 'smollm2', a saved model directory or a Hugging Face Hub id")
    student: str = flag("tiny", "'tiny' (the shipped SFT student), 'smollm2' (the teacher cut to --student-layers), "
                                "a saved model directory or a Hub id")
    student_layers: int = flag(6, "smollm2 student: layers kept (evenly spaced)", type=at_least(1))


@dataclass(frozen=True)
class RunConfig:
    """the run"""

    method: str = flag("minillm", "the training method", choices=tuple(METHODS))
    teacher_answers: bool = flag(False, "kd: teacher-forced on the teacher's cached T=1 answers (seqkd's targets) "
                                        "instead of the gold")
    seed: int = flag(0, "the training seed: data order, rollouts, the teacher's answers")
    out_dir: str = flag("out/train", "log.jsonl, checkpoint.pt, student/ and the results")
    resume: bool = flag(False, "continue from --out-dir's checkpoint.pt (checkpoint/ with --fsdp; none there: a "
                               "warning, then a fresh start)")
    eval_every: int = flag(100, "validation eval every N steps, each one a candidate for the chosen checkpoint (0: "
                                "before/after only)", type=at_least(0))
    select_by: str = flag("gold.rouge_l", "the greedy validation score, <group or task>.<metric> of the evaluation "
                                          "(gold.rouge_l: the paper's Rouge-L), that chooses the checkpoint (and the "
                                          "tuned settings of examples/compare.py)")
    save_every: int = flag(100, "checkpoint every N steps (and at the end)", type=at_least(1))
    eval_samples: int = flag(3, "the final (test) evaluation samples at T=1 with this many seeds (0, 1, ...) "
                                "besides greedy", type=at_least(0))
    fused_linear: bool = flag(False, "minillm and gkd: per-token terms from the models' last hidden states and "
                                     "output layers (fused_linear_token_stats), so the rollout's [tokens x V] "
                                     "logits are never built")
    bf16: bool = flag(False, "bfloat16 autocast (GPU; slow on most CPUs)")
    fsdp: bool = flag(False, "under torchrun: shard the student (per decoder layer and as a whole) and the frozen "
                             "teacher with FSDP2 instead of DDP; on GPU bf16 compute, fp32 weights and gradient "
                             "reduction; sharded checkpoints (checkpoint/ instead of checkpoint.pt)")
    threads: Optional[int] = flag(None, "torch CPU threads (default: torch's choice)", type=at_least(1))


@dataclass(frozen=True)
class DataConfig:
    """data"""

    data: str = flag("tiny", "'tiny' or a JSONL of {prompt, response?, task?}; a row without response is a prompt "
                             "only")
    eval_data: Optional[str] = flag(None, "JSONL of held-out {prompt, response, task?} (tiny: its split); a row "
                                          "without a response is an error naming its line", type=str)
    eval_size: Optional[int] = flag(None, "evaluate on the first N held-out examples only", type=at_least(1))
    validation_size: Optional[int] = flag(None, "gold pairs drawn from the pool (and taken out of it) for the "
                                                "validation evaluations that choose the checkpoint (default: a tenth "
                                                "of the pool's gold pairs, at most 500; 0: none, the last checkpoint)",
                                          type=at_least(0))
    validation_seed: int = flag(0, "the seed that draws the validation split (not the training seed: one split for "
                                   "every run)")
    pool_size: Optional[int] = flag(None, "train on the first N prompts of the pool only", type=at_least(1))
    chat_template: bool = flag(False, "wrap every prompt in the tokenizer's chat template (always on for --teacher "
                                      "smollm2)")
    lm_data: Optional[str] = flag(None, "JSONL of {text} pre-training text for L_PT, in every method", type=str)
    cache_dir: Optional[str] = flag(None, "the teacher's cached answers (default: $MINILLM_CACHE/teacher-answers or "
                                          "~/.cache/minillm_kernels/teacher-answers)", type=str)
    max_new_tokens: Optional[int] = flag(None, "rollout, teacher-answer and eval length (tiny: 40; else 128)",
                                         type=at_least(1))
    max_length: int = flag(512, "teacher-forced sequences are cut to this", type=at_least(1))


@dataclass(frozen=True)
class OptimConfig:
    """optimizer and schedule"""

    steps: int = flag(400, "optimizer steps", type=at_least(1))
    batch_size: int = flag(32, "sequences per optimizer step (per process)", type=at_least(1))
    grad_accum: int = flag(1, "micro-batches per optimizer step", type=at_least(1))
    lr: Optional[float] = flag(None, "default: 5e-6 (reference); 1e-4 for the tiny student", type=float)
    warmup_steps: int = flag(100, "linear warm-up, then constant (reference MiniLLM scripts: --warmup-iters 100)",
                             type=at_least(0))
    weight_decay: float = flag(1e-6, "AdamW's")
    betas: tuple[float, float] = flag((0.9, 0.95), "AdamW's", nargs=2, type=float)
    grad_clip: float = flag(1.0, "the gradient norm is clipped to this")

    def learning_rate(self, step: int) -> float:
        """--lr after a linear warm-up over the first --warmup-steps steps: lr * min(1, (step + 1) / warmup)."""
        return self.lr * min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else self.lr


@dataclass(frozen=True)
class SamplingConfig:
    """temperature and the rollouts' filters"""

    temperature: float = flag(1.0, "T of every divergence and of the rollouts' sampling")
    top_k: int = flag(0, "rollouts: top-k filter (0: none)", type=at_least(0))
    top_p: float = flag(1.0, "rollouts: top-p filter (1: none)")


@dataclass(frozen=True)
class PretrainConfig:
    """L_PT, the pre-training loss added to every method's"""

    lm_coef: Optional[float] = flag(None, "weight of L_PT (default: 1, the reference's, with --lm-data; 0 without)",
                                    type=float)
    lm_kd_ratio: float = flag(0.0, "L_PT = (1 - r) CE + r teacher soft-CE -sum_v p_v log q_v (paper: 0; reference "
                                   "code: 0.5)")


@dataclass(frozen=True)
class TeacherConfig:
    """the teacher's form: in memory (default), its top-k, an offline cache or a server"""

    teacher_top_k: Optional[int] = flag(None, "the teacher as its top-k log-probabilities per token (the "
                                              "served-teacher interface: over the loaded --teacher, or from "
                                              "--teacher-server): the losses are fused_sparse_divergence's, the tail "
                                              "completed by --teacher-tail (kd, opd, minillm with --alpha 0)",
                                        type=at_least(1))
    teacher_tail: str = flag("bin", "how a top-k teacher's tail (the mass outside its K ids) is completed "
                                    "(fused_sparse_divergence's tail=)", choices=SPARSE_TAILS)
    teacher_cache: Optional[str] = flag(None, "kd (--teacher-answers too) and seqkd: the teacher from this offline "
                                              "top-k cache (python -m minillm_kernels.training.cache build), no "
                                              "teacher loaded", type=str)
    teacher_server: Optional[str] = flag(None, "kd, opd and minillm (--alpha 0): the teacher served at this URL, "
                                               "vLLM's OpenAI-compatible API root (http://host:8000/v1; --teacher "
                                               "names the served model, --teacher-top-k its K), no teacher loaded",
                                         type=str)

    @property
    def form(self) -> Optional[str]:
        """The teacher's form: "cache", "server", "top-k" (over the loaded teacher) or None (dense, in memory)."""
        return ("cache" if self.teacher_cache else "server" if self.teacher_server else
                "top-k" if self.teacher_top_k else None)

    @property
    def loaded(self) -> bool:
        """Whether the run loads the teacher's weights (not when it is cached or served)."""
        return self.form not in ("cache", "server")


SHARED_GROUPS = {"model": ModelConfig, "run": RunConfig, "data": DataConfig, "optim": OptimConfig,
                 "sampling": SamplingConfig, "lm": PretrainConfig, "teacher": TeacherConfig}


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a run: the shared groups, and each method's options (``options(MiniLLMOptions).alpha``)."""

    model: ModelConfig = ModelConfig()
    run: RunConfig = RunConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    sampling: SamplingConfig = SamplingConfig()
    lm: PretrainConfig = PretrainConfig()
    teacher: TeacherConfig = TeacherConfig()
    method_options: dict = dataclasses.field(
        default_factory=lambda: {kind: kind() for kind in options_classes()})

    def options(self, kind: type[Options]) -> Options:
        """The options of ``kind`` (a method's ``Options`` class)."""
        return self.method_options[kind]

    @property
    def method(self) -> Method:
        """The method of --method, with these settings."""
        return METHODS[self.run.method](self)

    def replace_run(self, **changes: Any) -> TrainConfig:
        """This config with ``changes`` to its run group (another method or seed)."""
        return dataclasses.replace(self, run=dataclasses.replace(self.run, **changes))

    def resolved(self) -> TrainConfig:
        """This config with the defaults that depend on other settings filled in (where left None): the learning rate
        (the tiny student's, else the reference's), --lm-coef (1 with --lm-data, else 0), the lengths (the tiny
        default's, else 128), the chat template (on for smollm2) and the teacher-answer cache."""
        model, data, optim, lm = self.model, self.data, self.optim, self.lm
        return dataclasses.replace(
            self,
            lm=dataclasses.replace(lm, lm_coef=lm.lm_coef if lm.lm_coef is not None else
                                   objective.LM_COEF if data.lm_data else 0.0),
            optim=dataclasses.replace(optim, betas=tuple(optim.betas), lr=optim.lr if optim.lr is not None else
                                      TINY_LR if model.student == "tiny" else REFERENCE_LR),
            data=dataclasses.replace(
                data, chat_template=data.chat_template or model.teacher == "smollm2",
                cache_dir=data.cache_dir or str(cache_root() / "teacher-answers"),
                max_new_tokens=data.max_new_tokens or (MAX_NEW_TOKENS if data.data == "tiny" else 128)),
        )

    def flags(self) -> dict[str, Any]:
        """``{flag name: value}`` of every setting (``batch_size``, ``alpha``...), as JSON values (tuples become
        lists): what a checkpoint and results.json store."""
        groups = [getattr(self, name) for name in SHARED_GROUPS] + list(self.method_options.values())
        return json.loads(json.dumps({name: value for group in groups
                                      for name, value in dataclasses.asdict(group).items()}))


def options_classes() -> list[type]:
    """Each ``Options`` class that a method of ``METHODS`` declares, once."""
    return list(dict.fromkeys(cls.Options for cls in METHODS.values() if cls.Options is not None))


def argument_parser(description: str) -> argparse.ArgumentParser:
    """Every flag of ``TrainConfig``: one argument group per config group and per method's options."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for kind in [*SHARED_GROUPS.values(), *options_classes()]:
        add_flags(parser, kind)
    return parser


def config_from(parser: argparse.ArgumentParser, args: argparse.Namespace) -> TrainConfig:
    """The ``TrainConfig`` of parsed ``args``, checked (``parser.error`` names the flag and the fix) and with the
    defaults that depend on other flags resolved. Reads no file and loads no model."""
    config = TrainConfig(**{name: from_args(kind, args) for name, kind in SHARED_GROUPS.items()},
                         method_options={kind: from_args(kind, args) for kind in options_classes()})
    model, run, data, optim = config.model, config.run, config.data, config.optim
    if run.fsdp and "RANK" not in os.environ:
        parser.error("--fsdp shards the models over the processes of torchrun: run "
                     "`torchrun --nproc_per_node N examples/train.py --fsdp ...` (or drop --fsdp for one process)")
    error = config.method.argument_error()
    if error:
        parser.error(error)
    if run.fsdp and config.method.trains_on == TEACHER_ANSWERS:
        parser.error("the teacher's answers (seqkd, --teacher-answers) are generated by one process with the whole "
                     "teacher: drop --fsdp (DDP or one process)")
    if optim.batch_size % optim.grad_accum:
        parser.error(f"--batch-size ({optim.batch_size}) must be a multiple of --grad-accum ({optim.grad_accum})")
    if model.student == "smollm2" and model.teacher != "smollm2":
        parser.error("--student smollm2 is the smollm2 teacher cut to fewer layers: use --teacher smollm2")
    for name in ("teacher", "student"):
        value = getattr(model, name)
        if value not in NAMED_MODELS and not Path(value).exists() and not HUB_ID.fullmatch(value):
            parser.error(f"--{name} {value}: no such directory (give a saved model directory, a Hugging Face Hub id "
                         f"such as 'namespace/name', or one of {NAMED_MODELS})")
    for name, value in (("data", None if data.data == "tiny" else data.data), ("eval-data", data.eval_data),
                        ("lm-data", data.lm_data)):
        if value is not None and not Path(value).is_file():
            parser.error(f"--{name} {value}: no such file")
    if not SCORE_NAME.fullmatch(run.select_by):
        parser.error(f"--select-by {run.select_by}: give <group or task>.<metric> of the evaluation's scores, e.g. "
                     "gold.rouge_l, gold.exact_match or open.valid")
    if config.lm.lm_coef is not None and config.lm.lm_coef != 0 and not data.lm_data:
        parser.error(f"--lm-coef {config.lm.lm_coef}: L_PT needs pre-training text, --lm-data")
    teacher = config.teacher
    if teacher.teacher_cache and teacher.teacher_server:
        parser.error("--teacher-cache and --teacher-server: give one (the teacher is cached offline, or served)")
    if teacher.teacher_cache and not Path(teacher.teacher_cache).is_dir():
        parser.error(f"--teacher-cache {teacher.teacher_cache}: no such directory (build it with `python -m "
                     "minillm_kernels.training.cache build --out DIR --top-k K` and the run's data flags)")
    if teacher.teacher_server and not teacher.teacher_top_k:
        parser.error("--teacher-server: give --teacher-top-k K, the top-k log-probabilities the server returns per "
                     "token (at most its --max-logprobs)")
    if teacher.form is not None and teacher.form != "top-k" and config.lm.lm_kd_ratio:
        parser.error(f"--lm-kd-ratio {config.lm.lm_kd_ratio}: the soft cross-entropy to the teacher needs the teacher "
                     "in memory: drop --teacher-cache / --teacher-server, or --lm-kd-ratio")
    if teacher.form is not None and run.fused_linear:
        parser.error("--fused-linear reads the teacher's hidden states and output layer: not with a top-k, cached or "
                     "served teacher (whose losses read K numbers per token of it)")
    return config.resolved()


def parse_args(argv: Optional[list[str]] = None, description: str = "") -> TrainConfig:
    """``config_from`` the command line ``argv`` (default: ``sys.argv[1:]``)."""
    parser = argument_parser(description)
    return config_from(parser, parser.parse_args(argv))
