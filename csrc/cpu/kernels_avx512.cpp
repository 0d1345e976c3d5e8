// AVX-512 (F, BW, DQ, VL) + FMA + F16C: 64-byte vectors (x86-64 only; chosen
// at run time).
#include "kernels.h"
#if EFFATTN_X86_VARIANTS
#define EFFATTN_ISA_NAMESPACE avx512
#define EFFATTN_SIMD_BYTES 64
#define EFFATTN_ISA_TARGET "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c"
#include "kernels_isa.h"
#endif
