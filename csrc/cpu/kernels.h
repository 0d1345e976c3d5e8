// The CPU kernels, compiled once per instruction set (kernels_<isa>.cpp) and
// chosen at run time by the host (attention_cpu.cpp) from the CPU's features,
// so one wheel stays portable (no -march in the build) and still uses the
// widest vectors the machine has.
#pragma once

#include <cstdint>

#include <torch/headeronly/core/ScalarType.h>

#include "../params.h"

// The AVX2 and AVX-512 variants are compiled with GCC's `#pragma GCC target`
// (kernels_isa.h); other compilers and architectures build the baseline only.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define EFFATTN_X86_VARIANTS 1
#else
#define EFFATTN_X86_VARIANTS 0
#endif
// avx2_wide (tests only) is compiled only when asked (setup.py: EFFATTN_UNVERIFIED=1).
#ifndef EFFATTN_CPU_AVX2_WIDE
#define EFFATTN_CPU_AVX2_WIDE 0
#endif

namespace effattn {
namespace cpu {

enum class Isa : int64_t {
  kBaseline = 0,  // 16-byte vectors: SSE2 on x86-64 (NEON elsewhere), any CPU
  kAvx2 = 1,      // 32-byte vectors, FMA, F16C
  kAvx512 = 2,    // 64-byte vectors (AVX-512 F/BW/DQ/VL)
  kAvx2Wide = 3,  // tests only: the 64-byte source on AVX2 (kernels_avx2_wide.cpp, opt-in)
};

const char* isa_name(Isa isa);

// Tile sizes, shared by every variant and the host (why these: the header
// comments of attention_fwd.h and attention_bwd.h).
constexpr int64_t kFwdBlockM = 128;  // forward: query rows per work item
constexpr int64_t kFwdBlockN = 128;  // forward: keys per tile
constexpr int64_t kBwdBlockM = 64;   // backward: query rows per inner tile
constexpr int64_t kBwdBlockN = 64;   // backward: keys owned per tile

// Row padding of every tile, in elements: a multiple of the widest vector
// (16 floats = 64 bytes = one cache line) whatever the variant, so GEMM and
// softmax loops run over whole vectors. The dQ accumulator's rows use it too.
constexpr int64_t kColAlign = 16;
inline int64_t padded(int64_t n) { return (n + kColAlign - 1) / kColAlign * kColAlign; }

// Entry points of one variant; dtype selects the input type (float32,
// float64, bfloat16, float16; accumulation in float32, float64 for float64).
// attention_fwd_stats is the forward that also writes, to stats (2, B, Hq, Lq)
// contiguous in the accumulator type, each query row's attention entropy
// (nats) and largest weight (attention_fwd.h); it lives in its own file per
// variant (kernels_<isa>_stats.cpp).
#define EFFATTN_DECLARE_CPU_KERNELS(ns)                                     \
  namespace ns {                                                            \
  void attention_fwd(torch::headeronly::ScalarType dtype, const FwdParams& p); \
  void attention_fwd_stats(torch::headeronly::ScalarType dtype, const FwdParams& p, void* stats); \
  void attention_bwd(torch::headeronly::ScalarType dtype, const BwdParams& p); \
  }
EFFATTN_DECLARE_CPU_KERNELS(baseline)
EFFATTN_DECLARE_CPU_KERNELS(avx2)
EFFATTN_DECLARE_CPU_KERNELS(avx512)
EFFATTN_DECLARE_CPU_KERNELS(avx2_wide)
#undef EFFATTN_DECLARE_CPU_KERNELS

}  // namespace cpu
}  // namespace effattn
