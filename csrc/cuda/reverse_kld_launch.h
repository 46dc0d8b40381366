// Launch interface of the fused reverse-KL CUDA kernels (reverse_kld.cu), free of torch headers so that the
// kernels compile with nvcc alone. reverse_kld.cpp fills these structs from tensors, after checking them.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "../common/row_strides.h"

namespace minillm_cuda {

// Element type of a logits tensor (the gradient has the student's). Student and teacher may differ; the
// arithmetic and the per-row outputs are double if either is kFloat64, float otherwise (the accumulation dtype).
enum class LogitsDtype : int { kFloat32, kFloat64, kBFloat16, kFloat16 };

// Row r of the student starts at student + student_rows.offset(r) elements, of the teacher at
// teacher + teacher_rows.offset(r) (row_strides.h: two levels of strides each, int64); its columns are contiguous.
//
// Forward over n_rows rows: reads columns [0, n_cols) of each row (n_cols = vocab_size), writes per row
// kl, student_logprob, teacher_logprob, entropy and row_stats[4] = (c_s, log Z_s, c_t, log Z_t) (c: the maxima of
// the raw logits). A target outside [0, n_cols) gives NaN log-probabilities and is never read.
struct ForwardLaunch {
  LogitsDtype student_dtype;
  LogitsDtype teacher_dtype;
  const void* student;             // n_rows rows of >= n_cols columns, laid out as student_rows says
  const void* teacher;             // n_rows rows of >= n_cols columns, laid out as teacher_rows says
  minillm::RowStrides student_rows;
  minillm::RowStrides teacher_rows;
  const int64_t* target;           // [n_rows] or nullptr (then both log-probabilities are 0)
  const bool* mask;                // [n_rows] or nullptr (all rows count)
  void* kl;                        // [n_rows], accumulation dtype
  void* student_logprob;           // [n_rows]
  void* teacher_logprob;           // [n_rows]
  void* entropy;                   // [n_rows]
  void* row_stats;                 // [n_rows, 4], contiguous
  int64_t n_rows;
  int n_cols;
  double inv_temperature;
};

// Backward: writes the [n_rows, width] contiguous gradient (student dtype) of
// sum_i a_i KL_i + b_i log q_i(y_i) + c_i H_i; columns [n_cols, width) and masked rows get 0; b_i counts as 0
// where the target is outside [0, n_cols).
struct BackwardLaunch {
  LogitsDtype student_dtype;
  LogitsDtype teacher_dtype;
  const void* student;             // as in ForwardLaunch
  const void* teacher;
  minillm::RowStrides student_rows;
  minillm::RowStrides teacher_rows;
  const int64_t* target;           // [n_rows] or nullptr (then b counts as 0)
  const bool* mask;                // [n_rows] or nullptr
  const void* grad_kl;             // a: [n_rows], accumulation dtype, or nullptr (zeros)
  const void* grad_student_logprob;  // b: [n_rows] or nullptr
  const void* grad_entropy;        // c: [n_rows] or nullptr
  const void* kl;                  // [n_rows] from the forward
  const void* entropy;             // [n_rows] from the forward
  const void* row_stats;           // [n_rows, 4] from the forward, contiguous
  void* grad_student;              // [n_rows, width], contiguous
  int64_t n_rows;
  int n_cols;
  int width;
  double inv_temperature;
};

// Each returns the launch's error (cudaGetLastError() right after it); cudaSuccess when n_rows == 0.
cudaError_t launch_reverse_kld_forward(const ForwardLaunch& args, cudaStream_t stream);
cudaError_t launch_reverse_kld_backward(const BackwardLaunch& args, cudaStream_t stream);

}  // namespace minillm_cuda
