// Body of one per-ISA kernel file (kernels_<isa>.cpp). Before including it,
// that file defines
//   EFFATTN_ISA_NAMESPACE  the namespace of the variant (baseline, avx2, avx512,
//                          avx2_wide)
//   EFFATTN_SIMD_BYTES     its vector width in bytes (16, 32, 64)
//   EFFATTN_ISA_TARGET     (optional) a GCC target string, e.g. "avx2,fma,f16c"
// and kernels_<isa>_stats.cpp also EFFATTN_STATS_PART, to compile only the
// forward with attention statistics: a translation unit of its own, so that the
// plain kernels compile (and GCC inlines them) exactly as without it.
//
// Every header with code of its own is included first, compiled for the
// baseline; only what follows the target pragma, all of it inline and inside
// effattn::cpu::EFFATTN_ISA_NAMESPACE, is compiled for the ISA. So no
// function compiled for a wider ISA can be shared with (and picked by the
// linker for) another variant, and the baseline runs on any CPU.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>

#include <torch/csrc/stable/ops.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/Half.h>

#include "bounds.h"
#include "kernels.h"

#ifdef EFFATTN_ISA_TARGET
#define EFFATTN_STR(x) #x
#define EFFATTN_TARGET_PRAGMA(t) _Pragma(EFFATTN_STR(GCC target(t)))
#pragma GCC push_options
EFFATTN_TARGET_PRAGMA(EFFATTN_ISA_TARGET)
#endif

namespace effattn {
namespace cpu {
namespace EFFATTN_ISA_NAMESPACE {

using torch::headeronly::ScalarType;

#include "simd.h"
#include "gemm.h"
#include "tile_ops.h"
#include "attention_fwd.h"
#ifndef EFFATTN_STATS_PART
#include "attention_bwd.h"
#endif

namespace {
template <template <typename, typename> class Kernel, typename... Args>
void dispatch_dtype(ScalarType dtype, const Args&... p) {
  using torch::headeronly::BFloat16;
  using torch::headeronly::Half;
  switch (dtype) {
    case ScalarType::Float: Kernel<float, float>::run(p...); break;
    case ScalarType::Double: Kernel<double, double>::run(p...); break;
    case ScalarType::BFloat16: Kernel<BFloat16, float>::run(p...); break;
    case ScalarType::Half: Kernel<Half, float>::run(p...); break;
    default:
      STD_TORCH_CHECK(false, "effattn (cpu): unsupported dtype; expected float32, "
                             "float64, bfloat16 or float16");
  }
}
#ifndef EFFATTN_STATS_PART
template <typename scalar_t, typename acc_t>
struct Fwd {
  static void run(const FwdParams& p) { cpu::EFFATTN_ISA_NAMESPACE::attention_fwd<scalar_t, acc_t>(p); }
};
template <typename scalar_t, typename acc_t>
struct Bwd {
  static void run(const BwdParams& p) { cpu::EFFATTN_ISA_NAMESPACE::attention_bwd<scalar_t, acc_t>(p); }
};
#else
template <typename scalar_t, typename acc_t>
struct FwdWithStats {
  static void run(const FwdParams& p, void* const& stats) {
    cpu::EFFATTN_ISA_NAMESPACE::attention_fwd<scalar_t, acc_t, true>(p, stats);
  }
};
#endif
}  // namespace

#ifndef EFFATTN_STATS_PART
void attention_fwd(ScalarType dtype, const FwdParams& p) { dispatch_dtype<Fwd>(dtype, p); }
void attention_bwd(ScalarType dtype, const BwdParams& p) { dispatch_dtype<Bwd>(dtype, p); }
#else
void attention_fwd_stats(ScalarType dtype, const FwdParams& p, void* stats) {
  dispatch_dtype<FwdWithStats>(dtype, p, stats);
}
#endif

}  // namespace EFFATTN_ISA_NAMESPACE
}  // namespace cpu
}  // namespace effattn

#ifdef EFFATTN_ISA_TARGET
#pragma GCC pop_options
#endif
