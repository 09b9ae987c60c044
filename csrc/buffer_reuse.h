// Reuse of large CPU buffers across the chunks of one CD call (docs/kernels.md, "CPU
// buffer reuse").
//
// The engine runs the same chunk of masks through the network again and again, so every
// chunk allocates the same large activations. glibc returns such blocks to the system
// when they are freed at the end of a chunk (heap trimming, or munmap above its mmap
// threshold), and the next chunk pays a page fault per 4 KiB to get them back: on VGG16
// at 224x224 that was 80 MB a mask, about 12% of the CD time. While a reuse scope is
// open, CPU blocks of at least kMinBytes freed by torch are kept by size and handed out
// again for a request they fit (the smallest that does, if at most twice the request);
// closing the last scope frees them.
//
// Mechanism: the first scope installs (once, for the process) a CPU allocator that wraps
// the one torch had. With no scope open it forwards every call to that allocator
// unchanged; within a scope it serves large blocks from its cache or c10::alloc_cpu.
#pragma once

#include <cstddef>
#include <cstdint>

namespace fastacd {

struct BufferReuseStats {
  int64_t open_scopes;   // scopes currently open
  int64_t cached_bytes;  // freed blocks held for reuse
  int64_t cached_blocks;
  int64_t hits;          // requests served from the cache (since the process started)
  int64_t misses;        // large requests allocated fresh within a scope
};

// Opens a scope; `cap_bytes` bounds the bytes held in the cache (the largest cap of the open
// scopes applies). Returns false (and opens nothing) if the wrapper could not be installed,
// e.g. because another allocator of higher priority is registered for the CPU.
bool buffer_reuse_enter(int64_t cap_bytes);
// Closes a scope; closing the last one frees every cached block.
void buffer_reuse_exit();
BufferReuseStats buffer_reuse_stats();

}  // namespace fastacd
