// The one place effattn's ops are declared. Each device registers its
// implementation with STABLE_TORCH_LIBRARY_IMPL in its own file
// (csrc/cpu/attention_cpu.cpp, csrc/cuda/...); Python adds the fake kernels and
// autograd (effattn/ops.py).
//
// Tensors are in the canonical layout (batch, heads, seq, dim), last dim
// contiguous, any other strides. mask is a broadcast view of
// (batch, heads_q, seq_q, seq_k); lengths are int64 of shape (batch,);
// query i sees key j iff i - window_left <= j <= i + window_right (the spec's
// band: causal masking folded in; None for an unbounded side, any int
// otherwise); lse is float32 (float64 for float64). variant is the kernel
// variant the Python backend chose (effattn/config.py): for the CPU, the ISA
// (csrc/cpu/kernels.h, Isa); for CUDA, csrc/cuda/api.h's Variant bits.
// effattn/ops.py states this contract for every op family.
#include <torch/csrc/stable/library.h>

STABLE_TORCH_LIBRARY(effattn, m) {
  m.def(
      "fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? key_lengths, "
      "Tensor? query_lengths, float scale, int? window_left, int? window_right, "
      "int variant) -> (Tensor out, Tensor lse)");
  // fwd and the attention statistics of each query row (effattn.diagnostics.attention_stats):
  // stats (2, batch, heads_q, seq_q) in lse's dtype, [0] the entropy of the row's attention
  // weights (nats), [1] its largest weight; 0 and 0 for a row that sees no key. CPU only.
  m.def(
      "fwd_stats(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? key_lengths, "
      "Tensor? query_lengths, float scale, int? window_left, int? window_right, "
      "int variant) -> (Tensor out, Tensor lse, Tensor stats)");
  m.def(
      "bwd(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, "
      "Tensor out, Tensor lse, Tensor? mask, Tensor? key_lengths, "
      "Tensor? query_lengths, float scale, int? window_left, int? window_right, "
      "int variant) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  // The CPU kernel variants this build holds and this CPU runs: bit i for the
  // variant of Isa value i (csrc/cpu/kernels.h).
  m.def("cpu_isas() -> int");
  // Which CUDA kernels this build holds: 0 when built without CUDA, else bit i
  // for the i-th kernel head dim (csrc/cuda/api.h, compiled_head_dims), and
  // bit 16 when the Hopper kernels (sm_90a) are compiled.
  m.def("cuda_variants() -> int");
  // The shared memory (bytes) of the CUDA backward's Large tile set at a compiled
  // kernel head dim (0: none): the cuda backend takes Large where it fits the GPU.
  m.def("cuda_bwd_large_smem(int head_dim) -> int");
}

#ifndef EFFATTN_WITH_CUDA
namespace {
int64_t no_cuda_variants() { return 0; }
int64_t no_cuda_bwd_large_smem(int64_t) { return 0; }
}  // namespace

STABLE_TORCH_LIBRARY_IMPL(effattn, CompositeExplicitAutograd, m) {
  m.impl("cuda_variants", TORCH_BOX(&no_cuda_variants));
  m.impl("cuda_bwd_large_smem", TORCH_BOX(&no_cuda_bwd_large_smem));
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
