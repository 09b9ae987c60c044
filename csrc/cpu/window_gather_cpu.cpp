// CPU loop of window_gather (the windowed pass's crops, pastes and max-pool gathers): OpenMP
// over (candidate, channel) rows. The rule is kernels/window_math.h; this file only checks
// arguments and computes indices.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "csrc/checks.h"
#include "csrc/cpu/cpu_target.h"
#include "kernels/window_math.h"

namespace fastacd {
namespace {

// Below this many output elements the loop runs on one thread: the fork costs more than it saves.
constexpr int64_t kParallelGrain = 1 << 15;

// The base's strides: channel c, row y, column x lies at base + c * sb.c + y * sb.y + x * sb.x. A
// channels_last base (the bf16 pass's maps) is read in place: copying a whole map to NCHW for a
// few small crops cost more than the gather (docs/kernels.md, "window_gather").
struct Strides {
  int64_t c, y, x;
};

struct Corners {
  const int64_t* oy;      // output window corner per candidate (crop: may lie outside the map)
  const int64_t* ox;
  const int64_t* win_oy;  // the candidate's recomputed window's corner, or nullptr
  const int64_t* win_ox;
};

// o[x] = v[x] for x in [lo, hi): a plain loop, not std::copy / std::fill (a memmove / memset
// call each: the crops' rows are 12-20 values, where the call cost most of the row); kept a
// loop in crop_loop by FASTACD_INLINE_COPIES.
template <typename scalar_t>
inline void copy_span(const scalar_t* __restrict v, scalar_t* __restrict o, int64_t lo, int64_t hi) {
#pragma GCC unroll 4
  for (int64_t x = lo; x < hi; ++x) o[x] = v[x];
}

template <typename scalar_t>
inline void zero_span(scalar_t* o, int64_t lo, int64_t hi) {
  for (int64_t x = lo; x < hi; ++x) o[x] = scalar_t(0);
}

// A crop (or paste): each output row is copied as spans (window_math.h crop_row_spans).
template <typename scalar_t>
FASTACD_INLINE_COPIES void crop_loop(const scalar_t* base, Strides sb, const scalar_t* win, Corners k, scalar_t* out,
                                     int64_t M, int64_t C, int64_t H, int64_t W, int64_t wh, int64_t ww, int64_t h,
                                     int64_t w) {
  const int nt = M * C * h * w < kParallelGrain ? 1 : at::get_num_threads();
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
  for (int64_t row = 0; row < M * C; ++row) {
    const int64_t j = row / C, c = row - j * C;
    const scalar_t* base_c = base + c * sb.c;
    const scalar_t* win_jc = win == nullptr ? nullptr : win + row * wh * ww;
    const int64_t wy = win == nullptr ? 0 : k.win_oy[j], wx = win == nullptr ? 0 : k.win_ox[j];
    const int64_t oy = k.oy[j], ox = k.ox[j];
    auto copy_base = [&](const scalar_t* b, int64_t lo, int64_t hi, scalar_t* o) {  // o[x] = b[x], x in [lo, hi)
      if (sb.x == 1) {
        copy_span(b, o, lo, hi);
      } else {
        for (int64_t x = lo; x < hi; ++x) o[x] = b[x * sb.x];
      }
    };
    for (int64_t y = 0; y < h; ++y) {
      scalar_t* o = out + (row * h + y) * w;
      const int64_t py = oy + y;
      const window::RowSpans s = window::crop_row_spans(py, ox, w, H, W, win != nullptr, wy, wx, wh, ww);
      zero_span(o, 0, s.lo);
      if (s.hi > s.lo) {
        const scalar_t* b = base_c + py * sb.y + ox * sb.x;  // b[x * sb.x]: the base at output column x
        const bool in_win = s.win_hi > s.win_lo;
        copy_base(b, s.lo, in_win ? s.win_lo : s.hi, o);
        if (in_win) {
          const scalar_t* v = win_jc + (py - wy) * ww + (ox - wx);  // v[x]: the window at output column x
          copy_span(v, o, s.win_lo, s.win_hi);
          copy_base(b, s.win_hi, s.hi, o);
        }
      }
      zero_span(o, s.hi, w);
    }
  }
}

// A max-pool gather: each output element reads the candidate's map at the total's argmax.
// Returns whether every index read lay in [0, H * W) (out-of-range ones read zero); only the
// indices inside the windows are read, so only those are checked (a scan of the whole pooled
// map cost more than the gather of a small window).
template <typename scalar_t>
FASTACD_CPU_CLONES bool pool_loop(const scalar_t* base, Strides sb, const scalar_t* win, const int64_t* idx,
                                  Corners k, scalar_t* out, int64_t M, int64_t C, int64_t H, int64_t W, int64_t wh,
                                  int64_t ww, int64_t h, int64_t w, int64_t Ho, int64_t Wo) {
  const int nt = M * C * h * w < kParallelGrain ? 1 : at::get_num_threads();
  const double inv_W = 1.0 / static_cast<double>(W);
  int64_t bad = 0;
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static) reduction(+ : bad)
  for (int64_t row = 0; row < M * C; ++row) {
    const int64_t j = row / C, c = row - j * C;
    const scalar_t* base_c = base + c * sb.c;
    const scalar_t* win_jc = win == nullptr ? nullptr : win + row * wh * ww;
    const int64_t* idx_c = idx + c * Ho * Wo;
    const int64_t wy = win == nullptr ? 0 : k.win_oy[j], wx = win == nullptr ? 0 : k.win_ox[j];
    scalar_t* o = out + row * h * w;
    for (int64_t y = 0; y < h; ++y) {
      const int64_t* ix = idx_c + (k.oy[j] + y) * Wo + k.ox[j];
      for (int64_t x = 0; x < w; ++x) bad += ix[x] < 0 || ix[x] >= H * W;
      for (int64_t x = 0; x < w; ++x) {
        int64_t py, px;
        window::source_position(idx_c, Wo, W, inv_W, k.oy[j] + y, k.ox[j] + x, py, px);
        o[y * w + x] = window::candidate_at(base_c, win_jc, H, W, wy, wx, wh, ww, py, px, sb.y, sb.x);
      }
    }
  }
  return bad == 0;
}

at::Tensor window_gather_cpu(const at::Tensor& base, const std::optional<at::Tensor>& win,
                             const std::optional<at::Tensor>& win_oy, const std::optional<at::Tensor>& win_ox,
                             const at::Tensor& oy, const at::Tensor& ox, int64_t h, int64_t w,
                             const std::optional<at::Tensor>& indices) {
  constexpr const char* op = "fastacd::window_gather";
  const int64_t M = check_window_gather(op, c10::DeviceType::CPU, /*allow_reduced=*/false, base, win, win_oy,
                                        win_ox, oy, ox, h, w, indices);
  const int64_t C = base.size(1), H = base.size(2), W = base.size(3);
  at::Tensor out = at::empty({M, C, h, w}, base.options());
  if (out.numel() == 0) return out;
  const at::Tensor b = base.is_contiguous(at::MemoryFormat::ChannelsLast) ? base : base.contiguous();
  const Strides sb{b.stride(1), b.stride(2), b.stride(3)};
  const at::Tensor y0 = oy.contiguous(), x0 = ox.contiguous();
  const at::Tensor wv = win.has_value() ? win->contiguous() : at::Tensor();
  const at::Tensor wy = win.has_value() ? win_oy->contiguous() : at::Tensor();
  const at::Tensor wx = win.has_value() ? win_ox->contiguous() : at::Tensor();
  const at::Tensor ix = indices.has_value() ? indices->contiguous() : at::Tensor();
  const int64_t Ho = ix.defined() ? ix.size(2) : 0, Wo = ix.defined() ? ix.size(3) : 0;
  if (ix.defined()) {
    // a max-pool's output window lies inside the pooled map (its indices are read there)
    check_corners_inside(op, y0, "oy", h, Ho, "with indices, ", "the pooled map");
    check_corners_inside(op, x0, "ox", w, Wo, "with indices, ", "the pooled map");
  }
  const Corners k{y0.const_data_ptr<int64_t>(), x0.const_data_ptr<int64_t>(),
                  wv.defined() ? wy.const_data_ptr<int64_t>() : nullptr,
                  wv.defined() ? wx.const_data_ptr<int64_t>() : nullptr};
  AT_DISPATCH_FLOATING_TYPES(b.scalar_type(), "window_gather_cpu", [&] {
    const scalar_t* wp = wv.defined() ? wv.const_data_ptr<scalar_t>() : nullptr;
    const int64_t wh = wv.defined() ? wv.size(2) : 0, ww = wv.defined() ? wv.size(3) : 0;
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    if (ix.defined()) {
      const bool ok = pool_loop<scalar_t>(b.const_data_ptr<scalar_t>(), sb, wp, ix.const_data_ptr<int64_t>(), k, o, M, C,
                                          H, W, wh, ww, h, w, Ho, Wo);
      TORCH_CHECK(ok, op, ": indices must lie in [0, ", H * W,
                  ") (flat positions into the H x W map of base); some inside the windows do not.");
    } else {
      crop_loop<scalar_t>(b.const_data_ptr<scalar_t>(), sb, wp, k, o, M, C, H, W, wh, ww, h, w);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastacd, CPU, m) { m.impl("window_gather", &window_gather_cpu); }

}  // namespace fastacd
