// Thin wrappers over the sm_80 PTX the kernels use: cp.async (global -> shared
// without registers), ldmatrix (shared -> mma fragments) and the m16n8k16
// tensor-core MMA with float accumulators, plus fp16/bf16 packing.
//
// Compiled for sm_75 (Turing; opt-in builds only, EFFATTN_CUDA_SM75) the same
// calls lower to what Turing has: cp.async becomes a synchronous 16- or 4-byte
// load (ld.global.cg: L2, not L1, as cp.async.cg) and a shared store (a
// program correct with the asynchronous copy is correct with one that lands at
// once: commit and wait become no-ops), and the float16 m16n8k16 MMA becomes
// two m16n8k8 (its A halves are the k8 A fragments, b0 and b1 its B
// fragments). Turing has no bfloat16 MMA: the cuda backend refuses bfloat16
// there, and the bfloat16 MMA traps if reached. ldmatrix exists from sm_75.
// Nothing here changes for sm_80 and newer.
//
// Fragment layouts (PTX ISA, "mma.m16n8k16"), with g = lane / 4, t = lane % 4:
//   A (16x16, row-major)  reg0: (g, 2t..2t+1)  reg1: (g+8, 2t..)  reg2: (g, 2t+8..)  reg3: (g+8, 2t+8..)
//   B (16x8, "col")       reg0: (k = 2t..2t+1, n = g)             reg1: (k = 2t+8.., n = g)
//   C (16x8, float)       c0, c1: (g, 2t..2t+1)                    c2, c3: (g+8, 2t..2t+1)
// So the C fragments of two adjacent n-tiles, packed to 16 bits, are the A
// fragment of one 16-wide k-step: the softmax output P feeds the next MMA
// straight from registers.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace effattn {
namespace cuda {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared; zero-fills the destination when !pred (then src
// is not read, but must still be a valid address).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define EFFATTN_PTX_SM75 1  // Turing: no cp.async, no bfloat16 MMA (see above)
#endif

__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool pred) {
#if defined(EFFATTN_PTX_SM75)
  const uint4 v = pred ? __ldcg(static_cast<const uint4*>(src)) : make_uint4(0, 0, 0, 0);
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(dst), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w));
#else
  const int src_bytes = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
#endif
}
// 4 bytes global -> shared, zero-filled when !pred.
__device__ __forceinline__ void cp_async_4(uint32_t dst, const void* src, bool pred) {
#if defined(EFFATTN_PTX_SM75)
  const uint32_t v = pred ? __ldcg(static_cast<const unsigned int*>(src)) : 0u;
  asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(dst), "r"(v));
#else
  const int src_bytes = pred ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
#endif
}
#if defined(EFFATTN_PTX_SM75)
__device__ __forceinline__ void cp_async_commit() {}
template <int N>
__device__ __forceinline__ void cp_async_wait() {}
#else
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }
#endif

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

template <typename T> struct Mma;

template <> struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(EFFATTN_PTX_SM75)
    __trap();  // unreachable: the cuda backend refuses bfloat16 below compute capability 8.0
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
  }
};

template <> struct Mma<__half> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(EFFATTN_PTX_SM75)
    // m16n8k8 fragments (PTX ISA, "mma.m16n8k8"): A reg0 (g, 2t..), reg1 (g+8, 2t..); B (k = 2t.., n = g);
    // so k16's a[0], a[1] with b0 are the first 8 of k, a[2], a[3] with b1 the second.
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(b0));
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[2]), "r"(a[3]), "r"(b1));
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
  }
};

template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  Mma<T>::run(d, a, b0, b1);
}

// Two floats -> two 16-bit values in one register, the first in the low half.
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// dst[0] += a, dst[1] += b in global memory (dst 8-byte aligned): one vector
// atomic on sm_90, two scalar ones before.
__device__ __forceinline__ void atomic_add2(float* dst, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(dst), make_float2(a, b));
#else
  atomicAdd(dst, a);
  atomicAdd(dst + 1, b);
#endif
}

// Stores two adjacent elements (columns col, col + 1 of a row), each only if
// it is inside [0, ncols); one 32-bit store when both are and it is aligned.
template <typename T>
__device__ __forceinline__ void store2(T* row, int col, int ncols, float a, float b) {
  T* dst = row + col;
  if (col + 1 < ncols && (reinterpret_cast<uintptr_t>(dst) & 3) == 0) {
    *reinterpret_cast<uint32_t*>(dst) = pack2<T>(a, b);
  } else {
    if (col < ncols) dst[0] = from_float<T>(a);
    if (col + 1 < ncols) dst[1] = from_float<T>(b);
  }
}

}  // namespace cuda
}  // namespace effattn
