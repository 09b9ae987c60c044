// 3x3 stride-1 convolution by Winograd F(2x2, 3x3) on the CPU (docs/kernels.md, "Winograd"):
// each 2x2 output tile costs 16 multiply-adds per (input, output) channel pair instead of 36.
// The 16 products are one batched GEMM (at::bmm, the BLAS the direct convolution's rate is
// limited by); the transforms before and after it are adds only, here, vectorised over channels.
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

// Channels per step of the transforms' inner loops (local arrays of 16 x kBlock values).
constexpr int64_t kBlock = 64;

struct Tiles {
  int64_t N, C, H, W, Co, ph, pw, Ho, Wo, th, tw;
  int64_t count() const { return N * th * tw; }
};

// V[ab][t][c] = (B^T d B)[a][b] for the 4x4 input patch d of tile t (rows 2i-ph.., cols 2j-pw..),
// B^T = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]]; xh is the input in NHWC, zero outside.
template <typename scalar_t>
FASTACD_CPU_CLONES void input_transform(const scalar_t* xh, scalar_t* V, Tiles g) {
  const int64_t T = g.count(), C = g.C;
  const std::vector<scalar_t> zero(C, scalar_t(0));
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / (g.th * g.tw), i = (t / g.tw) % g.th, j = t % g.tw;
      const scalar_t* p[4][4];
      for (int a = 0; a < 4; ++a)
        for (int b = 0; b < 4; ++b) {
          const int64_t y = 2 * i + a - g.ph, x = 2 * j + b - g.pw;
          p[a][b] = (y >= 0 && y < g.H && x >= 0 && x < g.W) ? xh + ((n * g.H + y) * g.W + x) * C : zero.data();
        }
      const int64_t plane = T * C;
      for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
        const int64_t cn = std::min<int64_t>(kBlock, C - c0);
        scalar_t d[4][4][kBlock], r[4][4][kBlock];  // local copies: no aliasing, so the loops vectorise
        for (int a = 0; a < 4; ++a)
          for (int b = 0; b < 4; ++b) std::copy(p[a][b] + c0, p[a][b] + c0 + cn, d[a][b]);
        for (int b = 0; b < 4; ++b)  // B^T d: along rows
          for (int64_t k = 0; k < cn; ++k) {
            r[0][b][k] = d[0][b][k] - d[2][b][k];
            r[1][b][k] = d[1][b][k] + d[2][b][k];
            r[2][b][k] = d[2][b][k] - d[1][b][k];
            r[3][b][k] = d[1][b][k] - d[3][b][k];
          }
        for (int a = 0; a < 4; ++a) {  // (B^T d) B: along columns
          scalar_t* v = V + (a * 4) * plane + t * C + c0;
          for (int64_t k = 0; k < cn; ++k) {
            v[k] = r[a][0][k] - r[a][2][k];
            v[plane + k] = r[a][1][k] + r[a][2][k];
            v[2 * plane + k] = r[a][2][k] - r[a][1][k];
            v[3 * plane + k] = r[a][1][k] - r[a][3][k];
          }
        }
      }
    }
  });
}

// y = A^T m A for each tile's 16 products m[ab][t][co], A^T = [[1,1,1,0],[0,1,-1,-1]], written
// into Y (N, Ho, Wo, Co) where the tile lies inside the output.
template <typename scalar_t>
FASTACD_CPU_CLONES void output_transform(const scalar_t* Mm, scalar_t* Y, Tiles g) {
  const int64_t T = g.count(), Co = g.Co;
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / (g.th * g.tw), i = (t / g.tw) % g.th, j = t % g.tw;
      const scalar_t* m = Mm + t * Co;
      const int64_t plane = T * Co;
      const bool down = 2 * i + 1 < g.Ho, right = 2 * j + 1 < g.Wo;
      scalar_t* y0 = Y + ((n * g.Ho + 2 * i) * g.Wo + 2 * j) * Co;
      scalar_t* y1 = y0 + g.Wo * Co;
      for (int64_t c0 = 0; c0 < Co; c0 += kBlock) {
        const int64_t cn = std::min<int64_t>(kBlock, Co - c0);
        scalar_t s[2][4][kBlock], y[2][2][kBlock];
        for (int b = 0; b < 4; ++b) {
          const scalar_t* m0 = m + b * plane + c0;
          for (int64_t k = 0; k < cn; ++k) {
            const scalar_t a0 = m0[k], a1 = m0[4 * plane + k], a2 = m0[8 * plane + k], a3 = m0[12 * plane + k];
            s[0][b][k] = a0 + a1 + a2;
            s[1][b][k] = a1 - a2 - a3;
          }
        }
        for (int r = 0; r < 2; ++r)
          for (int64_t k = 0; k < cn; ++k) {
            y[r][0][k] = s[r][0][k] + s[r][1][k] + s[r][2][k];
            y[r][1][k] = s[r][1][k] - s[r][2][k] - s[r][3][k];
          }
        std::copy(y[0][0], y[0][0] + cn, y0 + c0);
        if (right) std::copy(y[0][1], y[0][1] + cn, y0 + Co + c0);
        if (down) {
          std::copy(y[1][0], y[1][0] + cn, y1 + c0);
          if (right) std::copy(y[1][1], y[1][1] + cn, y1 + Co + c0);
        }
      }
    }
  });
}

at::Tensor winograd_conv3x3_cpu(const at::Tensor& x, const at::Tensor& u, int64_t pad_h, int64_t pad_w) {
  constexpr const char* op = "fastacd::winograd_conv3x3";
  TORCH_CHECK(x.dim() == 4, op, ": x must be (N, C, H, W), got ", x.dim(), " dims.");
  TORCH_CHECK(u.dim() == 3 && u.size(0) == 16 && u.size(1) == x.size(1), op,
              ": u must be the transformed weights (16, C, Co) with C = x.size(1) = ", x.size(1), ", got ",
              u.sizes(), ".");
  TORCH_CHECK(x.scalar_type() == u.scalar_type(), op, ": x and u must share a dtype, got ", x.scalar_type(),
              " and ", u.scalar_type(), ".");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": float32 or float64 only, got ", x.scalar_type(), ".");
  TORCH_CHECK(pad_h >= 0 && pad_w >= 0, op, ": padding must be >= 0, got ", pad_h, ", ", pad_w, ".");
  Tiles g{x.size(0), x.size(1), x.size(2), x.size(3), u.size(2), pad_h, pad_w, 0, 0, 0, 0};
  g.Ho = g.H + 2 * pad_h - 2;
  g.Wo = g.W + 2 * pad_w - 2;
  TORCH_CHECK(g.Ho > 0 && g.Wo > 0, op, ": the input (", g.H, " x ", g.W, ", padding ", pad_h, ", ", pad_w,
              ") is smaller than the 3x3 kernel.");
  g.th = (g.Ho + 1) / 2;
  g.tw = (g.Wo + 1) / 2;
  const at::Tensor xh = x.permute({0, 2, 3, 1}).contiguous();  // NHWC: channels contiguous per pixel
  const at::Tensor uc = u.contiguous();
  at::Tensor V = at::empty({16, g.count(), g.C}, x.options());
  at::Tensor Y = at::empty({g.N, g.Ho, g.Wo, g.Co}, x.options());
  if (g.count() == 0 || g.C == 0 || g.Co == 0) return at::zeros({g.N, g.Co, g.Ho, g.Wo}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "winograd_conv3x3_cpu", [&] {
    input_transform<scalar_t>(xh.const_data_ptr<scalar_t>(), V.mutable_data_ptr<scalar_t>(), g);
    const at::Tensor Mm = at::bmm(V, uc);  // (16, T, Co)
    output_transform<scalar_t>(Mm.const_data_ptr<scalar_t>(), Y.mutable_data_ptr<scalar_t>(), g);
  });
  return Y.permute({0, 3, 1, 2}).contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(fastacd, CPU, m) { m.impl("winograd_conv3x3", &winograd_conv3x3_cpu); }

}  // namespace fastacd
