"""minillm-kernels: fused reverse-KL kernels for MiniLLM distillation of large-vocabulary LLMs.

    import minillm_kernels as mk
    loss = mk.fused_reverse_kld(student_logits, teacher_logits, mask=mask)       # KL(q || p)
    stats = mk.fused_token_stats(student_logits, teacher_logits, sampled_ids)    # per-token terms
"""
from minillm_kernels.dispatch import TokenStats, available_backends, fused_reverse_kld, fused_token_stats

__all__ = ["TokenStats", "available_backends", "fused_reverse_kld", "fused_token_stats"]
__version__ = "0.1.0"
