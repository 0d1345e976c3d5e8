// CPU backward: recomputes the probabilities from the saved log-sum-exp
// instead of storing them (FlashAttention-2's backward on the CPU).
//
// Pass 1 (rows in parallel):  delta_i = sum_e dO_ie * O_ie  - dlse_i
//   (dlse is the gradient reaching the returned LSE, usually absent.)
// Pass 2, work item = (batch, kv-head, key split s). A split owns the key
// tiles s, s + S, s + 2S, ... (S = num_key_splits, > 1 only when batch x
// kv-heads is too small to keep every thread busy). For each owned key tile
// [j0, j0 + kBlockN), K, K^T, V^T are loaded once and dK, dV accumulate in
// registers/L1 while every query head of the GQA group and every query tile
// that can see these keys streams past:
//   S  = scale * Q K^T + bias            P  = exp(S - lse)   (0 if lse = -inf)
//   dV += P^T dO                         dP = dO V^T
//   dS = P * (dP - delta)                dK += scale * dS^T Q
//   dQ_accum[s] += scale * dS K
// dK, dV are written once per tile (an item owns them: no races); dQ goes to
// a per-split accumulator (S x B x Hq x Lq x E, accumulator type).
// Pass 3 (rows in parallel): dQ = sum over splits of dQ_accum, converted.
// Keys past key_lengths[b] and queries past query_lengths[b] get zero grads.
// Memory: O(B * Hq * Lq * (1 + S * E)) scratch; nothing of size Lq x Lk.
#pragma once

#include <vector>

#include <torch/csrc/stable/ops.h>

#include "tile.h"

namespace effattn {
namespace cpu {

template <typename scalar_t, typename acc_t>
void compute_delta(const BwdParams& p) {
  const int64_t rows = p.batch * p.heads_q * p.seqlen_q;
  torch::stable::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const int64_t i = it % p.seqlen_q, bh = it / p.seqlen_q;
      const int64_t b = bh / p.heads_q, h = bh % p.heads_q;
      const scalar_t* o = static_cast<const scalar_t*>(p.out) + b * p.o_strides.batch + h * p.o_strides.head + i * p.o_strides.row;
      const scalar_t* d = static_cast<const scalar_t*>(p.dout) + b * p.do_strides.batch + h * p.do_strides.head + i * p.do_strides.row;
      acc_t sum = 0;
      for (int64_t e = 0; e < p.head_dim_v; ++e) sum += to_acc<acc_t>(o[e]) * to_acc<acc_t>(d[e]);
      if (p.dlse) sum -= static_cast<const acc_t*>(p.dlse)[it];
      static_cast<acc_t*>(p.delta)[it] = sum;
    }
  });
}

template <typename scalar_t, typename acc_t>
struct BwdTile {
  const BwdParams& p;
  std::vector<acc_t> k, kt, vt, dk, dv, q, dO, s, dp, bias, lse, delta;

  explicit BwdTile(const BwdParams& params)
      : p(params),
        k(kBlockN * params.head_dim),
        kt(params.head_dim * kBlockN),
        vt(params.head_dim_v * kBlockN),
        dk(kBlockN * params.head_dim),
        dv(kBlockN * params.head_dim_v),
        q(kBlockM * params.head_dim),
        dO(kBlockM * params.head_dim_v),
        s(kBlockM * kBlockN),
        dp(kBlockM * kBlockN),
        bias(params.mask_kind == MaskKind::kNone ? 0 : kBlockM * kBlockN),
        lse(kBlockM),
        delta(kBlockM) {}

  void run(int64_t b, int64_t hk, int64_t split) {
    const int64_t E = p.head_dim, Ev = p.head_dim_v;
    const int64_t n_blocks = (p.seqlen_k + kBlockN - 1) / kBlockN;
    const RowBounds rb = row_bounds(p, b);
    const int64_t qlen = std::min(query_len(p, b), p.seqlen_q);
    const acc_t scale = static_cast<acc_t>(p.scale);

    const scalar_t* K = static_cast<const scalar_t*>(p.k) + b * p.k_strides.batch + hk * p.k_strides.head;
    const scalar_t* V = static_cast<const scalar_t*>(p.v) + b * p.v_strides.batch + hk * p.v_strides.head;
    scalar_t* dK = static_cast<scalar_t*>(p.dk) + b * p.dk_strides.batch + hk * p.dk_strides.head;
    scalar_t* dV = static_cast<scalar_t*>(p.dv) + b * p.dv_strides.batch + hk * p.dv_strides.head;

    for (int64_t n_block = split; n_block < n_blocks; n_block += p.num_key_splits) {
      const int64_t j0 = n_block * kBlockN;
      const int64_t cols = std::min(kBlockN, p.seqlen_k - j0);
      // keys at or past the key length have zero gradient
      const int64_t N = std::max<int64_t>(0, std::min(cols, rb.key_len - j0));
      std::fill(dk.begin(), dk.end(), acc_t(0));
      std::fill(dv.begin(), dv.end(), acc_t(0));
      if (N > 0) {
        load_rows(K + j0 * p.k_strides.row, p.k_strides.row, N, E, k.data(), E);
        load_rows_transposed(K + j0 * p.k_strides.row, p.k_strides.row, N, E, kt.data(), N);
        load_rows_transposed(V + j0 * p.v_strides.row, p.v_strides.row, N, Ev, vt.data(), N);
        const int64_t i_begin = rb.first_query(j0);
        const int64_t i_end = rb.last_query_end(j0 + N, qlen);
        for (int64_t g = 0; g < p.group_size(); ++g) {
          const int64_t h = hk * p.group_size() + g;
          for (int64_t i0 = i_begin; i0 < i_end; i0 += kBlockM)
            query_tile(b, h, split, i0, std::min(kBlockM, i_end - i0), j0, N, rb, scale);
        }
      }
      store_rows(dk.data(), E, cols, E, scale, dK + j0 * p.dk_strides.row, p.dk_strides.row);
      store_rows(dv.data(), Ev, cols, Ev, acc_t(1), dV + j0 * p.dv_strides.row, p.dv_strides.row);
    }
  }

  void query_tile(int64_t b, int64_t h, int64_t split, int64_t i0, int64_t M,
                  int64_t j0, int64_t N, const RowBounds& rb, acc_t scale) {
    const int64_t E = p.head_dim, Ev = p.head_dim_v;
    acc_t* bias_tile = nullptr;
    if (p.mask_kind != MaskKind::kNone) {
      if (!load_mask_tile<acc_t, scalar_t>(p, b, h, i0, M, j0, N, bias.data()))
        return;  // the mask excludes the whole tile
      bias_tile = bias.data();
    }
    const int64_t row0 = (b * p.heads_q + h) * p.seqlen_q + i0;
    const acc_t* LSE = static_cast<const acc_t*>(p.lse) + row0;
    const acc_t* DELTA = static_cast<const acc_t*>(p.delta) + row0;
    bool any_row = false;
    for (int64_t r = 0; r < M; ++r) {
      lse[r] = LSE[r];
      delta[r] = DELTA[r];
      any_row |= lse[r] != neg_inf<acc_t>();
    }
    if (!any_row) return;  // every row fully masked: all gradients are zero

    const scalar_t* Q = static_cast<const scalar_t*>(p.q) + b * p.q_strides.batch + h * p.q_strides.head;
    const scalar_t* DO = static_cast<const scalar_t*>(p.dout) + b * p.do_strides.batch + h * p.do_strides.head;
    load_rows(Q + i0 * p.q_strides.row, p.q_strides.row, M, E, q.data(), E);
    load_rows(DO + i0 * p.do_strides.row, p.do_strides.row, M, Ev, dO.data(), Ev);

    // P = exp(scale * Q K^T + bias - lse)
    gemm_nn<acc_t>(M, N, E, q.data(), E, kt.data(), N, s.data(), N, false);
    finish_scores<acc_t>(s.data(), M, N, scale, bias_tile, rb, i0, j0);
    for (int64_t r = 0; r < M; ++r) {
      acc_t* srow = s.data() + r * N;
      if (lse[r] == neg_inf<acc_t>()) {
        for (int64_t c = 0; c < N; ++c) srow[c] = acc_t(0);
      } else {
        exp_shifted(srow, N, lse[r]);
      }
    }
    // dV += P^T dO
    gemm_tn<acc_t>(M, N, Ev, s.data(), N, dO.data(), Ev, dv.data(), Ev);
    // dS = P * (dO V^T - delta), stored in dp
    gemm_nn<acc_t>(M, N, Ev, dO.data(), Ev, vt.data(), N, dp.data(), N, false);
    for (int64_t r = 0; r < M; ++r) {
      const acc_t* prow = s.data() + r * N;
      acc_t* drow = dp.data() + r * N;
      for (int64_t c = 0; c < N; ++c) drow[c] = prow[c] * (drow[c] - delta[r]);
    }
    // dK += dS^T Q   (scaled once when written)
    gemm_tn<acc_t>(M, N, E, dp.data(), N, q.data(), E, dk.data(), E);
    // dQ_accum += scale * dS K   (scale applied in pass 3)
    acc_t* dq = static_cast<acc_t*>(p.dq_accum) +
                (split * p.batch * p.heads_q * p.seqlen_q + row0) * E;
    gemm_nn<acc_t>(M, E, N, dp.data(), N, k.data(), E, dq, E, true);
  }
};

template <typename scalar_t, typename acc_t>
void reduce_dq(const BwdParams& p) {
  const int64_t rows = p.batch * p.heads_q * p.seqlen_q;
  const int64_t E = p.head_dim;
  const acc_t scale = static_cast<acc_t>(p.scale);
  torch::stable::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sum(E);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t i = it % p.seqlen_q, bh = it / p.seqlen_q;
      const int64_t b = bh / p.heads_q, h = bh % p.heads_q;
      std::fill(sum.begin(), sum.end(), acc_t(0));
      for (int64_t s = 0; s < p.num_key_splits; ++s) {
        const acc_t* src = static_cast<const acc_t*>(p.dq_accum) + (s * rows + it) * E;
        for (int64_t e = 0; e < E; ++e) sum[e] += src[e];
      }
      scalar_t* dst = static_cast<scalar_t*>(p.dq) + b * p.dq_strides.batch + h * p.dq_strides.head + i * p.dq_strides.row;
      for (int64_t e = 0; e < E; ++e) dst[e] = static_cast<scalar_t>(sum[e] * scale);
    }
  });
}

template <typename scalar_t, typename acc_t>
void attention_bwd(const BwdParams& p) {
  compute_delta<scalar_t, acc_t>(p);
  const int64_t items = p.batch * p.heads_kv * p.num_key_splits;
  torch::stable::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    BwdTile<scalar_t, acc_t> tile(p);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t split = it % p.num_key_splits;
      const int64_t bh = it / p.num_key_splits;
      tile.run(bh / p.heads_kv, bh % p.heads_kv, split);
    }
  });
  reduce_dq<scalar_t, acc_t>(p);
}

}  // namespace cpu
}  // namespace effattn
