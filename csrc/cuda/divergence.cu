// CUDA kernels of the divergence family beside the reverse KL (forward KL, generalized JSD, skew forward and skew
// reverse KL, total variation): two streaming passes per row forward, one backward.
//
// The math is the CPU kernel's (csrc/cpu/divergence_kernel.h), column for column. Per row, with k = 1/T:
// pass 1 gives both log-normalisers, each thread keeping running maxima m_s, m_t of the raw logits of its columns and
// Z_s = sum exp(k (s - c_s)), Z_t likewise (c = centre_of(m); double sums, re-centred when a maximum grows), merged
// over the block (warp shuffles, then shared memory) into (c_s, log Z_s, c_t, log Z_t); pass 2 evaluates each column,
//   log q_v = k (s_v - c_s) - log Z_s,   log p_v = k (t_v - c_t) - log Z_t,
//   delta_v = k ((t_v - c_t) - (s_v - c_s)) - (log Z_t - log Z_s)   (raw differences first),
//   tail_v = log1p(w' expm1(-|delta_v|)),   w' = w where delta_v <= 0, 1 - w above,
//   log m_v - log q_v = max(delta_v, 0) + tail_v,   log p_v - log m_v = min(delta_v, 0) - tail_v,
// and adds up the value's terms and mean_partial = sum_v q_v a_v (a_v = dD/dq_v; q_v a_v is finite):
//   forward_kl -p;  jsd (1 - beta) q log(q / m);  skew_forward_kl -p (1 - alpha p / m);
//   skew_reverse_kl q (log(q / m) + 1 - alpha q / m);  tvd 1/2 q sign(q - p) (0 at q = p).
// The backward writes, in one pass, grad_v = g k (q_v a_v - q_v mean_partial).
//
// Launch: one block of kThreads = 256 threads per row, columns strided over the threads (coalesced scalar loads; not
// the reverse KL's vector loads and warp-per-row layout for narrow rows, which a GPU benchmark should motivate first).
// Dtypes as in reverse_kld.cu (device_math.cuh): each input read in its own dtype, per-element arithmetic in acc_t
// (double if either is float64), sums and per-row formulas in double, the gradient rounded to nearest even. Rows are
// indexed in int64 (RowStrides::offset), columns in int (the caller checks the width).
//
// Memory traffic per row of V columns: forward reads s and t twice (4V elements), backward reads them once and writes
// the gradient once (3V, plus the padding columns' zeros).

#include "divergence_launch.h"
#include "device_math.cuh"

#include <cstdint>

namespace minillm_cuda {
namespace {

using minillm::RowStrides;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;

__device__ __forceinline__ float log1p_acc(float x) { return log1pf(x); }
__device__ __forceinline__ double log1p_acc(double x) { return log1p(x); }
__device__ __forceinline__ float expm1_acc(float x) { return expm1f(x); }
__device__ __forceinline__ double expm1_acc(double x) { return expm1(x); }
__device__ __forceinline__ float exp_exact(float x) { return expf(x); }
__device__ __forceinline__ double exp_exact(double x) { return exp(x); }

// A row's constants for pass 2 and the backward.
template <typename acc_t>
struct Row {
  acc_t c_s, log_z_s, c_t, log_z_t, log_z_gap, k, coefficient, teacher_weight;
};

template <typename acc_t>
__device__ __forceinline__ Row<acc_t> row_of(double coefficient, double teacher_weight, double inv_t, double c_s,
                                             double log_z_s, double c_t, double log_z_t) {
  return Row<acc_t>{acc_t(c_s), acc_t(log_z_s), acc_t(c_t), acc_t(log_z_t), acc_t(log_z_t - log_z_s), acc_t(inv_t),
                    acc_t(coefficient), acc_t(teacher_weight)};
}

// One column's q_v, its term of D and q_v a_v, from the raw logits x (student) and y (teacher) in acc_t.
template <typename acc_t>
struct Column {
  acc_t q, value, partial;
};

template <DivergenceKind kKind, typename acc_t>
__device__ __forceinline__ Column<acc_t> column(const Row<acc_t>& r, acc_t x, acc_t y) {
  const acc_t neg_inf = negative_infinity<acc_t>();
  const acc_t u = x - r.c_s, w = y - r.c_t;
  const acc_t log_q = u * r.k - r.log_z_s, log_p = w * r.k - r.log_z_t;
  const acc_t q = exp_acc(log_q), p = exp_acc(log_p);
  const bool q_live = q > 0, p_live = p > 0;
  // log p - log q, from the raw differences where both are finite (+-inf where one model's logit is -inf).
  const acc_t delta = (x > neg_inf && y > neg_inf) ? (w - u) * r.k - r.log_z_gap : log_p - log_q;
  if constexpr (kKind == DivergenceKind::kForwardKl) {
    return {q, p_live ? p * delta : acc_t(0), -p};
  } else if constexpr (kKind == DivergenceKind::kTvd) {
    const acc_t sign = acc_t(q > p) - acc_t(q < p);
    return {q, acc_t(0.5) * fabs(p - q), acc_t(0.5) * q * sign};
  } else {
    // The mixture m = w p + (1 - w) q: log m - log q = max(delta, 0) + tail, log p - log m = min(delta, 0) - tail.
    const acc_t weight = delta > 0 ? acc_t(1) - r.teacher_weight : r.teacher_weight;
    const acc_t tail = log1p_acc(weight * expm1_acc(-fabs(delta)));
    const acc_t log_q_over_m = -(fmax(delta, acc_t(0)) + tail);
    const acc_t log_p_over_m = fmin(delta, acc_t(0)) - tail;
    if constexpr (kKind == DivergenceKind::kJsd) {
      const acc_t beta = r.coefficient;
      const acc_t q_term = q_live ? q * log_q_over_m : acc_t(0);
      return {q, beta * (p_live ? p * log_p_over_m : acc_t(0)) + (1 - beta) * q_term, (1 - beta) * q_term};
    } else if constexpr (kKind == DivergenceKind::kSkewForwardKl) {
      const acc_t p_over_m = exp_exact(log_p_over_m);
      return {q, p_live ? p * log_p_over_m : acc_t(0),
              p_live ? -p * (1 - r.coefficient * p_over_m) : acc_t(0)};
    } else {  // the skew reverse KL
      const acc_t q_over_m = exp_exact(log_q_over_m);
      return {q, q_live ? q * log_q_over_m : acc_t(0),
              q_live ? q * (log_q_over_m + 1 - r.coefficient * q_over_m) : acc_t(0)};
    }
  }
}

// Pass 1's state: running maxima and the sums centred on centre_of(m).
template <typename acc_t>
struct Normalisers {
  acc_t m_s, m_t;
  double z_s, z_t;
};

template <typename acc_t>
__device__ __forceinline__ Normalisers<acc_t> merge(const Normalisers<acc_t>& a, const Normalisers<acc_t>& b,
                                                    double k) {
  const acc_t m_s = max_acc(a.m_s, b.m_s), m_t = max_acc(a.m_t, b.m_t);
  return {m_s, m_t, recentred(a.z_s, a.m_s, m_s, k) + recentred(b.z_s, b.m_s, m_s, k),
          recentred(a.z_t, a.m_t, m_t, k) + recentred(b.z_t, b.m_t, m_t, k)};
}

// The block's merge of every thread's state, in every thread.
template <typename acc_t>
__device__ Normalisers<acc_t> block_normalisers(Normalisers<acc_t> st, double k) {
  __shared__ Normalisers<acc_t> partials[kWarps];
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    Normalisers<acc_t> other;
    other.m_s = __shfl_down_sync(kFullMask, st.m_s, offset);
    other.m_t = __shfl_down_sync(kFullMask, st.m_t, offset);
    other.z_s = __shfl_down_sync(kFullMask, st.z_s, offset);
    other.z_t = __shfl_down_sync(kFullMask, st.z_t, offset);
    st = merge(st, other, k);
  }
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  if (lane == 0) partials[warp] = st;
  __syncthreads();
  Normalisers<acc_t> total = partials[0];
  for (int j = 1; j < kWarps; ++j) total = merge(total, partials[j], k);  // the same order in every thread
  return total;
}

// The block's sums of two doubles, valid in thread 0.
__device__ double2 block_sums(double a, double b) {
  __shared__ double2 partials[kWarps];
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    a += __shfl_down_sync(kFullMask, a, offset);
    b += __shfl_down_sync(kFullMask, b, offset);
  }
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  if (lane == 0) partials[warp] = make_double2(a, b);
  __syncthreads();
  double2 total = partials[0];
  for (int j = 1; j < kWarps; ++j) total = make_double2(total.x + partials[j].x, total.y + partials[j].y);
  return total;
}

template <DivergenceKind kKind, typename student_t, typename teacher_t>
__global__ void __launch_bounds__(kThreads) divergence_forward_kernel(
    const student_t* __restrict__ student, const teacher_t* __restrict__ teacher, RowStrides student_rows,
    RowStrides teacher_rows, const bool* __restrict__ mask, AccOf<student_t, teacher_t>* __restrict__ value,
    AccOf<student_t, teacher_t>* __restrict__ mean_partial, AccOf<student_t, teacher_t>* __restrict__ row_stats,
    int n_cols, double coefficient, double teacher_weight, double inv_temperature) {
  using acc_t = AccOf<student_t, teacher_t>;
  const int64_t row = blockIdx.x;  // int64: the row offsets pass 2^31 once N * V does
  if (mask != nullptr && !mask[row]) {  // the whole block returns: a masked row reads nothing
    if (threadIdx.x == 0) {
      value[row] = mean_partial[row] = 0;
      for (int j = 0; j < 4; ++j) row_stats[4 * row + j] = 0;
    }
    return;
  }
  const student_t* s = student + student_rows.offset(row);
  const teacher_t* t = teacher + teacher_rows.offset(row);
  const acc_t k = static_cast<acc_t>(inv_temperature);

  // Pass 1: the log-normalisers.
  Normalisers<acc_t> st{negative_infinity<acc_t>(), negative_infinity<acc_t>(), 0, 0};
  for (int col = threadIdx.x; col < n_cols; col += kThreads) {
    const acc_t x = to_acc<acc_t>(s[col]), y = to_acc<acc_t>(t[col]);
    const acc_t m_s = max_acc(st.m_s, x), m_t = max_acc(st.m_t, y);
    st.z_s = recentred(st.z_s, st.m_s, m_s, inv_temperature);
    st.z_t = recentred(st.z_t, st.m_t, m_t, inv_temperature);
    st.m_s = m_s;
    st.m_t = m_t;
    st.z_s += exp_acc((x - centre_of(m_s)) * k);
    st.z_t += exp_acc((y - centre_of(m_t)) * k);
  }
  const Normalisers<acc_t> total = block_normalisers(st, inv_temperature);
  const double c_s = centre_of(total.m_s), c_t = centre_of(total.m_t);
  const double log_z_s = log(total.z_s), log_z_t = log(total.z_t);

  // Pass 2: the value's terms and sum_v q_v a_v.
  const Row<acc_t> r = row_of<acc_t>(coefficient, teacher_weight, inv_temperature, c_s, log_z_s, c_t, log_z_t);
  double sum_value = 0, sum_partial = 0;
  for (int col = threadIdx.x; col < n_cols; col += kThreads) {
    const Column<acc_t> c = column<kKind>(r, to_acc<acc_t>(s[col]), to_acc<acc_t>(t[col]));
    sum_value += c.value;
    sum_partial += c.partial;
  }
  const double2 sums = block_sums(sum_value, sum_partial);
  if (threadIdx.x != 0) return;
  // NaN logits make a log-normaliser NaN, and every q_v, p_v with it: the terms alone would drop them.
  const double nan_of_logits = (log_z_s - log_z_s) + (log_z_t - log_z_t);
  value[row] = static_cast<acc_t>(sums.x + nan_of_logits);
  mean_partial[row] = static_cast<acc_t>(sums.y + nan_of_logits);
  row_stats[4 * row + 0] = static_cast<acc_t>(c_s);
  row_stats[4 * row + 1] = static_cast<acc_t>(log_z_s);
  row_stats[4 * row + 2] = static_cast<acc_t>(c_t);
  row_stats[4 * row + 3] = static_cast<acc_t>(log_z_t);
}

template <DivergenceKind kKind, typename student_t, typename teacher_t>
__global__ void __launch_bounds__(kThreads) divergence_backward_kernel(
    const student_t* __restrict__ student, const teacher_t* __restrict__ teacher, RowStrides student_rows,
    RowStrides teacher_rows, const bool* __restrict__ mask,
    const AccOf<student_t, teacher_t>* __restrict__ grad_divergence,
    const AccOf<student_t, teacher_t>* __restrict__ mean_partial,
    const AccOf<student_t, teacher_t>* __restrict__ row_stats, student_t* __restrict__ grad_student, int n_cols,
    int width, double coefficient, double teacher_weight, double inv_temperature) {
  using acc_t = AccOf<student_t, teacher_t>;
  const int64_t row = blockIdx.x;  // int64: see the forward kernel
  student_t* out = grad_student + row * width;
  const int n_live = (mask == nullptr || mask[row]) ? n_cols : 0;  // a masked row reads nothing, gets 0
  const acc_t* st = row_stats + 4 * row;
  const Row<acc_t> r = row_of<acc_t>(coefficient, teacher_weight, inv_temperature, st[0], st[1], st[2], st[3]);
  const acc_t scale = grad_divergence[row] * r.k, mean = mean_partial[row];
  const student_t* s = student + student_rows.offset(row);
  const teacher_t* t = teacher + teacher_rows.offset(row);
  for (int col = threadIdx.x; col < width; col += kThreads) {
    acc_t grad = 0;
    if (col < n_live) {
      const Column<acc_t> c = column<kKind>(r, to_acc<acc_t>(s[col]), to_acc<acc_t>(t[col]));
      grad = scale * (c.partial - c.q * mean);
    }
    convert_into(grad, out[col]);
  }
}

template <typename T>
struct TypeTag {
  using type = T;
};

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

template <DivergenceKind kKind>
struct DivergenceTag {
  static constexpr DivergenceKind kind = kKind;
};

template <typename F>
cudaError_t with_divergence(DivergenceKind kind, F&& f) {
  switch (kind) {
    case DivergenceKind::kForwardKl:
      return f(DivergenceTag<DivergenceKind::kForwardKl>{});
    case DivergenceKind::kJsd:
      return f(DivergenceTag<DivergenceKind::kJsd>{});
    case DivergenceKind::kSkewForwardKl:
      return f(DivergenceTag<DivergenceKind::kSkewForwardKl>{});
    case DivergenceKind::kSkewReverseKl:
      return f(DivergenceTag<DivergenceKind::kSkewReverseKl>{});
    case DivergenceKind::kTvd:
      return f(DivergenceTag<DivergenceKind::kTvd>{});
  }
  return cudaErrorInvalidValue;
}

// f(DivergenceTag, student TypeTag, teacher TypeTag): 5 divergences x 16 dtype pairs of each kernel.
template <typename Args, typename F>
cudaError_t dispatch(const Args& a, F&& f) {
  if (a.n_rows == 0) return cudaSuccess;
  if (a.n_rows > INT32_MAX) return cudaErrorInvalidConfiguration;  // one block per row
  return with_divergence(a.divergence, [&](auto kind_tag) {
    return with_element_type(a.student_dtype, [&](auto student_tag) {
      return with_element_type(a.teacher_dtype, [&](auto teacher_tag) { return f(kind_tag, student_tag, teacher_tag); });
    });
  });
}

}  // namespace

cudaError_t launch_divergence_forward(const DivergenceForwardLaunch& a, cudaStream_t stream) {
  return dispatch(a, [&](auto kind_tag, auto student_tag, auto teacher_tag) {
    using student_t = typename decltype(student_tag)::type;
    using teacher_t = typename decltype(teacher_tag)::type;
    using acc_t = AccOf<student_t, teacher_t>;
    divergence_forward_kernel<decltype(kind_tag)::kind, student_t, teacher_t>
        <<<static_cast<unsigned>(a.n_rows), kThreads, 0, stream>>>(
            static_cast<const student_t*>(a.student), static_cast<const teacher_t*>(a.teacher), a.student_rows,
            a.teacher_rows, a.mask, static_cast<acc_t*>(a.value), static_cast<acc_t*>(a.mean_partial),
            static_cast<acc_t*>(a.row_stats), a.n_cols, a.coefficient, a.teacher_weight, a.inv_temperature);
    return cudaGetLastError();
  });
}

cudaError_t launch_divergence_backward(const DivergenceBackwardLaunch& a, cudaStream_t stream) {
  return dispatch(a, [&](auto kind_tag, auto student_tag, auto teacher_tag) {
    using student_t = typename decltype(student_tag)::type;
    using teacher_t = typename decltype(teacher_tag)::type;
    using acc_t = AccOf<student_t, teacher_t>;
    divergence_backward_kernel<decltype(kind_tag)::kind, student_t, teacher_t>
        <<<static_cast<unsigned>(a.n_rows), kThreads, 0, stream>>>(
            static_cast<const student_t*>(a.student), static_cast<const teacher_t*>(a.teacher), a.student_rows,
            a.teacher_rows, a.mask, static_cast<const acc_t*>(a.grad_divergence),
            static_cast<const acc_t*>(a.mean_partial), static_cast<const acc_t*>(a.row_stats),
            static_cast<student_t*>(a.grad_student), a.n_cols, a.width, a.coefficient, a.teacher_weight,
            a.inv_temperature);
    return cudaGetLastError();
  });
}

}  // namespace minillm_cuda
