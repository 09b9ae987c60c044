// Argument checks and shape helpers shared by the CPU and CUDA launchers. Checks run in
// style.md's order: device, dtype, shape. Messages say what was wrong and what to do.
#pragma once

#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

namespace fastacd {

// (M, C, *S) -> S, the number of positions per channel (1 for (M, F)).
inline int64_t positions(const at::Tensor& t) {
  int64_t S = 1;
  for (int64_t d = 2; d < t.dim(); ++d) S *= t.size(d);
  return S;
}

// (M, C, *So): the shape of a gather with indices (1, C, *So) for M masks.
inline std::vector<int64_t> gathered_shape(int64_t M, const at::Tensor& indices) {
  std::vector<int64_t> shape(indices.sizes().begin(), indices.sizes().end());
  shape[0] = M;
  return shape;
}

// All tensors on `device_type` (and, for CUDA, on the device of the first one).
using NamedTensors = std::vector<std::pair<const at::Tensor*, const char*>>;

inline void check_device(const char* op, c10::DeviceType device_type, const NamedTensors& args) {
  const at::Tensor& first = *args.begin()->first;
  for (const auto& [t, name] : args) {
    TORCH_CHECK(t->device().type() == device_type, op, ": expected ", name, " on ",
                c10::DeviceTypeName(device_type, /*lower_case=*/true), " like ",
                args.begin()->second, ", got ", t->device(),
                ". Move all arguments to one device.");
    TORCH_CHECK(t->device() == first.device(), op, ": ", name, " is on ", t->device(), " but ",
                args.begin()->second, " is on ", first.device(), ". Move all arguments to one device.");
  }
}

// Floating dtypes the kernels handle: float32/float64, plus float16/bfloat16 on CUDA.
inline void check_float_dtype(const char* op, const at::Tensor& t, const char* name, bool allow_reduced) {
  const auto st = t.scalar_type();
  const bool ok = st == at::kFloat || st == at::kDouble ||
                  (allow_reduced && (st == at::kHalf || st == at::kBFloat16));
  TORCH_CHECK(ok, op, ": ", name, " has dtype ", st, "; supported on ", t.device().type(), ": ",
              allow_reduced ? "float32, float64, float16, bfloat16" : "float32, float64",
              ". Convert with .float() or .double().");
}

// An in-place op's output argument: written element by element, so it must be contiguous.
inline void check_inplace_contiguous(const char* op, const at::Tensor& t, const char* name,
                                     const char* functional) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous to be written in place; use ", functional,
              " (or .contiguous() first).");
}

inline void check_same_dtype(const char* op, const at::Tensor& ref, const char* ref_name,
                             const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but ", ref_name, " has dtype ", ref.scalar_type(), "; all must have the same dtype.");
}

// rel (M, C, *S) and total (1, C, *S) share C and *S.
inline void check_rel_total(const char* op, const at::Tensor& rel, const char* rel_name,
                            const at::Tensor& total, const char* total_name) {
  TORCH_CHECK(rel.dim() >= 2, op, ": ", rel_name, " must be (M, C, *S) with at least 2 dims, got shape ",
              rel.sizes());
  bool ok = total.dim() == rel.dim() && total.size(0) == 1;
  for (int64_t d = 1; ok && d < rel.dim(); ++d) ok = total.size(d) == rel.size(d);
  TORCH_CHECK(ok, op, ": ", total_name, " must have shape (1, C, *S) matching ", rel_name, " ",
              rel.sizes(), ", got ", total.sizes(), ".");
}

// A per-channel vector (C,).
inline void check_channel_vector(const char* op, const at::Tensor& p, const char* name, int64_t channels) {
  TORCH_CHECK(p.dim() == 1 && p.size(0) == channels, op, ": ", name, " must have shape (C,) = (",
              channels, ",), got ", p.sizes(), ".");
}

// rel (M, C, *S), indices (1, C, *So) int64 flat into prod(S).
inline void check_gather_indices(const char* op, const at::Tensor& rel, const at::Tensor& indices) {
  TORCH_CHECK(indices.scalar_type() == at::kLong, op, ": indices must be int64 (as returned by ",
              "max_pool*d(..., return_indices=True)), got ", indices.scalar_type(), ".");
  TORCH_CHECK(rel.dim() >= 2, op, ": rel must be (M, C, *S) with at least 2 dims, got shape ",
              rel.sizes());
  TORCH_CHECK(indices.dim() >= 2 && indices.size(0) == 1 && indices.size(1) == rel.size(1), op,
              ": indices must have shape (1, C, *So) with C = ", rel.size(1), " (rel ", rel.sizes(),
              "), got ", indices.sizes(), ".");
}

}  // namespace fastacd
