// (dtype, head dim) -> the generated instantiation. A build may compile only
// some head dims (setup.py: EFFATTN_CUDA_HEAD_DIMS defines
// EFFATTN_CUDA_SELECTED_HDIMS and one EFFATTN_CUDA_HDIM_<D> per dim); calls
// then go to the smallest compiled tile that holds the head dim.
#include <type_traits>

#include "api.h"
#include "launch_templates.h"

#ifndef EFFATTN_CUDA_SELECTED_HDIMS  // default: every head dim
#define EFFATTN_CUDA_HDIM_32
#define EFFATTN_CUDA_HDIM_64
#define EFFATTN_CUDA_HDIM_96
#define EFFATTN_CUDA_HDIM_128
#define EFFATTN_CUDA_HDIM_192
#define EFFATTN_CUDA_HDIM_256
#endif

namespace effattn {
namespace cuda {
namespace {

constexpr int kHeadDims[] = {32, 64, 96, 128, 192, 256};

// Calls f(std::integral_constant<int, d>) for a compiled head dim d, the one
// switch over what this build compiled; cudaErrorInvalidValue for any other.
template <typename F>
cudaError_t with_head_dim(int d, F&& f) {
  switch (d) {
#ifdef EFFATTN_CUDA_HDIM_32
    case 32: return f(std::integral_constant<int, 32>{});
#endif
#ifdef EFFATTN_CUDA_HDIM_64
    case 64: return f(std::integral_constant<int, 64>{});
#endif
#ifdef EFFATTN_CUDA_HDIM_96
    case 96: return f(std::integral_constant<int, 96>{});
#endif
#ifdef EFFATTN_CUDA_HDIM_128
    case 128: return f(std::integral_constant<int, 128>{});
#endif
#ifdef EFFATTN_CUDA_HDIM_192
    case 192: return f(std::integral_constant<int, 192>{});
#endif
#ifdef EFFATTN_CUDA_HDIM_256
    case 256: return f(std::integral_constant<int, 256>{});
#endif
    default: return cudaErrorInvalidValue;
  }
}

// Every compiled head dim has both a forward and a backward kernel.
bool compiled(int d) {
  return with_head_dim(d, [](auto) { return cudaSuccess; }) == cudaSuccess;
}

template <typename T>
cudaError_t fwd_for(int d, const FwdParams& p, bool aligned, cudaStream_t s) {
  return with_head_dim(d, [&](auto D) { return run_fwd_<T, decltype(D)::value>(p, aligned, s); });
}

template <typename T>
cudaError_t bwd_for(int d, const BwdParams& p, bool aligned, cudaStream_t s) {
  return with_head_dim(d, [&](auto D) { return run_bwd_<T, decltype(D)::value>(p, aligned, s); });
}

const char* message(cudaError_t err) { return err == cudaSuccess ? nullptr : cudaGetErrorString(err); }

}  // namespace

int kernel_head_dim(int64_t e, int64_t ev) {
  const int64_t need = e > ev ? e : ev;
  for (int d : kHeadDims)
    if (d >= need && compiled(d)) return d;
  return 0;
}

int64_t compiled_head_dims() {
  int64_t bits = 0;
  for (int i = 0; i < 6; ++i)
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

const char* run_fwd(const FwdParams& p, DType dtype, bool aligned, void* stream) {
  const int d = kernel_head_dim(p.head_dim, p.head_dim_v);
  if (d == 0) return "no compiled forward kernel serves this head dim";
  auto s = static_cast<cudaStream_t>(stream);
  return message(dtype == DType::kHalf ? fwd_for<__half>(d, p, aligned, s)
                                       : fwd_for<__nv_bfloat16>(d, p, aligned, s));
}

const char* run_bwd(const BwdParams& p, DType dtype, bool aligned, void* stream) {
  const int d = kernel_head_dim(p.head_dim, p.head_dim_v);
  if (d == 0) return "no compiled backward kernel serves this head dim";
  auto s = static_cast<cudaStream_t>(stream);
  return message(dtype == DType::kHalf ? bwd_for<__half>(d, p, aligned, s)
                                       : bwd_for<__nv_bfloat16>(d, p, aligned, s));
}

}  // namespace cuda
}  // namespace effattn
