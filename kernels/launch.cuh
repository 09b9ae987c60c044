// Launch helpers shared by the CUDA launchers (kernels/*.cu).
#pragma once

#include <c10/cuda/CUDAGraphsC10Utils.h>

#include <algorithm>
#include <cstdint>

namespace fastacd {
namespace cuda {

constexpr int kThreads = 256;
// Grid-stride loops: enough blocks to fill the GPU, capped so the grid stays legal. Above
// kMaxBlocks * kThreads = 2^28 elements a thread takes a second pass of its loop.
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

inline unsigned int blocks_for(int64_t n) {
  return static_cast<unsigned int>(std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks));
}

// Whether the current stream is being captured into a CUDA graph: a host-side check that
// reads a device value (a synchronisation) is not allowed then; the kernels' device asserts
// remain the check.
inline bool stream_capturing() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

}  // namespace cuda
}  // namespace fastacd

#define FASTACD_GRID_STRIDE(k, n) \
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < (n); k += int64_t(blockDim.x) * gridDim.x)
