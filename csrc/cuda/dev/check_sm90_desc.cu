// Host-only cross-check of the Hopper forward's shared-memory matrix
// descriptors (csrc/cuda/sm90.h) against CUTLASS/CuTe's make_gmma_desc, for
// the tile layouts flash_fwd_sm90_kernel.h uses: no GPU needed. CuTe is only
// the oracle here, not a build dependency:
//
//   pip install --no-deps --target /tmp/cutlass nvidia-cutlass==4.2.0
//   nvcc -std=c++17 -arch=sm_90a --expt-relaxed-constexpr \
//     -I/tmp/cutlass/cutlass_library/source/include -Icsrc csrc/cuda/dev/check_sm90_desc.cu -o /tmp/check_desc
//   /tmp/check_desc    # exit status 0: every field and offset agrees
//
// On the host CuTe can't convert a shared-memory pointer (it prints "ERROR:
// cast_smem_ptr_to_uint ..." and uses address 0), so start addresses are
// checked as element offsets of the k-slices in CuTe's layouts instead.
#include <cstdio>

#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>

#include "cuda/sm90.h"

using namespace cute;
using Elem = cutlass::bfloat16_t;
namespace GMMA = SM90::GMMA;

static int failures = 0;

template <int kMajorMN, class Tensor>
void compare(const char* what, Tensor t, uint64_t ours, bool leading_used = true) {
  GmmaDescriptor ref;
  if constexpr (kMajorMN) ref = GMMA::make_gmma_desc<GMMA::Major::MN>(t);
  else ref = GMMA::make_gmma_desc<GMMA::Major::K>(t);
  GmmaDescriptor mine(ours);
  const bool ok = ref.bitfield.stride_byte_offset_ == mine.bitfield.stride_byte_offset_ &&
                  ref.bitfield.layout_type_ == mine.bitfield.layout_type_ &&
                  (!leading_used || ref.bitfield.leading_byte_offset_ == mine.bitfield.leading_byte_offset_);
  failures += !ok;
  std::printf("%-34s CuTe: lbo %4d sbo %3d layout %d | ours: lbo %4d sbo %3d layout %d  %s\n", what,
              int(ref.bitfield.leading_byte_offset_), int(ref.bitfield.stride_byte_offset_),
              int(ref.bitfield.layout_type_), int(mine.bitfield.leading_byte_offset_),
              int(mine.bitfield.stride_byte_offset_), int(mine.bitfield.layout_type_), ok ? "ok" : "DIFFERENT");
}

void offset(const char* what, int ref, int ours) {
  failures += ref != ours;
  std::printf("%-34s CuTe %6d, ours %6d elements  %s\n", what, ref, ours, ref == ours ? "ok" : "DIFFERENT");
}

int main() {
  using namespace effattn::cuda;
  constexpr int kRows = 128;  // kBlockM (Q) and kBlockN (K, V)
  // Q and K: K-major, 64-column panels of kRows x 128 bytes (CuTe's default
  // atom order: down the rows first, then the next 64 columns).
  auto kmaj = tile_to_shape(GMMA::Layout_K_SW128_Atom<Elem>{}, make_shape(Int<kRows>{}, Int<128>{}));
  auto kt = make_tensor(make_smem_ptr(static_cast<Elem*>(nullptr)), kmaj);
  compare<0>("Q: 64 rows x k16 (A, K-major)", local_tile(kt, make_shape(Int<64>{}, Int<16>{}), make_coord(1, 0)),
             gmma_desc_k_major(0));
  compare<0>("K: 128 keys x k16 (B, K-major)", local_tile(kt, make_shape(Int<128>{}, Int<16>{}), make_coord(0, 5)),
             gmma_desc_k_major(0));
  for (int kk = 0; kk < 8; ++kk) {  // the kernel: (kk / 4) panels + (kk % 4) * 32 bytes
    char name[64];
    std::snprintf(name, sizeof name, "  k-step %d start", kk);
    offset(name, int(kmaj(0, 16 * kk)), ((kk / 4) * kRows * 128 + (kk % 4) * 32) / 2);
  }
  offset("  warpgroup 1's rows start", int(kmaj(64, 0)), 64 * 128 / 2);
  // V: MN-major (N = head dim, K = keys), panels of 64 columns x all keys
  // (atoms ordered along the keys first), so the next 64 columns are a panel away.
  auto mn = tile_to_shape(GMMA::Layout_MN_SW128_Atom<Elem>{}, make_shape(Int<128>{}, Int<kRows>{}), Step<_2, _1>{});
  auto vt = make_tensor(make_smem_ptr(static_cast<Elem*>(nullptr)), mn);
  compare<1>("V: d128 x 16 keys (B, MN-major)", local_tile(vt, make_shape(Int<128>{}, Int<16>{}), make_coord(0, 3)),
             gmma_desc_mn_major(0, kRows * 128));
  auto mn64 = tile_to_shape(GMMA::Layout_MN_SW128_Atom<Elem>{}, make_shape(Int<64>{}, Int<kRows>{}), Step<_2, _1>{});
  auto vt64 = make_tensor(make_smem_ptr(static_cast<Elem*>(nullptr)), mn64);
  // One panel: the leading offset is never used (CuTe leaves it 0).
  compare<1>("V: d64 x 16 keys (B, MN-major)", local_tile(vt64, make_shape(Int<64>{}, Int<16>{}), make_coord(0, 1)),
             gmma_desc_mn_major(0, kRows * 128), false);
  for (int kk = 0; kk < 8; kk += 3) {  // the kernel: kk * 16 rows * 128 bytes
    char name[64];
    std::snprintf(name, sizeof name, "  key-step %d start", kk);
    offset(name, int(mn(0, 16 * kk)), kk * 16 * 128 / 2);
  }
  offset("  columns 64.. (second panel)", int(mn(64, 0)), kRows * 128 / 2);
  std::printf("%s\n", failures ? "MISMATCH" : "all agree");
  return failures != 0;
}
