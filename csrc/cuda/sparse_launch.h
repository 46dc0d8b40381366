// Launch interface of the sparse teacher's CUDA kernels (sparse.cu), free of torch headers so that the kernels
// compile with nvcc alone. sparse.cpp fills these structs from tensors, after checking them.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "../common/row_strides.h"
#include "../common/sparse_kind.h"
#include "reverse_kld_launch.h"  // LogitsDtype

namespace minillm_cuda {

using minillm::SparseDivergence;  // (../common/sparse_kind.h)
using minillm::SparseTail;

// The inputs both kernels read. Row r of the student starts at student + student_rows.offset(r) elements; its K
// entries are teacher_ids[r K + j], teacher_logprobs[r K + j] (contiguous; log p = -inf: no entry). The arithmetic,
// the log-probabilities (converted by the host: [N, K] is small) and the per-row tensors are double where
// double_accumulation (the student or the given log-probabilities are float64), float otherwise.
struct SparseInputs {
  LogitsDtype student_dtype;
  bool double_accumulation;
  const void* student;
  minillm::RowStrides student_rows;
  const int64_t* teacher_ids;       // [n_rows, n_entries]
  const void* teacher_logprobs;     // [n_rows, n_entries], accumulation dtype
  const int64_t* target;            // [n_rows] or nullptr (no token statistics)
  const bool* mask;                 // [n_rows] or nullptr (all rows count)
  int64_t n_rows;
  int n_entries;                    // K
  int n_cols;                       // vocab_size
  SparseDivergence divergence;
  SparseTail tail;
  bool streamed;                    // the row is streamed (every tail but "renormalized" without a target)
  double coefficient;               // beta (JSD) or the skew, in (0, 1); unused by the others
  double teacher_weight;            // w of the mixture m = w p + (1 - w) q (minillm::sparse_teacher_weight)
  double inv_temperature;
};

// Forward: per row value, student_logprob (0 without a target), entropy (0 where not streamed), mean_partial and
// row_stats[4] = (c, log Z, c_R, log Z_R), in the accumulation dtype. Masked rows are not read; they get 0.
struct SparseForwardLaunch {
  SparseInputs in;
  void* value;
  void* student_logprob;
  void* entropy;
  void* mean_partial;
  void* row_stats;                  // [n_rows, 4], contiguous
};

// Backward: writes the [n_rows, width] contiguous gradient (student dtype) of sum_i g_i D_i + b_i log q_i(y_i) +
// c_i H_i; columns [n_cols, width) and masked rows get 0.
struct SparseBackwardLaunch {
  SparseInputs in;
  const void* grad_value;           // g: [n_rows], accumulation dtype
  const void* grad_student_logprob; // b: [n_rows] or nullptr (zeros)
  const void* grad_entropy;         // c: [n_rows] or nullptr (zeros)
  const void* entropy;              // [n_rows] from the forward
  const void* mean_partial;         // [n_rows] from the forward
  const void* row_stats;            // [n_rows, 4] from the forward, contiguous
  void* grad_student;               // [n_rows, width], contiguous
  int width;
};

// Each returns the launch's error (cudaGetLastError() right after it); cudaSuccess when n_rows == 0.
cudaError_t launch_sparse_forward(const SparseForwardLaunch& args, cudaStream_t stream);
cudaError_t launch_sparse_backward(const SparseBackwardLaunch& args, cudaStream_t stream);

}  // namespace minillm_cuda
