// CUDA implementation of fastacd::lstm_cd_cell and its backward: one thread per
// (mask, hidden unit); each recomputes its unit's shared quantities (a few exp/tanh,
// cheaper than a second launch). Math in kernels/cd_math.h, checks in csrc/lstm_cell.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>

#include "csrc/lstm_cell.h"
#include "kernels/cd_math.h"
#include "kernels/launch.cuh"

namespace fastacd {
namespace {

using cuda::blocks_for;
using cuda::kThreads;

template <typename acc_t, typename scalar_t>
__device__ math::LstmColumn<acc_t> column(const LstmPtrs<scalar_t>& a, int64_t j) {
  const int64_t H = a.H;
  return math::lstm_column<acc_t>(acc_t(a.total_gates[j]), acc_t(a.total_gates[H + j]),
                                  acc_t(a.total_gates[2 * H + j]), acc_t(a.bias[j]), acc_t(a.bias[H + j]),
                                  acc_t(a.bias[2 * H + j]), acc_t(a.out_gate[j]), acc_t(a.prev_total_c[j]),
                                  a.first_step);
}

template <typename scalar_t>
__global__ void lstm_cell_forward_kernel(LstmPtrs<scalar_t> a, scalar_t* __restrict__ rel_c,
                                         scalar_t* __restrict__ rel_h) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = a.H, n = a.M * H;
  FASTACD_GRID_STRIDE(k, n) {
    const int64_t m = k / H, j = k - m * H;
    const scalar_t* g = a.rel_gates + m * 4 * H;
    const auto out = math::lstm_cd_cell<acc_t>(column<acc_t>(a, j), acc_t(g[j]), acc_t(g[H + j]),
                                               acc_t(g[2 * H + j]), acc_t(a.prev_rel_c[k]), acc_t(a.in_phrase[m]),
                                               a.first_step);
    rel_c[k] = static_cast<scalar_t>(out.rel_c);
    rel_h[k] = static_cast<scalar_t>(out.rel_h);
  }
}

// Shared terms go to a (M, kNumShared, H) buffer and the in_phrase terms to (M, H),
// both in the accumulation type, summed afterwards: no atomics, deterministic.
template <typename scalar_t, typename acc_t>
__global__ void lstm_cell_backward_kernel(LstmPtrs<scalar_t> a, const scalar_t* __restrict__ grad_c,
                                          const scalar_t* __restrict__ grad_h, scalar_t* __restrict__ g_rel_gates,
                                          scalar_t* __restrict__ g_prev_rel_c, acc_t* __restrict__ phrase,
                                          acc_t* __restrict__ shared) {
  const int64_t H = a.H, n = a.M * H;
  FASTACD_GRID_STRIDE(k, n) {
    const int64_t m = k / H, j = k - m * H;
    const scalar_t* g = a.rel_gates + m * 4 * H;
    const auto d = math::lstm_cd_cell_grad<acc_t>(column<acc_t>(a, j), acc_t(g[j]), acc_t(g[H + j]),
                                                  acc_t(g[2 * H + j]), acc_t(a.prev_rel_c[k]), acc_t(a.in_phrase[m]),
                                                  a.first_step, acc_t(grad_c[k]), acc_t(grad_h[k]));
    scalar_t* gg = g_rel_gates + m * 4 * H;
    gg[j] = static_cast<scalar_t>(d.ri);
    gg[H + j] = static_cast<scalar_t>(d.rf);
    gg[2 * H + j] = static_cast<scalar_t>(d.rg);
    gg[3 * H + j] = scalar_t(0);
    g_prev_rel_c[k] = static_cast<scalar_t>(d.prev_rel_c);
    phrase[k] = d.in_phrase;
    acc_t* sh = shared + m * kNumShared * H + j;
    sh[kTi * H] = d.ti;
    sh[kTf * H] = d.tf;
    sh[kTg * H] = d.tg;
    sh[kBi * H] = d.bi;
    sh[kBf * H] = d.bf;
    sh[kBg * H] = d.bg;
    sh[kOut * H] = d.out_gate;
    sh[kPrevTotalC * H] = d.prev_total_c;
  }
}

#define FASTACD_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, NAME, __VA_ARGS__)

std::tuple<at::Tensor, at::Tensor> lstm_cd_cell_cuda(const at::Tensor& rel_gates, const at::Tensor& total_gates,
                                                     const at::Tensor& bias, const at::Tensor& out_gate,
                                                     const at::Tensor& prev_rel_c, const at::Tensor& prev_total_c,
                                                     const at::Tensor& in_phrase, bool first_step) {
  constexpr const char* op = "fastacd::lstm_cd_cell";
  check_lstm_args(op, c10::DeviceType::CUDA, /*allow_reduced=*/true, rel_gates, total_gates, bias, out_gate,
                  prev_rel_c, prev_total_c, in_phrase);
  const c10::cuda::CUDAGuard guard(rel_gates.device());
  at::Tensor rel_c = at::empty(prev_rel_c.sizes(), rel_gates.options());
  at::Tensor rel_h = at::empty(prev_rel_c.sizes(), rel_gates.options());
  const int64_t n = rel_c.numel();
  if (n == 0) return {rel_c, rel_h};
  const LstmInputs in(rel_gates, total_gates, bias, out_gate, prev_rel_c, prev_total_c, in_phrase, first_step);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  FASTACD_DISPATCH(rel_gates.scalar_type(), "lstm_cd_cell_cuda", [&] {
    lstm_cell_forward_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        in.ptrs<scalar_t>(), rel_c.mutable_data_ptr<scalar_t>(),
        rel_h.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {rel_c, rel_h};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_cd_cell_backward_cuda(const at::Tensor& grad_c, const at::Tensor& grad_h, const at::Tensor& rel_gates,
                           const at::Tensor& total_gates, const at::Tensor& bias, const at::Tensor& out_gate,
                           const at::Tensor& prev_rel_c, const at::Tensor& prev_total_c, const at::Tensor& in_phrase,
                           bool first_step) {
  constexpr const char* op = "fastacd::lstm_cd_cell_backward";
  const int64_t H = check_lstm_args(op, c10::DeviceType::CUDA, /*allow_reduced=*/true, rel_gates, total_gates,
                                    bias, out_gate, prev_rel_c, prev_total_c, in_phrase, &grad_c, &grad_h);
  const int64_t M = prev_rel_c.size(0);
  const c10::cuda::CUDAGuard guard(rel_gates.device());
  const auto opts = rel_gates.options();
  const auto acc_opts = opts.dtype(rel_gates.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  at::Tensor g_rel_gates = at::empty({M, 4 * H}, opts);
  at::Tensor g_prev_rel_c = at::empty({M, H}, opts);
  at::Tensor phrase = at::zeros({M, H}, acc_opts);
  at::Tensor shared = at::zeros({M, kNumShared, H}, acc_opts);
  const int64_t n = M * H;
  if (n > 0) {
    const at::Tensor gc = grad_c.contiguous(), gh = grad_h.contiguous();
    const LstmInputs in(rel_gates, total_gates, bias, out_gate, prev_rel_c, prev_total_c, in_phrase, first_step);
    const auto stream = c10::cuda::getCurrentCUDAStream();
    FASTACD_DISPATCH(rel_gates.scalar_type(), "lstm_cd_cell_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      lstm_cell_backward_kernel<scalar_t, acc_t><<<blocks_for(n), kThreads, 0, stream>>>(
          in.ptrs<scalar_t>(), gc.const_data_ptr<scalar_t>(),
          gh.const_data_ptr<scalar_t>(), g_rel_gates.mutable_data_ptr<scalar_t>(),
          g_prev_rel_c.mutable_data_ptr<scalar_t>(), phrase.mutable_data_ptr<acc_t>(),
          shared.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  auto [g_total_gates, g_bias, g_out_gate, g_prev_total_c] =
      assemble_lstm_shared_grads(at::sum(shared, {0}), rel_gates.scalar_type());
  return {g_rel_gates,    g_total_gates, g_bias, g_out_gate, g_prev_rel_c, g_prev_total_c,
          at::sum(phrase, {1}).to(rel_gates.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastacd, CUDA, m) {
  m.impl("lstm_cd_cell", &lstm_cd_cell_cuda);
  m.impl("lstm_cd_cell_backward", &lstm_cd_cell_backward_cuda);
}

}  // namespace fastacd
