// transpose_cast on the CPU: a 4-d map converted to dtype and moved between NCHW and
// channels_last in one pass (csrc/cpu/transpose.h).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "csrc/checks.h"
#include "csrc/cpu/transpose.h"

namespace fastacd {
namespace {

template <typename In, typename Out>
void run(const at::Tensor& x, at::Tensor& y, bool channels_last) {
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3);
  transpose_planes<In, Out>(x.const_data_ptr<In>(), y.mutable_data_ptr<Out>(), n, channels_last ? c : hw,
                            channels_last ? hw : c);
}

at::Tensor transpose_cast_cpu(const at::Tensor& x, at::ScalarType dtype, bool channels_last) {
  constexpr const char* op = "fastacd::transpose_cast";
  check_device(op, c10::DeviceType::CPU, {{&x, "x"}});
  TORCH_CHECK(x.dim() == 4, op, ": x must be a 4-d map (N, C, H, W), got ", x.dim(), " dims.");
  const auto from = channels_last ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast;
  TORCH_CHECK(x.is_contiguous(from), op, ": x must be ", channels_last ? "NCHW" : "channels_last",
              "-contiguous to become ", channels_last ? "channels_last" : "NCHW", "; call .contiguous(",
              channels_last ? "" : "memory_format=torch.channels_last", ") first.");
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(dtype).memory_format(
                                          channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
  const auto in = x.scalar_type();
  if (in == at::kFloat && dtype == at::kBFloat16)
    run<float, c10::BFloat16>(x, y, channels_last);
  else if (in == at::kBFloat16 && dtype == at::kFloat)
    run<c10::BFloat16, float>(x, y, channels_last);
  else  // same-dtype transposes: torch's copy is as fast (docs/kernels.md)
    TORCH_CHECK(false, op, ": converts float32 to bfloat16 or bfloat16 to float32, got ", in, " to ", dtype,
                "; use x.to(dtype, memory_format=...) for other pairs.");
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastacd, CPU, m) { m.impl("transpose_cast", &transpose_cast_cpu); }

}  // namespace fastacd
