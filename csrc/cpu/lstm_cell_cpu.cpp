// CPU implementation of fastacd::lstm_cd_cell (one LSTM step of CD for M masks) and
// its backward. The per-unit quantities of the true LSTM are computed once per call;
// OpenMP runs over masks. The math is in kernels/cd_math.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "csrc/cpu/cpu_target.h"
#include "csrc/lstm_cell.h"
#include "kernels/cd_math.h"

namespace fastacd {
namespace {

#if defined(__GNUC__) && !defined(__clang__)
#define FASTACD_IVDEP _Pragma("GCC ivdep")
#else
#define FASTACD_IVDEP
#endif

constexpr int64_t kParallelGrain = 1 << 12;  // (mask, unit) elements; each is ~10 exp/tanh

int threads_for(int64_t work) { return work < kParallelGrain ? 1 : at::get_num_threads(); }

// The true LSTM's per-unit quantities, shared by every mask.
template <typename scalar_t>
std::vector<math::LstmColumn<scalar_t>> lstm_columns(const LstmPtrs<scalar_t>& a) {
  const int64_t H = a.H;
  std::vector<math::LstmColumn<scalar_t>> cols(H);
  for (int64_t j = 0; j < H; ++j)
    cols[j] = math::lstm_column<scalar_t>(a.total_gates[j], a.total_gates[H + j], a.total_gates[2 * H + j],
                                          a.bias[j], a.bias[H + j], a.bias[2 * H + j], a.out_gate[j],
                                          a.prev_total_c[j], a.first_step);
  return cols;
}

// One mask's row. kFirst is a template argument and the pointers are restrict, so the
// loop has no branch and no aliasing question: gcc vectorises it, exp/tanh included.
template <typename scalar_t, bool kFirst>
FASTACD_CPU_CLONES void lstm_cell_forward_row(const math::LstmColumn<scalar_t>* __restrict__ cols, const scalar_t* __restrict__ gates,
                           const scalar_t* __restrict__ prev_rel_c, scalar_t in_phrase, scalar_t* __restrict__ rel_c,
                           scalar_t* __restrict__ rel_h, int64_t H) {
  for (int64_t j = 0; j < H; ++j) {
    const auto out = math::lstm_cd_cell<scalar_t>(cols[j], gates[j], gates[H + j], gates[2 * H + j], prev_rel_c[j],
                                                  in_phrase, kFirst);
    rel_c[j] = out.rel_c;
    rel_h[j] = out.rel_h;
  }
}

template <typename scalar_t, bool kFirst>
void lstm_cell_forward_loop(const LstmPtrs<scalar_t>& a, const math::LstmColumn<scalar_t>* cols, scalar_t* rel_c,
                            scalar_t* rel_h) {
  const int64_t M = a.M, H = a.H;
  const int nt = threads_for(M * H);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
  for (int64_t m = 0; m < M; ++m) {
    lstm_cell_forward_row<scalar_t, kFirst>(cols, a.rel_gates + m * 4 * H, a.prev_rel_c + m * H, a.in_phrase[m],
                                            rel_c + m * H, rel_h + m * H, H);
  }
}

template <typename scalar_t>
void lstm_cell_forward_kernel(const LstmPtrs<scalar_t>& a, scalar_t* rel_c, scalar_t* rel_h) {
  const auto cols = lstm_columns(a);
  a.first_step ? lstm_cell_forward_loop<scalar_t, true>(a, cols.data(), rel_c, rel_h)
               : lstm_cell_forward_loop<scalar_t, false>(a, cols.data(), rel_c, rel_h);
}

// Backward of one mask's row: per-mask gradients go straight to their outputs; the terms
// shared by all masks go to this mask's (kNumShared, H) slice of a buffer and the
// in_phrase terms to its (H,) slice, summed afterwards: no races, deterministic, no
// reduction in the loop.
template <typename scalar_t, bool kFirst>
FASTACD_CPU_CLONES void lstm_cell_backward_row(const math::LstmColumn<scalar_t>* __restrict__ cols, const scalar_t* __restrict__ gates,
                            const scalar_t* __restrict__ prev_rel_c, scalar_t in_phrase,
                            const scalar_t* __restrict__ grad_c, const scalar_t* __restrict__ grad_h,
                            scalar_t* __restrict__ g_gates, scalar_t* __restrict__ g_prev_rel_c,
                            scalar_t* __restrict__ g_phrase, scalar_t* __restrict__ shared, int64_t H) {
  // ivdep: the rows written through g_gates and shared (offsets j, H + j, ...) never
  // overlap; without it gcc needs more run-time alias checks than it allows and gives up.
  FASTACD_IVDEP
  for (int64_t j = 0; j < H; ++j) {
    const auto d = math::lstm_cd_cell_grad<scalar_t>(cols[j], gates[j], gates[H + j], gates[2 * H + j],
                                                     prev_rel_c[j], in_phrase, kFirst, grad_c[j], grad_h[j]);
    g_gates[j] = d.ri;
    g_gates[H + j] = d.rf;
    g_gates[2 * H + j] = d.rg;
    g_gates[3 * H + j] = scalar_t(0);
    g_prev_rel_c[j] = d.prev_rel_c;
    g_phrase[j] = d.in_phrase;
    shared[kTi * H + j] = d.ti;
    shared[kTf * H + j] = d.tf;
    shared[kTg * H + j] = d.tg;
    shared[kBi * H + j] = d.bi;
    shared[kBf * H + j] = d.bf;
    shared[kBg * H + j] = d.bg;
    shared[kOut * H + j] = d.out_gate;
    shared[kPrevTotalC * H + j] = d.prev_total_c;
  }
}

template <typename scalar_t, bool kFirst>
void lstm_cell_backward_loop(const LstmPtrs<scalar_t>& a, const math::LstmColumn<scalar_t>* cols,
                             const scalar_t* grad_c, const scalar_t* grad_h, scalar_t* g_rel_gates,
                             scalar_t* g_prev_rel_c, scalar_t* phrase_partial, scalar_t* shared) {
  const int64_t M = a.M, H = a.H;
  const int nt = threads_for(M * H);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
  for (int64_t m = 0; m < M; ++m) {
    lstm_cell_backward_row<scalar_t, kFirst>(cols, a.rel_gates + m * 4 * H, a.prev_rel_c + m * H, a.in_phrase[m],
                                             grad_c + m * H, grad_h + m * H, g_rel_gates + m * 4 * H,
                                             g_prev_rel_c + m * H, phrase_partial + m * H,
                                             shared + m * kNumShared * H, H);
  }
}

template <typename scalar_t>
void lstm_cell_backward_kernel(const LstmPtrs<scalar_t>& a, const scalar_t* grad_c, const scalar_t* grad_h,
                               scalar_t* g_rel_gates, scalar_t* g_prev_rel_c, scalar_t* phrase_partial,
                               scalar_t* shared) {
  const auto cols = lstm_columns(a);
  a.first_step ? lstm_cell_backward_loop<scalar_t, true>(a, cols.data(), grad_c, grad_h, g_rel_gates, g_prev_rel_c,
                                                         phrase_partial, shared)
               : lstm_cell_backward_loop<scalar_t, false>(a, cols.data(), grad_c, grad_h, g_rel_gates,
                                                          g_prev_rel_c, phrase_partial, shared);
}

std::tuple<at::Tensor, at::Tensor> lstm_cd_cell_cpu(const at::Tensor& rel_gates, const at::Tensor& total_gates,
                                                    const at::Tensor& bias, const at::Tensor& out_gate,
                                                    const at::Tensor& prev_rel_c, const at::Tensor& prev_total_c,
                                                    const at::Tensor& in_phrase, bool first_step) {
  constexpr const char* op = "fastacd::lstm_cd_cell";
  check_lstm_args(op, c10::DeviceType::CPU, /*allow_reduced=*/false, rel_gates, total_gates, bias, out_gate,
                  prev_rel_c, prev_total_c, in_phrase);
  at::Tensor rel_c = at::empty(prev_rel_c.sizes(), rel_gates.options());
  at::Tensor rel_h = at::empty(prev_rel_c.sizes(), rel_gates.options());
  if (rel_c.numel() == 0) return {rel_c, rel_h};
  const LstmInputs in(rel_gates, total_gates, bias, out_gate, prev_rel_c, prev_total_c, in_phrase, first_step);
  AT_DISPATCH_FLOATING_TYPES(rel_gates.scalar_type(), "lstm_cd_cell_cpu", [&] {
    lstm_cell_forward_kernel<scalar_t>(in.ptrs<scalar_t>(),
                                       rel_c.mutable_data_ptr<scalar_t>(), rel_h.mutable_data_ptr<scalar_t>());
  });
  return {rel_c, rel_h};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_cd_cell_backward_cpu(const at::Tensor& grad_c, const at::Tensor& grad_h, const at::Tensor& rel_gates,
                          const at::Tensor& total_gates, const at::Tensor& bias, const at::Tensor& out_gate,
                          const at::Tensor& prev_rel_c, const at::Tensor& prev_total_c, const at::Tensor& in_phrase,
                          bool first_step) {
  constexpr const char* op = "fastacd::lstm_cd_cell_backward";
  const int64_t H = check_lstm_args(op, c10::DeviceType::CPU, /*allow_reduced=*/false, rel_gates, total_gates,
                                    bias, out_gate, prev_rel_c, prev_total_c, in_phrase, &grad_c, &grad_h);
  const int64_t M = prev_rel_c.size(0);
  const auto opts = rel_gates.options();
  at::Tensor g_rel_gates = at::empty({M, 4 * H}, opts);
  at::Tensor g_prev_rel_c = at::empty({M, H}, opts);
  at::Tensor phrase = at::zeros({M, H}, opts);
  at::Tensor shared = at::zeros({M, kNumShared, H}, opts);
  if (M * H > 0) {
    const at::Tensor gc = grad_c.contiguous(), gh = grad_h.contiguous();
    const LstmInputs in(rel_gates, total_gates, bias, out_gate, prev_rel_c, prev_total_c, in_phrase, first_step);
    AT_DISPATCH_FLOATING_TYPES(rel_gates.scalar_type(), "lstm_cd_cell_backward_cpu", [&] {
      lstm_cell_backward_kernel<scalar_t>(in.ptrs<scalar_t>(),
                                          gc.const_data_ptr<scalar_t>(), gh.const_data_ptr<scalar_t>(),
                                          g_rel_gates.mutable_data_ptr<scalar_t>(),
                                          g_prev_rel_c.mutable_data_ptr<scalar_t>(),
                                          phrase.mutable_data_ptr<scalar_t>(), shared.mutable_data_ptr<scalar_t>());
    });
  }
  auto [g_total_gates, g_bias, g_out_gate, g_prev_total_c] =
      assemble_lstm_shared_grads(at::sum(shared, {0}), rel_gates.scalar_type());
  return {g_rel_gates, g_total_gates, g_bias, g_out_gate, g_prev_rel_c, g_prev_total_c, at::sum(phrase, {1})};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastacd, CPU, m) {
  m.impl("lstm_cd_cell", &lstm_cd_cell_cpu);
  m.impl("lstm_cd_cell_backward", &lstm_cd_cell_backward_cpu);
}

}  // namespace fastacd
