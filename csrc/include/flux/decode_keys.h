// Which cached keys a decode step reads, as one dense "virtual" index range: the decode view of the
// rule in flux/streaming.h. Shared by the CPU decode kernel, both CUDA decode kernels and the tests.
//
// The seqlen_q new tokens of a sequence with seqlen keys are rows 0..seqlen_q-1 of
// make_row_rule(seqlen_q, seqlen, causal = true, streaming): token t sits at position
// seqlen - seqlen_q + t. A set of rows sees at most two key intervals, [0, a) (the sink) and
// [b0, b1) (the window, or everything for dense rows); virtual index v < a is key v, the rest
// continue at b0. Kernels split the virtual range evenly between CTAs/warps, so an SA sequence costs
// O(sink + window) whatever its length and never touches an evicted key.
#pragma once

#include <cstdint>

#include "flux/params.h"
#include "flux/streaming.h"

namespace flux {

struct DecodeKeys {
  int64_t n_visible = 0;    // number of virtual indices
  int64_t sink_end = 0;     // a: virtual v < a is key v
  int64_t local_start = 0;  // b0: virtual v >= a is key b0 + (v - a)

  FLUX_HOST_DEVICE int64_t key(int64_t v) const { return v < sink_end ? v : local_start + (v - sink_end); }
};

// The rule of a sequence's new tokens (dense causal or streaming), from the cache length.
FLUX_HOST_DEVICE RowRule decode_rule(int64_t seqlen, int seqlen_q, bool streaming, const StreamingPattern& p) {
  return make_row_rule(seqlen_q, seqlen, /*causal=*/true, streaming, p);
}

// The keys row t alone sees (CPU kernel and the CUDA-core kernel: one token at a time).
FLUX_HOST_DEVICE DecodeKeys decode_keys_for_row(const RowRule& r, int64_t t) {
  DecodeKeys dk;
  dk.sink_end = row_sink_end(r, t);
  dk.local_start = row_local_start(r, t);
  dk.n_visible = row_visible_count(r, t);
  return dk;
}

// The union of the keys rows 0..seqlen_q-1 see (the tensor-core kernel: all new tokens of a
// sequence share one pass over the cache; rows that see fewer keys are masked element-wise).
FLUX_HOST_DEVICE DecodeKeys decode_keys_for_rows(const RowRule& r) {
  DecodeKeys dk;
  if (r.seqlen_q <= 0) return dk;
  const KeyRanges kr = key_ranges_for_rows(r, 0, r.seqlen_q);
  dk.sink_end = kr.a_end;
  dk.local_start = kr.b_start;
  dk.n_visible = kr.a_end + (kr.b_end - kr.b_start);
  return dk;
}

}  // namespace flux
