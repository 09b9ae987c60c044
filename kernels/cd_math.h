// The CD element-wise math, written once (design.md sections 2 and 5).
//
// Every formula of the fused ops lives here as a small inline function, marked
// FASTACD_HOST_DEVICE so that the CPU loops (csrc/cpu/*.cpp) and the CUDA kernels
// (kernels/*.cu) call the same code. Those files only compute indices, load, call one
// of these functions and store. `T` is the accumulation type: the tensor's own type
// for float32/float64, float32 for float16/bfloat16 (the caller converts).
//
// The pure-torch oracle of each formula is fastacd/_torch_ops.py; keep them in step.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTACD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTACD_HOST_DEVICE inline
#endif

namespace fastacd {
namespace math {

// The reference's epsilon in the conv/linear bias split (acd's 1e-20).
template <typename T>
FASTACD_HOST_DEVICE T eps() { return T(1e-20); }

// Branch-free helpers the compiler vectorises (no libm calls). They follow torch's
// conventions: abs_ and relu_ propagate NaN like abs / clamp_min(0); sgn(0) = 0 like
// the gradient of abs.
template <typename T>
FASTACD_HOST_DEVICE T abs_(T x) { return x < T(0) ? -x : x; }

template <typename T>
FASTACD_HOST_DEVICE T relu_(T x) { return x < T(0) ? T(0) : x; }

template <typename T>
FASTACD_HOST_DEVICE T sgn(T x) { return T(x > T(0)) - T(x < T(0)); }

// ---------------------------------------------------------------------------------
// Conv / linear bias split, optionally followed by ReLU.
//   zr = W r (no bias), total = W a (no bias), zi = total - zr
//   pr = |zr| + eps, pi = |zi| + eps, q = pr / (pr + pi)
//   out = zr + q * bias, then relu(out) when asked (the ReLU rule's relevant part).
// ---------------------------------------------------------------------------------
template <typename T>
FASTACD_HOST_DEVICE T bias_split(T zr, T total, T bias, bool relu) {
  const T pr = abs_(zr) + eps<T>();
  const T pi = abs_(total - zr) + eps<T>();
  const T out = zr + pr / (pr + pi) * bias;
  return relu ? relu_(out) : out;
}

// Gradient of bias_split for one element, given the incoming gradient g.
// d q / d zr = (pi sgn(zr) + pr sgn(zi)) / (pr + pi)^2 (zi = total - zr also moves),
// d q / d total = -pr sgn(zi) / (pr + pi)^2. With relu, the gradient passes where
// out >= 0 (the gradient of clamp_min(0), as in the pure-torch oracle).
template <typename T>
struct BiasSplitGrad {
  T rel;    // d out / d zr * g
  T total;  // d out / d total * g   (summed over masks by the caller)
  T bias;   // d out / d bias * g    (summed over masks and positions by the caller)
};

template <typename T>
FASTACD_HOST_DEVICE BiasSplitGrad<T> bias_split_grad(T g, T zr, T total, T bias, bool relu) {
  const T zi = total - zr;
  const T pr = abs_(zr) + eps<T>();
  const T pi = abs_(zi) + eps<T>();
  const T inv = T(1) / (pr + pi);
  const T q = pr * inv;
  if (relu && zr + q * bias < T(0)) g = T(0);
  const T gb = g * bias;
  BiasSplitGrad<T> out;
  out.rel = g + gb * ((pi * sgn(zr) + pr * sgn(zi)) * inv * inv);
  out.total = -gb * (pr * sgn(zi) * inv * inv);
  out.bias = g * q;
  return out;
}

// ---------------------------------------------------------------------------------
// Eval batchnorm split `scale * a + shift`, optionally followed by ReLU.
//   sr = scale r, si = scale (total - r), q = |sr| / (|sr| + |si|), q = 0 where 0/0
//   (no eps, as in the reference); out = sr + q * shift, then relu(out) when asked.
// ---------------------------------------------------------------------------------
template <typename T>
FASTACD_HOST_DEVICE T bn_split(T r, T total, T scale, T shift, bool relu) {
  const T sr = scale * r;
  const T si = scale * (total - r);
  const T denom = abs_(sr) + abs_(si);
  const T q = denom == T(0) ? T(0) : abs_(sr) / denom;
  const T out = sr + q * shift;
  return relu ? relu_(out) : out;
}

// Gradient of bn_split for one element. With A = |sr|, B = |si|, D = A + B:
//   dq/dA = B / D^2, dq/dB = -A / D^2; where D = 0, q is the constant 0 (zero gradient).
template <typename T>
struct BnSplitGrad {
  T rel;    // per element
  T total;  // summed over masks by the caller
  T scale;  // summed over masks and positions by the caller
  T shift;  // summed over masks and positions by the caller
};

template <typename T>
FASTACD_HOST_DEVICE BnSplitGrad<T> bn_split_grad(T g, T r, T total, T scale, T shift, bool relu) {
  const T ir = total - r;
  const T sr = scale * r;
  const T si = scale * ir;
  const T a = abs_(sr);
  const T b = abs_(si);
  const T denom = a + b;
  const bool degenerate = denom == T(0);
  const T inv = degenerate ? T(0) : T(1) / denom;
  const T q = a * inv;
  if (relu && sr + q * shift < T(0)) g = T(0);
  // d q = (b sgn(sr) d(sr) - a sgn(si) d(si)) / D^2, with d(sr) = s dr + r ds and
  // d(si) = s (dt - dr) + ir ds.
  const T ka = b * sgn(sr) * inv * inv;   // dq/d(sr)
  const T kb = -a * sgn(si) * inv * inv;  // dq/d(si)
  const T gc = g * shift;
  BnSplitGrad<T> out;
  out.rel = g * scale + gc * (ka - kb) * scale;
  out.total = gc * kb * scale;
  out.scale = g * r + gc * (ka * r + kb * ir);
  out.shift = g * q;
  return out;
}

}  // namespace math
}  // namespace fastacd
