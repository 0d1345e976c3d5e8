// Tile shapes per head dimension, forward and backward. One struct per kernel
// family; every number has its reason next to it, and static_asserts keep the
// kernels' assumptions (a warp owns 16 rows; loads split evenly over threads).
#pragma once

#include <cstddef>
#include <cstdint>

namespace effattn {
namespace cuda {

// Shared-memory rows are padded by 8 elements (16 bytes): the 8 row addresses
// of an ldmatrix then start in 8 different 4-bank groups (no bank conflicts),
// while every row stays 16-byte aligned for cp.async.
constexpr int kSmemPad = 8;

template <typename T_, int kHeadDim_, int kMTiles_, int kBlockN_, int kNWarps_>
struct FwdTraits {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;  // padded head dim: E and Ev are <= it
  // Each warp owns kMTiles x 16 query rows: every K/V fragment it reads from
  // shared memory then feeds kMTiles MMAs (shared-memory traffic per FLOP / kMTiles).
  static constexpr int kMTiles = kMTiles_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kBlockM = 16 * kMTiles * kNWarps;  // query rows per block
  static constexpr int kBlockN = kBlockN_;                // keys per inner-loop step
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kStride = kHeadDim + kSmemPad;
  static constexpr int kSmemQ = kBlockM * kStride;
  static constexpr int kSmemK = kBlockN * kStride;
  static constexpr int kSmemV = kBlockN * kStride;
  static constexpr size_t kSmemBytes = size_t(kSmemQ + kSmemK + kSmemV) * sizeof(T);

  static_assert(kMTiles == 1 || kMTiles == 2, "a warp owns 16 or 32 query rows");
  static_assert(kHeadDim % 32 == 0, "head dim tiles: 16-wide k-steps, pairs of 8-wide n-tiles");
  static_assert(kBlockN % 16 == 0, "keys come in 16-wide k-steps of the P @ V MMA");
  static_assert((kBlockN * kHeadDim / 8) % kNThreads == 0, "K/V tile loads split evenly over threads");
  static_assert((kBlockM * kHeadDim / 8) % kNThreads == 0, "Q tile loads split evenly over threads");
};

// Forward tiles, as FlashAttention-2 on sm_80/sm_90: 128 query rows per block
// (each K/V tile read from L2 serves 128 queries) as 4 warps of 32 rows. The
// float accumulators are 32 x D (O) plus 32 x kBlockN (S) per warp: D <= 64
// takes 64-key steps, 96/128 take 32 keys (64-key steps spill registers
// there, ptxas -v for sm_90: 128 and 732 bytes). Past 128, O alone needs
// 96-128 registers at 16 rows: 64-row blocks of 4 warps x 16 rows, narrower
// key steps at 256.
// The Hopper kernels' tiles live in shared memory as panels of this many
// columns: a row of the 128-byte swizzle holds 64 16-bit elements, the widest
// a TMA box with that swizzle may be (sm90.h; the TMA boxes, launch_templates.h).
constexpr int kPanelCols = 64;

// Hopper forward tiles (sm_90a, flash_fwd_sm90_kernel.h): 2 warpgroups x 64
// query rows (wgmma's M is 64 per warpgroup), kBlockN keys per step, K and V
// in kStages-deep TMA rings. Tiles live in shared memory as 64-column panels
// (a 128-byte swizzle row holds 64 16-bit elements, the widest a TMA box with
// that swizzle may be): panel p of a tile of R rows holds columns
// [64 p, 64 p + 64) of every row, R x 128 bytes.
template <typename T_, int kHeadDim_, int kBlockN_, int kStages_ = 2>
struct Sm90FwdTraits {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kWarpgroups = 2;
  static constexpr int kBlockM = 64 * kWarpgroups;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNThreads = 128 * kWarpgroups;
  static constexpr int kStages = kStages_;
  static constexpr int kPanels = kHeadDim / kPanelCols;
  static constexpr uint32_t kPanelBytesQ = kBlockM * 128, kPanelBytesKV = kBlockN * 128;
  static constexpr uint32_t kTileBytesQ = kPanels * kPanelBytesQ, kTileBytesKV = kPanels * kPanelBytesKV;
  // Q, the K and V rings, 1 KB to align the tiles to the swizzle's 1024-byte
  // atoms, then 8-byte slots: the mbarriers (Q's, K's and V's "full") and each
  // stage's release counter.
  static constexpr int kBarriers = 1 + 3 * kStages;
  static constexpr size_t kSmemBytes = kTileBytesQ + 2 * kStages * kTileBytesKV + 1024 + 8 * kBarriers;

  static_assert(sizeof(T) == 2, "wgmma here takes fp16/bf16");
  static_assert(kHeadDim % kPanelCols == 0, "head dim in whole 64-column panels");
  static_assert(kBlockN % 16 == 0 && kBlockN <= 256, "wgmma N: multiple of 8 (16: P @ V's k-steps), <= 256");
  static_assert(kPanelBytesKV / 16 < (1 << 14), "V's panel stride fits the descriptor's 14-bit field");
  static_assert(kSmemBytes <= 227 * 1024, "fits an sm_90 block");
};

template <typename T, int D> struct FwdConfig;
// Turing (sm_75, opt-in builds only: EFFATTN_CUDA_SM75) lets a block opt into
// 64 KB of shared memory, and has no bfloat16 MMA: its tiles (Sm75, float16
// only) are the forward's own up to D = 128 (20, 36, 39 and 51 KB) and smaller
// backward tiles (BwdConfig). 192 and 256 have none (the forward alone takes
// 75 and 99 KB): the cuda backend refuses them below compute capability 8.0.
constexpr size_t kSmemTuring = 64 * 1024;

template <typename T> struct FwdConfig<T, 32> {
  using Traits = FwdTraits<T, 32, 2, 64, 4>;
  using Sm75 = Traits;
};
template <typename T> struct FwdConfig<T, 64> {
  using Traits = FwdTraits<T, 64, 2, 64, 4>;
  using Sm75 = Traits;
  using Sm90 = Sm90FwdTraits<T, 64, 128>;  // 80 KB
};
template <typename T> struct FwdConfig<T, 96> {
  using Traits = FwdTraits<T, 96, 2, 32, 4>;
  using Sm75 = Traits;
};
template <typename T> struct FwdConfig<T, 128> {
  using Traits = FwdTraits<T, 128, 2, 32, 4>;
  using Sm75 = Traits;
  // S (64 x 128) and O (64 x 128) take 64 float registers each per thread.
  using Sm90 = Sm90FwdTraits<T, 128, 128>;  // 161 KB
};
template <typename T> struct FwdConfig<T, 192> { using Traits = FwdTraits<T, 192, 1, 64, 4>; };
template <typename T> struct FwdConfig<T, 256> { using Traits = FwdTraits<T, 256, 1, 32, 4>; };

template <typename T_, int kHeadDim_, int kBlockN_, int kBlockM_, int kNWarps_, int kColSplits_ = 1>
struct BwdTraits {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;  // the width every tile is loaded at (S^T, dP^T reduce over it)
  static constexpr int kBlockN = kBlockN_;  // keys per block: dK, dV accumulate in registers
  static constexpr int kBlockM = kBlockM_;  // query rows per inner-loop step
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;
  // Past D = 128, 16 x D float accumulators for both dK and dV no longer fit a
  // warp's registers: kColSplits blocks share a key tile, each accumulating
  // dK, dV (and adding dQ) for kHeadDimAcc of the columns. Each recomputes
  // S^T and dP^T in full, so the MMA work is (2 * kColSplits + 3) / 5 of one block's.
  static constexpr int kColSplits = kColSplits_;
  static constexpr int kHeadDimAcc = kHeadDim / kColSplits;
  static constexpr int kStride = kHeadDim + kSmemPad;
  static constexpr int kStrideDs = kBlockM + kSmemPad;  // dS^T tile (keys x queries)
  // dQ = dS @ K: warps split the query rows in 16-row groups, then the columns.
  static constexpr int kWarpsM = kBlockM / 16;
  static constexpr int kWarpsD = kNWarps / kWarpsM;
  static constexpr int kDqCols = kHeadDimAcc / kWarpsD;
  static constexpr int kSmemK = kBlockN * kStride, kSmemV = kBlockN * kStride;
  // Q, dO (and their rows' lse, delta) are double-buffered: the next query
  // tile loads during a whole step.
  static constexpr int kStages = 2;
  static constexpr int kSmemQ = kBlockM * kStride, kSmemDo = kBlockM * kStride;  // per stage
  static constexpr int kSmemDs = kBlockN * kStrideDs;
  static constexpr size_t kSmemBytes =
      size_t(kSmemK + kSmemV + kStages * (kSmemQ + kSmemDo) + kSmemDs) * sizeof(T) +
      kStages * 2 * kBlockM * sizeof(float);

  static_assert(kBlockN == 16 * kNWarps, "each warp owns 16 keys");
  static_assert(kHeadDim % 32 == 0 && kBlockM % 16 == 0, "16-wide k-steps, pairs of 8-wide n-tiles");
  static_assert(kHeadDim % kColSplits == 0 && kHeadDimAcc % 16 == 0, "column splits of 16-wide pairs of n-tiles");
  static_assert(kNWarps % kWarpsM == 0 && kDqCols % 16 == 0, "dQ work splits evenly over warps");
  static_assert((kBlockM * kHeadDim / 8) % kNThreads == 0, "Q/dO tile loads split evenly over threads");
  static_assert((kBlockN * kHeadDim / 8) % kNThreads == 0, "K/V tile loads split evenly over threads");
  static_assert(kBlockM <= kNThreads, "one thread per query row loads lse and delta");
};

// Shared memory a block may opt into: 227 KB on sm_90, 163 KB on sm_80 and
// sm_87, 99 KB on sm_86, sm_89 and sm_120. The launcher runs Large where it
// fits the device and Small otherwise; Small fits 99 KB at every head dim.
constexpr size_t kSmemConsumerGpu = 99 * 1024;

// Backward tiles. Large: a warp's 16 keys keep dK and dV (16 x D floats each)
// in registers; 64 queries per step keeps S^T and dP^T at 32 registers each;
// 128 keys (8 warps) per block, so every dQ element takes one float atomic per
// 128 keys (the atomics limited the first version). 192 and 256 split the
// columns in two (128 and 96 accumulator columns: no more registers than 128),
// and 256 takes 32-query steps to fit 227 KB (219 and 209 KB).
// Small (99 KB): 64 keys per block from D = 96 on (D <= 64's Large fit: 59
// and 91 KB; 96: 88 KB), 32-query steps at 128 (74 KB), and for 192/256
// 16-query steps, 192 in three column splits of 64 (with 4 warps, kDqCols
// must be a multiple of 16: 78 KB) and 256 with 32 keys (2 warps, 68 KB).
// Sm75 (64 KB, Turing): D = 32's Large tiles fit (59 KB); from 64 on, 64 keys
// per block (4 warps) with 32-query steps at 64 and 96 (42 and 58 KB) and 16
// at 128 (54 KB).
// Hopper backward tiles (sm_90a, flash_bwd_sm90_kernel.h): 128 keys per block
// as 2 warpgroups x 64 (wgmma's M), whose dK and dV (64 x D floats each) stay
// in registers; 64 queries per step, Q and dO in a kStages-deep TMA ring; dS^T
// (keys x queries) through shared memory, double-buffered, for dQ = dS K. At
// D = 128 each warpgroup computes 64 of dQ's columns over all 128 keys (one
// panel of K each); at D = 64 (kDqByKeys) each computes all 64 columns over its
// own 64 keys, and both add them (twice the atomics, no sub-panel operand).
// Panels of 64 columns as in Sm90FwdTraits.
template <typename T_, int kHeadDim_, int kStages_ = 2>
struct Sm90BwdTraits {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kWarpgroups = 2;
  static constexpr int kBlockN = 64 * kWarpgroups;  // keys per block
  static constexpr int kBlockM = 64;                // queries per step
  static constexpr int kNThreads = 128 * kWarpgroups;
  static constexpr int kStages = kStages_;
  static constexpr int kPanels = kHeadDim / kPanelCols;
  static constexpr bool kDqByKeys = kHeadDim == 64;
  static constexpr int kDqCols = kDqByKeys ? kHeadDim : kHeadDim / kWarpgroups;  // dQ columns per warpgroup
  static constexpr int kDqKeys = kDqByKeys ? 64 : kBlockN;                       // over this many keys
  static constexpr int kColSplits = 1;                                           // every column in one block
  static constexpr uint32_t kPanelBytesKV = kBlockN * 128, kPanelBytesQ = kBlockM * 128;
  static constexpr uint32_t kTileBytesKV = kPanels * kPanelBytesKV, kTileBytesQ = kPanels * kPanelBytesQ;
  static constexpr uint32_t kTileBytesDs = kBlockN * 128;  // keys x 64 queries: one panel
  // K, V; Q and dO per stage; dS^T twice; 1 KB to align; the mbarriers (K/V's, each stage's).
  static constexpr int kBarriers = 1 + kStages;
  static constexpr size_t kSmemBytes =
      2 * kTileBytesKV + 2 * kStages * kTileBytesQ + 2 * kTileBytesDs + 1024 + 8 * kBarriers;

  static_assert(sizeof(T) == 2, "wgmma here takes fp16/bf16");
  static_assert(kBlockM == 64, "dS^T rows hold 64 queries: one 128-byte swizzle row");
  static_assert(kHeadDim == 64 || kHeadDim == 128, "dQ: one 64-column panel of K per warpgroup");
  static_assert(kSmemBytes <= 227 * 1024, "fits an sm_90 block");
};

template <typename T, int D> struct BwdConfig;
template <typename T> struct BwdConfig<T, 32> {
  using Large = BwdTraits<T, 32, 128, 64, 8>;
  using Small = Large;
  using Sm75 = Large;
};
template <typename T> struct BwdConfig<T, 64> {
  using Large = BwdTraits<T, 64, 128, 64, 8>;
  using Small = Large;
  using Sm75 = BwdTraits<T, 64, 64, 32, 4>;
  using Sm90 = Sm90BwdTraits<T, 64>;  // 97 KB
};
template <typename T> struct BwdConfig<T, 96> {
  using Large = BwdTraits<T, 96, 128, 64, 8>;
  using Small = BwdTraits<T, 96, 64, 64, 4>;
  using Sm75 = BwdTraits<T, 96, 64, 32, 4>;
};
template <typename T> struct BwdConfig<T, 128> {
  using Large = BwdTraits<T, 128, 128, 64, 8>;
  using Small = BwdTraits<T, 128, 64, 32, 4>;
  using Sm75 = BwdTraits<T, 128, 64, 16, 4>;
  using Sm90 = Sm90BwdTraits<T, 128>;  // 161 KB
};
template <typename T> struct BwdConfig<T, 192> {
  using Large = BwdTraits<T, 192, 128, 64, 8, 2>;
  using Small = BwdTraits<T, 192, 64, 16, 4, 3>;
};
template <typename T> struct BwdConfig<T, 256> {
  using Large = BwdTraits<T, 256, 128, 32, 8, 2>;
  using Small = BwdTraits<T, 256, 32, 16, 2, 2>;
};

}  // namespace cuda
}  // namespace effattn
