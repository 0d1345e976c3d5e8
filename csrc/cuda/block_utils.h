// Helpers shared by the kernels: tile loads into padded shared memory, the
// per-batch valid lengths, the visibility rule of a (query, key) pair (window,
// lengths, dense mask), and the forwards' softmax steps on score fragments.
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

// The key blocks [*nb_lo, *nb_hi) of width bn that query rows [m0, m0 + bm)
// can see (window and lengths); empty when the rows are past the query length.
__device__ __forceinline__ void fwd_key_blocks(const FwdParams& p, const Visibility& vis, int m0, int bm, int bn,
                                               int* nb_lo, int* nb_hi) {
  int n_lo = 0, n_hi = vis.s_eff;
  if (p.window_left >= 0) n_lo = static_cast<int>(max(int64_t(0), int64_t(m0) - p.window_left));
  if (p.window_right >= 0) n_hi = static_cast<int>(min(int64_t(n_hi), int64_t(m0) + bm + p.window_right));
  if (m0 >= vis.l_eff) n_hi = n_lo;
  *nb_lo = n_lo / bn;
  *nb_hi = n_hi > n_lo ? (n_hi + bn - 1) / bn : *nb_lo;
}

// The query blocks [*mb_lo, *mb_lo + *num_mb) of height bm that can see one of
// the keys [n0, n0 + bn) (window and lengths): j - right <= i <= j + left.
__device__ __forceinline__ void bwd_query_blocks(const FwdParams& p, const Visibility& vis, int n0, int bn, int bm,
                                                 int* mb_lo, int* num_mb) {
  int i_lo = 0, i_hi = vis.l_eff;
  if (p.window_right >= 0) i_lo = static_cast<int>(max(int64_t(0), int64_t(n0) - p.window_right));
  if (p.window_left >= 0) i_hi = static_cast<int>(min(int64_t(i_hi), int64_t(n0) + bn + p.window_left));
  if (n0 >= vis.s_eff) i_hi = i_lo;
  *mb_lo = i_lo / bm;
  *num_mb = i_hi > i_lo ? (i_hi + bm - 1) / bm - *mb_lo : 0;
}

// The forwards' score fragments: a warp's kMT m-tiles of 16 rows of a score
// tile in the mma C layout (ptx.h; wgmma's accumulators have it too, wgmma.h),
// s[mt][j][e] being row row0 + 16 mt + g + 8 (e >> 1), column col0 + 8 j +
// 2 t + (e & 1). Each thread holds two rows' entries per m-tile (g, g + 8),
// and a row's four threads are a lane quad.

// Scales the scores to log2 units; when need_mask, entries the pair's
// visibility or the dense mask hides become -inf, and the mask's bias is added.
template <typename T, int kMT, int kNTiles>
__device__ __forceinline__ void scale_and_mask(float (&s)[kMT][kNTiles][4], bool need_mask, const Visibility& vis,
                                               const DenseMask<T>& dmask, int row0, int col0, int g, int t,
                                               float scale_log2) {
  if (need_mask) {
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int j = 0; j < kNTiles; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = row0 + mt * 16 + g + (e >> 1) * 8, jj = col0 + j * 8 + 2 * t + (e & 1);
          bool ok = vis(i, jj);
          float bias = 0.f;
          if (ok && dmask.base != nullptr) bias = dmask.bias_log2(i, jj, &ok);
          s[mt][j][e] = ok ? s[mt][j][e] * scale_log2 + bias : -INFINITY;
        }
  } else {
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int j = 0; j < kNTiles; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][j][e] *= scale_log2;
  }
}

// One online-softmax step (base 2): new row maxima, s <- exp2(s - max), the
// running row sums (this thread's part) and the output accumulator o (same
// rows, C layout) rescaled by exp2(old max - new max).
template <int kMT, int kNTilesS, int kNTilesO>
__device__ __forceinline__ void online_softmax(float (&s)[kMT][kNTilesS][4], float (&o)[kMT][kNTilesO][4],
                                               float (&row_max)[kMT][2], float (&row_sum)[kMT][2]) {
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = row_max[mt][r];
#pragma unroll
      for (int j = 0; j < kNTilesS; ++j) mx = fmaxf(mx, fmaxf(s[mt][j][2 * r], s[mt][j][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
      // A row that has seen no key yet keeps max -inf: subtract 0 instead, so
      // exp2(-inf - 0) = 0 rather than NaN.
      const float alpha = mx == -INFINITY ? 1.f : exp2f(row_max[mt][r] - mx);
      const float m_use = mx == -INFINITY ? 0.f : mx;
      row_max[mt][r] = mx;
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < kNTilesS; ++j) {
        s[mt][j][2 * r] = exp2f(s[mt][j][2 * r] - m_use);
        s[mt][j][2 * r + 1] = exp2f(s[mt][j][2 * r + 1] - m_use);
        sum += s[mt][j][2 * r] + s[mt][j][2 * r + 1];
      }
      row_sum[mt][r] = row_sum[mt][r] * alpha + sum;
#pragma unroll
      for (int j = 0; j < kNTilesO; ++j) {
        o[mt][j][2 * r] *= alpha;
        o[mt][j][2 * r + 1] *= alpha;
      }
    }
}

// Probabilities of 16 keys (score n-tiles 2 kk, 2 kk + 1), packed to 16 bits:
// the A fragment of the P @ V MMA's k-step kk.
template <typename T, int kNTiles>
__device__ __forceinline__ void pack_p(uint32_t (&a)[4], const float (&s)[kNTiles][4], int kk) {
  a[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
  a[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
  a[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
  a[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
}

// The forwards' epilogue for those rows: out = o / row sum for rows < L and
// columns < Ev, lse in natural-log units. A row that saw no key gets out = 0,
// lse = -inf (a NaN sum stays NaN).
template <typename T, int kMT, int kNTilesO>
__device__ __forceinline__ void write_rows(const float (&o)[kMT][kNTilesO][4], const float (&row_max)[kMT][2],
                                           const float (&row_sum)[kMT][2], T* out, int64_t row_stride, float* lse,
                                           int row0, int L, int Ev, int g, int t) {
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float sum = row_sum[mt][r];
      sum += __shfl_xor_sync(0xffffffff, sum, 1);
      sum += __shfl_xor_sync(0xffffffff, sum, 2);
      const float inv = sum == 0.f ? 0.f : 1.f / sum;
      const int i = row0 + mt * 16 + g + r * 8;
      if (i < L) {
        T* orow = out + i * row_stride;
#pragma unroll
        for (int j = 0; j < kNTilesO; ++j)
          store2<T>(orow, j * 8 + 2 * t, Ev, o[mt][j][2 * r] * inv, o[mt][j][2 * r + 1] * inv);
        if (t == 0) lse[i] = sum == 0.f ? -INFINITY : (row_max[mt][r] + __log2f(sum)) * kLn2;
      }
    }
}

// The backwards' fragments: a warp's 16 keys (rows key0 + 8 (e >> 1), key0
// being this thread's g row) x kNTiles * 8 queries (column m0 + 8 j + 2 t +
// (e & 1)) in the mma C layout.

// P^T from S^T in place: exp2(scale * S^T + bias - lse), 0 where the pair is
// hidden (when need_mask); lse(j, c) gives the log2 lse of column 8 j + 2 t + c.
template <typename T, int kNTiles, typename Lse>
__device__ __forceinline__ void bwd_probabilities(float (&ps)[kNTiles][4], bool need_mask, const Visibility& vis,
                                                  const DenseMask<T>& dmask, int m0, int key0, int t,
                                                  float scale_log2, Lse&& lse) {
#pragma unroll
  for (int j = 0; j < kNTiles; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float s = ps[j][e] * scale_log2;
      if (need_mask) {
        const int i = m0 + j * 8 + 2 * t + (e & 1), jj = key0 + (e >> 1) * 8;
        bool ok = vis(i, jj);
        float bias = 0.f;
        if (ok && dmask.base != nullptr) bias = dmask.bias_log2(i, jj, &ok);
        s = ok ? s + bias : -INFINITY;
      }
      ps[j][e] = exp2f(s - lse(j, e & 1));
    }
}

// dst[0], dst[1] += a, b in the float32 dQ buffer: columns c (even), c + 1 of E.
__device__ __forceinline__ void add_dq_pair(float* dst, int c, int E, float a, float b) {
  if (c + 1 < E && E % 2 == 0) {  // c is even: an 8-byte aligned pair
    atomic_add2(dst, a, b);
  } else {
    if (c < E) atomicAdd(dst, a);
    if (c + 1 < E) atomicAdd(dst + 1, b);
  }
}

// The backwards' epilogue: these 16 keys' dK (times the softmax scale) and dV,
// columns col0 + 8 j + 2 t (+ 1), for keys < S.
template <typename T, int kNTiles>
__device__ __forceinline__ void write_dk_dv(const float (&acc_dk)[kNTiles][4], const float (&acc_dv)[kNTiles][4],
                                            const BwdParams& p, int b, int hk, int key0, int col0, int t) {
  const int S = p.seqlen_k, E = p.head_dim, Ev = p.head_dim_v;
  const float scale = static_cast<float>(p.scale);
  T* dk = static_cast<T*>(p.dk) + b * p.dk_strides.batch + hk * p.dk_strides.head;
  T* dv = static_cast<T*>(p.dv) + b * p.dv_strides.batch + hk * p.dv_strides.head;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = key0 + r * 8;
    if (key >= S) continue;
#pragma unroll
    for (int j = 0; j < kNTiles; ++j) {
      const int c = col0 + j * 8 + 2 * t;
      store2<T>(dk + key * p.dk_strides.row, c, E, acc_dk[j][2 * r] * scale, acc_dk[j][2 * r + 1] * scale);
      store2<T>(dv + key * p.dv_strides.row, c, Ev, acc_dv[j][2 * r], acc_dv[j][2 * r + 1]);
    }
  }
}

}  // namespace cuda
}  // namespace effattn
