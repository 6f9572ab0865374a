// Which key tiles of a row range need a per-element mask, decided once per row range instead of
// once per tile (the sm90 forward's key loop). Built on streaming.h's row intervals; host and device.
#pragma once

#include <cstdint>

#include "flux/streaming.h"

namespace flux {

// Which key tiles of the rows [i0, i1) need a per-element mask when keys are taken block_n at a time
// (tile n holds keys [n * block_n, (n + 1) * block_n)): every tile that classify_tile does not call
// kFull, and the ragged last tile that hangs over seqlen_k, as thresholds on the tile index. A key
// loop then tests two integers per tile instead of classifying it (classify_tile's 64-bit interval
// arithmetic cost the sm90 forward ~100 instructions per warp and tile). The tiles are
//   n >= mask_from             the diagonal (keys past row i0's end) and the ragged end of the keys;
//   band_lo <= n < band_hi     streaming only: tiles that reach past row i0's sink end and start
//                              before row i1 - 1's window start (the window edge, the sink edge and,
//                              for a range that spans blocks, the keys some rows skip).
// An empty row range (i0 >= i1: rows past the sequence, whose output is never stored) keeps only the
// ragged tile, whose rows past seqlen_k hold another sequence's keys. tests/cpp/test_streaming.cpp
// checks the plan against classify_tile and the element rule.
struct TileMaskPlan {
  int64_t mask_from;
  int64_t band_lo;
  int64_t band_hi;

  FLUX_HOST_DEVICE bool needs_mask(int64_t n) const {
    return n >= mask_from || (n >= band_lo && n < band_hi);
  }
};

FLUX_HOST_DEVICE TileMaskPlan tile_mask_plan(const RowRule& r, int64_t i0, int64_t i1, int64_t block_n) {
  TileMaskPlan plan;
  plan.mask_from = r.seqlen_k / block_n;  // the first tile with j0 + block_n > seqlen_k
  plan.band_lo = 0;
  plan.band_hi = 0;
  if (i0 >= i1) return plan;
  // j0 + block_n > key_end(i0) <=> n >= key_end(i0) / block_n; only a real bound below seqlen_k.
  const int64_t key_end0 = row_key_end(r, i0);
  if (key_end0 < r.seqlen_k) plan.mask_from = imin(plan.mask_from, key_end0 / block_n);
  if (r.streaming) {
    // j0 + block_n > sink_end(i0) <=> n >= sink_end(i0) / block_n;
    // j0 < local_start(i1 - 1)    <=> n < ceil(local_start(i1 - 1) / block_n).
    plan.band_lo = row_sink_end(r, i0) / block_n;
    plan.band_hi = (row_local_start(r, i1 - 1) + block_n - 1) / block_n;
  }
  return plan;
}

}  // namespace flux
