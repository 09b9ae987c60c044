// fastacd._C: every operator schema of the extension, in one place (style.md item 1).
// The implementations register per dispatch key: csrc/cpu/*.cpp for CPU, kernels/*.cu
// for CUDA. Fake (meta) kernels and autograd are registered from Python
// (fastacd/ops.py), so the ops work under torch.compile and are differentiable.
#ifndef FASTACD_NO_PYTHON
#include <Python.h>
#endif
#include <torch/library.h>

#include "csrc/buffer_reuse.h"

TORCH_LIBRARY(fastacd, m) {
  // Conv/linear bias split (+ optional ReLU): rel_pre (M,C,*S), total_pre (1,C,*S), bias (C,).
  // tol: None or total's shape; a part whose magnitude is below it counts as zero in the
  // split ratio (numerical zero, design.md section 9). Every split op takes it last.
  m.def("bias_split(Tensor rel_pre, Tensor total_pre, Tensor bias, bool relu=False, Tensor? tol=None) -> Tensor");
  // The same written into rel_pre (inference: no autograd). On the CPU a fresh (M,C,*S)
  // output costs its page faults, about as much as the split itself (docs/kernels.md).
  m.def("bias_split_(Tensor(a!) rel_pre, Tensor total_pre, Tensor bias, bool relu=False, Tensor? tol=None)"
        " -> Tensor(a!)");
  // The windowed pass's split, CPU: rel_pre (M,C,h,w) written in place against total_pre (and
  // tol) (1,C,H,W) read at each candidate's window corner oy, ox (M,) int64 (inside the map),
  // instead of (M,C,h,w) crops of them.
  m.def("bias_split_window_(Tensor(a!) rel_pre, Tensor total_pre, Tensor bias, Tensor oy, Tensor ox,"
        " bool relu=False, Tensor? tol=None) -> Tensor(a!)");
  m.def("bias_split_backward(Tensor grad, Tensor rel_pre, Tensor total_pre, Tensor bias, bool relu,"
        " Tensor? tol=None) -> (Tensor, Tensor, Tensor)");
  // Eval batchnorm split (+ optional ReLU): rel (M,C,*S), total (1,C,*S), scale/shift (C,).
  m.def("bn_split(Tensor rel, Tensor total, Tensor scale, Tensor shift, bool relu=False, Tensor? tol=None)"
        " -> Tensor");
  // The same written into rel (inference: no autograd), for a relevant part that no later
  // step reads (the engine's conv outputs before a batchnorm).
  m.def("bn_split_(Tensor(a!) rel, Tensor total, Tensor scale, Tensor shift, bool relu=False,"
        " Tensor? tol=None) -> Tensor(a!)");
  m.def("bn_split_backward(Tensor grad, Tensor rel, Tensor total, Tensor scale, Tensor shift,"
        " bool relu, Tensor? tol=None) -> (Tensor, Tensor, Tensor, Tensor)");
  // Max-pool of M relevant maps at the shared argmax: rel (M,C,*S), indices (1,C,*So) int64.
  m.def("maxpool_gather(Tensor rel, Tensor indices) -> Tensor");
  m.def("maxpool_gather_backward(Tensor grad, Tensor indices, SymInt[] rel_shape) -> Tensor");
  // The windowed pass's gather (kernels/window_math.h): every candidate's map (the base
  // (1,C,H,W) outside its window win (M,C,wh,ww) at win_oy/win_ox (M,), zero beyond the map)
  // read over an h x w window at oy/ox (M,), or through a max-pool's indices (1,C,Ho,Wo).
  m.def("window_gather(Tensor base, Tensor? win, Tensor? win_oy, Tensor? win_ox, Tensor oy, Tensor ox,"
        " int h, int w, Tensor? indices=None) -> Tensor");
  // 3x3 stride-1 convolution (no bias) by Winograd F(2x2 or 4x4, 3x3), CPU: x (N,C,H,W), u (16 or 36,C,Co)
  // the transformed weights (fastacd.ops.winograd_weight), zero padding pad_h / pad_w.
  m.def("winograd_conv3x3(Tensor x, Tensor u, int pad_h, int pad_w) -> Tensor");
  // x (N,C,H,W) converted to dtype and moved between layouts in one pass, CPU: NCHW-contiguous
  // in, channels_last out (channels_last=True), or the reverse; float32 <-> bfloat16.
  m.def("transpose_cast(Tensor x, ScalarType dtype, bool channels_last) -> Tensor");
  // One LSTM step of CD for M masks: rel_gates (M,4H), total_gates (1,4H), bias (4H,),
  // out_gate (1,H), prev_rel_c (M,H), prev_total_c (1,H), in_phrase (M,) -> rel_c, rel_h (M,H).
  m.def("lstm_cd_cell(Tensor rel_gates, Tensor total_gates, Tensor bias, Tensor out_gate, Tensor prev_rel_c,"
        " Tensor prev_total_c, Tensor in_phrase, bool first_step) -> (Tensor, Tensor)");
  m.def("lstm_cd_cell_backward(Tensor grad_c, Tensor grad_h, Tensor rel_gates, Tensor total_gates, Tensor bias,"
        " Tensor out_gate, Tensor prev_rel_c, Tensor prev_total_c, Tensor in_phrase, bool first_step)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

#ifndef FASTACD_NO_PYTHON
// Build facts for fastacd.ops.build_info(), fixed at compile time by setup.py.
#ifndef FASTACD_CUDA_ARCHS
#define FASTACD_CUDA_ARCHS none
#endif
#define FASTACD_STR2(x) #x
#define FASTACD_STR(x) FASTACD_STR2(x)

// The CPU buffer reuse scope (csrc/buffer_reuse.h), for fastacd.ops.reuse_cpu_buffers.
static PyObject* py_buffer_reuse_enter(PyObject*, PyObject* arg) {
  const long long cap = PyLong_AsLongLong(arg);
  if (cap == -1 && PyErr_Occurred()) return nullptr;
  return PyBool_FromLong(fastacd::buffer_reuse_enter(cap));
}

static PyObject* py_buffer_reuse_exit(PyObject*, PyObject*) {
  fastacd::buffer_reuse_exit();
  Py_RETURN_NONE;
}

static PyObject* py_buffer_reuse_stats(PyObject*, PyObject*) {
  const fastacd::BufferReuseStats s = fastacd::buffer_reuse_stats();
  return Py_BuildValue("{s:L,s:L,s:L,s:L,s:L}", "open_scopes", (long long)s.open_scopes, "cached_bytes",
                       (long long)s.cached_bytes, "cached_blocks", (long long)s.cached_blocks, "hits",
                       (long long)s.hits, "misses", (long long)s.misses);
}

static PyMethodDef module_methods[] = {
    {"buffer_reuse_enter", py_buffer_reuse_enter, METH_O, "Open a CPU buffer reuse scope (cap in bytes)."},
    {"buffer_reuse_exit", py_buffer_reuse_exit, METH_NOARGS, "Close a CPU buffer reuse scope."},
    {"buffer_reuse_stats", py_buffer_reuse_stats, METH_NOARGS, "Counters of the CPU buffer reuse."},
    {nullptr, nullptr, 0, nullptr}};

// A plain Python module: importing fastacd._C loads this library, whose static
// initialisers register the ops with the dispatcher (no pybind11 needed).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, module_methods};
  PyObject* mod = PyModule_Create(&module_def);
  if (mod == nullptr) return nullptr;
#ifdef FASTACD_WITH_CUDA
  PyModule_AddIntConstant(mod, "with_cuda", 1);
#else
  PyModule_AddIntConstant(mod, "with_cuda", 0);
#endif
#ifdef _OPENMP
  PyModule_AddIntConstant(mod, "openmp", _OPENMP);
#else
  PyModule_AddIntConstant(mod, "openmp", 0);
#endif
  PyModule_AddStringConstant(mod, "cuda_archs", FASTACD_STR(FASTACD_CUDA_ARCHS));
  PyModule_AddStringConstant(mod, "cxx_compiler", __VERSION__);
  return mod;
}
#endif  // FASTACD_NO_PYTHON
