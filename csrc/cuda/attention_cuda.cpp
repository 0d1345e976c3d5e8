// CUDA implementations of effattn::fwd and effattn::bwd: check the tensors and
// fill params (csrc/host_params.h, shared with the CPU), allocate outputs and
// scratch, and launch on the current stream (csrc/cuda/dispatch.cu). Plain
// C++ against torch's stable ABI: no CUDA headers, no ATen.
#include <cstdint>
#include <optional>
#include <tuple>

#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include "../host_params.h"
#include "api.h"

// From torch's stable C shim (declared there only under USE_CUDA).
extern "C" AOTITorchError aoti_torch_get_current_cuda_stream(int32_t device_index, void** ret_stream);

namespace effattn {
namespace {

cuda::DType kernel_dtype(const Tensor& q) {
  const ScalarType t = q.scalar_type();
  STD_TORCH_CHECK(t == ScalarType::Half || t == ScalarType::BFloat16,
                  "effattn (cuda): supports float16 and bfloat16, not this dtype (use the triton backend)");
  return t == ScalarType::Half ? cuda::DType::kHalf : cuda::DType::kBFloat16;
}

// cp.async moves 16-byte chunks: every row start must be 16-byte aligned.
// Otherwise the kernels load element by element (slower, same results).
bool rows_aligned(const Tensor& t) {
  const auto ptr = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  return ptr % 16 == 0 && t.size(3) % 8 == 0 && t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 &&
         t.stride(2) % 8 == 0;
}

void check_launchable(const FwdParams& p) {
  // Grid y and z are at most 65535; rows and keys are indexed with 32-bit ints.
  STD_TORCH_CHECK(p.heads_q <= 65535 && p.batch <= 65535,
                  "effattn (cuda): batch and heads must each be <= 65535");
  STD_TORCH_CHECK(p.seqlen_q < (int64_t(1) << 30) && p.seqlen_k < (int64_t(1) << 30),
                  "effattn (cuda): sequence lengths must be < 2^30");
}

// The CUDA kernels predate bands with negative sides: they read a negative
// side as unbounded (block_utils.h, Visibility). So an open side goes to them
// as -1, and a negative one is refused here (the cuda backend declares it
// does not serve them, so effattn.attention never sends one).
void to_cuda_window(FwdParams& p) {
  STD_TORCH_CHECK(p.window_left >= 0 && p.window_right >= 0,
                  "effattn (cuda): window sides must be >= 0 or None here (the CUDA kernels take no negative "
                  "band side; the cpu and triton backends do), got ", p.window_left, " and ", p.window_right);
  if (p.window_left == kUnbounded) p.window_left = -1;
  if (p.window_right == kUnbounded) p.window_right = -1;
}

void* current_stream(const Tensor& t) {
  void* stream = nullptr;
  STD_TORCH_CHECK(aoti_torch_get_current_cuda_stream(t.get_device_index(), &stream) == AOTI_TORCH_SUCCESS,
                  "effattn (cuda): could not get the current CUDA stream");
  return stream;
}

std::tuple<Tensor, Tensor> fwd_cuda(Tensor q, Tensor k, Tensor v, std::optional<Tensor> mask,
                                    std::optional<Tensor> key_lengths, std::optional<Tensor> query_lengths,
                                    double scale, WindowSide window_left, WindowSide window_right,
                                    int64_t variant) {
  const cuda::DType dtype = kernel_dtype(q);
  // Checked first: a call that reached the CUDA kernel because some other tensor is on a GPU
  // gets an error naming it, before a guard or a stream is taken for q's device.
  FwdCall call = make_fwd_call(q, k, v, mask, key_lengths, query_lengths, scale, window_left, window_right);
  to_cuda_window(call.params);
  torch::stable::accelerator::DeviceGuard guard(q.get_device_index());
  check_launchable(call.params);
  const bool aligned = rows_aligned(q) && rows_aligned(k) && rows_aligned(v);
  const char* err = cuda::run_fwd(call.params, dtype, aligned, variant, current_stream(q));
  STD_TORCH_CHECK(err == nullptr, "effattn (cuda) forward: ", err);
  return {call.out, call.lse};
}

std::tuple<Tensor, Tensor, Tensor> bwd_cuda(Tensor grad_out, std::optional<Tensor> grad_lse, Tensor q,
                                            Tensor k, Tensor v, Tensor out, Tensor lse,
                                            std::optional<Tensor> mask, std::optional<Tensor> key_lengths,
                                            std::optional<Tensor> query_lengths, double scale,
                                            WindowSide window_left, WindowSide window_right,
                                            int64_t variant) {
  const cuda::DType dtype = kernel_dtype(q);
  BwdCall call = make_bwd_call(grad_out, grad_lse, q, k, v, out, lse, mask, key_lengths, query_lengths,
                               scale, window_left, window_right);  // checked first, as above
  BwdParams& p = call.params;
  to_cuda_window(p);
  torch::stable::accelerator::DeviceGuard guard(q.get_device_index());
  check_launchable(p);
  // Scratch, O(B * H * L): delta and the lse in log2 units (2, B, H, L), and
  // the float32 dQ accumulator (zeroed: the key tiles add into it with atomics).
  Tensor delta = torch::stable::new_empty(q, {2, p.batch, p.heads_q, p.seqlen_q}, ScalarType::Float);
  Tensor dq_accum =
      torch::stable::new_zeros(q, {p.batch, p.heads_q, p.seqlen_q, p.head_dim}, ScalarType::Float);
  p.delta = delta.mutable_data_ptr();
  p.dq_accum = dq_accum.mutable_data_ptr();
  const bool aligned = rows_aligned(q) && rows_aligned(k) && rows_aligned(v) && rows_aligned(grad_out);
  const char* err = cuda::run_bwd(p, dtype, aligned, variant, current_stream(q));
  STD_TORCH_CHECK(err == nullptr, "effattn (cuda) backward: ", err);
  return {call.dq, call.dk, call.dv};
}

int64_t cuda_variants() {
  return cuda::compiled_head_dims() | (cuda::sm90_kernels_compiled() ? int64_t(1) << 16 : 0) |
         (cuda::sm75_kernels_compiled() ? int64_t(1) << 17 : 0);
}

int64_t cuda_bwd_large_smem(int64_t head_dim) { return cuda::bwd_large_smem(static_cast<int>(head_dim)); }

}  // namespace
}  // namespace effattn

STABLE_TORCH_LIBRARY_IMPL(effattn, CUDA, m) {
  m.impl("fwd", TORCH_BOX(&effattn::fwd_cuda));
  m.impl("bwd", TORCH_BOX(&effattn::bwd_cuda));
}

STABLE_TORCH_LIBRARY_IMPL(effattn, CompositeExplicitAutograd, m) {
  m.impl("cuda_variants", TORCH_BOX(&effattn::cuda_variants));
  m.impl("cuda_bwd_large_smem", TORCH_BOX(&effattn::cuda_bwd_large_smem));
}
