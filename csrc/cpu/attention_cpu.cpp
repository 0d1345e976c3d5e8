// CPU implementations of effattn::fwd, effattn::fwd_stats and effattn::bwd: read the tensors into
// params (csrc/host_params.h), allocate outputs and scratch, and run the
// kernel variant the caller chose (kernels.h): the op's `variant` argument is
// an Isa value, picked once by the cpu backend (effattn/backends/cpu.py, from
// effattn.config.cpu_isa). effattn::cpu_isas() says which variants this build
// holds and this CPU runs; a call for another one is an error, never a crash.
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

// Bit i: the variant of Isa value i is compiled into this build and runs here.
int64_t runnable_isas() {
  static const int64_t bits = [] {
    const int64_t best = static_cast<int64_t>(best_isa());
    int64_t b = 1;  // baseline: any CPU
#if EFFATTN_X86_VARIANTS
    for (Isa isa : {Isa::kAvx2, Isa::kAvx512})
      if (static_cast<int64_t>(isa) <= best) b |= int64_t(1) << static_cast<int64_t>(isa);
#if EFFATTN_CPU_AVX2_WIDE
    if (best >= static_cast<int64_t>(Isa::kAvx2)) b |= int64_t(1) << static_cast<int64_t>(Isa::kAvx2Wide);
#endif
#endif
    return b;
  }();
  return bits;
}

Isa checked_isa(int64_t variant) {
  const bool known = variant >= 0 && variant <= static_cast<int64_t>(Isa::kAvx2Wide);
  STD_TORCH_CHECK(known && (runnable_isas() >> variant & 1), "effattn (cpu): kernel variant ", variant,
                  " (", known ? isa_name(static_cast<Isa>(variant)) : "unknown",
                  ") is not in this build or does not run on this CPU");
  return static_cast<Isa>(variant);
}

// Each variant's entry points (kernels.h), by Isa value; a variant this build lacks has the
// baseline's (checked_isa never lets a call ask for one).
struct Kernels {
  void (*fwd)(ScalarType, const FwdParams&);
  void (*fwd_stats)(ScalarType, const FwdParams&, void*);  // the forward with attention statistics
  void (*bwd)(ScalarType, const BwdParams&);
};
#define EFFATTN_KERNELS_OF(ns) \
  Kernels { &ns::attention_fwd, &ns::attention_fwd_stats, &ns::attention_bwd }

const Kernels& kernels(Isa isa) {
  static const Kernels table[] = {
      EFFATTN_KERNELS_OF(baseline),  // Isa::kBaseline
#if EFFATTN_X86_VARIANTS
      EFFATTN_KERNELS_OF(avx2),    // Isa::kAvx2
      EFFATTN_KERNELS_OF(avx512),  // Isa::kAvx512
#else
      EFFATTN_KERNELS_OF(baseline), EFFATTN_KERNELS_OF(baseline),
#endif
#if EFFATTN_X86_VARIANTS && EFFATTN_CPU_AVX2_WIDE
      EFFATTN_KERNELS_OF(avx2_wide),  // Isa::kAvx2Wide
#else
      EFFATTN_KERNELS_OF(baseline),
#endif
  };
  return table[static_cast<int64_t>(isa)];
}
#undef EFFATTN_KERNELS_OF

}  // namespace
}  // namespace cpu

namespace {

std::tuple<Tensor, Tensor> fwd_cpu(Tensor q, Tensor k, Tensor v, std::optional<Tensor> mask,
                                   std::optional<Tensor> key_lengths,
                                   std::optional<Tensor> query_lengths, double scale,
                                   WindowSide window_left, WindowSide window_right, int64_t variant) {
  const cpu::Isa isa = cpu::checked_isa(variant);
  FwdCall call = make_fwd_call(q, k, v, mask, key_lengths, query_lengths, scale, window_left,
                               window_right);
  cpu::kernels(isa).fwd(q.scalar_type(), call.params);
  return {call.out, call.lse};
}

// fwd, plus the attention statistics of every query row: stats (2, B, Hq, Lq) contiguous, in
// the accumulator type, [0] the entropy of the row's weights (nats), [1] its largest weight.
std::tuple<Tensor, Tensor, Tensor> fwd_stats_cpu(Tensor q, Tensor k, Tensor v, std::optional<Tensor> mask,
                                                 std::optional<Tensor> key_lengths,
                                                 std::optional<Tensor> query_lengths, double scale,
                                                 WindowSide window_left, WindowSide window_right,
                                                 int64_t variant) {
  const cpu::Isa isa = cpu::checked_isa(variant);
  FwdCall call = make_fwd_call(q, k, v, mask, key_lengths, query_lengths, scale, window_left,
                               window_right);
  const FwdParams& p = call.params;
  Tensor stats = torch::stable::new_empty(q, {2, p.batch, p.heads_q, p.seqlen_q},
                                          accum_dtype(q.scalar_type()));
  cpu::kernels(isa).fwd_stats(q.scalar_type(), p, stats.mutable_data_ptr());
  return {call.out, call.lse, stats};
}

std::tuple<Tensor, Tensor, Tensor> bwd_cpu(
    Tensor grad_out, std::optional<Tensor> grad_lse, Tensor q, Tensor k, Tensor v,
    Tensor out, Tensor lse, std::optional<Tensor> mask,
    std::optional<Tensor> key_lengths, std::optional<Tensor> query_lengths, double scale,
    WindowSide window_left, WindowSide window_right, int64_t variant) {
  const cpu::Isa isa = cpu::checked_isa(variant);
  BwdCall call = make_bwd_call(grad_out, grad_lse, q, k, v, out, lse, mask, key_lengths,
                               query_lengths, scale, window_left, window_right);
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
  cpu::kernels(isa).bwd(q.scalar_type(), p);
  return {call.dq, call.dk, call.dv};
}

int64_t cpu_isas() { return cpu::runnable_isas(); }

}  // namespace
}  // namespace effattn

STABLE_TORCH_LIBRARY_IMPL(effattn, CPU, m) {
  m.impl("fwd", TORCH_BOX(&effattn::fwd_cpu));
  m.impl("fwd_stats", TORCH_BOX(&effattn::fwd_stats_cpu));
  m.impl("bwd", TORCH_BOX(&effattn::bwd_cpu));
}

STABLE_TORCH_LIBRARY_IMPL(effattn, CompositeExplicitAutograd, m) {
  m.impl("cpu_isas", TORCH_BOX(&effattn::cpu_isas));
}
