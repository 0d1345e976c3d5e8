// The forward kernel: one block per (query tile, head, batch). Each warp owns
// 16 or 32 query rows (kMTiles); K and V tiles stream through shared memory with cp.async
// (V's load overlaps Q @ K^T, the next K's load overlaps P @ V); scores and
// the output accumulate in float32 registers through mma.sync m16n8k16, and
// the online softmax runs in base 2. out and lse are written once.
#pragma once

#include "block_utils.h"
#include "kernel_traits.h"

namespace effattn {
namespace cuda {

template <typename Traits>
__global__ void __launch_bounds__(Traits::kNThreads, 1)
    flash_fwd_kernel(const __grid_constant__ FwdParams p, const bool aligned) {
  using T = typename Traits::T;
  constexpr int kD = Traits::kHeadDim, kBM = Traits::kBlockM, kBN = Traits::kBlockN;
  constexpr int kMT = Traits::kMTiles;  // 16-row m-tiles per warp
  constexpr int kStride = Traits::kStride, kNT = Traits::kNThreads;
  constexpr int kNTilesS = kBN / 8;  // 8-wide n-tiles of the score tile
  constexpr int kNTilesO = kD / 8;   // 8-wide n-tiles of the output

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + Traits::kSmemQ;
  T* sV = sK + Traits::kSmemK;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int g = lane / 4, t = lane % 4;  // mma fragment coordinates
  // Heavy (causal: late) query tiles first, so the grid's tail is short.
  const int m_block = gridDim.x - 1 - blockIdx.x;
  const int h = blockIdx.y, b = blockIdx.z;
  const int hk = h / (p.heads_q / p.heads_kv);
  const int L = p.seqlen_q, S = p.seqlen_k, E = p.head_dim, Ev = p.head_dim_v;
  const int m0 = m_block * kBM;
  const int warp_row0 = warp * 16 * kMT;  // this warp's first row in the tile

  Visibility vis{valid_length(p.query_lengths, b, L), valid_length(p.key_lengths, b, S), p.window_left,
                 p.window_right};
  const DenseMask<T> dmask = dense_mask<T>(p, b, h);
  const float scale_log2 = static_cast<float>(p.scale) * kLog2e;

  int nb_lo, nb_hi;  // key blocks this query tile can see
  fwd_key_blocks(p, vis, m0, kBM, kBN, &nb_lo, &nb_hi);

  const T* q = static_cast<const T*>(p.q) + b * p.q_strides.batch + h * p.q_strides.head + m0 * p.q_strides.row;
  const T* k = static_cast<const T*>(p.k) + b * p.k_strides.batch + hk * p.k_strides.head;
  const T* v = static_cast<const T*>(p.v) + b * p.v_strides.batch + hk * p.v_strides.head;

  float acc_o[kMT][kNTilesO][4];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int j = 0; j < kNTilesO; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[mt][j][e] = 0.f;
  // Running max (log2 units) and this thread's partial row sums, rows g, g + 8
  // of each m-tile.
  float row_max[kMT][2], row_sum[kMT][2];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) row_max[mt][r] = -INFINITY, row_sum[mt][r] = 0.f;

  if (nb_hi > nb_lo) {
    load_tile<T, kBM, kD, kStride, kNT>(sQ, q, p.q_strides.row, vis.l_eff - m0, E, aligned, tid);
    load_tile<T, kBN, kD, kStride, kNT>(sK, k + int64_t(nb_hi - 1) * kBN * p.k_strides.row, p.k_strides.row,
                                        vis.s_eff - (nb_hi - 1) * kBN, E, aligned, tid);
    cp_async_commit();
  }

  // ldmatrix row addresses: A operand / non-transposed B (rows = M or N) and
  // transposed B (rows = K); lane >> 3 picks the 8x8 matrix (see ptx.h).
  const int mi = lane >> 3, r8 = lane & 7;
  const uint32_t sQ_a = smem_addr(sQ + (warp_row0 + (mi & 1) * 8 + r8) * kStride + (mi >> 1) * 8);
  const uint32_t sK_b = smem_addr(sK + ((mi >> 1) * 8 + r8) * kStride + (mi & 1) * 8);
  const uint32_t sV_bt = smem_addr(sV + ((mi & 1) * 8 + r8) * kStride + (mi >> 1) * 8);

  for (int nb = nb_hi - 1; nb >= nb_lo; --nb) {
    const int n0 = nb * kBN;
    cp_async_wait<0>();
    __syncthreads();  // K (and Q) landed; every warp is done with the last V
    load_tile<T, kBN, kD, kStride, kNT>(sV, v + int64_t(n0) * p.v_strides.row, p.v_strides.row,
                                        vis.s_eff - n0, Ev, aligned, tid);
    cp_async_commit();

    // ---- S = Q @ K^T ------------------------------------------------------
    float s[kMT][kNTilesS][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int j = 0; j < kNTilesS; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][j][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      uint32_t a[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) ldmatrix_x4(a[mt], sQ_a + (mt * 16 * kStride + kk * 16) * sizeof(T));
#pragma unroll
      for (int np = 0; np < kBN / 16; ++np) {
        uint32_t bk[4];
        ldmatrix_x4(bk, sK_b + (np * 16 * kStride + kk * 16) * sizeof(T));
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          mma_16816<T>(s[mt][2 * np], a[mt], bk[0], bk[1]);
          mma_16816<T>(s[mt][2 * np + 1], a[mt], bk[2], bk[3]);
        }
      }
    }

    // ---- scale, mask, online softmax (base 2) -----------------------------
    const bool need_mask = dmask.base != nullptr || !vis.tile_all_visible(m0, kBM, n0, kBN);
    scale_and_mask<T>(s, need_mask, vis, dmask, m0 + warp_row0, n0, g, t, scale_log2);
    online_softmax(s, acc_o, row_max, row_sum);

    cp_async_wait<0>();
    __syncthreads();  // V landed; every warp is done with K
    if (nb > nb_lo) {
      load_tile<T, kBN, kD, kStride, kNT>(sK, k + int64_t(n0 - kBN) * p.k_strides.row, p.k_strides.row,
                                          vis.s_eff - (n0 - kBN), E, aligned, tid);
      cp_async_commit();
    }

    // ---- O += P @ V -------------------------------------------------------
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      uint32_t a[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) pack_p<T>(a[mt], s[mt], kk);
#pragma unroll
      for (int dp = 0; dp < kD / 16; ++dp) {
        uint32_t bv[4];
        ldmatrix_x4_trans(bv, sV_bt + (kk * 16 * kStride + dp * 16) * sizeof(T));
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          mma_16816<T>(acc_o[mt][2 * dp], a[mt], bv[0], bv[1]);
          mma_16816<T>(acc_o[mt][2 * dp + 1], a[mt], bv[2], bv[3]);
        }
      }
    }
  }

  // ---- epilogue: normalise, write out and lse -----------------------------
  T* out = static_cast<T*>(p.out) + b * p.o_strides.batch + h * p.o_strides.head;
  float* lse = static_cast<float*>(p.lse) + (int64_t(b) * p.heads_q + h) * L;
  write_rows<T>(acc_o, row_max, row_sum, out, p.o_strides.row, lse, m0 + warp_row0, L, Ev, g, t);
}

}  // namespace cuda
}  // namespace effattn
