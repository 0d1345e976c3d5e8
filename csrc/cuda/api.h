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
// width >= both (32, 64, 96, 128, 192, 256, forward and backward), or 0 if none.
int fwd_head_dim(DType dtype, int64_t head_dim, int64_t head_dim_v);
int bwd_head_dim(DType dtype, int64_t head_dim, int64_t head_dim_v);
// Bit (8 * dtype + index of the head dim in 32, 64, 96, 128, 192, 256) is set
// for each compiled forward variant, bit 16 + ... for each backward variant.
int64_t compiled_variants();

const char* run_fwd(const FwdParams& p, DType dtype, bool aligned, void* stream);
const char* run_bwd(const BwdParams& p, DType dtype, bool aligned, void* stream);

}  // namespace cuda
}  // namespace effattn
