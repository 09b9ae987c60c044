// Argument checks and shape helpers shared by the CPU and CUDA launchers. Checks run in
// style.md's order: device, dtype, shape. Messages say what was wrong and what to do.
#pragma once

#include <optional>
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

// args plus an optional tensor (the split ops' tol) when it is given, for the device and
// dtype checks.
inline NamedTensors with_optional(NamedTensors args, const std::optional<at::Tensor>& t, const char* name) {
  if (t.has_value()) args.push_back({&*t, name});
  return args;
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

// The split ops' optional tolerance (design.md section 9): one threshold per element of the
// total, so exactly total's shape (fastacd.ops broadcasts a smaller one first).
inline void check_tol_shape(const char* op, const std::optional<at::Tensor>& tol, const at::Tensor& total,
                            const char* total_name) {
  if (!tol.has_value()) return;
  TORCH_CHECK(tol->sizes() == total.sizes(), op, ": tol must have the shape of ", total_name, " ", total.sizes(),
              " (one threshold per element), got ", tol->sizes(), ". Broadcast it to that shape or pass None.");
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

// An int64 index tensor's values lie in [0, bound) (csrc/index_checks.cpp); `what` says what
// they index. On CUDA: one reduction and a small copy to the host (a synchronisation), cached
// per tensor and version, so passing the same indices again costs nothing.
void check_index_range(const char* op, const at::Tensor& idx, int64_t bound, const char* what);

// Whether some channel of indices (1, C, *So) holds one position twice (overlapping pooling
// windows), cached like check_index_range. A synchronisation on CUDA the first time.
bool has_repeated_indices(const at::Tensor& idx);

// Per-candidate corners: (M,) int64.
inline void check_corner(const char* op, const at::Tensor& t, const char* name, int64_t M) {
  TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 1 && t.size(0) == M, op, ": ", name,
              " must be an int64 vector (M,) with M = ", M, " (one corner per candidate), got ",
              t.scalar_type(), " of shape ", t.sizes(), ".");
}

// Corners (M,) int64, contiguous on the CPU, that keep a window of `size` inside [0, n) (the
// window inside `map`); `context` prefixes the message.
inline void check_corners_inside(const char* op, const at::Tensor& corner, const char* name, int64_t size, int64_t n,
                                 const char* context, const char* map) {
  const int64_t* p = corner.const_data_ptr<int64_t>();
  for (int64_t j = 0; j < corner.numel(); ++j)
    TORCH_CHECK(p[j] >= 0 && p[j] + size <= n, op, ": ", context, name, " must lie in [0, ", n - size,
                "] (the window inside ", map, "), got ", p[j], " for candidate ", j, ".");
}

// window_gather's arguments, for both launchers: every tensor on `device_type` (one device),
// base a float dtype (float16/bfloat16 too when allow_reduced) that win shares; shapes: base
// (1, C, H, W); oy, ox (M,); win (M, C, wh, ww) with win_oy, win_ox (M,), all three or none;
// indices (1, C, Ho, Wo) int64 or none. Returns M.
inline int64_t check_window_gather(const char* op, c10::DeviceType device_type, bool allow_reduced,
                                   const at::Tensor& base, const std::optional<at::Tensor>& win,
                                   const std::optional<at::Tensor>& win_oy, const std::optional<at::Tensor>& win_ox,
                                   const at::Tensor& oy, const at::Tensor& ox, int64_t h, int64_t w,
                                   const std::optional<at::Tensor>& indices) {
  NamedTensors args{{&base, "base"}, {&oy, "oy"}, {&ox, "ox"}};
  for (const auto& [t, name] : {std::pair{&win, "win"}, {&win_oy, "win_oy"}, {&win_ox, "win_ox"}, {&indices, "indices"}})
    if (t->has_value()) args.push_back({&**t, name});
  check_device(op, device_type, args);
  check_float_dtype(op, base, "base", allow_reduced);
  if (win.has_value()) check_same_dtype(op, base, "base", *win, "win");
  TORCH_CHECK(base.dim() == 4 && base.size(0) == 1, op, ": base must be one map (1, C, H, W), got shape ",
              base.sizes(), ".");
  TORCH_CHECK(oy.dim() == 1, op, ": oy must be an int64 vector (M,), got shape ", oy.sizes(), ".");
  const int64_t M = oy.size(0);
  check_corner(op, oy, "oy", M);
  check_corner(op, ox, "ox", M);
  TORCH_CHECK(h >= 0 && w >= 0, op, ": the window size must be >= 0, got ", h, " x ", w, ".");
  TORCH_CHECK(win.has_value() == win_oy.has_value() && win.has_value() == win_ox.has_value(), op,
              ": pass win, win_oy and win_ox together (the candidates' windows and their corners) or none.");
  if (win.has_value()) {
    TORCH_CHECK(win->dim() == 4 && win->size(0) == M && win->size(1) == base.size(1), op,
                ": win must be (M, C, wh, ww) with M = ", M, " and C = ", base.size(1), ", got shape ",
                win->sizes(), ".");
    check_corner(op, *win_oy, "win_oy", M);
    check_corner(op, *win_ox, "win_ox", M);
  }
  if (indices.has_value()) {
    TORCH_CHECK(indices->scalar_type() == at::kLong && indices->dim() == 4 && indices->size(0) == 1 &&
                    indices->size(1) == base.size(1),
                op, ": indices must be int64 (1, C, Ho, Wo) with C = ", base.size(1),
                " (max_pool2d(..., return_indices=True) of the total), got ", indices->scalar_type(),
                " of shape ", indices->sizes(), ".");
    TORCH_CHECK(h <= indices->size(2) && w <= indices->size(3), op, ": a ", h, " x ", w,
                " window does not fit the pooled map ", indices->size(2), " x ", indices->size(3), ".");
    TORCH_CHECK(M * h * w == 0 || base.size(2) * base.size(3) > 0, op, ": indices point into base's H x W map, "
                "which is empty (", base.sizes(), ").");
  }
  return M;
}

}  // namespace fastacd
