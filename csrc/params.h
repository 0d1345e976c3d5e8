// Plain parameter structs shared by every kernel (CPU now, CUDA later).
//
// Kernels see raw pointers, element strides and sizes only: no ATen, no
// torch::stable::Tensor. The host wrappers (csrc/cpu/attention_cpu.cpp) fill
// these from tensors after the Python side (effattn/spec.py) has validated
// and normalised the call to the canonical 4-D layout (batch, heads, rows, dim)
// with a contiguous last dimension.
#pragma once

#include <cstdint>

namespace effattn {

// How the optional dense mask is stored.
enum class MaskKind : int32_t {
  kNone = 0,
  kBool = 1,      // True = attend, False = score set to -inf
  kSameAsQ = 2,   // additive bias in the dtype of q
  kFloat32 = 3,   // additive bias in float32 (allowed for any q dtype)
};

// An unbounded window side: a bound no index reaches (|index| < 2^31), so the
// CPU kernels need no flag for it: i - kUnbounded and i + kUnbounded lie past
// every key. (The CUDA kernels predate this and read a negative side as
// unbounded: their host code converts, csrc/cuda/attention_cuda.cpp.)
constexpr int64_t kUnbounded = int64_t(1) << 40;

// Element strides of a (batch, heads, rows, dim) tensor whose last dim has
// stride 1.
struct RowStrides {
  int64_t batch = 0, head = 0, row = 0;
};

struct FwdParams {
  // ---- pointers ----------------------------------------------------------
  const void* q = nullptr;  // (B, Hq, Lq, E)
  const void* k = nullptr;  // (B, Hkv, Lk, E)
  const void* v = nullptr;  // (B, Hkv, Lk, Ev)
  void* out = nullptr;      // (B, Hq, Lq, Ev)
  void* lse = nullptr;      // (B, Hq, Lq) contiguous, accumulator type
  const void* mask = nullptr;             // broadcast view of (B, Hq, Lq, Lk)
  const int64_t* key_lengths = nullptr;   // (B,) or null: every key valid
  const int64_t* query_lengths = nullptr; // (B,) or null: every query valid

  // ---- sizes -------------------------------------------------------------
  int64_t batch = 0, heads_q = 0, heads_kv = 0;
  int64_t seqlen_q = 0, seqlen_k = 0, head_dim = 0, head_dim_v = 0;

  // ---- strides, in elements (last dim has stride 1) -----------------------
  RowStrides q_strides, k_strides, v_strides, o_strides;
  // The mask may broadcast (stride 0) on any dim, the last one included.
  int64_t mask_batch_stride = 0, mask_head_stride = 0;
  int64_t mask_row_stride = 0, mask_col_stride = 0;
  MaskKind mask_kind = MaskKind::kNone;

  // ---- semantics ---------------------------------------------------------
  double scale = 1.0;
  // Query row i may see key j iff  i - window_left <= j <= i + window_right:
  // the spec's band (effattn/spec.py), causal masking already folded in. A
  // side may be negative (e.g. bottom-right causal with Lq > Lk); kUnbounded
  // for an open side.
  int64_t window_left = kUnbounded;
  int64_t window_right = kUnbounded;

  int64_t group_size() const { return heads_kv > 0 ? heads_q / heads_kv : 0; }
};

struct BwdParams : FwdParams {
  // Inputs beyond the forward's (out and lse are read, not written).
  const void* dout = nullptr;     // (B, Hq, Lq, Ev)
  const void* dlse = nullptr;     // (B, Hq, Lq) contiguous, accumulator type, or null
  RowStrides do_strides;

  // Outputs.
  void* dq = nullptr;  // like q
  void* dk = nullptr;  // like k
  void* dv = nullptr;  // like v
  RowStrides dq_strides, dk_strides, dv_strides;

  // Scratch, all O(B * H * Lq): delta = rowsum(dO * O) - dlse, and the dQ
  // accumulator (num_key_splits, B, Hq, Lq, E), both in the accumulator type.
  void* delta = nullptr;
  void* dq_accum = nullptr;
  int64_t num_key_splits = 1;
};

}  // namespace effattn
