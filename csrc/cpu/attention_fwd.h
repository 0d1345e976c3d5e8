// CPU forward: tiled attention with an online softmax (FlashAttention-2's
// algorithm on the CPU). Saves only the row log-sum-exp for the backward.
//
// Work item = (batch, q-head, block of kBlockM query rows); items run in
// parallel with torch::stable::parallel_for. For one item:
//   Q tile (M x E) is loaded once, converted to the accumulator type;
//   for each key tile [j0, j0 + kBlockN) inside the band the structure allows
//   (causal / window / key length; tiles outside are never visited):
//     dense-mask tile read through its strides; all -inf -> skip the tile;
//     S = scale * Q K^T + bias          (K loaded transposed, E x N)
//     m_new = max(m, rowmax S);  P = exp(S - m_new)
//     l = l * exp(m - m_new) + rowsum P;  acc = acc * exp(m - m_new) + P V
//   out = acc / l,  lse = m + log l;  a row with no visible key gets out = 0,
//   lse = -inf (never NaN).
// Rows at or past query_lengths[b] are written as zeros with lse = -inf.
// Memory: O(kBlockM * (E + Ev + kBlockN)) per thread; nothing of size Lq x Lk.
#pragma once

#include <vector>

#include <torch/csrc/stable/ops.h>

#include "tile.h"

namespace effattn {
namespace cpu {

template <typename scalar_t, typename acc_t>
struct FwdTile {
  const FwdParams& p;
  std::vector<acc_t> q, kt, v, s, bias, acc, m, l;

  explicit FwdTile(const FwdParams& params)
      : p(params),
        q(kBlockM * params.head_dim),
        kt(params.head_dim * kBlockN),
        v(kBlockN * params.head_dim_v),
        s(kBlockM * kBlockN),
        bias(params.mask_kind == MaskKind::kNone ? 0 : kBlockM * kBlockN),
        acc(kBlockM * params.head_dim_v),
        m(kBlockM),
        l(kBlockM) {}

  void run(int64_t b, int64_t h, int64_t m_block) {
    const int64_t E = p.head_dim, Ev = p.head_dim_v;
    const int64_t hk = h / p.group_size();
    const int64_t i0 = m_block * kBlockM;
    const int64_t rows = std::min(kBlockM, p.seqlen_q - i0);
    const int64_t qlen = query_len(p, b);
    const int64_t M = std::max<int64_t>(0, std::min(rows, qlen - i0));  // valid rows
    const RowBounds rb = row_bounds(p, b);
    const acc_t scale = static_cast<acc_t>(p.scale);

    const scalar_t* Q = static_cast<const scalar_t*>(p.q) + b * p.q_strides.batch + h * p.q_strides.head;
    const scalar_t* K = static_cast<const scalar_t*>(p.k) + b * p.k_strides.batch + hk * p.k_strides.head;
    const scalar_t* V = static_cast<const scalar_t*>(p.v) + b * p.v_strides.batch + hk * p.v_strides.head;
    scalar_t* O = static_cast<scalar_t*>(p.out) + b * p.o_strides.batch + h * p.o_strides.head;
    acc_t* LSE = static_cast<acc_t*>(p.lse) + (b * p.heads_q + h) * p.seqlen_q;

    std::fill(m.begin(), m.end(), neg_inf<acc_t>());
    std::fill(l.begin(), l.end(), acc_t(0));
    std::fill(acc.begin(), acc.end(), acc_t(0));

    if (M > 0) {
      load_rows(Q + i0 * p.q_strides.row, p.q_strides.row, M, E, q.data(), E);
      // Keys any row of this block may see.
      const int64_t j_begin = rb.begin(i0), j_end = rb.end(i0 + M - 1);
      for (int64_t j0 = j_begin; j0 < j_end; j0 += kBlockN) {
        const int64_t N = std::min(kBlockN, j_end - j0);
        acc_t* bias_tile = nullptr;
        if (p.mask_kind != MaskKind::kNone) {
          if (!load_mask_tile<acc_t, scalar_t>(p, b, h, i0, M, j0, N, bias.data()))
            continue;  // the mask excludes the whole tile
          bias_tile = bias.data();
        }
        load_rows_transposed(K + j0 * p.k_strides.row, p.k_strides.row, N, E, kt.data(), N);
        load_rows(V + j0 * p.v_strides.row, p.v_strides.row, N, Ev, v.data(), Ev);
        gemm_nn<acc_t>(M, N, E, q.data(), E, kt.data(), N, s.data(), N, false);
        finish_scores<acc_t>(s.data(), M, N, scale, bias_tile, rb, i0, j0);
        online_softmax_step(M, N);
        gemm_nn<acc_t>(M, Ev, N, s.data(), N, v.data(), Ev, acc.data(), Ev, true);
      }
    }
    // Epilogue: normalise and write; rows without any visible key -> 0, -inf.
    for (int64_t r = 0; r < rows; ++r) {
      scalar_t* o = O + (i0 + r) * p.o_strides.row;
      const bool empty = r >= M || l[r] == acc_t(0);
      const acc_t inv = empty ? acc_t(0) : acc_t(1) / l[r];
      const acc_t* a = acc.data() + r * Ev;
      for (int64_t e = 0; e < Ev; ++e) o[e] = static_cast<scalar_t>(a[e] * inv);
      LSE[i0 + r] = empty ? neg_inf<acc_t>() : m[r] + std::log(l[r]);
    }
  }

  // Turns the score tile s into probabilities relative to the running max,
  // rescaling the running sum and output accumulator.
  void online_softmax_step(int64_t M, int64_t N) {
    const int64_t Ev = p.head_dim_v;
    for (int64_t r = 0; r < M; ++r) {
      acc_t* srow = s.data() + r * N;
      const acc_t tile_max = row_max(srow, N);
      if (tile_max == neg_inf<acc_t>()) {  // nothing visible in this tile
        for (int64_t c = 0; c < N; ++c) srow[c] = acc_t(0);
        continue;
      }
      const acc_t m_new = std::max(m[r], tile_max);
      const acc_t alpha = exp_softmax(m[r] - m_new);  // exp(-inf) = 0 on the first hit
      exp_shifted(srow, N, m_new);
      l[r] = l[r] * alpha + row_sum(srow, N);
      m[r] = m_new;
      if (alpha != acc_t(1)) {
        acc_t* a = acc.data() + r * Ev;
        for (int64_t e = 0; e < Ev; ++e) a[e] *= alpha;
      }
    }
  }
};

template <typename scalar_t, typename acc_t>
void attention_fwd(const FwdParams& p) {
  const int64_t m_blocks = (p.seqlen_q + kBlockM - 1) / kBlockM;
  const int64_t items = p.batch * p.heads_q * m_blocks;
  torch::stable::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    FwdTile<scalar_t, acc_t> tile(p);
    for (int64_t it = begin; it < end; ++it) {
      // Zigzag over query blocks (0, last, 1, last-1, ...): under causal or
      // window masks block cost grows with its index, and parallel_for hands
      // each thread a contiguous range, which would otherwise be unbalanced.
      const int64_t r = it % m_blocks;
      const int64_t m_block = (r % 2 == 0) ? r / 2 : m_blocks - 1 - r / 2;
      const int64_t bh = it / m_blocks;
      tile.run(bh / p.heads_q, bh % p.heads_q, m_block);
    }
  });
}

}  // namespace cpu
}  // namespace effattn
