// CUDA kernel of window_gather (the windowed pass's crops, pastes and max-pool gathers): one
// thread per output element. The rule is kernels/window_math.h; the launcher follows
// style.md item 3 (checks, guard, early return, contiguous, dispatch, current stream, check).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <optional>

#include "csrc/checks.h"
#include "kernels/launch.cuh"
#include "kernels/window_math.h"

namespace fastacd {
namespace {

using cuda::blocks_for;
using cuda::kThreads;

// The launcher checks the indices on the host (once per indices tensor); pooled corners out
// of range stop the kernel with a device assert: checking them on the host would synchronise
// on every call, and the windowed pass makes new corners for every chunk of candidates.
template <typename scalar_t>
__global__ void window_gather_kernel(const scalar_t* __restrict__ base, const scalar_t* __restrict__ win,
                                     const int64_t* __restrict__ idx, const int64_t* __restrict__ oy,
                                     const int64_t* __restrict__ ox, const int64_t* __restrict__ win_oy,
                                     const int64_t* __restrict__ win_ox, scalar_t* __restrict__ out, int64_t n,
                                     int64_t C, int64_t H, int64_t W, int64_t wh, int64_t ww, int64_t h, int64_t w,
                                     int64_t Ho, int64_t Wo, double inv_W) {
  FASTACD_GRID_STRIDE(k, n) {
    const int64_t row = k / (h * w), q = k - row * (h * w);
    const int64_t j = row / C, c = row - j * C, y = q / w, x = q - y * w;
    const int64_t* idx_c = idx == nullptr ? nullptr : idx + c * Ho * Wo;
    if (idx_c != nullptr) {
      CUDA_KERNEL_ASSERT(oy[j] + y >= 0 && oy[j] + y < Ho && ox[j] + x >= 0 && ox[j] + x < Wo &&
                         "fastacd::window_gather: the window lies outside the pooled map");
      const int64_t p = idx_c[(oy[j] + y) * Wo + ox[j] + x];
      CUDA_KERNEL_ASSERT(p >= 0 && p < H * W && "fastacd::window_gather: index out of range");
    }
    int64_t py, px;
    window::source_position(idx_c, Wo, W, inv_W, oy[j] + y, ox[j] + x, py, px);
    out[k] = window::candidate_at(base + c * H * W, win == nullptr ? nullptr : win + row * wh * ww, H, W,
                                  win == nullptr ? 0 : win_oy[j], win == nullptr ? 0 : win_ox[j], wh, ww, py, px);
  }
}

at::Tensor window_gather_cuda(const at::Tensor& base, const std::optional<at::Tensor>& win,
                              const std::optional<at::Tensor>& win_oy, const std::optional<at::Tensor>& win_ox,
                              const at::Tensor& oy, const at::Tensor& ox, int64_t h, int64_t w,
                              const std::optional<at::Tensor>& indices) {
  constexpr const char* op = "fastacd::window_gather";
  const int64_t M = check_window_gather(op, c10::DeviceType::CUDA, /*allow_reduced=*/true, base, win, win_oy,
                                        win_ox, oy, ox, h, w, indices);
  const c10::cuda::CUDAGuard guard(base.device());
  const int64_t C = base.size(1), H = base.size(2), W = base.size(3);
  at::Tensor out = at::empty({M, C, h, w}, base.options());
  const int64_t n = out.numel();
  if (n == 0) return out;
  const at::Tensor b = base.contiguous(), y0 = oy.contiguous(), x0 = ox.contiguous();
  const at::Tensor wv = win.has_value() ? win->contiguous() : at::Tensor();
  const at::Tensor wy = win.has_value() ? win_oy->contiguous() : at::Tensor();
  const at::Tensor wx = win.has_value() ? win_ox->contiguous() : at::Tensor();
  const at::Tensor ix = indices.has_value() ? indices->contiguous() : at::Tensor();
  if (ix.defined() && !cuda::stream_capturing())
    check_index_range(op, ix, H * W, "flat positions into the H x W map of base");
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, b.scalar_type(),
                                  "window_gather_cuda", [&] {
    window_gather_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        b.const_data_ptr<scalar_t>(), wv.defined() ? wv.const_data_ptr<scalar_t>() : nullptr,
        ix.defined() ? ix.const_data_ptr<int64_t>() : nullptr, y0.const_data_ptr<int64_t>(),
        x0.const_data_ptr<int64_t>(), wv.defined() ? wy.const_data_ptr<int64_t>() : nullptr,
        wv.defined() ? wx.const_data_ptr<int64_t>() : nullptr, out.mutable_data_ptr<scalar_t>(), n, C, H, W,
        wv.defined() ? wv.size(2) : 0, wv.defined() ? wv.size(3) : 0, h, w, ix.defined() ? ix.size(2) : 0,
        ix.defined() ? ix.size(3) : 0, 1.0 / static_cast<double>(W));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastacd, CUDA, m) { m.impl("window_gather", &window_gather_cuda); }

}  // namespace fastacd
