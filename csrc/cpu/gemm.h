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

// Summation order (accuracy; issues 28, 29, bench/dev/cpu_accuracy_sweep.py).
// A float32 chain of n FMAs errs by about sqrt(n) roundings of its running
// sum (n in the worst case), so no C entry is one long chain:
// - Accumulate (C += A B: the output over key tiles, dK and dV over query
//   tiles, dQ over key tiles) sums the call's K terms (one tile, 64-128)
//   from zero in registers and adds them to C once, like BLAS's beta = 1,
//   so a C built over many calls is a two-level sum. Continuing one chain
//   from C across 1,500 terms (6 heads x 255 queries of one key head) made
//   dK and dV 5-7x less accurate than PyTorch's CPU attention.
// - Otherwise (the scores S = Q K^T and dP = dO V^T, K = the head dim, up
//   to 256) the K terms are summed in chains of kKC, each added to the sum
//   of the previous ones: the scores' error is what the output, the LSE and
//   every gradient inherit, and one 64-term chain put single rows at 5-9x
//   SDPA's error (MKL's sgemm sums K <= 192 in one chain too; it splits 256).
// The Accumulate form costs nothing (C is loaded once either way); the score
// chains cost one load, add and store per C vector every kKC k steps
// (measured in bench/README.md, "CPU float32 accuracy").
constexpr int kMR = 6;       // rows of C per micro-tile
constexpr int kNV = 2;       // vectors of C per row per micro-tile
constexpr int64_t kKC = 32;  // k steps per chain of a non-accumulating call (above)

template <typename T, int MR, int NV, bool Accumulate>
inline void gemm_micro(int64_t K, const T* __restrict A, int64_t a_rs, int64_t a_ks,
                       const T* __restrict B, int64_t ldb, T* __restrict C, int64_t ldc) {
  constexpr int64_t W = kLanes<T>;
  int64_t k0 = 0;
  do {  // at least once: K = 0 still stores C = 0 (or leaves C + 0)
    const int64_t k1 = Accumulate ? K : std::min(K, k0 + kKC);
    Vec<T> acc[MR][NV];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = Vec<T>{};
    for (int64_t k = k0; k < k1; ++k) {
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
    const bool add = Accumulate || k0 > 0;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        T* c = C + r * ldc + v * W;
        vstore(c, add ? vload(c) + acc[r][v] : acc[r][v]);
      }
    k0 = k1;
  } while (k0 < K);
}

// One C entry of a non-accumulating gemm, sum_k a[k] * b[k], as a scalar in
// the micro-kernel's order and rounding (chains of kKC, madd: simd.h), so
// that a scalar dot product reproduces a GEMM entry bit for bit.
template <typename T>
inline T gemm_dot(int64_t K, const T* a, const T* b) {
  T sum = 0;
  int64_t k0 = 0;
  do {
    const int64_t k1 = std::min(K, k0 + kKC);
    T part = 0;
    for (int64_t k = k0; k < k1; ++k) part = madd(a[k], b[k], part);
    sum = k0 > 0 ? sum + part : part;
    k0 = k1;
  } while (k0 < K);
  return sum;
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
