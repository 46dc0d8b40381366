// Row index -> element offset of the logits the reverse-KL kernels read (csrc/cpu and csrc/cuda), free of torch
// headers so that the CUDA kernels compile with nvcc alone.
//
// The logits reach the kernels as [n_outer, rows_per_outer, V] views (minillm_kernels/ops/reverse_kld.py,
// row_view: the leading dimensions of any [..., V] tensor whose last dimension has stride 1, coalesced into at most
// two levels), with strides (outer_stride, inner_stride, 1). Row r of the N = n_outer * rows_per_outer rows starts
//   offset(r) = (r / rows_per_outer) * outer_stride + (r % rows_per_outer) * inner_stride
// elements past the first. As (rows_per_outer, outer_stride, inner_stride): contiguous [N, V] rows are (N, 0, V); a
// [:, -(N+1):-1] slice of [B, L, V] is (N, L V, V); one [N, V] sequence expanded over the batch (stride 0) is
// (N, 0, V); a transposed [T, B, V] seen as [B, T, V] is (T, V, B V). Student and teacher each have their own.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MINILLM_HOST_DEVICE __host__ __device__
#else
#define MINILLM_HOST_DEVICE
#endif

namespace minillm {

struct RowStrides {
  int64_t rows_per_outer;  // >= 1
  int64_t outer_stride;
  int64_t inner_stride;

  // int64: the offsets pass 2^31 once N * V does (16k tokens x 152k vocab). Once per row, not per element.
  MINILLM_HOST_DEVICE int64_t offset(int64_t row) const {
    return (row / rows_per_outer) * outer_stride + (row % rows_per_outer) * inner_stride;
  }
};

}  // namespace minillm
