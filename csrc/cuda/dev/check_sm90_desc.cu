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
// checked as byte offsets of elements in CuTe tensors over a fake, 1024-byte
// aligned base pointer (CuTe swizzles the pointer's address bits, as the
// hardware does).
#include <cstdio>

#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>

#include "cuda/sm90.h"

using namespace cute;
using Elem = cutlass::bfloat16_t;
namespace GMMA = SM90::GMMA;

static int failures = 0;
static Elem* const kBase = reinterpret_cast<Elem*>(uintptr_t(1) << 20);

template <class Layout>
auto on_base(Layout layout) { return make_tensor(make_smem_ptr(kBase), layout); }

// Byte offset of element `coord` of tensor t from the base.
template <class Tensor, class... Coord>
int byte_offset(Tensor& t, Coord... coord) {
  return int(reinterpret_cast<char*>(raw_pointer_cast(&t(coord...))) - reinterpret_cast<char*>(kBase));
}

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

void offset(const char* what, int ref, int ours, const char* unit = "bytes") {
  failures += ref != ours;
  std::printf("%-34s CuTe %6d, ours %6d %s  %s\n", what, ref, ours, unit, ref == ours ? "ok" : "DIFFERENT");
}

int main() {
  using namespace effattn::cuda;
  constexpr int kRows = 128;  // kBlockM (Q) and kBlockN (K, V)
  // Q and K: K-major, 64-column panels of kRows x 128 bytes (CuTe's default
  // atom order: down the rows first, then the next 64 columns).
  auto kmaj = tile_to_shape(GMMA::Layout_K_SW128_Atom<Elem>{}, make_shape(Int<kRows>{}, Int<128>{}));
  auto kt = on_base(kmaj);
  compare<0>("Q: 64 rows x k16 (A, K-major)", local_tile(kt, make_shape(Int<64>{}, Int<16>{}), make_coord(1, 0)),
             gmma_desc_k_major(0));
  compare<0>("K: 128 keys x k16 (B, K-major)", local_tile(kt, make_shape(Int<128>{}, Int<16>{}), make_coord(0, 5)),
             gmma_desc_k_major(0));
  for (int kk = 0; kk < 8; ++kk) {  // the kernel: (kk / 4) panels + (kk % 4) * 32 bytes
    char name[64];
    std::snprintf(name, sizeof name, "  k-step %d start", kk);
    offset(name, byte_offset(kt, 0, 16 * kk), (kk / 4) * kRows * 128 + (kk % 4) * 32);
  }
  offset("  warpgroup 1's rows start", byte_offset(kt, 64, 0), 64 * 128);
  // V: MN-major (N = head dim, K = keys), panels of 64 columns x all keys
  // (atoms ordered along the keys first), so the next 64 columns are a panel away.
  auto mn = tile_to_shape(GMMA::Layout_MN_SW128_Atom<Elem>{}, make_shape(Int<128>{}, Int<kRows>{}), Step<_2, _1>{});
  auto vt = on_base(mn);
  compare<1>("V: d128 x 16 keys (B, MN-major)", local_tile(vt, make_shape(Int<128>{}, Int<16>{}), make_coord(0, 3)),
             gmma_desc_mn_major(0, kRows * 128));
  auto mn64 = tile_to_shape(GMMA::Layout_MN_SW128_Atom<Elem>{}, make_shape(Int<64>{}, Int<kRows>{}), Step<_2, _1>{});
  auto vt64 = on_base(mn64);
  // One panel: the leading offset is never used (CuTe leaves it 0).
  compare<1>("V: d64 x 16 keys (B, MN-major)", local_tile(vt64, make_shape(Int<64>{}, Int<16>{}), make_coord(0, 1)),
             gmma_desc_mn_major(0, kRows * 128), false);
  for (int kk = 0; kk < 8; kk += 3) {  // the kernel: kk * 16 rows * 128 bytes
    char name[64];
    std::snprintf(name, sizeof name, "  key-step %d start", kk);
    offset(name, byte_offset(vt, 0, 16 * kk), kk * 16 * 128);
  }
  offset("  columns 64.. (second panel)", byte_offset(vt, 64, 0), kRows * 128);
  // The backward's dS^T tile: rows = 128 keys, 64 queries per 128-byte row, written by threads
  // with sw128_offset and read by dQ = dS K as an MN-major A operand (M = queries, K = keys).
  auto ds = tile_to_shape(GMMA::Layout_MN_SW128_Atom<Elem>{}, make_shape(Int<64>{}, Int<128>{}), Step<_2, _1>{});
  auto dst = on_base(ds);
  compare<1>("dS: 64 queries x 16 keys (A, MN)", local_tile(dst, make_shape(Int<64>{}, Int<16>{}), make_coord(0, 2)),
             gmma_desc_mn_major(0, kRows * 128), false);
  // Every element of a swizzled panel, as TMA writes it (K-major view) and as dS^T is read.
  int swizzle_bad = 0;
  for (int key = 0; key < 128; ++key)
    for (int q = 0; q < 64; ++q) swizzle_bad += byte_offset(dst, q, key) != int(sw128_offset(key, q));
  auto kt64 = on_base(tile_to_shape(GMMA::Layout_K_SW128_Atom<Elem>{}, make_shape(Int<kRows>{}, Int<64>{})));
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < 64; ++c) swizzle_bad += byte_offset(kt64, r, c) != int(sw128_offset(r, c));
  offset("sw128_offset: elements differing", swizzle_bad, 0, "of 16384");
  std::printf("%s\n", failures ? "MISMATCH" : "all agree");
  return failures != 0;
}
