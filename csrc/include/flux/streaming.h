// The one definition of which keys a query row sees (DESIGN.md section 1), as arithmetic on
// positions: no mask tensor exists anywhere in the project. Used by the CPU kernels, the CUDA kernels
// (forward producer and consumers, backward, decode) and the Catch2 tests, hence __host__ __device__.
//
// Coordinates. A sequence has Lq query rows and Lk keys. With causal masking, query row i sits at key
// position t = i + (Lk - Lq) (bottom-right alignment, as FlashAttention >= 2.1); it may be negative
// when Lq > Lk, and then the row sees nothing. Without causal masking every row sees [0, Lk); the
// streaming pattern is always causal.
//
// Row view. Row i sees the union of two half-open key intervals
//   sink  [0, sink_end)          sink_end  = min(sink_tokens, hi)
//   local [local_lo, hi)         local_lo  = max(sink_end, first key of block(t) - (local_blocks - 1))
// with hi = min(Lk, t + 1). For dense attention the sink interval is empty and local_lo = 0.
// Both interval ends are non-decreasing in i, which is what makes the tile classification below exact
// on its "skip" answers and conservative (never wrong) on its "no mask needed" answers.
#pragma once

#include <cstdint>

#include "flux/params.h"

#if defined(__CUDACC__)
#define FLUX_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FLUX_HOST_DEVICE inline
#endif

namespace flux {

// The key set rule for one sequence, resolved (dense or streaming) before any loop runs.
struct RowRule {
  int64_t seqlen_q = 0;
  int64_t seqlen_k = 0;
  bool causal = false;
  bool streaming = false;  // implies causal
  int64_t sink_tokens = 0;
  int64_t local_blocks = 0;
  int64_t block_size = 1;
};

FLUX_HOST_DEVICE RowRule make_row_rule(int64_t seqlen_q, int64_t seqlen_k, bool causal, bool streaming,
                                       const StreamingPattern& p) {
  RowRule r;
  r.seqlen_q = seqlen_q;
  r.seqlen_k = seqlen_k;
  r.streaming = streaming;
  r.causal = causal || streaming;
  r.sink_tokens = p.sink_tokens;
  r.local_blocks = p.local_blocks;
  r.block_size = p.block_size > 0 ? p.block_size : 1;
  return r;
}

FLUX_HOST_DEVICE int64_t floor_div(int64_t a, int64_t b) {
  // b > 0; rounds toward -inf so negative positions land in negative blocks.
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}

FLUX_HOST_DEVICE int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
FLUX_HOST_DEVICE int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

// Key position of query row i (only meaningful when causal).
FLUX_HOST_DEVICE int64_t key_position(const RowRule& r, int64_t i) {
  return i + (r.seqlen_k - r.seqlen_q);
}

// End (exclusive) of the keys row i may see: min(Lk, t + 1), at least 0.
FLUX_HOST_DEVICE int64_t row_key_end(const RowRule& r, int64_t i) {
  if (!r.causal) return r.seqlen_k;
  return imax(int64_t(0), imin(r.seqlen_k, key_position(r, i) + 1));
}

// End (exclusive) of the sink interval of row i; 0 for dense rows.
FLUX_HOST_DEVICE int64_t row_sink_end(const RowRule& r, int64_t i) {
  if (!r.streaming) return 0;
  return imin(r.sink_tokens, row_key_end(r, i));
}

// Start of the local interval of row i (>= sink end); 0 for dense rows.
FLUX_HOST_DEVICE int64_t row_local_start(const RowRule& r, int64_t i) {
  if (!r.streaming) return 0;
  const int64_t t = key_position(r, i);
  const int64_t first_block = floor_div(t, r.block_size) - (r.local_blocks - 1);
  return imax(row_sink_end(r, i), first_block * r.block_size);
}

// Does row i see key j? The element-level truth every kernel must reproduce.
FLUX_HOST_DEVICE bool is_visible(const RowRule& r, int64_t i, int64_t j) {
  if (j < 0 || j >= row_key_end(r, i)) return false;
  if (!r.streaming) return true;
  return j < row_sink_end(r, i) || j >= row_local_start(r, i);
}

// Number of keys row i sees (used for FLOP counts and tests).
FLUX_HOST_DEVICE int64_t row_visible_count(const RowRule& r, int64_t i) {
  const int64_t hi = row_key_end(r, i);
  if (!r.streaming) return hi;
  return row_sink_end(r, i) + (hi - row_local_start(r, i));
}

// Tile view: rows [i0, i1) against keys [j0, j1) (both non-empty).
enum class TileKind : int { kSkip = 0, kPartial = 1, kFull = 2 };

FLUX_HOST_DEVICE TileKind classify_tile(const RowRule& r, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
  const int64_t last = i1 - 1;
  // Skip: no row of the tile sees any key of it. The union over rows is [0, sink_end(last)) together
  // with [local_start(i0), key_end(last)), since the interval ends are non-decreasing in the row.
  const bool hits_sink = j0 < row_sink_end(r, last);
  const bool hits_local = j0 < row_key_end(r, last) && j1 > row_local_start(r, i0);
  if (!hits_sink && !hits_local) return TileKind::kSkip;
  // Full: every row sees every key. Needs j1 <= key_end(i0) and, per row, the tile avoiding the gap
  // [sink_end, local_start); by monotonicity checking the first row (sink side) or the last row
  // (local side) covers all rows.
  if (j1 > row_key_end(r, i0)) return TileKind::kPartial;
  if (!r.streaming) return TileKind::kFull;
  if (j1 <= row_sink_end(r, i0) || j0 >= row_local_start(r, last)) return TileKind::kFull;
  return TileKind::kPartial;
}

// Key ranges a tile of rows [i0, i1) must visit, as at most two disjoint intervals in increasing
// order: [0, a_end) (sink part, may be empty) and [b_start, b_end) (local/causal part). Tiles of keys
// outside them are all kSkip. Dense rows give a_end = 0, b = [0, key_end(last)).
struct KeyRanges {
  int64_t a_end;
  int64_t b_start;
  int64_t b_end;
};

FLUX_HOST_DEVICE KeyRanges key_ranges_for_rows(const RowRule& r, int64_t i0, int64_t i1) {
  const int64_t last = i1 - 1;
  KeyRanges kr;
  kr.b_end = row_key_end(r, last);
  if (!r.streaming) {
    kr.a_end = 0;
    kr.b_start = 0;
    return kr;
  }
  kr.a_end = row_sink_end(r, last);
  kr.b_start = imin(row_local_start(r, i0), kr.b_end);
  if (kr.b_start <= kr.a_end) {  // the two intervals touch: one interval
    kr.b_start = 0;
    kr.a_end = 0;
  }
  return kr;
}

// Column view: the rows that see at least one key of [j0, j1), as one interval [lo, hi) (possibly
// empty, lo >= hi). Used by backward passes that iterate over key tiles.
struct RowRange {
  int64_t lo;
  int64_t hi;
};

FLUX_HOST_DEVICE RowRange rows_for_keys(const RowRule& r, int64_t j0, int64_t j1) {
  RowRange rr;
  if (!r.causal) {
    rr.lo = 0;
    rr.hi = r.seqlen_q;
    return rr;
  }
  // Row i sees some key of the tile only if its key_end > j0, i.e. t >= j0.
  const int64_t offset = r.seqlen_k - r.seqlen_q;
  rr.lo = imax(int64_t(0), j0 - offset);
  rr.hi = r.seqlen_q;
  if (r.streaming && j0 >= r.sink_tokens) {
    // A non-sink key j is seen by rows with block(t) - (local_blocks - 1) <= block(j), i.e. the local
    // window of row t reaches back to j: t < (block(j1 - 1) + local_blocks) * block_size.
    const int64_t t_end = (floor_div(j1 - 1, r.block_size) + r.local_blocks) * r.block_size;
    rr.hi = imin(r.seqlen_q, imax(int64_t(0), t_end - offset));
  }
  if (rr.hi < rr.lo) rr.hi = rr.lo;
  return rr;
}

}  // namespace flux
