"""DDP and FSDP2 for a Hugging Face causal LM: every use of a model runs inside one forward of one wrapper.

DDP synchronises the gradients of what ran inside its module's forward, and FSDP2 (``fully_shard``) gathers a
module's sharded parameters only inside its forward. A causal LM is used in ways that are not one call of its
forward: the sampler's steps with KV caches, ``generate``, and the fused-linear terms (``response_token_stats``
with a teacher head), which read the base model's hidden states and the lm_head weight without calling the lm_head.
So the model goes into a ``ModelRunner``, DDP or ``fully_shard`` wrap the ModelRunner as a whole, and every use goes
through its forward:

    runner(input_ids=..., attention_mask=...)       the model's own forward (the sampler, L_PT, KD)
    runner(response_token_stats, sample, ...)       response_token_stats(model, sample, ...) inside the forward
    runner(evaluate, tokenizer, examples, ...)      evaluate(model, ...) (generate) inside the forward

``parallelize`` builds it. Under FSDP2 (``--fsdp`` in the trainer) each decoder layer (a class named in the
model's ``_no_split_modules``) is one group, gathered for its forward and resharded after it; the ModelRunner is the
root group, with the rest of the parameters (embeddings, final norm, lm_head; tied embeddings stay one parameter in
one group). A trained model's root keeps its parameters gathered from its forward until its backward has run
(FSDP2's default for a root: they are needed again at once); a frozen model's root reshards after every forward.
Gradients are reduce-scattered, averaged over the processes, at the end of every backward. Every process must make
the same forward calls in the same order (each one is a collective): the sampler's ``synced_processes`` and
``generate``'s ``synced_gpus`` keep their loops in step where the processes' responses end at different lengths.

Mixed precision (``mixed_precision``): on a GPU, FSDP2's ``MixedPrecisionPolicy(param_dtype=bfloat16,
reduce_dtype=float32)``: the parameters are gathered in bf16 for the forward and backward (half the all-gather
traffic and activation memory), the gradients reduce-scattered in fp32, and the sharded fp32 parameters are what the
optimizer updates. On the CPU, fp32 throughout (bf16 matmuls are slow on most CPUs: 8x on this project's). The
fused-linear kernels take each lm_head in the dtype it has inside the forward (bf16 under the policy).

``end_process_group`` ends a run's process group, FSDP2's included.

Sharded checkpoints (``save_sharded`` / ``load_sharded``): the model's and optimizer's state dicts as
``torch.distributed.checkpoint`` writes them, each process its own shards, loadable by any number of processes.
"""
from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist


class ModelRunner(torch.nn.Module):
    """``model`` (``self.module``), for DDP and FSDP2 to wrap as a whole: its forward runs the model, or a function
    of the model.

    ``runner(*args, **kwargs)`` is ``model(*args, **kwargs)``; ``runner(function, *args, **kwargs)`` (a first
    argument that is a function) is ``function(model, *args, **kwargs)``, inside the runner's forward, so that DDP
    and FSDP2 see everything the function does with the model. ``forward_parameters`` and ``unwrapped`` (sampling)
    see through it, as through DDP.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.module = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if args and callable(args[0]) and not isinstance(args[0], (torch.Tensor, torch.nn.Module)):
            function, *rest = args
            return function(self.module, *rest, **kwargs)
        return self.module(*args, **kwargs)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of a Hugging Face model: its modules whose class is named in ``_no_split_modules`` (what
    ``transformers`` itself keeps whole when it places a model); ValueError if it names none or none is found."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__} names no decoder layer class in _no_split_modules (got "
                         f"{names or None}): FSDP2 shards a model per decoder layer; pass a Hugging Face transformer")
    return layers


def mixed_precision(device: torch.device):
    """FSDP2's mixed-precision policy: bf16 parameters and fp32 gradient reduction on a GPU; fp32 throughout (the
    default policy) on the CPU."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device.type != "cuda":
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def shard(runner: ModelRunner, *, trainable: bool) -> ModelRunner:
    """``fully_shard`` of each decoder layer of ``runner.module``, then of ``runner`` (the root: embeddings, final
    norm, lm_head), over every process of the default group, with ``mixed_precision``. A frozen model's root
    reshards after every forward (``trainable=False``); a trained one's after its backward."""
    from torch.distributed.fsdp import fully_shard

    device = next(runner.parameters()).device
    policy = mixed_precision(device)
    for layer in decoder_layers(runner.module):
        fully_shard(layer, mp_policy=policy)
    fully_shard(runner, mp_policy=policy, reshard_after_forward=None if trainable else True)
    return runner


def parallelize(model: torch.nn.Module, *, fsdp: bool, trainable: bool) -> torch.nn.Module:
    """The module every use of ``model`` goes through: a ``ModelRunner``, sharded by FSDP2 (``shard``) with
    ``fsdp``, else wrapped by DDP if ``trainable`` under an initialised process group of several processes.

    DDP's ``forward_sync_buffers=False``: a causal LM has no running statistics (its buffers, e.g. the rotary
    frequencies, are constants), and without the broadcast a forward pass under ``torch.no_grad()`` (sampling,
    evaluation on rank 0) is no collective, so the processes may take different numbers of them.
    """
    runner = ModelRunner(model)
    if fsdp:
        return shard(runner, trainable=trainable)
    if trainable and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return torch.nn.parallel.DistributedDataParallel(runner, forward_sync_buffers=False)
    return runner


def end_process_group() -> None:
    """``dist.destroy_process_group()``, with the backend freed now: its threads end before the interpreter's shutdown.

    DTensor (FSDP2's parameters) caches its sharding plans beyond the models' lives, in C++ and in Python, with the
    device mesh in them, and a device mesh holds its process groups (``_pg_registry``, torch 2.11 to 2.13): after
    ``destroy_process_group`` alone, gloo's threads live on into the interpreter's shutdown, where one that reaches
    for the GIL aborts the process ("terminate called without an active exception", after the run's results were
    written). So every mesh left lets go of its groups, and the group goes with its last reference: call it once the
    models are out of use."""
    from torch.distributed.device_mesh import DeviceMesh

    dist.destroy_process_group()
    for mesh in [o for o in gc.get_objects() if isinstance(o, DeviceMesh)]:
        getattr(mesh, "_pg_registry", {}).clear()
    gc.collect()  # the models' FSDP states, in reference cycles, hold the group too


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model``'s parameters are sharded DTensors (FSDP2)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_tensor(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The whole tensor: a DTensor's ``full_tensor()`` (an all-gather: every process must call it), else itself."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part: a DTensor's local shard, else the tensor itself."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with whole tensors: for a sharded model gathered to rank 0, on the CPU (every process
    must call it; the others get an empty dict). A parameter under several names (tied embeddings) is one tensor
    under all of them, as in ``state_dict()``, so that ``save_pretrained`` writes it once."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    for first, *aliases in names.values():
        for alias in aliases if first in state else ():
            state[alias] = state[first]
    return state


def save_sharded(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """``torch.distributed.checkpoint.save`` of ``{"model", "optimizer"}`` state dicts into ``directory``: each
    process writes its shards (every process must call it). A failed write (a full disk) is a RuntimeError."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    try:
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=os.fspath(directory))
    except dcp.api.CheckpointException as error:  # a BaseException: re-raised as an error callers' handlers see
        raise RuntimeError(f"torch.distributed.checkpoint could not write {directory}: {error}") from error


def load_sharded(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restore what ``save_sharded`` wrote into ``model`` and ``optimizer`` (resharded to this group's processes)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=os.fspath(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
