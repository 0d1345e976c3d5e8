// CPU implementations of effattn::fwd and effattn::bwd: read the tensors into
// params (csrc/host_params.h), allocate outputs and scratch, dispatch on dtype
// to the tiled kernels (attention_fwd.h, attention_bwd.h).
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include "../host_params.h"
#include "attention_bwd.h"
#include "attention_fwd.h"

namespace effattn {
namespace {

using torch::headeronly::BFloat16;
using torch::headeronly::Half;

template <template <typename, typename> class Kernel, typename Params>
void dispatch_dtype(ScalarType dtype, const Params& p) {
  switch (dtype) {
    case ScalarType::Float: Kernel<float, float>::run(p); break;
    case ScalarType::Double: Kernel<double, double>::run(p); break;
    case ScalarType::BFloat16: Kernel<BFloat16, float>::run(p); break;
    case ScalarType::Half: Kernel<Half, float>::run(p); break;
    default:
      STD_TORCH_CHECK(false, "effattn (cpu): unsupported dtype; expected float32, "
                             "float64, bfloat16 or float16");
  }
}

template <typename scalar_t, typename acc_t>
struct Fwd {
  static void run(const FwdParams& p) { cpu::attention_fwd<scalar_t, acc_t>(p); }
};
template <typename scalar_t, typename acc_t>
struct Bwd {
  static void run(const BwdParams& p) { cpu::attention_bwd<scalar_t, acc_t>(p); }
};

std::tuple<Tensor, Tensor> fwd_cpu(Tensor q, Tensor k, Tensor v,
                                   std::optional<Tensor> mask,
                                   std::optional<Tensor> key_lengths,
                                   std::optional<Tensor> query_lengths, double scale,
                                   bool is_causal, int64_t window_left,
                                   int64_t window_right) {
  FwdCall call = make_fwd_call(q, k, v, mask, key_lengths, query_lengths, scale, is_causal,
                               window_left, window_right);
  dispatch_dtype<Fwd>(q.scalar_type(), call.params);
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
  const int64_t n_blocks = (p.seqlen_k + cpu::kBlockN - 1) / cpu::kBlockN;
  const int64_t items = std::max<int64_t>(1, p.batch * p.heads_kv);
  p.num_key_splits = items >= 2 * threads
                         ? 1
                         : std::max<int64_t>(1, std::min(n_blocks, (2 * threads + items - 1) / items));

  const ScalarType acc = accum_dtype(q.scalar_type());
  Tensor delta = torch::stable::new_empty(q, {p.batch, p.heads_q, p.seqlen_q}, acc);
  Tensor dq_accum = torch::stable::new_zeros(
      q, {p.num_key_splits, p.batch, p.heads_q, p.seqlen_q, p.head_dim}, acc);
  p.delta = delta.mutable_data_ptr();
  p.dq_accum = dq_accum.mutable_data_ptr();
  dispatch_dtype<Bwd>(q.scalar_type(), p);
  return {call.dq, call.dk, call.dv};
}

}  // namespace
}  // namespace effattn

STABLE_TORCH_LIBRARY_IMPL(effattn, CPU, m) {
  m.impl("fwd", TORCH_BOX(&effattn::fwd_cpu));
  m.impl("bwd", TORCH_BOX(&effattn::bwd_cpu));
}
