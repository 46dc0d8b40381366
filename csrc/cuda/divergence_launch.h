// Launch interface of the divergence family's CUDA kernels (divergence.cu), free of torch headers so that the kernels
// compile with nvcc alone. divergence.cpp fills these structs from tensors, after checking them.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "../common/divergence_kind.h"
#include "../common/row_strides.h"
#include "reverse_kld_launch.h"  // LogitsDtype

namespace minillm_cuda {

using minillm::DivergenceKind;  // (../common/divergence_kind.h)

// Forward over n_rows rows: reads columns [0, n_cols) of each row twice (the log-normalisers, then the terms) and
// writes per row the divergence, mean_partial = sum_v q_v dD/dq_v and row_stats[4] = (c_s, log Z_s, c_t, log Z_t),
// in the accumulation dtype (double if either input is kFloat64, else float). Masked rows are not read; they get 0.
struct DivergenceForwardLaunch {
  LogitsDtype student_dtype;
  LogitsDtype teacher_dtype;
  const void* student;              // n_rows rows of >= n_cols columns, laid out as student_rows says
  const void* teacher;
  minillm::RowStrides student_rows;
  minillm::RowStrides teacher_rows;
  const bool* mask;                 // [n_rows] or nullptr (all rows count)
  void* value;                      // [n_rows]
  void* mean_partial;               // [n_rows]
  void* row_stats;                  // [n_rows, 4], contiguous
  int64_t n_rows;
  int n_cols;
  DivergenceKind divergence;
  double coefficient;               // beta (JSD) or the skew, in (0, 1); unused by the forward KL and the TVD
  double teacher_weight;            // w of the mixture m = w p + (1 - w) q: beta, the skew, or 1 - skew (skew reverse)
  double inv_temperature;
};

// Backward: writes the [n_rows, width] contiguous gradient (student dtype) of sum_i g_i D_i,
// grad_v = g k (q_v a_v - q_v mean_partial); columns [n_cols, width) and masked rows get 0.
struct DivergenceBackwardLaunch {
  LogitsDtype student_dtype;
  LogitsDtype teacher_dtype;
  const void* student;
  const void* teacher;
  minillm::RowStrides student_rows;
  minillm::RowStrides teacher_rows;
  const bool* mask;                 // [n_rows] or nullptr
  const void* grad_divergence;      // g: [n_rows], accumulation dtype
  const void* mean_partial;         // [n_rows] from the forward
  const void* row_stats;            // [n_rows, 4] from the forward, contiguous
  void* grad_student;               // [n_rows, width], contiguous
  int64_t n_rows;
  int n_cols;
  int width;
  DivergenceKind divergence;
  double coefficient;
  double teacher_weight;
  double inv_temperature;
};

// Each returns the launch's error (cudaGetLastError() right after it); cudaSuccess when n_rows == 0.
cudaError_t launch_divergence_forward(const DivergenceForwardLaunch& args, cudaStream_t stream);
cudaError_t launch_divergence_backward(const DivergenceBackwardLaunch& args, cudaStream_t stream);

}  // namespace minillm_cuda
