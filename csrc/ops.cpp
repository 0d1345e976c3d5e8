// The one place effattn's ops are declared. Each device registers its
// implementation with STABLE_TORCH_LIBRARY_IMPL in its own file
// (csrc/cpu/attention_cpu.cpp, csrc/cuda/...); Python adds the fake kernels and
// autograd (effattn/ops.py).
//
// Tensors are in the canonical layout (batch, heads, seq, dim), last dim
// contiguous, any other strides. mask is a broadcast view of
// (batch, heads_q, seq_q, seq_k); lengths are int64 of shape (batch,);
// window sides are -1 for unbounded; lse is float32 (float64 for float64).
#include <torch/csrc/stable/library.h>

STABLE_TORCH_LIBRARY(effattn, m) {
  m.def(
      "fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? key_lengths, "
      "Tensor? query_lengths, float scale, bool is_causal, int window_left, "
      "int window_right) -> (Tensor out, Tensor lse)");
  m.def(
      "bwd(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, "
      "Tensor out, Tensor lse, Tensor? mask, Tensor? key_lengths, "
      "Tensor? query_lengths, float scale, bool is_causal, int window_left, "
      "int window_right) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  // Which CPU kernel variant runs here: 0 baseline, 1 avx2, 2 avx512, 3 avx2_wide
  // (csrc/cpu/kernels.h; EFFATTN_CPU_ISA in the environment narrows it).
  m.def("cpu_isa() -> int");
  // Which CUDA kernels this build holds: 0 when built without CUDA, else bit i
  // for the i-th kernel head dim (csrc/cuda/api.h, compiled_head_dims), and
  // bit 16 when the Hopper kernels (sm_90a) are compiled.
  m.def("cuda_variants() -> int");
}

#ifndef EFFATTN_WITH_CUDA
namespace {
int64_t no_cuda_variants() { return 0; }
}  // namespace

STABLE_TORCH_LIBRARY_IMPL(effattn, CompositeExplicitAutograd, m) {
  m.impl("cuda_variants", TORCH_BOX(&no_cuda_variants));
}
#endif

#ifdef EFFATTN_PYTHON_MODULE
// effattn._C is only a loader: importing it runs the registrations above.
// No pybind11, no Python API surface: an empty module under Py_LIMITED_API.
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr,
                               nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
#endif
