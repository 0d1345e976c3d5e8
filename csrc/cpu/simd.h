// Portable SIMD vectors for the CPU kernels, one source for every ISA.
//
// The kernels are written once against Vec<T>, a GCC/Clang vector extension
// type of EFFATTN_SIMD_BYTES bytes, and compiled once per ISA (see
// kernels_isa.h): 16 bytes for the portable baseline (SSE2 / NEON), 32 for
// AVX2+FMA, 64 for AVX-512. The compiler maps +, *, comparisons and selects to
// the ISA's instructions, and a * b + c to an FMA where the ISA has one
// (-ffp-contract=fast, set in setup.py / CMakeLists.txt).
//
// Must be included inside the per-ISA namespace (after EFFATTN_SIMD_BYTES is
// defined); it defines only inline functions there, so the variants of
// different ISAs never share a symbol.

#ifndef EFFATTN_SIMD_BYTES
#error "define EFFATTN_SIMD_BYTES (16, 32 or 64) before including simd.h"
#endif

template <typename T>
struct SimdOf;

template <>
struct SimdOf<float> {
  typedef float V __attribute__((vector_size(EFFATTN_SIMD_BYTES)));
};
template <>
struct SimdOf<double> {
  typedef double V __attribute__((vector_size(EFFATTN_SIMD_BYTES)));
};

template <typename T>
using Vec = typename SimdOf<T>::V;

// Lanes per vector.
template <typename T>
constexpr int64_t kLanes = EFFATTN_SIMD_BYTES / sizeof(T);

// Unaligned load / store (memcpy compiles to one vmovups).
template <typename T>
inline Vec<T> vload(const T* p) {
  Vec<T> v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
inline void vstore(T* p, Vec<T> v) {
  __builtin_memcpy(p, &v, sizeof(v));
}
// x - (+0) is x for every x, -0 included, so this folds to one broadcast
// (x + 0 would not: -0 + 0 = +0, and the compiler must keep the add).
template <typename T>
inline Vec<T> vbroadcast(T x) {
  return x - Vec<T>{};
}
// a * b + c on scalars, rounded exactly like the GEMM's vector a * b + c
// (one FMA where the ISA has one, else a multiply and an add), so that a
// scalar dot product can reproduce a GEMM entry bit for bit.
template <typename T>
inline T madd(T a, T b, T c) {
  return (vbroadcast(a) * vbroadcast(b) + vbroadcast(c))[0];
}

// (A template on the vector type itself: the element type of Vec<T> cannot
// be deduced from an argument.)
template <typename V>
inline V vmax(V a, V b) {
  return a > b ? a : b;
}

// The softmax works in base 2: scores are multiplied by scale * log2(e) (one
// multiply, folded into the score scaling), so it needs only exp2, which
// skips exp's ln2 range reduction.
constexpr double kLog2e = 1.4426950408889634074;
constexpr double kLn2 = 0.69314718055994530942;

// 2^x on a whole vector: 2^x = 2^n * 2^r, n = round(x), |r| <= 1/2, and
// 2^r = 1 + r * P(r) with P of degree 4 fitted for the least maximum relative
// error on [-1/2, 1/2] (1.9e-7 in float arithmetic, 1.6 ulp; a degree-5 P
// halves that for 15% more exp time). x is clamped below at -127: x = -inf (a
// masked score) gives n = -127, whose exponent field is 0, so the result is
// exactly 0 with no select. Arguments here are <= 0 up to rounding (scores
// minus their running max or their log-sum-exp), so there is no upper clamp.
inline Vec<float> vexp2(Vec<float> x) {
  typedef uint32_t U __attribute__((vector_size(EFFATTN_SIMD_BYTES)));
  x = vmax(vbroadcast(-127.0f), x);  // this order keeps a NaN (NaN > -127 is false): NaN in, NaN out
  const Vec<float> magic = vbroadcast(12582912.0f);  // 1.5 * 2^23: t's low mantissa bits hold round(x)
  const Vec<float> t = x + magic;
  const Vec<float> r = x - (t - magic);
  Vec<float> p = vbroadcast(1.32647005e-3f);
  p = p * r + 9.67151020e-3f;
  p = p * r + 5.55073395e-2f;
  p = p * r + 2.40222424e-1f;
  p = p * r + 6.93147004e-1f;
  p = p * r + 1.0f;
  U bits;  // bits(t) = 0x4B400000 + n; shifted, only (n + 127) << 23 survives: 2^n
  __builtin_memcpy(&bits, &t, sizeof(bits));
  bits = (bits + 127u) << 23;
  Vec<float> two_n;
  __builtin_memcpy(&two_n, &bits, sizeof(two_n));
  return p * two_n;
}
// float64 keeps libm accuracy (it is the precision of the tests' oracle).
inline Vec<double> vexp2(Vec<double> x) {
  for (int64_t l = 0; l < kLanes<double>; ++l) x[l] = std::exp2(x[l]);
  return x;
}

// ---------------------------------------------------------------------------
// Conversion of one row of input elements to the accumulator type.
// bf16 -> f32 is a 16-bit shift; f16 -> f32 goes through the compiler's
// _Float16 (F16C's vcvtph2ps where the ISA has it); same-type rows are copied.
// ---------------------------------------------------------------------------
template <typename acc_t, typename scalar_t>
inline void convert_row(const scalar_t* __restrict src, int64_t n, acc_t* __restrict dst) {
  for (int64_t c = 0; c < n; ++c) dst[c] = static_cast<acc_t>(src[c]);
}
template <>
inline void convert_row<float, torch::headeronly::BFloat16>(
    const torch::headeronly::BFloat16* __restrict src, int64_t n, float* __restrict dst) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  for (int64_t c = 0; c < n; ++c) {
    const uint32_t bits = static_cast<uint32_t>(s[c]) << 16;
    __builtin_memcpy(dst + c, &bits, 4);
  }
}
#if defined(__FLT16_MAX__)  // the compiler has _Float16
template <>
inline void convert_row<float, torch::headeronly::Half>(const torch::headeronly::Half* __restrict src,
                                                        int64_t n, float* __restrict dst) {
  const _Float16* s = reinterpret_cast<const _Float16*>(src);
  for (int64_t c = 0; c < n; ++c) dst[c] = static_cast<float>(s[c]);
}
#endif
