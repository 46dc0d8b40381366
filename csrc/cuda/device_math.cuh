// Device helpers the CUDA kernels share (reverse_kld.cu, divergence.cu): the accumulation type of a dtype pair, exact
// widenings, round-to-nearest stores into the gradient's dtype, the exp they use, and the online log-normaliser.
#pragma once

#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

namespace minillm_cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// The per-element arithmetic type of a (student, teacher) dtype pair: double if either is double.
template <typename student_t, typename teacher_t>
using AccOf = std::conditional_t<std::is_same<student_t, double>::value || std::is_same<teacher_t, double>::value,
                                 double, float>;

// Conversions and math in the accumulation type.
// Exact widenings: to float (double stays double), then to acc_t.
__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ double widen(double x) { return x; }
__device__ __forceinline__ float widen(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float widen(__half x) { return __half2float(x); }

template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t to_acc(scalar_t x) {
  return static_cast<acc_t>(widen(x));
}

// Round to the gradient's dtype (nearest even; a double goes through float for bf16 / fp16).
__device__ __forceinline__ void convert_into(float v, float& out) { out = v; }
__device__ __forceinline__ void convert_into(double v, double& out) { out = v; }
__device__ __forceinline__ void convert_into(double v, float& out) { out = static_cast<float>(v); }
__device__ __forceinline__ void convert_into(float v, __nv_bfloat16& out) { out = __float2bfloat16_rn(v); }
__device__ __forceinline__ void convert_into(float v, __half& out) { out = __float2half_rn(v); }
__device__ __forceinline__ void convert_into(double v, __nv_bfloat16& out) { convert_into(static_cast<float>(v), out); }
__device__ __forceinline__ void convert_into(double v, __half& out) { convert_into(static_cast<float>(v), out); }

// exp for the arguments the kernels pass (x <= 0: scaled differences to the running maximum, log-probabilities).
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
// fmax ignores a NaN operand: a NaN logit reaches the sums through exp instead, and the row's KL is NaN.
__device__ __forceinline__ float max_acc(float x, float y) { return fmaxf(x, y); }
__device__ __forceinline__ double max_acc(double x, double y) { return fmax(x, y); }

template <typename acc_t>
__device__ __forceinline__ acc_t negative_infinity() {
  return static_cast<acc_t>(-CUDART_INF);
}

// The centre of the sums: the running maximum, or 0 while it is -inf (so that -inf - centre is -inf, never NaN).
template <typename acc_t>
__device__ __forceinline__ acc_t centre_of(acc_t running_max) {
  return running_max == negative_infinity<acc_t>() ? acc_t(0) : running_max;
}

// The online log-normaliser (online softmax) of a row, for every forward kernel (the CPU kernels' streaming.h
// OnlineLogNormaliser, step for step): a double sum z = sum_v exp(k (x_v - c)) centred on c = centre_of(m), m the
// running maximum of the raw logits. When m grows to new_m the centre moves to c' = centre_of(new_m) by the shift
// d = c - c' (exact in double), and z, with every other sum of exp(k (x_v - c)) f_v over the same columns, is
// rescaled by the factor exp(k d); a sum M of exp(k (x_v - c)) (x_v - c) f_v becomes factor (M + d z)
// (recentred_moment). While z is 0 (no live column yet, every sum 0) the factor is 1: there the first finite maximum
// can lie far below the centre 0 and exp(k d) overflow. NaN stays NaN.
struct Recentring {
  double shift = 0;   // c - c'
  double factor = 1;  // exp(k shift), or 1 while z is 0
};

template <typename acc_t>
__device__ __forceinline__ Recentring recentring(acc_t running_max, acc_t new_max, double z, double k) {
  const double c = centre_of(running_max), next = centre_of(new_max);
  if (next == c) return {};
  const double shift = c - next;
  return {shift, z > 0 ? exp(shift * k) : 1.0};
}

// z re-centred from centre_of(running_max) onto centre_of(new_max) (new_max >= running_max).
template <typename acc_t>
__device__ __forceinline__ double recentred(double z, acc_t running_max, acc_t new_max, double k) {
  return z * recentring(running_max, new_max, z, k).factor;
}

// A sum M = sum_v exp(k (x_v - c)) (x_v - c) f_v re-centred by move, z its columns' normaliser before the move:
// factor (M + shift z); 0 where the factor is 0 (a shift of -inf at a +inf logit, where the product would be NaN);
// M itself where nothing moved or z is 0.
__device__ __forceinline__ double recentred_moment(double moment, double z, const Recentring& move) {
  if (move.shift == 0 || !(z > 0)) return moment;
  return move.factor > 0 ? move.factor * (moment + move.shift * z) : 0.0;
}

}  // namespace minillm_cuda
