"""The MiniLLM terms over lm_heads split by vocabulary across processes (tensor parallelism), checked against one
process's unsharded loss.

    torchrun --standalone --nproc_per_node 2 examples/vocab_parallel.py     # gloo processes on the CPU

Every process builds the same random hidden states, lm_heads and sampled ids (one seed), splits both lm_heads by
vocabulary rows with ``ColwiseParallel(use_local_output=False)`` and computes the per-token terms twice: from the
DTensor logits the student's head returns (each process holds its [N, V / P] columns) and from the DTensor weights
(``fused_linear_token_stats``: no logits at all). Both are checked against the unsharded loss on the full weights,
values and gradients (grad h is the full gradient on every process; grad W each process's rows); rank 0 prints the
loss and what one call communicated.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

import minillm_kernels as mk

TOKENS, HIDDEN, WIDTH, VOCAB = (4, 32), 64, 1024, 1000  # 1024 lm_head rows, the first 1000 real


def token_loss(stats: mk.TokenStats) -> torch.Tensor:
    """A loss through every differentiable term: the single-step KL, a policy-gradient-like log q(y), the entropy."""
    return (stats.reverse_kld - 0.5 * stats.student_logprob - 0.1 * stats.entropy).mean()


def main() -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)  # the same replicated inputs on every process
    student_hidden = torch.randn(*TOKENS, HIDDEN, requires_grad=True)
    teacher_hidden = torch.randn(*TOKENS, HIDDEN)
    sampled_ids = torch.randint(0, VOCAB, TOKENS)
    heads = [torch.nn.Linear(HIDDEN, WIDTH) for _ in range(2)]
    full_weights = [head.weight.detach().clone() for head in heads]
    full_biases = [head.bias.detach().clone() for head in heads]
    student_head, teacher_head = (parallelize_module(head, mesh, ColwiseParallel(use_local_output=False))
                                  for head in heads)
    teacher_head.requires_grad_(False)

    # From the sharded logits (DTensors placed Shard(-1)); the group comes from their mesh.
    with torch.no_grad():
        teacher_logits = teacher_head(teacher_hidden)
    stats = mk.fused_token_stats(student_head(student_hidden), teacher_logits, sampled_ids, vocab_size=VOCAB,
                                 with_entropy=True)
    loss = token_loss(stats)
    loss.backward()
    from_logits = (loss.detach(), student_hidden.grad.clone(), student_head.weight.grad.to_local().clone())

    # From the sharded weights (DTensors placed Shard(0)), no logits; then the plain unsharded loss.
    student_hidden.grad, student_head.weight.grad, student_head.bias.grad = None, None, None
    loss = token_loss(mk.fused_linear_token_stats(
        student_hidden, student_head.weight, teacher_hidden, teacher_head.weight, sampled_ids,
        student_bias=student_head.bias, teacher_bias=teacher_head.bias, vocab_size=VOCAB, with_entropy=True))
    loss.backward()
    from_weights = (loss.detach(), student_hidden.grad, student_head.weight.grad.to_local())

    hidden = student_hidden.detach().requires_grad_()
    weight = full_weights[0].requires_grad_()
    unsharded = token_loss(mk.fused_token_stats(
        hidden @ weight.t() + full_biases[0], teacher_hidden @ full_weights[1].t() + full_biases[1], sampled_ids,
        vocab_size=VOCAB, with_entropy=True))
    unsharded.backward()
    unsharded = unsharded.detach()
    rows = weight.grad.chunk(dist.get_world_size())[dist.get_rank()]
    for name, (value, grad_hidden, grad_weight) in (("logits", from_logits), ("lm_head", from_weights)):
        torch.testing.assert_close(value, unsharded, msg=f"the loss from the sharded {name}")
        torch.testing.assert_close(grad_hidden, hidden.grad, msg=f"grad h from the sharded {name}")
        torch.testing.assert_close(grad_weight, rows, msg=f"this rank's grad W from the sharded {name}")
    if dist.get_rank() == 0:
        print(f"{dist.get_world_size()} processes: loss {unsharded.item():.6f} from the sharded logits and from the "
              "sharded lm_heads, as unsharded; gradients too")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
