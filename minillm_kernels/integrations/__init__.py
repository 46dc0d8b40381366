"""Other libraries' trainers with their losses on this package's kernels: ``trl.py`` (TRL's ``DistillationTrainer``)
and ``trl_experimental.py`` (TRL's experimental ``GKDTrainer`` and ``ServerDistillationTrainer``).

Each integration imports its library only when it is imported itself: ``import minillm_kernels`` needs none of them.
"""
