// What the host wrapper (attention_cuda.cpp, compiled as plain C++ against
// torch's stable ABI) calls in the CUDA code: plain params in, a static error
// message (or nullptr) out. No CUDA or torch types cross this line.
#pragma once

#include <cstdint>

#include "../params.h"

namespace effattn {
namespace cuda {

enum class DType : int { kHalf = 0, kBFloat16 = 1 };

// The kernel head dim serving head dims (E, Ev): the smallest compiled tile
// width >= both (32, 64, 96, 128, 192, 256), or 0 if none. A build compiles
// each selected head dim for both dtypes and both directions.
int kernel_head_dim(int64_t head_dim, int64_t head_dim_v);
// Bit i is set when the i-th of 32, 64, 96, 128, 192, 256 is compiled.
int64_t compiled_head_dims();
// Whether the Hopper kernels (sm_90a: wgmma, TMA) are compiled: forward and
// backward at head dims 64 and 128.
bool sm90_kernels_compiled();

const char* run_fwd(const FwdParams& p, DType dtype, bool aligned, void* stream);
const char* run_bwd(const BwdParams& p, DType dtype, bool aligned, void* stream);

}  // namespace cuda
}  // namespace effattn
