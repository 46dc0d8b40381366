// CUDA kernels of the sparse teacher: D(p, q) per row of the student from a teacher given as K (id, log p) pairs, the
// tail completed by the tail mode, and its gradient.
//
// The math and the algorithm are the CPU kernel's (csrc/cpu/sparse_kernel.h; docs/design.md, "The sparse teacher"). Per
// row, with k = 1/T: pass 1 streams the row with the columns of I excluded, each thread keeping the running maximum
// m_R of its columns and, centred on c_R = centre_of(m_R), Z_R = sum exp(k (s - c_R)) and E_R = sum exp(k (s - c_R))
// (s - c_R) (double sums, re-centred when the maximum grows), merged over the block. Exclusion: the row is cut into
// tiles of kTile columns, and for each tile the threads set one bit per entry column in a shared-memory bitmap, which
// the columns then test. The K entries (threads stride over them, block reductions) give c, log Z, log Q_R, P_R and
// the entries' outcomes; "uniform" streams R once more (pass 2). The backward writes each tile's R columns (the bitmap
// skips I) and then the entries' columns: every column once; padding and masked rows 0.
//
// Launch: one block of kThreads = 256 threads per row, columns strided over the threads (coalesced scalar loads).
// Dtypes: the student read in its own dtype; the host hands the log-probabilities over in the accumulation dtype acc_t
// (double if the student or the given log-probabilities are float64) and the ids as int64; per-element arithmetic in
// acc_t, sums and per-row formulas in double, the gradient rounded to nearest even. Rows are indexed in int64
// (RowStrides::offset), columns in int (the caller checks the width). A live id outside [0, V) makes its row NaN;
// nothing is read outside the row.

#include "sparse_launch.h"
#include "device_math.cuh"

#include <cstdint>

namespace minillm_cuda {
namespace {

using minillm::RowStrides;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kTile = 8192;  // columns per exclusion bitmap (1 KiB of shared memory)
constexpr int kTileWords = kTile / 32;

__device__ __forceinline__ float log_of(float x) { return logf(x); }
__device__ __forceinline__ double log_of(double x) { return log(x); }
__device__ __forceinline__ float log1p_of(float x) { return log1pf(x); }
__device__ __forceinline__ double log1p_of(double x) { return log1p(x); }
__device__ __forceinline__ float expm1_of(float x) { return expm1f(x); }
__device__ __forceinline__ double expm1_of(double x) { return expm1(x); }

template <typename acc_t>
struct Outcome {
  acc_t term, qa;
};

// One outcome's term of D and q a (a = dD/dq), from its log-probabilities under the teacher and the student: the
// table of docs/design.md, a term whose leading probability is 0 counting 0; the mixtures' logarithms as in
// divergence.cu (delta = log p - log q, m = w p + (1 - w) q, tail = log1p(w' expm1(-|delta|))). The divergence is a
// run-time argument: the same for every thread of a launch, so the switch costs no divergence of the warps.
template <typename acc_t>
__device__ Outcome<acc_t> outcome(SparseDivergence kind, acc_t log_p, acc_t log_q, acc_t coefficient,
                                  acc_t teacher_weight) {
  const acc_t p = exp_acc(log_p), q = exp_acc(log_q);
  const bool p_live = p > 0, q_live = q > 0;
  const acc_t delta = log_p - log_q;
  switch (kind) {
    case SparseDivergence::kReverseKl:
      return {q_live ? -q * delta : acc_t(0), q_live ? q * (1 - delta) : acc_t(0)};
    case SparseDivergence::kForwardKl:
      return {p_live ? p * delta : acc_t(0), -p};
    case SparseDivergence::kTvd:
      return {acc_t(0.5) * fabs(p - q), acc_t(0.5) * q * (acc_t(q > p) - acc_t(q < p))};
    default:
      break;
  }
  const acc_t weight = delta > 0 ? acc_t(1) - teacher_weight : teacher_weight;
  const acc_t tail = log1p_of(weight * expm1_of(-fabs(delta)));
  const acc_t log_q_over_m = -(fmax(delta, acc_t(0)) + tail);
  const acc_t log_p_over_m = fmin(delta, acc_t(0)) - tail;
  if (kind == SparseDivergence::kJsd) {
    const acc_t q_term = q_live ? q * log_q_over_m : acc_t(0);
    return {coefficient * (p_live ? p * log_p_over_m : acc_t(0)) + (1 - coefficient) * q_term,
            (1 - coefficient) * q_term};
  }
  if (kind == SparseDivergence::kSkewForwardKl) {
    return {p_live ? p * log_p_over_m : acc_t(0),
            p_live ? -p * (1 - coefficient * exp_acc(log_p_over_m)) : acc_t(0)};
  }
  return {q_live ? q * log_q_over_m : acc_t(0),  // the skew reverse KL
          q_live ? q * (log_q_over_m + 1 - coefficient * exp_acc(log_q_over_m)) : acc_t(0)};
}

struct Sum {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a + b; }
};
struct Max {  // NaN ignored (fmax): a NaN reaches the sums instead
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
  __device__ double operator()(double a, double b) const { return fmax(a, b); }
};

// The block's reduction of one value per thread, in every thread. Ends with a barrier, so that calls can follow each
// other (they share the partials).
template <typename T, typename Op>
__device__ T block_reduce(T v, Op op) {
  __shared__ T partials[kWarps];
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v = op(v, __shfl_down_sync(kFullMask, v, offset));
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  if (lane == 0) partials[warp] = v;
  __syncthreads();
  T total = partials[0];
  for (int j = 1; j < kWarps; ++j) total = op(total, partials[j]);  // the same order in every thread
  __syncthreads();
  return total;
}

// One entry of the row: its column, log p, the student's raw logit there; counts (live and in range); bad (live,
// out of range: the row is NaN).
template <typename acc_t>
struct Entry {
  int64_t column;
  acc_t log_p, logit;
  bool counts, bad;
};

template <typename acc_t, typename student_t>
__device__ __forceinline__ Entry<acc_t> read_entry(const student_t* s, const int64_t* ids, const acc_t* log_ps, int j,
                                                   int n_cols) {
  const acc_t log_p = log_ps[j];
  const bool live = log_p != negative_infinity<acc_t>();  // (NaN is live)
  const int64_t column = ids[j];
  const bool in_range = column >= 0 && column < n_cols;
  const bool counts = live && in_range;
  return {column, log_p, counts ? to_acc<acc_t>(s[column]) : negative_infinity<acc_t>(), counts, live && !in_range};
}

// Marks the tile [start, start + kTile)'s entry columns in the shared bitmap (one bit per column); the threads then
// test them with is_entry. Starts and ends with a barrier.
template <typename acc_t>
__device__ void mark_entries(uint32_t* bits, int start, const int64_t* ids, const acc_t* log_ps, int n_entries,
                             int n_cols) {
  __syncthreads();  // (the previous tile's readers are done)
  for (int w = threadIdx.x; w < kTileWords; w += kThreads) bits[w] = 0;
  __syncthreads();
  for (int j = threadIdx.x; j < n_entries; j += kThreads) {
    const int64_t column = ids[j];
    if (log_ps[j] != negative_infinity<acc_t>() && column >= start && column < start + kTile && column < n_cols) {
      const int offset = static_cast<int>(column - start);
      atomicOr(&bits[offset / 32], 1u << (offset % 32));
    }
  }
  __syncthreads();
}

__device__ __forceinline__ bool is_entry(const uint32_t* bits, int offset) {
  return (bits[offset / 32] >> (offset % 32)) & 1u;
}

// Pass 1's per-thread state: the running maximum of its R columns and the sums centred on centre_of(m).
template <typename acc_t>
struct TailState {
  acc_t m;
  double z, e;
};

// state re-centred from centre_of(state.m) onto centre_of(new_m) (new_m >= m): e_v -> r e_v, (s - c) -> (s - c) + d.
template <typename acc_t>
__device__ __forceinline__ TailState<acc_t> recentred(TailState<acc_t> st, acc_t new_m, double k) {
  const Recentring move = recentring(st.m, new_m, st.z, k);
  st.e = recentred_moment(st.e, st.z, move);
  st.z *= move.factor;
  st.m = new_m;
  return st;
}

template <typename acc_t>
__device__ TailState<acc_t> block_tail_state(TailState<acc_t> st, double k) {
  const acc_t m = block_reduce(st.m, Max{});
  st = recentred(st, m, k);
  return {m, block_reduce(st.z, Sum{}), block_reduce(st.e, Sum{})};
}

// The row's teacher side and the entries' student maxima.
template <typename acc_t>
struct Head {
  acc_t top, top_log_p;  // the largest logit and log p of I
  double p_sum;          // sum_I p
  int n_live, n_bad;
};

template <typename acc_t, typename student_t>
__device__ Head<acc_t> head_of(const student_t* s, const int64_t* ids, const acc_t* log_ps, int n_entries, int n_cols) {
  acc_t top = negative_infinity<acc_t>(), top_log_p = negative_infinity<acc_t>();
  double p_sum = 0;
  int n_live = 0, n_bad = 0;
  for (int j = threadIdx.x; j < n_entries; j += kThreads) {
    const Entry<acc_t> e = read_entry(s, ids, log_ps, j, n_cols);
    if (e.counts) {
      top = max_acc(top, e.logit);
      top_log_p = max_acc(top_log_p, e.log_p);
      p_sum += exp(static_cast<double>(e.log_p));
      ++n_live;
    }
    n_bad += e.bad;
  }
  return {block_reduce(top, Max{}), block_reduce(top_log_p, Max{}), block_reduce(p_sum, Sum{}),
          block_reduce(n_live, Sum{}), block_reduce(n_bad, Sum{})};
}

// The entries' sums: at the row's centre c (Z_I, E_I), at their own centre c_I (the renormalized student) and
// sum_I exp(log p - max log p) (the renormalized teacher).
struct EntrySums {
  double z, e, z_entries, p_entries;
};

template <typename acc_t, typename student_t>
__device__ EntrySums entry_sums_of(const student_t* s, const int64_t* ids, const acc_t* log_ps, int n_entries,
                                   int n_cols, acc_t c, acc_t c_entries, acc_t top_log_p, acc_t k) {
  double z = 0, e = 0, z_entries = 0, p_entries = 0;
  for (int j = threadIdx.x; j < n_entries; j += kThreads) {
    const Entry<acc_t> en = read_entry(s, ids, log_ps, j, n_cols);
    if (!en.counts) continue;
    const acc_t u = en.logit - c, ev = exp_acc(u * k);
    z += ev;
    e += ev > 0 ? ev * u : acc_t(0);
    z_entries += exp_acc((en.logit - c_entries) * k);
    p_entries += exp_acc(en.log_p - top_log_p);
  }
  return {block_reduce(z, Sum{}), block_reduce(e, Sum{}), block_reduce(z_entries, Sum{}),
          block_reduce(p_entries, Sum{})};
}

// log P_R: max(1 - P_I, 0), 0 where R is empty; NaN with a NaN log-probability.
__device__ __forceinline__ double log_tail_mass(double p_sum, int n_live, int n_cols) {
  const double tail = n_live < n_cols ? 1 - p_sum : (p_sum - p_sum);
  return isnan(tail) ? tail : log(fmax(tail, 0.0));
}

template <typename student_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) sparse_forward_kernel(SparseForwardLaunch a) {
  const SparseInputs& in = a.in;
  const int64_t row = blockIdx.x;  // int64: the row offsets pass 2^31 once N * V does
  acc_t* value = static_cast<acc_t*>(a.value);
  acc_t* student_logprob = static_cast<acc_t*>(a.student_logprob);
  acc_t* entropy = static_cast<acc_t*>(a.entropy);
  acc_t* mean_partial = static_cast<acc_t*>(a.mean_partial);
  acc_t* row_stats = static_cast<acc_t*>(a.row_stats) + 4 * row;
  if (in.mask != nullptr && !in.mask[row]) {  // the whole block returns: a masked row reads nothing
    if (threadIdx.x == 0) {
      value[row] = student_logprob[row] = entropy[row] = mean_partial[row] = 0;
      for (int j = 0; j < 4; ++j) row_stats[j] = 0;
    }
    return;
  }
  __shared__ uint32_t bits[kTileWords];
  const student_t* s = static_cast<const student_t*>(in.student) + in.student_rows.offset(row);
  const int64_t* ids = in.teacher_ids + row * in.n_entries;
  const acc_t* log_ps = static_cast<const acc_t*>(in.teacher_logprobs) + row * in.n_entries;
  const double k64 = in.inv_temperature;
  const acc_t k = static_cast<acc_t>(k64), coefficient = acc_t(in.coefficient), weight = acc_t(in.teacher_weight);
  const int n_cols = in.streamed ? in.n_cols : 0;

  // Pass 1 over R.
  TailState<acc_t> st{negative_infinity<acc_t>(), 0, 0};
  for (int start = 0; start < n_cols; start += kTile) {
    mark_entries(bits, start, ids, log_ps, in.n_entries, in.n_cols);
    const int end = min(start + kTile, n_cols);
    for (int col = start + threadIdx.x; col < end; col += kThreads) {
      if (is_entry(bits, col - start)) continue;
      const acc_t x = to_acc<acc_t>(s[col]);
      st = recentred(st, max_acc(st.m, x), k64);
      const acc_t u = x - centre_of(st.m), ev = exp_acc(u * k);
      st.z += ev;
      st.e += ev > 0 ? ev * u : acc_t(0);
    }
  }
  const TailState<acc_t> tail = block_tail_state(st, k64);

  // The entries: the row's centre and log-normaliser, the entropy, the teacher's tail mass.
  const Head<acc_t> h = head_of(s, ids, log_ps, in.n_entries, in.n_cols);
  const double c_r = centre_of(tail.m);
  const acc_t c = centre_of(max_acc(tail.m, h.top)), c_entries = centre_of(h.top);
  const EntrySums sums = entry_sums_of(s, ids, log_ps, in.n_entries, in.n_cols, c, c_entries, h.top_log_p, k);
  const double ratio = exp(fmin(c_r - double(c), 0.0) * k64);
  const double z = (tail.z == 0 ? 0.0 : tail.z * ratio) + sums.z;  // (NaN stays NaN)
  const double e = (tail.z == 0 ? 0.0 : ratio * (tail.e + (c_r - double(c)) * tail.z)) + sums.e;
  const double log_z = log(z), log_z_r = log(tail.z);
  const double log_p_tail = log_tail_mass(h.p_sum, h.n_live, in.n_cols);
  const double log_q_tail = tail.z == 0 ? -CUDART_INF : (c_r - double(c)) * k64 + log_z_r - log_z;
  const acc_t log_z_acc = acc_t(log_z), log_z_entries = acc_t(log(sums.z_entries));
  const acc_t log_mass = acc_t(double(h.top_log_p) + log(sums.p_entries));
  const bool renormalized = in.tail == SparseTail::kRenormalized;

  double total = 0, partial = 0;
  for (int j = threadIdx.x; j < in.n_entries; j += kThreads) {
    const Entry<acc_t> en = read_entry(s, ids, log_ps, j, in.n_cols);
    if (!en.counts) continue;
    const Outcome<acc_t> o = renormalized
        ? outcome(in.divergence, en.log_p - log_mass, (en.logit - c_entries) * k - log_z_entries, coefficient, weight)
        : outcome(in.divergence, en.log_p, (en.logit - c) * k - log_z_acc, coefficient, weight);
    total += o.term;
    partial += o.qa;
  }
  const bool has_tail = h.n_live < in.n_cols;
  if (in.tail == SparseTail::kUniform && has_tail) {  // pass 2 over R, against the uniform completion
    const acc_t log_pi = acc_t(log_p_tail - log(double(in.n_cols - h.n_live)));
    for (int start = 0; start < n_cols; start += kTile) {
      mark_entries(bits, start, ids, log_ps, in.n_entries, in.n_cols);
      const int end = min(start + kTile, n_cols);
      for (int col = start + threadIdx.x; col < end; col += kThreads) {
        if (is_entry(bits, col - start)) continue;
        const Outcome<acc_t> o = outcome(in.divergence, log_pi, (to_acc<acc_t>(s[col]) - c) * k - log_z_acc,
                                         coefficient, weight);
        total += o.term;
        partial += o.qa;
      }
    }
  }
  total = block_reduce(total, Sum{});
  partial = block_reduce(partial, Sum{});
  if (threadIdx.x != 0) return;
  if (in.tail == SparseTail::kBin && has_tail) {
    const Outcome<double> o = outcome(in.divergence, log_p_tail, log_q_tail, in.coefficient, in.teacher_weight);
    total += o.term;
    partial += o.qa;
  }
  // NaN of the row: a NaN log-probability, a live id out of range, NaN in the student's logits the mode reads.
  double nan_of_row = (h.p_sum - h.p_sum) + (h.n_bad > 0 ? CUDART_NAN : 0.0);
  nan_of_row += renormalized ? (h.n_live > 0 ? sums.z_entries - sums.z_entries : 0.0) : log_z - log_z;
  value[row] = static_cast<acc_t>(total + nan_of_row);
  mean_partial[row] = static_cast<acc_t>(partial + nan_of_row);
  if (in.target != nullptr) {
    const int64_t y = in.target[row];
    student_logprob[row] = static_cast<acc_t>(
        y >= 0 && y < in.n_cols ? (double(to_acc<acc_t>(s[y])) - double(c)) * k64 - log_z : CUDART_NAN);
  } else {
    student_logprob[row] = 0;
  }
  entropy[row] = static_cast<acc_t>(in.streamed ? log_z - k64 * e / z : 0.0);
  row_stats[0] = c;
  row_stats[1] = static_cast<acc_t>(log_z);
  row_stats[2] = static_cast<acc_t>(c_r);
  row_stats[3] = static_cast<acc_t>(log_z_r);
}

template <typename student_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) sparse_backward_kernel(SparseBackwardLaunch a) {
  const SparseInputs& in = a.in;
  const int64_t row = blockIdx.x;  // int64: see the forward kernel
  student_t* out = static_cast<student_t*>(a.grad_student) + row * a.width;
  const bool valid = in.mask == nullptr || in.mask[row];
  const int n_cols = valid ? in.n_cols : 0;  // a masked row reads nothing and gets a zero gradient
  const int n_entries = valid ? in.n_entries : 0;
  __shared__ uint32_t bits[kTileWords];
  const student_t* s = static_cast<const student_t*>(in.student) + in.student_rows.offset(row);
  const int64_t* ids = in.teacher_ids + row * in.n_entries;
  const acc_t* log_ps = static_cast<const acc_t*>(in.teacher_logprobs) + row * in.n_entries;
  const double k64 = in.inv_temperature;
  const acc_t k = static_cast<acc_t>(k64), coefficient = acc_t(in.coefficient), weight = acc_t(in.teacher_weight);
  const acc_t* st = static_cast<const acc_t*>(a.row_stats) + 4 * row;
  const acc_t g = static_cast<const acc_t*>(a.grad_value)[row], mean = static_cast<const acc_t*>(a.mean_partial)[row];
  const acc_t c = st[0], log_z = st[1], c_r = st[2];
  const double log_z_r64 = st[3];
  // The token statistics: b = dL/dlog q(y), c = dL/dH (only with a target).
  const bool token = in.target != nullptr;
  const acc_t b = token && a.grad_student_logprob ? static_cast<const acc_t*>(a.grad_student_logprob)[row] : acc_t(0);
  const acc_t grad_h = token && a.grad_entropy ? static_cast<const acc_t*>(a.grad_entropy)[row] : acc_t(0);
  const acc_t entropy = token ? static_cast<const acc_t*>(a.entropy)[row] : acc_t(0);
  const int64_t y = token ? in.target[row] : -1;

  const Head<acc_t> h = head_of(s, ids, log_ps, n_entries, in.n_cols);
  const acc_t c_entries = centre_of(h.top);
  const EntrySums sums = entry_sums_of(s, ids, log_ps, n_entries, in.n_cols, c, c_entries, h.top_log_p, k);
  const acc_t log_z_entries = acc_t(log(sums.z_entries));
  const acc_t log_mass = acc_t(double(h.top_log_p) + log(sums.p_entries));
  const double log_p_tail = log_tail_mass(h.p_sum, h.n_live, in.n_cols);
  const bool has_tail = log_z_r64 != -CUDART_INF;  // the student has mass on R
  const double log_q_tail = (double(c_r) - double(c)) * k64 + log_z_r64 - double(log_z);
  const acc_t tail_qa = has_tail && in.tail == SparseTail::kBin
      ? acc_t(outcome(in.divergence, log_p_tail, log_q_tail, in.coefficient, in.teacher_weight).qa) : acc_t(0);
  const acc_t log_z_r = has_tail ? acc_t(log_z_r64) : acc_t(0);
  const acc_t log_pi = acc_t(log_p_tail - log(double(max(in.n_cols - h.n_live, 1))));

  // The columns of R (and the padding), tile by tile; the bitmap skips the columns of I.
  for (int start = 0; start < a.width; start += kTile) {
    if (start < n_cols) mark_entries(bits, start, ids, log_ps, n_entries, in.n_cols);
    const int end = min(start + kTile, a.width);
    for (int col = start + threadIdx.x; col < end; col += kThreads) {
      acc_t grad = 0;
      if (col < n_cols) {
        if (is_entry(bits, col - start)) continue;
        if (in.streamed) {
          const acc_t x = to_acc<acc_t>(s[col]);
          const acc_t log_q = (x - c) * k - log_z, q = exp_acc(log_q);
          if (in.tail == SparseTail::kBin) {
            grad = g * (exp_acc((x - c_r) * k - log_z_r) * tail_qa - q * mean);
          } else if (in.tail == SparseTail::kUniform) {
            grad = g * (outcome(in.divergence, log_pi, log_q, coefficient, weight).qa - q * mean);
          }  // (renormalized: the tail columns are not in the divergence)
          if (token) grad += b * (acc_t(col == y) - q) - grad_h * (q > 0 ? q * (log_q + entropy) : acc_t(0));
          grad *= k;
        }
      }
      convert_into(grad, out[col]);
    }
  }

  // The columns of I.
  for (int j = threadIdx.x; j < n_entries; j += kThreads) {
    const Entry<acc_t> en = read_entry(s, ids, log_ps, j, in.n_cols);
    if (!en.counts) continue;
    const acc_t log_q = (en.logit - c) * k - log_z, q = exp_acc(log_q);
    acc_t grad;
    if (in.tail == SparseTail::kRenormalized) {
      const acc_t log_q_entries = (en.logit - c_entries) * k - log_z_entries;
      grad = g * (outcome(in.divergence, en.log_p - log_mass, log_q_entries, coefficient, weight).qa -
                  exp_acc(log_q_entries) * mean);
    } else {
      grad = g * (outcome(in.divergence, en.log_p, log_q, coefficient, weight).qa - q * mean);
    }
    if (token) grad += b * (acc_t(en.column == y) - q) - grad_h * (q > 0 ? q * (log_q + entropy) : acc_t(0));
    convert_into(grad * k, out[en.column]);
  }
}

template <typename T>
struct TypeTag {
  using type = T;
};

// f(student TypeTag, acc TypeTag): the 7 pairs of a student dtype and an accumulation type.
template <typename F>
cudaError_t dispatch(const SparseInputs& in, F&& f) {
  if (in.n_rows == 0) return cudaSuccess;
  if (in.n_rows > INT32_MAX) return cudaErrorInvalidConfiguration;  // one block per row
  auto with_acc = [&](auto student_tag) {
    using student_t = typename decltype(student_tag)::type;
    if constexpr (std::is_same<student_t, double>::value) {
      return f(student_tag, TypeTag<double>{});
    } else {
      return in.double_accumulation ? f(student_tag, TypeTag<double>{}) : f(student_tag, TypeTag<float>{});
    }
  };
  switch (in.student_dtype) {
    case LogitsDtype::kFloat32:
      return with_acc(TypeTag<float>{});
    case LogitsDtype::kFloat64:
      return with_acc(TypeTag<double>{});
    case LogitsDtype::kBFloat16:
      return with_acc(TypeTag<__nv_bfloat16>{});
    case LogitsDtype::kFloat16:
      return with_acc(TypeTag<__half>{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_sparse_forward(const SparseForwardLaunch& a, cudaStream_t stream) {
  return dispatch(a.in, [&](auto student_tag, auto acc_tag) {
    using student_t = typename decltype(student_tag)::type;
    using acc_t = typename decltype(acc_tag)::type;
    sparse_forward_kernel<student_t, acc_t><<<static_cast<unsigned>(a.in.n_rows), kThreads, 0, stream>>>(a);
    return cudaGetLastError();
  });
}

cudaError_t launch_sparse_backward(const SparseBackwardLaunch& a, cudaStream_t stream) {
  return dispatch(a.in, [&](auto student_tag, auto acc_tag) {
    using student_t = typename decltype(student_tag)::type;
    using acc_t = typename decltype(acc_tag)::type;
    sparse_backward_kernel<student_t, acc_t><<<static_cast<unsigned>(a.in.n_rows), kThreads, 0, stream>>>(a);
    return cudaGetLastError();
  });
}

}  // namespace minillm_cuda
