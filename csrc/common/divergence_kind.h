// The divergences of the family that the CPU and CUDA kernels share (the reverse KL has its own kernels), free of
// torch headers so that the CUDA kernels compile with nvcc alone; logits_args.h maps the op's names onto them.
#pragma once

namespace minillm {

enum class DivergenceKind : int { kForwardKl, kJsd, kSkewForwardKl, kSkewReverseKl, kTvd };

}  // namespace minillm
