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

// "No bound" for a window side.
constexpr int64_t kUnbounded = -1;

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
  int64_t q_batch_stride = 0, q_head_stride = 0, q_row_stride = 0;
  int64_t k_batch_stride = 0, k_head_stride = 0, k_row_stride = 0;
  int64_t v_batch_stride = 0, v_head_stride = 0, v_row_stride = 0;
  int64_t o_batch_stride = 0, o_head_stride = 0, o_row_stride = 0;
  // The mask may broadcast (stride 0) on any dim, the last one included.
  int64_t mask_batch_stride = 0, mask_head_stride = 0;
  int64_t mask_row_stride = 0, mask_col_stride = 0;
  MaskKind mask_kind = MaskKind::kNone;

  // ---- semantics ---------------------------------------------------------
  double scale = 1.0;
  // Query row i may see key j iff  i - window_left <= j <= i + window_right,
  // a side equal to kUnbounded being open. is_causal is folded in by the host
  // (window_right = min(window_right, 0)), top-left aligned as in SDPA.
  int64_t window_left = kUnbounded;
  int64_t window_right = kUnbounded;

  int64_t group_size() const { return heads_q / heads_kv; }
};

struct BwdParams : FwdParams {
  // Inputs beyond the forward's (out and lse are read, not written).
  const void* dout = nullptr;     // (B, Hq, Lq, Ev)
  const void* dlse = nullptr;     // (B, Hq, Lq) contiguous, accumulator type, or null
  int64_t do_batch_stride = 0, do_head_stride = 0, do_row_stride = 0;

  // Outputs.
  void* dq = nullptr;  // like q
  void* dk = nullptr;  // like k
  void* dv = nullptr;  // like v
  int64_t dq_batch_stride = 0, dq_head_stride = 0, dq_row_stride = 0;
  int64_t dk_batch_stride = 0, dk_head_stride = 0, dk_row_stride = 0;
  int64_t dv_batch_stride = 0, dv_head_stride = 0, dv_row_stride = 0;

  // Scratch, all O(B * H * Lq): delta = rowsum(dO * O) - dlse, and the dQ
  // accumulator (num_key_splits, B, Hq, Lq, E), both in the accumulator type.
  void* delta = nullptr;
  void* dq_accum = nullptr;
  int64_t num_key_splits = 1;
};

}  // namespace effattn
