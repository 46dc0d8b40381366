// A per-row constant (1 / Z, a mixture's weight) held beyond acc_t's precision, and its product with a column's value,
// rounded once whatever the instruction set and the optimisation level (divergence_kernel.h's probabilities and
// mixtures).
//
// The constant c (a double) is kept as hi + lo, hi = c rounded to acc_t and lo = c - hi rounded (c to about u^2). One
// acc_t alone would scale every column of a row by the same rounding (up to u/2 = 3e-8 relative in float): 1 / Z by it
// takes the mixtures' values up to 1.5e-7 relative, and the mixture's weights in m shift every log(p / m) of the row
// alike, which for a student near its teacher (a skew KL of 0.04) is 8e-7 of the value.
// The product x c must then be rounded once, from x hi + x lo. Written x * hi + x * lo it is so only where the compiler
// contracts it into fma(x, hi, x * lo): without contraction (no FMA instruction, as at x86-64-v2; gcc below -O2)
// x * hi is rounded first, and x * lo, below half an ulp of it, then rounds back to it: lo is lost, and the row's shared
// rounding is back (the JSD's and skew KLs' near-teacher contract tests failed, up to 9x the bound). So the rounding is
// explicit: fma(x, hi, x * lo) where the target has the instruction (vectorised), else its exact equivalent in double,
// x hi (24 x 24 bits, exact) + x * lo (rounded in float, as the FMA's addend), a sum of at most 50 significant bits,
// exact too, then rounded once to float: the same bits on every target and at every optimisation level. (Not
// x hi + x lo both in double: for a decimal weight such as 0.7, 2.5% of the products x c lie within 2^-29 ulp of a float
// midpoint, which lo's own rounding then breaks one way for all of them, a bias of 0.025 ulp: the JSD near its teacher
// at 1.08x the bound.) A double acc_t has lo = 0: x * hi.
#pragma once

#include <cmath>
#include <type_traits>

#include <c10/macros/Macros.h>

#if defined(__FMA__) || defined(__FP_FAST_FMAF) || defined(__ARM_FEATURE_FMA)
#define MINILLM_HAS_FMA 1
#else
#define MINILLM_HAS_FMA 0
#endif

namespace minillm_cpu {

template <typename acc_t>
struct Factor {
  acc_t hi, lo;

  static Factor of(double value) {
    const acc_t hi = static_cast<acc_t>(value);
    return {hi, static_cast<acc_t>(value - double(hi))};
  }

  // x (hi + lo), rounded once to acc_t.
  C10_ALWAYS_INLINE acc_t times(acc_t x) const {
    if constexpr (std::is_same<acc_t, double>::value) {
      return x * hi;
    } else {
#if MINILLM_HAS_FMA
      return std::fma(x, hi, x * lo);
#else
      return static_cast<acc_t>(double(x) * double(hi) + double(x * lo));
#endif
    }
  }
};

}  // namespace minillm_cpu
