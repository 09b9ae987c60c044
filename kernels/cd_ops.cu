// CUDA implementations of the fused CD ops. Each kernel computes indices, loads in the
// tensor's dtype, calls the math of kernels/cd_math.h in the accumulation type
// (float32 for float16/bfloat16) and stores. Launchers follow style.md item 3: check
// device, dtype, shape; device guard; early return on empty input; contiguous; dispatch;
// launch on the current stream; check the launch.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scatter_add.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <vector>

#include "csrc/checks.h"
#include "kernels/cd_math.h"
#include "kernels/launch.cuh"

namespace fastacd {
namespace {

constexpr const char* kIndexWhat = "flat positions into the spatial dims of rel";
using cuda::blocks_for;
using cuda::kThreads;

void check_cuda_float(const char* op, const NamedTensors& args) {
  check_device(op, c10::DeviceType::CUDA, args);
  const auto& [first, first_name] = *args.begin();
  for (const auto& [t, name] : args) {
    check_float_dtype(op, *t, name, /*allow_reduced=*/true);
    check_same_dtype(op, *first, first_name, *t, name);
  }
}

// The dtype that per-channel partial sums are kept in (float32 for half/bfloat16).
at::ScalarType acc_dtype(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

#define FASTACD_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, NAME, __VA_ARGS__)

// ---------------------------------------------------------------- bias_split
// kTol: whether a per-element tolerance `tol` (total's shape) is given; each kernel is
// compiled with and without it, so the path without tol reads and compares nothing more.

// Calls f with a std::bool_constant for the runtime flag, so that a launcher picks one of
// the compiled kernels.
template <typename F>
void with_flag(bool a, F&& f) {
  a ? f(std::true_type{}) : f(std::false_type{});
}

template <typename scalar_t, bool kTol>
// rel and out may be the same array (bias_split_): no restrict on them; each thread reads
// an element before it writes it.
__global__ void bias_split_kernel(const scalar_t* rel, const scalar_t* __restrict__ total,
                                  const scalar_t* __restrict__ bias, const scalar_t* __restrict__ tol,
                                  scalar_t* out, int64_t n, int64_t C, int64_t S, bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t CS = C * S;
  FASTACD_GRID_STRIDE(k, n) {
    const int64_t cs = k % CS;
    const acc_t tl = kTol ? acc_t(tol[cs]) : acc_t(0);
    out[k] = static_cast<scalar_t>(
        math::bias_split<kTol>(acc_t(rel[k]), acc_t(total[cs]), acc_t(bias[cs / S]), relu, tl));
  }
}

// The split of rel_pre into out, which may be rel_pre itself (bias_split_).
void bias_split_into(const char* op, const at::Tensor& rel_pre, const at::Tensor& total_pre, const at::Tensor& bias,
                     bool relu, const std::optional<at::Tensor>& tol, at::Tensor& out) {
  check_cuda_float(op, with_optional({{&rel_pre, "rel_pre"}, {&total_pre, "total_pre"}, {&bias, "bias"}}, tol, "tol"));
  check_rel_total(op, rel_pre, "rel_pre", total_pre, "total_pre");
  check_channel_vector(op, bias, "bias", rel_pre.size(1));
  check_tol_shape(op, tol, total_pre, "total_pre");
  const c10::cuda::CUDAGuard guard(rel_pre.device());
  const int64_t n = out.numel();
  if (n == 0) return;
  const at::Tensor r = rel_pre.contiguous(), t = total_pre.contiguous(), b = bias.contiguous();
  const at::Tensor tl = tol.has_value() ? tol->contiguous() : at::Tensor();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  FASTACD_DISPATCH(r.scalar_type(), "bias_split_cuda", [&] {
    with_flag(tl.defined(), [&](auto kTol) {
      constexpr bool has_tol = decltype(kTol)::value;
      bias_split_kernel<scalar_t, has_tol><<<blocks_for(n), kThreads, 0, stream>>>(
          r.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
          has_tol ? tl.const_data_ptr<scalar_t>() : nullptr, out.mutable_data_ptr<scalar_t>(), n, r.size(1),
          positions(r), relu);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

at::Tensor bias_split_cuda(const at::Tensor& rel_pre, const at::Tensor& total_pre, const at::Tensor& bias,
                           bool relu, const std::optional<at::Tensor>& tol) {
  at::Tensor out = at::empty(rel_pre.sizes(), rel_pre.options());
  bias_split_into("fastacd::bias_split", rel_pre, total_pre, bias, relu, tol, out);
  return out;
}

at::Tensor& bias_split_inplace_cuda(at::Tensor& rel_pre, const at::Tensor& total_pre, const at::Tensor& bias,
                                    bool relu, const std::optional<at::Tensor>& tol) {
  check_inplace_contiguous("fastacd::bias_split_", rel_pre, "rel_pre", "fastacd::bias_split");
  bias_split_into("fastacd::bias_split_", rel_pre, total_pre, bias, relu, tol, rel_pre);
  return rel_pre;
}

// One thread per (channel, position): it walks the M masks, so the sum over masks
// for grad_total needs no atomics; per-position bias partials are summed afterwards.
template <typename scalar_t, typename acc_t, bool kTol>
__global__ void bias_split_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ rel,
                                           const scalar_t* __restrict__ total, const scalar_t* __restrict__ bias,
                                           const scalar_t* __restrict__ tol, scalar_t* __restrict__ g_rel,
                                           scalar_t* __restrict__ g_total, acc_t* __restrict__ bias_partial,
                                           int64_t M, int64_t C, int64_t S, bool relu) {
  const int64_t CS = C * S;
  FASTACD_GRID_STRIDE(cs, CS) {
    const acc_t t = acc_t(total[cs]), b = acc_t(bias[cs / S]);
    const acc_t tl = kTol ? acc_t(tol[cs]) : acc_t(0);
    acc_t gt = 0, gb = 0;
    for (int64_t m = 0; m < M; ++m) {
      const int64_t k = m * CS + cs;
      const auto d = math::bias_split_grad<kTol>(acc_t(grad[k]), acc_t(rel[k]), t, b, relu, tl);
      g_rel[k] = static_cast<scalar_t>(d.rel);
      gt += d.total;
      gb += d.bias;
    }
    g_total[cs] = static_cast<scalar_t>(gt);
    bias_partial[cs] = gb;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bias_split_backward_cuda(
    const at::Tensor& grad, const at::Tensor& rel_pre, const at::Tensor& total_pre, const at::Tensor& bias,
    bool relu, const std::optional<at::Tensor>& tol) {
  constexpr const char* op = "fastacd::bias_split_backward";
  check_cuda_float(op, with_optional({{&rel_pre, "rel_pre"}, {&grad, "grad"}, {&total_pre, "total_pre"},
                                      {&bias, "bias"}}, tol, "tol"));
  check_rel_total(op, rel_pre, "rel_pre", total_pre, "total_pre");
  check_channel_vector(op, bias, "bias", rel_pre.size(1));
  check_tol_shape(op, tol, total_pre, "total_pre");
  TORCH_CHECK(grad.sizes() == rel_pre.sizes(), op, ": grad must have the shape of rel_pre ", rel_pre.sizes(),
              ", got ", grad.sizes(), ".");
  const c10::cuda::CUDAGuard guard(rel_pre.device());
  at::Tensor g_rel = at::empty(rel_pre.sizes(), rel_pre.options());
  at::Tensor g_total = at::zeros(total_pre.sizes(), total_pre.options());
  at::Tensor partial = at::zeros({rel_pre.size(1), positions(rel_pre)},
                                 rel_pre.options().dtype(acc_dtype(rel_pre.scalar_type())));
  if (g_total.numel() == 0) return {g_rel, g_total, at::zeros(bias.sizes(), bias.options())};
  const at::Tensor g = grad.contiguous(), r = rel_pre.contiguous(), t = total_pre.contiguous(),
                   b = bias.contiguous();
  const at::Tensor tl = tol.has_value() ? tol->contiguous() : at::Tensor();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  FASTACD_DISPATCH(r.scalar_type(), "bias_split_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_flag(tl.defined(), [&](auto kTol) {
      constexpr bool has_tol = decltype(kTol)::value;
      bias_split_backward_kernel<scalar_t, acc_t, has_tol><<<blocks_for(t.numel()), kThreads, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), r.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(),
          b.const_data_ptr<scalar_t>(), has_tol ? tl.const_data_ptr<scalar_t>() : nullptr,
          g_rel.mutable_data_ptr<scalar_t>(), g_total.mutable_data_ptr<scalar_t>(),
          partial.mutable_data_ptr<acc_t>(), r.size(0), r.size(1), positions(r), relu);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {g_rel, g_total, at::sum(partial, {1}).to(bias.scalar_type())};
}

// ---------------------------------------------------------------- bn_split

// rel and out may be the same array (bn_split_): no restrict on them; each thread reads an
// element before it writes it.
template <typename scalar_t, bool kTol>
__global__ void bn_split_kernel(const scalar_t* rel, const scalar_t* __restrict__ total,
                                const scalar_t* __restrict__ scale, const scalar_t* __restrict__ shift,
                                const scalar_t* __restrict__ tol, scalar_t* out, int64_t n, int64_t C, int64_t S,
                                bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t CS = C * S;
  FASTACD_GRID_STRIDE(k, n) {
    const int64_t cs = k % CS, c = cs / S;
    const acc_t tl = kTol ? acc_t(tol[cs]) : acc_t(0);
    out[k] = static_cast<scalar_t>(
        math::bn_split<kTol>(acc_t(rel[k]), acc_t(total[cs]), acc_t(scale[c]), acc_t(shift[c]), relu, tl));
  }
}

// The split of rel into out, which may be rel itself (bn_split_).
void bn_split_into(const char* op, const at::Tensor& rel, const at::Tensor& total, const at::Tensor& scale,
                   const at::Tensor& shift, bool relu, const std::optional<at::Tensor>& tol, at::Tensor& out) {
  check_cuda_float(op, with_optional({{&rel, "rel"}, {&total, "total"}, {&scale, "scale"}, {&shift, "shift"}}, tol,
                                     "tol"));
  check_rel_total(op, rel, "rel", total, "total");
  check_channel_vector(op, scale, "scale", rel.size(1));
  check_channel_vector(op, shift, "shift", rel.size(1));
  check_tol_shape(op, tol, total, "total");
  const c10::cuda::CUDAGuard guard(rel.device());
  const int64_t n = out.numel();
  if (n == 0) return;
  const at::Tensor r = rel.contiguous(), t = total.contiguous(), sc = scale.contiguous(), sh = shift.contiguous();
  const at::Tensor tl = tol.has_value() ? tol->contiguous() : at::Tensor();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  FASTACD_DISPATCH(r.scalar_type(), "bn_split_cuda", [&] {
    with_flag(tl.defined(), [&](auto kTol) {
      constexpr bool has_tol = decltype(kTol)::value;
      bn_split_kernel<scalar_t, has_tol><<<blocks_for(n), kThreads, 0, stream>>>(
          r.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), sc.const_data_ptr<scalar_t>(),
          sh.const_data_ptr<scalar_t>(), has_tol ? tl.const_data_ptr<scalar_t>() : nullptr,
          out.mutable_data_ptr<scalar_t>(), n, r.size(1), positions(r), relu);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

at::Tensor bn_split_cuda(const at::Tensor& rel, const at::Tensor& total, const at::Tensor& scale,
                         const at::Tensor& shift, bool relu, const std::optional<at::Tensor>& tol) {
  at::Tensor out = at::empty(rel.sizes(), rel.options());
  bn_split_into("fastacd::bn_split", rel, total, scale, shift, relu, tol, out);
  return out;
}

at::Tensor& bn_split_inplace_cuda(at::Tensor& rel, const at::Tensor& total, const at::Tensor& scale,
                                  const at::Tensor& shift, bool relu, const std::optional<at::Tensor>& tol) {
  check_inplace_contiguous("fastacd::bn_split_", rel, "rel", "fastacd::bn_split");
  bn_split_into("fastacd::bn_split_", rel, total, scale, shift, relu, tol, rel);
  return rel;
}

template <typename scalar_t, typename acc_t, bool kTol>
__global__ void bn_split_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ rel,
                                         const scalar_t* __restrict__ total, const scalar_t* __restrict__ scale,
                                         const scalar_t* __restrict__ shift, const scalar_t* __restrict__ tol,
                                         scalar_t* __restrict__ g_rel, scalar_t* __restrict__ g_total,
                                         acc_t* __restrict__ scale_partial, acc_t* __restrict__ shift_partial,
                                         int64_t M, int64_t C, int64_t S, bool relu) {
  const int64_t CS = C * S;
  FASTACD_GRID_STRIDE(cs, CS) {
    const int64_t c = cs / S;
    const acc_t t = acc_t(total[cs]), sc = acc_t(scale[c]), sh = acc_t(shift[c]);
    const acc_t tl = kTol ? acc_t(tol[cs]) : acc_t(0);
    acc_t gt = 0, gsc = 0, gsh = 0;
    for (int64_t m = 0; m < M; ++m) {
      const int64_t k = m * CS + cs;
      const auto d = math::bn_split_grad<kTol>(acc_t(grad[k]), acc_t(rel[k]), t, sc, sh, relu, tl);
      g_rel[k] = static_cast<scalar_t>(d.rel);
      gt += d.total;
      gsc += d.scale;
      gsh += d.shift;
    }
    g_total[cs] = static_cast<scalar_t>(gt);
    scale_partial[cs] = gsc;
    shift_partial[cs] = gsh;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_split_backward_cuda(
    const at::Tensor& grad, const at::Tensor& rel, const at::Tensor& total, const at::Tensor& scale,
    const at::Tensor& shift, bool relu, const std::optional<at::Tensor>& tol) {
  constexpr const char* op = "fastacd::bn_split_backward";
  check_cuda_float(op, with_optional({{&rel, "rel"}, {&grad, "grad"}, {&total, "total"}, {&scale, "scale"},
                                      {&shift, "shift"}}, tol, "tol"));
  check_rel_total(op, rel, "rel", total, "total");
  check_channel_vector(op, scale, "scale", rel.size(1));
  check_channel_vector(op, shift, "shift", rel.size(1));
  check_tol_shape(op, tol, total, "total");
  TORCH_CHECK(grad.sizes() == rel.sizes(), op, ": grad must have the shape of rel ", rel.sizes(), ", got ",
              grad.sizes(), ".");
  const c10::cuda::CUDAGuard guard(rel.device());
  at::Tensor g_rel = at::empty(rel.sizes(), rel.options());
  at::Tensor g_total = at::zeros(total.sizes(), total.options());
  const auto acc_opts = rel.options().dtype(acc_dtype(rel.scalar_type()));
  at::Tensor scale_partial = at::zeros({rel.size(1), positions(rel)}, acc_opts);
  at::Tensor shift_partial = at::zeros({rel.size(1), positions(rel)}, acc_opts);
  if (g_total.numel() == 0)
    return {g_rel, g_total, at::zeros(scale.sizes(), scale.options()), at::zeros(shift.sizes(), shift.options())};
  const at::Tensor g = grad.contiguous(), r = rel.contiguous(), t = total.contiguous(), sc = scale.contiguous(),
                   sh = shift.contiguous();
  const at::Tensor tl = tol.has_value() ? tol->contiguous() : at::Tensor();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  FASTACD_DISPATCH(r.scalar_type(), "bn_split_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_flag(tl.defined(), [&](auto kTol) {
      constexpr bool has_tol = decltype(kTol)::value;
      bn_split_backward_kernel<scalar_t, acc_t, has_tol><<<blocks_for(t.numel()), kThreads, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), r.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(),
          sc.const_data_ptr<scalar_t>(), sh.const_data_ptr<scalar_t>(),
          has_tol ? tl.const_data_ptr<scalar_t>() : nullptr, g_rel.mutable_data_ptr<scalar_t>(),
          g_total.mutable_data_ptr<scalar_t>(), scale_partial.mutable_data_ptr<acc_t>(),
          shift_partial.mutable_data_ptr<acc_t>(), r.size(0), r.size(1), positions(r), relu);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {g_rel, g_total, at::sum(scale_partial, {1}).to(scale.scalar_type()),
          at::sum(shift_partial, {1}).to(shift.scalar_type())};
}

// ---------------------------------------------------------------- maxpool_gather

// The launcher checks the indices on the host (once per indices tensor); the device assert
// is what remains while a CUDA graph is captured.
template <typename scalar_t>
__global__ void maxpool_gather_kernel(const scalar_t* __restrict__ rel, const int64_t* __restrict__ idx,
                                      scalar_t* __restrict__ out, int64_t n, int64_t C, int64_t S, int64_t So) {
  FASTACD_GRID_STRIDE(k, n) {
    const int64_t row = k / So, o = k - row * So;
    const int64_t p = idx[(row % C) * So + o];
    CUDA_KERNEL_ASSERT(p >= 0 && p < S && "fastacd::maxpool_gather: index out of range");
    out[k] = rel[row * S + p];
  }
}


at::Tensor maxpool_gather_cuda(const at::Tensor& rel, const at::Tensor& indices) {
  constexpr const char* op = "fastacd::maxpool_gather";
  check_device(op, c10::DeviceType::CUDA, {{&rel, "rel"}, {&indices, "indices"}});
  check_float_dtype(op, rel, "rel", /*allow_reduced=*/true);
  check_gather_indices(op, rel, indices);
  const c10::cuda::CUDAGuard guard(rel.device());
  const at::Tensor ix = indices.contiguous();
  if (!cuda::stream_capturing()) check_index_range(op, ix, positions(rel), kIndexWhat);
  at::Tensor out = at::empty(gathered_shape(rel.size(0), indices), rel.options());
  const int64_t n = out.numel();
  if (n == 0) return out;
  const at::Tensor r = rel.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  FASTACD_DISPATCH(r.scalar_type(), "maxpool_gather_cuda", [&] {
    maxpool_gather_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        r.const_data_ptr<scalar_t>(), ix.const_data_ptr<int64_t>(), out.mutable_data_ptr<scalar_t>(), n,
        r.size(1), positions(r), ix.numel() / ix.size(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// Overlapping windows can send two outputs to one position: atomics into an
// accumulation-type buffer (float or double atomics are native), cast at the end. Without
// overlaps every position receives at most one add, so the result is deterministic.
template <typename scalar_t, typename acc_t>
__global__ void maxpool_gather_backward_kernel(const scalar_t* __restrict__ grad, const int64_t* __restrict__ idx,
                                               acc_t* __restrict__ g_rel, int64_t n, int64_t C, int64_t S,
                                               int64_t So) {
  FASTACD_GRID_STRIDE(k, n) {
    const int64_t row = k / So, o = k - row * So;
    const int64_t p = idx[(row % C) * So + o];
    CUDA_KERNEL_ASSERT(p >= 0 && p < S && "fastacd::maxpool_gather_backward: index out of range");
    atomicAdd(g_rel + row * S + p, acc_t(grad[k]));
  }
}

at::Tensor maxpool_gather_backward_cuda(const at::Tensor& grad, const at::Tensor& indices,
                                        at::IntArrayRef rel_shape) {
  constexpr const char* op = "fastacd::maxpool_gather_backward";
  check_device(op, c10::DeviceType::CUDA, {{&grad, "grad"}, {&indices, "indices"}});
  check_float_dtype(op, grad, "grad", /*allow_reduced=*/true);
  const c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor acc = at::zeros(rel_shape, grad.options().dtype(acc_dtype(grad.scalar_type())));
  check_gather_indices(op, acc, indices);
  TORCH_CHECK(grad.sizes() == at::IntArrayRef(gathered_shape(acc.size(0), indices)), op,
              ": grad must have shape (M, C, *So) with M = ", acc.size(0), " and (C, *So) = ",
              indices.sizes().slice(1), ", got ", grad.sizes(), ".");
  const at::Tensor ix = indices.contiguous();
  const bool capturing = cuda::stream_capturing();
  if (!capturing) check_index_range(op, ix, positions(acc), kIndexWhat);
  const int64_t n = grad.numel();
  if (n == 0) return acc.to(grad.scalar_type());
  const at::Tensor g = grad.contiguous();
  if (at::globalContext().deterministicAlgorithms() && (capturing || has_repeated_indices(ix))) {
    // Overlapping windows under torch.use_deterministic_algorithms: scatter_add_, which is
    // deterministic on CUDA in that mode, instead of the atomics.
    const int64_t M = acc.size(0), C = acc.size(1), So = ix.numel() / C;
    acc.view({M, C, positions(acc)})
        .scatter_add_(2, ix.view({1, C, So}).expand({M, C, So}), g.view({M, C, So}).to(acc.scalar_type()));
    return acc.to(grad.scalar_type());
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  FASTACD_DISPATCH(g.scalar_type(), "maxpool_gather_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    maxpool_gather_backward_kernel<scalar_t, acc_t><<<blocks_for(n), kThreads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), ix.const_data_ptr<int64_t>(), acc.mutable_data_ptr<acc_t>(), n,
        acc.size(1), positions(acc), ix.numel() / ix.size(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return acc.to(grad.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(fastacd, CUDA, m) {
  m.impl("bias_split", &bias_split_cuda);
  m.impl("bias_split_", &bias_split_inplace_cuda);
  m.impl("bias_split_backward", &bias_split_backward_cuda);
  m.impl("bn_split", &bn_split_cuda);
  m.impl("bn_split_", &bn_split_inplace_cuda);
  m.impl("bn_split_backward", &bn_split_backward_cuda);
  m.impl("maxpool_gather", &maxpool_gather_cuda);
  m.impl("maxpool_gather_backward", &maxpool_gather_backward_cuda);
}

}  // namespace fastacd
