// The backward kernels, recomputing P from the forward's lse (no L x S buffer):
//   1. bwd_delta_kernel: delta = rowsum(dO * O) - dlse, one warp per row
//      (and the lse in log2 units, both in p.delta: (2, B, Hq, L));
//   2. flash_bwd_kernel: one block per (key tile, column split, kv head,
//      batch). Each warp owns 16 keys and keeps their dK, dV (the split's
//      kHeadDimAcc columns) in float32 registers while the
//      block walks the query tiles of every q head of its group (GQA sums
//      there). Per query tile:  S^T = K Q^T,  P^T = exp2(S^T - lse),
//      dV += P^T dO,  dP^T = V dO^T,  dS^T = P^T (dP^T - delta),
//      dK += dS^T Q,  and dQ += dS K, added with float atomics into a
//      (B, Hq, L, E) float32 buffer (dS goes through shared memory for it);
//   3. bwd_dq_convert_kernel: dQ = scale * buffer, in dq's dtype and layout.
#pragma once

#include "block_utils.h"
#include "kernel_traits.h"

namespace effattn {
namespace cuda {

template <typename T>
__global__ void __launch_bounds__(256) bwd_delta_kernel(const __grid_constant__ BwdParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int64_t L = p.seqlen_q, H = p.heads_q;
  if (row >= p.batch * H * L) return;
  const int64_t i = row % L, h = (row / L) % H, b = row / (L * H);
  const T* o = static_cast<const T*>(p.out) + b * p.o_strides.batch + h * p.o_strides.head + i * p.o_strides.row;
  const T* d = static_cast<const T*>(p.dout) + b * p.do_strides.batch + h * p.do_strides.head +
               i * p.do_strides.row;
  float dot = 0.f;
  for (int c = lane; c < p.head_dim_v; c += 32) dot += to_float(o[c]) * to_float(d[c]);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffff, dot, off);
  if (lane == 0) {
    const float dlse = p.dlse != nullptr ? static_cast<const float*>(p.dlse)[row] : 0.f;
    const float lse = static_cast<const float*>(p.lse)[row];
    // A row that saw no key (padding past query_lengths included) has P = 0
    // everywhere: delta 0 keeps whatever its dO holds (a NaN) out of dS = P (dP - delta).
    static_cast<float*>(p.delta)[row] = lse == -INFINITY ? 0.f : dot - dlse;
    // The lse in log2 units for the main kernel, +inf for rows that saw no key
    // (lse = -inf): exp2(s - inf) = 0 gives them P = 0.
    static_cast<float*>(p.delta)[p.batch * H * L + row] = lse == -INFINITY ? INFINITY : lse * kLog2e;
  }
}

template <typename T>
__global__ void __launch_bounds__(256) bwd_dq_convert_kernel(const __grid_constant__ BwdParams p) {
  const int64_t E = p.head_dim, L = p.seqlen_q, H = p.heads_q;
  const int64_t n = p.batch * H * L * E;
  const float scale = static_cast<float>(p.scale);
  const float* acc = static_cast<const float*>(p.dq_accum);
  T* dq = static_cast<T*>(p.dq);
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = idx % E, row = idx / E;
    const int64_t i = row % L, h = (row / L) % H, b = row / (L * H);
    dq[b * p.dq_strides.batch + h * p.dq_strides.head + i * p.dq_strides.row + c] = from_float<T>(acc[idx] * scale);
  }
}

// The two warp-level products of the backward, each used twice.
// Shared x shared: acc (this warp's 16 rows x kN) = A @ B^T, A the warp's 16
// rows at a_addr, B kN rows at b_addr, both kK wide in shared memory (ldmatrix
// addresses as set up in the kernel). S^T = K Q^T and dP^T = V dO^T.
template <typename T, int kK, int kN, int kStride>
__device__ __forceinline__ void warp_rows_times_rows_t(float (&acc)[kN / 8][4], uint32_t a_addr, uint32_t b_addr) {
#pragma unroll
  for (int j = 0; j < kN / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    uint32_t a[4];
    ldmatrix_x4(a, a_addr + kk * 16 * sizeof(T));
#pragma unroll
    for (int np = 0; np < kN / 16; ++np) {
      uint32_t b[4];
      ldmatrix_x4(b, b_addr + (np * 16 * kStride + kk * 16) * sizeof(T));
      mma_16816<T>(acc[2 * np], a, b[0], b[1]);
      mma_16816<T>(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// Registers x shared: acc (16 x kN) += P @ B, P the warp's 16 x kK float
// accumulator fragments (rounded to T as the A operand), B kK rows x kN columns
// in shared memory read transposed from bt_addr. Each A fragment also goes to
// on_a(kk, a) first. dV += P^T dO and dK += dS^T Q (which stores dS^T on the way).
template <typename T, int kK, int kN, int kStride, typename OnA>
__device__ __forceinline__ void warp_frags_times_tile(float (&acc)[kN / 8][4], const float (&p)[kK / 8][4],
                                                      uint32_t bt_addr, OnA&& on_a) {
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    const uint32_t a[4] = {pack2<T>(p[2 * kk][0], p[2 * kk][1]), pack2<T>(p[2 * kk][2], p[2 * kk][3]),
                           pack2<T>(p[2 * kk + 1][0], p[2 * kk + 1][1]),
                           pack2<T>(p[2 * kk + 1][2], p[2 * kk + 1][3])};
    on_a(kk, a);
#pragma unroll
    for (int dp = 0; dp < kN / 16; ++dp) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, bt_addr + (kk * 16 * kStride + dp * 16) * sizeof(T));
      mma_16816<T>(acc[2 * dp], a, b[0], b[1]);
      mma_16816<T>(acc[2 * dp + 1], a, b[2], b[3]);
    }
  }
}

template <typename Traits>
__global__ void __launch_bounds__(Traits::kNThreads, 1)
    flash_bwd_kernel(const __grid_constant__ BwdParams p, const bool aligned) {
  using T = typename Traits::T;
  constexpr int kD = Traits::kHeadDim, kBM = Traits::kBlockM, kBN = Traits::kBlockN;
  constexpr int kStride = Traits::kStride, kStrideDs = Traits::kStrideDs, kNT = Traits::kNThreads;
  constexpr int kNTilesQ = kBM / 8;  // 8-wide n-tiles over the query tile
  constexpr int kDA = Traits::kHeadDimAcc;  // this block's columns of dK, dV, dQ
  constexpr int kNTilesDA = kDA / 8;         // 8-wide n-tiles over them

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + Traits::kSmemK;
  T* sQ = sV + Traits::kSmemV;                       // stage s at sQ + s * kSmemQ
  T* sdO = sQ + Traits::kStages * Traits::kSmemQ;     // stage s at sdO + s * kSmemDo
  T* sdS = sdO + Traits::kStages * Traits::kSmemDo;
  float* sLse = reinterpret_cast<float*>(sdS + Traits::kSmemDs);  // lse in log2 units, +inf: empty row
  float* sDelta = sLse + Traits::kStages * kBM;                   // stage s at + s * kBM

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int g = lane / 4, t = lane % 4;
  const int mi = lane >> 3, r8 = lane & 7;
  // The column splits of a key tile are neighbours in x: they run together and share its loads in L2.
  const int n_block = blockIdx.x / Traits::kColSplits, hk = blockIdx.y, b = blockIdx.z;
  const int col0 = (blockIdx.x % Traits::kColSplits) * kDA;
  const int group = p.heads_q / p.heads_kv;
  const int L = p.seqlen_q, S = p.seqlen_k, E = p.head_dim, Ev = p.head_dim_v;
  const int n0 = n_block * kBN;
  const float scale_log2 = static_cast<float>(p.scale) * kLog2e;

  Visibility vis{valid_length(p.query_lengths, b, L), valid_length(p.key_lengths, b, S), p.window_left,
                 p.window_right};

  int mb_lo, num_mb;  // the query tiles that can see one of this tile's keys
  bwd_query_blocks(p, vis, n0, kBN, kBM, &mb_lo, &num_mb);
  const int num_iters = num_mb * group;  // (q head of the group, query tile) pairs

  float acc_dk[kNTilesDA][4], acc_dv[kNTilesDA][4];
#pragma unroll
  for (int j = 0; j < kNTilesDA; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_dk[j][e] = acc_dv[j][e] = 0.f;

  auto load_q_do = [&](int it) {  // into stage it % 2
    const int h = hk * group + it / num_mb, m0 = (mb_lo + it % num_mb) * kBM;
    const int stage = it & 1;
    T* sQ_s = sQ + stage * Traits::kSmemQ;
    T* sdO_s = sdO + stage * Traits::kSmemDo;
    const T* q = static_cast<const T*>(p.q) + b * p.q_strides.batch + h * p.q_strides.head + m0 * p.q_strides.row;
    const T* d = static_cast<const T*>(p.dout) + b * p.do_strides.batch + h * p.do_strides.head +
                 m0 * p.do_strides.row;
    load_tile<T, kBM, kD, kStride, kNT>(sQ_s, q, p.q_strides.row, vis.l_eff - m0, E, aligned, tid);
    load_tile<T, kBM, kD, kStride, kNT>(sdO_s, d, p.do_strides.row, vis.l_eff - m0, Ev, aligned, tid);
    if (tid < kBM) {  // rows past L read nothing: zeros (their tiles are masked)
      const int64_t row = (int64_t(b) * p.heads_q + h) * L + m0 + tid;
      const bool ok = m0 + tid < L;
      const float* delta = static_cast<const float*>(p.delta);
      cp_async_4(smem_addr(sLse + stage * kBM + tid), ok ? delta + p.batch * p.heads_q * L + row : delta, ok);
      cp_async_4(smem_addr(sDelta + stage * kBM + tid), ok ? delta + row : delta, ok);
    }
    cp_async_commit();
  };

  if (num_iters > 0) {
    const T* k = static_cast<const T*>(p.k) + b * p.k_strides.batch + hk * p.k_strides.head + n0 * p.k_strides.row;
    const T* v = static_cast<const T*>(p.v) + b * p.v_strides.batch + hk * p.v_strides.head + n0 * p.v_strides.row;
    load_tile<T, kBN, kD, kStride, kNT>(sK, k, p.k_strides.row, vis.s_eff - n0, E, aligned, tid);
    load_tile<T, kBN, kD, kStride, kNT>(sV, v, p.v_strides.row, vis.s_eff - n0, Ev, aligned, tid);
    cp_async_commit();
    load_q_do(0);
  }

  // ldmatrix row addresses (see ptx.h): A operands from the warp's 16 keys;
  // B operands with rows = queries (non-transposed) or rows = k-dim (transposed).
  const uint32_t sK_a = smem_addr(sK + (warp * 16 + (mi & 1) * 8 + r8) * kStride + (mi >> 1) * 8);
  const uint32_t sV_a = smem_addr(sV + (warp * 16 + (mi & 1) * 8 + r8) * kStride + (mi >> 1) * 8);
  const uint32_t sQ_b = smem_addr(sQ + ((mi >> 1) * 8 + r8) * kStride + (mi & 1) * 8);
  const uint32_t sdO_b = smem_addr(sdO + ((mi >> 1) * 8 + r8) * kStride + (mi & 1) * 8);
  const uint32_t sQ_bt = smem_addr(sQ + ((mi & 1) * 8 + r8) * kStride + (mi >> 1) * 8);
  const uint32_t sdO_bt = smem_addr(sdO + ((mi & 1) * 8 + r8) * kStride + (mi >> 1) * 8);
  // dQ = dS @ K: this warp's 16 query rows and kDqCols columns.
  const int dq_row0 = (warp % Traits::kWarpsM) * 16, dq_col0 = col0 + (warp / Traits::kWarpsM) * Traits::kDqCols;
  const uint32_t sdS_at = smem_addr(sdS + ((mi >> 1) * 8 + r8) * kStrideDs + dq_row0 + (mi & 1) * 8);
  const uint32_t sK_bt = smem_addr(sK + ((mi & 1) * 8 + r8) * kStride + dq_col0 + (mi >> 1) * 8);

  const int key_local0 = warp * 16 + g;  // this thread's keys: +0 and +8

  for (int it = 0; it < num_iters; ++it) {
    const int h = hk * group + it / num_mb, m0 = (mb_lo + it % num_mb) * kBM;
    const int64_t bh = int64_t(b) * p.heads_q + h;
    cp_async_wait<0>();
    __syncthreads();  // this step's Q, dO, lse, delta (and K, V) landed; the last step is done
    if (it + 1 < num_iters) load_q_do(it + 1);  // the other stage: overlaps this whole step
    // This step's stage: byte offsets for the ldmatrix addresses, pointers for lse/delta.
    const int stage = it & 1;
    const uint32_t q_off = stage * Traits::kSmemQ * sizeof(T), do_off = stage * Traits::kSmemDo * sizeof(T);
    const float* sLse_s = sLse + stage * kBM;
    const float* sDelta_s = sDelta + stage * kBM;

    // ---- S^T = K @ Q^T (this warp's 16 keys x kBM queries) ---------------
    float ps[kNTilesQ][4];  // S^T, then P^T, then dS^T
    warp_rows_times_rows_t<T, kD, kBM, kStride>(ps, sK_a, sQ_b + q_off);

    // ---- P^T = exp2(scale * S^T + bias - lse), masked ---------------------
    const DenseMask<T> dmask = dense_mask<T>(p, b, h);
    const bool need_mask = dmask.base != nullptr || !vis.tile_all_visible(m0, kBM, n0, kBN);
    bwd_probabilities<T>(ps, need_mask, vis, dmask, m0, n0 + key_local0, t, scale_log2,
                         [&](int j, int c) { return sLse_s[j * 8 + 2 * t + c]; });

    // ---- dV += P^T @ dO -----------------------------------------------------
    warp_frags_times_tile<T, kBM, kDA, kStride>(acc_dv, ps, sdO_bt + do_off + col0 * sizeof(T),
                                                [](int, const uint32_t (&)[4]) {});

    // ---- dP^T = V @ dO^T, then dS^T = P^T * (dP^T - delta) -----------------
    {
      float dp_acc[kNTilesQ][4];
      warp_rows_times_rows_t<T, kD, kBM, kStride>(dp_acc, sV_a, sdO_b + do_off);
#pragma unroll
      for (int j = 0; j < kNTilesQ; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) ps[j][e] *= dp_acc[j][e] - sDelta_s[j * 8 + 2 * t + (e & 1)];
    }

    // ---- dK += dS^T @ Q; dS^T to shared memory for dQ ----------------------
    warp_frags_times_tile<T, kBM, kDA, kStride>(
        acc_dk, ps, sQ_bt + q_off + col0 * sizeof(T), [&](int kk, const uint32_t (&a)[4]) {
          *reinterpret_cast<uint32_t*>(sdS + key_local0 * kStrideDs + kk * 16 + 2 * t) = a[0];
          *reinterpret_cast<uint32_t*>(sdS + (key_local0 + 8) * kStrideDs + kk * 16 + 2 * t) = a[1];
          *reinterpret_cast<uint32_t*>(sdS + key_local0 * kStrideDs + kk * 16 + 8 + 2 * t) = a[2];
          *reinterpret_cast<uint32_t*>(sdS + (key_local0 + 8) * kStrideDs + kk * 16 + 8 + 2 * t) = a[3];
        });
    __syncthreads();  // dS^T complete

    // ---- dQ += dS @ K (float atomics; scaled at conversion) ----------------
    {
      uint32_t a_ds[kBN / 16][4];
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk) ldmatrix_x4_trans(a_ds[kk], sdS_at + kk * 16 * kStrideDs * sizeof(T));
      float* dq_acc = static_cast<float*>(p.dq_accum) + bh * L * E;
#pragma unroll
      for (int dp = 0; dp < Traits::kDqCols / 16; ++dp) {
        float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
        for (int kk = 0; kk < kBN / 16; ++kk) {
          uint32_t bk[4];
          ldmatrix_x4_trans(bk, sK_bt + (kk * 16 * kStride + dp * 16) * sizeof(T));
          mma_16816<T>(acc[0], a_ds[kk], bk[0], bk[1]);
          mma_16816<T>(acc[1], a_ds[kk], bk[2], bk[3]);
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int i = m0 + dq_row0 + g + r * 8;
          if (i >= vis.l_eff) continue;
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) {
            const int c = dq_col0 + dp * 16 + nt * 8 + 2 * t;
            add_dq_pair(dq_acc + int64_t(i) * E + c, c, E, acc[nt][2 * r], acc[nt][2 * r + 1]);
          }
        }
      }
    }
  }

  write_dk_dv<T>(acc_dk, acc_dv, p, b, hk, n0 + key_local0, col0, t);  // block_utils.h
}

}  // namespace cuda
}  // namespace effattn
