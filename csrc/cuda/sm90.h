// Thin wrappers over the Hopper (sm_90a) PTX of the Hopper kernels
// (flash_{fwd,bwd}_sm90_kernel.h): mbarriers, TMA tile loads, named barriers,
// wgmma's fences and shared-memory matrix descriptors. Everything here is only
// ever executed in code compiled for sm_90a (guarded by
// __CUDA_ARCH_FEAT_SM90_ALL); the descriptor encoding is plain arithmetic, so
// host code can check it.
#pragma once

#include <cstdint>

#include "ptx.h"
#include "wgmma.h"

namespace effattn {
namespace cuda {

// ---- shared-memory matrix descriptors (PTX ISA, "Matrix Descriptor Format") --
// Bits [0,14) start address >> 4, [16,30) leading-dimension byte offset >> 4,
// [32,46) stride-dimension byte offset >> 4, [62,64) layout: 1 = 128-byte swizzle.
// Every tile here uses the 128-byte swizzle that TMA writes with
// CU_TENSOR_MAP_SWIZZLE_128B: rows of 64 16-bit elements (128 bytes), 16-byte
// chunk c of row r stored at chunk c ^ (r % 8), 8-row atoms of 1024 bytes
// (tiles 1024-byte aligned, so the base-offset field is 0).
constexpr uint32_t kSwizzleAtomBytes = 1024;  // 8 rows x 128 bytes (a row: 64 16-bit elements, kPanelCols)

__host__ __device__ constexpr uint64_t gmma_desc_sw128(uint32_t smem_addr, uint32_t leading_bytes,
                                                       uint32_t stride_bytes) {
  return uint64_t((smem_addr & 0x3FFFF) >> 4) | (uint64_t((leading_bytes >> 4) & 0x3FFF) << 16) |
         (uint64_t((stride_bytes >> 4) & 0x3FFF) << 32) | (uint64_t(1) << 62);
}
// K-major operand (rows = M or N, 16 k-columns at byte offset 32 * (k / 16)
// inside its 128-byte row): 8-row atoms stacked every 1024 bytes. The leading
// offset is unused by swizzled K-major layouts (CUTLASS sets it to 1 unit).
__host__ __device__ constexpr uint64_t gmma_desc_k_major(uint32_t smem_addr) {
  return gmma_desc_sw128(smem_addr, 16, kSwizzleAtomBytes);
}
// MN-major operand (rows = K, 64 contiguous N-elements per 128-byte row):
// 8-row k-atoms every 1024 bytes, the next 64 N-columns panel_bytes further.
__host__ __device__ constexpr uint64_t gmma_desc_mn_major(uint32_t smem_addr, uint32_t panel_bytes) {
  return gmma_desc_sw128(smem_addr, panel_bytes, kSwizzleAtomBytes);
}

// Byte offset of 16-bit element (row, col), col < 64, in a tile of 128-byte
// rows with the 128-byte swizzle (what TMA writes; what the descriptors read):
// the 16-byte chunk col / 8 of a row sits at chunk (col / 8) ^ (row % 8).
__host__ __device__ constexpr uint32_t sw128_offset(int row, int col) {
  return uint32_t(row) * 128 + ((uint32_t(col / 8) ^ uint32_t(row % 8)) * 16) + uint32_t(col % 8) * 2;
}

#if defined(__CUDA_ARCH__)

// ---- mbarriers ----------------------------------------------------------------
__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}
// Makes the initialised barriers visible to the async proxy (TMA) and other threads.
__device__ __forceinline__ void mbar_fence_init() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
// One arrival that also tells the barrier to expect `bytes` of TMA transactions.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// One test of whether the barrier's phase with parity `phase` has completed.
__device__ __forceinline__ bool mbar_try_wait(uint32_t bar, uint32_t phase) {
  uint32_t done;
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n"
      "}\n"
      : "=r"(done)
      : "r"(bar), "r"(phase)
      : "memory");
  return done != 0;
}
// No wait here lasts more than microseconds unless the protocol is broken (a
// TMA whose bytes never all arrive, an arrival that never comes): past about
// 10 s (2^34 cycles at ~1.8 GHz) the thread traps, so the call fails with a
// launch error instead of hanging the GPU. The clock is read only once the
// first test has failed.
constexpr long long kHangCycles = 1LL << 34;
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t phase) {
  if (mbar_try_wait(bar, phase)) return;
  const long long start = clock64();
  while (!mbar_try_wait(bar, phase))
    if (clock64() - start > kHangCycles) __trap();
}

// ---- TMA: a 4-D box (dim 0 innermost) global -> shared, completing on `bar` ----
// Coordinates are element indices; parts of the box outside the tensor are
// zero-filled (and still count towards the transaction bytes).
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const void* tensor_map, uint32_t bar, int c0, int c1,
                                            int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, "
      "%6}], [%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(tensor_map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}

// 16 zero bytes to shared memory, then (after all of them) the fence that
// orders these generic-proxy writes before async-proxy reads (wgmma, TMA).
__device__ __forceinline__ void st_shared_zero16(uint32_t addr) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(addr), "r"(0) : "memory");
}
__device__ __forceinline__ void st_shared_b32(uint32_t addr, uint32_t v) {
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}
// Zeroes rows [row0, rows) of each of `panels` panels (rows x 128 bytes,
// panel_bytes apart) from `tile`, with all nthreads threads of the block.
__device__ __forceinline__ void zero_rows(uint32_t tile, int panels, uint32_t panel_bytes, int row0, int rows,
                                          int tid, int nthreads) {
  const int n = rows - row0, chunks = panels * n * 8;
  for (int c = tid; c < chunks; c += nthreads)
    st_shared_zero16(tile + (c / (n * 8)) * panel_bytes + (row0 + (c / 8) % n) * 128 + (c % 8) * 16);
}
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// Barrier `id` (1..15; 0 is __syncthreads') over `threads` threads, in whole
// warps: e.g. one warpgroup's (id 1 + warpgroup, 128 threads).
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
// Adds 1 to a shared counter and returns its old value, with acquire-release
// order: what this thread saw complete before it happens before what the next
// thread to add does after.
__device__ __forceinline__ uint32_t shared_count_in(uint32_t addr) {
  uint32_t old;
  asm volatile("atom.acq_rel.cta.shared::cta.add.u32 %0, [%1], 1;\n" : "=r"(old) : "r"(addr) : "memory");
  return old;
}

// ---- wgmma ordering ---------------------------------------------------------------
// Before the first wgmma that reads registers other instructions wrote.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// The compiler sees an asm's register operands as read or written at the asm
// itself, not when the asynchronous MMA really does: after wgmma_wait, each
// accumulator (and A-fragment) register goes through an empty asm, so no read
// or reuse of it moves above the wait.
template <int R, int C>
__device__ __forceinline__ void fence_operands(float (&x)[R][C]) {
#pragma unroll
  for (int i = 0; i < R; ++i)
#pragma unroll
    for (int j = 0; j < C; ++j) asm volatile("" : "+f"(x[i][j])::"memory");
}
template <int R, int C>
__device__ __forceinline__ void fence_operands(uint32_t (&x)[R][C]) {
#pragma unroll
  for (int i = 0; i < R; ++i)
#pragma unroll
    for (int j = 0; j < C; ++j) asm volatile("" : "+r"(x[i][j])::"memory");
}

#endif  // __CUDA_ARCH__

}  // namespace cuda
}  // namespace effattn
