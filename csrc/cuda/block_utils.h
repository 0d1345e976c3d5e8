// Helpers shared by the forward and backward kernels: tile loads into padded
// shared memory, the per-batch valid lengths, and the visibility rule of a
// (query, key) pair (window, lengths, dense mask).
#pragma once

#include <cstdint>

#include "../params.h"
#include "ptx.h"

namespace effattn {
namespace cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// A lengths entry clamped to [0, max]: values on the GPU are never validated
// on the host, so nothing may index past the tensors whatever they hold.
__device__ __forceinline__ int valid_length(const int64_t* lengths, int b, int max_len) {
  if (lengths == nullptr) return max_len;
  const int64_t v = lengths[b];
  return v < 0 ? 0 : (v > max_len ? max_len : static_cast<int>(v));
}

// Copies rows [0, kRows) x cols [0, kHeadDim) of a row-major global tile into
// shared memory (row stride kStride), zero-filling rows >= nrows and columns
// >= ncols. `aligned` (checked on the host: 16-byte aligned base and rows,
// ncols % 8 == 0) selects cp.async; otherwise plain element loads, slower but
// valid for any strides.
template <typename T, int kRows, int kHeadDim, int kStride, int kNThreads>
__device__ __forceinline__ void load_tile(T* smem, const T* gbase, int64_t row_stride, int nrows,
                                          int ncols, bool aligned, int tid) {
  constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per row
  constexpr int kIters = kRows * kChunks / kNThreads;
  static_assert(kRows * kChunks % kNThreads == 0, "tile load splits evenly");
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int idx = it * kNThreads + tid;
    const int r = idx / kChunks, c = (idx % kChunks) * 8;
    T* dst = smem + r * kStride + c;
    const bool ok = r < nrows && c < ncols;
    if (aligned) {
      cp_async_16(smem_addr(dst), ok ? gbase + r * row_stride + c : gbase, ok);
    } else {
      const T* src = gbase + r * row_stride + c;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        T x = from_float<T>(0.f);
        if (r < nrows && c + e < ncols) x = src[e];
        dst[e] = x;
      }
    }
  }
}

// The structural part of "may query i see key j" (window and lengths; the
// dense mask comes separately). i < l_eff and j < s_eff are the lengths.
struct Visibility {
  int l_eff, s_eff;
  int64_t window_left, window_right;  // -1: unbounded

  __device__ __forceinline__ bool operator()(int i, int j) const {
    return i < l_eff && j < s_eff && (window_left < 0 || j >= i - window_left) &&
           (window_right < 0 || j <= i + window_right);
  }
  // True when every pair of the tile [m0, m0 + bm) x [n0, n0 + bn) is visible.
  __device__ __forceinline__ bool tile_all_visible(int m0, int bm, int n0, int bn) const {
    return m0 + bm <= l_eff && n0 + bn <= s_eff &&
           (window_left < 0 || n0 >= int64_t(m0) + bm - 1 - window_left) &&
           (window_right < 0 || int64_t(n0) + bn - 1 <= m0 + window_right);
  }
};

// The dense mask of one (batch, head), read through its strides. Returns the
// additive bias in log2 units; sets *visible = false for a False bool entry.
template <typename T>
struct DenseMask {
  const char* base;  // null: no mask
  int64_t row_stride, col_stride;
  MaskKind kind;

  __device__ __forceinline__ float bias_log2(int i, int j, bool* visible) const {
    const int64_t off = i * row_stride + j * col_stride;
    switch (kind) {
      case MaskKind::kBool:
        if (!reinterpret_cast<const bool*>(base)[off]) *visible = false;
        return 0.f;
      case MaskKind::kFloat32:
        return reinterpret_cast<const float*>(base)[off] * kLog2e;
      default:  // kSameAsQ
        return to_float(reinterpret_cast<const T*>(base)[off]) * kLog2e;
    }
  }
};

template <typename T>
__device__ __forceinline__ DenseMask<T> dense_mask(const FwdParams& p, int b, int h) {
  DenseMask<T> m;
  m.kind = p.mask_kind;
  m.row_stride = p.mask_row_stride;
  m.col_stride = p.mask_col_stride;
  m.base = nullptr;
  if (p.mask != nullptr) {
    const int elem = p.mask_kind == MaskKind::kBool ? 1 : (p.mask_kind == MaskKind::kFloat32 ? 4 : 2);
    m.base = static_cast<const char*>(p.mask) + (b * p.mask_batch_stride + h * p.mask_head_stride) * elem;
  }
  return m;
}

}  // namespace cuda
}  // namespace effattn
