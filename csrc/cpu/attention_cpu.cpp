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
  FwdParams p = make_fwd_params(q, k, v, mask, key_lengths, query_lengths, scale,
                                is_causal, window_left, window_right);
  Tensor out = empty_in_layout_of(q, {p.batch, p.heads_q, p.seqlen_q, p.head_dim_v},
                                  q.scalar_type());
  Tensor lse = torch::stable::new_empty(q, {p.batch, p.heads_q, p.seqlen_q},
                                        accum_dtype(q.scalar_type()));
  set_out(p, out, lse);
  dispatch_dtype<Fwd>(q.scalar_type(), p);
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> bwd_cpu(
    Tensor grad_out, std::optional<Tensor> grad_lse, Tensor q, Tensor k, Tensor v,
    Tensor out, Tensor lse, std::optional<Tensor> mask,
    std::optional<Tensor> key_lengths, std::optional<Tensor> query_lengths,
    double scale, bool is_causal, int64_t window_left, int64_t window_right) {
  BwdParams p;
  static_cast<FwdParams&>(p) = make_fwd_params(q, k, v, mask, key_lengths, query_lengths,
                                               scale, is_causal, window_left, window_right);
  const ScalarType acc = accum_dtype(q.scalar_type());
  check_attention_tensor(grad_out, "grad_out");
  check_attention_tensor(out, "out");
  for (int d = 0; d < 4; ++d) {
    const int64_t want[4] = {p.batch, p.heads_q, p.seqlen_q, p.head_dim_v};
    check_same(out.size(d), want[d], "out", d, "shape of the forward output");
    check_same(grad_out.size(d), want[d], "grad_out", d, "shape of the forward output");
  }
  STD_TORCH_CHECK(lse.scalar_type() == acc && lse.is_contiguous() && lse.dim() == 3,
                  "effattn: lse must be the forward's contiguous (B, H, L) accumulator-type tensor");
  set_out(p, out, lse);
  p.dout = grad_out.const_data_ptr();
  p.do_batch_stride = grad_out.stride(0);
  p.do_head_stride = grad_out.stride(1);
  p.do_row_stride = grad_out.stride(2);
  std::optional<Tensor> dlse;
  if (grad_lse.has_value()) {
    dlse = torch::stable::contiguous(torch::stable::to(*grad_lse, acc));
    p.dlse = dlse->const_data_ptr();
  }

  Tensor dq = empty_in_layout_of(q, {p.batch, p.heads_q, p.seqlen_q, p.head_dim}, q.scalar_type());
  Tensor dk = empty_in_layout_of(k, {p.batch, p.heads_kv, p.seqlen_k, p.head_dim}, q.scalar_type());
  Tensor dv = empty_in_layout_of(v, {p.batch, p.heads_kv, p.seqlen_k, p.head_dim_v}, q.scalar_type());
  p.dq = dq.mutable_data_ptr();
  p.dk = dk.mutable_data_ptr();
  p.dv = dv.mutable_data_ptr();
  p.dq_batch_stride = dq.stride(0); p.dq_head_stride = dq.stride(1); p.dq_row_stride = dq.stride(2);
  p.dk_batch_stride = dk.stride(0); p.dk_head_stride = dk.stride(1); p.dk_row_stride = dk.stride(2);
  p.dv_batch_stride = dv.stride(0); p.dv_head_stride = dv.stride(1); p.dv_row_stride = dv.stride(2);

  // Split the keys when batch x kv-heads alone cannot keep every thread busy
  // (2 items per thread for balance); each split costs one dQ accumulator.
  const int64_t threads = static_cast<int64_t>(torch::stable::get_num_threads());
  const int64_t n_blocks = (p.seqlen_k + cpu::kBlockN - 1) / cpu::kBlockN;
  const int64_t items = std::max<int64_t>(1, p.batch * p.heads_kv);
  p.num_key_splits = std::max<int64_t>(1, std::min(n_blocks, (2 * threads + items - 1) / items));
  if (items >= 2 * threads) p.num_key_splits = 1;

  Tensor delta = torch::stable::new_empty(q, {p.batch, p.heads_q, p.seqlen_q}, acc);
  Tensor dq_accum = torch::stable::new_zeros(
      q, {p.num_key_splits, p.batch, p.heads_q, p.seqlen_q, p.head_dim}, acc);
  p.delta = delta.mutable_data_ptr();
  p.dq_accum = dq_accum.mutable_data_ptr();
  dispatch_dtype<Bwd>(q.scalar_type(), p);
  return {dq, dk, dv};
}

}  // namespace
}  // namespace effattn

STABLE_TORCH_LIBRARY_IMPL(effattn, CPU, m) {
  m.impl("fwd", TORCH_BOX(&effattn::fwd_cpu));
  m.impl("bwd", TORCH_BOX(&effattn::bwd_cpu));
}
