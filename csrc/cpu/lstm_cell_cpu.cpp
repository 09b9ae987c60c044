// CPU implementation of fastacd::lstm_cd_cell (one LSTM step of CD for M masks) and
// its backward. The per-unit quantities of the true LSTM are computed once per call;
// OpenMP runs over masks. The math is in kernels/cd_math.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "csrc/lstm_cell.h"
#include "kernels/cd_math.h"

namespace fastacd {
namespace {

constexpr int64_t kParallelGrain = 1 << 12;  // (mask, unit) elements; each is ~10 exp/tanh

int threads_for(int64_t work) { return work < kParallelGrain ? 1 : at::get_num_threads(); }

// Pointers of one call, all contiguous, all of the op's dtype.
template <typename scalar_t>
struct LstmArgs {
  const scalar_t *rel_gates, *total_gates, *bias, *out_gate, *prev_rel_c, *prev_total_c, *in_phrase;
  int64_t M, H;
  bool first_step;

  std::vector<math::LstmColumn<scalar_t>> columns() const {
    std::vector<math::LstmColumn<scalar_t>> cols(H);
    for (int64_t j = 0; j < H; ++j)
      cols[j] = math::lstm_column<scalar_t>(total_gates[j], total_gates[H + j], total_gates[2 * H + j], bias[j],
                                            bias[H + j], bias[2 * H + j], out_gate[j], prev_total_c[j], first_step);
    return cols;
  }
};

template <typename scalar_t>
void lstm_cell_forward_kernel(const LstmArgs<scalar_t>& a, scalar_t* rel_c, scalar_t* rel_h) {
  const auto cols = a.columns();
  const int64_t M = a.M, H = a.H;
  const int nt = threads_for(M * H);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
  for (int64_t m = 0; m < M; ++m) {
    const scalar_t* g = a.rel_gates + m * 4 * H;
    for (int64_t j = 0; j < H; ++j) {
      const auto out = math::lstm_cd_cell<scalar_t>(cols[j], g[j], g[H + j], g[2 * H + j], a.prev_rel_c[m * H + j],
                                                     a.in_phrase[m], a.first_step);
      rel_c[m * H + j] = out.rel_c;
      rel_h[m * H + j] = out.rel_h;
    }
  }
}

// Per-mask gradients go straight to their outputs; the terms shared by all masks go to
// a (M, kNumShared, H) buffer summed afterwards (no races, deterministic).
template <typename scalar_t>
void lstm_cell_backward_kernel(const LstmArgs<scalar_t>& a, const scalar_t* grad_c, const scalar_t* grad_h,
                               scalar_t* g_rel_gates, scalar_t* g_prev_rel_c, scalar_t* g_in_phrase,
                               scalar_t* shared) {
  const auto cols = a.columns();
  const int64_t M = a.M, H = a.H;
  const int nt = threads_for(M * H);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
  for (int64_t m = 0; m < M; ++m) {
    const scalar_t* g = a.rel_gates + m * 4 * H;
    scalar_t* gg = g_rel_gates + m * 4 * H;
    scalar_t* sh = shared + m * kNumShared * H;
    double g_phrase = 0;
    for (int64_t j = 0; j < H; ++j) {
      const auto d = math::lstm_cd_cell_grad<scalar_t>(cols[j], g[j], g[H + j], g[2 * H + j],
                                                       a.prev_rel_c[m * H + j], a.in_phrase[m], a.first_step,
                                                       grad_c[m * H + j], grad_h[m * H + j]);
      gg[j] = d.ri;
      gg[H + j] = d.rf;
      gg[2 * H + j] = d.rg;
      gg[3 * H + j] = scalar_t(0);
      g_prev_rel_c[m * H + j] = d.prev_rel_c;
      g_phrase += d.in_phrase;
      sh[kTi * H + j] = d.ti;
      sh[kTf * H + j] = d.tf;
      sh[kTg * H + j] = d.tg;
      sh[kBi * H + j] = d.bi;
      sh[kBf * H + j] = d.bf;
      sh[kBg * H + j] = d.bg;
      sh[kOut * H + j] = d.out_gate;
      sh[kPrevTotalC * H + j] = d.prev_total_c;
    }
    g_in_phrase[m] = static_cast<scalar_t>(g_phrase);
  }
}

void check_cpu(const char* op, const at::Tensor& rel_gates,
               std::initializer_list<std::pair<const at::Tensor*, const char*>> args) {
  check_device(op, c10::DeviceType::CPU, args);
  check_float_dtype(op, rel_gates, "rel_gates", /*allow_reduced=*/false);
  for (const auto& [t, name] : args) {
    if (std::string(name) != "in_phrase") check_same_dtype(op, rel_gates, "rel_gates", *t, name);
  }
}

// in_phrase may be float, int or bool: it is a 0/1 mask, converted to the op's dtype.
template <typename scalar_t>
LstmArgs<scalar_t> make_args(const at::Tensor& rel_gates, const at::Tensor& total_gates, const at::Tensor& bias,
                             const at::Tensor& out_gate, const at::Tensor& prev_rel_c, const at::Tensor& prev_total_c,
                             const at::Tensor& in_phrase, bool first_step) {
  return {rel_gates.const_data_ptr<scalar_t>(),  total_gates.const_data_ptr<scalar_t>(),
          bias.const_data_ptr<scalar_t>(),       out_gate.const_data_ptr<scalar_t>(),
          prev_rel_c.const_data_ptr<scalar_t>(), prev_total_c.const_data_ptr<scalar_t>(),
          in_phrase.const_data_ptr<scalar_t>(),  prev_rel_c.size(0),
          prev_rel_c.size(1),                    first_step};
}

std::tuple<at::Tensor, at::Tensor> lstm_cd_cell_cpu(const at::Tensor& rel_gates, const at::Tensor& total_gates,
                                                    const at::Tensor& bias, const at::Tensor& out_gate,
                                                    const at::Tensor& prev_rel_c, const at::Tensor& prev_total_c,
                                                    const at::Tensor& in_phrase, bool first_step) {
  constexpr const char* op = "fastacd::lstm_cd_cell";
  check_cpu(op, rel_gates,
            {{&rel_gates, "rel_gates"}, {&total_gates, "total_gates"}, {&bias, "bias"}, {&out_gate, "out_gate"},
             {&prev_rel_c, "prev_rel_c"}, {&prev_total_c, "prev_total_c"}, {&in_phrase, "in_phrase"}});
  check_lstm_shapes(op, rel_gates, total_gates, bias, out_gate, prev_rel_c, prev_total_c, in_phrase);
  at::Tensor rel_c = at::empty(prev_rel_c.sizes(), rel_gates.options());
  at::Tensor rel_h = at::empty(prev_rel_c.sizes(), rel_gates.options());
  if (rel_c.numel() == 0) return {rel_c, rel_h};
  const at::Tensor rg = rel_gates.contiguous(), tg = total_gates.contiguous(), b = bias.contiguous(),
                   o = out_gate.contiguous(), prc = prev_rel_c.contiguous(), ptc = prev_total_c.contiguous(),
                   ph = in_phrase.to(rel_gates.scalar_type()).contiguous();
  AT_DISPATCH_FLOATING_TYPES(rg.scalar_type(), "lstm_cd_cell_cpu", [&] {
    lstm_cell_forward_kernel<scalar_t>(make_args<scalar_t>(rg, tg, b, o, prc, ptc, ph, first_step),
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
  check_cpu(op, rel_gates,
            {{&rel_gates, "rel_gates"}, {&grad_c, "grad_c"}, {&grad_h, "grad_h"}, {&total_gates, "total_gates"},
             {&bias, "bias"}, {&out_gate, "out_gate"}, {&prev_rel_c, "prev_rel_c"},
             {&prev_total_c, "prev_total_c"}, {&in_phrase, "in_phrase"}});
  const int64_t H =
      check_lstm_shapes(op, rel_gates, total_gates, bias, out_gate, prev_rel_c, prev_total_c, in_phrase);
  const int64_t M = prev_rel_c.size(0);
  TORCH_CHECK(grad_c.sizes() == prev_rel_c.sizes() && grad_h.sizes() == prev_rel_c.sizes(), op,
              ": grad_c and grad_h must have shape (M, H) = ", prev_rel_c.sizes(), ", got ", grad_c.sizes(), " and ",
              grad_h.sizes(), ".");
  const auto opts = rel_gates.options();
  at::Tensor g_rel_gates = at::empty({M, 4 * H}, opts);
  at::Tensor g_prev_rel_c = at::empty({M, H}, opts);
  at::Tensor g_in_phrase = at::empty({M}, opts);
  at::Tensor shared = at::empty({M, kNumShared, H}, opts);
  if (M * H > 0) {
    const at::Tensor gc = grad_c.contiguous(), gh = grad_h.contiguous(), rg = rel_gates.contiguous(),
                     tg = total_gates.contiguous(), b = bias.contiguous(), o = out_gate.contiguous(),
                     prc = prev_rel_c.contiguous(), ptc = prev_total_c.contiguous(),
                     ph = in_phrase.to(rel_gates.scalar_type()).contiguous();
    AT_DISPATCH_FLOATING_TYPES(rg.scalar_type(), "lstm_cd_cell_backward_cpu", [&] {
      lstm_cell_backward_kernel<scalar_t>(make_args<scalar_t>(rg, tg, b, o, prc, ptc, ph, first_step),
                                          gc.const_data_ptr<scalar_t>(), gh.const_data_ptr<scalar_t>(),
                                          g_rel_gates.mutable_data_ptr<scalar_t>(),
                                          g_prev_rel_c.mutable_data_ptr<scalar_t>(),
                                          g_in_phrase.mutable_data_ptr<scalar_t>(), shared.mutable_data_ptr<scalar_t>());
    });
  } else {
    g_in_phrase.zero_();
  }
  auto [g_total_gates, g_bias, g_out_gate, g_prev_total_c] =
      assemble_lstm_shared_grads(at::sum(shared, {0}), rel_gates.scalar_type());
  return {g_rel_gates, g_total_gates, g_bias, g_out_gate, g_prev_rel_c, g_prev_total_c, g_in_phrase};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastacd, CPU, m) {
  m.impl("lstm_cd_cell", &lstm_cd_cell_cpu);
  m.impl("lstm_cd_cell_backward", &lstm_cd_cell_backward_cpu);
}

}  // namespace fastacd
