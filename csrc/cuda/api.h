// What the host wrapper (attention_cuda.cpp, compiled as plain C++ against
// torch's stable ABI) calls in the CUDA code: plain params in, a static error
// message (or nullptr) out. No CUDA or torch types cross this line.
#pragma once

#include <cstdint>

#include "../params.h"

namespace effattn {
namespace cuda {

enum class DType : int { kHalf = 0, kBFloat16 = 1 };

// The kernel variant, as bits of the ops' `variant` argument: chosen by the
// cuda backend (effattn/backends/cuda.py, from effattn.config and the device).
enum Variant : int64_t {
  kSm90Fwd = 1,        // the Hopper forward where it can take the tensors (opt-in builds only)
  kSm90Bwd = 2,        // the Hopper backward, likewise
  kSm90Require = 4,    // a call the Hopper kernels cannot take is an error, not the sm_80 kernel (tests)
  kBwdTilesLarge = 8,  // the sm_80 backward's Large tiles; else Small (<= 99 KB, every sm_80+ GPU)
  kSm75 = 16,          // the Turing tiles (<= 64 KB, float16, D <= 128; opt-in builds only)
};

// The kernel head dim serving head dims (E, Ev): the smallest compiled tile
// width >= both (32, 64, 96, 128, 192, 256), or 0 if none. A build compiles
// each selected head dim for both dtypes and both directions.
int kernel_head_dim(int64_t head_dim, int64_t head_dim_v);
// Bit i is set when the i-th of 32, 64, 96, 128, 192, 256 is compiled.
int64_t compiled_head_dims();
// Whether the Hopper kernels (sm_90a: wgmma, TMA) are compiled: forward and
// backward at head dims 64 and 128, in builds with EFFATTN_UNVERIFIED=1 only.
bool sm90_kernels_compiled();
// Whether the Turing tiles (kSm75) are compiled, with sm_75 code: builds with
// EFFATTN_UNVERIFIED=1 and 7.5 in the arch list only.
bool sm75_kernels_compiled();
// The shared memory of the sm_80 backward's Large tiles at a compiled kernel head dim (0: none).
int64_t bwd_large_smem(int head_dim);

const char* run_fwd(const FwdParams& p, DType dtype, bool aligned, int64_t variant, void* stream);
const char* run_bwd(const BwdParams& p, DType dtype, bool aligned, int64_t variant, void* stream);

}  // namespace cuda
}  // namespace effattn
