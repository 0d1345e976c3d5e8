// The portable variant: 16-byte vectors (SSE2 on x86-64, NEON on arm64), no
// target flags, runs on any CPU.
#define EFFATTN_ISA_NAMESPACE baseline
#define EFFATTN_SIMD_BYTES 16
#include "kernels_isa.h"
