// exp and tanh for the CPU loops, written branch-free so that gcc vectorises the loops
// that call them (libm's expf / tanhf are scalar calls: the LSTM cell spent most of its
// time in them). CUDA uses its own expf / tanhf (see cd_math.h).
//
// Accuracy: about 1 ulp for normal results. Results below the smallest normal number
// are flushed to 0 (exp(x) for x < -708 in double, x < -86.6 in float), which no CD
// formula can tell from the exact value.
//
// exp: Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2; Taylor polynomial for e^r;
// 2^n built in the exponent bits. tanh: 1 - 2 / (e^(2|x|) + 1) for |x| >= 0.625, and
// for small |x| the Cephes rational / polynomial approximations (no cancellation).
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__GNUC__)
#define FASTACD_CPU_INLINE inline __attribute__((always_inline))  // calls in loops stop vectorisation
#else
#define FASTACD_CPU_INLINE inline
#endif

namespace fastacd {
namespace fast_cpu {

FASTACD_CPU_INLINE float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}
FASTACD_CPU_INLINE int32_t float_to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}
FASTACD_CPU_INLINE double bits_to_double(int64_t i) {
  double d;
  std::memcpy(&d, &i, sizeof d);
  return d;
}
FASTACD_CPU_INLINE int64_t double_to_bits(double d) {
  int64_t i;
  std::memcpy(&i, &d, sizeof i);
  return i;
}

FASTACD_CPU_INLINE float exp(float x) {
  constexpr float kHi = 88.7228f, kLo = -86.6f;  // ln(FLT_MAX); lowest with a normal 2^(n-1)
  constexpr float kMagic = 12582912.0f;           // 1.5 * 2^23: adding it rounds to an integer
  const float xc = x > kHi ? kHi : (x < kLo ? kLo : x);
  const float t = xc * 1.44269504088896341f + kMagic;
  const float n = t - kMagic;
  const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;  // ln2 split in two (Cephes)
  float p = 1.0f / 5040;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t ni = float_to_bits(t) - float_to_bits(kMagic);  // n as an integer
  const float y = 2.0f * (p * bits_to_float((ni - 1 + 127) << 23));  // 2^(n-1) stays normal
  const float big = x > kHi ? std::numeric_limits<float>::infinity() : y;
  const float out = x < kLo ? 0.0f : big;
  return x != x ? x : out;  // NaN in, NaN out
}

FASTACD_CPU_INLINE double exp(double x) {
  constexpr double kHi = 709.782712893384, kLo = -708.0;
  constexpr double kMagic = 6755399441055744.0;  // 1.5 * 2^52
  const double xc = x > kHi ? kHi : (x < kLo ? kLo : x);
  const double t = xc * 1.4426950408889634074 + kMagic;
  const double n = t - kMagic;
  const double r = (xc - n * 6.93145751953125e-1) - n * 1.42860682030941723212e-6;
  // Taylor to r^13: the remainder is below 1e-17 for |r| <= ln2 / 2.
  double p = 1.0 / 6227020800.0;
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
  const int64_t ni = double_to_bits(t) - double_to_bits(kMagic);
  const double y = 2.0 * (p * bits_to_double((ni - 1 + 1023) << 52));
  const double big = x > kHi ? std::numeric_limits<double>::infinity() : y;
  const double out = x < kLo ? 0.0 : big;
  return x != x ? x : out;
}

FASTACD_CPU_INLINE float tanh(float x) {
  const float ax = x < 0 ? -x : x;
  const float large = 1.0f - 2.0f / (exp(2.0f * ax) + 1.0f);
  const float z = x * x;
  const float small =
      ((((-5.70498872745e-3f * z + 2.06390887954e-2f) * z - 5.37397155531e-2f) * z + 1.33314422036e-1f) * z -
       3.33332819422e-1f) * z * x + x;
  return ax < 0.625f ? small : (x < 0 ? -large : large);
}

FASTACD_CPU_INLINE double tanh(double x) {
  const double ax = x < 0 ? -x : x;
  const double large = 1.0 - 2.0 / (exp(2.0 * ax) + 1.0);
  const double s = x * x;
  const double p = (-9.64399179425052238628e-1 * s - 9.92877231001918586564e1) * s - 1.61468768441708447952e3;
  const double q = ((s + 1.12811678491632931402e2) * s + 2.23548839060100448583e3) * s + 4.84406305325125486048e3;
  const double small = x + x * s * (p / q);
  return ax < 0.625 ? small : (x < 0 ? -large : large);
}

}  // namespace fast_cpu
}  // namespace fastacd
