// The Hopper backward (sm_90a) main kernel: the algorithm of flash_bwd_kernel.h
// (recompute P from the lse, dK and dV in registers per key tile, dQ added with
// float atomics into the float32 buffer that bwd_dq_convert_kernel finishes;
// delta and the log2 lse from bwd_delta_kernel), on TMA and wgmma:
//   - one block per (128-key tile, kv head, batch); warpgroup w owns keys
//     [64 w, 64 w + 64) of the tile (wgmma's M) and their dK, dV (64 x D floats);
//   - K and V land once by TMA; Q and dO of each 64-query step (every q head of
//     the group, as in the sm_80 kernel) stream through a kStages-deep TMA ring;
//   - per step, per warpgroup: S^T = K Q^T and dP^T = V dO^T (wgmma, both
//     operands K-major in shared memory), P^T = exp2(S^T - lse), dS^T =
//     P^T (dP^T - delta), then dV += P^T dO and dK += dS^T Q (P^T, dS^T from
//     registers; dO, Q as MN-major operands);
//   - dS^T goes to shared memory (swizzled, double-buffered); after one block
//     barrier each warpgroup computes dQ = dS K for 64 of the 128 columns over
//     all 128 keys (both operands MN-major), or at D = 64 all 64 columns over
//     its own 64 keys, and adds it with float atomics.
// The barrier also frees the step's Q/dO stage, which thread 0 then refills.
// Rows past the lengths that TMA loaded from inside the tensors are zeroed in
// shared memory (0 * NaN would leak otherwise), as the sm_80 kernel's loads do.
#pragma once

#include <cuda.h>

#include "block_utils.h"
#include "kernel_traits.h"
#include "sm90.h"

namespace effattn {
namespace cuda {

// TMA descriptors (Sm90Maps' format): q and dout (64-column x kBlockM boxes), k and v (x kBlockN).
struct Sm90BwdMaps {
  CUtensorMap q, k, v, dout;
};

template <typename Traits>
__global__ void __launch_bounds__(Traits::kNThreads, 1)
    flash_bwd_sm90_kernel(const __grid_constant__ BwdParams p, const __grid_constant__ Sm90BwdMaps maps) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = typename Traits::T;
  constexpr int kD = Traits::kHeadDim, kBM = Traits::kBlockM, kBN = Traits::kBlockN;
  constexpr int kStages = Traits::kStages, kPanels = Traits::kPanels, kNT = Traits::kNThreads;
  constexpr uint32_t kPanelKV = Traits::kPanelBytesKV, kPanelQ = Traits::kPanelBytesQ;
  constexpr uint32_t kTileKV = Traits::kTileBytesKV, kTileQ = Traits::kTileBytesQ, kTileDs = Traits::kTileBytesDs;
  constexpr int kNTilesQ = kBM / 8;                // S^T, dP^T: 64 keys x kBM queries per warpgroup
  constexpr int kNTilesD = kD / 8;                 // dK, dV: 64 keys x D
  constexpr int kNTilesDq = Traits::kDqCols / 8;   // dQ: kBM queries x kDqCols

  extern __shared__ __align__(1024) unsigned char smem_bwd_sm90[];
  const uint32_t sK = (smem_addr(smem_bwd_sm90) + 1023u) & ~1023u;
  const uint32_t sV = sK + kTileKV;
  const uint32_t sQ = sV + kTileKV;                // stage s: sQ + s * kTileQ
  const uint32_t sdO = sQ + kStages * kTileQ;      // stage s: sdO + s * kTileQ
  const uint32_t sdS = sdO + kStages * kTileQ;     // buffer it % 2: sdS + (it % 2) * kTileDs
  const uint32_t bar_kv = sdS + 2 * kTileDs;       // then full[s]: Q and dO of stage s
  auto full = [&](int s) { return bar_kv + 8u * (1 + s); };

  const int tid = threadIdx.x, wg = tid / 128, lane = tid % 32, warp_in_wg = (tid % 128) / 32;
  const int g = lane / 4, t = lane % 4;
  const int n_block = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const int group = p.heads_q / p.heads_kv;
  const int L = p.seqlen_q, S = p.seqlen_k, E = p.head_dim;
  const int n0 = n_block * kBN;
  const int key_row0 = wg * 64 + warp_in_wg * 16;  // this warp's 16 keys in the tile (and + g, + g + 8)
  const float scale_log2 = static_cast<float>(p.scale) * kLog2e;

  Visibility vis{valid_length(p.query_lengths, b, L), valid_length(p.key_lengths, b, S), p.window_left,
                 p.window_right};
  int mb_lo, num_mb;
  bwd_query_blocks(p, vis, n0, kBN, kBM, &mb_lo, &num_mb);
  const int num_iters = num_mb * group;  // (q head of the group, query tile) pairs

  if (tid == 0) {
    mbar_init(bar_kv, 1);
    for (int s = 0; s < kStages; ++s) mbar_init(full(s), 1);
    mbar_fence_init();
  }
  __syncthreads();

  // Thread 0 only: Q and dO of step `it` into stage it % kStages.
  auto load_q_do = [&](int it) {
    const int s = it % kStages, h = hk * group + it / num_mb, m0 = (mb_lo + it % num_mb) * kBM;
    mbar_arrive_expect_tx(full(s), 2 * kTileQ);
#pragma unroll
    for (int pn = 0; pn < kPanels; ++pn) {
      tma_load_4d(sQ + s * kTileQ + pn * kPanelQ, &maps.q, full(s), pn * kPanelCols, m0, h, b);
      tma_load_4d(sdO + s * kTileQ + pn * kPanelQ, &maps.dout, full(s), pn * kPanelCols, m0, h, b);
    }
  };
  if (tid == 0 && num_iters > 0) {
    mbar_arrive_expect_tx(bar_kv, 2 * kTileKV);
#pragma unroll
    for (int pn = 0; pn < kPanels; ++pn) {
      tma_load_4d(sK + pn * kPanelKV, &maps.k, bar_kv, pn * kPanelCols, n0, hk, b);
      tma_load_4d(sV + pn * kPanelKV, &maps.v, bar_kv, pn * kPanelCols, n0, hk, b);
    }
    for (int it = 0; it < kStages && it < num_iters; ++it) load_q_do(it);
  }

  float acc_dk[kNTilesD][4], acc_dv[kNTilesD][4];
#pragma unroll
  for (int j = 0; j < kNTilesD; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_dk[j][e] = acc_dv[j][e] = 0.f;

  if (num_iters > 0) {
    mbar_wait(bar_kv, 0);
    if (n0 + kBN > vis.s_eff && vis.s_eff < S) {  // keys past key_lengths inside the tensor: zeros
      zero_rows(sK, kPanels, kPanelKV, max(0, vis.s_eff - n0), kBN, tid, kNT);
      zero_rows(sV, kPanels, kPanelKV, max(0, vis.s_eff - n0), kBN, tid, kNT);
      fence_proxy_async_shared();
      __syncthreads();
    }
  }
  const uint32_t sK_wg = sK + wg * 64 * 128, sV_wg = sV + wg * 64 * 128;  // this warpgroup's 64 keys
  const float* delta_all = static_cast<const float*>(p.delta);
  const float* lse_all = delta_all + int64_t(p.batch) * p.heads_q * L;  // log2 units, +inf: empty row

  for (int it = 0; it < num_iters; ++it) {
    const int s = it % kStages;
    const uint32_t phase = (it / kStages) & 1;
    const int h = hk * group + it / num_mb, m0 = (mb_lo + it % num_mb) * kBM;
    const int64_t bh = int64_t(b) * p.heads_q + h;
    const uint32_t sQ_s = sQ + s * kTileQ, sdO_s = sdO + s * kTileQ, sdS_b = sdS + (it % 2) * kTileDs;

    // This thread's query columns 8 j + 2 t + c: their lse (read now, used after S^T).
    float lse_c[kNTilesQ][2];
#pragma unroll
    for (int j = 0; j < kNTilesQ; ++j)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int i = m0 + j * 8 + 2 * t + c;
        lse_c[j][c] = i < L ? lse_all[bh * L + i] : INFINITY;
      }

    mbar_wait(full(s), phase);
    if (m0 + kBM > vis.l_eff && vis.l_eff < L) {  // queries past query_lengths inside the tensor: zeros
      zero_rows(sQ_s, kPanels, kPanelQ, max(0, vis.l_eff - m0), kBM, tid, kNT);
      zero_rows(sdO_s, kPanels, kPanelQ, max(0, vis.l_eff - m0), kBM, tid, kNT);
      fence_proxy_async_shared();
      __syncthreads();
    }

    // ---- S^T = K Q^T (64 keys x kBM queries) ------------------------------------
    float acc_s[kNTilesQ][4];  // S^T, then P^T, then dS^T
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      const uint32_t off_kv = (kk / 4) * kPanelKV + (kk % 4) * 32, off_q = (kk / 4) * kPanelQ + (kk % 4) * 32;
      Wgmma<T, kBM>::ss(acc_s, gmma_desc_k_major(sK_wg + off_kv), gmma_desc_k_major(sQ_s + off_q), kk > 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(acc_s);

    // ---- P^T = exp2(scale * S^T + bias - lse), masked ----------------------------
    const DenseMask<T> dmask = dense_mask<T>(p, b, h);
    const bool need_mask = dmask.base != nullptr || !vis.tile_all_visible(m0, kBM, n0, kBN);
    bwd_probabilities<T>(acc_s, need_mask, vis, dmask, m0, n0 + key_row0 + g, t, scale_log2,
                         [&](int j, int c) { return lse_c[j][c]; });

    // ---- dV += P^T dO (P^T from registers, dO MN-major) ----------------------------
    {
      uint32_t a_p[kBM / 16][4];
#pragma unroll
      for (int kk = 0; kk < kBM / 16; ++kk) pack_p<T>(a_p[kk], acc_s, kk);
      fence_operands(acc_dv);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kBM / 16; ++kk)
        Wgmma<T, kD>::rs(acc_dv, a_p[kk], gmma_desc_mn_major(sdO_s + kk * 16 * 128, kPanelQ), 1);
      wgmma_commit();
      wgmma_wait<0>();
      fence_operands(acc_dv);
      fence_operands(a_p);
    }

    // ---- dP^T = V dO^T, then dS^T = P^T (dP^T - delta) ------------------------------
    {
      float acc_dp[kNTilesQ][4];
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
        const uint32_t off_kv = (kk / 4) * kPanelKV + (kk % 4) * 32, off_q = (kk / 4) * kPanelQ + (kk % 4) * 32;
        Wgmma<T, kBM>::ss(acc_dp, gmma_desc_k_major(sV_wg + off_kv), gmma_desc_k_major(sdO_s + off_q), kk > 0);
      }
      wgmma_commit();
      float delta_c[kNTilesQ][2];  // loaded while the MMAs run
#pragma unroll
      for (int j = 0; j < kNTilesQ; ++j)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int i = m0 + j * 8 + 2 * t + c;
          delta_c[j][c] = i < L ? delta_all[bh * L + i] : 0.f;
        }
      wgmma_wait<0>();
      fence_operands(acc_dp);
#pragma unroll
      for (int j = 0; j < kNTilesQ; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_s[j][e] *= acc_dp[j][e] - delta_c[j][e & 1];
    }

    // ---- dK += dS^T Q (Q MN-major); dS^T to shared memory for dQ -------------------
    {
      uint32_t a_ds[kBM / 16][4];
#pragma unroll
      for (int kk = 0; kk < kBM / 16; ++kk) {
        pack_p<T>(a_ds[kk], acc_s, kk);
        // a_ds[kk][r]: keys key_row0 + g (+ 8 for r odd), queries 16 kk + 2 t (+ 8 for r >= 2).
#pragma unroll
        for (int r = 0; r < 4; ++r)
          st_shared_b32(sdS_b + sw128_offset(key_row0 + g + (r & 1) * 8, kk * 16 + (r >> 1) * 8 + 2 * t),
                        a_ds[kk][r]);
      }
      fence_operands(acc_dk);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kBM / 16; ++kk)
        Wgmma<T, kD>::rs(acc_dk, a_ds[kk], gmma_desc_mn_major(sQ_s + kk * 16 * 128, kPanelQ), 1);
      wgmma_commit();
      wgmma_wait<0>();
      fence_operands(acc_dk);
      fence_operands(a_ds);
    }

    // Every warpgroup's dS^T is written and every read of this stage's Q and dO is done.
    fence_proxy_async_shared();
    __syncthreads();
    if (tid == 0 && it + kStages < num_iters) load_q_do(it + kStages);

    // ---- dQ += dS K: kBM queries x this warpgroup's kDqCols columns, over kDqKeys keys ----
    {
      // D = 128: columns [64 wg, 64 wg + 64) = K's panel wg, every key; D = 64: K's one
      // panel, this warpgroup's 64 keys (rows 64 wg.. of dS^T and of K).
      float acc_dq[kNTilesDq][4];
      wgmma_fence();
      if constexpr (Traits::kDqByKeys) {
#pragma unroll
        for (int kk = 0; kk < Traits::kDqKeys / 16; ++kk)  // 16 keys: 16 rows of dS^T and of K
          Wgmma<T, Traits::kDqCols>::template ss<1>(acc_dq, gmma_desc_mn_major(sdS_b + (wg * 64 + kk * 16) * 128, kTileDs),
                                           gmma_desc_mn_major(sK + (wg * 64 + kk * 16) * 128, kPanelKV), kk > 0);
      } else {
#pragma unroll
        for (int kk = 0; kk < Traits::kDqKeys / 16; ++kk)
          Wgmma<T, Traits::kDqCols>::template ss<1>(acc_dq, gmma_desc_mn_major(sdS_b + kk * 16 * 128, kTileDs),
                                           gmma_desc_mn_major(sK + wg * kPanelKV + kk * 16 * 128, kPanelKV),
                                           kk > 0);
      }
      wgmma_commit();
      wgmma_wait<0>();
      fence_operands(acc_dq);
      float* dq_acc = static_cast<float*>(p.dq_accum) + bh * L * E;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int i = m0 + warp_in_wg * 16 + g + r * 8;
        if (i >= vis.l_eff) continue;
#pragma unroll
        for (int j = 0; j < kNTilesDq; ++j) {
          const int c = (Traits::kDqByKeys ? 0 : wg * Traits::kDqCols) + j * 8 + 2 * t;
          add_dq_pair(dq_acc + int64_t(i) * E + c, c, E, acc_dq[j][2 * r], acc_dq[j][2 * r + 1]);
        }
      }
    }
    __syncwarp();
  }

  write_dk_dv<T>(acc_dk, acc_dv, p, b, hk, n0 + key_row0 + g, 0, t);  // block_utils.h
#elif defined(__CUDA_ARCH__)
  __trap();  // never launched from code for other targets (see flash_fwd_sm90_kernel.h)
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
}

}  // namespace cuda
}  // namespace effattn
