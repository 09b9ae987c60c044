// Transposing copies between NCHW and NHWC on the CPU, with a dtype conversion on the way
// (float32 <-> bfloat16, or none). torch's converting, transposing copy strides through one
// side; blocked tiles through a local buffer keep both the reads and the writes contiguous
// (measured: docs/kernels.md, "Transposing casts").
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "csrc/cpu/cpu_target.h"

namespace fastacd {

// float -> bfloat16 rounded to nearest even, NaN to a quiet NaN: c10::BFloat16's rounding,
// written without a call so that the tile loops vectorise.
inline uint16_t bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t rounded = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  return (u & 0x7fffffffu) > 0x7f800000u ? uint16_t{0x7fc0} : rounded;
}

template <typename Out, typename In>
inline Out convert_value(In v) {
  if constexpr (std::is_same_v<Out, c10::BFloat16> && std::is_same_v<In, float>) {
    return c10::BFloat16(bf16_bits(v), c10::BFloat16::from_bits());
  } else {
    return static_cast<Out>(v);
  }
}

// Blocks [b0, b1) of transpose_planes. Block b covers kTile of the plane's rows of x (by_rows,
// for R <= S) or of y (else), the smaller side, so that its kTile streams of the larger side are
// read (or written) contiguously, through a kTile x kTile tile. A function of its own:
// target_clones does not reach into a lambda.
template <typename In, typename Out, int64_t kTile, bool by_rows>
FASTACD_CPU_CLONES void transpose_blocks(const In* __restrict x, Out* __restrict y, int64_t R, int64_t S,
                                         int64_t b0, int64_t b1) {
  const int64_t small = by_rows ? R : S, large = by_rows ? S : R, nblocks = (small + kTile - 1) / kTile;
  Out tile[kTile][kTile];
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t p = b / nblocks, k0 = (b % nblocks) * kTile, kn = std::min(kTile, small - k0);
    const In* xp = x + p * R * S;
    Out* yp = y + p * R * S;
    int64_t l0 = 0;
    if (kn == kTile) {
      for (; l0 + kTile <= large; l0 += kTile) {
        const int64_t r0 = by_rows ? k0 : l0, s0 = by_rows ? l0 : k0;
        for (int64_t i = 0; i < kTile; ++i)
          for (int64_t j = 0; j < kTile; ++j) tile[j][i] = convert_value<Out>(xp[(r0 + i) * S + s0 + j]);
        for (int64_t j = 0; j < kTile; ++j) std::copy(tile[j], tile[j] + kTile, yp + (s0 + j) * R + r0);
      }
    }
    for (int64_t l = l0; l < large; ++l)  // the edges: value by value
      for (int64_t k = k0; k < k0 + kn; ++k) {
        const int64_t r = by_rows ? k : l, s = by_rows ? l : k;
        yp[s * R + r] = convert_value<Out>(xp[r * S + s]);
      }
  }
}

// For each of n planes: x (R, S) row-major -> y (S, R) row-major, converted. NCHW -> NHWC is
// R = C, S = H*W; NHWC -> NCHW is R = H*W, S = C.
template <typename In, typename Out>
void transpose_planes(const In* x, Out* y, int64_t n, int64_t R, int64_t S) {
  constexpr int64_t kTile = 16;
  const int64_t small = std::min(R, S), large = std::max(R, S);
  const int64_t blocks = n * ((small + kTile - 1) / kTile);
  at::parallel_for(0, blocks, std::max<int64_t>(1, (1 << 14) / (large * kTile + 1)), [&](int64_t b0, int64_t b1) {
    if (R <= S)
      transpose_blocks<In, Out, kTile, true>(x, y, R, S, b0, b1);
    else
      transpose_blocks<In, Out, kTile, false>(x, y, R, S, b0, b1);
  });
}

}  // namespace fastacd
