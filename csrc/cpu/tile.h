// Tile helpers for the CPU attention kernels: loading strided rows into
// accumulator-type tiles, two small GEMM shapes, and the structural mask.
//
// All tiles are row-major in the accumulator type (float, or double for
// float64 inputs). The two GEMMs are written in "axpy" form so that the inner
// loop runs over a contiguous row of the output with no reduction, which the
// compiler vectorises at -O3 without fast-math:
//   gemm_nn:  C[M][N] (+)= A[M][K] * B[K][N]
//   gemm_tn:  C[N][P]  += A[M][N]^T * B[M][P]
// Q.K^T is computed as gemm_nn with K loaded transposed (Kt[E][N]).
// Hand-tuned SIMD micro-kernels belong to the CPU-speed issue; these are the
// portable baseline they must match.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include "../params.h"

namespace effattn {
namespace cpu {

// Query rows per tile: 64 rows x E=128 floats = 32 KiB, the size of L1d.
constexpr int64_t kBlockM = 64;
// Keys per tile: the score tile (64 x 64 floats = 16 KiB) stays in L1 beside
// the Q tile, and K^T / V tiles of 64 keys stream from L2.
constexpr int64_t kBlockN = 64;

template <typename acc_t>
constexpr acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

template <typename acc_t, typename scalar_t>
inline acc_t to_acc(scalar_t x) {
  return static_cast<acc_t>(static_cast<float>(x));
}
template <>
inline double to_acc<double, double>(double x) {
  return x;
}

// exp for the softmax, branch-free so that loops over it vectorise (glibc's
// expf is a scalar call per score, which dominated the forward).
// x = n ln2 + r with |r| <= ln2/2, exp(r) by a degree-6 polynomial (relative
// error ~2e-7, float rounding level), 2^n put into the exponent bits.
// exp(-inf) and anything below -87 give exactly 0; the argument is never
// positive here (scores minus their running max), but up to +88 is exact too.
inline float exp_softmax(float x) {
  float xc = x < -87.0f ? -87.0f : x;  // plain selects: -fno-trapping-math if-converts them
  xc = xc > 88.0f ? 88.0f : xc;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (xc * 1.44269504088896341f + magic) - magic;
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return x < -87.0f ? 0.0f : p * two_n;
}
inline double exp_softmax(double x) { return std::exp(x); }  // float64 keeps libm accuracy

// Row reductions with kLanes independent partial results, so the compiler
// vectorises them without -ffast-math (a single float accumulator is a
// serial dependency it may not reorder).
constexpr int64_t kLanes = 8;

template <typename acc_t>
inline acc_t row_max(const acc_t* __restrict x, int64_t n) {
  acc_t lane[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) lane[l] = neg_inf<acc_t>();
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lane[l] = lane[l] > x[c + l] ? lane[l] : x[c + l];
  acc_t out = neg_inf<acc_t>();
  for (int64_t l = 0; l < kLanes; ++l) out = out > lane[l] ? out : lane[l];
  for (; c < n; ++c) out = out > x[c] ? out : x[c];
  return out;
}

template <typename acc_t>
inline acc_t row_sum(const acc_t* __restrict x, int64_t n) {
  acc_t lane[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lane[l] += x[c + l];
  acc_t out = 0;
  for (int64_t l = 0; l < kLanes; ++l) out += lane[l];
  for (; c < n; ++c) out += x[c];
  return out;
}

// x[c] = exp(x[c] - shift)
template <typename acc_t>
inline void exp_shifted(acc_t* __restrict x, int64_t n, acc_t shift) {
  for (int64_t c = 0; c < n; ++c) x[c] = exp_softmax(x[c] - shift);
}

// dst[r * ld + c] = src[r * row_stride + c], r < rows, c < cols
template <typename acc_t, typename scalar_t>
inline void load_rows(const scalar_t* __restrict src, int64_t row_stride,
                      int64_t rows, int64_t cols, acc_t* __restrict dst,
                      int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* s = src + r * row_stride;
    acc_t* d = dst + r * ld;
    for (int64_t c = 0; c < cols; ++c) d[c] = to_acc<acc_t>(s[c]);
  }
}

// dst[c * ld + r] = src[r * row_stride + c]: rows become columns.
template <typename acc_t, typename scalar_t>
inline void load_rows_transposed(const scalar_t* __restrict src,
                                 int64_t row_stride, int64_t rows,
                                 int64_t cols, acc_t* __restrict dst,
                                 int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* s = src + r * row_stride;
    for (int64_t c = 0; c < cols; ++c) dst[c * ld + r] = to_acc<acc_t>(s[c]);
  }
}

// dst[r * row_stride + c] = scale * src[r * ld + c], converted to scalar_t.
template <typename scalar_t, typename acc_t>
inline void store_rows(const acc_t* __restrict src, int64_t ld, int64_t rows,
                       int64_t cols, acc_t scale, scalar_t* __restrict dst,
                       int64_t row_stride) {
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t* s = src + r * ld;
    scalar_t* d = dst + r * row_stride;
    for (int64_t c = 0; c < cols; ++c) d[c] = static_cast<scalar_t>(s[c] * scale);
  }
}

template <typename scalar_t>
inline void zero_rows(scalar_t* dst, int64_t row_stride, int64_t rows,
                      int64_t cols) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[r * row_stride + c] = scalar_t(0);
}

// C[M][N] = A[M][K] * B[K][N]  (accumulate=false)  or  +=  (accumulate=true)
template <typename acc_t>
inline void gemm_nn(int64_t M, int64_t N, int64_t K, const acc_t* __restrict A,
                    int64_t lda, const acc_t* __restrict B, int64_t ldb,
                    acc_t* __restrict C, int64_t ldc, bool accumulate) {
  for (int64_t i = 0; i < M; ++i) {
    acc_t* c = C + i * ldc;
    if (!accumulate)
      for (int64_t j = 0; j < N; ++j) c[j] = acc_t(0);
    const acc_t* a = A + i * lda;
    for (int64_t kk = 0; kk < K; ++kk) {
      const acc_t aik = a[kk];
      if (aik == acc_t(0)) continue;  // masked probabilities are exact zeros
      const acc_t* b = B + kk * ldb;
      for (int64_t j = 0; j < N; ++j) c[j] += aik * b[j];
    }
  }
}

// C[N][P] += A[M][N]^T * B[M][P]
template <typename acc_t>
inline void gemm_tn(int64_t M, int64_t N, int64_t P, const acc_t* __restrict A,
                    int64_t lda, const acc_t* __restrict B, int64_t ldb,
                    acc_t* __restrict C, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i) {
    const acc_t* a = A + i * lda;
    const acc_t* b = B + i * ldb;
    for (int64_t j = 0; j < N; ++j) {
      const acc_t aij = a[j];
      if (aij == acc_t(0)) continue;
      acc_t* c = C + j * ldc;
      for (int64_t p = 0; p < P; ++p) c[p] += aij * b[p];
    }
  }
}

// ---------------------------------------------------------------------------
// Structure: which keys a query row may see (causal and window folded into
// window_left/right by the host, lengths given per batch).
// ---------------------------------------------------------------------------
struct RowBounds {
  int64_t window_left, window_right, key_len;
  // first key row i may see
  int64_t begin(int64_t i) const {
    return window_left < 0 ? 0 : std::max<int64_t>(0, i - window_left);
  }
  // one past the last key row i may see
  int64_t end(int64_t i) const {
    return window_right < 0 ? key_len
                            : std::min<int64_t>(key_len, i + window_right + 1);
  }
  // queries in [0, query_len) that see any key of [j0, j1)
  int64_t first_query(int64_t j0) const {
    return window_right < 0 ? 0 : std::max<int64_t>(0, j0 - window_right);
  }
  int64_t last_query_end(int64_t j1, int64_t query_len) const {
    return window_left < 0 ? query_len
                           : std::min<int64_t>(query_len, j1 - 1 + window_left + 1);
  }
};

inline RowBounds row_bounds(const FwdParams& p, int64_t b) {
  const int64_t key_len = p.key_lengths ? p.key_lengths[b] : p.seqlen_k;
  return RowBounds{p.window_left, p.window_right, key_len};
}
inline int64_t query_len(const FwdParams& p, int64_t b) {
  return p.query_lengths ? p.query_lengths[b] : p.seqlen_q;
}

// Reads the dense-mask tile for rows [i0, i0+M) x keys [j0, j0+N) of (b, h)
// into bias[r * N + c] as an additive term (-inf where a bool mask is False).
// Returns false when every entry is -inf: the whole tile is excluded.
template <typename acc_t, typename scalar_t>
inline bool load_mask_tile(const FwdParams& p, int64_t b, int64_t h,
                           int64_t i0, int64_t M, int64_t j0, int64_t N,
                           acc_t* __restrict bias) {
  const int64_t base = b * p.mask_batch_stride + h * p.mask_head_stride;
  bool any = false;
  for (int64_t r = 0; r < M; ++r) {
    const int64_t row = base + (i0 + r) * p.mask_row_stride;
    acc_t* out = bias + r * N;
    for (int64_t c = 0; c < N; ++c) {
      const int64_t off = row + (j0 + c) * p.mask_col_stride;
      acc_t val;
      switch (p.mask_kind) {
        case MaskKind::kBool:
          val = static_cast<const bool*>(p.mask)[off] ? acc_t(0) : neg_inf<acc_t>();
          break;
        case MaskKind::kSameAsQ:
          val = to_acc<acc_t>(static_cast<const scalar_t*>(p.mask)[off]);
          break;
        default:  // kFloat32
          val = static_cast<acc_t>(static_cast<const float*>(p.mask)[off]);
          break;
      }
      out[c] = val;
      any |= val != neg_inf<acc_t>();
    }
  }
  return any;
}

// S[r][c] = scale * S[r][c] + bias[r][c], then -inf outside each row's band.
template <typename acc_t>
inline void finish_scores(acc_t* __restrict S, int64_t M, int64_t N,
                          acc_t scale, const acc_t* __restrict bias,
                          const RowBounds& rb, int64_t i0, int64_t j0) {
  for (int64_t r = 0; r < M; ++r) {
    acc_t* s = S + r * N;
    if (bias) {
      const acc_t* bb = bias + r * N;
      for (int64_t c = 0; c < N; ++c) s[c] = s[c] * scale + bb[c];
    } else {
      for (int64_t c = 0; c < N; ++c) s[c] *= scale;
    }
    const int64_t lo = rb.begin(i0 + r) - j0, hi = rb.end(i0 + r) - j0;
    for (int64_t c = 0; c < std::min(lo, N); ++c) s[c] = neg_inf<acc_t>();
    for (int64_t c = std::max<int64_t>(hi, 0); c < N; ++c) s[c] = neg_inf<acc_t>();
  }
}

}  // namespace cpu
}  // namespace effattn
