// Launchers: grid, dynamic shared memory (opted in past 48 KB), the caller's
// stream, and a launch check; and the kernel or tile set the op's `variant`
// asks for (api.h's Variant bits, chosen by effattn/backends/cuda.py). One
// instantiation per (dtype, head dim) lives in its own generated file under
// instantiations/ so they compile in parallel.
//
// The Hopper kernels (flash_{fwd,bwd}_sm90_kernel.h) are compiled only into
// builds that ask for them (EFFATTN_CUDA_SM90A: setup.py with
// EFFATTN_UNVERIFIED=1 and 9.0a in the arch list): they have not yet run on a
// GPU, so the default build holds none of their code. Likewise the Turing
// tiles (kernel_traits.h's Sm75, float16; EFFATTN_CUDA_SM75: setup.py with
// EFFATTN_UNVERIFIED=1 and 7.5 in the arch list), which the kSm75 variant bit
// asks for.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "api.h"
#include "flash_bwd_kernel.h"
#include "flash_fwd_kernel.h"
#if defined(EFFATTN_CUDA_SM90A)
#include "flash_bwd_sm90_kernel.h"
#include "flash_fwd_sm90_kernel.h"
#endif

namespace effattn {
namespace cuda {

template <typename T, int D>
cudaError_t run_fwd_(const FwdParams& p, bool aligned, int64_t variant, cudaStream_t stream);
template <typename T, int D>
cudaError_t run_bwd_(const BwdParams& p, bool aligned, int64_t variant, cudaStream_t stream);

template <typename Kernel>
cudaError_t set_smem_limit(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

// Either forward kernel, kernel(p, arg): one block per (query tile, head,
// batch), with Traits' shared memory, on the caller's stream.
template <typename Traits, typename Kernel, typename Arg>
cudaError_t launch_fwd_kernel(Kernel kernel, const FwdParams& p, const Arg& arg, cudaStream_t stream) {
  constexpr size_t smem = Traits::kSmemBytes;
  cudaError_t err = set_smem_limit(kernel, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>((p.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM),
                  static_cast<unsigned>(p.heads_q), static_cast<unsigned>(p.batch));
  kernel<<<grid, Traits::kNThreads, smem, stream>>>(p, arg);
  return cudaGetLastError();
}

#if defined(EFFATTN_CUDA_SM90A)
// ---- the Hopper forward (flash_fwd_sm90_kernel.h) ----------------------------------

// cuTensorMapEncodeTiled, a driver function, through the runtime (so the
// module links no libcuda and still imports where no driver is installed).
using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
inline EncodeTiledFn tensor_map_encoder() {
  static const EncodeTiledFn fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess)
      f = nullptr;
    return reinterpret_cast<EncodeTiledFn>(f);
  }();
  return fn;
}

// A TMA descriptor for a (batch, heads, rows, cols) 16-bit tensor with the
// given element strides (cols contiguous): boxes of 64 columns x box_rows
// rows, 128-byte swizzle, zero fill outside. False where TMA can't describe
// it (base or a stride not a multiple of 16 bytes).
inline bool encode_tile_map(CUtensorMap* map, const void* base, bool bf16, int64_t batch, int64_t heads,
                            int64_t rows, int64_t cols, const RowStrides& st, int box_rows) {
  const EncodeTiledFn encode = tensor_map_encoder();
  if (encode == nullptr || (reinterpret_cast<uintptr_t>(base) & 15) != 0) return false;
  const cuuint64_t dims[4] = {cuuint64_t(cols), cuuint64_t(rows), cuuint64_t(heads), cuuint64_t(batch)};
  const int64_t given[3] = {st.row, st.head, st.batch};
  cuuint64_t strides[3];
  // A dim of size 1 is never stepped over, whatever stride torch gave it: it gets
  // the extent of the dims inside it, as a packed tensor would have.
  cuuint64_t extent = (dims[0] * 2 + 15) / 16 * 16;
  for (int i = 0; i < 3; ++i) {
    strides[i] = dims[i + 1] == 1 ? extent : cuuint64_t(given[i]) * 2;
    if (strides[i] % 16 != 0 || strides[i] >= (cuuint64_t(1) << 40)) return false;
    extent = strides[i] * dims[i + 1];
  }
  const cuuint32_t box[4] = {kPanelCols, cuuint32_t(box_rows), 1, 1};
  const cuuint32_t unit[4] = {1, 1, 1, 1};
  return encode(map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4,
                const_cast<void*>(base), dims, strides, box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE,
                CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// The Hopper kernels run where the device is sm_90 (H100, H200, GH200).
inline bool sm90_device() {
  int device = 0, major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) return false;
  return major == 9 && minor == 0;
}

// Whether every TMA box of the Hopper kernels overlaps its tensor. At D = 128
// with E or Ev <= 64, a 64-column panel would lie wholly past a tensor's last
// column: TMA zero-fills what lies outside a box and counts it toward the
// barrier's bytes, but no document says so for a box with nothing inside, and
// one that counted nothing would leave its barrier waiting. Such calls (e.g.
// E = 64, Ev = 128) take the sm_80 kernels until a GPU run shows otherwise.
template <typename Traits>
bool panels_overlap(const int head_dim, const int head_dim_v) {
  const int last_panel = (Traits::kPanels - 1) * kPanelCols;
  return head_dim > last_panel && head_dim_v > last_panel;
}

// The TMA maps of q (boxes of Traits::kBlockM rows), k and v (kBlockN rows),
// as both Hopper kernels read them; false where the kernels can't take these
// tensors (TMA can't describe them, or a box would lie outside them).
template <typename Traits>
bool encode_qkv_maps(const FwdParams& p, CUtensorMap* q, CUtensorMap* k, CUtensorMap* v) {
  const bool bf16 = std::is_same_v<typename Traits::T, __nv_bfloat16>;
  return panels_overlap<Traits>(p.head_dim, p.head_dim_v) &&
         encode_tile_map(q, p.q, bf16, p.batch, p.heads_q, p.seqlen_q, p.head_dim, p.q_strides, Traits::kBlockM) &&
         encode_tile_map(k, p.k, bf16, p.batch, p.heads_kv, p.seqlen_k, p.head_dim, p.k_strides, Traits::kBlockN) &&
         encode_tile_map(v, p.v, bf16, p.batch, p.heads_kv, p.seqlen_k, p.head_dim_v, p.v_strides, Traits::kBlockN);
}

// Launches the Hopper forward; *launched = false (and nothing done) where it
// can't take the tensors (encode_qkv_maps), so the caller runs the sm_80 kernel.
template <typename Traits>
cudaError_t launch_fwd_sm90(const FwdParams& p, cudaStream_t stream, bool* launched) {
  *launched = false;
  Sm90Maps maps;
  if (!encode_qkv_maps<Traits>(p, &maps.q, &maps.k, &maps.v)) return cudaSuccess;
  *launched = true;
  return launch_fwd_kernel<Traits>(&flash_fwd_sm90_kernel<Traits>, p, maps, stream);
}

template <typename Config, typename = void>
struct HasSm90 : std::false_type {};
template <typename Config>
struct HasSm90<Config, std::void_t<typename Config::Sm90>> : std::true_type {};

// Where the variant asks for a Hopper kernel (`bit` of it): on an sm_90
// device, try_sm90(&launched) launches it (or leaves launched false when TMA
// can't describe the tensors). *handled = true when that launched (or
// failed), or under kSm90Require when it could not run: then return this
// error (cudaErrorNotSupported; tests use it so a fallback can't pass for the
// Hopper kernels).
template <typename TrySm90>
cudaError_t maybe_sm90(int64_t variant, int64_t bit, TrySm90&& try_sm90, bool* handled) {
  *handled = false;
  if (!(variant & bit)) return cudaSuccess;
  bool launched = false;
  if (sm90_device()) {
    const cudaError_t err = try_sm90(&launched);
    if (err != cudaSuccess || launched) {
      *handled = true;
      return err;
    }
  }
  *handled = (variant & kSm90Require) != 0;
  return *handled ? cudaErrorNotSupported : cudaSuccess;
}
#endif  // EFFATTN_CUDA_SM90A

#if defined(EFFATTN_CUDA_SM75)
template <typename Config, typename = void>
struct HasSm75 : std::false_type {};
template <typename Config>
struct HasSm75<Config, std::void_t<typename Config::Sm75>> : std::true_type {};

// Whether Config has Turing tiles for T (float16 only: Turing has no bfloat16 MMA).
template <typename Config, typename T>
constexpr bool sm75_tiles() {
  if constexpr (HasSm75<Config>::value) {
    static_assert(Config::Sm75::kSmemBytes <= kSmemTuring, "the Turing tiles fit an sm_75 block");
    return std::is_same_v<T, __half>;
  } else {
    return false;
  }
}
#endif  // EFFATTN_CUDA_SM75

// The forward the variant asks for: the Turing tiles under kSm75 (a call
// without them is cudaErrorNotSupported); the Hopper kernel where the head
// dim has one, kSm90Fwd asks for it and it can run; the sm_80 kernel otherwise.
template <typename Config>
cudaError_t launch_fwd_for_device(const FwdParams& p, bool aligned, int64_t variant, cudaStream_t stream) {
  if (p.batch == 0 || p.heads_q == 0 || p.seqlen_q == 0) return cudaSuccess;
#if defined(EFFATTN_CUDA_SM75)
  if (variant & kSm75) {
    if constexpr (sm75_tiles<Config, typename Config::Traits::T>()) {
      using Traits = typename Config::Sm75;
      return launch_fwd_kernel<Traits>(&flash_fwd_kernel<Traits>, p, aligned, stream);
    } else {
      return cudaErrorNotSupported;
    }
  }
#endif
#if defined(EFFATTN_CUDA_SM90A)
  if constexpr (HasSm90<Config>::value) {
    if (p.seqlen_k > 0) {  // no keys: nothing to load, the sm_80 kernel writes the zeros
      bool handled = false;
      const cudaError_t err = maybe_sm90(
          variant, kSm90Fwd,
          [&](bool* launched) { return launch_fwd_sm90<typename Config::Sm90>(p, stream, launched); }, &handled);
      if (handled) return err;
    }
  }
#endif
  using Traits = typename Config::Traits;
  return launch_fwd_kernel<Traits>(&flash_fwd_kernel<Traits>, p, aligned, stream);
}

// The backward's three launches: delta (and the log2 lse), main() (the main
// kernel: dK, dV, and dQ into the float32 buffer), then dQ's conversion.
template <typename T, typename Main>
cudaError_t launch_bwd_steps(const BwdParams& p, cudaStream_t stream, Main&& main) {
  const int64_t rows = p.batch * p.heads_q * p.seqlen_q;
  if (rows > 0) {  // delta = rowsum(dO * O) - dlse: 8 rows (one per warp) per block
    bwd_delta_kernel<T><<<static_cast<unsigned>((rows + 7) / 8), 256, 0, stream>>>(p);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (p.batch > 0 && p.heads_kv > 0 && p.seqlen_k > 0) {
    cudaError_t err = main();
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

// The backward's main kernel: one block per (key tile, column split) x kv head
// x batch, with Traits' shared memory, on the caller's stream.
template <typename Traits, typename Kernel, typename Arg>
cudaError_t launch_bwd_kernel(Kernel kernel, const BwdParams& p, const Arg& arg, cudaStream_t stream) {
  constexpr size_t smem = Traits::kSmemBytes;
  cudaError_t err = set_smem_limit(kernel, smem);
  if (err != cudaSuccess) return err;
  constexpr int kSplits = Traits::kColSplits;
  const dim3 grid(static_cast<unsigned>((p.seqlen_k + Traits::kBlockN - 1) / Traits::kBlockN * kSplits),
                  static_cast<unsigned>(p.heads_kv), static_cast<unsigned>(p.batch));
  kernel<<<grid, Traits::kNThreads, smem, stream>>>(p, arg);
  return cudaGetLastError();
}

template <typename Traits>
cudaError_t launch_bwd(const BwdParams& p, bool aligned, cudaStream_t stream) {
  return launch_bwd_steps<typename Traits::T>(
      p, stream, [&] { return launch_bwd_kernel<Traits>(&flash_bwd_kernel<Traits>, p, aligned, stream); });
}

#if defined(EFFATTN_CUDA_SM90A)
// The Hopper backward's main kernel between the same delta and dQ steps;
// *launched = false (and nothing done) where it can't take the tensors
// (encode_qkv_maps, and dO's map like q's).
template <typename Traits>
cudaError_t launch_bwd_sm90(const BwdParams& p, cudaStream_t stream, bool* launched) {
  *launched = false;
  const bool bf16 = std::is_same_v<typename Traits::T, __nv_bfloat16>;
  Sm90BwdMaps maps;
  if (!encode_qkv_maps<Traits>(p, &maps.q, &maps.k, &maps.v) ||
      !encode_tile_map(&maps.dout, p.dout, bf16, p.batch, p.heads_q, p.seqlen_q, p.head_dim_v, p.do_strides,
                       Traits::kBlockM))
    return cudaSuccess;
  *launched = true;
  return launch_bwd_steps<typename Traits::T>(
      p, stream, [&] { return launch_bwd_kernel<Traits>(&flash_bwd_sm90_kernel<Traits>, p, maps, stream); });
}
#endif  // EFFATTN_CUDA_SM90A

// The backward the variant asks for: the Turing tiles under kSm75, as the
// forward; the Hopper kernel as above (kSm90Bwd); else the sm_80 kernel's
// Large tiles (kBwdTilesLarge: the cuda backend picks them where their shared
// memory fits what a block may opt into) or Small (<= 99 KB, every sm_80+ GPU).
template <typename Config>
cudaError_t launch_bwd_for_device(const BwdParams& p, bool aligned, int64_t variant, cudaStream_t stream) {
  using Large = typename Config::Large;
  using Small = typename Config::Small;
#if defined(EFFATTN_CUDA_SM75)
  if (variant & kSm75) {
    if constexpr (sm75_tiles<Config, typename Large::T>()) {
      return launch_bwd<typename Config::Sm75>(p, aligned, stream);
    } else {
      return cudaErrorNotSupported;
    }
  }
#endif
#if defined(EFFATTN_CUDA_SM90A)
  if constexpr (HasSm90<Config>::value) {  // the Hopper backward where the variant asks for it
    if (p.batch > 0 && p.heads_q > 0 && p.heads_kv > 0 && p.seqlen_k > 0 && p.seqlen_q > 0) {
      bool handled = false;
      const cudaError_t err = maybe_sm90(
          variant, kSm90Bwd,
          [&](bool* launched) { return launch_bwd_sm90<typename Config::Sm90>(p, stream, launched); }, &handled);
      if (handled) return err;
    }
  }
#endif
  static_assert(Small::kSmemBytes <= kSmemConsumerGpu, "the Small backward tiles fit every sm_80+ GPU");
  static_assert(Large::kSmemBytes <= 227 * 1024, "the Large backward tiles fit an sm_90 block");
  if constexpr (std::is_same_v<Large, Small>) {
    return launch_bwd<Large>(p, aligned, stream);
  } else {
    return (variant & kBwdTilesLarge) ? launch_bwd<Large>(p, aligned, stream) : launch_bwd<Small>(p, aligned, stream);
  }
}

// The Large backward tiles' shared memory at kernel head dim D (what the cuda
// backend compares with the device's opt-in limit to choose kBwdTilesLarge).
template <int D>
constexpr size_t bwd_large_smem_bytes() {
  return BwdConfig<__nv_bfloat16, D>::Large::kSmemBytes;
}

}  // namespace cuda
}  // namespace effattn
