// Launchers: grid, dynamic shared memory (opted in past 48 KB), the caller's
// stream, and a launch check. One instantiation per (dtype, head dim) lives in
// its own generated file under instantiations/ so they compile in parallel.
#pragma once

#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "flash_bwd_kernel.h"
#include "flash_fwd_kernel.h"

namespace effattn {
namespace cuda {

template <typename T, int D>
cudaError_t run_fwd_(const FwdParams& p, bool aligned, cudaStream_t stream);
template <typename T, int D>
cudaError_t run_bwd_(const BwdParams& p, bool aligned, cudaStream_t stream);

template <typename Kernel>
cudaError_t set_smem_limit(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

template <typename Traits>
cudaError_t launch_fwd(const FwdParams& p, bool aligned, cudaStream_t stream) {
  if (p.batch == 0 || p.heads_q == 0 || p.seqlen_q == 0) return cudaSuccess;
  auto kernel = &flash_fwd_kernel<Traits>;
  constexpr size_t smem = Traits::kSmemBytes;
  cudaError_t err = set_smem_limit(kernel, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>((p.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM),
                  static_cast<unsigned>(p.heads_q), static_cast<unsigned>(p.batch));
  kernel<<<grid, Traits::kNThreads, smem, stream>>>(p, aligned);
  return cudaGetLastError();
}

template <typename Traits>
cudaError_t launch_bwd(const BwdParams& p, bool aligned, cudaStream_t stream) {
  using T = typename Traits::T;
  const int64_t rows = p.batch * p.heads_q * p.seqlen_q;
  if (rows > 0) {  // delta = rowsum(dO * O) - dlse: 8 rows (one per warp) per block
    bwd_delta_kernel<T><<<static_cast<unsigned>((rows + 7) / 8), 256, 0, stream>>>(p);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (p.batch > 0 && p.heads_kv > 0 && p.seqlen_k > 0) {
    auto kernel = &flash_bwd_kernel<Traits>;
    constexpr size_t smem = Traits::kSmemBytes;
    cudaError_t err = set_smem_limit(kernel, smem);
    if (err != cudaSuccess) return err;
    const dim3 grid(static_cast<unsigned>((p.seqlen_k + Traits::kBlockN - 1) / Traits::kBlockN * Traits::kColSplits),
                    static_cast<unsigned>(p.heads_kv), static_cast<unsigned>(p.batch));
    kernel<<<grid, Traits::kNThreads, smem, stream>>>(p, aligned);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  const int64_t n = rows * p.head_dim;
  if (n > 0) {  // grid-stride: a few waves of 256-thread blocks is plenty for a copy
    const int64_t blocks = (n + 255) / 256;
    bwd_dq_convert_kernel<T><<<static_cast<unsigned>(blocks < 4096 ? blocks : 4096), 256, 0, stream>>>(p);
    return cudaGetLastError();
  }
  return cudaSuccess;
}

// The backward's tile set for this device: Large where its shared memory fits
// what a block may opt into, Small (<= 99 KB, every sm_80+ GPU) otherwise.
// EFFATTN_CUDA_BWD_TILES=small|large overrides the choice (tests run Small
// on GPUs that would pick Large).
template <typename Config>
cudaError_t launch_bwd_for_device(const BwdParams& p, bool aligned, cudaStream_t stream) {
  using Large = typename Config::Large;
  using Small = typename Config::Small;
  static_assert(Small::kSmemBytes <= kSmemConsumerGpu, "the Small backward tiles fit every sm_80+ GPU");
  static_assert(Large::kSmemBytes <= 227 * 1024, "the Large backward tiles fit an sm_90 block");
  if constexpr (std::is_same_v<Large, Small>) {
    return launch_bwd<Large>(p, aligned, stream);
  } else {
    const char* force = std::getenv("EFFATTN_CUDA_BWD_TILES");
    bool large;
    if (force != nullptr && std::strcmp(force, "small") == 0) {
      large = false;
    } else if (force != nullptr && std::strcmp(force, "large") == 0) {
      large = true;
    } else {
      int device = 0, optin = 0;
      cudaError_t err = cudaGetDevice(&device);
      if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
      if (err != cudaSuccess) return err;
      large = Large::kSmemBytes <= static_cast<size_t>(optin);
    }
    return large ? launch_bwd<Large>(p, aligned, stream) : launch_bwd<Small>(p, aligned, stream);
  }
}

}  // namespace cuda
}  // namespace effattn
