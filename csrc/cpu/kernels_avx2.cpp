// AVX2 + FMA + F16C: 32-byte vectors (x86-64 only; chosen at run time).
#include "kernels.h"
#if EFFATTN_X86_VARIANTS
#define EFFATTN_ISA_NAMESPACE avx2
#define EFFATTN_SIMD_BYTES 32
#define EFFATTN_ISA_TARGET "avx2,fma,f16c"
#include "kernels_isa.h"
#endif
