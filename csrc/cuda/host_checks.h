// Host-side helpers the CUDA kernels' tensor-level entry points share (reverse_kld.cpp, divergence.cpp): the launch
// interface's element type of a tensor, the column limit of int indices, and launch error checks. `where` names the
// kernel family in the messages, e.g. "reverse_kld (cuda)".
#pragma once

#include <cstdint>
#include <limits>

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include "reverse_kld_launch.h"

namespace minillm_cuda_host {

// The launch interface's element type of a logits tensor (check_logits has checked it is one of the four).
inline minillm_cuda::LogitsDtype logits_dtype(at::ScalarType dtype, const char* where) {
  switch (dtype) {
    case at::kFloat:
      return minillm_cuda::LogitsDtype::kFloat32;
    case at::kDouble:
      return minillm_cuda::LogitsDtype::kFloat64;
    case at::kBFloat16:
      return minillm_cuda::LogitsDtype::kBFloat16;
    case at::kHalf:
      return minillm_cuda::LogitsDtype::kFloat16;
    default:
      TORCH_CHECK(false, where, ": unsupported logits dtype ", dtype);
  }
}

// The kernels index columns with int.
inline void check_width(int64_t width, const char* where) {
  TORCH_CHECK(width <= std::numeric_limits<int>::max(), where, ": at most ", std::numeric_limits<int>::max(),
              " columns, got ", width);
}

inline void check_launch(cudaError_t error, const char* kernel, const char* where) {
  TORCH_CHECK(error == cudaSuccess, where, ": the ", kernel, " kernel failed to launch: ", cudaGetErrorName(error),
              ": ", cudaGetErrorString(error));
}

}  // namespace minillm_cuda_host
