// The Hopper forward (sm_90a): the same algorithm and semantics as
// flash_fwd_kernel.h (online softmax in base 2, float32 accumulators, out and
// lse written once; window, lengths, dense mask, GQA), on Hopper's own
// machinery instead of mma.sync:
//   - TMA: one thread issues whole-tile copies (Q once, then K and V per key
//     block into a kStages-deep ring); they complete on mbarriers with a
//     transaction count, land 128-byte swizzled, and zero-fill rows and
//     columns past the tensor's end.
//   - wgmma: each of the 2 warpgroups owns 64 query rows. S = Q K^T reads both
//     operands straight from shared memory (K-major descriptors); O += P V
//     takes P from registers (the S accumulator's layout is the A fragment's)
//     and V from shared memory as an MN-major (transposed) operand.
//   - The ring: a stage's "full" barriers (K, V separately, so Q K^T starts
//     before V lands), and its release counter: once a warpgroup's P V MMAs
//     are done (the warpgroup meets at its own named barrier), one of its
//     threads counts it in, and the second warpgroup to count refills the
//     stage. No thread ever waits for the other warpgroup, only for data, so
//     the warpgroups drift up to kStages - 1 steps apart (one's softmax
//     overlapping the other's MMAs) and no extra producer warp (nor its
//     registers) is needed.
// Tiles (Sm90FwdTraits): 128 query rows x kBlockN keys per step; key blocks in
// reverse like the sm_80 kernel (the partly masked ones first).
#pragma once

#include <cuda.h>  // CUtensorMap (a plain 128-byte struct; no driver call from device code)

#include "block_utils.h"
#include "kernel_traits.h"
#include "sm90.h"

namespace effattn {
namespace cuda {

// TMA descriptors of q (E, Lq, Hq, B), k (E, Lk, Hkv, B) and v (Ev, Lk, Hkv, B),
// innermost dim first, boxes of 64 columns x kBlockM (q) or kBlockN rows.
struct Sm90Maps {
  CUtensorMap q, k, v;
};

template <typename Traits>
__global__ void __launch_bounds__(Traits::kNThreads, 1)
    flash_fwd_sm90_kernel(const __grid_constant__ FwdParams p, const __grid_constant__ Sm90Maps maps) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = typename Traits::T;
  constexpr int kD = Traits::kHeadDim, kBM = Traits::kBlockM, kBN = Traits::kBlockN;
  constexpr int kStages = Traits::kStages, kPanels = Traits::kPanels;
  constexpr uint32_t kPanelQ = Traits::kPanelBytesQ, kPanelKV = Traits::kPanelBytesKV;
  constexpr uint32_t kTileQ = Traits::kTileBytesQ, kTileKV = Traits::kTileBytesKV;
  constexpr int kNTilesS = kBN / 8, kNTilesO = kD / 8;

  extern __shared__ __align__(1024) unsigned char smem_sm90[];
  const uint32_t sQ = (smem_addr(smem_sm90) + 1023u) & ~1023u;
  const uint32_t sK = sQ + kTileQ;                  // stage s: sK + s * kTileKV
  const uint32_t sV = sK + kStages * kTileKV;       // stage s: sV + s * kTileKV
  const uint32_t bar_q = sV + kStages * kTileKV;    // then full_k[s], full_v[s], released[s]
  auto full_k = [&](int s) { return bar_q + 8u * (1 + s); };
  auto full_v = [&](int s) { return bar_q + 8u * (1 + kStages + s); };
  auto released = [&](int s) { return bar_q + 8u * (1 + 2 * kStages + s); };  // a 32-bit counter

  const int tid = threadIdx.x, wg = tid / 128, lane = tid % 32, warp_in_wg = (tid % 128) / 32;
  const int g = lane / 4, t = lane % 4;
  const int m_block = gridDim.x - 1 - blockIdx.x;  // heavy (causal: late) tiles first
  const int h = blockIdx.y, b = blockIdx.z;
  const int hk = h / (p.heads_q / p.heads_kv);
  const int L = p.seqlen_q, S = p.seqlen_k, Ev = p.head_dim_v;
  const int m0 = m_block * kBM;
  const int row0 = m0 + wg * 64 + warp_in_wg * 16;  // this warp's 16 rows

  Visibility vis{valid_length(p.query_lengths, b, L), valid_length(p.key_lengths, b, S), p.window_left,
                 p.window_right};
  const DenseMask<T> dmask = dense_mask<T>(p, b, h);
  const float scale_log2 = static_cast<float>(p.scale) * kLog2e;
  int nb_lo, nb_hi;
  fwd_key_blocks(p, vis, m0, kBM, kBN, &nb_lo, &nb_hi);
  const int n_blocks = nb_hi - nb_lo;  // step it reads key block nb_hi - 1 - it

  if (tid == 0) {
    mbar_init(bar_q, 1);
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full_k(s), 1);
      mbar_init(full_v(s), 1);
      st_shared_b32(released(s), 0u);
    }
    mbar_fence_init();
  }
  __syncthreads();

  // One thread: the K and V tiles of step `it` into stage it % kStages.
  auto load_kv = [&](int it) {
    const int s = it % kStages, n0 = (nb_hi - 1 - it) * kBN;
    mbar_arrive_expect_tx(full_k(s), kTileKV);
#pragma unroll
    for (int pn = 0; pn < kPanels; ++pn) tma_load_4d(sK + s * kTileKV + pn * kPanelKV, &maps.k, full_k(s), pn * kPanelCols, n0, hk, b);
    mbar_arrive_expect_tx(full_v(s), kTileKV);
#pragma unroll
    for (int pn = 0; pn < kPanels; ++pn) tma_load_4d(sV + s * kTileKV + pn * kPanelKV, &maps.v, full_v(s), pn * kPanelCols, n0, hk, b);
  };
  if (tid == 0 && n_blocks > 0) {
    mbar_arrive_expect_tx(bar_q, kTileQ);
#pragma unroll
    for (int pn = 0; pn < kPanels; ++pn) tma_load_4d(sQ + pn * kPanelQ, &maps.q, bar_q, pn * kPanelCols, m0, h, b);
    for (int it = 0; it < kStages && it < n_blocks; ++it) load_kv(it);
  }

  // One 16-row m-tile per warp: the [1] is the shared helpers' m-tile dim (block_utils.h).
  float acc_o[1][kNTilesO][4];
#pragma unroll
  for (int j = 0; j < kNTilesO; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_o[0][j][e] = 0.f;
  float row_max[1][2] = {{-INFINITY, -INFINITY}}, row_sum[1][2] = {{0.f, 0.f}};

  if (n_blocks > 0) mbar_wait(bar_q, 0);
  const uint32_t sQ_wg = sQ + wg * 64 * 128;  // this warpgroup's 64 rows in each Q panel

  for (int it = 0; it < n_blocks; ++it) {
    const int s = it % kStages;
    const uint32_t phase = (it / kStages) & 1;
    const int n0 = (nb_hi - 1 - it) * kBN;

    // ---- S = Q K^T: D / 16 k-steps, 16 columns (32 bytes) of a panel each ----
    float acc_s[1][kNTilesS][4];
    mbar_wait(full_k(s), phase);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      const uint32_t col_bytes = (kk % 4) * 32;
      Wgmma<T, kBN>::ss(acc_s[0], gmma_desc_k_major(sQ_wg + (kk / 4) * kPanelQ + col_bytes),
                        gmma_desc_k_major(sK + s * kTileKV + (kk / 4) * kPanelKV + col_bytes), kk > 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(acc_s[0]);

    // ---- scale, mask, online softmax (block_utils.h) -------------------------
    const bool need_mask = dmask.base != nullptr || !vis.tile_all_visible(m0, kBM, n0, kBN);
    scale_and_mask<T>(acc_s, need_mask, vis, dmask, row0, n0, g, t, scale_log2);
    online_softmax(acc_s, acc_o, row_max, row_sum);
    uint32_t a_p[kBN / 16][4];
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) pack_p<T>(a_p[kk], acc_s[0], kk);

    // ---- O += P V: kBlockN / 16 k-steps of 16 keys (16 V rows: 2048 bytes) ----
    mbar_wait(full_v(s), phase);
    if (n0 + kBN > vis.s_eff && vis.s_eff < S) {
      // Keys past this batch's key_lengths but inside the tensor hold whatever
      // the caller left there: P is 0 for them, but 0 * NaN is NaN, so their V
      // rows become zeros (as the sm_80 kernel's loads make them). TMA already
      // zero-filled rows past the tensor. Block-uniform, so __syncthreads is safe.
      zero_rows(sV + s * kTileKV, kPanels, kPanelKV, max(0, vis.s_eff - n0), kBN, tid, Traits::kNThreads);
      fence_proxy_async_shared();
      __syncthreads();
    }
    fence_operands(acc_o[0]);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk)
      Wgmma<T, kD>::rs(acc_o[0], a_p[kk], gmma_desc_mn_major(sV + s * kTileKV + kk * 16 * 128, kPanelKV), 1);
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(acc_o[0]);
    fence_operands(a_p);

    // Stage s is free once both warpgroups' MMAs have read it: each meets at
    // its own barrier (its 4 warps' wgmma_wait are behind it), one thread counts
    // it in, and the second to count (an odd old value) refills the stage.
    if (it + kStages < n_blocks) {
      named_barrier_sync(1 + wg, 128);
      if (tid % 128 == 0 && (shared_count_in(released(s)) & 1u)) load_kv(it + kStages);
      __syncwarp();
    }
  }

  // ---- epilogue: normalise, write out and lse (block_utils.h) -------------------
  T* out = static_cast<T*>(p.out) + b * p.o_strides.batch + h * p.o_strides.head;
  float* lse = static_cast<float*>(p.lse) + (int64_t(b) * p.heads_q + h) * L;
  write_rows<T>(acc_o, row_max, row_sum, out, p.o_strides.row, lse, row0, L, Ev, g, t);
#elif defined(__CUDA_ARCH__)
  // Code for any other target never computes this: the host launches the kernel only
  // on sm_90 devices of a build with sm_90a code, so getting here is a loud error,
  // never an output left unwritten.
  __trap();
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
}

}  // namespace cuda
}  // namespace effattn
