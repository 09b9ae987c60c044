// The CPU buffer reuse of csrc/buffer_reuse.h: a wrapper around torch's CPU allocator
// that, while a scope is open, keeps freed large blocks by size for the next request
// they fit (at most twice its size).
#include "csrc/buffer_reuse.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>

#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <atomic>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace fastacd {
namespace {

// Smaller blocks come from malloc's bins, which it keeps: no page faults to save.
constexpr size_t kMinBytes = size_t(1) << 20;

constexpr size_t kHugePage = size_t(2) << 20;

// A new block (freed with drop_block). From 2 MiB on it is aligned to 2 MiB and marked for
// transparent huge pages (as torch does under THP_MEM_ALLOC_ENABLE): its first touch then
// faults once per 2 MiB instead of once per 4 KiB (where the kernel allows huge pages on
// request). Below, torch's own allocation (64-byte aligned).
void* fresh_block(size_t n) {
  if (n < kHugePage) return c10::alloc_cpu(n);
  void* p = nullptr;
  const int err = posix_memalign(&p, kHugePage, n);
  TORCH_CHECK(err == 0 && p != nullptr, "fastacd buffer reuse: could not allocate ", n,
              " bytes on the CPU (out of memory?)");
#ifdef MADV_HUGEPAGE
  madvise(p, n, MADV_HUGEPAGE);  // advice only: where refused, ordinary pages
#endif
  return p;
}

void drop_block(void* p, size_t n) { n < kHugePage ? c10::free_cpu(p) : std::free(p); }

class ReusingCpuAllocator final : public c10::Allocator {
 public:
  explicit ReusingCpuAllocator(c10::Allocator* base) : base_(base), base_deleter_(base->raw_deleter()) {}

  c10::DataPtr allocate(size_t n) override {
    if (n < kMinBytes || open_.load(std::memory_order_acquire) == 0) return base_->allocate(n);
    void* p = nullptr;
    size_t block = n;  // the size of the block handed out
    {
      std::lock_guard<std::mutex> lock(mu_);
      // The smallest cached block that fits, if it is at most twice the request (a chunk
      // smaller than the others, e.g. the last one, still finds blocks).
      auto it = cache_.lower_bound(n);
      if (it != cache_.end() && it->first <= 2 * n) {
        p = it->second.back();
        block = it->first;
        cached_bytes_ -= static_cast<int64_t>(block);
        it->second.pop_back();
        if (it->second.empty()) cache_.erase(it);
        --cached_blocks_;
        ++hits_;
      } else {
        ++misses_;
      }
    }
    if (p == nullptr) {
      p = fresh_block(n);
      std::lock_guard<std::mutex> lock(mu_);
      owned_[p] = n;
    }
    report(p, static_cast<int64_t>(block));
    return {p, p, &release, c10::Device(c10::DeviceType::CPU)};
  }

  // Blocks of the wrapped allocator (raw_allocate from before or outside a scope) go back
  // to it, so this deleter is valid for every pointer the CPU allocator ever returned.
  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  bool enter(int64_t cap) {
    std::lock_guard<std::mutex> lock(mu_);
    cap_ = std::max(cap_, cap);
    open_.fetch_add(1, std::memory_order_acq_rel);
    return true;
  }

  void exit() {
    std::vector<std::pair<void*, size_t>> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (open_.load(std::memory_order_acquire) == 0) return;
      if (open_.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
      for (auto& [n, blocks] : cache_) {
        for (void* p : blocks) {
          owned_.erase(p);
          drop.emplace_back(p, n);
        }
      }
      cache_.clear();
      cached_bytes_ = 0;
      cached_blocks_ = 0;
      cap_ = 0;
    }
    for (const auto& [p, n] : drop) drop_block(p, n);
  }

  BufferReuseStats stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {open_.load(), cached_bytes_, cached_blocks_, hits_, misses_};
  }

  static ReusingCpuAllocator* instance;

 private:
  static void release(void* p) { instance->give_back(p); }

  void give_back(void* p) {
    std::unique_lock<std::mutex> lock(mu_);
    auto it = owned_.find(p);
    if (it == owned_.end()) {  // the wrapped allocator's block
      lock.unlock();
      base_deleter_(p);
      return;
    }
    const auto n = static_cast<int64_t>(it->second);
    report(p, -n);
    if (open_.load(std::memory_order_acquire) > 0 && cached_bytes_ + n <= cap_) {
      cache_[it->second].push_back(p);
      cached_bytes_ += n;
      ++cached_blocks_;
      return;
    }
    owned_.erase(it);
    lock.unlock();
    drop_block(p, static_cast<size_t>(n));
  }

  // The memory profiler (torch.profiler(profile_memory=True)) sees blocks handed out and back.
  void report(void* p, int64_t delta) {
    if (!c10::memoryProfilingEnabled()) return;
    in_use_ += delta;
    c10::reportMemoryUsageToProfiler(p, delta, static_cast<size_t>(in_use_),
                                     static_cast<size_t>(in_use_ + cached_bytes_),
                                     c10::Device(c10::DeviceType::CPU));
  }

  c10::Allocator* base_;
  c10::DeleterFnPtr base_deleter_;
  std::mutex mu_;
  std::atomic<int64_t> open_{0};
  std::unordered_map<void*, size_t> owned_;               // every block this wrapper allocated
  std::map<size_t, std::vector<void*>> cache_;            // the freed ones, by size
  int64_t cap_ = 0, cached_bytes_ = 0, cached_blocks_ = 0, hits_ = 0, misses_ = 0;
  std::atomic<int64_t> in_use_{0};
};

ReusingCpuAllocator* ReusingCpuAllocator::instance = nullptr;

// Installs the wrapper once. It needs the wrapped allocator's raw deleter (oneDNN frees
// through raw_deallocate), and the registration may be refused by a higher-priority one.
bool install() {
  static const bool installed = [] {
    c10::Allocator* base = c10::GetCPUAllocator();
    if (base == nullptr || base->raw_deleter() == nullptr) return false;
    // Static lifetime (SetCPUAllocator does not take ownership; blocks may outlive any scope).
    ReusingCpuAllocator::instance = new ReusingCpuAllocator(base);
    c10::SetCPUAllocator(ReusingCpuAllocator::instance, /*priority=*/0);
    return c10::GetCPUAllocator() == ReusingCpuAllocator::instance;
  }();
  return installed;
}

}  // namespace

bool buffer_reuse_enter(int64_t cap_bytes) {
  return install() && ReusingCpuAllocator::instance->enter(cap_bytes);
}

void buffer_reuse_exit() {
  if (ReusingCpuAllocator::instance != nullptr) ReusingCpuAllocator::instance->exit();
}

BufferReuseStats buffer_reuse_stats() {
  if (ReusingCpuAllocator::instance == nullptr) return {0, 0, 0, 0, 0};
  return ReusingCpuAllocator::instance->stats();
}

}  // namespace fastacd
