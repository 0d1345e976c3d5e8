// CPU implementations of effattn::fwd and effattn::bwd: read the tensors into
// params (csrc/host_params.h), allocate outputs and scratch, and run the
// kernel variant for the widest instruction set this CPU has (kernels.h).
//
// EFFATTN_CPU_ISA=baseline|avx2|avx512 in the environment asks for a
// narrower variant (tests run each one; avx2_wide is a test-only one, see
// kernels_avx2_wide.cpp); asking for one the CPU lacks is an error, never a
// crash. effattn::cpu_isa() says which variant runs (Isa's value).
#include <cstdlib>
#include <cstring>

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include "../host_params.h"
#include "kernels.h"

namespace effattn {
namespace cpu {

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx2Wide: return "avx2_wide";
    default: return "baseline";
  }
}

namespace {

// The widest variant this CPU (and its OS, which must save the wider
// registers: __builtin_cpu_supports checks that too) can run.
Isa best_isa() {
#if EFFATTN_X86_VARIANTS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c"))
    return Isa::kAvx2;
#endif
  return Isa::kBaseline;
}

bool runs_here(Isa isa, Isa best) {
  if (isa == Isa::kAvx2Wide) isa = Isa::kAvx2;  // needs what avx2 needs
  return static_cast<int64_t>(isa) <= static_cast<int64_t>(best);
}

// The variant to run: the best one, or the one EFFATTN_CPU_ISA asks for
// (read on every call, so tests can switch between calls; it costs ~100 ns).
Isa selected_isa() {
  static const Isa best = best_isa();
  const char* want = std::getenv("EFFATTN_CPU_ISA");
  if (want == nullptr || *want == '\0' || std::strcmp(want, "auto") == 0) return best;
  for (Isa isa : {Isa::kBaseline, Isa::kAvx2, Isa::kAvx512, Isa::kAvx2Wide}) {
    if (std::strcmp(want, isa_name(isa)) == 0) {
      STD_TORCH_CHECK(runs_here(isa, best), "effattn (cpu): EFFATTN_CPU_ISA=", want,
                      " but this CPU supports at most ", isa_name(best));
      return isa;
    }
  }
  STD_TORCH_CHECK(false, "effattn (cpu): EFFATTN_CPU_ISA=", want,
                  " is not one of auto, baseline, avx2, avx512, avx2_wide");
  return best;
}

void run_fwd(ScalarType dtype, const FwdParams& p) {
  switch (selected_isa()) {
#if EFFATTN_X86_VARIANTS
    case Isa::kAvx512: avx512::attention_fwd(dtype, p); break;
    case Isa::kAvx2: avx2::attention_fwd(dtype, p); break;
    case Isa::kAvx2Wide: avx2_wide::attention_fwd(dtype, p); break;
#endif
    default: baseline::attention_fwd(dtype, p); break;
  }
}

void run_bwd(ScalarType dtype, const BwdParams& p) {
  switch (selected_isa()) {
#if EFFATTN_X86_VARIANTS
    case Isa::kAvx512: avx512::attention_bwd(dtype, p); break;
    case Isa::kAvx2: avx2::attention_bwd(dtype, p); break;
    case Isa::kAvx2Wide: avx2_wide::attention_bwd(dtype, p); break;
#endif
    default: baseline::attention_bwd(dtype, p); break;
  }
}

}  // namespace
}  // namespace cpu

namespace {

std::tuple<Tensor, Tensor> fwd_cpu(Tensor q, Tensor k, Tensor v,
                                   std::optional<Tensor> mask,
                                   std::optional<Tensor> key_lengths,
                                   std::optional<Tensor> query_lengths, double scale,
                                   bool is_causal, int64_t window_left,
                                   int64_t window_right) {
  FwdCall call = make_fwd_call(q, k, v, mask, key_lengths, query_lengths, scale, is_causal,
                               window_left, window_right);
  cpu::run_fwd(q.scalar_type(), call.params);
  return {call.out, call.lse};
}

std::tuple<Tensor, Tensor, Tensor> bwd_cpu(
    Tensor grad_out, std::optional<Tensor> grad_lse, Tensor q, Tensor k, Tensor v,
    Tensor out, Tensor lse, std::optional<Tensor> mask,
    std::optional<Tensor> key_lengths, std::optional<Tensor> query_lengths,
    double scale, bool is_causal, int64_t window_left, int64_t window_right) {
  BwdCall call = make_bwd_call(grad_out, grad_lse, q, k, v, out, lse, mask, key_lengths,
                               query_lengths, scale, is_causal, window_left, window_right);
  BwdParams& p = call.params;

  // Split the keys when batch x kv-heads alone cannot keep every thread busy
  // (2 items per thread for balance); each split costs one dQ accumulator.
  const int64_t threads = static_cast<int64_t>(torch::stable::get_num_threads());
  const int64_t n_blocks = (p.seqlen_k + cpu::kBwdBlockN - 1) / cpu::kBwdBlockN;
  const int64_t items = std::max<int64_t>(1, p.batch * p.heads_kv);
  p.num_key_splits = items >= 2 * threads
                         ? 1
                         : std::max<int64_t>(1, std::min(n_blocks, (2 * threads + items - 1) / items));

  const ScalarType acc = accum_dtype(q.scalar_type());
  Tensor delta = torch::stable::new_empty(q, {p.batch, p.heads_q, p.seqlen_q}, acc);
  Tensor dq_accum = torch::stable::new_zeros(
      q, {p.num_key_splits, p.batch, p.heads_q, p.seqlen_q, cpu::padded(p.head_dim)}, acc);
  p.delta = delta.mutable_data_ptr();
  p.dq_accum = dq_accum.mutable_data_ptr();
  cpu::run_bwd(q.scalar_type(), p);
  return {call.dq, call.dk, call.dv};
}

int64_t cpu_isa() { return static_cast<int64_t>(cpu::selected_isa()); }

}  // namespace
}  // namespace effattn

STABLE_TORCH_LIBRARY_IMPL(effattn, CPU, m) {
  m.impl("fwd", TORCH_BOX(&effattn::fwd_cpu));
  m.impl("bwd", TORCH_BOX(&effattn::bwd_cpu));
}

STABLE_TORCH_LIBRARY_IMPL(effattn, CompositeExplicitAutograd, m) {
  m.impl("cpu_isa", TORCH_BOX(&effattn::cpu_isa));
}
