// CPU backward: recomputes the probabilities from the saved log-sum-exp
// instead of storing them (FlashAttention-2's backward on the CPU). One source
// for every ISA: included inside the per-ISA namespace (kernels_isa.h) after
// simd.h, gemm.h and tile_ops.h.
//
// Pass 1 (rows in parallel):  delta_i = sum_e dO_ie * O_ie  - dlse_i
//   (dlse is the gradient reaching the returned LSE, usually absent.)
// Pass 2, work item = (batch, kv-head, key split s). A split owns the key
// tiles s, s + S, s + 2S, ... (S = num_key_splits, > 1 only when batch x
// kv-heads is too small to keep every thread busy). For each owned key tile
// [j0, j0 + kBwdBlockN), K, K^T, V^T are converted once and dK, dV accumulate
// in L1/L2 while every query head of the GQA group and every query tile that
// can see these keys streams past:
//   S  = scale * Q K^T + bias            P  = exp(S - lse)   (0 if lse = -inf;
//                                        in base 2, simd.h)
//   (S is rounded exactly as the forward's was: Q pre-multiplied by
//   scale * log2 e, the same GEMM order, so P matches the saved lse even
//   where logits are large; lse * log2 e enters as a hi + lo pair.)
//   dV += P^T dO                         dP = dO V^T
//   dS = P * (dP - delta)                dK += scale * dS^T Q
//   (dK, dV summed in three levels for accuracy: BwdTile::kFlushTiles)
//   dQ_accum[s] += scale * dS K
// The transposed products (P^T dO, dS^T Q) read P and dS through the GEMM's
// strided A operand, so nothing is transposed in memory. dK, dV are written
// once per tile (an item owns them: no races); dQ goes to a per-split
// accumulator (S x B x Hq x Lq x padded E, accumulator type).
// Pass 3 (rows in parallel): dQ = sum over splits of dQ_accum, converted.
// Keys past key_lengths[b] and queries past query_lengths[b] get zero grads.
//
// Tile sizes (kernels.h): 64 keys x 64 queries. Five GEMMs share each pair
// of tiles; the pair's working set (Q, dO, P, dS and the dQ rows: 16 KiB each
// at E = 64) stays in L2 beside the item's K, K^T, V^T, dK, dV. 64/128 x
// 64/128 measured within 3% of each other (float32, E = 64, L = 800 and
// 2048, one Zen 3 core); 64 x 64 keeps the scratch smallest and skips the
// causal band's tiles at the finest grain.
// Items go to torch's threads dynamically (parallel_items, tile_ops.h).
// Memory: O(B * Hq * Lq * (1 + S * E)) scratch; nothing of size Lq x Lk.

template <typename scalar_t, typename acc_t>
void compute_delta(const BwdParams& p) {
  const int64_t rows = p.batch * p.heads_q * p.seqlen_q;
  const int64_t Ev = p.head_dim_v;
  torch::stable::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> o(padded(Ev)), d(padded(Ev));
    for (int64_t it = begin; it < end; ++it) {
      const int64_t i = it % p.seqlen_q, bh = it / p.seqlen_q;
      const int64_t b = bh / p.heads_q, h = bh % p.heads_q;
      convert_row(static_cast<const scalar_t*>(p.out) + b * p.o_strides.batch +
                      h * p.o_strides.head + i * p.o_strides.row, Ev, o.data());
      convert_row(static_cast<const scalar_t*>(p.dout) + b * p.do_strides.batch +
                      h * p.do_strides.head + i * p.do_strides.row, Ev, d.data());
      // Summed in the order and rounding of the GEMM entry dP = dO V^T (gemm.h),
      // so that dP - delta is exactly 0 where out = v (e.g. one visible key).
      acc_t sum = gemm_dot(Ev, d.data(), o.data());
      if (p.dlse) sum -= static_cast<const acc_t*>(p.dlse)[it];
      static_cast<acc_t*>(p.delta)[it] = sum;
    }
  });
}

template <typename scalar_t, typename acc_t>
struct BwdTile {
  const BwdParams& p;
  // The tiles' capacities: kBwdBlockM query rows and kBwdBlockN keys (the leading dim of
  // K^T, V^T, P and dS), or fewer when the call has fewer (keys padded to whole vectors),
  // so a short call does not allocate and zero the full tiles. Results do not depend on it.
  const int64_t bm, bn;
  const int64_t E, Ev, Ep, Evp;
  const acc_t scale2;  // scale * log2(e), as the forward rounds it
  // dK and dV of a key tile are summed in three levels (accuracy, gemm.h):
  // each GEMM call's chains, the calls of up to kFlushTiles query tiles in
  // dk_part / dv_part, and those partial sums in dk / dv. A key tile may see
  // group_size x Lq / kBwdBlockM query tiles (256 for 8 heads of 2048
  // queries): added to one running dK, those made early keys' gradients
  // 2x less accurate than PyTorch's CPU attention. 4 tiles = 256 queries,
  // the query block of PyTorch's CPU kernel at long sequences.
  static constexpr int64_t kFlushTiles = 4;
  Scratch<acc_t> k, kt, vt, dk, dv, dk_part, dv_part, q, qs, dO, s, dp, bias, lse, delta, row_buf;

  explicit BwdTile(const BwdParams& params)
      : p(params),
        bm(std::min(kBwdBlockM, params.seqlen_q)),
        bn(std::min(kBwdBlockN, padded(params.seqlen_k))),
        E(params.head_dim),
        Ev(params.head_dim_v),
        Ep(padded(params.head_dim)),
        Evp(padded(params.head_dim_v)),
        scale2(static_cast<acc_t>(params.scale * kLog2e)),
        k(bn * Ep),
        kt(E * bn),
        vt(Ev * bn),
        dk(bn * Ep),
        dv(bn * Evp),
        dk_part(bn * Ep),
        dv_part(bn * Evp),
        q(bm * Ep),
        qs(bm * Ep),
        dO(bm * Evp),
        s(bm * bn),
        dp(bm * bn),
        bias(params.mask_kind == MaskKind::kNone ? 0 : bm * bn),
        lse(bm),
        delta(bm),
        row_buf(8 * std::max(params.head_dim, params.head_dim_v)) {}

  void run(int64_t b, int64_t hk, int64_t split) {
    const int64_t n_blocks = (p.seqlen_k + kBwdBlockN - 1) / kBwdBlockN;
    const RowBounds rb = row_bounds(p, b);
    const int64_t qlen = std::min(query_len(p, b), p.seqlen_q);
    const acc_t scale = static_cast<acc_t>(p.scale);

    const scalar_t* K = static_cast<const scalar_t*>(p.k) + b * p.k_strides.batch + hk * p.k_strides.head;
    const scalar_t* V = static_cast<const scalar_t*>(p.v) + b * p.v_strides.batch + hk * p.v_strides.head;
    scalar_t* dK = static_cast<scalar_t*>(p.dk) + b * p.dk_strides.batch + hk * p.dk_strides.head;
    scalar_t* dV = static_cast<scalar_t*>(p.dv) + b * p.dv_strides.batch + hk * p.dv_strides.head;

    for (int64_t n_block = split; n_block < n_blocks; n_block += p.num_key_splits) {
      const int64_t j0 = n_block * kBwdBlockN;
      const int64_t cols = std::min(kBwdBlockN, p.seqlen_k - j0);
      // keys at or past the key length have zero gradient
      const int64_t N = std::max<int64_t>(0, std::min(cols, rb.key_len - j0));
      std::memset(static_cast<void*>(dk.data()), 0, sizeof(acc_t) * bn * Ep);
      std::memset(static_cast<void*>(dv.data()), 0, sizeof(acc_t) * bn * Evp);
      if (N > 0) {
        load_tile(K + j0 * p.k_strides.row, p.k_strides.row, N, E, k.data(), Ep);
        load_tile_transposed(K + j0 * p.k_strides.row, p.k_strides.row, N, E, kt.data(),
                             bn, row_buf.data());
        load_tile_transposed(V + j0 * p.v_strides.row, p.v_strides.row, N, Ev, vt.data(),
                             bn, row_buf.data());
        const int64_t i_begin = rb.first_query(j0);
        const int64_t i_end = rb.last_query_end(j0 + N, qlen);
        int64_t tiles = 0;
        for (int64_t g = 0; g < p.group_size(); ++g) {
          const int64_t h = hk * p.group_size() + g;
          for (int64_t i0 = i_begin; i0 < i_end; i0 += kBwdBlockM) {
            if (tiles++ % kFlushTiles == 0) flush_parts(tiles > 1);
            query_tile(b, h, split, i0, std::min(kBwdBlockM, i_end - i0), j0, N, rb);
          }
        }
        if (tiles > 0) flush_parts(true);
      }
      store_tile(dk.data(), Ep, cols, E, scale, dK + j0 * p.dk_strides.row, p.dk_strides.row);
      store_tile(dv.data(), Evp, cols, Ev, acc_t(1), dV + j0 * p.dv_strides.row, p.dv_strides.row);
    }
  }

  // dk += dk_part, dv += dv_part (when add), the parts zeroed in the same pass.
  void flush_parts(bool add) {
    constexpr int64_t W = kLanes<acc_t>;
    const auto flush = [add](acc_t* sum, acc_t* part, int64_t n) {
      for (int64_t c = 0; c < n; c += W) {
        if (add) vstore(sum + c, vload(sum + c) + vload(part + c));
        vstore(part + c, Vec<acc_t>{});
      }
    };
    flush(dk.data(), dk_part.data(), bn * Ep);
    flush(dv.data(), dv_part.data(), bn * Evp);
  }

  void query_tile(int64_t b, int64_t h, int64_t split, int64_t i0, int64_t M, int64_t j0,
                  int64_t N, const RowBounds& rb) {
    const int64_t BN = bn;  // the tiles' leading dim
    const int64_t Nv = round_up_lanes<acc_t>(N);
    acc_t* bias_tile = nullptr;
    if (p.mask_kind != MaskKind::kNone) {
      if (!load_mask_tile<acc_t, scalar_t>(p, b, h, i0, M, j0, N, bias.data(), BN, 1))
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
    load_tile(Q + i0 * p.q_strides.row, p.q_strides.row, M, E, q.data(), Ep);
    load_tile(DO + i0 * p.do_strides.row, p.do_strides.row, M, Ev, dO.data(), Evp);

    // P = exp(scale * Q K^T + bias - lse), in base 2 and rounded exactly as the
    // forward's scores were (Q pre-multiplied by scale * log2 e, the same GEMM
    // order, the same mask step): the recomputed P sums to 1 against the saved
    // lse. Scores scaled after the GEMM round differently, which at large
    // logits (|lse| ~ 100) moved gradients several times PyTorch math's error.
    constexpr int64_t W = kLanes<acc_t>;
    const Vec<acc_t> vs2 = vbroadcast(scale2);
    for (int64_t c = 0; c < M * Ep; c += W) vstore(qs.data() + c, vload(q.data() + c) * vs2);
    gemm<acc_t, false>(M, Nv, E, qs.data(), Ep, 1, kt.data(), BN, s.data(), BN);
    for (int64_t r = 0; r < M; ++r) {
      acc_t* srow = s.data() + r * BN;
      if (lse[r] == neg_inf<acc_t>()) {
        std::memset(static_cast<void*>(srow), 0, sizeof(acc_t) * Nv);
        continue;
      }
      const int64_t lo = rb.begin(i0 + r) - j0, hi = rb.end(i0 + r) - j0;
      if (needs_finish(bias_tile != nullptr, lo, hi, Nv))
        finish_score_row(srow, bias_tile ? bias_tile + r * BN : nullptr, N, Nv, lo, hi);
      // lse * log2 e as hi + lo (hi the nearest acc_t): s - hi is then a small
      // number, rounded at its own size, not at lse's
      const double shift = double(lse[r]) * kLog2e;
      const acc_t shift_hi = static_cast<acc_t>(shift);
      exp2_shift(srow, Nv, shift_hi, static_cast<acc_t>(shift - double(shift_hi)));
    }
    // dV += P^T dO
    gemm<acc_t, true>(N, round_up_lanes<acc_t>(Ev), M, s.data(), 1, BN, dO.data(), Evp,
                      dv_part.data(), Evp);
    // dP = dO V^T, then dS = P * (dP - delta) in place
    gemm<acc_t, false>(M, Nv, Ev, dO.data(), Evp, 1, vt.data(), BN, dp.data(), BN);
    for (int64_t r = 0; r < M; ++r) {
      const acc_t* prow = s.data() + r * BN;
      acc_t* drow = dp.data() + r * BN;
      const Vec<acc_t> dr = vbroadcast(delta[r]);
      for (int64_t c = 0; c < Nv; c += W) vstore(drow + c, vload(prow + c) * (vload(drow + c) - dr));
    }
    // dK += dS^T Q   (scaled once when written)
    const int64_t Ecols = round_up_lanes<acc_t>(E);
    gemm<acc_t, true>(N, Ecols, M, dp.data(), 1, BN, q.data(), Ep, dk_part.data(), Ep);
    // dQ_accum += dS K   (scale applied in pass 3)
    acc_t* dq = static_cast<acc_t*>(p.dq_accum) +
                (split * p.batch * p.heads_q * p.seqlen_q + row0) * Ep;
    gemm<acc_t, true>(M, Ecols, N, dp.data(), BN, 1, k.data(), Ep, dq, Ep);
  }
};

template <typename scalar_t, typename acc_t>
void reduce_dq(const BwdParams& p) {
  const int64_t rows = p.batch * p.heads_q * p.seqlen_q;
  const int64_t E = p.head_dim, Ep = padded(E);
  const acc_t scale = static_cast<acc_t>(p.scale);
  torch::stable::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> sum(Ep);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t i = it % p.seqlen_q, bh = it / p.seqlen_q;
      const int64_t b = bh / p.heads_q, h = bh % p.heads_q;
      const acc_t* src = static_cast<const acc_t*>(p.dq_accum) + it * Ep;
      for (int64_t e = 0; e < E; ++e) sum[e] = src[e];
      for (int64_t s = 1; s < p.num_key_splits; ++s) {
        src = static_cast<const acc_t*>(p.dq_accum) + (s * rows + it) * Ep;
        for (int64_t e = 0; e < E; ++e) sum[e] += src[e];
      }
      store_tile(sum.data(), Ep, 1, E, scale,
                 static_cast<scalar_t*>(p.dq) + b * p.dq_strides.batch + h * p.dq_strides.head +
                     i * p.dq_strides.row, 0);
    }
  });
}

template <typename scalar_t, typename acc_t>
void attention_bwd(const BwdParams& p) {
  compute_delta<scalar_t, acc_t>(p);
  // Items (batch, kv-head, key split) differ in cost under per-batch
  // lengths: they go out dynamically (parallel_items).
  parallel_items(
      p.batch * p.heads_kv * p.num_key_splits,
      [&] { return std::make_unique<BwdTile<scalar_t, acc_t>>(p); },
      [&](BwdTile<scalar_t, acc_t>& tile, int64_t it) {
        const int64_t split = it % p.num_key_splits, bh = it / p.num_key_splits;
        tile.run(bh / p.heads_kv, bh % p.heads_kv, split);
      });
  reduce_dq<scalar_t, acc_t>(p);
}
