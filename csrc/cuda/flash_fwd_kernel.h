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

  // Key range this query tile can see.
  int n_lo = 0, n_hi = vis.s_eff;
  if (p.window_left >= 0) n_lo = static_cast<int>(max(int64_t(0), int64_t(m0) - p.window_left));
  if (p.window_right >= 0) n_hi = static_cast<int>(min(int64_t(n_hi), int64_t(m0) + kBM + p.window_right));
  if (m0 >= vis.l_eff) n_hi = n_lo;
  const int nb_lo = n_lo / kBN;
  const int nb_hi = n_hi > n_lo ? (n_hi + kBN - 1) / kBN : nb_lo;

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
    if (need_mask) {
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int j = 0; j < kNTilesS; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int i = m0 + warp_row0 + mt * 16 + g + (e >> 1) * 8, jj = n0 + j * 8 + 2 * t + (e & 1);
            bool ok = vis(i, jj);
            float bias = 0.f;
            if (ok && dmask.base != nullptr) bias = dmask.bias_log2(i, jj, &ok);
            s[mt][j][e] = ok ? s[mt][j][e] * scale_log2 + bias : -INFINITY;
          }
    } else {
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int j = 0; j < kNTilesS; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[mt][j][e] *= scale_log2;
    }
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
          acc_o[mt][j][2 * r] *= alpha;
          acc_o[mt][j][2 * r + 1] *= alpha;
        }
      }

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
      for (int mt = 0; mt < kMT; ++mt) {
        a[mt][0] = pack2<T>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        a[mt][1] = pack2<T>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        a[mt][2] = pack2<T>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        a[mt][3] = pack2<T>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
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
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float sum = row_sum[mt][r];
      sum += __shfl_xor_sync(0xffffffff, sum, 1);
      sum += __shfl_xor_sync(0xffffffff, sum, 2);
      // A row that saw no key: out = 0, lse = -inf (a NaN sum stays NaN).
      const float inv = sum == 0.f ? 0.f : 1.f / sum;
      const int i = m0 + warp_row0 + mt * 16 + g + r * 8;
      if (i < L) {
        T* orow = out + i * p.o_strides.row;
#pragma unroll
        for (int j = 0; j < kNTilesO; ++j)
          store2<T>(orow, j * 8 + 2 * t, Ev, acc_o[mt][j][2 * r] * inv, acc_o[mt][j][2 * r + 1] * inv);
        if (t == 0) lse[i] = sum == 0.f ? -INFINITY : (row_max[mt][r] + __log2f(sum)) * kLn2;
      }
    }
}

}  // namespace cuda
}  // namespace effattn
