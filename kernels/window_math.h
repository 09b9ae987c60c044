// The windowed pass's gather rule (fastacd/windowed.py, docs/engine.md "Windowed
// propagation"), written once for the CPU loop (csrc/cpu/window_gather_cpu.cpp) and the CUDA
// kernel (kernels/window_gather.cu).
//
// Candidate j's relevant map of a node is the base's map (1, C, H, W) everywhere except
// inside j's window, where it is j's recomputed values (M, C, wh, ww); beyond the map it is
// zero (a conv's padding). window_gather reads every candidate's map over an h x w window of
// its own: a conv's input crop, the candidates' full maps (a paste) or, through a max-pool's
// argmax indices, the pooled window. The pure-torch oracle is fastacd/_torch_ops.py's
// window_gather; keep them in step.
#pragma once

#include <stdint.h>

#include "kernels/cd_math.h"  // FASTACD_HOST_DEVICE

namespace fastacd {
namespace window {

// Where output position (qy, qx) (in the node's output coordinates) reads the candidate's
// map: the position itself for a crop (idx_c == nullptr), or the max-pool's argmax
// idx_c[qy * Wo + qx], a flat position into the H x W input map. inv_W = 1.0 / W: the
// division by a reciprocal and a correction, exact, several times faster than an int64 one.
FASTACD_HOST_DEVICE void source_position(const int64_t* idx_c, int64_t Wo, int64_t W, double inv_W, int64_t qy,
                                         int64_t qx, int64_t& py, int64_t& px) {
  if (idx_c == nullptr) {
    py = qy;
    px = qx;
    return;
  }
  const int64_t p = idx_c[qy * Wo + qx];
  py = static_cast<int64_t>(static_cast<double>(p) * inv_W);
  px = p - py * W;
  if (px < 0) {
    --py;
    px += W;
  } else if (px >= W) {
    ++py;
    px -= W;
  }
}

// One candidate's map of channel c at (py, px): base_c is the base's H x W map of channel c
// (row stride sy, column stride sx: a channels_last base is read where it lies), win_jc the
// candidate's wh x ww window of it at (wy, wx), or nullptr (the base alone).
template <typename scalar_t>
FASTACD_HOST_DEVICE scalar_t candidate_at(const scalar_t* base_c, const scalar_t* win_jc, int64_t H, int64_t W,
                                          int64_t wy, int64_t wx, int64_t wh, int64_t ww, int64_t py, int64_t px,
                                          int64_t sy, int64_t sx) {
  if (py < 0 || py >= H || px < 0 || px >= W) return scalar_t(0);
  const int64_t ry = py - wy, rx = px - wx;
  if (win_jc != nullptr && ry >= 0 && ry < wh && rx >= 0 && rx < ww) return win_jc[ry * ww + rx];
  return base_c[py * sy + px * sx];
}

// The same for a contiguous (N, C, H, W) base.
template <typename scalar_t>
FASTACD_HOST_DEVICE scalar_t candidate_at(const scalar_t* base_c, const scalar_t* win_jc, int64_t H, int64_t W,
                                          int64_t wy, int64_t wx, int64_t wh, int64_t ww, int64_t py, int64_t px) {
  return candidate_at(base_c, win_jc, H, W, wy, wx, wh, ww, py, px, W, int64_t(1));
}

// The same rule by output row, for loops that copy spans (the CPU): output row y of a crop
// at (oy, ox) reads map row py = oy + y. Columns [lo, hi) lie inside the map (zero outside),
// and of those [win_lo, win_hi) inside the candidate's window (empty when row py is not in
// it or there is no window); the rest read the base.
struct RowSpans {
  int64_t lo, hi, win_lo, win_hi;
};

FASTACD_HOST_DEVICE int64_t clamp_(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

FASTACD_HOST_DEVICE RowSpans crop_row_spans(int64_t py, int64_t ox, int64_t w, int64_t H, int64_t W, bool has_win,
                                            int64_t wy, int64_t wx, int64_t wh, int64_t ww) {
  RowSpans s{0, 0, 0, 0};
  if (py < 0 || py >= H) return s;
  s.lo = clamp_(-ox, 0, w);
  s.hi = clamp_(W - ox, s.lo, w);
  if (has_win && py >= wy && py < wy + wh) {
    s.win_lo = clamp_(wx - ox, s.lo, s.hi);
    s.win_hi = clamp_(wx + ww - ox, s.win_lo, s.hi);
  }
  return s;
}

}  // namespace window
}  // namespace fastacd
