// The sparse-teacher kernels' divergences and tail modes (csrc/cpu/sparse_kernel.h, csrc/cuda/sparse.cu), free of torch
// headers so that the CUDA kernels compile with nvcc alone; sparse_args.h maps the op's names onto them.
#pragma once

namespace minillm {

// Unlike the dense family's DivergenceKind, the reverse KL is one of them: the sparse kernels have no separate one.
enum class SparseDivergence : int { kReverseKl, kForwardKl, kJsd, kSkewForwardKl, kSkewReverseKl, kTvd };

// How the teacher's tail R (the columns without an entry) is completed: one outcome (P_R vs Q_R), P_R spread evenly,
// or both models renormalised on the entries (docs/design.md, "The sparse teacher").
enum class SparseTail : int { kBin, kUniform, kRenormalized };

// The teacher's weight w in the mixture m = w p + (1 - w) q of the JSD (beta) and the skew KLs (skew, or 1 - skew for
// the skew reverse KL, whose mixture is skew q + (1 - skew) p); unused by the others.
inline double sparse_teacher_weight(SparseDivergence divergence, double coefficient) {
  return divergence == SparseDivergence::kSkewReverseKl ? 1 - coefficient : coefficient;
}

}  // namespace minillm
