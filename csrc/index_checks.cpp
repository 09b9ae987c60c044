// Host-side checks of int64 index tensors (csrc/checks.h), shared by the CPU and CUDA
// launchers. On CUDA an out-of-range index would be a device assert, which loses the CUDA
// context; checking on the host costs a reduction and one small device-to-host copy (a
// synchronisation), so the facts are cached per tensor (identity, version, data pointer): the
// engine passes the same max-pool indices for every chunk of masks and pays once per tensor.
// The CPU does not cache (its scan is cheap, and a stale entry would mean an unchecked read;
// on CUDA the kernels' device asserts stay behind the cache).
#include "csrc/checks.h"

#include <ATen/ops/any.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/stack.h>
#include <c10/util/intrusive_ptr.h>

#include <array>
#include <optional>

namespace fastacd {
namespace {

using WeakImpl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;

struct IndexFacts {
  std::optional<WeakImpl> impl;  // identity without keeping the tensor alive
  int64_t version = 0, numel = 0;
  const void* data = nullptr;
  int64_t lo = 0, hi = -1;
  int repeats = -1;  // -1: not computed yet
};

constexpr size_t kCacheSize = 16;
thread_local std::array<IndexFacts, kCacheSize> cache;
thread_local size_t cache_next = 0;

// Inference tensors have no version counter; a CUDA one is cached by identity and data alone
// (the device assert remains behind a stale entry).
int64_t version_of(const at::Tensor& t) { return t.is_inference() ? 0 : t._version(); }

IndexFacts* find(const at::Tensor& idx) {
  for (IndexFacts& e : cache) {
    if (!e.impl.has_value()) continue;
    const auto locked = e.impl->lock();
    if (locked.get() == idx.unsafeGetTensorImpl() && e.version == version_of(idx) && e.numel == idx.numel() &&
        e.data == idx.const_data_ptr())
      return &e;
  }
  return nullptr;
}

IndexFacts compute_range(const at::Tensor& idx) {
  IndexFacts f;
  f.numel = idx.numel();
  if (f.numel == 0) return f;
  const auto [lo, hi] = at::aminmax(idx);
  const at::Tensor both = at::stack({lo, hi}).cpu();  // one copy (one sync on CUDA)
  const int64_t* p = both.const_data_ptr<int64_t>();
  f.lo = p[0];
  f.hi = p[1];
  return f;
}

IndexFacts& facts(const at::Tensor& idx) {
  if (IndexFacts* e = find(idx)) return *e;
  IndexFacts& e = cache[cache_next];
  cache_next = (cache_next + 1) % kCacheSize;
  e = compute_range(idx);
  e.impl = WeakImpl(idx.getIntrusivePtr());
  e.version = version_of(idx);
  e.data = idx.const_data_ptr();
  return e;
}

}  // namespace

void check_index_range(const char* op, const at::Tensor& idx, int64_t bound, const char* what) {
  const IndexFacts f = idx.is_cuda() ? facts(idx) : compute_range(idx);
  TORCH_CHECK(f.numel == 0 || (f.lo >= 0 && f.hi < bound), op, ": indices must lie in [0, ", bound, ") (", what,
              "), found values in [", f.lo, ", ", f.hi, "].");
}

bool has_repeated_indices(const at::Tensor& idx) {
  IndexFacts& f = facts(idx);
  if (f.repeats < 0) {
    // per channel: sorted positions with two equal neighbours
    const at::Tensor rows = std::get<0>(at::sort(idx.reshape({idx.size(1), -1}), 1));
    f.repeats = rows.size(1) > 1 && at::any(rows.slice(1, 1).eq(rows.slice(1, 0, -1))).item<bool>();
  }
  return f.repeats > 0;
}

}  // namespace fastacd
