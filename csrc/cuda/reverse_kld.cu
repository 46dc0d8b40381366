// Fused reverse-KL (KL(q || p)) CUDA kernels: one streaming pass per row forward, one backward.
//
// The math is the CPU kernel's (csrc/cpu/reverse_kld.cpp). Per row (token), over the first n_cols = vocab_size
// columns of the student logits s and the teacher logits t, with k = inv_temperature, each thread streams its share
// of the row one vector of columns at a time. Per vector it takes the maxima of the raw logits, re-centres its
// running sums when a maximum grows (online softmax), then accumulates, with c_s, c_t the running maxima and
// u_v = s_v - c_s, w_v = t_v - c_t,
//   Z_s = sum_v e_v,  e_v = exp(k u_v)          Z_t = sum_v exp(k w_v)
//   E   = sum_v e_v u_v                          A   = sum_v e_v (u_v - w_v)
// (terms with e_v == 0 count 0, so -inf columns never give NaN). The threads' partial states are then merged
// (re-centred on the larger maxima and added) by warp shuffles and, for rows spread over several warps, through
// shared memory; thread 0 of the row writes
//   KL(q || p) = k A / Z_s - log Z_s + log Z_t,         H(q) = log Z_s - k E / Z_s,
//   log q(y) = k (s_y - c_s) - log Z_s,   log p(y) = k (t_y - c_t) - log Z_t,   row_stats = (c_s, log Z_s, c_t, log Z_t).
// Centring on the raw maxima keeps every exponent k u_v <= 0 (the largest exactly 0) at any |logits / T|, and the
// raw differences enter E and A unscaled. The backward kernel recomputes log q_v and log p_v from the row statistics
// and writes, in one pass,
//   grad_v = k ([q_v > 0] q_v (a (log q_v - log p_v - KL) - b - c (log q_v + H)) + b [v == y]),
// 0 in the padding columns [n_cols, width) and in masked rows. A target outside [0, n_cols) in an unmasked row gives
// NaN log-probabilities (it is never read) and a gradient without the one-hot b [v == y] (the -b q_v term stays: it
// comes from log Z, which every id has).
//
// Dtypes: student and teacher may differ (float32, float64, bfloat16, float16: 16 pairs); each is read in its own
// dtype. Per-element arithmetic is in acc_t, double if either is float64, float otherwise; the sums Z_s, Z_t, E, A are
// double in every thread (the float terms of adjacent columns are added in pairs first), as are the merges and the
// final per-row formulas: float sums round at the scale of their largest term, which cost up to 4e-7 relative on
// peaked rows. Per-row outputs are acc_t; the gradient has the student's dtype.
//
// Launch configuration (row_layout below): a row is owned by a group of kThreadsPerRow threads.
//   columns <= 2048:          one warp per row, 8 rows per 256-thread block (a block per row would leave most
//                             of its threads idle and pay a block-wide barrier for a few vectors each);
//   2048 < columns <= 16384:  one 256-thread block per row;
//   columns > 16384:          one 512-thread block per row (151936 bf16 columns: 19 vectors per thread); 512
//                             rather than 1024 threads so that two or more blocks share an SM and one block's
//                             final reduction overlaps another's loads.
// Each thread issues kUnroll = 2 vector loads per tensor before using them. Rows are indexed in int64 (their offsets,
// RowStrides::offset of csrc/common/row_strides.h, once per row: two levels of strides per tensor, so that a
// [:, -(N+1):-1] slice of [B, L, V] logits is read in place, pass 2^31 elements at 16384 x 151936); columns in int,
// which the caller checks. The gradient is written contiguous, [n_rows, width]. A vector is kCols =
// 16 / (the larger element size) columns: 16 bytes of the wider tensor, 8 or 4 of the narrower one (a bf16 student
// with a float32 teacher: 4 columns, 8 + 16 bytes). A row's columns are read as vectors where its pointers
// (student, teacher, and the gradient in the backward) sit at the same column offset within a vector: a scalar head
// up to the first aligned column, whole vectors, then a scalar tail. Rows whose pointers differ in that offset
// (e.g. student and teacher of different odd widths) are read one column at a time, still coalesced across the warp.
//
// Memory traffic per row of V = n_cols columns (width W >= V in the backward): the forward reads s and t once
// (2V elements, plus the target column of each) and writes 8 scalars; the backward reads s and t once (2V) and
// writes the gradient once (W elements).

#include "reverse_kld_launch.h"
#include "device_math.cuh"

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

namespace minillm_cuda {
namespace {

using minillm::RowStrides;

constexpr int kVectorBytes = 16;
constexpr int kUnroll = 2;  // vectors per tensor loaded before the first is used
// Threads an SM must hold at once (__launch_bounds__' minimum blocks): caps registers at 64 per thread.
constexpr int kMinResidentThreads = 1024;

// ---------------------------------------------------------------------------------------------------------------
// Forward state of a part of a row, and the online-softmax updates.
// ---------------------------------------------------------------------------------------------------------------
template <typename acc_t>
struct RowState {
  acc_t m_s, m_t;             // running maxima of the raw logits
  double z_s, z_t;            // Z_s, Z_t (centred on centre_of(m_s), centre_of(m_t))
  double e_acc, a_acc;        // E, A
};

template <typename acc_t>
__device__ __forceinline__ RowState<acc_t> empty_state() {
  const acc_t lowest = negative_infinity<acc_t>();
  return RowState<acc_t>{lowest, lowest, 0, 0, 0, 0};
}

// Re-centres the sums on new maxima (each >= the old one), in double (where the centres' differences are exact):
// the CPU kernel's update, term for term.
template <typename acc_t>
__device__ __noinline__ void rebase(RowState<acc_t>& st, acc_t new_m_s, acc_t new_m_t, double k) {
  // w -> w + d_t takes d_t Z_s from A; u -> u + d_s and e_v -> r e_v take E and A to r (. + d_s Z_s).
  const Recentring move_t = recentring(st.m_t, new_m_t, st.z_t, k);
  st.z_t *= move_t.factor;
  if (st.z_s > 0) st.a_acc -= move_t.shift * st.z_s;
  const Recentring move_s = recentring(st.m_s, new_m_s, st.z_s, k);
  st.e_acc = recentred_moment(st.e_acc, st.z_s, move_s);
  st.a_acc = recentred_moment(st.a_acc, st.z_s, move_s);
  st.z_s *= move_s.factor;
  st.m_s = new_m_s;
  st.m_t = new_m_t;
}

// The terms of one column in acc_t: e_v, exp(k w_v), e_v u_v and e_v (u_v - w_v) (0 where e_v = 0).
template <typename acc_t>
struct ColumnTerms {
  acc_t z_s, z_t, e, a;
};

template <typename acc_t>
__device__ __forceinline__ ColumnTerms<acc_t> column_terms(acc_t x, acc_t y, acc_t c_s, acc_t c_t, acc_t k) {
  const acc_t u = x - c_s;  // <= 0: the centre is the maximum
  const acc_t w = y - c_t;
  const acc_t e = exp_acc(u * k);
  const bool live = e > 0;
  return ColumnTerms<acc_t>{e, exp_acc(w * k), live ? e * u : acc_t(0), live ? e * (u - w) : acc_t(0)};
}

// Adds kN columns s[j], t[j]: maxima first, then the terms at the new centres, two columns at a time (their terms
// added in acc_t, one rounding at the scale of the pair, then into the double sums: half the conversions).
template <int kN, typename student_t, typename teacher_t, typename acc_t>
__device__ __forceinline__ void absorb(RowState<acc_t>& st, const student_t (&s)[kN], const teacher_t (&t)[kN],
                                       acc_t k, double k64) {
  acc_t max_s = negative_infinity<acc_t>(), max_t = negative_infinity<acc_t>();
#pragma unroll
  for (int j = 0; j < kN; ++j) {
    max_s = max_acc(max_s, to_acc<acc_t>(s[j]));
    max_t = max_acc(max_t, to_acc<acc_t>(t[j]));
  }
  const acc_t m_s = max_acc(st.m_s, max_s), m_t = max_acc(st.m_t, max_t);
  if (m_s != st.m_s || m_t != st.m_t) rebase(st, m_s, m_t, k64);
  const acc_t c_s = centre_of(st.m_s), c_t = centre_of(st.m_t);
#pragma unroll
  for (int j = 0; j < kN; j += 2) {
    ColumnTerms<acc_t> p = column_terms(to_acc<acc_t>(s[j]), to_acc<acc_t>(t[j]), c_s, c_t, k);
    if (j + 1 < kN) {
      const ColumnTerms<acc_t> q = column_terms(to_acc<acc_t>(s[j + 1]), to_acc<acc_t>(t[j + 1]), c_s, c_t, k);
      p = ColumnTerms<acc_t>{p.z_s + q.z_s, p.z_t + q.z_t, p.e + q.e, p.a + q.a};
    }
    st.z_s += p.z_s;
    st.z_t += p.z_t;
    st.e_acc += p.e;
    st.a_acc += p.a;
  }
}

template <typename acc_t>
__device__ __forceinline__ RowState<acc_t> merge(RowState<acc_t> x, RowState<acc_t> y, double k) {
  const acc_t m_s = max_acc(x.m_s, y.m_s), m_t = max_acc(x.m_t, y.m_t);
  rebase(x, m_s, m_t, k);
  rebase(y, m_s, m_t, k);
  x.z_s += y.z_s;
  x.z_t += y.z_t;
  x.e_acc += y.e_acc;
  x.a_acc += y.a_acc;
  return x;
}

// Tree reduction over the warp; lane 0 ends with the merge of all 32 states (other lanes hold partial merges).
template <typename acc_t>
__device__ __forceinline__ RowState<acc_t> warp_reduce(RowState<acc_t> st, double k) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    RowState<acc_t> other;
    other.m_s = __shfl_down_sync(kFullMask, st.m_s, offset);
    other.m_t = __shfl_down_sync(kFullMask, st.m_t, offset);
    other.z_s = __shfl_down_sync(kFullMask, st.z_s, offset);
    other.z_t = __shfl_down_sync(kFullMask, st.z_t, offset);
    other.e_acc = __shfl_down_sync(kFullMask, st.e_acc, offset);
    other.a_acc = __shfl_down_sync(kFullMask, st.a_acc, offset);
    st = merge(st, other, k);
  }
  return st;
}

// The merged state of a row group, valid in the group's thread 0. With several warps per row the group is the
// whole block (one row per block), and every thread of the block must call this.
template <int kWarpsPerRow, typename acc_t>
__device__ __forceinline__ RowState<acc_t> reduce_row(RowState<acc_t> st, RowState<acc_t>* partials, double k) {
  st = warp_reduce(st, k);
  if constexpr (kWarpsPerRow > 1) {
    const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
    if (lane == 0) partials[warp] = st;
    __syncthreads();
    if (warp == 0) {
      st = lane < kWarpsPerRow ? partials[lane] : empty_state<acc_t>();
      st = warp_reduce(st, k);
    }
  }
  return st;
}

// ---------------------------------------------------------------------------------------------------------------
// Column layout of a row: scalar head, vectors of kCols columns, scalar tail.
// ---------------------------------------------------------------------------------------------------------------
// kCols columns of one tensor, aligned to their size (at most 16 bytes).
template <typename scalar_t, int kCols>
struct alignas(kCols * sizeof(scalar_t)) Columns {
  scalar_t v[kCols];
};

// Columns per vector for a (student, teacher) pair: 16 bytes of the wider of the two.
template <typename student_t, typename teacher_t>
constexpr int kPairCols = kVectorBytes / static_cast<int>(sizeof(student_t) > sizeof(teacher_t) ? sizeof(student_t)
                                                                                                 : sizeof(teacher_t));

// The column offset of p within a vector of kCols columns (p is aligned to its element).
template <int kCols, typename scalar_t>
__device__ __forceinline__ int column_phase(const scalar_t* p) {
  return static_cast<int>((reinterpret_cast<uintptr_t>(p) / sizeof(scalar_t)) % kCols);
}

// Columns [head, head + n_vectors * kCols) of a run of n columns starting at p are read as vectors; the others
// (the head, before the first aligned column, and the tail) one by one. vectorisable is false when the other
// pointers of the row do not share p's column phase: then every column is a scalar one.
struct ColumnSplit {
  int head;
  int n_vectors;
};

template <int kCols, typename scalar_t>
__device__ __forceinline__ ColumnSplit split_columns(const scalar_t* p, int n, bool vectorisable) {
  if (!vectorisable) return ColumnSplit{n, 0};
  const int phase = column_phase<kCols>(p);
  const int head = min(n, phase == 0 ? 0 : kCols - phase);
  return ColumnSplit{head, (n - head) / kCols};
}

// The column of the j-th scalar column (j in [0, n - n_vectors * kCols)): the head, then the tail.
template <int kCols>
__device__ __forceinline__ int scalar_column(const ColumnSplit& split, int j) {
  return j < split.head ? j : j + split.n_vectors * kCols;
}

// ---------------------------------------------------------------------------------------------------------------
// Forward kernel.
// ---------------------------------------------------------------------------------------------------------------
template <typename student_t, typename teacher_t, int kThreadsPerRow, int kRowsPerBlock>
__global__ void __launch_bounds__(kThreadsPerRow* kRowsPerBlock, kMinResidentThreads / (kThreadsPerRow * kRowsPerBlock))
reverse_kld_forward_kernel(
    const student_t* __restrict__ student, const teacher_t* __restrict__ teacher, RowStrides student_rows,
    RowStrides teacher_rows, const int64_t* __restrict__ target, const bool* __restrict__ mask,
    AccOf<student_t, teacher_t>* __restrict__ kl, AccOf<student_t, teacher_t>* __restrict__ student_logprob,
    AccOf<student_t, teacher_t>* __restrict__ teacher_logprob, AccOf<student_t, teacher_t>* __restrict__ entropy,
    AccOf<student_t, teacher_t>* __restrict__ row_stats, int64_t n_rows, int n_cols, double inv_temperature) {
  using acc_t = AccOf<student_t, teacher_t>;
  constexpr int kWarpsPerRow = kThreadsPerRow / kWarpSize;
  static_assert(kThreadsPerRow % kWarpSize == 0, "a row group is whole warps");
  static_assert(kWarpsPerRow == 1 || kRowsPerBlock == 1, "a row spread over several warps owns its block");
  constexpr int kCols = kPairCols<student_t, teacher_t>;
  __shared__ RowState<acc_t> partials[kWarpsPerRow];

  const int lane = threadIdx.x % kThreadsPerRow;
  // int64: the row offsets pass 2^31 once N * V does (16k tokens x 152k vocab).
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kThreadsPerRow;
  if (row >= n_rows) return;  // only in the last block, and for whole warps (one warp per row)
  if (mask != nullptr && !mask[row]) {  // the same for the whole row group: a masked row reads nothing
    if (lane == 0) {
      kl[row] = student_logprob[row] = teacher_logprob[row] = entropy[row] = 0;
      for (int j = 0; j < 4; ++j) row_stats[4 * row + j] = 0;
    }
    return;
  }
  const student_t* s = student + student_rows.offset(row);
  const teacher_t* t = teacher + teacher_rows.offset(row);
  const acc_t k = static_cast<acc_t>(inv_temperature);

  RowState<acc_t> st = empty_state<acc_t>();
  const ColumnSplit split = split_columns<kCols>(s, n_cols, column_phase<kCols>(s) == column_phase<kCols>(t));
  const auto* s_vectors = reinterpret_cast<const Columns<student_t, kCols>*>(s + split.head);
  const auto* t_vectors = reinterpret_cast<const Columns<teacher_t, kCols>*>(t + split.head);
  for (int i = lane; i < split.n_vectors; i += kThreadsPerRow * kUnroll) {
    Columns<student_t, kCols> sv[kUnroll];
    Columns<teacher_t, kCols> tv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = min(i + u * kThreadsPerRow, split.n_vectors - 1);  // unpredicated loads; extras are not used
      sv[u] = s_vectors[j];
      tv[u] = t_vectors[j];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (i + u * kThreadsPerRow < split.n_vectors) absorb(st, sv[u].v, tv[u].v, k, inv_temperature);
    }
  }
  const int n_scalar = n_cols - split.n_vectors * kCols;
  for (int j = lane; j < n_scalar; j += kThreadsPerRow) {
    const int col = scalar_column<kCols>(split, j);
    const student_t s_col[1] = {s[col]};
    const teacher_t t_col[1] = {t[col]};
    absorb(st, s_col, t_col, k, inv_temperature);
  }

  st = reduce_row<kWarpsPerRow>(st, partials, inv_temperature);
  if (lane != 0) return;
  const double c_s = centre_of(st.m_s), c_t = centre_of(st.m_t);
  const double log_z_s = log(st.z_s);
  const double log_z_t = log(st.z_t);
  kl[row] = static_cast<acc_t>(inv_temperature * st.a_acc / st.z_s - log_z_s + log_z_t);
  entropy[row] = static_cast<acc_t>(log_z_s - inv_temperature * st.e_acc / st.z_s);
  row_stats[4 * row + 0] = static_cast<acc_t>(c_s);
  row_stats[4 * row + 1] = static_cast<acc_t>(log_z_s);
  row_stats[4 * row + 2] = static_cast<acc_t>(c_t);
  row_stats[4 * row + 3] = static_cast<acc_t>(log_z_t);
  if (target == nullptr) {
    student_logprob[row] = teacher_logprob[row] = 0;
  } else if (target[row] >= 0 && target[row] < n_cols) {
    const int64_t y = target[row];
    student_logprob[row] = static_cast<acc_t>(inv_temperature * (static_cast<double>(widen(s[y])) - c_s) - log_z_s);
    teacher_logprob[row] = static_cast<acc_t>(inv_temperature * (static_cast<double>(widen(t[y])) - c_t) - log_z_t);
  } else {
    student_logprob[row] = teacher_logprob[row] = static_cast<acc_t>(CUDART_NAN);  // nothing is read
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Backward kernel.
// ---------------------------------------------------------------------------------------------------------------
// Per-row constants of the backward, for k q (a (log q - log p - KL) - b - c (log q + H)) with log q = k (s - c_s) -
// log Z_s and log p = k (t - c_t) - log Z_t. The differences are formed before the products: where q > 0 they are
// small, while log p and KL alone reach ~1e38 at logits ~4e37, where a log p and a KL overflow float32 (inf - inf).
template <typename acc_t>
struct RowGrad {
  acc_t c_s, log_z_s, c_t, log_z_t;  // row statistics
  acc_t a, b, c, kl, entropy;        // upstream grads, forward outputs
  acc_t one_hot;                     // k b, added at the target column
  acc_t k;
  int target_col;                    // -1 without a target in the vocabulary
};

template <typename acc_t>
__device__ __forceinline__ RowGrad<acc_t> row_grad(const acc_t* row_stats, acc_t a, acc_t b, acc_t c, acc_t kl,
                                                   acc_t entropy, acc_t k, int target_col) {
  RowGrad<acc_t> g;
  g.c_s = row_stats[0];
  g.log_z_s = row_stats[1];
  g.c_t = row_stats[2];
  g.log_z_t = row_stats[3];
  g.a = a;
  g.b = b;
  g.c = c;
  g.kl = kl;
  g.entropy = entropy;
  g.one_hot = k * b;
  g.k = k;
  g.target_col = target_col;
  return g;
}

// k ([q > 0] q (a (log q - log p - KL) - b - c (log q + H)) + b [col == y]) from the raw logits x, y.
template <typename acc_t>
__device__ __forceinline__ acc_t grad_at(const RowGrad<acc_t>& g, acc_t x, acc_t y, int col) {
  const acc_t log_q = (x - g.c_s) * g.k - g.log_z_s;
  const acc_t log_p = (y - g.c_t) * g.k - g.log_z_t;
  const acc_t q = exp_acc(log_q);
  const acc_t term = q > 0 ? q * (g.a * ((log_q - log_p) - g.kl) - g.b - g.c * (log_q + g.entropy)) * g.k
                           : acc_t(0);
  return col == g.target_col ? term + g.one_hot : term;
}

template <typename acc_t>
__device__ __forceinline__ acc_t load_or_zero(const acc_t* p, int64_t row) {
  return p != nullptr ? p[row] : acc_t(0);
}

// Writes 0 to the n columns starting at out, by the row group's threads (16-byte vectors where aligned).
template <typename scalar_t, int kThreadsPerRow>
__device__ __forceinline__ void zero_columns(scalar_t* out, int n, int lane) {
  constexpr int kCols = kVectorBytes / static_cast<int>(sizeof(scalar_t));
  const ColumnSplit split = split_columns<kCols>(out, n, true);
  Columns<scalar_t, kCols> zeros;
#pragma unroll
  for (int j = 0; j < kCols; ++j) convert_into(decltype(widen(scalar_t{}))(0), zeros.v[j]);
  auto* out_vectors = reinterpret_cast<Columns<scalar_t, kCols>*>(out + split.head);
  for (int i = lane; i < split.n_vectors; i += kThreadsPerRow) out_vectors[i] = zeros;
  const int n_scalar = n - split.n_vectors * kCols;
  for (int j = lane; j < n_scalar; j += kThreadsPerRow) out[scalar_column<kCols>(split, j)] = zeros.v[0];
}

template <typename student_t, typename teacher_t, int kThreadsPerRow, int kRowsPerBlock>
__global__ void __launch_bounds__(kThreadsPerRow* kRowsPerBlock, kMinResidentThreads / (kThreadsPerRow * kRowsPerBlock))
reverse_kld_backward_kernel(
    const student_t* __restrict__ student, const teacher_t* __restrict__ teacher, RowStrides student_rows,
    RowStrides teacher_rows, const int64_t* __restrict__ target, const bool* __restrict__ mask,
    const AccOf<student_t, teacher_t>* __restrict__ grad_kl,
    const AccOf<student_t, teacher_t>* __restrict__ grad_student_logprob,
    const AccOf<student_t, teacher_t>* __restrict__ grad_entropy, const AccOf<student_t, teacher_t>* __restrict__ kl,
    const AccOf<student_t, teacher_t>* __restrict__ entropy, const AccOf<student_t, teacher_t>* __restrict__ row_stats,
    student_t* __restrict__ grad_student, int64_t n_rows, int n_cols, int width, double inv_temperature) {
  using acc_t = AccOf<student_t, teacher_t>;
  static_assert(kThreadsPerRow % kWarpSize == 0, "a row group is whole warps");
  constexpr int kCols = kPairCols<student_t, teacher_t>;

  const int lane = threadIdx.x % kThreadsPerRow;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kThreadsPerRow;  // int64
  if (row >= n_rows) return;
  student_t* out = grad_student + row * width;
  const int n_live = (mask == nullptr || mask[row]) ? n_cols : 0;  // a masked row reads nothing, gets 0

  if (n_live > 0) {
    const student_t* s = student + student_rows.offset(row);
    const teacher_t* t = teacher + teacher_rows.offset(row);
    // b counts wherever there is a target: its -b q_v term (through log Z) whatever the id, its one-hot only for an
    // id in the vocabulary (an out-of-range one has no column: NaN log-probabilities, and no one-hot).
    const bool in_vocab = target != nullptr && target[row] >= 0 && target[row] < n_cols;
    const int target_col = in_vocab ? static_cast<int>(target[row]) : -1;
    const acc_t b = target != nullptr ? load_or_zero(grad_student_logprob, row) : acc_t(0);
    const RowGrad<acc_t> g =
        row_grad(row_stats + 4 * row, load_or_zero(grad_kl, row), b, load_or_zero(grad_entropy, row), kl[row],
                 entropy[row], static_cast<acc_t>(inv_temperature), target_col);

    const int phase = column_phase<kCols>(s);
    const bool vectorisable = column_phase<kCols>(t) == phase && column_phase<kCols>(out) == phase;
    const ColumnSplit split = split_columns<kCols>(s, n_live, vectorisable);
    const auto* s_vectors = reinterpret_cast<const Columns<student_t, kCols>*>(s + split.head);
    const auto* t_vectors = reinterpret_cast<const Columns<teacher_t, kCols>*>(t + split.head);
    auto* out_vectors = reinterpret_cast<Columns<student_t, kCols>*>(out + split.head);
    for (int i = lane; i < split.n_vectors; i += kThreadsPerRow * kUnroll) {
      Columns<student_t, kCols> sv[kUnroll];
      Columns<teacher_t, kCols> tv[kUnroll];
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
          Columns<student_t, kCols> gv;
#pragma unroll
          for (int c = 0; c < kCols; ++c) {
            const int col = split.head + j * kCols + c;
            convert_into(grad_at(g, to_acc<acc_t>(sv[u].v[c]), to_acc<acc_t>(tv[u].v[c]), col), gv.v[c]);
          }
          out_vectors[j] = gv;
        }
      }
    }
    const int n_scalar = n_live - split.n_vectors * kCols;
    for (int j = lane; j < n_scalar; j += kThreadsPerRow) {
      const int col = scalar_column<kCols>(split, j);
      convert_into(grad_at(g, to_acc<acc_t>(s[col]), to_acc<acc_t>(t[col]), col), out[col]);
    }
  }
  zero_columns<student_t, kThreadsPerRow>(out + n_live, width - n_live, lane);
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

// One launch of a kernel instance (dtype pair, threads per row, rows per block), as a class template so that the
// dispatch below serves both kernels.
template <typename student_t, typename teacher_t, int kThreadsPerRow, int kRowsPerBlock>
struct ForwardLauncher {
  static cudaError_t run(const ForwardLaunch& a, cudaStream_t stream) {
    using acc_t = AccOf<student_t, teacher_t>;
    dim3 grid;
    if (!grid_for<kRowsPerBlock>(a.n_rows, &grid)) return cudaErrorInvalidConfiguration;
    reverse_kld_forward_kernel<student_t, teacher_t, kThreadsPerRow, kRowsPerBlock>
        <<<grid, kThreadsPerRow * kRowsPerBlock, 0, stream>>>(
            static_cast<const student_t*>(a.student), static_cast<const teacher_t*>(a.teacher),
            a.student_rows, a.teacher_rows, a.target, a.mask, static_cast<acc_t*>(a.kl),
            static_cast<acc_t*>(a.student_logprob), static_cast<acc_t*>(a.teacher_logprob),
            static_cast<acc_t*>(a.entropy), static_cast<acc_t*>(a.row_stats), a.n_rows, a.n_cols, a.inv_temperature);
    return cudaGetLastError();
  }
};

template <typename student_t, typename teacher_t, int kThreadsPerRow, int kRowsPerBlock>
struct BackwardLauncher {
  static cudaError_t run(const BackwardLaunch& a, cudaStream_t stream) {
    using acc_t = AccOf<student_t, teacher_t>;
    dim3 grid;
    if (!grid_for<kRowsPerBlock>(a.n_rows, &grid)) return cudaErrorInvalidConfiguration;
    reverse_kld_backward_kernel<student_t, teacher_t, kThreadsPerRow, kRowsPerBlock>
        <<<grid, kThreadsPerRow * kRowsPerBlock, 0, stream>>>(
            static_cast<const student_t*>(a.student), static_cast<const teacher_t*>(a.teacher),
            a.student_rows, a.teacher_rows, a.target, a.mask, static_cast<const acc_t*>(a.grad_kl),
            static_cast<const acc_t*>(a.grad_student_logprob), static_cast<const acc_t*>(a.grad_entropy),
            static_cast<const acc_t*>(a.kl), static_cast<const acc_t*>(a.entropy),
            static_cast<const acc_t*>(a.row_stats), static_cast<student_t*>(a.grad_student), a.n_rows, a.n_cols,
            a.width, a.inv_temperature);
    return cudaGetLastError();
  }
};

// The kernel instance for the row layout of `columns`.
template <template <typename, typename, int, int> class Launcher, typename student_t, typename teacher_t,
          typename Args>
cudaError_t launch_in_layout(const Args& a, int columns, cudaStream_t stream) {
  switch (row_layout(columns)) {
    case RowLayout::kWarpPerRow:
      return Launcher<student_t, teacher_t, kWarpSize, kRowsPerWarpBlock>::run(a, stream);
    case RowLayout::kBlock256PerRow:
      return Launcher<student_t, teacher_t, 256, 1>::run(a, stream);
    case RowLayout::kBlock512PerRow:
      return Launcher<student_t, teacher_t, 512, 1>::run(a, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
struct TypeTag {
  using type = T;
};

// f(TypeTag<element type>{}) for a logits dtype.
template <typename F>
cudaError_t with_element_type(LogitsDtype dtype, F&& f) {
  switch (dtype) {
    case LogitsDtype::kFloat32:
      return f(TypeTag<float>{});
    case LogitsDtype::kFloat64:
      return f(TypeTag<double>{});
    case LogitsDtype::kBFloat16:
      return f(TypeTag<__nv_bfloat16>{});
    case LogitsDtype::kFloat16:
      return f(TypeTag<__half>{});
  }
  return cudaErrorInvalidValue;
}

// The kernel instance for the (student, teacher) dtype pair and the row layout of `columns`; nothing to launch for
// zero rows. 16 pairs x 3 layouts of each kernel.
template <template <typename, typename, int, int> class Launcher, typename Args>
cudaError_t launch(const Args& a, int columns, cudaStream_t stream) {
  if (a.n_rows == 0) return cudaSuccess;
  return with_element_type(a.student_dtype, [&](auto student_tag) {
    return with_element_type(a.teacher_dtype, [&](auto teacher_tag) {
      using student_t = typename decltype(student_tag)::type;
      using teacher_t = typename decltype(teacher_tag)::type;
      return launch_in_layout<Launcher, student_t, teacher_t>(a, columns, stream);
    });
  });
}

}  // namespace

cudaError_t launch_reverse_kld_forward(const ForwardLaunch& args, cudaStream_t stream) {
  return launch<ForwardLauncher>(args, args.n_cols, stream);
}

cudaError_t launch_reverse_kld_backward(const BackwardLaunch& args, cudaStream_t stream) {
  return launch<BackwardLauncher>(args, args.width, stream);  // the backward touches every column of the gradient
}

}  // namespace minillm_cuda
