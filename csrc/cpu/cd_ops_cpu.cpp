// CPU implementations of the fused CD ops: OpenMP over masks and channels, contiguous
// inner loops over positions that the compiler vectorises. The math is in
// kernels/cd_math.h; this file only computes indices.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <vector>

#include "csrc/checks.h"
#include "csrc/cpu/cpu_target.h"
#include "kernels/cd_math.h"

namespace fastacd {
namespace {

// Below this many elements a loop runs on one thread: the fork costs more than it saves.
constexpr int64_t kParallelGrain = 1 << 15;

int threads_for(int64_t work) { return work < kParallelGrain ? 1 : at::get_num_threads(); }


void check_cpu_float(const char* op, const NamedTensors& args) {
  check_device(op, c10::DeviceType::CPU, args);
  const auto& [first, first_name] = *args.begin();
  for (const auto& [t, name] : args) {
    check_float_dtype(op, *t, name, /*allow_reduced=*/false);
    check_same_dtype(op, *first, first_name, *t, name);
  }
}

// ---------------------------------------------------------------- bias_split
// OpenMP pragmas sit in these templates, not in the AT_DISPATCH lambdas (toolchain.md).
// kTol: whether a per-element tolerance `tol` (total's shape) is given. Each loop is
// compiled with and without it, so the path without tol is the formula without a tolerance
// (no load, no compare: cd_math.h).

// Calls f with a std::bool_constant for each runtime flag, so that a launcher picks one of
// the compiled loops.
template <typename F>
void with_flag(bool a, F&& f) {
  a ? f(std::true_type{}) : f(std::false_type{});
}

template <typename F>
void with_flags(bool a, bool b, F&& f) {
  with_flag(a, [&](auto kA) { with_flag(b, [&](auto kB) { f(kA, kB); }); });
}

template <bool kTol, typename scalar_t>
const scalar_t* data_or_null(const at::Tensor& t) {
  return kTol ? t.const_data_ptr<scalar_t>() : nullptr;
}

template <typename scalar_t, bool kRelu, bool kTol>
FASTACD_CPU_CLONES void bias_split_loop(const scalar_t* rel, const scalar_t* total, const scalar_t* bias,
                                        const scalar_t* tol, scalar_t* out, int64_t M, int64_t C, int64_t S) {
  const int nt = threads_for(M * C * S);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
  for (int64_t row = 0; row < M * C; ++row) {
    const int64_t c = row % C;
    const scalar_t b = bias[c];
    const scalar_t* r = rel + row * S;
    const scalar_t* t = total + c * S;
    const scalar_t* tl = kTol ? tol + c * S : tol;
    scalar_t* o = out + row * S;
    for (int64_t s = 0; s < S; ++s)
      o[s] = math::bias_split<kTol>(r[s], t[s], b, kRelu, kTol ? tl[s] : scalar_t(0));
  }
}

// Linear layers (M, F): a row per mask, the bias (and tol) vary along the row.
template <typename scalar_t, bool kRelu, bool kTol>
FASTACD_CPU_CLONES void bias_split_rows(const scalar_t* rel, const scalar_t* total, const scalar_t* bias,
                                        const scalar_t* tol, scalar_t* out, int64_t M, int64_t C) {
  const int nt = threads_for(M * C);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
  for (int64_t m = 0; m < M; ++m) {
    const scalar_t* r = rel + m * C;
    scalar_t* o = out + m * C;
    for (int64_t c = 0; c < C; ++c)
      o[c] = math::bias_split<kTol>(r[c], total[c], bias[c], kRelu, kTol ? tol[c] : scalar_t(0));
  }
}

template <typename scalar_t, bool kRelu, bool kTol>
void bias_split_kernel(const at::Tensor& rel, const at::Tensor& total, const at::Tensor& bias, const at::Tensor& tol,
                       at::Tensor& out) {
  const int64_t M = rel.size(0), C = rel.size(1), S = positions(rel);
  const scalar_t* r = rel.const_data_ptr<scalar_t>();
  const scalar_t* t = total.const_data_ptr<scalar_t>();
  const scalar_t* b = bias.const_data_ptr<scalar_t>();
  const scalar_t* tl = data_or_null<kTol, scalar_t>(tol);
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  if (S == 1) {
    bias_split_rows<scalar_t, kRelu, kTol>(r, t, b, tl, o, M, C);
  } else {
    bias_split_loop<scalar_t, kRelu, kTol>(r, t, b, tl, o, M, C, S);
  }
}

// The split of rel_pre into out, which may be rel_pre itself: each element is read
// before it is written, at the same index (the loops have no restrict pointers).
void bias_split_into(const char* op, const at::Tensor& rel_pre, const at::Tensor& total_pre, const at::Tensor& bias,
                     bool relu, const std::optional<at::Tensor>& tol, at::Tensor& out) {
  check_cpu_float(op, with_optional({{&rel_pre, "rel_pre"}, {&total_pre, "total_pre"}, {&bias, "bias"}}, tol, "tol"));
  check_rel_total(op, rel_pre, "rel_pre", total_pre, "total_pre");
  check_channel_vector(op, bias, "bias", rel_pre.size(1));
  check_tol_shape(op, tol, total_pre, "total_pre");
  if (out.numel() == 0) return;
  const at::Tensor r = rel_pre.contiguous(), t = total_pre.contiguous(), b = bias.contiguous();
  const at::Tensor tl = tol.has_value() ? tol->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "bias_split_cpu", [&] {
    with_flags(relu, tl.defined(), [&](auto kRelu, auto kTol) {
      bias_split_kernel<scalar_t, decltype(kRelu)::value, decltype(kTol)::value>(r, t, b, tl, out);
    });
  });
}

at::Tensor bias_split_cpu(const at::Tensor& rel_pre, const at::Tensor& total_pre, const at::Tensor& bias,
                          bool relu, const std::optional<at::Tensor>& tol) {
  at::Tensor out = at::empty(rel_pre.sizes(), rel_pre.options());
  bias_split_into("fastacd::bias_split", rel_pre, total_pre, bias, relu, tol, out);
  return out;
}

at::Tensor& bias_split_inplace_cpu(at::Tensor& rel_pre, const at::Tensor& total_pre, const at::Tensor& bias,
                                   bool relu, const std::optional<at::Tensor>& tol) {
  check_inplace_contiguous("fastacd::bias_split_", rel_pre, "rel_pre", "fastacd::bias_split");
  bias_split_into("fastacd::bias_split_", rel_pre, total_pre, bias, relu, tol, rel_pre);
  return rel_pre;
}

// The windowed pass's split (bias_split_window_): candidate m's window values rel (C, h, w)
// against the total (and tol) read in place at its corner (oy[m], ox[m]) of the (C, H, W) map:
// the (M, C, h, w) crops of them it replaces were a quarter of VGG16's ACD gathers.
template <typename scalar_t, bool kRelu, bool kTol>
FASTACD_CPU_CLONES void bias_split_window_loop(scalar_t* rel, const scalar_t* total, const scalar_t* bias,
                                               const scalar_t* tol, const int64_t* oy, const int64_t* ox, int64_t M,
                                               int64_t C, int64_t h, int64_t w, int64_t H, int64_t W) {
  const int nt = threads_for(M * C * h * w);
  const int64_t S = h * w;
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    // the window's total (and tol) copied into contiguous rows first: the split then runs as
    // one vectorised loop over h * w, not h loops of w (13 wide: scalar under AVX-512)
    std::vector<scalar_t> tw(S), lw(kTol ? S : 0);
#pragma omp for schedule(static)
    for (int64_t row = 0; row < M * C; ++row) {
      const int64_t m = row / C, c = row - m * C;
      const int64_t at = (c * H + oy[m]) * W + ox[m];
      for (int64_t y = 0; y < h; ++y) {
        std::copy(total + at + y * W, total + at + y * W + w, tw.data() + y * w);
        if (kTol) std::copy(tol + at + y * W, tol + at + y * W + w, lw.data() + y * w);
      }
      const scalar_t b = bias[c];
      const scalar_t* t = tw.data();
      const scalar_t* tl = kTol ? lw.data() : nullptr;
      scalar_t* r = rel + row * S;
      for (int64_t s = 0; s < S; ++s)
        r[s] = math::bias_split<kTol>(r[s], t[s], b, kRelu, kTol ? tl[s] : scalar_t(0));
    }
  }
}

at::Tensor& bias_split_window_inplace_cpu(at::Tensor& rel_pre, const at::Tensor& total_pre, const at::Tensor& bias,
                                          const at::Tensor& oy, const at::Tensor& ox, bool relu,
                                          const std::optional<at::Tensor>& tol) {
  constexpr const char* op = "fastacd::bias_split_window_";
  check_cpu_float(op, with_optional({{&rel_pre, "rel_pre"}, {&total_pre, "total_pre"}, {&bias, "bias"}}, tol, "tol"));
  check_device(op, c10::DeviceType::CPU, {{&oy, "oy"}, {&ox, "ox"}});
  check_inplace_contiguous(op, rel_pre, "rel_pre", "fastacd::bias_split on crops of the total");
  TORCH_CHECK(rel_pre.dim() == 4 && total_pre.dim() == 4 && total_pre.size(0) == 1 &&
                  total_pre.size(1) == rel_pre.size(1),
              op, ": rel_pre must be (M, C, h, w) and total_pre (1, C, H, W) with the same C, got ", rel_pre.sizes(),
              " and ", total_pre.sizes(), ".");
  check_channel_vector(op, bias, "bias", rel_pre.size(1));
  check_tol_shape(op, tol, total_pre, "total_pre");
  const int64_t M = rel_pre.size(0), C = rel_pre.size(1), h = rel_pre.size(2), w = rel_pre.size(3);
  const int64_t H = total_pre.size(2), W = total_pre.size(3);
  check_corner(op, oy, "oy", M);
  check_corner(op, ox, "ox", M);
  const at::Tensor y0 = oy.contiguous(), x0 = ox.contiguous();
  check_corners_inside(op, y0, "oy", h, H, "", "the map");
  check_corners_inside(op, x0, "ox", w, W, "", "the map");
  if (rel_pre.numel() == 0) return rel_pre;
  const at::Tensor t = total_pre.contiguous(), b = bias.contiguous();
  const at::Tensor tl = tol.has_value() ? tol->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(rel_pre.scalar_type(), "bias_split_window_cpu", [&] {
    with_flags(relu, tl.defined(), [&](auto kRelu, auto kTol) {
      bias_split_window_loop<scalar_t, decltype(kRelu)::value, decltype(kTol)::value>(
          rel_pre.mutable_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
          data_or_null<decltype(kTol)::value, scalar_t>(tl), y0.const_data_ptr<int64_t>(),
          x0.const_data_ptr<int64_t>(), M, C, h, w, H, W);
    });
  });
  return rel_pre;
}

// One (mask, channel) row of the backward: gt and gb accumulate over masks. Its own
// function with restrict pointers so that gcc vectorises it (OpenMP's outlining drops
// the restrict of the caller's parameters). kRows: a span of a linear layer's (M, F) row,
// the bias varies along it; else one channel's positions, one bias.
template <typename scalar_t, bool kTol, bool kRows>
FASTACD_CPU_CLONES void bias_split_backward_row(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ rel,
                                                const scalar_t* __restrict__ total,
                                                const scalar_t* __restrict__ tol, const scalar_t* __restrict__ bias,
                                                scalar_t* __restrict__ g_rel, scalar_t* __restrict__ gt,
                                                scalar_t* __restrict__ gb, int64_t S, bool relu) {
  const scalar_t b0 = bias[0];
  for (int64_t s = 0; s < S; ++s) {
    const auto d = math::bias_split_grad<kTol>(grad[s], rel[s], total[s], kRows ? bias[s] : b0, relu,
                                               kTol ? tol[s] : scalar_t(0));
    g_rel[s] = d.rel;
    gt[s] += d.total;
    gb[s] += d.bias;
  }
}

// Features per task in the backward of a linear layer's (M, F) split.
constexpr int64_t kRowBlock = 1024;

// Parallel over channels: each thread owns its channel's slice of grad_total and of the
// per-position bias partials (C, S), so the sums over masks need no atomics and the
// inner loop has no reduction; the partials are summed over S afterwards. Linear layers
// (S = 1): each thread owns a block of features and walks the masks' rows over it
// (contiguous; walking the masks feature by feature strides by F, which thrashed the
// caches: 120-250 ns an element at F = 4096, docs/kernels.md).
template <typename scalar_t, bool kTol>
void bias_split_backward_kernel(const scalar_t* grad, const scalar_t* rel, const scalar_t* total,
                                const scalar_t* bias, const scalar_t* tol, scalar_t* g_rel, scalar_t* g_total,
                                scalar_t* bias_partial, int64_t M, int64_t C, int64_t S, bool relu) {
  const int nt = threads_for(M * C * S);
  if (S == 1) {
    const int64_t blocks = (C + kRowBlock - 1) / kRowBlock;
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t c0 = blk * kRowBlock, n = std::min(kRowBlock, C - c0);
      for (int64_t m = 0; m < M; ++m)  // g_total and bias_partial are zero-initialised
        bias_split_backward_row<scalar_t, kTol, true>(grad + m * C + c0, rel + m * C + c0, total + c0,
                                                      kTol ? tol + c0 : tol, bias + c0, g_rel + m * C + c0,
                                                      g_total + c0, bias_partial + c0, n, relu);
    }
    return;
  }
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t m = 0; m < M; ++m) {
      const int64_t off = (m * C + c) * S;
      bias_split_backward_row<scalar_t, kTol, false>(grad + off, rel + off, total + c * S,
                                                     kTol ? tol + c * S : tol, bias + c, g_rel + off,
                                                     g_total + c * S, bias_partial + c * S, S, relu);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bias_split_backward_cpu(
    const at::Tensor& grad, const at::Tensor& rel_pre, const at::Tensor& total_pre, const at::Tensor& bias,
    bool relu, const std::optional<at::Tensor>& tol) {
  constexpr const char* op = "fastacd::bias_split_backward";
  check_cpu_float(op, with_optional({{&rel_pre, "rel_pre"}, {&grad, "grad"}, {&total_pre, "total_pre"},
                                     {&bias, "bias"}}, tol, "tol"));
  check_rel_total(op, rel_pre, "rel_pre", total_pre, "total_pre");
  check_channel_vector(op, bias, "bias", rel_pre.size(1));
  check_tol_shape(op, tol, total_pre, "total_pre");
  TORCH_CHECK(grad.sizes() == rel_pre.sizes(), op, ": grad must have the shape of rel_pre ", rel_pre.sizes(),
              ", got ", grad.sizes(), ".");
  at::Tensor g_rel = at::empty(rel_pre.sizes(), rel_pre.options());
  at::Tensor g_total = at::zeros(total_pre.sizes(), total_pre.options());
  at::Tensor partial = at::zeros({rel_pre.size(1), positions(rel_pre)}, rel_pre.options());
  if (g_total.numel() > 0) {
    const at::Tensor g = grad.contiguous(), r = rel_pre.contiguous(), t = total_pre.contiguous(),
                     b = bias.contiguous();
    const at::Tensor tl = tol.has_value() ? tol->contiguous() : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "bias_split_backward_cpu", [&] {
      with_flag(tl.defined(), [&](auto kTol) {
        constexpr bool has_tol = decltype(kTol)::value;
        bias_split_backward_kernel<scalar_t, has_tol>(
            g.const_data_ptr<scalar_t>(), r.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(),
            b.const_data_ptr<scalar_t>(), data_or_null<has_tol, scalar_t>(tl), g_rel.mutable_data_ptr<scalar_t>(),
            g_total.mutable_data_ptr<scalar_t>(), partial.mutable_data_ptr<scalar_t>(), r.size(0), r.size(1),
            positions(r), relu);
      });
    });
  }
  return {g_rel, g_total, at::sum(partial, {1})};
}

// ---------------------------------------------------------------- bn_split

// out may be rel itself (bn_split_): each element is read before it is written, at the
// same index (no restrict pointers).
template <typename scalar_t, bool kRelu, bool kTol>
FASTACD_CPU_CLONES void bn_split_loop(const scalar_t* rel, const scalar_t* total, const scalar_t* scale,
                                      const scalar_t* shift, const scalar_t* tol, scalar_t* out, int64_t M,
                                      int64_t C, int64_t S) {
  const int nt = threads_for(M * C * S);
  if (S == 1) {  // (M, F), e.g. BatchNorm1d after a linear layer
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t c = 0; c < C; ++c)
        out[m * C + c] = math::bn_split<kTol>(rel[m * C + c], total[c], scale[c], shift[c], kRelu,
                                              kTol ? tol[c] : scalar_t(0));
    }
    return;
  }
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
  for (int64_t row = 0; row < M * C; ++row) {
    const int64_t c = row % C;
    const scalar_t sc = scale[c], sh = shift[c];
    const scalar_t* r = rel + row * S;
    const scalar_t* t = total + c * S;
    const scalar_t* tl = kTol ? tol + c * S : tol;
    scalar_t* o = out + row * S;
    for (int64_t s = 0; s < S; ++s)
      o[s] = math::bn_split<kTol>(r[s], t[s], sc, sh, kRelu, kTol ? tl[s] : scalar_t(0));
  }
}

// The split of rel into out, which may be rel itself (bn_split_).
void bn_split_into(const char* op, const at::Tensor& rel, const at::Tensor& total, const at::Tensor& scale,
                   const at::Tensor& shift, bool relu, const std::optional<at::Tensor>& tol, at::Tensor& out) {
  check_cpu_float(op, with_optional({{&rel, "rel"}, {&total, "total"}, {&scale, "scale"}, {&shift, "shift"}}, tol,
                                    "tol"));
  check_rel_total(op, rel, "rel", total, "total");
  check_channel_vector(op, scale, "scale", rel.size(1));
  check_channel_vector(op, shift, "shift", rel.size(1));
  check_tol_shape(op, tol, total, "total");
  if (out.numel() == 0) return;
  const at::Tensor r = rel.contiguous(), t = total.contiguous(), sc = scale.contiguous(), sh = shift.contiguous();
  const at::Tensor tl = tol.has_value() ? tol->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "bn_split_cpu", [&] {
    with_flags(relu, tl.defined(), [&](auto kRelu, auto kTol) {
      constexpr bool has_tol = decltype(kTol)::value;
      bn_split_loop<scalar_t, decltype(kRelu)::value, has_tol>(
          r.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), sc.const_data_ptr<scalar_t>(),
          sh.const_data_ptr<scalar_t>(), data_or_null<has_tol, scalar_t>(tl), out.mutable_data_ptr<scalar_t>(),
          r.size(0), r.size(1), positions(r));
    });
  });
}

at::Tensor bn_split_cpu(const at::Tensor& rel, const at::Tensor& total, const at::Tensor& scale,
                        const at::Tensor& shift, bool relu, const std::optional<at::Tensor>& tol) {
  at::Tensor out = at::empty(rel.sizes(), rel.options());
  bn_split_into("fastacd::bn_split", rel, total, scale, shift, relu, tol, out);
  return out;
}

at::Tensor& bn_split_inplace_cpu(at::Tensor& rel, const at::Tensor& total, const at::Tensor& scale,
                                 const at::Tensor& shift, bool relu, const std::optional<at::Tensor>& tol) {
  check_inplace_contiguous("fastacd::bn_split_", rel, "rel", "fastacd::bn_split");
  bn_split_into("fastacd::bn_split_", rel, total, scale, shift, relu, tol, rel);
  return rel;
}

// Same structure as bias_split_backward_*: per-position partials, summed over S after.
template <typename scalar_t, bool kTol, bool kRows>
FASTACD_CPU_CLONES void bn_split_backward_row(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ rel,
                                              const scalar_t* __restrict__ total, const scalar_t* __restrict__ tol,
                                              const scalar_t* __restrict__ scale, const scalar_t* __restrict__ shift,
                                              scalar_t* __restrict__ g_rel, scalar_t* __restrict__ gt,
                                              scalar_t* __restrict__ gsc, scalar_t* __restrict__ gsh, int64_t S,
                                              bool relu) {
  const scalar_t sc0 = scale[0], sh0 = shift[0];
  for (int64_t s = 0; s < S; ++s) {
    const auto d = math::bn_split_grad<kTol>(grad[s], rel[s], total[s], kRows ? scale[s] : sc0,
                                             kRows ? shift[s] : sh0, relu, kTol ? tol[s] : scalar_t(0));
    g_rel[s] = d.rel;
    gt[s] += d.total;
    gsc[s] += d.scale;
    gsh[s] += d.shift;
  }
}

template <typename scalar_t, bool kTol>
void bn_split_backward_kernel(const scalar_t* grad, const scalar_t* rel, const scalar_t* total, const scalar_t* scale,
                              const scalar_t* shift, const scalar_t* tol, scalar_t* g_rel, scalar_t* g_total,
                              scalar_t* scale_partial, scalar_t* shift_partial, int64_t M, int64_t C, int64_t S,
                              bool relu) {
  const int nt = threads_for(M * C * S);
  if (S == 1) {  // (M, F): blocks of features, as in bias_split_backward_kernel
    const int64_t blocks = (C + kRowBlock - 1) / kRowBlock;
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t c0 = blk * kRowBlock, n = std::min(kRowBlock, C - c0);
      for (int64_t m = 0; m < M; ++m)  // g_total and the partials are zero-initialised
        bn_split_backward_row<scalar_t, kTol, true>(grad + m * C + c0, rel + m * C + c0, total + c0,
                                                    kTol ? tol + c0 : tol, scale + c0, shift + c0,
                                                    g_rel + m * C + c0, g_total + c0, scale_partial + c0,
                                                    shift_partial + c0, n, relu);
    }
    return;
  }
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t m = 0; m < M; ++m) {
      const int64_t off = (m * C + c) * S;
      bn_split_backward_row<scalar_t, kTol, false>(grad + off, rel + off, total + c * S, kTol ? tol + c * S : tol,
                                                   scale + c, shift + c, g_rel + off, g_total + c * S,
                                                   scale_partial + c * S, shift_partial + c * S, S, relu);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_split_backward_cpu(
    const at::Tensor& grad, const at::Tensor& rel, const at::Tensor& total, const at::Tensor& scale,
    const at::Tensor& shift, bool relu, const std::optional<at::Tensor>& tol) {
  constexpr const char* op = "fastacd::bn_split_backward";
  check_cpu_float(op, with_optional({{&rel, "rel"}, {&grad, "grad"}, {&total, "total"}, {&scale, "scale"},
                                     {&shift, "shift"}}, tol, "tol"));
  check_rel_total(op, rel, "rel", total, "total");
  check_channel_vector(op, scale, "scale", rel.size(1));
  check_channel_vector(op, shift, "shift", rel.size(1));
  check_tol_shape(op, tol, total, "total");
  TORCH_CHECK(grad.sizes() == rel.sizes(), op, ": grad must have the shape of rel ", rel.sizes(), ", got ",
              grad.sizes(), ".");
  at::Tensor g_rel = at::empty(rel.sizes(), rel.options());
  at::Tensor g_total = at::zeros(total.sizes(), total.options());
  at::Tensor scale_partial = at::zeros({rel.size(1), positions(rel)}, rel.options());
  at::Tensor shift_partial = at::zeros({rel.size(1), positions(rel)}, rel.options());
  if (g_total.numel() > 0) {
    const at::Tensor g = grad.contiguous(), r = rel.contiguous(), t = total.contiguous(), sc = scale.contiguous(),
                     sh = shift.contiguous();
    const at::Tensor tl = tol.has_value() ? tol->contiguous() : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "bn_split_backward_cpu", [&] {
      with_flag(tl.defined(), [&](auto kTol) {
        constexpr bool has_tol = decltype(kTol)::value;
        bn_split_backward_kernel<scalar_t, has_tol>(
            g.const_data_ptr<scalar_t>(), r.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(),
            sc.const_data_ptr<scalar_t>(), sh.const_data_ptr<scalar_t>(), data_or_null<has_tol, scalar_t>(tl),
            g_rel.mutable_data_ptr<scalar_t>(), g_total.mutable_data_ptr<scalar_t>(),
            scale_partial.mutable_data_ptr<scalar_t>(), shift_partial.mutable_data_ptr<scalar_t>(), r.size(0),
            r.size(1), positions(r), relu);
      });
    });
  }
  return {g_rel, g_total, at::sum(scale_partial, {1}), at::sum(shift_partial, {1})};
}

// ---------------------------------------------------------------- maxpool_gather

// The launchers check the indices once up front (check_index_range): the loops are branch-free.
template <typename scalar_t>
void maxpool_gather_kernel(const scalar_t* rel, const int64_t* idx, scalar_t* out, int64_t M, int64_t C,
                           int64_t S, int64_t So) {
  const int nt = threads_for(M * C * So);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
  for (int64_t row = 0; row < M * C; ++row) {
    const int64_t* ix = idx + (row % C) * So;
    const scalar_t* src = rel + row * S;
    scalar_t* dst = out + row * So;
    for (int64_t o = 0; o < So; ++o) dst[o] = src[ix[o]];
  }
}


at::Tensor maxpool_gather_cpu(const at::Tensor& rel, const at::Tensor& indices) {
  constexpr const char* op = "fastacd::maxpool_gather";
  check_device(op, c10::DeviceType::CPU, {{&rel, "rel"}, {&indices, "indices"}});
  check_float_dtype(op, rel, "rel", /*allow_reduced=*/false);
  check_gather_indices(op, rel, indices);
  at::Tensor out = at::empty(gathered_shape(rel.size(0), indices), rel.options());
  const at::Tensor ix = indices.contiguous();
  const int64_t S = positions(rel);
  check_index_range(op, ix, S, "flat positions into the spatial dims of rel");
  if (out.numel() == 0) return out;
  const int64_t So = ix.numel() / ix.size(1);
  const at::Tensor r = rel.contiguous();
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "maxpool_gather_cpu", [&] {
    maxpool_gather_kernel<scalar_t>(r.const_data_ptr<scalar_t>(), ix.const_data_ptr<int64_t>(),
                                    out.mutable_data_ptr<scalar_t>(), r.size(0), r.size(1), S, So);
  });
  return out;
}

// Scatter-add back; overlapping windows can pick one position twice. Each thread owns
// whole (mask, channel) rows, so this is deterministic and needs no atomics.
template <typename scalar_t>
void maxpool_gather_backward_kernel(const scalar_t* grad, const int64_t* idx, scalar_t* g_rel, int64_t M,
                                    int64_t C, int64_t S, int64_t So) {
  const int nt = threads_for(M * C * So);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
  for (int64_t row = 0; row < M * C; ++row) {
    const int64_t* ix = idx + (row % C) * So;
    const scalar_t* src = grad + row * So;
    scalar_t* dst = g_rel + row * S;
    for (int64_t o = 0; o < So; ++o) dst[ix[o]] += src[o];
  }
}

at::Tensor maxpool_gather_backward_cpu(const at::Tensor& grad, const at::Tensor& indices,
                                       at::IntArrayRef rel_shape) {
  constexpr const char* op = "fastacd::maxpool_gather_backward";
  check_device(op, c10::DeviceType::CPU, {{&grad, "grad"}, {&indices, "indices"}});
  check_float_dtype(op, grad, "grad", /*allow_reduced=*/false);
  at::Tensor g_rel = at::zeros(rel_shape, grad.options());
  check_gather_indices(op, g_rel, indices);
  TORCH_CHECK(grad.sizes() == at::IntArrayRef(gathered_shape(g_rel.size(0), indices)), op,
              ": grad must have shape (M, C, *So) with M = ", g_rel.size(0), " and (C, *So) = ",
              indices.sizes().slice(1), ", got ", grad.sizes(), ".");
  const at::Tensor ix = indices.contiguous();
  const int64_t S = positions(g_rel);
  check_index_range(op, ix, S, "flat positions into the spatial dims of rel");
  if (grad.numel() == 0) return g_rel;
  const int64_t So = ix.numel() / ix.size(1);
  const at::Tensor g = grad.contiguous();
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "maxpool_gather_backward_cpu", [&] {
    maxpool_gather_backward_kernel<scalar_t>(g.const_data_ptr<scalar_t>(), ix.const_data_ptr<int64_t>(),
                                             g_rel.mutable_data_ptr<scalar_t>(), g_rel.size(0), g_rel.size(1),
                                             S, So);
  });
  return g_rel;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastacd, CPU, m) {
  m.impl("bias_split", &bias_split_cpu);
  m.impl("bias_split_", &bias_split_inplace_cpu);
  m.impl("bias_split_window_", &bias_split_window_inplace_cpu);
  m.impl("bias_split_backward", &bias_split_backward_cpu);
  m.impl("bn_split", &bn_split_cpu);
  m.impl("bn_split_", &bn_split_inplace_cpu);
  m.impl("bn_split_backward", &bn_split_backward_cpu);
  m.impl("maxpool_gather", &maxpool_gather_cpu);
  m.impl("maxpool_gather_backward", &maxpool_gather_backward_cpu);
}

}  // namespace fastacd
