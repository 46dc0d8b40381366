// KL(softmax(k a) || softmax(k b)) of one row pair in one streaming pass, with both log-normalisers and the entropy of
// softmax(k a): the reverse KL's forward (a = the student, reverse_kld.cpp) and the forward KL's (a = the teacher,
// divergence_forward.cpp).
//
// Over the n columns of the logits a and b, with inverse temperature k = 1/T, the row is streamed in chunks that stay
// in L1. Per chunk: the chunk's maxima of the raw logits, the online log-normalisers re-centred on them
// (streaming.h), then, with c_a, c_b the centres and u_v = a_v - c_a, w_v = b_v - c_b (raw differences),
//   Z_a = sum_v e_v,  e_v = exp(k u_v)          Z_b = sum_v exp(k w_v)
//   E   = sum_v e_v u_v                          A   = sum_v e_v (u_v - w_v)
// (terms with e_v == 0 count 0, so -inf columns never give NaN), from which
//   KL = k A / Z_a - log Z_a + log Z_b,         H = log Z_a - k E / Z_a.
// Centring on the raw maxima (k u_v rather than k a_v - k c_a) makes the largest term exactly exp(0) = 1 and every
// exponent <= 0 whatever the scale: a scaled logit recomputed with another rounding than the maximum (x k rounded,
// then an FMA-contracted x k - max) could land above 0 and overflow the sums at |a k| ~ 1e10 in float32. The raw
// differences u_v, w_v enter E and A unscaled (k is applied once per row, in double), so a row dominated by one
// column keeps full accuracy at any |logits|; and no per-row constant is rounded to acc_t before the sums (a float
// log Z subtracted from every column would shift every term by the same relative error, up to 3e-7 of the result).
// Per-element arithmetic in acc_t (float, or double if either input is float64), row sums in double (sum_terms).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "streaming.h"

namespace minillm_cpu {

// The terms of one column: e_v = exp(k u_v), exp(k w_v), e_v u_v and e_v (u_v - w_v) (the last two 0 where e_v = 0).
template <typename acc_t>
C10_ALWAYS_INLINE Terms<acc_t> kl_column_terms(acc_t x, acc_t y, acc_t c_a, acc_t c_b, acc_t k) {
  const acc_t u = x - c_a;  // <= 0: the centre is the maximum
  const acc_t w = y - c_b;
  const acc_t e = fast_exp(u * k);
  const bool live = e > 0;
  return {e, fast_exp(w * k), where_live(live, e * u), where_live(live, e * (u - w))};
}

// One row's results (double) and the centres the backward needs.
struct KlRow {
  double c_a, logz_a, c_b, logz_b, kl, entropy;
};

// a, b: the row's first n logits (any of the four dtypes each); buf_a, buf_b: kChunk values of acc_t each.
template <typename acc_t, typename a_t, typename b_t>
KlRow kl_row(const a_t* __restrict a, const b_t* __restrict b, int64_t n_cols, double inv_t, acc_t* __restrict buf_a,
             acc_t* __restrict buf_b) {
  const acc_t k = static_cast<acc_t>(inv_t);
  OnlineLogNormaliser<acc_t> norm_a, norm_b;
  double e_sum = 0, a_sum = 0;  // E and A
  for (int64_t start = 0; start < n_cols; start += kChunk) {
    const int64_t n = std::min(kChunk, n_cols - start);
    // Pass 1: chunk maxima (and the chunks in acc_t).
    acc_t max_a, max_b;
    const acc_t* x = chunk_values(a + start, n, buf_a, max_a);
    const acc_t* y = chunk_values(b + start, n, buf_b, max_b);
    // Re-centre: w -> w + d_b takes d_b Z_a off A; u -> u + d_a and e_v -> f e_v take E and A to f (. + d_a Z_a).
    const Recentring move_b = norm_b.recentre(max_b, inv_t);
    a_sum -= move_b.shift * norm_a.z;
    const Recentring move_a = norm_a.recentre(max_a, inv_t);
    e_sum = move_a.factor * e_sum + move_a.shift * norm_a.z;
    a_sum = move_a.factor * a_sum + move_a.shift * norm_a.z;
    // Pass 2: accumulate.
    const acc_t c_a = norm_a.centre, c_b = norm_b.centre;
    const Terms<double> sums = sum_terms<4>(n, [&](int64_t j) MINILLM_INLINE_LAMBDA {
      return kl_column_terms(x[j], y[j], c_a, c_b, k);
    });
    norm_a.z += sums.s0;
    norm_b.z += sums.s1;
    e_sum += sums.s2;
    a_sum += sums.s3;
  }
  KlRow out;
  out.c_a = norm_a.centre;
  out.c_b = norm_b.centre;
  out.logz_a = norm_a.log_z();
  out.logz_b = norm_b.log_z();
  out.kl = inv_t * a_sum / norm_a.z - out.logz_a + out.logz_b;
  out.entropy = out.logz_a - inv_t * e_sum / norm_a.z;
  return out;
}

}  // namespace minillm_cpu
