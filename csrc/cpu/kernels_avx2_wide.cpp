// Test-only variant: the AVX-512 variant's source and vector width (64 bytes,
// 16 float lanes) compiled for AVX2, the compiler splitting each vector
// operation in two. Built only when asked (EFFATTN_UNVERIFIED=1, as CI does),
// never chosen automatically: effattn.config.cpu_isa = "avx2_wide" (or
// EFFATTN_CPU_ISA=avx2_wide) selects it so that the 16-lane code paths (tile
// padding, GEMM panels, softmax lanes) are tested on CPUs without AVX-512,
// like the development and CI machines.
#include "kernels.h"
#if EFFATTN_X86_VARIANTS && EFFATTN_CPU_AVX2_WIDE
#pragma GCC diagnostic ignored "-Wpsabi"  // 64-byte vectors without AVX-512: internal, inline only
#define EFFATTN_ISA_NAMESPACE avx2_wide
#define EFFATTN_SIMD_BYTES 64
#define EFFATTN_ISA_TARGET "avx2,fma,f16c"
#include "kernels_isa.h"
#endif
