// Pieces every decode kernel shares (the two split kernels and the combine kernel): how the visible
// keys of a sequence are cut into splits, where a cached row lives, and the layout of the split-KV
// partials in the workspace. Torch-free.
#pragma once

#include <cstdint>

#include "cuda_utils.cuh"
#include "flux/decode_keys.h"
#include "flux/params.h"

namespace flux::decode {

// Upper bound on splits: bounds the combine kernel's shared memory and the workspace.
constexpr int kMaxSplits = 128;
// A split never gets fewer keys than this (applied on the device, from the true lengths): below it
// the partial write and the combine cost more than the extra parallelism gains, and short or SA
// sequences then occupy a few CTAs instead of many near-empty ones.
constexpr int64_t kMinKeysPerSplit = 256;
// Both split kernels are sized for two resident CTAs per SM (shared memory and registers): the
// split heuristic fills exactly one wave of kCtasPerSm * num_sms CTAs.
constexpr int kCtasPerSm = 2;

__device__ __forceinline__ bool is_streaming(const DecodeParams& p, int64_t b) {
  return p.sparse_mode == SparseMode::kStreaming ||
         (p.sparse_mode == SparseMode::kPerSequence && p.use_sparse[b]);
}

// Virtual key range [begin, end) of one split. Chunks are whole granules (the kernel's tile) so only
// the last tile of the sequence is partial; trailing splits may be empty (lse = -inf, weight 0).
struct SplitRange {
  int64_t begin;
  int64_t end;
};

FLUX_HOST_DEVICE SplitRange split_range(int64_t n_visible, int num_splits, int split, int64_t granule) {
  int64_t chunk = ceil_div(ceil_div(n_visible, int64_t(num_splits)), granule) * granule;
  const int64_t min_chunk = ceil_div(kMinKeysPerSplit, granule) * granule;
  if (chunk < min_chunk) chunk = min_chunk;
  SplitRange r;
  r.begin = imin(n_visible, int64_t(split) * chunk);
  r.end = imin(n_visible, r.begin + chunk);
  return r;
}

// Element offset of cached token j of sequence b, kv head h.
__device__ __forceinline__ int64_t cache_offset(const DecodeParams& p, int64_t b, int64_t j, int64_t page_stride,
                                                int64_t row_stride, int64_t head_stride, int64_t h) {
  if (p.block_table == nullptr) return b * page_stride + j * row_stride + h * head_stride;
  const int64_t page = p.block_table[b * p.block_table_stride + j / p.page_size];
  return page * page_stride + (j % p.page_size) * row_stride + h * head_stride;
}

// Split-KV partials, fp32: o_part [num_splits, rows, head_dim] then lse_part [num_splits, rows], with
// rows = batch * seqlen_q * Hq in (b, t, h) order. o_part rows are normalised (o / l), lse natural-log.
FLUX_HOST_DEVICE int64_t partial_rows(const DecodeParams& p) {
  return int64_t(p.batch) * p.seqlen_q * p.num_heads_q;
}

FLUX_HOST_DEVICE int64_t partial_row(const DecodeParams& p, int split, int64_t b, int64_t t, int64_t h) {
  return int64_t(split) * partial_rows(p) + (b * p.seqlen_q + t) * p.num_heads_q + h;
}

inline size_t partial_bytes_per_split(const DecodeParams& p) {
  return size_t(partial_rows(p)) * (size_t(p.head_dim) + 1) * sizeof(float);
}

__device__ __forceinline__ float* o_partials(const DecodeParams& p) { return static_cast<float*>(p.workspace); }

__device__ __forceinline__ float* lse_partials(const DecodeParams& p, int num_splits) {
  return static_cast<float*>(p.workspace) + int64_t(num_splits) * partial_rows(p) * p.head_dim;
}

__device__ __forceinline__ int64_t out_offset(const DecodeParams& p, int64_t b, int64_t t, int64_t h) {
  return b * p.o_batch_stride + t * p.o_token_stride + h * p.o_head_stride;
}

__device__ __forceinline__ int64_t lse_offset(const DecodeParams& p, int64_t b, int64_t t, int64_t h) {
  return b * p.lse_batch_stride + h * p.lse_head_stride + t * p.lse_token_stride;
}

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

}  // namespace flux::decode
