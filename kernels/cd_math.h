// The CD element-wise math, written once (design.md sections 2 and 5).
//
// Every formula of the fused ops lives here as a small inline function, marked
// FASTACD_HOST_DEVICE so that the CPU loops (csrc/cpu/*.cpp) and the CUDA kernels
// (kernels/*.cu) call the same code. Those files only compute indices, load, call one
// of these functions and store. `T` is the accumulation type: the tensor's own type
// for float32/float64, float32 for float16/bfloat16 (the caller converts).
//
// The pure-torch oracle of each formula is fastacd/ops/torch_ops.py; keep them in step.
#pragma once

#include <math.h>

#include "kernels/fast_math_cpu.h"

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTACD_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Forced: in a large translation unit gcc may stop inlining, and a call in a loop
// stops it vectorising.
#define FASTACD_HOST_DEVICE inline __attribute__((always_inline))
#else
#define FASTACD_HOST_DEVICE inline
#endif

namespace fastacd {
namespace math {

// The reference's epsilon in the conv/linear bias split (acd's 1e-20).
template <typename T>
FASTACD_HOST_DEVICE T eps() { return T(1e-20); }

// Branch-free helpers the compiler vectorises (no libm calls). They follow torch's
// conventions: abs_ and relu_ propagate NaN like abs / clamp_min(0); sgn(0) = 0 like
// the gradient of abs.
template <typename T>
FASTACD_HOST_DEVICE T abs_(T x) { return x < T(0) ? -x : x; }

template <typename T>
FASTACD_HOST_DEVICE T relu_(T x) { return x < T(0) ? T(0) : x; }

template <typename T>
FASTACD_HOST_DEVICE T sgn(T x) { return T(x > T(0)) - T(x < T(0)); }

// Numerical zero (design.md section 9; docs/engine.md "Numerical zero"). `tol` is the
// element's magnitude scale times the zero tolerance (computed in the total pass). A part's
// weight ramps from 0 at tol/2 to its magnitude t at tol (t * ramp(t)), so a rounding residue
// next to a genuine part weighs exactly 0; the weight the ramp removes, (1 - ramp(top)) (ar +
// ai) with top the larger part, is shared by 16th powers, the split of two small parts. The
// weights are continuous except at two exact zeros, so rounding cannot flip a split.
// Without tol (kTol false), or tol = 0: the reference's formula. The caller adds its epsilon.
// Mirrored in fastacd/ops/torch_ops.py (split_weights).
template <typename T>
struct SplitWeights {
  T wr, wi;                  // the weights
  T dr_r, dr_i, di_r, di_i;  // d wr / d ar, d wr / d ai, d wi / d ar, d wi / d ai (kGrad only)
};

constexpr int kSmallPower = 16;  // the both-small split's power (fastacd.ops.torch_ops.SMALL_POWER)
static_assert(kSmallPower == 16, "split_weights computes rho^16 by four squarings");

// Written as arithmetic and selects, one division per quantity, so that gcc vectorises the
// CPU loops; the derivatives only where asked (kGrad).
template <bool kTol, typename T, bool kGrad = false>
FASTACD_HOST_DEVICE SplitWeights<T> split_weights(T ar, T ai, T tol) {
  SplitWeights<T> w;
  if (!kTol) {
    w.wr = ar; w.wi = ai;
    w.dr_r = T(1); w.dr_i = T(0); w.di_r = T(0); w.di_i = T(1);
    return w;
  }
  const bool on = tol > T(0);
  const T inv = T(1) / (on ? tol : T(1));
  const T ur = T(2) * ar * inv - T(1), ui = T(2) * ai * inv - T(1);
  const T rr = on ? (ur < T(0) ? T(0) : (ur > T(1) ? T(1) : ur)) : T(ar > T(0));
  const T ri = on ? (ui < T(0) ? T(0) : (ui > T(1) ? T(1) : ui)) : T(ai > T(0));
  const bool r_top = ar >= ai;
  const T top = r_top ? ar : ai, low = r_top ? ai : ar;
  const T rho = low / (top > T(0) ? top : T(1));  // smaller / larger, in [0, 1]
  const T p2 = rho * rho, p4 = p2 * p2, p8 = p4 * p4, p16 = p8 * p8;  // rho^kSmallPower
  const T lo = p16 / (T(1) + p16);                                     // the smaller part's share
  const T small = top > T(0) ? (r_top ? T(1) - lo : lo) : T(0);        // the relevant part's share
  const T rt = r_top ? rr : ri;
  const T rest = (T(1) - rt) * (ar + ai);
  w.wr = ar * rr + rest * small;
  w.wi = ai * ri + rest * (T(1) - small);
  if (kGrad) {
    const T sr = (on && ur > T(0) && ur < T(1)) ? T(2) * inv : T(0);
    const T si = (on && ui > T(0) && ui < T(1)) ? T(2) * inv : T(0);
    // d small / d ar = kSmallPower small (1 - small) / ar, and likewise for ai (0 at a zero part)
    const T spread = T(kSmallPower) * small * (T(1) - small);
    const T ds_dr = ar > T(0) ? spread / ar : T(0);
    const T ds_di = ai > T(0) ? -spread / ai : T(0);
    const T drest_dr = T(1) - rt - (r_top ? sr : T(0)) * (ar + ai);
    const T drest_di = T(1) - rt - (r_top ? T(0) : si) * (ar + ai);
    w.dr_r = rr + ar * sr + drest_dr * small + rest * ds_dr;
    w.dr_i = drest_di * small + rest * ds_di;
    w.di_r = drest_dr * (T(1) - small) - rest * ds_dr;
    w.di_i = ri + ai * si + drest_di * (T(1) - small) - rest * ds_di;
  }
  return w;
}

// ---------------------------------------------------------------------------------
// Conv / linear bias split, optionally followed by ReLU.
//   zr = W r (no bias), total = W a (no bias), zi = total - zr
//   (wr, wi) = split_weights(|zr|, |zi|, tol); pr = wr + eps, pi = wi + eps
//   q = pr / (pr + pi); out = zr + q * bias, then relu(out) when asked (the ReLU
//   rule's relevant part). Without tol: the reference's formula.
// ---------------------------------------------------------------------------------
template <bool kTol = false, typename T>
FASTACD_HOST_DEVICE T bias_split(T zr, T total, T bias, bool relu, T tol = T(0)) {
  const SplitWeights<T> w = split_weights<kTol>(abs_(zr), abs_(total - zr), tol);
  const T pr = w.wr + eps<T>();
  const T pi = w.wi + eps<T>();
  const T out = zr + pr / (pr + pi) * bias;
  return relu ? relu_(out) : out;
}

// Gradient of bias_split for one element, given the incoming gradient g.
// dq = (pi d(wr) - pr d(wi)) / (pr + pi)^2 with d(wr), d(wi) through |zr| and |zi|
// (zi = total - zr also moves with zr); tol gets no gradient. With relu, the gradient
// passes where out >= 0 (the gradient of clamp_min(0), as in the oracle).
template <typename T>
struct BiasSplitGrad {
  T rel;    // d out / d zr * g
  T total;  // d out / d total * g   (summed over masks by the caller)
  T bias;   // d out / d bias * g    (summed over masks and positions by the caller)
};

template <bool kTol = false, typename T>
FASTACD_HOST_DEVICE BiasSplitGrad<T> bias_split_grad(T g, T zr, T total, T bias, bool relu, T tol = T(0)) {
  const T zi = total - zr;
  const SplitWeights<T> w = split_weights<kTol, T, true>(abs_(zr), abs_(zi), tol);
  const T pr = w.wr + eps<T>();
  const T pi = w.wi + eps<T>();
  const T inv = T(1) / (pr + pi);
  const T q = pr * inv;
  g = (relu && zr + q * bias < T(0)) ? T(0) : g;
  const T gb = g * bias;
  // dq / d|zr| and dq / d|zi|
  const T kr = (pi * w.dr_r - pr * w.di_r) * inv * inv;
  const T ki = (pi * w.dr_i - pr * w.di_i) * inv * inv;
  const T dq_dzi = ki * sgn(zi);
  BiasSplitGrad<T> out;
  out.rel = g + gb * (kr * sgn(zr) - dq_dzi);
  out.total = gb * dq_dzi;
  out.bias = g * q;
  return out;
}

// ---------------------------------------------------------------------------------
// Eval batchnorm split `scale * a + shift`, optionally followed by ReLU.
//   sr = scale r, si = scale (total - r), (A, B) = split_weights(|sr|, |si|, tol)
//   q = A / (A + B), q = 0 where 0/0 (no eps, as in the reference);
//   out = sr + q * shift, then relu(out) when asked.
// ---------------------------------------------------------------------------------
template <bool kTol = false, typename T>
FASTACD_HOST_DEVICE T bn_split(T r, T total, T scale, T shift, bool relu, T tol = T(0)) {
  const T sr = scale * r;
  const SplitWeights<T> w = split_weights<kTol>(abs_(sr), abs_(scale * (total - r)), tol);
  const T denom = w.wr + w.wi;
  // denom = 0 implies A = 0, so dividing by 1 there gives the rule's q = 0. Written
  // as arithmetic (not a branch around the division) so that gcc vectorises the loops.
  const T q = w.wr / (denom + T(denom == T(0)));
  const T out = sr + q * shift;
  return relu ? relu_(out) : out;
}

// Gradient of bn_split for one element. With D = A + B: dq = (B dA - A dB) / D^2, through
// |sr| and |si|; where D = 0, q is the constant 0 (zero gradient).
template <typename T>
struct BnSplitGrad {
  T rel;    // per element
  T total;  // summed over masks by the caller
  T scale;  // summed over masks and positions by the caller
  T shift;  // summed over masks and positions by the caller
};

template <bool kTol = false, typename T>
FASTACD_HOST_DEVICE BnSplitGrad<T> bn_split_grad(T g, T r, T total, T scale, T shift, bool relu,
                                                 T tol = T(0)) {
  const T ir = total - r;
  const T sr = scale * r;
  const T si = scale * ir;
  const SplitWeights<T> w = split_weights<kTol, T, true>(abs_(sr), abs_(si), tol);
  const T a = w.wr, b = w.wi;
  const T denom = a + b;
  const T inv_any = T(1) / (denom + T(denom == T(0)));  // finite everywhere, no branch
  const T inv = denom == T(0) ? T(0) : inv_any;           // q is the constant 0 there
  const T q = a * inv;
  g = (relu && sr + q * shift < T(0)) ? T(0) : g;
  // dq/d(sr) and dq/d(si), with d(sr) = s dr + r ds and d(si) = s (dt - dr) + ir ds
  const T ka = (b * w.dr_r - a * w.di_r) * inv * inv * sgn(sr);
  const T kb = (b * w.dr_i - a * w.di_i) * inv * inv * sgn(si);
  const T gc = g * shift;
  BnSplitGrad<T> out;
  out.rel = g * scale + gc * (ka - kb) * scale;
  out.total = gc * kb * scale;
  out.scale = g * r + gc * (ka * r + kb * ir);
  out.shift = g * q;
  return out;
}

// ---------------------------------------------------------------------------------
// LSTM CD cell step (the reference cd_text cell rule, design.md section 2) for M masks.
// Per hidden unit j, the quantities of the true LSTM are shared by all masks
// (LstmColumn); per mask m, the relevant pre-activations of gates i, f, g give the
// relevant cell and hidden state (lstm_cd_cell). Irrelevant = total - relevant.
//   split3(r; t, b, act) = 1/2 [(act(r + b) - act(b)) + (act(t + b) - act(t - r + b))]
//   rel_c = ri' (rg' + tanh(bg)) + sig(bi) rg' + in_phrase sig(bi) tanh(bg)
//           [+ (rf' + sig(bf)) prev_rel_c after the first step]
//   total_c = sig(ti + bi) tanh(tg + bg) [+ sig(tf + bf) prev_total_c]
//   rel_h = o * 1/2 [tanh(rel_c) + (tanh(total_c) - tanh(total_c - rel_c))]
// with ri' = split3(ri; ti, bi, sig), rg' = split3(rg; tg, bg, tanh), rf' likewise.
// ---------------------------------------------------------------------------------
// exp and tanh: CUDA's own on the device; on the host, branch-free versions that let
// the CPU loops vectorise (kernels/fast_math_cpu.h, ~1 ulp).
#ifdef __CUDA_ARCH__
FASTACD_HOST_DEVICE float exp_(float x) { return ::expf(x); }
FASTACD_HOST_DEVICE double exp_(double x) { return ::exp(x); }
FASTACD_HOST_DEVICE float tanh_(float x) { return ::tanhf(x); }
FASTACD_HOST_DEVICE double tanh_(double x) { return ::tanh(x); }
#else
FASTACD_HOST_DEVICE float exp_(float x) { return fast_cpu::exp(x); }
FASTACD_HOST_DEVICE double exp_(double x) { return fast_cpu::exp(x); }
FASTACD_HOST_DEVICE float tanh_(float x) { return fast_cpu::tanh(x); }
FASTACD_HOST_DEVICE double tanh_(double x) { return fast_cpu::tanh(x); }
#endif

template <typename T>
FASTACD_HOST_DEVICE T sigmoid_(T x) { return T(1) / (T(1) + exp_(-x)); }

// An activation with its derivative expressed through its value.
struct Sigmoid {
  template <typename T> FASTACD_HOST_DEVICE static T f(T x) { return sigmoid_(x); }
  template <typename T> FASTACD_HOST_DEVICE static T df(T x) { const T y = sigmoid_(x); return y * (T(1) - y); }
};
struct Tanh {
  template <typename T> FASTACD_HOST_DEVICE static T f(T x) { return tanh_(x); }
  template <typename T> FASTACD_HOST_DEVICE static T df(T x) { const T y = tanh_(x); return T(1) - y * y; }
};

// One gate of hidden unit j, as seen by every mask: bias b, total pre-activation + bias tb.
template <typename T>
struct LstmGate {
  T b, tb, act_b, act_tb;
};

template <typename Act, typename T>
FASTACD_HOST_DEVICE LstmGate<T> lstm_gate(T total, T bias) {
  LstmGate<T> g;
  g.b = bias;
  g.tb = total + bias;
  g.act_b = Act::f(bias);
  g.act_tb = Act::f(g.tb);
  return g;
}

// The relevant share of the three-player split of act(r + i + b), i = t - r.
template <typename Act, typename T>
FASTACD_HOST_DEVICE T split3_rel(T r, const LstmGate<T>& g) {
  return T(0.5) * ((Act::f(r + g.b) - g.act_b) + (g.act_tb - Act::f(g.tb - r)));
}

template <typename T>
struct LstmColumn {
  LstmGate<T> i, f, g;
  T out_gate, prev_total_c, total_c, tanh_total_c;
};

template <typename T>
FASTACD_HOST_DEVICE LstmColumn<T> lstm_column(T ti, T tf, T tg, T bi, T bf, T bg, T out_gate, T prev_total_c,
                                              bool first_step) {
  LstmColumn<T> col;
  col.i = lstm_gate<Sigmoid>(ti, bi);
  col.f = lstm_gate<Sigmoid>(tf, bf);
  col.g = lstm_gate<Tanh>(tg, bg);
  col.out_gate = out_gate;
  col.prev_total_c = prev_total_c;
  col.total_c = col.i.act_tb * col.g.act_tb + (first_step ? T(0) : col.f.act_tb * prev_total_c);
  col.tanh_total_c = tanh_(col.total_c);
  return col;
}

template <typename T>
struct LstmCell {
  T rel_c, rel_h;
};

template <typename T>
FASTACD_HOST_DEVICE LstmCell<T> lstm_cd_cell(const LstmColumn<T>& col, T ri, T rf, T rg, T prev_rel_c,
                                             T in_phrase, bool first_step) {
  const T rci = split3_rel<Sigmoid>(ri, col.i);
  const T rcg = split3_rel<Tanh>(rg, col.g);
  T rel_c = rci * (rcg + col.g.act_b) + col.i.act_b * rcg + in_phrase * (col.i.act_b * col.g.act_b);
  if (!first_step) rel_c += (split3_rel<Sigmoid>(rf, col.f) + col.f.act_b) * prev_rel_c;
  LstmCell<T> out;
  out.rel_c = rel_c;
  out.rel_h = col.out_gate * (T(0.5) * (tanh_(rel_c) + (col.tanh_total_c - tanh_(col.total_c - rel_c))));
  return out;
}

// Gradient of one (mask, unit) element of lstm_cd_cell, given the incoming gradients
// of rel_c (gc) and rel_h (gh). Per-mask terms (ri, rf, rg, prev_rel_c) are the
// element's own; the caller sums in_phrase over units and the shared terms over masks.
template <typename T>
struct LstmCellGrad {
  T ri, rf, rg, prev_rel_c, in_phrase;             // per element
  T ti, tf, tg, bi, bf, bg, out_gate, prev_total_c;  // shared by all masks: summed over M
};

// d split3_rel / d (r, t, b): the three partial derivatives.
template <typename T>
struct Split3Grad {
  T r, t, b;
};

template <typename Act, typename T>
FASTACD_HOST_DEVICE Split3Grad<T> split3_rel_grad(T r, const LstmGate<T>& g) {
  const T d_rb = Act::df(r + g.b), d_trb = Act::df(g.tb - r), d_tb = Act::df(g.tb);
  Split3Grad<T> d;
  d.r = T(0.5) * (d_rb + d_trb);
  d.t = T(0.5) * (d_tb - d_trb);
  d.b = T(0.5) * ((d_rb - Act::df(g.b)) + (d_tb - d_trb));
  return d;
}

template <typename T>
FASTACD_HOST_DEVICE LstmCellGrad<T> lstm_cd_cell_grad(const LstmColumn<T>& col, T ri, T rf, T rg, T prev_rel_c,
                                                      T in_phrase, bool first_step, T gc, T gh) {
  const T rci = split3_rel<Sigmoid>(ri, col.i);
  const T rcg = split3_rel<Tanh>(rg, col.g);
  const T rcf = first_step ? T(0) : split3_rel<Sigmoid>(rf, col.f);
  const T bci = col.i.act_b, bcg = col.g.act_b, bcf = col.f.act_b;
  T rel_c = rci * (rcg + bcg) + bci * rcg + in_phrase * (bci * bcg);
  if (!first_step) rel_c += (rcf + bcf) * prev_rel_c;
  // rel_h = o/2 [tanh(rel_c) + tanh(total_c) - tanh(total_c - rel_c)]
  const T th_rel = tanh_(rel_c), th_diff = tanh_(col.total_c - rel_c);
  const T d_rel = T(1) - th_rel * th_rel, d_diff = T(1) - th_diff * th_diff;
  const T d_tot = T(1) - col.tanh_total_c * col.tanh_total_c;
  const T Gc = gc + gh * col.out_gate * T(0.5) * (d_rel + d_diff);  // total gradient on rel_c
  const T Gt = gh * col.out_gate * T(0.5) * (d_tot - d_diff);       // gradient on total_c
  LstmCellGrad<T> d;
  d.out_gate = gh * T(0.5) * (th_rel + (col.tanh_total_c - th_diff));
  d.in_phrase = Gc * (bci * bcg);
  // input and candidate gates: rel_c = rci (rcg + bcg) + bci rcg + ph bci bcg
  const Split3Grad<T> si = split3_rel_grad<Sigmoid>(ri, col.i);
  const Split3Grad<T> sg = split3_rel_grad<Tanh>(rg, col.g);
  const T Gi = Gc * (rcg + bcg);  // on rci
  const T Gg = Gc * (rci + bci);  // on rcg
  // total_c = sig(ti + bi) tanh(tg + bg) + sig(tf + bf) prev_total_c
  const T dtc_i = Sigmoid::df(col.i.tb) * col.g.act_tb;
  const T dtc_g = col.i.act_tb * Tanh::df(col.g.tb);
  d.ri = Gi * si.r;
  d.rg = Gg * sg.r;
  d.ti = Gi * si.t + Gt * dtc_i;
  d.tg = Gg * sg.t + Gt * dtc_g;
  d.bi = Gi * si.b + Gc * (rcg + in_phrase * bcg) * Sigmoid::df(col.i.b) + Gt * dtc_i;
  d.bg = Gg * sg.b + Gc * (rci + in_phrase * bci) * Tanh::df(col.g.b) + Gt * dtc_g;
  if (first_step) {
    d.rf = d.tf = d.bf = d.prev_rel_c = d.prev_total_c = T(0);
  } else {
    // rel_c += (rcf + bcf) prev_rel_c
    const Split3Grad<T> sf = split3_rel_grad<Sigmoid>(rf, col.f);
    const T Gf = Gc * prev_rel_c;  // on rcf (and on bcf)
    const T dtc_f = Sigmoid::df(col.f.tb) * col.prev_total_c;
    d.rf = Gf * sf.r;
    d.prev_rel_c = Gc * (rcf + bcf);
    d.tf = Gf * sf.t + Gt * dtc_f;
    d.bf = Gf * (sf.b + Sigmoid::df(col.f.b)) + Gt * dtc_f;
    d.prev_total_c = Gt * col.f.act_tb;
  }
  return d;
}

}  // namespace math
}  // namespace fastacd
