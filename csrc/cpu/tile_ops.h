// Tile helpers shared by the CPU forward and backward (one source for every
// ISA; included inside the per-ISA namespace after simd.h and gemm.h).
//
// Tiles are row-major in the accumulator type acc_t (float, or double for
// float64 inputs), their rows padded to kColAlign elements (kernels.h) so
// that every GEMM and softmax loop runs over whole vectors. Inputs are
// converted once per tile (bf16/fp16 -> float32).

template <typename T>
inline int64_t round_up_lanes(int64_t n) {
  return (n + kLanes<T> - 1) / kLanes<T> * kLanes<T>;
}

template <typename acc_t>
constexpr acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

// One input element in the accumulator type (bf16/fp16 through float;
// float64 exactly).
template <typename acc_t, typename scalar_t>
inline acc_t to_acc(scalar_t x) {
  if constexpr (std::is_same<scalar_t, double>::value) {
    return static_cast<acc_t>(x);
  } else {
    return static_cast<acc_t>(static_cast<float>(x));
  }
}

// Per-thread scratch: zero-initialised (so pad columns hold finite values),
// cache-line aligned.
template <typename T>
class Scratch {
 public:
  explicit Scratch(int64_t n) : size_(std::max<int64_t>(n, 1)) {
    const size_t bytes = (size_ * sizeof(T) + 63) / 64 * 64;
    ptr_ = static_cast<T*>(std::aligned_alloc(64, bytes));
    STD_TORCH_CHECK(ptr_ != nullptr, "effattn (cpu): out of memory for a ", bytes, "-byte tile");
    std::memset(static_cast<void*>(ptr_), 0, bytes);
  }
  ~Scratch() { std::free(ptr_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  T* data() { return ptr_; }
  T& operator[](int64_t i) { return ptr_[i]; }

 private:
  int64_t size_;
  T* ptr_;
};

// Runs body(state, item) for every item in [0, n) on torch's thread pool,
// handing items out one at a time from a shared counter: work items differ in
// cost (causal bands, per-batch lengths, padded rows), and parallel_for alone
// would give each thread a fixed contiguous range of them. make_state()
// builds each worker's scratch (a std::unique_ptr). If the pool runs the
// workers' range inline on one thread, that thread simply drains every item.
template <typename MakeState, typename Body>
inline void parallel_items(int64_t n, MakeState make_state, Body body) {
  if (n <= 0) return;
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(n, torch::stable::get_num_threads()));
  std::atomic<int64_t> next{0};
  torch::stable::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    auto state = make_state();
    for (int64_t it = next.fetch_add(1); it < n; it = next.fetch_add(1)) body(*state, it);
  });
}

// dst[r * ld + c] = src[r * row_stride + c]   (r < rows, c < cols)
template <typename acc_t, typename scalar_t>
inline void load_tile(const scalar_t* src, int64_t row_stride, int64_t rows, int64_t cols,
                      acc_t* dst, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) convert_row(src + r * row_stride, cols, dst + r * ld);
}

// A tile as a GEMM operand: rows of ptr, ld elements apart.
template <typename acc_t>
struct Operand {
  const acc_t* ptr;
  int64_t ld;
};

// rows x cols of src as an operand: the input rows themselves when in_place
// (only valid when scalar_t is acc_t), else converted into buf (row length ld).
template <typename acc_t, typename scalar_t>
inline Operand<acc_t> tile_operand(const scalar_t* src, int64_t row_stride, int64_t rows,
                                   int64_t cols, bool in_place, acc_t* buf, int64_t ld) {
  if (in_place) return {reinterpret_cast<const acc_t*>(src), row_stride};
  load_tile(src, row_stride, rows, cols, buf, ld);
  return {buf, ld};
}

// dst[c * ld + r] = src[r * row_stride + c]: rows become columns (K -> K^T).
// Converted 8 rows at a time into row_buf (8 x cols elements), then scattered
// so that each store run writes 8 consecutive elements of a column.
template <typename acc_t, typename scalar_t>
inline void load_tile_transposed(const scalar_t* src, int64_t row_stride, int64_t rows,
                                 int64_t cols, acc_t* dst, int64_t ld, acc_t* row_buf) {
  constexpr int64_t kRows = 8;
  for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
    const int64_t n = std::min(kRows, rows - r0);
    for (int64_t i = 0; i < n; ++i) convert_row(src + (r0 + i) * row_stride, cols, row_buf + i * cols);
    if (n == kRows) {
      for (int64_t c = 0; c < cols; ++c) {
        acc_t* d = dst + c * ld + r0;
#pragma GCC unroll 8
        for (int64_t i = 0; i < kRows; ++i) d[i] = row_buf[i * cols + c];
      }
    } else {
      for (int64_t c = 0; c < cols; ++c)
        for (int64_t i = 0; i < n; ++i) dst[c * ld + r0 + i] = row_buf[i * cols + c];
    }
  }
}

// dst[r * row_stride + c] = scale * src[r * ld + c], converted to scalar_t.
template <typename scalar_t, typename acc_t>
inline void store_tile(const acc_t* src, int64_t ld, int64_t rows, int64_t cols, acc_t scale,
                       scalar_t* dst, int64_t row_stride) {
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t* s = src + r * ld;
    scalar_t* d = dst + r * row_stride;
    for (int64_t c = 0; c < cols; ++c) d[c] = static_cast<scalar_t>(s[c] * scale);
  }
}

// One row of the dense mask (N keys from element offset off) as additive
// terms (-inf where a bool mask is False) into out[c * out_cs]; returns
// whether any is not -inf.
template <typename acc_t, typename scalar_t>
inline bool load_mask_row(const FwdParams& p, int64_t off, int64_t N, acc_t* out, int64_t out_cs) {
  const int64_t cs = p.mask_col_stride;
  switch (p.mask_kind) {
    case MaskKind::kBool: {
      const bool* m = static_cast<const bool*>(p.mask) + off;
      for (int64_t c = 0; c < N; ++c) out[c * out_cs] = m[c * cs] ? acc_t(0) : neg_inf<acc_t>();
      break;
    }
    case MaskKind::kSameAsQ: {
      const scalar_t* m = static_cast<const scalar_t*>(p.mask) + off;
      for (int64_t c = 0; c < N; ++c) out[c * out_cs] = to_acc<acc_t>(m[c * cs]);
      break;
    }
    default: {  // kFloat32
      const float* m = static_cast<const float*>(p.mask) + off;
      for (int64_t c = 0; c < N; ++c) out[c * out_cs] = static_cast<acc_t>(m[c * cs]);
      break;
    }
  }
  bool any = false;
  for (int64_t c = 0; c < N; ++c) any |= out[c * out_cs] != neg_inf<acc_t>();
  return any;
}

// Reads the dense-mask tile for query rows [i0, i0+M) x keys [j0, j0+N) of
// (b, h) as additive terms into bias[r * out_rs + c * out_cs] (out_cs = 1:
// row-major; out_rs = 1: the transposed, key-major tile). Returns false when
// every entry is -inf: the whole tile is excluded. A mask that broadcasts
// over queries (row stride 0, e.g. SDPA's (B, 1, 1, S) key-padding mask) is
// read once per tile and copied to the other rows.
template <typename acc_t, typename scalar_t>
inline bool load_mask_tile(const FwdParams& p, int64_t b, int64_t h, int64_t i0, int64_t M,
                           int64_t j0, int64_t N, acc_t* bias, int64_t out_rs, int64_t out_cs) {
  const int64_t base = b * p.mask_batch_stride + h * p.mask_head_stride + j0 * p.mask_col_stride;
  if (p.mask_row_stride != 0) {
    bool any = false;
    for (int64_t r = 0; r < M; ++r)
      any |= load_mask_row<acc_t, scalar_t>(p, base + (i0 + r) * p.mask_row_stride, N,
                                             bias + r * out_rs, out_cs);
    return any;
  }
  const bool any = load_mask_row<acc_t, scalar_t>(p, base, N, bias, out_cs);
  if (any) {
    if (out_cs == 1) {
      for (int64_t r = 1; r < M; ++r) std::memcpy(bias + r * out_rs, bias, sizeof(acc_t) * N);
    } else {
      for (int64_t c = 0; c < N; ++c) {
        acc_t* col = bias + c * out_cs;
        for (int64_t r = 1; r < M; ++r) col[r * out_rs] = col[0];
      }
    }
  }
  return any;
}

// Scores are kept in base 2 (simd.h): Q is pre-multiplied by scale2 = scale *
// log2(e) before the GEMM (forward and backward alike, so both round the same
// scores), and a mask adds bias * log2(e).
//
// Whether a row of the backward needs finish_score_row before its exp: when
// a mask or the band cuts into the tile.
inline bool needs_finish(bool has_bias, int64_t lo, int64_t hi, int64_t Nv) {
  return has_bias || lo > 0 || hi < Nv;
}

// One row of base-2 scores: s += log2(e) * bias (when there is a mask), then
// -inf outside [lo, hi) and in the pad columns [N, Nv) (Nv = N rounded up to
// whole vectors), so that the softmax's vector loops see exp2(-inf) = 0 there.
template <typename acc_t>
inline void finish_score_row(acc_t* s, const acc_t* bias, int64_t N, int64_t Nv, int64_t lo, int64_t hi) {
  constexpr int64_t W = kLanes<acc_t>;
  if (bias) {
    const Vec<acc_t> vl = vbroadcast(static_cast<acc_t>(kLog2e));
    for (int64_t c = 0; c < Nv; c += W) vstore(s + c, vload(s + c) + vload(bias + c) * vl);
  }
  hi = std::max<int64_t>(0, std::min(hi, N));
  lo = std::min(lo, hi);
  for (int64_t c = 0; c < lo; ++c) s[c] = neg_inf<acc_t>();
  for (int64_t c = hi; c < Nv; ++c) s[c] = neg_inf<acc_t>();
}

// s[c] = exp2(s[c] - (hi + lo)) over Nv elements: the shift in two parts, so
// s - hi (near 0 where it matters) keeps the precision a single rounded shift
// of ~100 would lose.
template <typename acc_t>
inline void exp2_shift(acc_t* s, int64_t Nv, acc_t hi, acc_t lo) {
  constexpr int64_t W = kLanes<acc_t>;
  const Vec<acc_t> vhi = vbroadcast(hi), vlo = vbroadcast(lo);
  for (int64_t c = 0; c < Nv; c += W) vstore(s + c, vexp2((vload(s + c) - vhi) - vlo));
}

// x[c] *= a over Nv elements
template <typename acc_t>
inline void scale_row(acc_t* x, int64_t Nv, acc_t a) {
  constexpr int64_t W = kLanes<acc_t>;
  const Vec<acc_t> va = vbroadcast(a);
  for (int64_t c = 0; c < Nv; c += W) vstore(x + c, vload(x + c) * va);
}
