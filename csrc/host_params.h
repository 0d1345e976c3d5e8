// Host side, shared by every device: checks the op's tensors (the invariants
// effattn/spec.py establishes; the ops may also be called directly through
// torch.ops.effattn) and fills the plain params structs from them, allocating
// outputs in the memory layout of the input they mirror.
//
// Uses only PyTorch's stable ABI (torch/csrc/stable), so one abi3 wheel serves
// every torch >= 2.10.
#pragma once

#include <algorithm>
#include <array>
#include <optional>
#include <string>

#include <torch/csrc/stable/device.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include "params.h"

namespace effattn {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

inline ScalarType accum_dtype(ScalarType t) {
  return t == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
}

inline void check_attention_tensor(const Tensor& t, const char* name) {
  STD_TORCH_CHECK(t.dim() == 4, "effattn: ", name,
                  " must be 4-D (batch, heads, seq, dim), got ", t.dim(), " dims");
  // (an empty tensor is never read: any strides, e.g. the all-zero ones of the
  // gradient of out.sum() for an empty out)
  STD_TORCH_CHECK(t.size(3) <= 1 || t.stride(3) == 1 || t.numel() == 0, "effattn: ", name,
                  " must have a contiguous last dimension (stride 1), got stride ",
                  t.stride(3));
}

inline void check_same(int64_t got, int64_t want, const char* name, int dim,
                       const char* what) {
  STD_TORCH_CHECK(got == want, "effattn: ", name, ".size(", dim, ") = ", got,
                  " but expected ", want, " (", what, ")");
}

inline std::string device_name(const torch::stable::Device& d) {
  using torch::headeronly::DeviceType;
  std::string name = d.type() == DeviceType::CPU    ? "cpu"
                     : d.type() == DeviceType::CUDA ? "cuda"
                     : d.type() == DeviceType::Meta ? "meta"
                                                    : "device type " + std::to_string(int(d.type()));
  return d.has_index() && d.type() != DeviceType::CPU ? name + ":" + std::to_string(int(d.index()))
                                                       : name;
}

// Every tensor of a call lives where query does: the kernel for the call's
// device reads them all through raw pointers (a host pointer in a CUDA kernel
// would be an illegal address, not an error).
inline void check_device(const Tensor& t, const char* name, const Tensor& q) {
  STD_TORCH_CHECK(t.device() == q.device(), "effattn: ", name, " is on ", device_name(t.device()),
                  " but query is on ", device_name(q.device()));
}
inline void check_device(const std::optional<Tensor>& t, const char* name, const Tensor& q) {
  if (t.has_value()) check_device(*t, name, q);
}

// A (batch, heads_q, seqlen_q) per-row tensor of the forward (lse, grad_lse).
inline void check_rows(const Tensor& t, const char* name, const FwdParams& p) {
  STD_TORCH_CHECK(t.dim() == 3, "effattn: ", name, " must be 3-D (batch, heads, seq), got ", t.dim(),
                  " dims");
  const int64_t want[3] = {p.batch, p.heads_q, p.seqlen_q};
  for (int d = 0; d < 3; ++d) check_same(t.size(d), want[d], name, d, "rows of the forward output");
}

// Outputs follow the layout of the input they mirror: dims 0..2 in the
// input's stride order, last dim contiguous. Size-1 dims (whose strides mean
// nothing) go outermost, so the rule does not depend on their strides.
// effattn/ops.py implements the same rule for the fake (meta) kernels; the
// strides are those of a contiguous tensor in that dim order (size 0 counted
// as 1, as torch counts it), so the two agree exactly. One allocation through
// the C shim, no view op: this runs on every call.
inline Tensor empty_in_layout_of(const Tensor& like, std::array<int64_t, 4> sizes,
                                 ScalarType dtype) {
  std::array<int64_t, 3> order = {0, 1, 2};
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    const bool a1 = like.size(a) <= 1, b1 = like.size(b) <= 1;
    if (a1 != b1) return a1;  // size-1 dims first (outermost)
    if (a1) return false;     // keep natural order among size-1 dims
    return like.stride(a) > like.stride(b);
  });
  std::array<int64_t, 4> strides = {0, 0, 0, 1};
  int64_t extent = std::max<int64_t>(sizes[3], 1);
  for (int64_t i = 2; i >= 0; --i) {  // innermost of dims 0..2 first
    strides[order[i]] = extent;
    extent *= std::max<int64_t>(sizes[order[i]], 1);
  }
  int32_t device_type = 0, device_index = 0;
  STD_TORCH_CHECK(aoti_torch_get_device_type(like.get(), &device_type) == AOTI_TORCH_SUCCESS &&
                      aoti_torch_get_device_index(like.get(), &device_index) == AOTI_TORCH_SUCCESS,
                  "effattn: could not read a tensor's device");
  const int32_t dtype_code = torch::stable::detail::to<int32_t>(torch::stable::detail::from(dtype));
  AtenTensorHandle out = nullptr;
  STD_TORCH_CHECK(aoti_torch_empty_strided(4, sizes.data(), strides.data(), dtype_code, device_type,
                                           device_index, &out) == AOTI_TORCH_SUCCESS,
                  "effattn: could not allocate an output tensor");
  return Tensor(out);
}

inline RowStrides row_strides(const Tensor& t) {
  return RowStrides{t.stride(0), t.stride(1), t.stride(2)};
}

inline const int64_t* lengths_ptr(const std::optional<Tensor>& t, const char* name,
                                  int64_t batch, int64_t max_len) {
  if (!t.has_value()) return nullptr;
  STD_TORCH_CHECK(t->scalar_type() == ScalarType::Long, "effattn: ", name,
                  " must be int64 here (effattn.attention converts it)");
  STD_TORCH_CHECK(t->dim() == 1 && t->size(0) == batch, "effattn: ", name,
                  " must have shape (", batch, ",)");
  STD_TORCH_CHECK(t->is_contiguous(), "effattn: ", name, " must be contiguous");
  const int64_t* ptr = t->const_data_ptr<int64_t>();
  if (!t->is_cuda()) {  // values are readable on the host: check them
    for (int64_t b = 0; b < batch; ++b)
      STD_TORCH_CHECK(ptr[b] >= 0 && ptr[b] <= max_len, "effattn: ", name, "[", b,
                      "] = ", ptr[b], " is outside [0, ", max_len, "]");
  }
  return ptr;
}

// Fills everything of FwdParams except the output pointers.
// The ops' window sides: the spec's band, None for an unbounded side, any
// int otherwise (|side| beyond the sequence lengths means the same as open).
using WindowSide = std::optional<int64_t>;

inline int64_t window_side(const WindowSide& side) {
  if (!side.has_value()) return kUnbounded;
  return std::max(-kUnbounded, std::min(*side, kUnbounded));
}

inline FwdParams make_fwd_params(const Tensor& q, const Tensor& k, const Tensor& v,
                                 const std::optional<Tensor>& mask,
                                 const std::optional<Tensor>& key_lengths,
                                 const std::optional<Tensor>& query_lengths, double scale,
                                 const WindowSide& window_left, const WindowSide& window_right) {
  check_attention_tensor(q, "query");
  check_attention_tensor(k, "key");
  check_attention_tensor(v, "value");
  STD_TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                  "effattn: query, key and value must have the same dtype");
  check_device(k, "key", q);
  check_device(v, "value", q);
  check_device(mask, "attn_mask", q);
  check_device(key_lengths, "key_lengths", q);
  check_device(query_lengths, "query_lengths", q);
  FwdParams p;
  p.batch = q.size(0);
  p.heads_q = q.size(1);
  p.heads_kv = k.size(1);
  p.seqlen_q = q.size(2);
  p.seqlen_k = k.size(2);
  p.head_dim = q.size(3);
  p.head_dim_v = v.size(3);
  check_same(k.size(0), p.batch, "key", 0, "batch of query");
  check_same(v.size(0), p.batch, "value", 0, "batch of query");
  check_same(v.size(1), p.heads_kv, "value", 1, "heads of key");
  check_same(v.size(2), p.seqlen_k, "value", 2, "sequence length of key");
  check_same(k.size(3), p.head_dim, "key", 3, "head dim of query");
  // (no heads at all is an empty call, as no queries is)
  STD_TORCH_CHECK(p.heads_kv > 0 ? p.heads_q % p.heads_kv == 0 : p.heads_q == 0,
                  "effattn: query heads (", p.heads_q,
                  ") must be a multiple of key/value heads (", p.heads_kv, ")");

  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  p.q_strides = row_strides(q);
  p.k_strides = row_strides(k);
  p.v_strides = row_strides(v);

  if (mask.has_value()) {
    const Tensor& m = *mask;
    STD_TORCH_CHECK(m.dim() == 4, "effattn: attn_mask must be a 4-D broadcast view here");
    check_same(m.size(0), p.batch, "attn_mask", 0, "batch");
    check_same(m.size(1), p.heads_q, "attn_mask", 1, "query heads");
    check_same(m.size(2), p.seqlen_q, "attn_mask", 2, "query length");
    check_same(m.size(3), p.seqlen_k, "attn_mask", 3, "key length");
    if (m.scalar_type() == ScalarType::Bool) {
      p.mask_kind = MaskKind::kBool;
    } else if (m.scalar_type() == q.scalar_type()) {
      p.mask_kind = MaskKind::kSameAsQ;
    } else {
      STD_TORCH_CHECK(m.scalar_type() == ScalarType::Float,
                      "effattn: attn_mask must be bool, float32 or the dtype of query");
      p.mask_kind = MaskKind::kFloat32;
    }
    p.mask = m.const_data_ptr();
    p.mask_batch_stride = m.stride(0); p.mask_head_stride = m.stride(1);
    p.mask_row_stride = m.stride(2); p.mask_col_stride = m.stride(3);
  }
  p.key_lengths = lengths_ptr(key_lengths, "key_lengths", p.batch, p.seqlen_k);
  p.query_lengths = lengths_ptr(query_lengths, "query_lengths", p.batch, p.seqlen_q);

  p.scale = scale;
  p.window_left = window_side(window_left);
  p.window_right = window_side(window_right);
  return p;
}

// The forward's outputs: out in the layout of q, lse (B, Hq, Lq) contiguous.
struct FwdCall {
  FwdParams params;
  Tensor out, lse;
};

inline FwdCall make_fwd_call(const Tensor& q, const Tensor& k, const Tensor& v,
                             const std::optional<Tensor>& mask,
                             const std::optional<Tensor>& key_lengths,
                             const std::optional<Tensor>& query_lengths, double scale,
                             const WindowSide& window_left, const WindowSide& window_right) {
  FwdParams p = make_fwd_params(q, k, v, mask, key_lengths, query_lengths, scale, window_left,
                                window_right);
  Tensor out = empty_in_layout_of(q, {p.batch, p.heads_q, p.seqlen_q, p.head_dim_v},
                                  q.scalar_type());
  Tensor lse = torch::stable::new_empty(q, {p.batch, p.heads_q, p.seqlen_q},
                                        accum_dtype(q.scalar_type()));
  p.out = out.mutable_data_ptr();
  p.lse = lse.mutable_data_ptr();
  p.o_strides = row_strides(out);
  return {p, out, lse};
}

// The backward's inputs checked and its gradients allocated (each in the
// layout of its input). Scratch (delta, dQ accumulator) is the device's own.
struct BwdCall {
  BwdParams params;
  Tensor dq, dk, dv;
  std::optional<Tensor> dlse;  // grad_lse converted, kept alive for the kernel
};

inline BwdCall make_bwd_call(const Tensor& grad_out, const std::optional<Tensor>& grad_lse,
                             const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                             const Tensor& lse, const std::optional<Tensor>& mask,
                             const std::optional<Tensor>& key_lengths,
                             const std::optional<Tensor>& query_lengths, double scale,
                             const WindowSide& window_left, const WindowSide& window_right) {
  BwdParams p;
  static_cast<FwdParams&>(p) = make_fwd_params(q, k, v, mask, key_lengths, query_lengths, scale,
                                               window_left, window_right);
  const ScalarType acc = accum_dtype(q.scalar_type());
  check_attention_tensor(grad_out, "grad_out");
  check_attention_tensor(out, "out");
  check_device(grad_out, "grad_out", q);
  check_device(out, "out", q);
  check_device(lse, "lse", q);
  check_device(grad_lse, "grad_lse", q);
  const int64_t want[4] = {p.batch, p.heads_q, p.seqlen_q, p.head_dim_v};
  for (int d = 0; d < 4; ++d) {
    check_same(out.size(d), want[d], "out", d, "shape of the forward output");
    check_same(grad_out.size(d), want[d], "grad_out", d, "shape of the forward output");
  }
  STD_TORCH_CHECK(out.scalar_type() == q.scalar_type() && grad_out.scalar_type() == q.scalar_type(),
                  "effattn: out and grad_out must have the dtype of query");
  check_rows(lse, "lse", p);
  STD_TORCH_CHECK(lse.scalar_type() == acc && lse.is_contiguous(),
                  "effattn: lse must be the forward's contiguous (B, H, L) accumulator-type tensor");
  p.out = const_cast<void*>(out.const_data_ptr());  // read only in the backward
  p.lse = const_cast<void*>(lse.const_data_ptr());
  p.o_strides = row_strides(out);
  p.dout = grad_out.const_data_ptr();
  p.do_strides = row_strides(grad_out);

  BwdCall call{p, empty_in_layout_of(q, {p.batch, p.heads_q, p.seqlen_q, p.head_dim}, q.scalar_type()),
               empty_in_layout_of(k, {p.batch, p.heads_kv, p.seqlen_k, p.head_dim}, q.scalar_type()),
               empty_in_layout_of(v, {p.batch, p.heads_kv, p.seqlen_k, p.head_dim_v}, q.scalar_type()),
               std::nullopt};
  if (grad_lse.has_value()) {
    check_rows(*grad_lse, "grad_lse", p);
    const ScalarType t = grad_lse->scalar_type();
    STD_TORCH_CHECK(t == ScalarType::Float || t == ScalarType::Double || t == ScalarType::Half ||
                        t == ScalarType::BFloat16,
                    "effattn: grad_lse must have a floating-point dtype");
    call.dlse = torch::stable::contiguous(torch::stable::to(*grad_lse, acc));
    call.params.dlse = call.dlse->const_data_ptr();
  }
  call.params.dq = call.dq.mutable_data_ptr();
  call.params.dk = call.dk.mutable_data_ptr();
  call.params.dv = call.dv.mutable_data_ptr();
  call.params.dq_strides = row_strides(call.dq);
  call.params.dk_strides = row_strides(call.dk);
  call.params.dv_strides = row_strides(call.dv);
  return call;
}

}  // namespace effattn
