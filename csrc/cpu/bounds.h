// Which keys a query row may see: the band i - window_left <= j <= i +
// window_right (the spec's, causal folded in; a side may be negative, and an
// open side is kUnbounded, which no index reaches, so no case needs a flag)
// and the key length per batch. A range may come out empty (end <= begin).
// ISA-independent; every CPU kernel variant shares it.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../params.h"

namespace effattn {
namespace cpu {

struct RowBounds {
  int64_t window_left, window_right, key_len;
  // first key row i may see
  int64_t begin(int64_t i) const { return std::max<int64_t>(0, i - window_left); }
  // one past the last key row i may see
  int64_t end(int64_t i) const { return std::min<int64_t>(key_len, i + window_right + 1); }
  // queries in [0, query_len) that see any key of [j0, j1)
  int64_t first_query(int64_t j0) const { return std::max<int64_t>(0, j0 - window_right); }
  int64_t last_query_end(int64_t j1, int64_t query_len) const {
    return std::min<int64_t>(query_len, j1 + window_left);
  }
};

inline RowBounds row_bounds(const FwdParams& p, int64_t b) {
  const int64_t key_len = p.key_lengths ? p.key_lengths[b] : p.seqlen_k;
  return RowBounds{p.window_left, p.window_right, key_len};
}
inline int64_t query_len(const FwdParams& p, int64_t b) {
  return p.query_lengths ? p.query_lengths[b] : p.seqlen_q;
}

}  // namespace cpu
}  // namespace effattn
