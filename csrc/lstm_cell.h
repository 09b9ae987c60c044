// Host-side pieces of fastacd::lstm_cd_cell shared by the CPU and CUDA launchers:
// argument checks and the assembly of the per-unit gradient sums into the op's outputs.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <utility>
#include <vector>

#include "csrc/checks.h"

namespace fastacd {

// Gradient rows shared by all masks, in the order the kernels write them.
enum LstmSharedGrad : int64_t { kTi, kTf, kTg, kBi, kBf, kBg, kOut, kPrevTotalC, kNumShared };

// Device, dtype and shape checks of the op (grad_c / grad_h: the backward's extra inputs).
// Shapes: rel_gates (M, 4H), total_gates (1, 4H), bias (4H,), out_gate (1, H),
// prev_rel_c (M, H), prev_total_c (1, H), in_phrase (M,); grads (M, H). Returns H.
// in_phrase may be float, int or bool: it is a 0/1 mask, converted to the op's dtype.
inline int64_t check_lstm_args(const char* op, c10::DeviceType device, bool allow_reduced,
                               const at::Tensor& rel_gates, const at::Tensor& total_gates, const at::Tensor& bias,
                               const at::Tensor& out_gate, const at::Tensor& prev_rel_c,
                               const at::Tensor& prev_total_c, const at::Tensor& in_phrase,
                               const at::Tensor* grad_c = nullptr, const at::Tensor* grad_h = nullptr) {
  NamedTensors args = {
      {&rel_gates, "rel_gates"},   {&total_gates, "total_gates"},   {&bias, "bias"},
      {&out_gate, "out_gate"},     {&prev_rel_c, "prev_rel_c"},     {&prev_total_c, "prev_total_c"},
      {&in_phrase, "in_phrase"}};
  if (grad_c != nullptr) args.insert(args.end(), {{grad_c, "grad_c"}, {grad_h, "grad_h"}});
  check_device(op, device, args);
  check_float_dtype(op, rel_gates, "rel_gates", allow_reduced);
  for (const auto& [t, name] : args) {
    if (t != &in_phrase) check_same_dtype(op, rel_gates, "rel_gates", *t, name);
  }
  TORCH_CHECK(prev_rel_c.dim() == 2, op, ": prev_rel_c must be (M, H), got shape ", prev_rel_c.sizes(), ".");
  const int64_t M = prev_rel_c.size(0), H = prev_rel_c.size(1);
  auto expect = [&](const at::Tensor& t, const char* name, std::initializer_list<int64_t> shape, const char* text) {
    TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), op, ": ", name, " must have shape ", text, " = ",
                at::IntArrayRef(shape), " (M = ", M, ", H = ", H, " from prev_rel_c), got ", t.sizes(), ".");
  };
  expect(rel_gates, "rel_gates", {M, 4 * H}, "(M, 4H)");
  expect(total_gates, "total_gates", {1, 4 * H}, "(1, 4H)");
  expect(bias, "bias", {4 * H}, "(4H,)");
  expect(out_gate, "out_gate", {1, H}, "(1, H)");
  expect(prev_total_c, "prev_total_c", {1, H}, "(1, H)");
  expect(in_phrase, "in_phrase", {M}, "(M,)");
  if (grad_c != nullptr) {
    expect(*grad_c, "grad_c", {M, H}, "(M, H)");
    expect(*grad_h, "grad_h", {M, H}, "(M, H)");
  }
  return H;
}

// Raw pointers of one call (all contiguous, all of the op's dtype), for CPU loops and kernels.
template <typename scalar_t>
struct LstmPtrs {
  const scalar_t *rel_gates, *total_gates, *bias, *out_gate, *prev_rel_c, *prev_total_c, *in_phrase;
  int64_t M, H;
  bool first_step;
};

// The op's inputs made contiguous (in_phrase in the op's dtype), kept alive for ptrs().
struct LstmInputs {
  at::Tensor rel_gates, total_gates, bias, out_gate, prev_rel_c, prev_total_c, in_phrase;
  bool first_step;

  LstmInputs(const at::Tensor& rg, const at::Tensor& tg, const at::Tensor& b, const at::Tensor& o,
             const at::Tensor& prc, const at::Tensor& ptc, const at::Tensor& ph, bool first)
      : rel_gates(rg.contiguous()), total_gates(tg.contiguous()), bias(b.contiguous()), out_gate(o.contiguous()),
        prev_rel_c(prc.contiguous()), prev_total_c(ptc.contiguous()),
        in_phrase(ph.to(rg.scalar_type()).contiguous()), first_step(first) {}

  template <typename scalar_t>
  LstmPtrs<scalar_t> ptrs() const {
    return {rel_gates.const_data_ptr<scalar_t>(),  total_gates.const_data_ptr<scalar_t>(),
            bias.const_data_ptr<scalar_t>(),       out_gate.const_data_ptr<scalar_t>(),
            prev_rel_c.const_data_ptr<scalar_t>(), prev_total_c.const_data_ptr<scalar_t>(),
            in_phrase.const_data_ptr<scalar_t>(),  prev_rel_c.size(0),
            prev_rel_c.size(1),                    first_step};
  }
};

// shared: (kNumShared, H) sums over masks, accumulation dtype. Returns
// (grad_total_gates (1, 4H), grad_bias (4H,), grad_out_gate (1, H), grad_prev_total_c (1, H))
// in `dtype`; the output gate's pre-activations get no gradient (o is given, not split).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> assemble_lstm_shared_grads(
    const at::Tensor& shared, at::ScalarType dtype) {
  const int64_t H = shared.size(1);
  const at::Tensor s = shared.to(dtype);
  const at::Tensor zero = at::zeros({H}, s.options());
  at::Tensor g_total = at::cat({s[kTi], s[kTf], s[kTg], zero}).view({1, 4 * H});
  at::Tensor g_bias = at::cat({s[kBi], s[kBf], s[kBg], zero});
  return {g_total, g_bias, s[kOut].view({1, H}).clone(), s[kPrevTotalC].view({1, H}).clone()};
}

}  // namespace fastacd
