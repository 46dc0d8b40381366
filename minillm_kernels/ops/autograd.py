"""The custom ops' gradients: one formula per op, registered on the op and as an ``autograd.Function``; first order.

``op.register_autograd`` makes a ``torch.library`` custom op differentiable under ``torch.autograd`` and
``torch.compile``, but not under the ``torch.func`` transforms (grad, vjp, jacrev, vmap): the ``autograd.Function``
torch generates for the op has no ``setup_context`` (pytorch/pytorch#168393). ``differentiable(op, backward,
setup_context)`` registers the formula on the op and returns a function that calls the op through an
``autograd.Function`` with the same ``setup_context`` and ``backward``, which every transform takes (while
torch.compile traces, and no input requires grad, the op itself): the package's functions call that. Under ``vmap``
the ops run once per batch element (torch's fallback, which warns that it is slow).

The gradients are computed by the kernels (or, for the fused-linear reductions, in the forward pass): they have no
derivative of their own. ``first_order`` makes that an error where it matters: when a graph of the gradient
is asked for (``create_graph=True``, or nested ``torch.func`` transforms), the gradient it returns carries a node whose
backward raises ``SECOND_ORDER``, naming what is supported, instead of a gradient that silently has no graph (or a
derivative silently 0). A first-order ``torch.func.grad``, which asks for a graph, still works.
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch

Backward = Callable[..., Any]

SECOND_ORDER = (
    "{op}: the fused kernels' gradients are first order: backward, torch.autograd.grad and torch.func.grad / vjp / "
    "jacrev / vmap are supported, differentiating a gradient again (double backward, a Hessian, a gradient penalty) "
    "and forward-mode AD (torch.func.jvp / jacfwd) are not, on any backend. For those, write the loss with the naive "
    "formulas of minillm_kernels.reference (plain PyTorch: reference.divergence, reference.token_stats, ...)."
)


class _FirstOrderGradient(torch.autograd.Function):
    """A copy of ``gradient`` whose own gradient raises ``message``. ``anchors``, the tensors the gradient depends on
    that require grad, make it part of their graph."""

    generate_vmap_rule = True

    @staticmethod
    def forward(gradient: torch.Tensor, message: str, *anchors: torch.Tensor) -> torch.Tensor:
        return gradient.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.message = inputs[1]

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(ctx.message)


def first_order(op: str) -> Callable[[Backward], Backward]:
    """A decorator of ``backward(ctx, *grads)`` (an ``autograd.Function``'s, or a custom op's formula) computing the
    gradients of ``op``: run without a graph, its gradients marked first order (``_FirstOrderGradient``) where the
    caller asked for a graph of them; as it is otherwise (the usual case: no cost)."""
    message = SECOND_ORDER.format(op=op)

    def decorate(backward: Backward) -> Backward:
        @functools.wraps(backward)
        def first_order_backward(ctx, *grads):
            if not torch.is_grad_enabled():
                return backward(ctx, *grads)
            with torch.no_grad():
                result = backward(ctx, *grads)
            anchors = tuple(x for x in (*ctx.saved_tensors, *grads) if isinstance(x, torch.Tensor) and x.requires_grad)
            if not anchors:
                return result
            return tuple(_FirstOrderGradient.apply(g, message, *anchors) if isinstance(g, torch.Tensor) else g
                         for g in result)

        return first_order_backward

    return decorate


def differentiable(op: Any, backward: Callable[..., tuple], setup_context: Callable[..., None]) -> Callable[..., Any]:
    """Register ``backward`` (first order) and ``setup_context`` as the custom op ``op``'s autograd formula, and return
    ``op`` as the ``apply`` of an ``autograd.Function`` with that formula (positional arguments, the op's defaults
    for those left out)."""
    backward = first_order(op._qualname)(backward)
    op.register_autograd(backward, setup_context=setup_context)

    overload = op._opoverload  # (torch.compile traces a function calling it; one calling the op object it cannot)

    def forward(*args):
        return overload(*args)

    function = type(f"{op._name}_function", (torch.autograd.Function,), {
        "__doc__": f"{op._qualname} with its gradient, for torch.autograd and torch.func.",
        "generate_vmap_rule": True,
        "forward": staticmethod(forward),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward),  # (no jvp: torch.compile cannot trace a Function that has one)
    })
    # apply takes positional arguments only, and setup_context gets exactly those: the op's defaults fill the rest.
    defaults = tuple(parameter.default for parameter in inspect.signature(op._init_fn).parameters.values())

    def apply(*args):
        args = (*args, *defaults[len(args):])
        differentiated = torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in args)
        if torch.compiler.is_compiling() and not differentiated:
            return overload(*args)  # (torch.compile cannot trace this Function where no input requires grad)
        return function.apply(*args)  # (also without a gradient: forward-mode AD must meet the Function, not the op)

    return apply
