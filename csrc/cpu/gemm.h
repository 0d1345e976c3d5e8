// Register-blocked GEMM for the attention tiles (one source for every ISA;
// included inside the per-ISA namespace after simd.h).
//
//   C[r][c] (+)= sum_k A(r, k) * B[k][c]      r < M, c < N, k < K
//
// A(r, k) = A[r * a_rs + k * a_ks], so A is a row-major tile (a_rs = ld,
// a_ks = 1) or the transpose of one (a_rs = 1, a_ks = ld) with no copy: the
// micro-kernel only ever broadcasts single elements of A. B is row-major
// (ldb) and C row-major (ldc); N must be a multiple of kLanes (the tile
// buffers pad their rows with zeros to kColAlign), K and M are free.
//
// Micro-kernel: a kMR x (kNV vectors) block of C lives in registers for the
// whole k loop; each k step loads kNV vectors of B and broadcasts kMR
// elements of A, for kMR * kNV FMAs. 6 x 2 (the BLIS shape for 16-register
// ISAs) uses 12 accumulators + 2 B vectors + 1 broadcast = 15 of the 16
// vector registers of SSE2/AVX2; AVX-512's 32 registers would allow more, but
// the same shape keeps one tuned code path. The driver walks column panels
// outermost, so a panel of B (K x 2 vectors: 4-8 KiB for K = 64-128 floats)
// stays in L1 while the rows of A stream past it.
//
// Everything is inline and templated on the accumulator type T (float, or
// double for float64 inputs).

constexpr int kMR = 6;  // rows of C per micro-tile
constexpr int kNV = 2;  // vectors of C per row per micro-tile

template <typename T, int MR, int NV, bool Accumulate>
inline void gemm_micro(int64_t K, const T* __restrict A, int64_t a_rs, int64_t a_ks,
                       const T* __restrict B, int64_t ldb, T* __restrict C, int64_t ldc) {
  constexpr int64_t W = kLanes<T>;
  Vec<T> acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = Accumulate ? vload(C + r * ldc + v * W) : Vec<T>{};
  for (int64_t k = 0; k < K; ++k) {
    Vec<T> b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = vload(B + k * ldb + v * W);
    const T* a = A + k * a_ks;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const Vec<T> ar = vbroadcast(a[r * a_rs]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = ar * b[v] + acc[r][v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) vstore(C + r * ldc + v * W, acc[r][v]);
}

// All rows of one column panel of NV vectors: full kMR blocks, then the rest.
template <typename T, int NV, bool Accumulate>
inline void gemm_panel(int64_t M, int64_t K, const T* A, int64_t a_rs, int64_t a_ks,
                       const T* B, int64_t ldb, T* C, int64_t ldc) {
  int64_t r = 0;
  for (; r + kMR <= M; r += kMR)
    gemm_micro<T, kMR, NV, Accumulate>(K, A + r * a_rs, a_rs, a_ks, B, ldb, C + r * ldc, ldc);
  const T* a = A + r * a_rs;
  T* c = C + r * ldc;
  switch (M - r) {
    case 1: gemm_micro<T, 1, NV, Accumulate>(K, a, a_rs, a_ks, B, ldb, c, ldc); break;
    case 2: gemm_micro<T, 2, NV, Accumulate>(K, a, a_rs, a_ks, B, ldb, c, ldc); break;
    case 3: gemm_micro<T, 3, NV, Accumulate>(K, a, a_rs, a_ks, B, ldb, c, ldc); break;
    case 4: gemm_micro<T, 4, NV, Accumulate>(K, a, a_rs, a_ks, B, ldb, c, ldc); break;
    case 5: gemm_micro<T, 5, NV, Accumulate>(K, a, a_rs, a_ks, B, ldb, c, ldc); break;
    default: break;
  }
}

// C (+)= A * B as described at the top; N a multiple of kLanes<T>.
template <typename T, bool Accumulate>
inline void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t a_rs, int64_t a_ks,
                 const T* B, int64_t ldb, T* C, int64_t ldc) {
  constexpr int64_t W = kLanes<T>;
  int64_t c = 0;
  for (; c + kNV * W <= N; c += kNV * W)
    gemm_panel<T, kNV, Accumulate>(M, K, A, a_rs, a_ks, B + c, ldb, C + c, ldc);
  for (; c < N; c += W)  // a last panel of one vector
    gemm_panel<T, 1, Accumulate>(M, K, A, a_rs, a_ks, B + c, ldb, C + c, ldc);
}
