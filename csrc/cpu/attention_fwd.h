// CPU forward: tiled attention with an online softmax (FlashAttention-2's
// algorithm on the CPU). Saves only the row log-sum-exp for the backward.
// One source for every ISA: included inside the per-ISA namespace
// (kernels_isa.h) after simd.h, gemm.h and tile_ops.h.
//
// Work item = (batch, q-head, block of kFwdBlockM query rows); items run in
// parallel with torch::stable::parallel_for. For one item:
//   Q tile (M x E) is loaded once, converted to the accumulator type;
//   for each key tile [j0, j0 + kFwdBlockN) inside the band the structure
//   allows (causal / window / key length; tiles outside are never visited):
//     dense-mask tile read through its strides; all -inf -> skip the tile;
//     S = scale * Q K^T + bias          (K converted and transposed, E x N)
//     m_new = max(m, rowmax S);  P = exp(S - m_new)
//     l = l * exp(m - m_new) + rowsum P;  acc = acc * exp(m - m_new) + P V
//   out = acc / l,  lse = m + log l;  a row with no visible key gets out = 0,
//   lse = -inf (never NaN).
// Rows at or past query_lengths[b] are written as zeros with lse = -inf.
//
// Tile sizes (float32, E = Ev = 64, measured on a 2-core Zen 3, 32 KiB L1d,
// 512 KiB L2; see bench/README.md): 128 query rows amortise converting and
// transposing each K/V tile over twice the rows of a 64-row block (the
// packing is ~5% of the time at 64), and the working set, Q and the output
// accumulator (32 KiB each), the score tile (32 KiB), K^T and V (16 KiB
// each), sits in L2 while each GEMM's B panel (4-8 KiB) sits in L1.
// Memory: O(kFwdBlockM * (E + Ev + kFwdBlockN)) per thread; nothing of size
// Lq x Lk.

template <typename scalar_t, typename acc_t>
struct FwdTile {
  const FwdParams& p;
  const int64_t E, Ev, Ep, Evp;
  Scratch<acc_t> q, kt, v, s, bias, acc, m, l, row_buf;

  explicit FwdTile(const FwdParams& params)
      : p(params),
        E(params.head_dim),
        Ev(params.head_dim_v),
        Ep(padded(params.head_dim)),
        Evp(padded(params.head_dim_v)),
        q(kFwdBlockM * Ep),
        kt(E * kFwdBlockN),
        v(kFwdBlockN * Evp),
        s(kFwdBlockM * kFwdBlockN),
        bias(params.mask_kind == MaskKind::kNone ? 0 : kFwdBlockM * kFwdBlockN),
        acc(kFwdBlockM * Evp),
        m(kFwdBlockM),
        l(kFwdBlockM),
        row_buf(8 * E) {}

  void run(int64_t b, int64_t h, int64_t m_block) {
    const int64_t hk = h / p.group_size();
    const int64_t i0 = m_block * kFwdBlockM;
    const int64_t rows = std::min(kFwdBlockM, p.seqlen_q - i0);
    const int64_t M = std::max<int64_t>(0, std::min(rows, query_len(p, b) - i0));  // valid rows
    const RowBounds rb = row_bounds(p, b);
    constexpr int64_t BN = kFwdBlockN;

    const scalar_t* Q = static_cast<const scalar_t*>(p.q) + b * p.q_strides.batch + h * p.q_strides.head;
    const scalar_t* K = static_cast<const scalar_t*>(p.k) + b * p.k_strides.batch + hk * p.k_strides.head;
    const scalar_t* V = static_cast<const scalar_t*>(p.v) + b * p.v_strides.batch + hk * p.v_strides.head;
    scalar_t* O = static_cast<scalar_t*>(p.out) + b * p.o_strides.batch + h * p.o_strides.head;
    acc_t* LSE = static_cast<acc_t*>(p.lse) + (b * p.heads_q + h) * p.seqlen_q;

    for (int64_t r = 0; r < rows; ++r) {
      m[r] = neg_inf<acc_t>();
      l[r] = acc_t(0);
    }
    std::memset(static_cast<void*>(acc.data()), 0, sizeof(acc_t) * rows * Evp);

    if (M > 0) {
      load_tile(Q + i0 * p.q_strides.row, p.q_strides.row, M, E, q.data(), Ep);
      // Keys any row of this block may see.
      const int64_t j_begin = rb.begin(i0), j_end = rb.end(i0 + M - 1);
      for (int64_t j0 = j_begin; j0 < j_end; j0 += BN) {
        const int64_t N = std::min(BN, j_end - j0);
        const int64_t Nv = round_up_lanes<acc_t>(N);
        acc_t* bias_tile = nullptr;
        if (p.mask_kind != MaskKind::kNone) {
          if (!load_mask_tile<acc_t, scalar_t>(p, b, h, i0, M, j0, N, bias.data(), BN))
            continue;  // the mask excludes the whole tile
          bias_tile = bias.data();
        }
        load_tile_transposed(K + j0 * p.k_strides.row, p.k_strides.row, N, E, kt.data(), BN,
                             row_buf.data());
        load_tile(V + j0 * p.v_strides.row, p.v_strides.row, N, Ev, v.data(), Evp);
        // S = Q K^T, then the online softmax
        gemm<acc_t, false>(M, Nv, E, q.data(), Ep, 1, kt.data(), BN, s.data(), BN);
        for (int64_t r = 0; r < M; ++r)
          online_softmax_row(r, N, Nv, bias_tile, rb.begin(i0 + r) - j0, rb.end(i0 + r) - j0);
        // acc += P V
        gemm<acc_t, true>(M, round_up_lanes<acc_t>(Ev), N, s.data(), BN, 1, v.data(), Evp,
                          acc.data(), Evp);
      }
    }
    // Epilogue: normalise and write; rows without any visible key -> 0, -inf.
    for (int64_t r = 0; r < rows; ++r) {
      const bool empty = r >= M || l[r] == acc_t(0);
      const acc_t inv = empty ? acc_t(0) : acc_t(1) / l[r];
      store_tile(acc.data() + r * Evp, Evp, 1, Ev, inv, O + (i0 + r) * p.o_strides.row, 0);
      // m is in base 2 (scaled by log2 e): lse = ln 2 * (m + log2 l)
      LSE[i0 + r] = empty ? neg_inf<acc_t>() : static_cast<acc_t>(kLn2) * (m[r] + std::log2(l[r]));
    }
  }

  // Turns row r of the score tile into probabilities relative to the
  // running max (base 2, simd.h), rescaling the row's running sum and output
  // accumulator. lo/hi: the row's visible keys relative to the tile.
  void online_softmax_row(int64_t r, int64_t N, int64_t Nv, const acc_t* bias_tile, int64_t lo,
                          int64_t hi) {
    const acc_t scale2 = static_cast<acc_t>(p.scale * kLog2e);
    acc_t* srow = s.data() + r * kFwdBlockN;
    acc_t mul = scale2, tile_max;
    if (needs_finish(bias_tile != nullptr, p.scale, lo, hi, Nv)) {
      finish_score_row(srow, bias_tile ? bias_tile + r * kFwdBlockN : nullptr, N, Nv, scale2, lo, hi);
      mul = acc_t(1);
      tile_max = row_max(srow, Nv);
    } else {
      tile_max = row_max(srow, Nv) * scale2;  // scale2 > 0: the max commutes with it
    }
    if (tile_max == neg_inf<acc_t>()) {  // nothing visible in this tile
      std::memset(static_cast<void*>(srow), 0, sizeof(acc_t) * Nv);
      return;
    }
    const acc_t m_new = std::max(m[r], tile_max);
    const acc_t alpha = sexp2(m[r] - m_new);  // exp2(-inf) = 0 on the first hit
    l[r] = l[r] * alpha + exp2_shift_sum(srow, Nv, mul, m_new);
    m[r] = m_new;
    if (alpha != acc_t(1)) scale_row(acc.data() + r * Evp, Evp, alpha);
  }
};

template <typename scalar_t, typename acc_t>
void attention_fwd(const FwdParams& p) {
  const int64_t m_blocks = (p.seqlen_q + kFwdBlockM - 1) / kFwdBlockM;
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
