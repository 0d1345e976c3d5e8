// The avx512 variant's forward with attention statistics (attention_fwd.h, kStats), in a
// translation unit of its own so that kernels_avx512.cpp compiles exactly as without it.
#define EFFATTN_STATS_PART 1
#include "kernels_avx512.cpp"
