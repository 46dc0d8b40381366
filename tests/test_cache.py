"""The offline top-k teacher cache (minillm_kernels/training/cache.py) on the tiny default: kd from a cache of the
whole vocabulary trains as the live teacher, with no teacher loaded; a top-k cache gives what the live top-k teacher
gives; seqkd and kd train on the cache's teacher answers; a truncated, corrupt, incomplete or mismatched cache is
refused naming what is wrong; a killed build resumes after its last whole shard, with the shards of an uninterrupted
build."""
from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from minillm_kernels.training import cache as teacher_cache
from minillm_kernels.training.cache import CacheError, TeacherCache
from minillm_kernels.training.tiny import checkpoint_dir

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 449  # the tiny tokenizer's
# a 40-prompt pool (about 400 response tokens), shards of about 150 tokens (3 of them), 3 steps of 8 pairs
DATA = ["--pool-size", "40", "--validation-size", "10", "--threads", "1"]
FAST = [*DATA, "--batch-size", "8", "--max-new-tokens", "8", "--eval-every", "0", "--warmup-steps", "0",
        "--eval-samples", "0", "--eval-size", "4", "--steps", "3"]
SHARDS = ["--shard-tokens", "150", "--build-batch-size", "8"]


def load_train():
    spec = importlib.util.spec_from_file_location("example_train_for_cache", ROOT / "examples" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TRAIN = load_train()


def build(out: Path, top_k: int, *extra: str) -> None:
    teacher_cache.main(["build", "--out", str(out), "--teacher-top-k", str(top_k), *DATA, *SHARDS, *extra])


def train_log(out_dir: Path, *extra: str) -> list[dict]:
    TRAIN.main([*FAST, "--out-dir", str(out_dir), "--cache-dir", str(out_dir.parent / "answers"), *extra])
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def steps(log: list[dict], *keys: str) -> list[tuple[float, ...]]:
    return [tuple(record[key] for key in keys) for record in log if "kd_loss" in record or "sft_loss" in record]


@pytest.fixture(scope="module")
def whole_vocabulary(tmp_path_factory) -> Path:
    """A cache of k = V of the 40-pool's gold pairs."""
    out = tmp_path_factory.mktemp("caches") / "k449"
    build(out, VOCAB)
    return out


@pytest.fixture(scope="module")
def top8(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("caches") / "k8"
    build(out, 8)
    return out


def no_teacher(monkeypatch) -> None:
    """Loading the teacher's weights fails from here on."""
    def refuse(*args, **kwargs):
        raise AssertionError("the teacher was loaded")
    monkeypatch.setattr(TRAIN, "load_teacher", refuse)


def test_kd_from_a_cache_of_the_whole_vocabulary_trains_as_the_live_teacher(whole_vocabulary, tmp_path,
                                                                             monkeypatch):
    """k = V: the sparse divergence is the dense one, so kd's losses, reverse KL and gradient norms of 3 steps are the
    live teacher's up to the float32 log-softmax's error, 8 eps_32 (1 + log V) relative in each log-probability
    (docs/design.md), which no step amplifies past that order; no teacher is loaded, and the log line says so."""
    live = train_log(tmp_path / "live", "--method", "kd")
    no_teacher(monkeypatch)
    cached = train_log(tmp_path / "cached", "--method", "kd", "--teacher-cache", str(whole_vocabulary))
    bound = 8 * torch.finfo(torch.float32).eps * (1 + math.log(VOCAB))
    keys = ("kd_loss", "reverse_kld", "grad_norm")
    assert len(steps(live, *keys)) == 3
    for one, two in zip(steps(live, *keys), steps(cached, *keys)):
        assert one == pytest.approx(two, rel=bound, abs=bound)
    compute = next(r["trained"] for r in cached if "trained" in r)["compute"]
    assert compute["teacher_forward_tokens"] == 0 and compute["teacher_cache"]["top_k"] == VOCAB
    results = json.loads((tmp_path / "cached" / "results.json").read_text())
    assert results["teacher"] is None and "| teacher |" not in (tmp_path / "cached" / "results.md").read_text()


def test_a_top_k_cache_gives_what_the_live_top_k_teacher_gives(top8, tmp_path, capsys):
    """kd from a cache of k = 8 and kd from the loaded teacher's top 8 (--teacher-top-k 8, the served-teacher
    interface in process) take the same numbers: the same losses, to float32 rounding; the log line names the form."""
    live = train_log(tmp_path / "live", "--method", "kd", "--teacher-top-k", "8")
    said = capsys.readouterr().err
    cached = train_log(tmp_path / "cached", "--method", "kd", "--teacher-cache", str(top8))
    assert "(loaded, as its top-8, bin tail, fused_sparse_divergence)" in said
    assert f"(not loaded: the offline top-8 cache {top8}, bin tail" in capsys.readouterr().err
    bound = 8 * torch.finfo(torch.float32).eps * (1 + math.log(VOCAB))
    for one, two in zip(steps(live, "kd_loss", "grad_norm"), steps(cached, "kd_loss", "grad_norm")):
        assert one == pytest.approx(two, rel=bound, abs=bound)


@pytest.mark.parametrize("method", [["--method", "seqkd"], ["--method", "kd", "--teacher-answers"]])
def test_seqkd_and_kd_on_teacher_answers_train_on_the_caches_answers(tmp_path_factory, tmp_path, monkeypatch, method):
    """A cache built with --teacher-answers holds the teacher's answers (sampled once, as seqkd's): seqkd and kd on
    them train on those pairs, no teacher loaded; what the answers cost is the build's."""
    out = tmp_path_factory.getbasetemp() / "answers-k4"
    if not out.exists():
        build(out, 4, "--teacher-answers", "--max-new-tokens", "8", "--cache-dir",
              str(tmp_path_factory.getbasetemp() / "answers"))
    cached = {(e.prompt, e.response) for e in TeacherCache(out).examples}
    seen = []
    from minillm_kernels.training.methods import KD, SFT

    for method_class in (SFT, KD):
        def spy(method_, run_, batch, loss=method_class.loss):
            for ids, labels in zip(batch.input_ids.tolist(), batch.labels.tolist()):
                first = next(i for i, label in enumerate(labels) if label != -100)
                seen.append((run_.tokenizer.decode(ids[: first + 1]),
                             run_.tokenizer.decode([t for t in labels if t != -100], skip_special_tokens=True)))
            return loss(method_, run_, batch)
        monkeypatch.setattr(method_class, "loss", spy)
    no_teacher(monkeypatch)
    log = train_log(tmp_path, *method, "--teacher-cache", str(out))
    assert len(seen) == 3 * 8 and set(seen) <= cached
    assert next(r["trained"] for r in log if "trained" in r)["compute"]["answers"]["cached"]


def damaged(source: Path, directory: Path) -> Path:
    """A copy of the cache ``source`` in ``directory``."""
    shutil.copytree(source, directory)
    return directory


def test_a_truncated_corrupt_missing_or_incomplete_cache_is_refused(top8, tmp_path):
    TeacherCache(top8)  # intact
    shard = json.loads((top8 / "manifest.json").read_text())["shards"][1]["file"]

    truncated = damaged(top8, tmp_path / "truncated")
    data = (truncated / shard).read_bytes()
    (truncated / shard).write_bytes(data[: len(data) - 100])
    with pytest.raises(CacheError, match=rf"{shard}: truncated \({len(data) - 100:,} of {len(data):,} bytes\)"):
        TeacherCache(truncated)

    corrupt = damaged(top8, tmp_path / "corrupt")
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 1  # one bit of a log-probability
    (corrupt / shard).write_bytes(bytes(flipped))
    with pytest.raises(CacheError, match=rf"{shard}: corrupt \(its SHA-256 differs"):
        TeacherCache(corrupt)

    missing = damaged(top8, tmp_path / "missing")
    (missing / shard).unlink()
    with pytest.raises(CacheError, match=rf"{shard}: missing"):
        TeacherCache(missing)

    incomplete = damaged(top8, tmp_path / "incomplete")
    manifest = json.loads((incomplete / "manifest.json").read_text())
    (incomplete / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(CacheError, match=r"incomplete \(its build stopped after 40 of 40 pairs\)"):
        TeacherCache(incomplete)

    edited = damaged(top8, tmp_path / "edited")
    (edited / "examples.jsonl").write_text((top8 / "examples.jsonl").read_text().replace("a", "b", 1))
    with pytest.raises(CacheError, match="examples.jsonl: missing or changed since the build"):
        TeacherCache(edited)


@pytest.mark.parametrize("flags, named", [
    (["--teacher", str(checkpoint_dir("student-sft"))], r"teacher weights sha256: the cache's [0-9a-f]{12}\.\.\., "
                                                        r"this run's [0-9a-f]{12}\.\.\."),
    (["--temperature", "2"], "temperature: the cache's 1.0, this run's 2.0"),
    (["--teacher-top-k", "4"], "k: the cache's 8, this run's --teacher-top-k 4"),
    (["--max-length", "30"], "max length: the cache's 512, this run's 30"),
    (["--pool-size", "50"], "10 of this run's 50 training pairs are not in"),
    (["--teacher-answers"], "targets: the cache's 'gold answers', this run's 'teacher answers'"),
], ids=["teacher", "temperature", "k", "max-length", "data", "targets"])
def test_a_cache_built_for_another_run_is_refused_naming_what_differs(top8, tmp_path, monkeypatch, flags, named):
    """Before any training step, and with no teacher loaded."""
    no_teacher(monkeypatch)
    with pytest.raises(SystemExit, match=named):
        train_log(tmp_path, "--method", "kd", "--teacher-cache", str(top8), *flags)
    assert not (tmp_path / "log.jsonl").exists()


def test_the_teacher_is_its_weights_not_its_name(top8, tmp_path):
    """The same weights under another path are the same teacher; without its weights on this machine (a Hub id not
    downloaded) the name is all there is to compare."""
    from minillm_kernels.training.config import parse_args
    from minillm_kernels.training.models import load_tokenizer

    config = parse_args([*DATA, "--method", "kd"])
    copy = shutil.copytree(checkpoint_dir("teacher"), tmp_path / "teacher-copy")
    settings = teacher_cache.run_settings(config, load_tokenizer(config.model), None)
    cache = TeacherCache(top8)
    cache.check({**settings, "teacher": str(copy), "teacher weights sha256": cache.manifest["settings"][
        "teacher weights sha256"]})
    with pytest.raises(CacheError, match="teacher: the cache's 'tiny', this run's 'org/another-teacher'"):
        cache.check({**settings, "teacher": "org/another-teacher"})


def test_a_cache_s_tokenizer_is_checked(top8):
    """A tokenizer with another vocabulary is named (the row lookup by token ids would miss every row anyway)."""
    from minillm_kernels.training.config import parse_args
    from minillm_kernels.training.models import load_tokenizer

    config = parse_args([*DATA, "--method", "kd"])
    tokenizer = load_tokenizer(config.model)
    tokenizer.add_tokens(["<an added token>"])
    with pytest.raises(CacheError, match="tokenizer sha256: the cache's"):
        TeacherCache(top8).check(teacher_cache.run_settings(config, tokenizer, None))


def test_a_killed_build_resumes_after_its_last_whole_shard(top8, tmp_path, monkeypatch, capsys):
    """The build dies while writing its second shard (after the first one's rename and manifest): its manifest lists
    one shard and says incomplete (a read refuses it), the half-written file is a temporary one. The same command goes
    on from the first shard's last row and writes the shards of an uninterrupted build, byte for byte; then prints the
    bytes per token."""
    written, write_shard = [], teacher_cache.write_shard

    def dies_on_the_second(directory, manifest, rows, first_row, end_row):
        if written:
            (directory / "shard-00001.safetensors.tmp").write_bytes(b"half a shard")
            raise KeyboardInterrupt("killed")
        written.append(end_row)
        write_shard(directory, manifest, rows, first_row, end_row)

    monkeypatch.setattr(teacher_cache, "write_shard", dies_on_the_second)
    out = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        build(out, 8)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["rows"] for s in manifest["shards"]] == [[0, written[0]]] and not manifest["complete"]
    with pytest.raises(CacheError, match=f"incomplete \\(its build stopped after {written[0]} of 40 pairs\\)"):
        TeacherCache(out)
    monkeypatch.setattr(teacher_cache, "write_shard", write_shard)
    capsys.readouterr()
    build(out, 8)
    assert "bytes per token (k = 8, float32" in capsys.readouterr().err
    assert not list(out.glob("*.tmp*"))
    resumed, whole = (json.loads((d / "manifest.json").read_text()) for d in (out, top8))
    assert [(s["rows"], s["sha256"]) for s in resumed["shards"]] == [(s["rows"], s["sha256"]) for s in whole["shards"]]
    # k (id, log p) pairs of 4 + 4 bytes and log P_R per response token, plus the rows' tokens and the headers
    assert resumed["bytes per token"] == whole["bytes per token"] > 8 * (4 + 4) + 4
    TeacherCache(out)
    with pytest.raises(SystemExit, match="holds a cache of other settings \\(top_k: the cache's 8, this run's 4\\)"):
        build(out, 4)


def test_runs_of_one_plan_each_take_their_own_teacher_form(top8, tmp_path):
    """A plan (examples/compare.py's) whose runs differ in form: the teacher loaded once for the run that needs it, the
    cache opened for the run that names it; each run's record says which it had."""
    from minillm_kernels.training.config import parse_args
    from minillm_kernels.training.data import load_training_data

    base = parse_args([*FAST, "--method", "kd", "--out-dir", str(tmp_path)])
    cached = parse_args([*FAST, "--method", "kd", "--teacher-cache", str(top8), "--out-dir", str(tmp_path / "c")])
    data = load_training_data(base.data, seed=0)
    results = TRAIN.distill(base, data, [("kd", base, tmp_path / "live"), ("kd (cache)", cached, tmp_path / "c")],
                            references=False, test=False)
    live, from_cache = (run["compute"] for run in results["runs"])
    assert live["teacher_cache"] is None and live["teacher_forward_tokens"] > 0
    assert from_cache["teacher_cache"]["top_k"] == 8 and from_cache["teacher_forward_tokens"] == 0
