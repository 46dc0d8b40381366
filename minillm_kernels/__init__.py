"""minillm-kernels: fused reverse-KL kernels for MiniLLM distillation of large-vocabulary LLMs.

    import minillm_kernels as mk
    loss = mk.fused_reverse_kld(student_logits, teacher_logits, mask=mask)       # KL(q || p)
    loss = mk.fused_divergence(student_logits, teacher_logits, divergence="jsd", beta=0.5)  # or forward_kl, tvd...
    stats = mk.fused_token_stats(student_logits, teacher_logits, sampled_ids)    # per-token terms
    ids, logprobs = mk.topk_teacher(teacher_logits, k=64)                        # a sparse teacher,
    loss = mk.fused_sparse_divergence(student_logits, ids, logprobs)             # its tail completed
    loss = mk.fused_linear_sparse_divergence(student_hidden, student.lm_head.weight, ids, logprobs)
    loss = mk.fused_linear_reverse_kld(student_hidden, student.lm_head.weight,   # from hidden states,
                                       teacher_hidden, teacher.lm_head.weight)   # without the logits
    rollout = mk.sample_teacher_mixed(student, teacher, prompt_ids, prompt_mask, max_new_tokens=64)
    loss, parts = mk.minillm_loss(stats, rollout.student_logprob, rewards, rollout.importance_weight, ...)
"""
from minillm_kernels.backends import available_backends
from minillm_kernels.losses import (
    TokenStats,
    fused_divergence,
    fused_reverse_kld,
    fused_sparse_divergence,
    fused_sparse_token_stats,
    fused_token_stats,
    topk_teacher,
)
from minillm_kernels.linear import (
    fused_linear_divergence,
    fused_linear_reverse_kld,
    fused_linear_sparse_divergence,
    fused_linear_token_stats,
)
from minillm_kernels.objective import (
    language_modeling_loss,
    length_normalized_returns,
    log_ratio_rewards,
    minillm_loss,
    ppo_policy_loss,
    single_step_loss,
    whiten_advantages,
)
from minillm_kernels.sampling import (
    TeacherMixedSample,
    response_divergence,
    response_hidden_states,
    response_logits,
    response_token_stats,
    sample_teacher_mixed,
)

__all__ = [
    "TokenStats",
    "available_backends",
    "fused_reverse_kld",
    "fused_token_stats",
    "fused_divergence",  # forward KL, JSD, skew KLs, TVD beside the reverse KL
    # the same from hidden states and lm_head weights, chunked over tokens (linear.py)
    "fused_linear_reverse_kld",
    "fused_linear_token_stats",
    "fused_linear_divergence",
    # against a teacher given as its top-k log-probabilities, the tail completed (losses.py)
    "fused_sparse_divergence",
    "fused_sparse_token_stats",
    "topk_teacher",
    "fused_linear_sparse_divergence",  # the same from the student's hidden states and lm_head (linear.py)
    # the MiniLLM objective (objective.py) and teacher-mixed sampling (sampling.py)
    "TeacherMixedSample",
    "language_modeling_loss",
    "length_normalized_returns",
    "log_ratio_rewards",
    "minillm_loss",
    "ppo_policy_loss",
    "response_divergence",
    "response_hidden_states",
    "response_logits",
    "response_token_stats",
    "sample_teacher_mixed",
    "single_step_loss",
    "whiten_advantages",
]
__version__ = "0.1.0"
