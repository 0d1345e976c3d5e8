// Which keys a query row may see: causal and window folded by the host into
// window_left / window_right, lengths per batch. ISA-independent; every CPU
// kernel variant and the host share it.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../params.h"

namespace effattn {
namespace cpu {

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

}  // namespace cpu
}  // namespace effattn
