// The per-element helpers every CPU kernel shares (csrc/cpu: reverse_kld.cpp, divergence_*.cpp, sparse_*.cpp): the
// accumulation type of a dtype pair, a branch-free exp and log, exact loads and round-to-nearest-even stores of
// float32, float64, bfloat16 and float16, the chunked read of a row with its maximum, the online log-normaliser (online
// softmax) of a row streamed chunk by chunk, row sums in float groups added in double, huge pages for a fresh gradient,
// and the dispatch over the 16 dtype pairs. Everything is written so that gcc vectorises the loops that call it, at
// every x86-64 level (cpu.py builds with -fno-trapping-math: without it gcc does not if-convert a float comparison, and
// below AVX-512, whose masked instructions do not need that, every per-column loop stayed scalar).
#pragma once

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
#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace minillm_cpu {

// Columns per chunk. A chunk is read twice (maxima, then accumulation): a chunk already in acc_t straight
// from the logits (the second read hits L1), others from a buffer of acc_t (8 or 16 KiB) that the first pass
// fills.
constexpr int64_t kChunk = 2048;

// The per-element arithmetic type of a (student, teacher) dtype pair: double if either is double.
template <typename student_t, typename teacher_t>
using AccOf = std::conditional_t<std::is_same<student_t, double>::value || std::is_same<teacher_t, double>::value,
                                 double, float>;

template <typename To, typename From>
C10_ALWAYS_INLINE To bit_as(From x) {
  static_assert(sizeof(To) == sizeof(From), "bit_as needs equal sizes");
  To y;
  std::memcpy(&y, &x, sizeof(To));
  return y;
}

// v where live, else +0: a bit mask rather than a select (which kept gcc from vectorising the loop that adds
// float terms into double sums); v may be NaN or inf where not live.
template <typename acc_t>
C10_ALWAYS_INLINE acc_t where_live(bool live, acc_t v) {
  using bits_t = std::conditional_t<sizeof(acc_t) == 4, uint32_t, uint64_t>;
  return bit_as<acc_t>(bit_as<bits_t>(v) & (bits_t(0) - static_cast<bits_t>(live)));
}

// ---------------------------------------------------------------------------------------------------------
// Branch-free exp for the arguments the kernels pass: x <= 0 up to rounding (logits minus their maximum,
// log-probabilities), NaN and -inf included; correct up to x = 88 (above, 2^k leaves the exponent's range).
// exp(x) = 2^k exp(r), k = round(x / ln 2), r = x - k ln 2 in [-ln2/2, ln2/2] (two-constant range reduction),
// exp(r) by a polynomial (float: degree 6 minimax; double: degree-13 Taylor, truncation < 1e-17), 2^k built
// in the exponent bits. k is rounded with the 1.5 * 2^p "shifter" trick, whose low mantissa bits then hold
// k + bias. Below log of the smallest normal (-inf included) those bits are garbage and the result is masked to 0 (no
// subnormals are produced); NaN gives NaN. No clamp, branch nor select: gcc turns a clamp of a float into a compare
// and a blend per bound, where the mask is one compare and one AND. Max error measured: 0.91 ulp (float), 1.0 ulp
// (double, sampled).
// ---------------------------------------------------------------------------------------------------------
C10_ALWAYS_INLINE float fast_exp(float x) {
  constexpr float kLo = -87.33654f;  // just above log(FLT_MIN)
  constexpr float kShift = 12582912.0f + 127.0f;  // 1.5 * 2^23 + exponent bias
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;            // 355 / 512: k * kLn2Hi is exact
  constexpr float kLn2Lo = -2.12194440054690583e-4f;  // ln 2 - kLn2Hi
  const float kf = x * kLog2e + kShift;
  const float k = kf - kShift;
  float r = x - k * kLn2Hi;
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
  return where_live(!(x < kLo), p * scale);  // 0 below kLo (-inf included), NaN for NaN
}

C10_ALWAYS_INLINE double fast_exp(double x) {
  constexpr double kLo = -708.39;  // just above log(DBL_MIN)
  constexpr double kShift = 6755399441055744.0 + 1023.0;  // 1.5 * 2^52 + exponent bias
  constexpr double kLog2e = 1.4426950408889634074;
  constexpr double kLn2Hi = 6.93147180369123816490e-01;  // ln 2 rounded to 32 significant bits
  constexpr double kLn2Lo = 1.90821492927058770002e-10;  // ln 2 - kLn2Hi
  const double kf = x * kLog2e + kShift;
  const double k = kf - kShift;
  double r = x - k * kLn2Hi;
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
  return where_live(!(x < kLo), p * scale);
}

// ---------------------------------------------------------------------------------------------------------
// Branch-free log for positive normal arguments (the kernels pass a probability over a mixture's, in (0, 1 / w]):
// x = 2^e m with m in [sqrt(1/2), sqrt(2)), log x = e ln 2 + 2 atanh(f), f = (m - 1) / (m + 1), |f| <= 0.1716, the
// atanh series in s = f^2 (float: to s^4, truncation < 3e-10 relative; double: to s^10, < 1e-17). NaN for NaN; finite
// (and meaningless) for 0 and subnormals, which the kernels mask.
// ---------------------------------------------------------------------------------------------------------
C10_ALWAYS_INLINE float fast_log(float x) {
  constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440054690583e-4f;
  const uint32_t bits = bit_as<uint32_t>(x);
  // m in [1, 2) from the mantissa; then halved (e + 1) where it is at least sqrt(2)
  const uint32_t mantissa = (bits & 0x007fffffu) | 0x3f800000u;
  const bool high = mantissa >= 0x3fb504f3u;  // sqrt(2)
  const float m = bit_as<float>(mantissa - (static_cast<uint32_t>(high) << 23));
  const float e = static_cast<float>(static_cast<int32_t>(bits >> 23) - 127 + static_cast<int32_t>(high));
  const float f = (m - 1.0f) / (m + 1.0f), s = f * f;
  float series = 1.0f / 9.0f;
  series = series * s + 1.0f / 7.0f;
  series = series * s + 1.0f / 5.0f;
  series = series * s + 1.0f / 3.0f;
  const float log_m = 2.0f * f + 2.0f * f * s * series;
  return (e * kLn2Hi + (log_m + e * kLn2Lo)) + (x - x);  // (x - x): NaN stays NaN
}

C10_ALWAYS_INLINE double fast_log(double x) {
  constexpr double kLn2Hi = 6.93147180369123816490e-01, kLn2Lo = 1.90821492927058770002e-10;
  const uint64_t bits = bit_as<uint64_t>(x);
  const uint64_t mantissa = (bits & 0x000fffffffffffffull) | 0x3ff0000000000000ull;
  const bool high = mantissa >= 0x3ff6a09e667f3bcdull;  // sqrt(2)
  const double m = bit_as<double>(mantissa - (static_cast<uint64_t>(high) << 52));
  const double e = static_cast<double>(static_cast<int64_t>(bits >> 52) - 1023 + static_cast<int64_t>(high));
  const double f = (m - 1.0) / (m + 1.0), s = f * f;
  double series = 1.0 / 21.0;
  series = series * s + 1.0 / 19.0;
  series = series * s + 1.0 / 17.0;
  series = series * s + 1.0 / 15.0;
  series = series * s + 1.0 / 13.0;
  series = series * s + 1.0 / 11.0;
  series = series * s + 1.0 / 9.0;
  series = series * s + 1.0 / 7.0;
  series = series * s + 1.0 / 5.0;
  series = series * s + 1.0 / 3.0;
  const double log_m = 2.0 * f + 2.0 * f * s * series;
  return (e * kLn2Hi + (log_m + e * kLn2Lo)) + (x - x);
}

// ---------------------------------------------------------------------------------------------------------
// Loads (exact widenings to float, or to double) and stores (rounding to nearest even), branch-free so that
// they vectorise inside the loops.
// ---------------------------------------------------------------------------------------------------------
C10_ALWAYS_INLINE float widen(const float* p, int64_t j) {
  return p[j];
}
C10_ALWAYS_INLINE double widen(const double* p, int64_t j) {
  return p[j];
}
C10_ALWAYS_INLINE float widen(const c10::BFloat16* p, int64_t j) {
  return bit_as<float>(static_cast<uint32_t>(p[j].x) << 16);
}
C10_ALWAYS_INLINE float widen(const c10::Half* p, int64_t j) {
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

// The value of p[j] in acc_t (float values widen exactly to double).
template <typename acc_t, typename scalar_t>
C10_ALWAYS_INLINE acc_t load_as(const scalar_t* p, int64_t j) {
  return static_cast<acc_t>(widen(p, j));
}

C10_ALWAYS_INLINE void store_rounded(float* p, int64_t j, float v) {
  p[j] = v;
}
C10_ALWAYS_INLINE void store_rounded(double* p, int64_t j, double v) {
  p[j] = v;
}
C10_ALWAYS_INLINE void store_rounded(c10::BFloat16* p, int64_t j, float v) {
  // Round to nearest even; NaN -> 0x7fc0 (as c10::BFloat16 does).
  const uint32_t u = bit_as<uint32_t>(v);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t h = (u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded;
  p[j].x = static_cast<uint16_t>(h);
}
C10_ALWAYS_INLINE void store_rounded(c10::Half* p, int64_t j, float v) {
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
// A double result into a narrower dtype: rounded to float, then to the dtype (the second rounding can differ
// from a direct one only when the float lands on the dtype's midpoint: by at most 2^-24 relative).
template <typename scalar_t>
C10_ALWAYS_INLINE void store_rounded(scalar_t* p, int64_t j, double v) {
  store_rounded(p, j, static_cast<float>(v));
}

// Centre of the running sums: the running maximum, or 0 while it is -inf (so that -inf - centre is -inf).
template <typename acc_t>
C10_ALWAYS_INLINE acc_t centre_of(acc_t running_max) {
  return running_max == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : running_max;
}

// The values of n logits in acc_t (the logits themselves when they are acc_t, else converted into buf), and
// their maximum (NaN ignored: a NaN reaches the sums through exp instead).
template <typename acc_t, typename scalar_t>
const acc_t* chunk_values(const scalar_t* __restrict p, int64_t n, acc_t* __restrict buf, acc_t& chunk_max) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  if constexpr (std::is_same<scalar_t, acc_t>::value) {
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < n; ++j) {
      const acc_t v = p[j];  // a local, not std::max(m, p[j]): gcc vectorises only this form
      m = std::max(m, v);
    }
    chunk_max = m;
    return p;
  } else {
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < n; ++j) {
      const acc_t v = load_as<acc_t>(p, j);
      buf[j] = v;
      m = std::max(m, v);
    }
    chunk_max = m;
    return buf;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Row sums. A float sum rounds at the scale of its running total, which over a row costs up to 1e-6 relative (a
// peaked row: its few large terms; at V = 32000 the cancellation in KL = k A / Z_s - log Z_s + log Z_t). So a row's
// sums are double, and the terms reach them in float groups: the terms of columns j, j + n/4, j + n/2 and j + 3n/4
// are added in acc_t as a tree (two roundings, at the scale of the four terms), the group in double. That is as
// accurate as adding every term in double, at a quarter of the conversions; longer float runs are not (a float
// accumulator over 8 to 16 terms per lane took the reverse KL of randn * 3 logits from 7e-8 to 2e-7 relative).
// ---------------------------------------------------------------------------------------------------------
// Marks the per-column lambda a caller passes to sum_terms: gcc keeps a large one (a mixture's column) out of line in
// the loop that calls it four times, and that loop is then not vectorised.
#if defined(__GNUC__) || defined(__clang__)
#define MINILLM_INLINE_LAMBDA __attribute__((always_inline))
#else
#define MINILLM_INLINE_LAMBDA
#endif

// The terms one column adds to up to four row sums (the unused ones 0).
template <typename acc_t>
struct Terms {
  acc_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
};

// The double sums over j in [0, n) of the first kSums fields of terms_of(j) (a Terms<acc_t>; terms_of a
// MINILLM_INLINE_LAMBDA), grouped as above.
template <int kSums, typename TermsOf>
C10_ALWAYS_INLINE Terms<double> sum_terms(int64_t n, const TermsOf& terms_of) {
  static_assert(kSums >= 1 && kSums <= 4, "sum_terms adds one to four sums");
  const int64_t quarter = n / 4;
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t j = 0; j < quarter; ++j) {
    const auto a = terms_of(j), b = terms_of(j + quarter), c = terms_of(j + 2 * quarter),
               d = terms_of(j + 3 * quarter);
    s0 += (a.s0 + b.s0) + (c.s0 + d.s0);
    if constexpr (kSums > 1) s1 += (a.s1 + b.s1) + (c.s1 + d.s1);
    if constexpr (kSums > 2) s2 += (a.s2 + b.s2) + (c.s2 + d.s2);
    if constexpr (kSums > 3) s3 += (a.s3 + b.s3) + (c.s3 + d.s3);
  }
  for (int64_t j = 4 * quarter; j < n; ++j) {
    const auto a = terms_of(j);
    s0 += a.s0;
    if constexpr (kSums > 1) s1 += a.s1;
    if constexpr (kSums > 2) s2 += a.s2;
    if constexpr (kSums > 3) s3 += a.s3;
  }
  return {s0, s1, s2, s3};
}

// ---------------------------------------------------------------------------------------------------------
// The online log-normaliser of one model's row, log Z = log sum_v exp(k x_v), streamed chunk by chunk (online
// softmax): the running maximum of the raw logits, the centre c (that maximum, or 0 while it is -inf, so that
// -inf - c stays -inf and never NaN) and z = sum_v exp(k (x_v - c)) in double, to which the caller adds each chunk's
// terms after recentre() has taken the chunk's maximum. When the maximum grows, recentre() moves the centre and
// returns the move: the shift d = c_old - c_new (exact in double) and the factor exp(k d) by which z, and the
// caller's other sums of exp(k (x_v - c)) f_v over the same columns, are rescaled (a sum of
// exp(k (x_v - c)) (x_v - c) f_v becomes factor * sum + d * the same sum without (x_v - c)). While z is 0 (no live
// column yet, every sum over the columns 0) the factor is 1: there the first finite maximum can lie far below the
// centre 0 and exp(k d) overflow. NaN stays NaN. Every kernel family calls it: reverse_kld.cpp's row pass (kl_row.h),
// divergence_forward.cpp's log-normalisers and sparse_forward.cpp's pass 1 over the tail R.
// ---------------------------------------------------------------------------------------------------------
struct Recentring {
  double shift = 0;   // c_old - c_new
  double factor = 1;  // exp(k shift), or 1 while z is 0
};

template <typename acc_t>
struct OnlineLogNormaliser {
  acc_t running_max = -std::numeric_limits<acc_t>::infinity();
  acc_t centre = 0;
  double z = 0;

  Recentring recentre(acc_t chunk_max, double k) {
    running_max = std::max(running_max, chunk_max);
    const acc_t next = centre_of(running_max);
    if (next == centre) return {};
    const double shift = double(centre) - double(next);
    const Recentring move{shift, z > 0 ? std::exp(shift * k) : 1.0};
    centre = next;
    z *= move.factor;
    return move;
  }

  double log_z() const {
    return std::log(z);
  }
};

// A fresh [N, V] gradient is a new mmap whose first touch page-faults once per 4 KiB page: at 2048 x 32000
// float32 that took 70 of the backward's 95 ms. Asking the kernel for transparent huge pages on it (Linux,
// where THP is in "madvise" mode, the common default) cuts the faults 512-fold: the backward ran in 30 ms.
// Best effort: a refusal leaves ordinary pages.
inline void advise_huge_pages(const at::Tensor& fresh) {
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

inline int64_t grain_rows(int64_t n_cols) {
  return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, n_cols));
}

// Calls f(student data, teacher data) with the typed data pointers of the logits, for the 16 dtype pairs of
// float32, float64, bfloat16 and float16.
template <typename F>
void dispatch_logits_pair(const at::Tensor& student, const at::Tensor& teacher, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "minillm_kernels (cpu)", [&] {
    using student_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, teacher.scalar_type(), "minillm_kernels (cpu)", [&] {
      f(student.data_ptr<student_t>(), teacher.data_ptr<scalar_t>());
    });
  });
}

// The element type of a data pointer.
template <typename P>
using ElementOf = std::remove_cv_t<std::remove_pointer_t<P>>;

}  // namespace minillm_cpu
