// (dtype, head dim) -> the generated instantiation. A build may compile only
// some head dims (head_dims.h, generated); calls then go to the smallest
// compiled tile that holds the head dim.
#include "api.h"
#include "head_dims.h"
#include "launch_templates.h"

namespace effattn {
namespace cuda {
namespace {

// Every compiled head dim has both a forward and a backward kernel.
bool compiled(int d) {
  return with_head_dim(d, false, [](auto) { return true; });
}

template <typename T>
cudaError_t fwd_for(int d, const FwdParams& p, bool aligned, int64_t variant, cudaStream_t s) {
  return with_head_dim(d, cudaErrorInvalidValue,
                       [&](auto D) { return run_fwd_<T, decltype(D)::value>(p, aligned, variant, s); });
}

template <typename T>
cudaError_t bwd_for(int d, const BwdParams& p, bool aligned, int64_t variant, cudaStream_t s) {
  return with_head_dim(d, cudaErrorInvalidValue,
                       [&](auto D) { return run_bwd_<T, decltype(D)::value>(p, aligned, variant, s); });
}

const char* message(cudaError_t err) { return err == cudaSuccess ? nullptr : cudaGetErrorString(err); }

// Builds with sm_75 code: a bfloat16 kernel's sm_75 code traps (Turing has no
// bfloat16 MMA, ptx.h), so a bfloat16 call on such a GPU is refused here, before
// any launch (the cuda backend refuses it first; this guards the raw ops).
const char* refuse_bf16_below_sm80(DType dtype) {
#if defined(EFFATTN_CUDA_SM75)
  int device = 0, major = 0;
  if (dtype == DType::kBFloat16 && cudaGetDevice(&device) == cudaSuccess &&
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess && major < 8)
    return "bfloat16 needs compute capability 8.0 or newer (Turing has no bfloat16 tensor cores)";
#endif
  (void)dtype;
  return nullptr;
}

}  // namespace

int kernel_head_dim(int64_t e, int64_t ev) {
  const int64_t need = e > ev ? e : ev;
  for (int d : kHeadDims)
    if (d >= need && compiled(d)) return d;
  return 0;
}

int64_t compiled_head_dims() {
  int64_t bits = 0;
  for (int i = 0; i < kNumHeadDims; ++i)
    if (compiled(kHeadDims[i])) bits |= int64_t(1) << i;
  return bits;
}

bool sm90_kernels_compiled() {
#if defined(EFFATTN_CUDA_SM90A)
  return true;
#else
  return false;
#endif
}

bool sm75_kernels_compiled() {
#if defined(EFFATTN_CUDA_SM75)
  return true;
#else
  return false;
#endif
}

int64_t bwd_large_smem(int head_dim) {
  return with_head_dim(head_dim, int64_t(0),
                       [](auto D) { return static_cast<int64_t>(bwd_large_smem_bytes<decltype(D)::value>()); });
}

const char* run_fwd(const FwdParams& p, DType dtype, bool aligned, int64_t variant, void* stream) {
  const int d = kernel_head_dim(p.head_dim, p.head_dim_v);
  if (d == 0) return "no compiled forward kernel serves this head dim";
  if (const char* refused = refuse_bf16_below_sm80(dtype)) return refused;
  auto s = static_cast<cudaStream_t>(stream);
  return message(dtype == DType::kHalf ? fwd_for<__half>(d, p, aligned, variant, s)
                                       : fwd_for<__nv_bfloat16>(d, p, aligned, variant, s));
}

const char* run_bwd(const BwdParams& p, DType dtype, bool aligned, int64_t variant, void* stream) {
  const int d = kernel_head_dim(p.head_dim, p.head_dim_v);
  if (d == 0) return "no compiled backward kernel serves this head dim";
  if (const char* refused = refuse_bf16_below_sm80(dtype)) return refused;
  auto s = static_cast<cudaStream_t>(stream);
  return message(dtype == DType::kHalf ? bwd_for<__half>(d, p, aligned, variant, s)
                                       : bwd_for<__nv_bfloat16>(d, p, aligned, variant, s));
}

}  // namespace cuda
}  // namespace effattn
