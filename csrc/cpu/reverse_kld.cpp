// Fused reverse-KL CPU kernels.
//
// Per row (token), with s' = s * inv_temperature and t' = t * inv_temperature over the first vocab_size
// columns, the forward pass streams the row in chunks that stay in L1. Per chunk it takes the chunk maxima,
// re-centres the running accumulators when a maximum grows (online softmax), then accumulates
//   Z_s = sum_v e_v,  e_v = exp(s'_v - m_s)          Z_t = sum_v exp(t'_v - m_t)
//   E   = sum_v e_v (s'_v - m_s)                      A   = sum_v e_v ((s'_v - m_s) - (t'_v - m_t))
// (terms with e_v == 0 count 0, so -inf columns never give NaN), from which
//   KL(q || p) = A / Z_s - log Z_s + log Z_t,         H(q) = log Z_s - E / Z_s.
// Keeping everything centred on the running maxima keeps float32 accurate at |logits| ~ 1e4.
// The backward pass recomputes log q_v and log p_v from the row statistics (m_s, log Z_s, m_t, log Z_t)
// and writes, in one pass,
//   grad_v = inv_temperature * ([q_v > 0] q_v (a (log q_v - log p_v - KL) - b - c (log q_v + H)) + b [v == y]).
// Targets are clamped to [0, vocab_size) like the reference's gather.
// Accumulation is in double for float64 input, in float otherwise. The inner loops are written so that gcc
// vectorises them (OpenMP simd reductions, a branch-free exp, branch-free bf16/fp16 conversions);
// rows are spread over threads with at::parallel_for.

#include "reverse_kld.h"

#include "../common/reverse_kld_args.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#ifdef __linux__
#include <sys/mman.h>
#include <unistd.h>
#endif

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace {

// Columns per chunk. A chunk is read twice (maxima, then accumulation): float32 / float64 chunks straight
// from the logits (the second read hits L1), bf16 / fp16 chunks from two float buffers (16 KiB) filled by
// the first pass.
constexpr int64_t kChunk = 2048;

template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

template <typename To, typename From>
C10_ALWAYS_INLINE To bit_as(From x) {
  static_assert(sizeof(To) == sizeof(From), "bit_as needs equal sizes");
  To y;
  std::memcpy(&y, &x, sizeof(To));
  return y;
}

// ---------------------------------------------------------------------------------------------------------
// Branch-free exp for the arguments the kernels pass (x <= ~0: logits minus their maximum, log-probabilities).
// exp(x) = 2^k exp(r), k = round(x / ln 2), r = x - k ln 2 in [-ln2/2, ln2/2] (two-constant range reduction),
// exp(r) by a polynomial (float: degree 6 minimax; double: degree-13 Taylor, truncation < 1e-17), 2^k built
// in the exponent bits. k is rounded with the 1.5 * 2^p "shifter" trick, whose low mantissa bits then hold
// k + bias. Results: 0 for x below log of the smallest normal (-inf included; no subnormals are produced),
// NaN for NaN; x is clamped to kHi above (never reached here). Max error measured: 0.91 ulp (float, all
// inputs up to kHi), 1.0 ulp (double, sampled).
// ---------------------------------------------------------------------------------------------------------
C10_ALWAYS_INLINE float fast_exp(float x) {
  constexpr float kLo = -87.33654f;  // just above log(FLT_MIN)
  constexpr float kHi = 88.3f;       // keeps k <= 127
  constexpr float kShift = 12582912.0f + 127.0f;  // 1.5 * 2^23 + exponent bias
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;            // 355 / 512: k * kLn2Hi is exact
  constexpr float kLn2Lo = -2.12194440054690583e-4f;  // ln 2 - kLn2Hi
  float xc = x < kLo ? kLo : x;  // NaN passes through
  xc = xc > kHi ? kHi : xc;
  const float kf = xc * kLog2e + kShift;
  const float k = kf - kShift;
  float r = xc - k * kLn2Hi;
  r = r - k * kLn2Lo;
  // Degree-6 polynomial 1 + r + c2 r^2 + ... + c6 r^6, coefficients fitted for minimax relative error on
  // [-ln2/2, ln2/2] (3e-9 relative before rounding).
  float p = 1.38146128e-3f;
  p = p * r + 8.36871006e-3f;
  p = p * r + 4.16683890e-2f;
  p = p * r + 1.66665211e-1f;
  p = p * r + 4.99999940e-1f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float scale = bit_as<float>(bit_as<uint32_t>(kf) << 23);  // 2^k
  const float y = p * scale;
  return x < kLo ? 0.0f : y;
}

C10_ALWAYS_INLINE double fast_exp(double x) {
  constexpr double kLo = -708.39;  // just above log(DBL_MIN)
  constexpr double kHi = 709.0;    // keeps k <= 1023
  constexpr double kShift = 6755399441055744.0 + 1023.0;  // 1.5 * 2^52 + exponent bias
  constexpr double kLog2e = 1.4426950408889634074;
  constexpr double kLn2Hi = 6.93147180369123816490e-01;  // ln 2 rounded to 32 significant bits
  constexpr double kLn2Lo = 1.90821492927058770002e-10;  // ln 2 - kLn2Hi
  double xc = x < kLo ? kLo : x;
  xc = xc > kHi ? kHi : xc;
  const double kf = xc * kLog2e + kShift;
  const double k = kf - kShift;
  double r = xc - k * kLn2Hi;
  r = r - k * kLn2Lo;
  double p = 1.0 / 6227020800.0;  // 1/13!
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  const double scale = bit_as<double>(bit_as<uint64_t>(kf) << 52);  // 2^k
  const double y = p * scale;
  return x < kLo ? 0.0 : y;
}

// ---------------------------------------------------------------------------------------------------------
// Loads into acc_t and stores from acc_t, branch-free so that they vectorise inside the loops.
// ---------------------------------------------------------------------------------------------------------
C10_ALWAYS_INLINE float load_acc(const float* p, int64_t j) {
  return p[j];
}
C10_ALWAYS_INLINE double load_acc(const double* p, int64_t j) {
  return p[j];
}
C10_ALWAYS_INLINE float load_acc(const c10::BFloat16* p, int64_t j) {
  return bit_as<float>(static_cast<uint32_t>(p[j].x) << 16);
}
C10_ALWAYS_INLINE float load_acc(const c10::Half* p, int64_t j) {
  const uint32_t h = p[j].x;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;  // exponent and mantissa
  // Normal: rebias the exponent (15 -> 127); inf / NaN: exponent all ones.
  uint32_t bits = (em << 13) + 0x38000000u;
  bits = em >= 0x7c00u ? bits + 0x38000000u : bits;
  // Subnormal (and zero): m * 2^-24 = (1 + m / 1024) 2^-14 - 2^-14, exact in float.
  const float sub = bit_as<float>((em << 13) | 0x38800000u) - 6.103515625e-05f;
  const float mag = em < 0x0400u ? sub : bit_as<float>(bits);
  return bit_as<float>(bit_as<uint32_t>(mag) | sign);
}

C10_ALWAYS_INLINE void store_acc(float* p, int64_t j, float v) {
  p[j] = v;
}
C10_ALWAYS_INLINE void store_acc(double* p, int64_t j, double v) {
  p[j] = v;
}
C10_ALWAYS_INLINE void store_acc(c10::BFloat16* p, int64_t j, float v) {
  // Round to nearest even; NaN -> 0x7fc0 (as c10::BFloat16 does).
  const uint32_t u = bit_as<uint32_t>(v);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t h = (u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded;
  p[j].x = static_cast<uint16_t>(h);
}
C10_ALWAYS_INLINE void store_acc(c10::Half* p, int64_t j, float v) {
  // Round to nearest even, overflow -> inf, NaN -> 0x7e00, subnormals rounded through a float addition.
  const uint32_t u = bit_as<uint32_t>(v);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  const uint32_t normal = (a - 0x38000000u + 0xfffu + ((a >> 13) & 1u)) >> 13;
  const uint32_t sub = bit_as<uint32_t>(bit_as<float>(a) + 0.5f) - 0x3f000000u;
  uint32_t h = a < 0x38800000u ? sub : normal;
  h = a >= 0x477ff000u ? 0x7c00u : h;  // |v| >= 65520 rounds to inf
  h = a > 0x7f800000u ? 0x7e00u : h;
  p[j].x = static_cast<uint16_t>(h | sign);
}

// ---------------------------------------------------------------------------------------------------------
// Forward, one row.
// ---------------------------------------------------------------------------------------------------------
template <typename acc_t>
struct RowStats {
  acc_t m_s, logz_s, m_t, logz_t, kl, entropy;
};

template <typename scalar_t, typename acc_t>
RowStats<acc_t> forward_row(
    const scalar_t* __restrict s, const scalar_t* __restrict t, int64_t n_cols, acc_t inv_t,
    acc_t* __restrict buf_s, acc_t* __restrict buf_t) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  constexpr bool kDirect = std::is_same<scalar_t, acc_t>::value;
  acc_t m_s = kNegInf, m_t = kNegInf;  // running maxima
  // Centres of the accumulators: the running maxima, or 0 while a maximum is still -inf (so that
  // -inf - centre is -inf, never NaN).
  acc_t c_s = 0, c_t = 0;
  acc_t z_s = 0, z_t = 0, e_acc = 0, a_acc = 0;
  for (int64_t start = 0; start < n_cols; start += kChunk) {
    const int64_t n = std::min(kChunk, n_cols - start);
    const scalar_t* __restrict sc = s + start;
    const scalar_t* __restrict tc = t + start;

    // Pass 1: chunk maxima (bf16 / fp16: also convert the chunk into the float buffers).
    acc_t bm_s = kNegInf, bm_t = kNegInf;
#pragma omp simd reduction(max : bm_s, bm_t)
    for (int64_t j = 0; j < n; ++j) {
      const acc_t x = load_acc(sc, j) * inv_t;
      const acc_t y = load_acc(tc, j) * inv_t;
      if constexpr (!kDirect) {
        buf_s[j] = x;
        buf_t[j] = y;
      }
      bm_s = std::max(bm_s, x);
      bm_t = std::max(bm_t, y);
    }

    // Re-centre the accumulators on the new maxima.
    m_s = std::max(m_s, bm_s);
    m_t = std::max(m_t, bm_t);
    const acc_t nc_s = m_s == kNegInf ? acc_t(0) : m_s;
    const acc_t nc_t = m_t == kNegInf ? acc_t(0) : m_t;
    if (nc_t != c_t) {
      // (t' - c_t) = (t' - nc_t) + (nc_t - c_t): A gains (nc_t - c_t) Z_s.
      if (z_t > 0) z_t *= std::exp(c_t - nc_t);
      if (z_s > 0) a_acc += (nc_t - c_t) * z_s;
      c_t = nc_t;
    }
    if (nc_s != c_s) {
      // e_v -> r e_v with r = exp(c_s - nc_s), and (s' - c_s) = (s' - nc_s) - (c_s - nc_s).
      if (z_s > 0) {
        const acc_t d = c_s - nc_s;
        const acc_t r = std::exp(d);
        if (r > 0) {
          e_acc = r * (e_acc + d * z_s);
          a_acc = r * (a_acc + d * z_s);
          z_s *= r;
        } else {
          z_s = e_acc = a_acc = 0;
        }
      }
      c_s = nc_s;
    }

    // Pass 2: accumulate.
    acc_t bz_s = 0, bz_t = 0, be = 0, ba = 0;
#pragma omp simd reduction(+ : bz_s, bz_t, be, ba)
    for (int64_t j = 0; j < n; ++j) {
      const acc_t ds = (kDirect ? load_acc(sc, j) * inv_t : buf_s[j]) - c_s;
      const acc_t dt = (kDirect ? load_acc(tc, j) * inv_t : buf_t[j]) - c_t;
      const acc_t e = fast_exp(ds);
      bz_s += e;
      bz_t += fast_exp(dt);
      const bool live = e > 0;
      be += live ? e * ds : acc_t(0);
      ba += live ? e * (ds - dt) : acc_t(0);
    }
    z_s += bz_s;
    z_t += bz_t;
    e_acc += be;
    a_acc += ba;
  }
  RowStats<acc_t> out;
  out.m_s = m_s;
  out.m_t = m_t;
  out.logz_s = std::log(z_s);
  out.logz_t = std::log(z_t);
  out.kl = a_acc / z_s - out.logz_s + out.logz_t;
  out.entropy = out.logz_s - e_acc / z_s;
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// Backward, one row.
// ---------------------------------------------------------------------------------------------------------
template <typename acc_t>
struct RowGrad {
  acc_t m_s, logz_s, m_t, logz_t;  // row statistics
  acc_t a, b, c, kl, entropy;      // upstream grads, forward outputs
  acc_t inv_t;
};

// inv_t * [q > 0] q (a (log q - log p - KL) - b - c (log q + H)), from the scaled logits x = s', y = t'.
template <typename acc_t>
C10_ALWAYS_INLINE acc_t grad_term(const RowGrad<acc_t>& g, acc_t x, acc_t y) {
  const acc_t lq = (x - g.m_s) - g.logz_s;
  const acc_t lp = (y - g.m_t) - g.logz_t;
  const acc_t q = fast_exp(lq);
  const acc_t v = q * (g.a * ((lq - lp) - g.kl) - g.b - g.c * (lq + g.entropy));
  return q > 0 ? v * g.inv_t : acc_t(0);
}

template <typename scalar_t, typename acc_t>
void backward_row(
    const scalar_t* __restrict s, const scalar_t* __restrict t, scalar_t* __restrict out, int64_t n_cols,
    const RowGrad<acc_t>& g) {
  const RowGrad<acc_t> gl = g;  // local copy: keeps the fields in registers in the loop
#pragma omp simd
  for (int64_t v = 0; v < n_cols; ++v) {
    store_acc(out, v, grad_term(gl, load_acc(s, v) * gl.inv_t, load_acc(t, v) * gl.inv_t));
  }
}

// ---------------------------------------------------------------------------------------------------------
// Argument checks and small helpers.
// ---------------------------------------------------------------------------------------------------------
constexpr const char* kWhere = "reverse_kld (cpu)";

using reverse_kld_args::accumulation_dtype;
using reverse_kld_args::check_logits;
using reverse_kld_args::ptr_or_null;
using reverse_kld_args::BackwardRows;
using reverse_kld_args::backward_rows;
using reverse_kld_args::row_vector;

// A fresh [N, V] gradient is a new mmap whose first touch page-faults once per 4 KiB page: at 2048 x 32000
// float32 that took 70 of the backward's 95 ms. Asking the kernel for transparent huge pages on it (Linux,
// where THP is in "madvise" mode, the common default) cuts the faults 512-fold: the backward ran in 30 ms.
// Best effort: a refusal leaves ordinary pages.
void advise_huge_pages(const at::Tensor& fresh) {
#ifdef __linux__
  constexpr size_t kMinBytes = size_t(8) << 20;
  const size_t bytes = fresh.nbytes();
  if (bytes < kMinBytes) return;
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t begin = reinterpret_cast<uintptr_t>(fresh.data_ptr());
  const uintptr_t first = (begin + page - 1) / page * page;  // madvise needs a page-aligned start
  const uintptr_t last = (begin + bytes) / page * page;
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)fresh;
#endif
}

int64_t grain_rows(int64_t n_cols) {
  return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, n_cols));
}

}  // namespace

std::vector<at::Tensor> reverse_kld_forward(
    const at::Tensor& student, const at::Tensor& teacher,
    const c10::optional<at::Tensor>& target, const c10::optional<at::Tensor>& mask,
    double inv_temperature, int64_t vocab_size) {
  check_logits(student, teacher, vocab_size, c10::DeviceType::CPU, kWhere);
  const int64_t n_rows = student.size(0);
  const at::Device device = student.device();
  const at::Tensor target_c = row_vector(target, n_rows, at::kLong, device, "target", kWhere);
  const at::Tensor mask_c = row_vector(mask, n_rows, at::kBool, device, "mask", kWhere);
  const auto opts = student.options().dtype(accumulation_dtype(student));
  at::Tensor kl = at::empty({n_rows}, opts);
  at::Tensor student_logprob = at::empty({n_rows}, opts);
  at::Tensor teacher_logprob = at::empty({n_rows}, opts);
  at::Tensor entropy = at::empty({n_rows}, opts);
  at::Tensor row_stats = at::empty({n_rows, 4}, opts);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "reverse_kld_forward", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    const scalar_t* s_base = student.data_ptr<scalar_t>();
    const scalar_t* t_base = teacher.data_ptr<scalar_t>();
    const int64_t s_stride = student.stride(0), t_stride = teacher.stride(0);
    const int64_t* tgt = ptr_or_null<int64_t>(target_c);
    const bool* msk = ptr_or_null<bool>(mask_c);
    acc_t* kl_p = kl.data_ptr<acc_t>();
    acc_t* slp_p = student_logprob.data_ptr<acc_t>();
    acc_t* tlp_p = teacher_logprob.data_ptr<acc_t>();
    acc_t* ent_p = entropy.data_ptr<acc_t>();
    acc_t* stats_p = row_stats.data_ptr<acc_t>();
    const acc_t inv_t = static_cast<acc_t>(inv_temperature);

    at::parallel_for(0, n_rows, grain_rows(vocab_size), [&](int64_t begin, int64_t end) {
      alignas(64) acc_t buf_s[kChunk];
      alignas(64) acc_t buf_t[kChunk];
      for (int64_t i = begin; i < end; ++i) {
        acc_t* st = stats_p + 4 * i;
        if (msk != nullptr && !msk[i]) {
          kl_p[i] = slp_p[i] = tlp_p[i] = ent_p[i] = 0;
          st[0] = st[1] = st[2] = st[3] = 0;
          continue;
        }
        const scalar_t* s = s_base + i * s_stride;
        const scalar_t* t = t_base + i * t_stride;
        const RowStats<acc_t> r = forward_row<scalar_t, acc_t>(s, t, vocab_size, inv_t, buf_s, buf_t);
        kl_p[i] = r.kl;
        ent_p[i] = r.entropy;
        st[0] = r.m_s;
        st[1] = r.logz_s;
        st[2] = r.m_t;
        st[3] = r.logz_t;
        if (tgt != nullptr) {
          const int64_t y = std::min(std::max<int64_t>(tgt[i], 0), vocab_size - 1);  // as the reference
          slp_p[i] = (load_acc(s, y) * inv_t - r.m_s) - r.logz_s;
          tlp_p[i] = (load_acc(t, y) * inv_t - r.m_t) - r.logz_t;
        } else {
          slp_p[i] = tlp_p[i] = 0;
        }
      }
    });
  });
  return {kl, student_logprob, teacher_logprob, entropy, row_stats};
}

at::Tensor reverse_kld_backward(
    const at::Tensor& student, const at::Tensor& teacher,
    const c10::optional<at::Tensor>& target, const c10::optional<at::Tensor>& mask,
    const at::Tensor& grad_kl, const at::Tensor& grad_student_logprob, const at::Tensor& grad_entropy,
    const at::Tensor& kl, const at::Tensor& entropy, const at::Tensor& row_stats,
    double inv_temperature, int64_t vocab_size) {
  check_logits(student, teacher, vocab_size, c10::DeviceType::CPU, kWhere);
  const int64_t n_rows = student.size(0);
  const int64_t width = student.size(1);
  const BackwardRows rows = backward_rows(student, target, mask, grad_kl, grad_student_logprob, grad_entropy, kl,
                                          entropy, row_stats, kWhere);
  at::Tensor grad = at::empty({n_rows, width}, student.options().memory_format(at::MemoryFormat::Contiguous));
  advise_huge_pages(grad);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "reverse_kld_backward", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    const scalar_t* s_base = student.data_ptr<scalar_t>();
    const scalar_t* t_base = teacher.data_ptr<scalar_t>();
    const int64_t s_stride = student.stride(0), t_stride = teacher.stride(0);
    scalar_t* g_base = grad.data_ptr<scalar_t>();
    const int64_t* tgt = ptr_or_null<int64_t>(rows.target);
    const bool* msk = ptr_or_null<bool>(rows.mask);
    const acc_t* a_p = ptr_or_null<acc_t>(rows.grad_kl);
    const acc_t* b_p = ptr_or_null<acc_t>(rows.grad_student_logprob);
    const acc_t* c_p = ptr_or_null<acc_t>(rows.grad_entropy);
    const acc_t* kl_p = rows.kl.data_ptr<acc_t>();
    const acc_t* ent_p = rows.entropy.data_ptr<acc_t>();
    const acc_t* stats_p = rows.row_stats.data_ptr<acc_t>();
    const acc_t inv_t = static_cast<acc_t>(inv_temperature);

    at::parallel_for(0, n_rows, grain_rows(width), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        scalar_t* out = g_base + i * width;
        if (msk != nullptr && !msk[i]) {
          std::memset(static_cast<void*>(out), 0, sizeof(scalar_t) * width);
          continue;
        }
        const scalar_t* s = s_base + i * s_stride;
        const scalar_t* t = t_base + i * t_stride;
        RowGrad<acc_t> g;
        g.m_s = stats_p[4 * i];
        g.logz_s = stats_p[4 * i + 1];
        g.m_t = stats_p[4 * i + 2];
        g.logz_t = stats_p[4 * i + 3];
        g.a = a_p != nullptr ? a_p[i] : acc_t(0);
        g.b = (b_p != nullptr && tgt != nullptr) ? b_p[i] : acc_t(0);
        g.c = c_p != nullptr ? c_p[i] : acc_t(0);
        g.kl = kl_p[i];
        g.entropy = ent_p[i];
        g.inv_t = inv_t;
        backward_row<scalar_t, acc_t>(s, t, out, vocab_size, g);
        if (width > vocab_size) {
          std::memset(static_cast<void*>(out + vocab_size), 0, sizeof(scalar_t) * (width - vocab_size));
        }
        if (tgt != nullptr) {
          // The one-hot part b [v == y], added to the target column's term before rounding.
          const int64_t y = std::min(std::max<int64_t>(tgt[i], 0), vocab_size - 1);
          const acc_t term = grad_term(g, load_acc(s, y) * inv_t, load_acc(t, y) * inv_t);
          store_acc(out, y, term + g.b * inv_t);
        }
      }
    });
  });
  return grad;
}
