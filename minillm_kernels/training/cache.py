"""An offline top-k teacher cache: the teacher run once over the training pairs (the gold answers, or with
--teacher-answers / --method seqkd the teacher's own answers), stored per response token as its top-k ids and
log-probabilities and the tail's log-mass, so that kd (on either) and seqkd train with no teacher loaded.

    python -m minillm_kernels.training.cache build --out CACHE --teacher-top-k 64 [examples/train.py's flags]
    python -m minillm_kernels.training.cache verify CACHE
    python examples/train.py --method kd --teacher-cache CACHE [the same data flags]

The build takes examples/train.py's flags and loads the data exactly as a run does (--data, --pool-size, the
validation split, --chat-template, --max-length, --temperature; with --teacher-answers the teacher's answers, kd's and
seqkd's, sampled with --seed, --max-new-tokens and --cache-dir), so that a run with the same flags finds every pair it
draws; --teacher-top-k is the k it keeps.

Format (version 1), a directory:
    manifest.json      the format and version; "settings" (what a run must agree with: the teacher's name and the
                       SHA-256 of its weight files, the tokenizer's SHA-256, the temperature, --max-length, the chat
                       template, what the responses are: gold answers or the teacher's, with the answers' seed and
                       length); "layout" (k, the log-probabilities' dtype, the rows, the SHA-256 of examples.jsonl,
                       the shard and batch sizes); "shards", each with its row range, response tokens, bytes and
                       SHA-256; "complete" (false while building); the build's cost and the bytes per token.
    examples.jsonl     the rows' {"prompt", "response"} in order (the chat template applied)
    shard-NNNNN.safetensors   consecutive rows:
        sequences [tokens] int32, sequence_offsets [rows + 1] int64   each row's token ids (prompt, response, EOS, cut
                       to --max-length): the key a teacher-forced batch's row is found by
        label_offsets [rows + 1] int64     each row's response tokens (its labelled positions) in the arrays below
        ids [labels, k] int32, logprobs [labels, k] (--dtype: float32 by default), tail_logprob [labels] float32

Why safetensors: already the trainer's dependency, memory-mapped (a lookup reads only the rows a batch needs), no
pickle (a cache from elsewhere runs no code), each array with its dtype and shape, readable from any framework; the
rows are fixed-width, so Arrow's columnar tables would add a dependency for nothing here.

Why the tail's log-mass is stored, and why 1 - sum is mostly enough: the kernels take the top-k and derive
P_R = 1 - sum_k p_k. The build computes the log-softmax in float64 and stores each log p_k correctly rounded
(``teacher.sparse_scores``), so that sum errs by about eps_32 / 2 sum_k p_k |log p_k| (at most ~6e-8 times the
top-k's entropy), where a float32 log-softmax adds a few eps_32 (1 + log V) to every log p_k (docs/design.md, "The
trainer without the teacher in memory", has the figures). A tail smaller than that (a confident teacher, a large k)
is lost and may round to P_R = 0, where the reverse KL is +inf wherever the student has mass. So
the build also stores log P_R, from the full softmax as a log-sum over the tail itself (its relative precision
however small P_R is), 4 bytes per token, for a kernel argument that takes it instead of 1 - sum (not in the kernel
API yet; the reader returns it as ``SparseTeacher.tail_logprob``).

Resumable: each shard is written to a temporary name and renamed, then the manifest (the same way); a killed build
run again with the same command goes on after its last whole shard (shards end on batch boundaries, so the resumed
build's shards are those of an uninterrupted one). Verified on read (``TeacherCache``): the manifest's format, a
complete build, every shard's size and SHA-256 and examples.jsonl's; ``check`` refuses a cache built for another
teacher, tokenizer, temperature, length or k, naming what differs; a run's pair missing from it is refused before
training.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from tqdm.auto import tqdm

from minillm_kernels.training.data import (
    IGNORE_INDEX, Example, TeacherForcedBatch, causal_lm_logits, load_training_data, teacher_answers,
    teacher_forced_batch, with_chat_template,
)
from minillm_kernels.training.methods import TEACHER_ANSWERS
from minillm_kernels.training.teacher import SparseTeacher, empty_teacher, sparse_scores

FORMAT, VERSION = "minillm-kernels teacher cache", 1
MANIFEST, EXAMPLES = "manifest.json", "examples.jsonl"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHARD_TOKENS = 1 << 18  # response tokens per shard (at k = 64 in float32, 516 bytes each: about 135 MB)
BUILD_BATCH = 32  # rows per teacher forward pass


class CacheError(ValueError):
    """A teacher cache that cannot be used: incomplete, truncated, corrupt, or built for another run."""


def run_settings(config, tokenizer, teacher_sha256: Optional[str]) -> dict[str, Any]:
    """What a cache must agree with a run on (``TrainConfig`` ``config``, its ``tokenizer``; ``teacher_sha256``: the
    SHA-256 of its teacher's weight files, None where they are not on this machine: not compared)."""
    from minillm_kernels.training.models import tokenizer_sha256

    answers = config.method.trains_on == TEACHER_ANSWERS
    return {"teacher": config.model.teacher, "teacher weights sha256": teacher_sha256,
            "tokenizer sha256": tokenizer_sha256(tokenizer), "temperature": config.sampling.temperature,
            "max length": config.data.max_length, "chat template": config.data.chat_template,
            "targets": TEACHER_ANSWERS if answers else "gold answers",
            "answers": {"seed": config.run.seed, "max new tokens": config.data.max_new_tokens} if answers else None}


def differences(cached: dict, wanted: dict) -> list[str]:
    """``"key: the cache's X, this run's Y"`` for each key whose wanted value (not None) differs; SHA-256s shortened.
    The teacher's name is compared only where its weights' SHA-256 is not known (the same weights under another path
    or name are the same teacher)."""
    def shown(value: Any) -> str:
        return f"{value[:12]}..." if isinstance(value, str) and len(value) == 64 else repr(value)

    named_only = wanted.get("teacher weights sha256") is None
    return [f"{key}: the cache's {shown(cached.get(key))}, this run's {shown(value)}"
            for key, value in wanted.items()
            if value is not None and cached.get(key) != value and (key != "teacher" or named_only)]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def write_atomically(path: Path, text: str) -> None:
    """``text`` into ``path`` through a temporary file renamed over it: a reader sees the old file or the new one."""
    temporary = path.with_name(f"{path.name}.tmp{os.getpid()}")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def read_manifest(directory: Path) -> dict:
    """The manifest of a cache directory; CacheError if it is missing, not JSON, or of another format or version."""
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CacheError(f"{directory}: no {MANIFEST}: not a teacher cache (build one with `python -m "
                         "minillm_kernels.training.cache build`)") from None
    except json.JSONDecodeError as error:
        raise CacheError(f"{path}: not valid JSON ({error.msg} at line {error.lineno}): the cache is damaged; "
                         "build it again") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CacheError(f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r}; this "
                         f"version reads {FORMAT!r} version {VERSION}: build the cache again")
    return manifest


# ----------------------------------------------------------------------------------------------- building

@dataclasses.dataclass
class ShardRows:
    """The rows of the shard being built, as lists of per-row tensors."""

    sequences: list = dataclasses.field(default_factory=list)  # [length] int32 each
    ids: list = dataclasses.field(default_factory=list)  # [labels, k] int32 each
    logprobs: list = dataclasses.field(default_factory=list)  # [labels, k]
    tail_logprob: list = dataclasses.field(default_factory=list)  # [labels] float32
    tokens: int = 0

    def tensors(self) -> dict[str, torch.Tensor]:
        def offsets(parts: list) -> torch.Tensor:
            return torch.tensor([0] + [len(part) for part in parts], dtype=torch.int64).cumsum(0)

        return {"sequences": torch.cat(self.sequences), "sequence_offsets": offsets(self.sequences),
                "label_offsets": offsets(self.ids), "ids": torch.cat(self.ids), "logprobs": torch.cat(self.logprobs),
                "tail_logprob": torch.cat(self.tail_logprob)}


def write_shard(directory: Path, manifest: dict, rows: ShardRows, first_row: int, end_row: int) -> None:
    """The next shard (rows ``first_row`` to ``end_row``) written to a temporary name and renamed, then the manifest
    listing it (with its size and SHA-256)."""
    path = directory / f"shard-{len(manifest['shards']):05d}.safetensors"
    temporary = path.with_name(path.name + ".tmp")
    from safetensors.torch import save_file

    save_file(rows.tensors(), str(temporary))
    os.chmod(temporary, 0o644)  # (safetensors writes 0600: a cache is read by other users' runs too)
    os.replace(temporary, path)
    manifest["shards"].append({"file": path.name, "rows": [first_row, end_row], "tokens": rows.tokens,
                               "bytes": path.stat().st_size, "sha256": file_sha256(path)})
    write_atomically(directory / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def build(config, out: Path, top_k: int, *, dtype: str = "float32", shard_tokens: int = SHARD_TOKENS,
          batch_size: int = BUILD_BATCH, device: Optional[torch.device] = None, progress: bool = True) -> dict:
    """Build (or go on with) the cache of ``config``'s run (a ``TrainConfig``: its teacher, data and targets) in
    ``out``: per response token of each training pair the teacher's top ``top_k`` (``sparse_scores``: ids, log p in
    ``dtype``, log P_R), in shards of about ``shard_tokens`` response tokens, ``batch_size`` pairs per teacher pass.
    A cache of other settings in ``out`` is refused (CacheError naming them); a complete one is left as it is. Returns
    the manifest; prints the bytes per token."""
    from minillm_kernels.training.models import load_teacher, teacher_directory, weights_sha256

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher, tokenizer = load_teacher(config.model, device)
    data = load_training_data(config.data, seed=config.run.seed)
    data = with_chat_template(data, tokenizer) if config.data.chat_template else data
    settings = run_settings(config, tokenizer, weights_sha256(teacher_directory(config.model)))
    answers = None
    if settings["targets"] == TEACHER_ANSWERS:
        pairs, answers = teacher_answers(teacher, tokenizer, data.pool, seed=config.run.seed,
                                         max_new_tokens=config.data.max_new_tokens,
                                         cache_dir=Path(config.data.cache_dir), progress=progress)
    else:
        pairs = data.pairs
    examples = "".join(json.dumps({"prompt": e.prompt, "response": e.response}) + "\n" for e in pairs)
    vocab_size = min(len(tokenizer), teacher.get_output_embeddings().weight.shape[0])
    layout = {"top_k": top_k, "dtype": dtype, "rows": len(pairs),
              "examples sha256": hashlib.sha256(examples.encode()).hexdigest(), "shard tokens": shard_tokens,
              "batch size": batch_size}
    if not 1 <= top_k <= vocab_size:
        raise ValueError(f"--top-k {top_k}: must lie in [1, {vocab_size}] (the teacher's vocabulary)")
    if (out / MANIFEST).exists():
        manifest = read_manifest(out)
        changed = differences(manifest["settings"], settings) + differences(manifest["layout"], layout)
        if changed:
            raise CacheError(f"{out} holds a cache of other settings ({'; '.join(changed)}): delete it, or build into "
                             "another --out")
        if manifest["complete"]:
            print(f"{out}: complete already ({manifest['bytes per token']:.1f} bytes per token)", file=sys.stderr)
            return manifest
        for stray in out.glob("*.tmp*"):  # a shard or manifest being written when the build was killed
            stray.unlink()
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_atomically(out / EXAMPLES, examples)
        manifest = {"format": FORMAT, "version": VERSION, "settings": settings, "layout": layout,
                    "vocab size": vocab_size, "answers": answers, "shards": [], "complete": False,
                    "build": {"seconds": 0.0, "teacher forward tokens": 0}}
        write_atomically(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    start = manifest["shards"][-1]["rows"][1] if manifest["shards"] else 0
    rows, shard_start = ShardRows(), start
    bar = tqdm(total=len(pairs), initial=start, desc="teacher cache", unit="pairs", disable=not progress)
    for first in range(start, len(pairs), batch_size):
        started = time.time()
        part = pairs[first : first + batch_size]
        batch = teacher_forced_batch(tokenizer, [e.prompt for e in part], [e.response for e in part],
                                     max_length=config.data.max_length)
        batch = TeacherForcedBatch(*(x.to(device) for x in batch))
        mask = batch.labels != IGNORE_INDEX
        with torch.no_grad():
            logits = causal_lm_logits(teacher, batch.input_ids, batch.attention_mask)
        scores = sparse_scores(logits[mask], batch.labels[mask], top_k, config.sampling.temperature, vocab_size)
        counts = mask.sum(1).tolist()
        for b, (ids, logprobs, tail) in enumerate(zip(*(x.split(counts) for x in
                                                         (scores.ids, scores.logprobs, scores.tail_logprob)))):
            rows.sequences.append(batch.input_ids[b, : int(batch.attention_mask[b].sum())].to(torch.int32).cpu())
            rows.ids.append(ids.to(torch.int32).cpu())
            rows.logprobs.append(logprobs.to(DTYPES[dtype]).cpu())
            rows.tail_logprob.append(tail.float().cpu())
        rows.tokens += sum(counts)
        manifest["build"]["seconds"] += time.time() - started
        manifest["build"]["teacher forward tokens"] += int(batch.attention_mask.sum())
        end = first + len(part)
        if rows.tokens >= shard_tokens or end == len(pairs):
            write_shard(out, manifest, rows, shard_start, end)
            rows, shard_start = ShardRows(), end
        bar.update(len(part))
    bar.close()
    tokens = sum(shard["tokens"] for shard in manifest["shards"])
    size = sum(shard["bytes"] for shard in manifest["shards"])
    manifest.update({"complete": True, "response tokens": tokens, "bytes": size,
                     "bytes per token": size / max(tokens, 1)})
    write_atomically(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    print(f"{out}: {len(pairs)} pairs, {tokens} response tokens, {size:,} bytes in {len(manifest['shards'])} "
          f"shard(s): {size / max(tokens, 1):.1f} bytes per token (k = {top_k}, {dtype}; the teacher's float32 "
          f"logits: {4 * vocab_size:,})", file=sys.stderr)
    return manifest


# ----------------------------------------------------------------------------------------------- reading

class TeacherCache:
    """A verified teacher cache (module docstring), memory-mapped: ``check`` it against a run, then ``lookup`` the
    teacher of each teacher-forced batch. CacheError (naming the file and what is wrong) for an incomplete build, a
    missing, truncated or corrupt shard, or a damaged examples.jsonl."""

    def __init__(self, directory: str | Path) -> None:
        from safetensors import safe_open

        self.directory = Path(directory)
        self.manifest = manifest = read_manifest(self.directory)
        if not manifest["complete"]:
            done = manifest["shards"][-1]["rows"][1] if manifest["shards"] else 0
            raise CacheError(f"{self.directory}: incomplete (its build stopped after {done} of "
                             f"{manifest['layout']['rows']} pairs): run the build command again to finish it")
        examples = self.directory / EXAMPLES
        if not examples.is_file() or file_sha256(examples) != manifest["layout"]["examples sha256"]:
            raise CacheError(f"{examples}: missing or changed since the build (its SHA-256 differs): build the cache "
                             "again")
        self.examples = [Example("all", record["prompt"], record["response"])
                         for record in map(json.loads, examples.read_text(encoding="utf-8").splitlines())]
        self.shards, self.label_offsets, self.index = [], [], {}
        for number, shard in enumerate(manifest["shards"]):
            path = self.directory / shard["file"]
            if not path.is_file():
                raise CacheError(f"{path}: missing: build the cache again")
            if path.stat().st_size != shard["bytes"]:
                raise CacheError(f"{path}: truncated ({path.stat().st_size:,} of {shard['bytes']:,} bytes): build the "
                                 "cache again")
            if file_sha256(path) != shard["sha256"]:
                raise CacheError(f"{path}: corrupt (its SHA-256 differs from the manifest's): build the cache again")
            handle = safe_open(str(path), framework="pt")
            self.shards.append(handle)
            self.label_offsets.append(handle.get_tensor("label_offsets").tolist())
            sequences, offsets = handle.get_tensor("sequences"), handle.get_tensor("sequence_offsets").tolist()
            for row in range(len(offsets) - 1):
                self.index[sequences[offsets[row] : offsets[row + 1]].numpy().tobytes()] = (number, row)

    @property
    def top_k(self) -> int:
        return self.manifest["layout"]["top_k"]

    def summary(self) -> dict:
        """What the cache holds and cost: k, dtype, response tokens, bytes per token, the build's seconds and teacher
        forward tokens (for a run's record)."""
        manifest = self.manifest
        return {"path": str(self.directory), "top_k": self.top_k, "dtype": manifest["layout"]["dtype"],
                "response_tokens": manifest["response tokens"], "bytes_per_token": manifest["bytes per token"],
                "build_seconds": manifest["build"]["seconds"],
                "build_teacher_forward_tokens": manifest["build"]["teacher forward tokens"]}

    def check(self, settings: dict, top_k: Optional[int] = None) -> None:
        """CacheError naming every difference between the cache's settings and a run's (``run_settings``; None
        values are not compared) and its k and --teacher-top-k (if given)."""
        changed = differences(self.manifest["settings"], settings)
        if top_k is not None and top_k != self.top_k:
            changed.append(f"k: the cache's {self.top_k}, this run's --teacher-top-k {top_k}")
        if changed:
            raise CacheError(f"{self.directory} was built for another run ({'; '.join(changed)}): build a cache with "
                             "this run's flags (python -m minillm_kernels.training.cache build), or run with the "
                             "cache's")

    def pairs_for(self, pairs: Sequence[Example]) -> None:
        """CacheError unless every (prompt, response) of ``pairs`` is one of the cache's rows."""
        held = {(e.prompt, e.response) for e in self.examples}
        missing = [e for e in pairs if (e.prompt, e.response) not in held]
        if missing:
            raise CacheError(f"{len(missing)} of this run's {len(pairs)} training pairs are not in {self.directory} "
                             f"(e.g. {missing[0].prompt!r:.60}); it holds {len(self.examples)} rows of other data: "
                             "build it with this run's data flags")

    def answers(self, prompts: Sequence[Example]) -> list[Example]:
        """The cache's teacher answer to each of ``prompts`` (the pool's examples), in order; CacheError for a
        prompt it has none for."""
        answer = {e.prompt: e.response for e in self.examples}
        missing = [e for e in prompts if e.prompt not in answer]
        if missing:
            raise CacheError(f"{self.directory} has no teacher answer for {len(missing)} of this run's {len(prompts)} "
                             f"prompts (e.g. {missing[0].prompt!r:.60}): build it with this run's data flags")
        return [e._replace(response=answer[e.prompt]) for e in prompts]

    def lookup(self, batch: TeacherForcedBatch) -> SparseTeacher:
        """The cached teacher of a teacher-forced batch, ``[B, L, K]`` (position i: the distribution of token i + 1),
        filled at the labelled positions (filler elsewhere: ``empty_teacher``), each row found by its tokens;
        CacheError for a row the cache does not hold (other data, tokenizer or --max-length)."""
        batch_size, length = batch.input_ids.shape
        device = batch.input_ids.device
        teacher = empty_teacher((batch_size, length), self.top_k, device)
        logprobs = teacher.logprobs.to(DTYPES[self.manifest["layout"]["dtype"]])
        tail = torch.full((batch_size, length), float("-inf"), device=device)
        ids = teacher.ids.to(torch.int32)
        labelled = batch.labels != IGNORE_INDEX
        for b in range(batch_size):
            tokens = batch.input_ids[b, : int(batch.attention_mask[b].sum())].to(torch.int32).cpu()
            found = self.index.get(tokens.numpy().tobytes())
            positions = labelled[b].nonzero().flatten()
            if found is None:
                raise CacheError(f"{self.directory} has no row of these tokens (a training pair of other data, "
                                 "tokenizer or --max-length than the cache's build)")
            shard, row = found
            start, end = self.label_offsets[shard][row], self.label_offsets[shard][row + 1]
            if end - start != len(positions):
                raise CacheError(f"{self.directory}: a row has {end - start} cached response tokens, the batch "
                                 f"{len(positions)}")
            handle = self.shards[shard]
            ids[b, positions] = handle.get_slice("ids")[start:end].to(device)
            logprobs[b, positions] = handle.get_slice("logprobs")[start:end].to(device)
            tail[b, positions] = handle.get_slice("tail_logprob")[start:end].to(device)
        return SparseTeacher(ids, logprobs, None, tail)


def verify(directory: str | Path) -> TeacherCache:
    """The cache of ``directory`` verified (``TeacherCache``), with a line on what it holds."""
    cache = TeacherCache(directory)
    summary = cache.summary()
    print(f"{directory}: complete and intact: {len(cache.examples)} pairs, {summary['response_tokens']} response "
          f"tokens, k = {cache.top_k} ({summary['dtype']}), {summary['bytes_per_token']:.1f} bytes per token; "
          f"teacher {cache.manifest['settings']['teacher']}", file=sys.stderr)
    return cache


def main(argv: Optional[list[str]] = None) -> None:
    from minillm_kernels.training.config import argument_parser, config_from

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["verify"] and len(argv) == 2:
        try:
            verify(argv[1])
        except CacheError as error:
            raise SystemExit(str(error)) from None
        return
    if argv[:1] != ["build"]:
        raise SystemExit("usage: python -m minillm_kernels.training.cache build --out DIR --teacher-top-k K "
                         "[examples/train.py's flags] | verify DIR")
    parser = argument_parser(__doc__)
    own = parser.add_argument_group("the cache")
    own.add_argument("--out", required=True, help="the cache directory (a killed build goes on there)")
    own.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="the log-probabilities' dtype (float32: "
                     "bf16 rounds a tail mass to about 1e-3)")
    own.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS, help="response tokens per shard (about)")
    own.add_argument("--build-batch-size", type=int, default=BUILD_BATCH, help="pairs per teacher forward pass")
    parser.set_defaults(method="kd")  # (the pairs: kd's gold answers, or with --teacher-answers the teacher's)
    args = parser.parse_args(argv[1:])
    if args.method != "kd" or not args.teacher_top_k:
        parser.error("the build takes --teacher-top-k K (the log-probabilities kept per token) and, for the teacher's "
                     "answers (kd's --teacher-answers and seqkd's), --teacher-answers; not --method")
    config = config_from(parser, args)
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    try:
        build(config, Path(args.out), args.teacher_top_k, dtype=args.dtype, shard_tokens=args.shard_tokens,
              batch_size=args.build_batch_size)
    except CacheError as error:
        raise SystemExit(str(error)) from None


if __name__ == "__main__":
    main()
