// CPU forward: tiled attention with an online softmax (FlashAttention-2's
// algorithm on the CPU). Saves only the row log-sum-exp for the backward.
// One source for every ISA: included inside the per-ISA namespace
// (kernels_isa.h) after simd.h, gemm.h and tile_ops.h.
//
// Work item = (batch, q-head, block of kFwdBlockM query rows); items are
// handed to torch's threads dynamically (parallel_items, tile_ops.h). The scores are computed
// transposed, keys x queries, so that the SIMD lanes run across queries:
//   Q^T (E x M) is converted and transposed once per item;
//   for each key tile [j0, j0 + kFwdBlockN) inside the band the structure
//   allows (causal / window / key length; tiles outside are never visited):
//     dense-mask tile read through its strides; all -inf -> skip the tile;
//     S^T = K Q^T                 (K, and V below, read in place for
//                                  float32/float64 inputs;
//                                  Q^T pre-multiplied by scale * log2 e, so
//                                  S^T is in base 2, simd.h)
//     + bias * log2 e, -inf outside the band (tiles the band and mask leave
//     whole need neither);
//     per query (one SIMD lane): m_new = max(m, max over keys),
//     P^T = exp2(S^T - m_new), l = l * 2^(m - m_new) + sum over keys
//     acc = acc * 2^(m - m_new) + P V   (P^T read as a transposed GEMM operand)
//   out = acc / l,  lse = ln 2 * (m + log2 l);  a row with no visible key gets
//   out = 0, lse = -inf (never NaN).
// Rows at or past query_lengths[b] are written as zeros with lse = -inf.
// Attention statistics (kStats, effattn.diagnostics.attention_stats): one more
// accumulator per row, u = sum over keys of P^T * (S^T - m) (base 2, <= 0),
// rescaled with l as m grows (u <- 2^(m - m_new) (u + l (m - m_new))), so
// that at the end the entropy of the row's weights is
// H = ln 2 * (log2 l - u / l) and its largest weight 2^(m - m) / l = 1 / l;
// no cancellation (both terms are >= 0) and no second pass. A row with no
// visible key gets H = 0 and max weight 0. The kStats instances are compiled
// in a translation unit of their own (kernels_<isa>_stats.cpp), so the plain
// forward's code is exactly what it is without them.
// Queries-as-lanes means no K transpose per tile, no horizontal max/sum per
// row, and one vector exp2 for eight rows' rescale factors.
//
// Tile sizes (kernels.h; float32, E = Ev = 64, 2-core Zen 3 with 32 KiB L1d
// and 512 KiB L2): 128 x 128 measured fastest of 64/128/256 x 64/128. The
// working set (Q^T, the output accumulator and V at 32 KiB each, S^T at
// 64 KiB) sits in L2 while each GEMM's B panel (a 16-column slice of Q^T or
// V, 4-8 KiB) stays in L1, and 128 keys per tile halve the per-tile
// bookkeeping (rescaling acc) against 64.
// Memory: O(kFwdBlockM * (E + Ev + kFwdBlockN)) per thread; nothing of size
// Lq x Lk.

// What the kStats forward adds to a tile: u per row and the (2, B, Hq, Lq) output; nothing
// (an empty member) otherwise.
template <typename acc_t, bool kStats>
struct FwdStats {
  FwdStats(int64_t, void*) {}
};
template <typename acc_t>
struct FwdStats<acc_t, true> {
  Scratch<acc_t> u;
  acc_t* out;
  FwdStats(int64_t rows, void* stats_out) : u(rows), out(static_cast<acc_t*>(stats_out)) {}
};

template <typename scalar_t, typename acc_t, bool kStats = false>
struct FwdTile {
  static constexpr bool kReadKInPlace = std::is_same<scalar_t, acc_t>::value;
  static constexpr int64_t BM = kFwdBlockM, BN = kFwdBlockN, W = kLanes<acc_t>;

  const FwdParams& p;
  // The tiles' capacities: kFwdBlockM query rows (the leading dim of Q^T, S^T and the
  // mask tile) and kFwdBlockN keys, or fewer when the call has fewer (padded to whole
  // vectors), so a short call does not allocate and zero the full tiles (the scratch of a
  // 128 x 128 tile cost several times a tiny call's whole work). Results do not depend on it.
  const int64_t bm, bn;
  const int64_t E, Ev, Evp;
  // V is read in place as the P V GEMM's B operand when no conversion is
  // needed and its rows are whole vectors (the GEMM reads round_up(Ev) columns).
  const bool v_in_place;
  const acc_t scale2;  // scale * log2(e): scores in base 2
  Scratch<acc_t> qt, k, v, st, bias, acc, m, l, alpha, row_buf;
  FwdStats<acc_t, kStats> stats;  // (last: the plain tile's other members keep their offsets)

  explicit FwdTile(const FwdParams& params, void* stats_out = nullptr)
      : p(params),
        bm(std::min(BM, padded(params.seqlen_q))),
        bn(std::min(BN, params.seqlen_k)),
        E(params.head_dim),
        Ev(params.head_dim_v),
        Evp(padded(params.head_dim_v)),
        v_in_place(kReadKInPlace && params.head_dim_v % W == 0),
        scale2(static_cast<acc_t>(params.scale * kLog2e)),
        qt(E * bm),
        k(kReadKInPlace ? 0 : bn * E),
        v(v_in_place ? 0 : bn * Evp),
        st(bn * bm),
        bias(params.mask_kind == MaskKind::kNone ? 0 : bn * bm),
        acc(bm * Evp),
        m(bm),
        l(bm),
        alpha(bm),
        row_buf(8 * E),
        stats(bm, stats_out) {}

  void run(int64_t b, int64_t h, int64_t m_block) {
    const int64_t hk = h / p.group_size();
    const int64_t i0 = m_block * BM;
    const int64_t rows = std::min(BM, p.seqlen_q - i0);
    const int64_t M = std::max<int64_t>(0, std::min(rows, query_len(p, b) - i0));  // valid rows
    const int64_t Mv = round_up_lanes<acc_t>(M);
    const RowBounds rb = row_bounds(p, b);

    const scalar_t* Q = static_cast<const scalar_t*>(p.q) + b * p.q_strides.batch + h * p.q_strides.head;
    const scalar_t* K = static_cast<const scalar_t*>(p.k) + b * p.k_strides.batch + hk * p.k_strides.head;
    const scalar_t* V = static_cast<const scalar_t*>(p.v) + b * p.v_strides.batch + hk * p.v_strides.head;
    scalar_t* O = static_cast<scalar_t*>(p.out) + b * p.o_strides.batch + h * p.o_strides.head;
    acc_t* LSE = static_cast<acc_t*>(p.lse) + (b * p.heads_q + h) * p.seqlen_q;

    for (int64_t r = 0; r < bm; ++r) {
      m[r] = neg_inf<acc_t>();
      l[r] = acc_t(0);
      if constexpr (kStats) stats.u[r] = acc_t(0);
    }
    std::memset(static_cast<void*>(acc.data()), 0, sizeof(acc_t) * bm * Evp);

    if (M > 0) {
      load_tile_transposed(Q + i0 * p.q_strides.row, p.q_strides.row, M, E, qt.data(), bm,
                           row_buf.data());
      // Scores in base 2 straight from the GEMM. The softmax then subtracts
      // the exact maximum, so a row's largest score gives exactly 2^0 = 1 (a
      // row with one visible key gets out = v exactly, as the math does).
      for (int64_t e = 0; e < E; ++e) scale_row(qt.data() + e * bm, bm, scale2);
      // Keys any row of this block may see.
      const int64_t j_begin = rb.begin(i0), j_end = rb.end(i0 + M - 1);
      for (int64_t j0 = j_begin; j0 < j_end; j0 += BN) {
        const int64_t N = std::min(BN, j_end - j0);
        acc_t* bias_tile = nullptr;
        if (p.mask_kind != MaskKind::kNone) {
          if (!load_mask_tile<acc_t, scalar_t>(p, b, h, i0, M, j0, N, bias.data(), 1, bm))
            continue;  // the mask excludes the whole tile
          bias_tile = bias.data();
        }
        const Operand<acc_t> k_op = tile_operand(K + j0 * p.k_strides.row, p.k_strides.row, N,
                                                 E, kReadKInPlace, k.data(), E);
        const Operand<acc_t> v_op = tile_operand(V + j0 * p.v_strides.row, p.v_strides.row, N,
                                                 Ev, v_in_place, v.data(), Evp);
        // S^T = K Q^T
        gemm<acc_t, false>(N, Mv, E, k_op.ptr, k_op.ld, 1, qt.data(), bm, st.data(), bm);
        finish_tile(i0, M, Mv, j0, N, bias_tile);
        softmax_step(M, Mv, N);
        // acc += P V, with P = (P^T)^T read through strides
        gemm<acc_t, true>(M, round_up_lanes<acc_t>(Ev), N, st.data(), 1, bm, v_op.ptr, v_op.ld,
                          acc.data(), Evp);
      }
    }
    // Epilogue: normalise and write; rows without any visible key -> 0, -inf.
    for (int64_t r = 0; r < rows; ++r) {
      const bool empty = r >= M || l[r] == acc_t(0);
      const acc_t inv = empty ? acc_t(0) : acc_t(1) / l[r];
      store_tile(acc.data() + r * Evp, Evp, 1, Ev, inv, O + (i0 + r) * p.o_strides.row, 0);
      // m is in base 2: lse = ln 2 * (m + log2 l), in double and rounded once (lse may be
      // ~100: each float rounding there moves every recomputed probability by ~1e-6)
      LSE[i0 + r] = empty ? neg_inf<acc_t>()
                          : static_cast<acc_t>(kLn2 * (double(m[r]) + std::log2(double(l[r]))));
      if constexpr (kStats) {  // (2, B, Hq, Lq): the entropy (nats), then the largest weight
        const int64_t row = (b * p.heads_q + h) * p.seqlen_q + i0 + r;
        stats.out[row] = empty ? acc_t(0)
                               : static_cast<acc_t>(kLn2 * (std::log2(double(l[r])) - double(stats.u[r]) / double(l[r])));
        stats.out[p.batch * p.heads_q * p.seqlen_q + row] = inv;
      }
    }
  }

  // Adds the mask and sets -inf outside the band, for tiles that the mask or
  // the band cut into (the others are whole: nothing to do). Key row n
  // (key j = j0 + n) is seen by queries i with
  // j - window_right <= i <= j + window_left.
  void finish_tile(int64_t i0, int64_t M, int64_t Mv, int64_t j0, int64_t N, const acc_t* bias_tile) {
    const int64_t wl = p.window_left, wr = p.window_right;
    const bool cut = j0 + N - 1 - wr > i0 || j0 + wl + 1 < i0 + M;
    if (!bias_tile && !cut) return;
    for (int64_t n = 0; n < N; ++n) {
      const int64_t j = j0 + n;
      const int64_t lo = j - wr - i0;
      const int64_t hi = std::min(M, j + wl + 1 - i0);
      finish_score_row(st.data() + n * bm, bias_tile ? bias_tile + n * bm : nullptr, M, Mv, lo, hi);
    }
  }

  // Online softmax over a tile of S^T (N keys x Mv queries), lanes across
  // queries: updates m, l (and u), turns S^T into P^T and rescales acc's rows.
  void softmax_step(int64_t M, int64_t Mv, int64_t N) {
    const Vec<acc_t> ninf = vbroadcast(neg_inf<acc_t>());
    for (int64_t c = 0; c < Mv; c += W) {
      acc_t* col = st.data() + c;
      Vec<acc_t> mx = ninf;
      for (int64_t n = 0; n < N; ++n) mx = vmax(mx, vload(col + n * bm));
      const Vec<acc_t> m_old = vload(m.data() + c);
      const Vec<acc_t> m_new = vmax(m_old, mx);
      // A query that has seen no key yet keeps m = -inf; shift by 0 there so
      // that exp2(-inf - shift) is 0 and never NaN.
      const Vec<acc_t> shift = m_new == ninf ? Vec<acc_t>{} : m_new;
      const Vec<acc_t> a = vexp2(m_old - shift);
      Vec<acc_t> sum{};
      if constexpr (kStats) {
        // differences clamped: 2^-2000 is 0 in float and double, so a clamped term has P = 0
        // and adds 0 (a masked score's -inf would give 0 * -inf = NaN)
        const Vec<acc_t> floor = vbroadcast(acc_t(-2000));
        Vec<acc_t> su{};
        for (int64_t n = 0; n < N; ++n) {
          const Vec<acc_t> x = vload(col + n * bm) - shift;
          const Vec<acc_t> e = vexp2(x);
          vstore(col + n * bm, e);
          sum += e;
          su += e * vmax(x, floor);
        }
        acc_t* u = stats.u.data() + c;  // (with l before this tile)
        vstore(u, a * (vload(u) + vload(l.data() + c) * vmax(m_old - shift, floor)) + su);
      } else {
        for (int64_t n = 0; n < N; ++n) {
          const Vec<acc_t> e = vexp2(vload(col + n * bm) - shift);
          vstore(col + n * bm, e);
          sum += e;
        }
      }
      vstore(m.data() + c, m_new);
      vstore(l.data() + c, vload(l.data() + c) * a + sum);
      vstore(alpha.data() + c, a);
    }
    for (int64_t r = 0; r < M; ++r)
      if (alpha[r] != acc_t(1)) scale_row(acc.data() + r * Evp, Evp, alpha[r]);
  }
};

template <typename scalar_t, typename acc_t, bool kStats = false>
void attention_fwd(const FwdParams& p, void* stats_out = nullptr) {
  const int64_t m_blocks = (p.seqlen_q + kFwdBlockM - 1) / kFwdBlockM;
  const int64_t heads = p.batch * p.heads_q;
  // Items go out dynamically (parallel_items), head by head so that the
  // threads share one head's K and V in cache, each head's query blocks from
  // the last: under causal or window masks a block's cost grows with its
  // index, so the cheapest items come last and even out the tail.
  parallel_items(
      heads * m_blocks, [&] { return std::make_unique<FwdTile<scalar_t, acc_t, kStats>>(p, stats_out); },
      [&](FwdTile<scalar_t, acc_t, kStats>& tile, int64_t it) {
        const int64_t m_block = m_blocks - 1 - it % m_blocks, bh = it / m_blocks;
        tile.run(bh / p.heads_q, bh % p.heads_q, m_block);
      });
}
