// Fused reverse-KL (KL(q || p)) CUDA kernels: one streaming pass per row forward, one backward.
//
// The math is the CPU kernel's (csrc/cpu/reverse_kld.cpp), line for line. Per row (token), with
// s' = s * inv_temperature and t' = t * inv_temperature over the first n_cols = vocab_size columns, each thread
// streams its share of the row one 16-byte vector at a time. Per vector it takes the vector's maxima, re-centres
// its running accumulators when a maximum grows (online softmax), then accumulates
//   Z_s = sum_v e_v,  e_v = exp(s'_v - m_s)          Z_t = sum_v exp(t'_v - m_t)
//   E   = sum_v e_v (s'_v - m_s)                      A   = sum_v e_v ((s'_v - m_s) - (t'_v - m_t))
// (terms with e_v == 0 count 0, so -inf columns never give NaN). The threads' partial states are then merged
// (re-centred on the larger maxima and added) by warp shuffles and, for rows spread over several warps, through
// shared memory; thread 0 of the row writes
//   KL(q || p) = A / Z_s - log Z_s + log Z_t,         H(q) = log Z_s - E / Z_s,
//   log q(y) = s'_y - m_s - log Z_s,   log p(y) = t'_y - m_t - log Z_t,   row_stats = (m_s, log Z_s, m_t, log Z_t).
// The backward kernel recomputes log q_v and log p_v from the row statistics and writes, in one pass,
//   grad_v = inv_temperature * ([q_v > 0] q_v (a (log q_v - log p_v - KL) - b - c (log q_v + H)) + b [v == y]),
// 0 in the padding columns [n_cols, width) and in masked rows. Targets are clamped to [0, n_cols) like the
// reference's gather. Accumulation is double for float64 logits, float otherwise.
//
// Launch configuration (row_layout below): a row is owned by a group of kThreadsPerRow threads.
//   columns <= 2048:          one warp per row, 8 rows per 256-thread block (a block per row would leave most
//                             of its threads idle and pay a block-wide barrier for a few vectors each);
//   2048 < columns <= 16384:  one 256-thread block per row;
//   columns > 16384:          one 512-thread block per row (151936 bf16 columns: 19 vectors per thread); 512
//                             rather than 1024 threads so that two or more blocks share an SM and one block's
//                             final reduction overlaps another's loads.
// Each thread issues kUnroll = 2 vector loads per tensor before using them (4 x 16 bytes in flight per thread in
// the forward). Rows are indexed in int64 (row * row_stride passes 2^31 elements at 16384 x 151936); columns in
// int, which the caller checks. A row's columns are read as 16-byte vectors where its pointers (student, teacher,
// and the gradient in the backward) sit at the same offset within 16 bytes: a scalar head up to the first
// aligned column, whole vectors, then a scalar tail. Rows whose pointers differ in that offset (e.g. student and
// teacher of different odd widths) are read one column at a time, still coalesced across the warp.
//
// Memory traffic per row of V = n_cols columns (width W >= V in the backward): the forward reads s and t once
// (2V elements, plus the target column of each) and writes 8 scalars; the backward reads s and t once (2V) and
// writes the gradient once (W elements).

#include "reverse_kld_launch.h"

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace minillm_cuda {
namespace {

constexpr int kWarpSize = 32;
constexpr int kVectorBytes = 16;
constexpr int kUnroll = 2;  // vectors per tensor loaded before the first is used
constexpr unsigned kFullMask = 0xffffffffu;
// Threads an SM must hold at once (__launch_bounds__' minimum blocks): caps registers at 64 per thread.
constexpr int kMinResidentThreads = 1024;

template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

// ---------------------------------------------------------------------------------------------------------------
// Conversions and math in the accumulation type.
// ---------------------------------------------------------------------------------------------------------------
__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }

// Round to the logits' dtype (nearest even).
__device__ __forceinline__ void convert_into(float v, float& out) { out = v; }
__device__ __forceinline__ void convert_into(double v, double& out) { out = v; }
__device__ __forceinline__ void convert_into(float v, __nv_bfloat16& out) { out = __float2bfloat16_rn(v); }
__device__ __forceinline__ void convert_into(float v, __half& out) { out = __float2half_rn(v); }

// exp for the arguments the kernels pass (x <= ~0: logits minus their running maximum, log-probabilities).
// float: 2^(x log2 e) with the SFU's ex2.approx.ftz (one multiply and one MUFU.EX2; Triton's tl.exp is the same):
// relative error about 2^-22 plus |x| 2^-24 from rounding x log2 e, so ~1e-6 at x = -20 where the term is already
// below 1e-8 of the largest. Results under 2^-126 flush to 0 (such columns count as q = 0). exp(-inf) = 0 and
// NaN stays NaN. double: the full-accuracy exp.
__device__ __forceinline__ float exp_acc(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.4426950408889634f));
  return y;
}
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
// x * inv_t - c with one rounding: the difference of a scaled logit and a centre (or the maximum) keeps the
// accuracy of the difference instead of that of x * inv_t (which at |logits| ~ 1e4 is ~1e-3).
__device__ __forceinline__ float scaled_minus(float x, float inv_t, float c) { return fmaf(x, inv_t, -c); }
__device__ __forceinline__ double scaled_minus(double x, double inv_t, double c) { return fma(x, inv_t, -c); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }
// fmax ignores a NaN operand: a NaN logit reaches the sums through exp instead, and the row's KL is NaN.
__device__ __forceinline__ float max_acc(float x, float y) { return fmaxf(x, y); }
__device__ __forceinline__ double max_acc(double x, double y) { return fmax(x, y); }

template <typename acc_t>
__device__ __forceinline__ acc_t negative_infinity() {
  return static_cast<acc_t>(-INFINITY);
}

// ---------------------------------------------------------------------------------------------------------------
// Forward state of a part of a row, and the online-softmax updates.
// ---------------------------------------------------------------------------------------------------------------
// The accumulators are centred on the running maxima, or on 0 while a maximum is still -inf (so that
// -inf - centre is -inf, never NaN).
template <typename acc_t>
struct RowState {
  acc_t m_s, m_t;      // running maxima of s' and t'
  acc_t z_s, z_t;      // Z_s, Z_t
  acc_t e_acc, a_acc;  // E, A
};

template <typename acc_t>
__device__ __forceinline__ RowState<acc_t> empty_state() {
  const acc_t lowest = negative_infinity<acc_t>();
  return RowState<acc_t>{lowest, lowest, 0, 0, 0, 0};
}

template <typename acc_t>
__device__ __forceinline__ acc_t centre_of(acc_t running_max) {
  return running_max == negative_infinity<acc_t>() ? acc_t(0) : running_max;
}

// Re-centres the accumulators on new maxima (each >= the old one): the CPU kernel's update, term for term.
template <typename acc_t>
__device__ __forceinline__ void rebase(RowState<acc_t>& st, acc_t new_m_s, acc_t new_m_t) {
  const acc_t c_s = centre_of(st.m_s), c_t = centre_of(st.m_t);
  const acc_t nc_s = centre_of(new_m_s), nc_t = centre_of(new_m_t);
  if (nc_t != c_t) {
    // (t' - c_t) = (t' - nc_t) + (nc_t - c_t): A gains (nc_t - c_t) Z_s.
    if (st.z_t > 0) st.z_t *= exp_acc(c_t - nc_t);
    if (st.z_s > 0) st.a_acc += (nc_t - c_t) * st.z_s;
  }
  if (nc_s != c_s && st.z_s > 0) {
    // e_v -> r e_v with r = exp(c_s - nc_s), and (s' - c_s) = (s' - nc_s) - (c_s - nc_s).
    const acc_t d = c_s - nc_s;
    const acc_t r = exp_acc(d);
    if (r > 0) {
      st.e_acc = r * (st.e_acc + d * st.z_s);
      st.a_acc = r * (st.a_acc + d * st.z_s);
      st.z_s *= r;
    } else {
      st.z_s = st.e_acc = st.a_acc = 0;
    }
  }
  st.m_s = new_m_s;
  st.m_t = new_m_t;
}

// Adds kN columns s[k], t[k] (unscaled logits): maxima first, then the terms at the new centres. The maxima are
// taken before scaling (inv_t > 0 and rounding are monotone, so max_k (x_k inv_t) = inv_t max_k x_k exactly as
// rounded); the columns are converted twice rather than kept as 2 kN floats, to save registers.
template <int kN, typename scalar_t, typename acc_t>
__device__ __forceinline__ void absorb(RowState<acc_t>& st, const scalar_t (&s)[kN], const scalar_t (&t)[kN],
                                       acc_t inv_t) {
  acc_t raw_max_s = negative_infinity<acc_t>(), raw_max_t = negative_infinity<acc_t>();
#pragma unroll
  for (int k = 0; k < kN; ++k) {
    raw_max_s = max_acc(raw_max_s, to_acc(s[k]));
    raw_max_t = max_acc(raw_max_t, to_acc(t[k]));
  }
  const acc_t m_s = max_acc(st.m_s, raw_max_s * inv_t), m_t = max_acc(st.m_t, raw_max_t * inv_t);
  if (m_s != st.m_s || m_t != st.m_t) rebase(st, m_s, m_t);
  const acc_t c_s = centre_of(st.m_s), c_t = centre_of(st.m_t);
#pragma unroll
  for (int k = 0; k < kN; ++k) {
    const acc_t ds = scaled_minus(to_acc(s[k]), inv_t, c_s);
    const acc_t dt = scaled_minus(to_acc(t[k]), inv_t, c_t);
    const acc_t e = exp_acc(ds);
    st.z_s += e;
    st.z_t += exp_acc(dt);
    const bool live = e > 0;
    st.e_acc += live ? e * ds : acc_t(0);
    st.a_acc += live ? e * (ds - dt) : acc_t(0);
  }
}

template <typename acc_t>
__device__ __forceinline__ RowState<acc_t> merge(RowState<acc_t> x, RowState<acc_t> y) {
  const acc_t m_s = max_acc(x.m_s, y.m_s), m_t = max_acc(x.m_t, y.m_t);
  rebase(x, m_s, m_t);
  rebase(y, m_s, m_t);
  x.z_s += y.z_s;
  x.z_t += y.z_t;
  x.e_acc += y.e_acc;
  x.a_acc += y.a_acc;
  return x;
}

// Tree reduction over the warp; lane 0 ends with the merge of all 32 states (other lanes hold partial merges).
template <typename acc_t>
__device__ __forceinline__ RowState<acc_t> warp_reduce(RowState<acc_t> st) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    RowState<acc_t> other;
    other.m_s = __shfl_down_sync(kFullMask, st.m_s, offset);
    other.m_t = __shfl_down_sync(kFullMask, st.m_t, offset);
    other.z_s = __shfl_down_sync(kFullMask, st.z_s, offset);
    other.z_t = __shfl_down_sync(kFullMask, st.z_t, offset);
    other.e_acc = __shfl_down_sync(kFullMask, st.e_acc, offset);
    other.a_acc = __shfl_down_sync(kFullMask, st.a_acc, offset);
    st = merge(st, other);
  }
  return st;
}

// The merged state of a row group, valid in the group's thread 0. With several warps per row the group is the
// whole block (one row per block), and every thread of the block must call this.
template <int kWarpsPerRow, typename acc_t>
__device__ __forceinline__ RowState<acc_t> reduce_row(RowState<acc_t> st, RowState<acc_t>* partials) {
  st = warp_reduce(st);
  if constexpr (kWarpsPerRow > 1) {
    const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
    if (lane == 0) partials[warp] = st;
    __syncthreads();
    if (warp == 0) {
      st = lane < kWarpsPerRow ? partials[lane] : empty_state<acc_t>();
      st = warp_reduce(st);
    }
  }
  return st;
}

// ---------------------------------------------------------------------------------------------------------------
// Column layout of a row: scalar head, 16-byte vectors, scalar tail.
// ---------------------------------------------------------------------------------------------------------------
template <typename scalar_t>
struct alignas(kVectorBytes) Vector {
  static constexpr int kSize = kVectorBytes / static_cast<int>(sizeof(scalar_t));
  scalar_t v[kSize];
};

// Columns [head, head + n_vectors * kSize) of a run of n columns starting at p are read as vectors; the others
// (the head, before the first 16-byte boundary, and the tail) one by one. vectorisable is false when the other
// pointers of the row do not share p's offset within 16 bytes: then every column is a scalar one.
struct ColumnSplit {
  int head;
  int n_vectors;
};

template <typename scalar_t>
__device__ __forceinline__ ColumnSplit split_columns(const scalar_t* p, int n, bool vectorisable) {
  constexpr int kSize = Vector<scalar_t>::kSize;
  if (!vectorisable) return ColumnSplit{n, 0};
  const int offset =
      static_cast<int>(reinterpret_cast<uintptr_t>(p) % kVectorBytes) / static_cast<int>(sizeof(scalar_t));
  const int head = min(n, offset == 0 ? 0 : kSize - offset);
  return ColumnSplit{head, (n - head) / kSize};
}

// The column of the j-th scalar column (j in [0, n - n_vectors * kSize)): the head, then the tail.
template <typename scalar_t>
__device__ __forceinline__ int scalar_column(const ColumnSplit& split, int j) {
  return j < split.head ? j : j + split.n_vectors * Vector<scalar_t>::kSize;
}

__device__ __forceinline__ bool same_offset_in_vector(const void* p, const void* q) {
  return ((reinterpret_cast<uintptr_t>(p) ^ reinterpret_cast<uintptr_t>(q)) % kVectorBytes) == 0;
}

// ---------------------------------------------------------------------------------------------------------------
// Forward kernel.
// ---------------------------------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t, int kThreadsPerRow, int kRowsPerBlock>
__global__ void __launch_bounds__(kThreadsPerRow* kRowsPerBlock, kMinResidentThreads / (kThreadsPerRow * kRowsPerBlock))
reverse_kld_forward_kernel(
    const scalar_t* __restrict__ student, const scalar_t* __restrict__ teacher, int64_t student_row_stride,
    int64_t teacher_row_stride, const int64_t* __restrict__ target, const bool* __restrict__ mask,
    acc_t* __restrict__ kl, acc_t* __restrict__ student_logprob, acc_t* __restrict__ teacher_logprob,
    acc_t* __restrict__ entropy, acc_t* __restrict__ row_stats, int64_t n_rows, int n_cols, acc_t inv_t) {
  constexpr int kWarpsPerRow = kThreadsPerRow / kWarpSize;
  static_assert(kThreadsPerRow % kWarpSize == 0, "a row group is whole warps");
  static_assert(kWarpsPerRow == 1 || kRowsPerBlock == 1, "a row spread over several warps owns its block");
  constexpr int kSize = Vector<scalar_t>::kSize;
  __shared__ RowState<acc_t> partials[kWarpsPerRow];

  const int lane = threadIdx.x % kThreadsPerRow;
  // int64: row * row_stride passes 2^31 once N * V does (16k tokens x 152k vocab).
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kThreadsPerRow;
  if (row >= n_rows) return;  // only in the last block, and for whole warps (one warp per row)
  if (mask != nullptr && !mask[row]) {  // the same for the whole row group: a masked row reads nothing
    if (lane == 0) {
      kl[row] = student_logprob[row] = teacher_logprob[row] = entropy[row] = 0;
      for (int k = 0; k < 4; ++k) row_stats[4 * row + k] = 0;
    }
    return;
  }
  const scalar_t* s = student + row * student_row_stride;
  const scalar_t* t = teacher + row * teacher_row_stride;

  RowState<acc_t> st = empty_state<acc_t>();
  const ColumnSplit split = split_columns(s, n_cols, same_offset_in_vector(s, t));
  const Vector<scalar_t>* s_vectors = reinterpret_cast<const Vector<scalar_t>*>(s + split.head);
  const Vector<scalar_t>* t_vectors = reinterpret_cast<const Vector<scalar_t>*>(t + split.head);
  for (int i = lane; i < split.n_vectors; i += kThreadsPerRow * kUnroll) {
    Vector<scalar_t> sv[kUnroll], tv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = min(i + u * kThreadsPerRow, split.n_vectors - 1);  // unpredicated loads; extras are not used
      sv[u] = s_vectors[j];
      tv[u] = t_vectors[j];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (i + u * kThreadsPerRow < split.n_vectors) absorb(st, sv[u].v, tv[u].v, inv_t);
    }
  }
  const int n_scalar = n_cols - split.n_vectors * kSize;
  for (int j = lane; j < n_scalar; j += kThreadsPerRow) {
    const int col = scalar_column<scalar_t>(split, j);
    const scalar_t s_col[1] = {s[col]};
    const scalar_t t_col[1] = {t[col]};
    absorb(st, s_col, t_col, inv_t);
  }

  st = reduce_row<kWarpsPerRow>(st, partials);
  if (lane != 0) return;
  const acc_t log_z_s = log_acc(st.z_s);
  const acc_t log_z_t = log_acc(st.z_t);
  kl[row] = st.a_acc / st.z_s - log_z_s + log_z_t;
  entropy[row] = log_z_s - st.e_acc / st.z_s;
  row_stats[4 * row + 0] = st.m_s;
  row_stats[4 * row + 1] = log_z_s;
  row_stats[4 * row + 2] = st.m_t;
  row_stats[4 * row + 3] = log_z_t;
  if (target != nullptr) {
    const int64_t y = min(max(target[row], int64_t(0)), static_cast<int64_t>(n_cols - 1));  // as the reference
    student_logprob[row] = scaled_minus(to_acc(s[y]), inv_t, st.m_s) - log_z_s;
    teacher_logprob[row] = scaled_minus(to_acc(t[y]), inv_t, st.m_t) - log_z_t;
  } else {
    student_logprob[row] = teacher_logprob[row] = 0;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Backward kernel.
// ---------------------------------------------------------------------------------------------------------------
// Per-row constants of the backward. With log q = s' - m_s - log Z_s and log p = t' - m_t - log Z_t,
//   inv_t q (a (log q - log p - KL) - b - c (log q + H)) = q (w_q log q + w_p log p + w_0)
// with w_q = inv_t (a - c), w_p = -inv_t a, w_0 = -inv_t (a KL + b + c H).
template <typename acc_t>
struct RowGrad {
  acc_t m_s, log_z_s, m_t, log_z_t;  // row statistics
  acc_t w_q, w_p, w_0;               // the coefficients above
  acc_t one_hot;                     // inv_t b, added at the target column
  acc_t inv_t;
  int target_col;                    // -1 without a target
};

template <typename acc_t>
__device__ __forceinline__ RowGrad<acc_t> row_grad(const acc_t* row_stats, acc_t a, acc_t b, acc_t c, acc_t kl,
                                                   acc_t entropy, acc_t inv_t, int target_col) {
  RowGrad<acc_t> g;
  g.m_s = row_stats[0];
  g.log_z_s = row_stats[1];
  g.m_t = row_stats[2];
  g.log_z_t = row_stats[3];
  g.w_q = inv_t * (a - c);
  g.w_p = -inv_t * a;
  g.w_0 = -inv_t * (a * kl + b + c * entropy);
  g.one_hot = inv_t * b;
  g.inv_t = inv_t;
  g.target_col = target_col;
  return g;
}

// inv_t ([q > 0] q (a (log q - log p - KL) - b - c (log q + H)) + b [col == y]) from the unscaled logits x, y.
template <typename acc_t>
__device__ __forceinline__ acc_t grad_at(const RowGrad<acc_t>& g, acc_t x, acc_t y, int col) {
  const acc_t log_q = scaled_minus(x, g.inv_t, g.m_s) - g.log_z_s;
  const acc_t log_p = scaled_minus(y, g.inv_t, g.m_t) - g.log_z_t;
  const acc_t q = exp_acc(log_q);
  const acc_t term = q > 0 ? q * (g.w_q * log_q + (g.w_p * log_p + g.w_0)) : acc_t(0);
  return col == g.target_col ? term + g.one_hot : term;
}

template <typename acc_t>
__device__ __forceinline__ acc_t load_or_zero(const acc_t* p, int64_t row) {
  return p != nullptr ? p[row] : acc_t(0);
}

// Writes 0 to the n columns starting at out, by the row group's threads.
template <typename scalar_t, int kThreadsPerRow>
__device__ __forceinline__ void zero_columns(scalar_t* out, int n, int lane) {
  constexpr int kSize = Vector<scalar_t>::kSize;
  const ColumnSplit split = split_columns(out, n, true);
  Vector<scalar_t> zeros;
#pragma unroll
  for (int k = 0; k < kSize; ++k) convert_into(typename AccType<scalar_t>::type(0), zeros.v[k]);
  Vector<scalar_t>* out_vectors = reinterpret_cast<Vector<scalar_t>*>(out + split.head);
  for (int i = lane; i < split.n_vectors; i += kThreadsPerRow) out_vectors[i] = zeros;
  const int n_scalar = n - split.n_vectors * kSize;
  for (int j = lane; j < n_scalar; j += kThreadsPerRow) out[scalar_column<scalar_t>(split, j)] = zeros.v[0];
}

template <typename scalar_t, typename acc_t, int kThreadsPerRow, int kRowsPerBlock>
__global__ void __launch_bounds__(kThreadsPerRow* kRowsPerBlock, kMinResidentThreads / (kThreadsPerRow * kRowsPerBlock))
reverse_kld_backward_kernel(
    const scalar_t* __restrict__ student, const scalar_t* __restrict__ teacher, int64_t student_row_stride,
    int64_t teacher_row_stride, const int64_t* __restrict__ target, const bool* __restrict__ mask,
    const acc_t* __restrict__ grad_kl, const acc_t* __restrict__ grad_student_logprob,
    const acc_t* __restrict__ grad_entropy, const acc_t* __restrict__ kl, const acc_t* __restrict__ entropy,
    const acc_t* __restrict__ row_stats, scalar_t* __restrict__ grad_student, int64_t n_rows, int n_cols,
    int width, acc_t inv_t) {
  static_assert(kThreadsPerRow % kWarpSize == 0, "a row group is whole warps");
  constexpr int kSize = Vector<scalar_t>::kSize;

  const int lane = threadIdx.x % kThreadsPerRow;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kThreadsPerRow;  // int64
  if (row >= n_rows) return;
  scalar_t* out = grad_student + row * width;
  const int n_live = (mask == nullptr || mask[row]) ? n_cols : 0;  // a masked row reads nothing, gets 0

  if (n_live > 0) {
    const scalar_t* s = student + row * student_row_stride;
    const scalar_t* t = teacher + row * teacher_row_stride;
    const int target_col =
        target != nullptr ? static_cast<int>(min(max(target[row], int64_t(0)), int64_t(n_cols - 1))) : -1;
    const acc_t b = target != nullptr ? load_or_zero(grad_student_logprob, row) : acc_t(0);
    const RowGrad<acc_t> g = row_grad(row_stats + 4 * row, load_or_zero(grad_kl, row), b,
                                      load_or_zero(grad_entropy, row), kl[row], entropy[row], inv_t, target_col);

    const bool vectorisable = same_offset_in_vector(s, t) && same_offset_in_vector(s, out);
    const ColumnSplit split = split_columns(s, n_live, vectorisable);
    const Vector<scalar_t>* s_vectors = reinterpret_cast<const Vector<scalar_t>*>(s + split.head);
    const Vector<scalar_t>* t_vectors = reinterpret_cast<const Vector<scalar_t>*>(t + split.head);
    Vector<scalar_t>* out_vectors = reinterpret_cast<Vector<scalar_t>*>(out + split.head);
    for (int i = lane; i < split.n_vectors; i += kThreadsPerRow * kUnroll) {
      Vector<scalar_t> sv[kUnroll], tv[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int j = min(i + u * kThreadsPerRow, split.n_vectors - 1);  // unpredicated loads; extras are not used
        sv[u] = s_vectors[j];
        tv[u] = t_vectors[j];
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int j = i + u * kThreadsPerRow;
        if (j < split.n_vectors) {
          Vector<scalar_t> gv;
#pragma unroll
          for (int k = 0; k < kSize; ++k) {
            const int col = split.head + j * kSize + k;
            convert_into(grad_at(g, to_acc(sv[u].v[k]), to_acc(tv[u].v[k]), col), gv.v[k]);
          }
          out_vectors[j] = gv;
        }
      }
    }
    const int n_scalar = n_live - split.n_vectors * kSize;
    for (int j = lane; j < n_scalar; j += kThreadsPerRow) {
      const int col = scalar_column<scalar_t>(split, j);
      convert_into(grad_at(g, to_acc(s[col]), to_acc(t[col]), col), out[col]);
    }
  }
  zero_columns<scalar_t, kThreadsPerRow>(out + n_live, width - n_live, lane);
}

// ---------------------------------------------------------------------------------------------------------------
// Launchers.
// ---------------------------------------------------------------------------------------------------------------
enum class RowLayout { kWarpPerRow, kBlock256PerRow, kBlock512PerRow };

// See the launch configuration at the top of this file.
RowLayout row_layout(int columns) {
  if (columns <= 2048) return RowLayout::kWarpPerRow;
  if (columns <= 16384) return RowLayout::kBlock256PerRow;
  return RowLayout::kBlock512PerRow;
}

constexpr int kRowsPerWarpBlock = 8;

template <int kRowsPerBlock>
bool grid_for(int64_t n_rows, dim3* grid) {
  const int64_t blocks = (n_rows + kRowsPerBlock - 1) / kRowsPerBlock;
  if (blocks > INT32_MAX) return false;
  *grid = dim3(static_cast<unsigned>(blocks));
  return true;
}

// One launch of a kernel instance (dtype, threads per row, rows per block), as a class template so that the
// dispatch below serves both kernels.
template <typename scalar_t, int kThreadsPerRow, int kRowsPerBlock>
struct ForwardLauncher {
  static cudaError_t run(const ForwardLaunch& a, cudaStream_t stream) {
    using acc_t = typename AccType<scalar_t>::type;
    dim3 grid;
    if (!grid_for<kRowsPerBlock>(a.n_rows, &grid)) return cudaErrorInvalidConfiguration;
    reverse_kld_forward_kernel<scalar_t, acc_t, kThreadsPerRow, kRowsPerBlock>
        <<<grid, kThreadsPerRow * kRowsPerBlock, 0, stream>>>(
            static_cast<const scalar_t*>(a.student), static_cast<const scalar_t*>(a.teacher), a.student_row_stride,
            a.teacher_row_stride, a.target, a.mask, static_cast<acc_t*>(a.kl), static_cast<acc_t*>(a.student_logprob),
            static_cast<acc_t*>(a.teacher_logprob), static_cast<acc_t*>(a.entropy), static_cast<acc_t*>(a.row_stats),
            a.n_rows, a.n_cols, static_cast<acc_t>(a.inv_temperature));
    return cudaGetLastError();
  }
};

template <typename scalar_t, int kThreadsPerRow, int kRowsPerBlock>
struct BackwardLauncher {
  static cudaError_t run(const BackwardLaunch& a, cudaStream_t stream) {
    using acc_t = typename AccType<scalar_t>::type;
    dim3 grid;
    if (!grid_for<kRowsPerBlock>(a.n_rows, &grid)) return cudaErrorInvalidConfiguration;
    reverse_kld_backward_kernel<scalar_t, acc_t, kThreadsPerRow, kRowsPerBlock>
        <<<grid, kThreadsPerRow * kRowsPerBlock, 0, stream>>>(
            static_cast<const scalar_t*>(a.student), static_cast<const scalar_t*>(a.teacher), a.student_row_stride,
            a.teacher_row_stride, a.target, a.mask, static_cast<const acc_t*>(a.grad_kl),
            static_cast<const acc_t*>(a.grad_student_logprob), static_cast<const acc_t*>(a.grad_entropy),
            static_cast<const acc_t*>(a.kl), static_cast<const acc_t*>(a.entropy),
            static_cast<const acc_t*>(a.row_stats), static_cast<scalar_t*>(a.grad_student), a.n_rows, a.n_cols,
            a.width, static_cast<acc_t>(a.inv_temperature));
    return cudaGetLastError();
  }
};

// The kernel instance for the row layout of `columns`.
template <template <typename, int, int> class Launcher, typename scalar_t, typename Args>
cudaError_t launch_in_layout(const Args& a, int columns, cudaStream_t stream) {
  switch (row_layout(columns)) {
    case RowLayout::kWarpPerRow:
      return Launcher<scalar_t, kWarpSize, kRowsPerWarpBlock>::run(a, stream);
    case RowLayout::kBlock256PerRow:
      return Launcher<scalar_t, 256, 1>::run(a, stream);
    case RowLayout::kBlock512PerRow:
      return Launcher<scalar_t, 512, 1>::run(a, stream);
  }
  return cudaErrorInvalidValue;
}

// The kernel instance for the logits dtype and the row layout of `columns`; nothing to launch for zero rows.
template <template <typename, int, int> class Launcher, typename Args>
cudaError_t launch(const Args& a, int columns, cudaStream_t stream) {
  if (a.n_rows == 0) return cudaSuccess;
  switch (a.dtype) {
    case LogitsDtype::kFloat32:
      return launch_in_layout<Launcher, float>(a, columns, stream);
    case LogitsDtype::kFloat64:
      return launch_in_layout<Launcher, double>(a, columns, stream);
    case LogitsDtype::kBFloat16:
      return launch_in_layout<Launcher, __nv_bfloat16>(a, columns, stream);
    case LogitsDtype::kFloat16:
      return launch_in_layout<Launcher, __half>(a, columns, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_reverse_kld_forward(const ForwardLaunch& args, cudaStream_t stream) {
  return launch<ForwardLauncher>(args, args.n_cols, stream);
}

cudaError_t launch_reverse_kld_backward(const BackwardLaunch& args, cudaStream_t stream) {
  return launch<BackwardLauncher>(args, args.width, stream);  // the backward touches every column of the gradient
}

}  // namespace minillm_cuda
