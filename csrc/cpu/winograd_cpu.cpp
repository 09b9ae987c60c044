// 3x3 stride-1 convolution by Winograd F(m x m, 3x3) on the CPU, m = 2 or 4 (docs/kernels.md,
// "Winograd"): each m x m output tile costs (m+2)^2 multiply-adds per (input, output) channel
// pair instead of 9 m^2 (F(2x2): 16 for 36, F(4x4): 36 for 144). The products are one batched
// GEMM (at::bmm, the BLAS the direct convolution's rate is limited by); the transforms before
// and after it are a few adds and constant multiplies, here, vectorised over channels.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "csrc/cpu/cpu_target.h"

namespace fastacd {
namespace {

// Channels per step of the transforms' inner loops (local arrays of alpha^2 x kBlock values).
constexpr int64_t kBlock = 64;

// The 1-d transforms, each over n channels: x[i * sx + k] -> y[i * sy + k]. B^T (alpha x alpha)
// takes an input patch to the transformed domain, A^T (m x alpha) the products back.
// F(2x2, 3x3), points 0, 1, -1: B^T = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]],
// A^T = [[1,1,1,0],[0,1,-1,-1]].
struct F2 {
  static constexpr int m = 2, alpha = 4;
  template <typename T>
  static inline void bt(const T* __restrict x, int64_t sx, T* __restrict y, int64_t sy, int64_t n) {
    for (int64_t k = 0; k < n; ++k) {
      const T x0 = x[k], x1 = x[sx + k], x2 = x[2 * sx + k], x3 = x[3 * sx + k];
      y[k] = x0 - x2;
      y[sy + k] = x1 + x2;
      y[2 * sy + k] = x2 - x1;
      y[3 * sy + k] = x1 - x3;
    }
  }
  template <typename T>
  static inline void at(const T* __restrict x, int64_t sx, T* __restrict y, int64_t sy, int64_t n) {
    for (int64_t k = 0; k < n; ++k) {
      const T x0 = x[k], x1 = x[sx + k], x2 = x[2 * sx + k], x3 = x[3 * sx + k];
      y[k] = x0 + x1 + x2;
      y[sy + k] = x1 - x2 - x3;
    }
  }
};

// F(4x4, 3x3), points 0, 1, -1, 2, -1/2: float32 error a third of the usual 0, 1, -1, 2, -2
// (Barabasz et al. 2020; measured in docs/kernels.md). B^T = [[1,3/2,-2,-3/2,1,0],
// [0,-1,-5/2,-1/2,1,0],[0,1,1/2,-5/2,1,0],[0,-1/2,-1,1/2,1,0],[0,2,-1,-2,1,0],[0,1,3/2,-2,-3/2,1]],
// A^T = [[1,1,1,1,1,0],[0,1,-1,2,-1/2,0],[0,1,1,4,1/4,0],[0,1,-1,8,-1/8,1]].
struct F4 {
  static constexpr int m = 4, alpha = 6;
  template <typename T>
  static inline void bt(const T* __restrict x, int64_t sx, T* __restrict y, int64_t sy, int64_t n) {
    for (int64_t k = 0; k < n; ++k) {
      const T x0 = x[k], x1 = x[sx + k], x2 = x[2 * sx + k], x3 = x[3 * sx + k], x4 = x[4 * sx + k],
              x5 = x[5 * sx + k];
      y[k] = x0 + T(1.5) * (x1 - x3) - 2 * x2 + x4;
      y[sy + k] = x4 - x1 - T(2.5) * x2 - T(0.5) * x3;
      y[2 * sy + k] = x4 + x1 + T(0.5) * x2 - T(2.5) * x3;
      y[3 * sy + k] = x4 - x2 + T(0.5) * (x3 - x1);
      y[4 * sy + k] = x4 - x2 + 2 * (x1 - x3);
      y[5 * sy + k] = x5 + x1 + T(1.5) * (x2 - x4) - 2 * x3;
    }
  }
  template <typename T>
  static inline void at(const T* __restrict x, int64_t sx, T* __restrict y, int64_t sy, int64_t n) {
    for (int64_t k = 0; k < n; ++k) {
      const T x0 = x[k], x1 = x[sx + k], x2 = x[2 * sx + k], x3 = x[3 * sx + k], x4 = x[4 * sx + k],
              x5 = x[5 * sx + k];
      const T p = x1 + x2, q = x1 - x2;
      y[k] = x0 + p + x3 + x4;
      y[sy + k] = q + 2 * x3 - T(0.5) * x4;
      y[2 * sy + k] = p + 4 * x3 + T(0.25) * x4;
      y[3 * sy + k] = q + 8 * x3 - T(0.125) * x4 + x5;
    }
  }
};

struct Tiles {
  int64_t N, C, H, W, Co, ph, pw, Ho, Wo, th, tw;
  int64_t count() const { return N * th * tw; }
};

// V[a * alpha + b][t][c] = (B^T d B)[a][b] for the alpha x alpha input patch d of tiles t in
// [t0, t1) (rows m i - ph.., cols m j - pw..); xh is the input in NHWC, zero outside. A function
// of its own, not at::parallel_for's lambda: target_clones does not reach into a lambda.
template <typename F, typename scalar_t>
FASTACD_CPU_CLONES void input_tiles(const scalar_t* xh, scalar_t* V, const Tiles& g, const scalar_t* zero,
                                    int64_t t0, int64_t t1) {
  constexpr int A = F::alpha;
  const int64_t T = g.count(), C = g.C, plane = T * C;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n = t / (g.th * g.tw), i = (t / g.tw) % g.th, j = t % g.tw;
    const scalar_t* p[A][A];
    for (int a = 0; a < A; ++a)
      for (int b = 0; b < A; ++b) {
        const int64_t y = F::m * i + a - g.ph, x = F::m * j + b - g.pw;
        p[a][b] = (y >= 0 && y < g.H && x >= 0 && x < g.W) ? xh + ((n * g.H + y) * g.W + x) * C : zero;
      }
    for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
      const int64_t cn = std::min<int64_t>(kBlock, C - c0);
      scalar_t d[A][A][kBlock], r[A][A][kBlock];  // local copies: no aliasing, so the loops vectorise
      for (int a = 0; a < A; ++a)
        for (int b = 0; b < A; ++b) std::copy(p[a][b] + c0, p[a][b] + c0 + cn, d[a][b]);
      for (int b = 0; b < A; ++b) F::bt(d[0][b], A * kBlock, r[0][b], A * kBlock, cn);  // B^T d
      for (int a = 0; a < A; ++a) F::bt(r[a][0], kBlock, V + a * A * plane + t * C + c0, plane, cn);  // (B^T d) B
    }
  }
}

template <typename F, typename scalar_t>
void input_transform(const scalar_t* xh, scalar_t* V, const Tiles& g) {
  const std::vector<scalar_t> zero(g.C, scalar_t(0));
  at::parallel_for(0, g.count(), 16, [&](int64_t t0, int64_t t1) {
    input_tiles<F, scalar_t>(xh, V, g, zero.data(), t0, t1);
  });
}

// y = A^T M A for each tile's alpha^2 products M[a * alpha + b][t][co], written into Y
// (N, Co, Ho, Wo) where the tile lies inside the output: NCHW directly, rows of m outputs per
// channel (an NHWC map and a transposing copy after it cost a pass over the output more).
template <typename F, typename scalar_t>
FASTACD_CPU_CLONES void output_tiles(const scalar_t* Mm, scalar_t* Y, const Tiles& g, int64_t t0, int64_t t1) {
  constexpr int A = F::alpha, R = F::m;
  const int64_t T = g.count(), Co = g.Co, plane = T * Co;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n = t / (g.th * g.tw), i = (t / g.tw) % g.th, j = t % g.tw;
    const int64_t rows = std::min<int64_t>(R, g.Ho - R * i), cols = std::min<int64_t>(R, g.Wo - R * j);
    const int64_t map = g.Ho * g.Wo;
    scalar_t* y0 = Y + n * Co * map + R * i * g.Wo + R * j;  // channel 0's first output of the tile
    for (int64_t c0 = 0; c0 < Co; c0 += kBlock) {
      const int64_t cn = std::min<int64_t>(kBlock, Co - c0);
      scalar_t s[R][A][kBlock], y[R][R][kBlock];
      for (int b = 0; b < A; ++b) F::at(Mm + b * plane + t * Co + c0, A * plane, s[0][b], A * kBlock, cn);
      for (int r = 0; r < R; ++r) F::at(s[r][0], kBlock, y[r][0], kBlock, cn);
      for (int64_t k = 0; k < cn; ++k) {
        scalar_t* yk = y0 + (c0 + k) * map;
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c = 0; c < cols; ++c) yk[r * g.Wo + c] = y[r][c][k];
      }
    }
  }
}

template <typename F, typename scalar_t>
void output_transform(const scalar_t* Mm, scalar_t* Y, const Tiles& g) {
  at::parallel_for(0, g.count(), 16, [&](int64_t t0, int64_t t1) { output_tiles<F, scalar_t>(Mm, Y, g, t0, t1); });
}

template <typename F, typename scalar_t>
void winograd(const scalar_t* xh, const at::Tensor& u, at::Tensor& Y, const Tiles& g) {
  at::Tensor V = at::empty({F::alpha * F::alpha, g.count(), g.C}, u.options());
  input_transform<F, scalar_t>(xh, V.mutable_data_ptr<scalar_t>(), g);
  const at::Tensor Mm = at::bmm(V, u);  // (alpha^2, T, Co)
  output_transform<F, scalar_t>(Mm.const_data_ptr<scalar_t>(), Y.mutable_data_ptr<scalar_t>(), g);
}

at::Tensor winograd_conv3x3_cpu(const at::Tensor& x, const at::Tensor& u, int64_t pad_h, int64_t pad_w) {
  constexpr const char* op = "fastacd::winograd_conv3x3";
  TORCH_CHECK(x.dim() == 4, op, ": x must be (N, C, H, W), got ", x.dim(), " dims.");
  TORCH_CHECK(u.dim() == 3 && (u.size(0) == 16 || u.size(0) == 36) && u.size(1) == x.size(1), op,
              ": u must be the transformed weights (16 or 36, C, Co) with C = x.size(1) = ", x.size(1), ", got ",
              u.sizes(), ".");
  TORCH_CHECK(x.scalar_type() == u.scalar_type(), op, ": x and u must share a dtype, got ", x.scalar_type(),
              " and ", u.scalar_type(), ".");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": float32 or float64 only, got ", x.scalar_type(), ".");
  TORCH_CHECK(pad_h >= 0 && pad_w >= 0, op, ": padding must be >= 0, got ", pad_h, ", ", pad_w, ".");
  const int64_t m = u.size(0) == 16 ? 2 : 4;
  Tiles g{x.size(0), x.size(1), x.size(2), x.size(3), u.size(2), pad_h, pad_w, 0, 0, 0, 0};
  g.Ho = g.H + 2 * pad_h - 2;
  g.Wo = g.W + 2 * pad_w - 2;
  TORCH_CHECK(g.Ho > 0 && g.Wo > 0, op, ": the input (", g.H, " x ", g.W, ", padding ", pad_h, ", ", pad_w,
              ") is smaller than the 3x3 kernel.");
  g.th = (g.Ho + m - 1) / m;
  g.tw = (g.Wo + m - 1) / m;
  if (g.count() == 0 || g.C == 0 || g.Co == 0) return at::zeros({g.N, g.Co, g.Ho, g.Wo}, x.options());
  const at::Tensor xh = x.permute({0, 2, 3, 1}).contiguous();  // NHWC: channels contiguous per pixel
  const at::Tensor uc = u.contiguous();
  at::Tensor Y = at::empty({g.N, g.Co, g.Ho, g.Wo}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "winograd_conv3x3_cpu", [&] {
    if (m == 2)
      winograd<F2, scalar_t>(xh.const_data_ptr<scalar_t>(), uc, Y, g);
    else
      winograd<F4, scalar_t>(xh.const_data_ptr<scalar_t>(), uc, Y, g);
  });
  return Y;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastacd, CPU, m) { m.impl("winograd_conv3x3", &winograd_conv3x3_cpu); }

}  // namespace fastacd
