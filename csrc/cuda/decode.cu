// Decode attention on CUDA: one query token per sequence against a contiguous or paged KV cache.
//
// Split-KV (flash-decoding): the keys a sequence's new token sees (streaming.h's row rule, so an SA
// sequence visits only sink + window) are numbered 0..n_visible-1 and cut into num_splits contiguous
// chunks. One CTA handles (split, kv head, head tile, batch): it reads each K/V row of its chunk once
// and applies it to all the q heads of its tile (GQA is never expanded), then writes a normalised
// partial (out, lse). A combine kernel merges the partials exactly by lse. num_splits depends only on
// shapes and params.max_seqlen_k, never on cache_seqlens values, so the decode is graph-capturable.
//
// Inside a CTA the 128 threads form row groups of kThreadsPerRow lanes; a row group owns one key row
// at a time (16-byte loads, each lane a slice of head_dim) and keeps its own online-softmax state, so
// the main loop needs no barrier. Row groups are merged through shared memory at the end.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_utils.cuh"
#include "flux/launch.h"
#include "flux/params.h"
#include "flux/streaming.h"

namespace flux {
namespace {

constexpr int kDecodeThreads = 128;
// Keys each row group loads before using any: 2 x 4 independent 16-byte loads in flight per thread.
constexpr int kRowsPerIter = 4;
// Upper bound on splits: bounds the combine kernel's shared memory and the workspace.
constexpr int kMaxSplits = 128;
// Below this many keys per split the partial write + combine costs more than the parallelism gains.
constexpr int64_t kMinKeysPerSplit = 256;
// CTAs per SM the split heuristic aims for: every variant fits 2 per SM (kHeads = 8 with 16-bit
// types takes 254 registers), so the split grid is one wave; 2 x 16 KB of loads in flight per SM.
constexpr int kTargetCtasPerSm = 2;
constexpr int kMaxHeadsPerCta = 8;  // q heads held in registers per CTA (q + accumulators)
constexpr int kCombineWarps = 4;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// The keys the new token of one sequence sees, numbered 0..n_visible-1: virtual index v < sink_end
// is key v, the rest continue at local_start. Dense rows have sink_end = local_start = 0.
struct VisibleKeys {
  int64_t n_visible;
  int64_t sink_end;
  int64_t local_start;
};

FLUX_HOST_DEVICE VisibleKeys visible_keys(int64_t seqlen, bool streaming, const StreamingPattern& pattern) {
  // The new token sits at position seqlen - 1 of a sequence of seqlen keys: row 0 of a 1-row rule.
  const RowRule rule = make_row_rule(1, seqlen, /*causal=*/true, streaming, pattern);
  VisibleKeys vk;
  vk.sink_end = row_sink_end(rule, 0);
  vk.local_start = row_local_start(rule, 0);
  vk.n_visible = row_visible_count(rule, 0);
  return vk;
}

FLUX_HOST_DEVICE int64_t visible_key(const VisibleKeys& vk, int64_t v) {
  return v < vk.sink_end ? v : vk.local_start + (v - vk.sink_end);
}

// Virtual key range [begin, end) of one split. Chunks are whole CTA tiles so that only the last tile
// of a split is partial; trailing splits may be empty (they write lse = -inf, weight 0 in the merge).
struct SplitRange {
  int64_t begin;
  int64_t end;
};

FLUX_HOST_DEVICE SplitRange split_range(int64_t n_visible, int num_splits, int split, int tile) {
  const int64_t chunk = ceil_div(ceil_div(n_visible, int64_t(num_splits)), int64_t(tile)) * tile;
  SplitRange r;
  r.begin = imin(n_visible, int64_t(split) * chunk);
  r.end = imin(n_visible, r.begin + chunk);
  return r;
}

// q heads per CTA: the smallest power of two covering the GQA group, capped by registers.
int heads_per_cta(int group) {
  int h = 1;
  while (h < group && h < kMaxHeadsPerCta) h *= 2;
  return h;
}

int choose_num_splits(const DecodeParams& p, int num_sms) {
  if (p.num_splits > 0) return p.num_splits < kMaxSplits ? p.num_splits : kMaxSplits;
  if (p.batch <= 0 || p.num_heads_k <= 0 || num_sms <= 0) return 1;
  const int group = p.num_heads_q / p.num_heads_k;
  const int64_t ctas = int64_t(p.batch) * p.num_heads_k * ceil_div(group, heads_per_cta(group));
  int64_t splits = ceil_div(int64_t(kTargetCtasPerSm) * num_sms, ctas);
  // Bound by the most keys a sequence can visit. kPerSequence may hold dense sequences, so only a
  // batch that is streaming throughout is bounded by the window. max_seqlen_k <= 0 means unknown.
  int64_t max_keys = p.max_seqlen_k;
  if (p.sparse_mode == SparseMode::kStreaming) {
    const int64_t window =
        int64_t(p.pattern.sink_tokens) + int64_t(p.pattern.local_blocks) * p.pattern.block_size;
    max_keys = max_keys > 0 ? imin(max_keys, window) : window;
  }
  if (max_keys > 0) splits = imin(splits, ceil_div(max_keys, kMinKeysPerSplit));
  return int(imax(1, imin(splits, kMaxSplits)));
}

size_t partial_bytes_per_split(const DecodeParams& p) {
  return size_t(p.batch) * p.num_heads_q * (size_t(p.head_dim) + 1) * sizeof(float);
}

// ---------------------------------------------------------------------------------------------
// 16-byte vectors of T, converted to fp32.

template <typename T>
struct Vec16;

template <>
struct Vec16<float> {
  static constexpr int kElems = 4;
  __device__ static void to_float(const uint4& u, float* f) {
    f[0] = __uint_as_float(u.x);
    f[1] = __uint_as_float(u.y);
    f[2] = __uint_as_float(u.z);
    f[3] = __uint_as_float(u.w);
  }
};

template <>
struct Vec16<__half> {
  static constexpr int kElems = 8;
  __device__ static void to_float(const uint4& u, float* f) {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      __half2 h2;
      memcpy(&h2, &w[i], sizeof(h2));
      const float2 f2 = __half22float2(h2);
      f[2 * i] = f2.x;
      f[2 * i + 1] = f2.y;
    }
  }
};

template <>
struct Vec16<__nv_bfloat16> {
  static constexpr int kElems = 8;
  __device__ static void to_float(const uint4& u, float* f) {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      __nv_bfloat162 h2;
      memcpy(&h2, &w[i], sizeof(h2));
      const float2 f2 = __bfloat1622float2(h2);
      f[2 * i] = f2.x;
      f[2 * i + 1] = f2.y;
    }
  }
};

__device__ __forceinline__ uint4 load16(const void* ptr) {
  // K/V/q are read-only for the kernel's lifetime: the non-coherent path is safe.
  return __ldg(static_cast<const uint4*>(ptr));
}

constexpr int pow2_ceil(int x) {
  int p = 1;
  while (p < x) p *= 2;
  return p;
}

template <typename T, int kHeadDim, int kHeads>
struct DecodeConfig {
  static constexpr int kElems = Vec16<T>::kElems;
  static constexpr int kVecsPerRow = kHeadDim / kElems;
  // One key row per row group; a row wider than a warp is covered by several vectors per lane.
  static constexpr int kThreadsPerRow = kVecsPerRow >= 32 ? 32 : pow2_ceil(kVecsPerRow);
  static constexpr int kVecsPerThread = (kVecsPerRow + kThreadsPerRow - 1) / kThreadsPerRow;
  static constexpr int kRowGroups = kDecodeThreads / kThreadsPerRow;
  static constexpr int kTile = kRowGroups * kRowsPerIter;  // keys per CTA iteration
  static_assert(kHeadDim % kElems == 0, "head_dim must be a whole number of 16-byte vectors");
  static_assert(32 % kThreadsPerRow == 0, "a row group must not straddle warps (shuffle reduction)");
  static_assert(kHeads >= 1 && kHeads <= kMaxHeadsPerCta, "heads per CTA out of range");
};

// Offset in elements of token j of sequence b, kv head h.
__device__ __forceinline__ int64_t cache_offset(const DecodeParams& p, int64_t b, int64_t j,
                                                int64_t page_stride, int64_t row_stride,
                                                int64_t head_stride, int64_t h) {
  if (p.block_table == nullptr) return b * page_stride + j * row_stride + h * head_stride;
  const int64_t page = p.block_table[b * p.block_table_stride + j / p.page_size];
  return page * page_stride + (j % p.page_size) * row_stride + h * head_stride;
}

// Grid: (num_splits, num_heads_k * head_tiles, batch).
template <typename T, int kHeadDim, int kHeads>
__global__ void __launch_bounds__(kDecodeThreads) decode_split_kernel(const DecodeParams p, int num_splits,
                                                                      int head_tiles) {
  using Cfg = DecodeConfig<T, kHeadDim, kHeads>;
  constexpr int kTpr = Cfg::kThreadsPerRow;
  constexpr int kVpt = Cfg::kVecsPerThread;
  constexpr int kElems = Cfg::kElems;
  constexpr int kGroups = Cfg::kRowGroups;

  const int split = blockIdx.x;
  const int kvh = blockIdx.y / head_tiles;
  const int head_tile = blockIdx.y % head_tiles;
  const int b = blockIdx.z;
  const int group = p.num_heads_q / p.num_heads_k;
  const int head0 = kvh * group + head_tile * kHeads;  // first q head of this CTA
  const int heads_here = min(kHeads, group - head_tile * kHeads);

  const int tid = threadIdx.x;
  const int lane = tid % kTpr;        // slice of head_dim within the row group
  const int row_group = tid / kTpr;

  const int64_t seqlen = imax(0, p.cache_seqlens[b]);
  const bool streaming = p.sparse_mode == SparseMode::kStreaming ||
                         (p.sparse_mode == SparseMode::kPerSequence && p.use_sparse[b]);
  const VisibleKeys vk = visible_keys(seqlen, streaming, p.pattern);
  const SplitRange range = split_range(vk.n_visible, num_splits, split, Cfg::kTile);

  // q in registers, pre-multiplied by scale * log2(e) so the softmax runs on exp2.
  float q[kHeads][kVpt][kElems];
  {
    const float q_scale = p.scale * kLog2e;
    const T* q_base = static_cast<const T*>(p.q) + b * p.q_batch_stride;
#pragma unroll
    for (int h = 0; h < kHeads; ++h) {
#pragma unroll
      for (int t = 0; t < kVpt; ++t) {
        const int c = lane + t * kTpr;
        if (h < heads_here && c < Cfg::kVecsPerRow) {
          Vec16<T>::to_float(load16(q_base + int64_t(head0 + h) * p.q_head_stride + c * kElems), q[h][t]);
#pragma unroll
          for (int e = 0; e < kElems; ++e) q[h][t][e] *= q_scale;
        } else {
#pragma unroll
          for (int e = 0; e < kElems; ++e) q[h][t][e] = 0.f;
        }
      }
    }
  }

  float m[kHeads], l[kHeads], acc[kHeads][kVpt][kElems];
#pragma unroll
  for (int h = 0; h < kHeads; ++h) {
    m[h] = -INFINITY;
    l[h] = 0.f;
#pragma unroll
    for (int t = 0; t < kVpt; ++t)
#pragma unroll
      for (int e = 0; e < kElems; ++e) acc[h][t][e] = 0.f;
  }

  const T* k_cache = static_cast<const T*>(p.k_cache);
  const T* v_cache = static_cast<const T*>(p.v_cache);

  for (int64_t base = range.begin; base < range.end; base += Cfg::kTile) {
    // Consecutive row groups take consecutive keys, so a warp's loads cover neighbouring rows.
    uint4 k_raw[kRowsPerIter][kVpt], v_raw[kRowsPerIter][kVpt];
    bool valid[kRowsPerIter];
#pragma unroll
    for (int r = 0; r < kRowsPerIter; ++r) {
      const int64_t v = base + r * kGroups + row_group;
      valid[r] = v < range.end;
      int64_t k_off = 0, v_off = 0;
      if (valid[r]) {
        const int64_t j = visible_key(vk, v);
        k_off = cache_offset(p, b, j, p.k_page_stride, p.k_row_stride, p.k_head_stride, kvh);
        v_off = cache_offset(p, b, j, p.v_page_stride, p.v_row_stride, p.v_head_stride, kvh);
      }
#pragma unroll
      for (int t = 0; t < kVpt; ++t) {
        const int c = lane + t * kTpr;
        if (valid[r] && c < Cfg::kVecsPerRow) {
          k_raw[r][t] = load16(k_cache + k_off + c * kElems);
          v_raw[r][t] = load16(v_cache + v_off + c * kElems);
        } else {
          k_raw[r][t] = make_uint4(0, 0, 0, 0);
          v_raw[r][t] = make_uint4(0, 0, 0, 0);
        }
      }
    }

    float s[kRowsPerIter][kHeads];
#pragma unroll
    for (int r = 0; r < kRowsPerIter; ++r) {
#pragma unroll
      for (int h = 0; h < kHeads; ++h) s[r][h] = 0.f;
#pragma unroll
      for (int t = 0; t < kVpt; ++t) {
        float kf[kElems];
        Vec16<T>::to_float(k_raw[r][t], kf);
#pragma unroll
        for (int h = 0; h < kHeads; ++h)
#pragma unroll
          for (int e = 0; e < kElems; ++e) s[r][h] = fmaf(q[h][t][e], kf[e], s[r][h]);
      }
    }
    // Butterfly over the row group's lanes (aligned power-of-two lane sets, so xor stays inside the
    // group); every lane of the warp executes it, valid row or not.
#pragma unroll
    for (int off = kTpr / 2; off > 0; off /= 2)
#pragma unroll
      for (int r = 0; r < kRowsPerIter; ++r)
#pragma unroll
        for (int h = 0; h < kHeads; ++h) s[r][h] += __shfl_xor_sync(0xffffffffu, s[r][h], off);

#pragma unroll
    for (int r = 0; r < kRowsPerIter; ++r)
      if (!valid[r])
#pragma unroll
        for (int h = 0; h < kHeads; ++h) s[r][h] = -INFINITY;

#pragma unroll
    for (int h = 0; h < kHeads; ++h) {
      float m_new = m[h];
#pragma unroll
      for (int r = 0; r < kRowsPerIter; ++r) m_new = fmaxf(m_new, s[r][h]);
      // Only a row group that has seen no key yet and got none now stays at -inf; skipping keeps
      // exp2(-inf - -inf) = NaN out of its state.
      if (m_new == -INFINITY) continue;
      const float alpha = exp2f(m[h] - m_new);
      float pr[kRowsPerIter];
      float sum = 0.f;
#pragma unroll
      for (int r = 0; r < kRowsPerIter; ++r) {
        pr[r] = exp2f(s[r][h] - m_new);
        sum += pr[r];
      }
      l[h] = l[h] * alpha + sum;
      m[h] = m_new;
#pragma unroll
      for (int t = 0; t < kVpt; ++t) {
#pragma unroll
        for (int e = 0; e < kElems; ++e) acc[h][t][e] *= alpha;
#pragma unroll
        for (int r = 0; r < kRowsPerIter; ++r) {
          float vf[kElems];
          Vec16<T>::to_float(v_raw[r][t], vf);
#pragma unroll
          for (int e = 0; e < kElems; ++e) acc[h][t][e] = fmaf(pr[r], vf[e], acc[h][t][e]);
        }
      }
    }
  }

  // Merge the row groups' states: o = sum_g 2^(m_g - M) acc_g / sum_g 2^(m_g - M) l_g.
  __shared__ float s_m[kGroups][kHeads];
  __shared__ float s_l[kGroups][kHeads];
  __shared__ float s_acc[kGroups][kHeads][kHeadDim];
#pragma unroll
  for (int h = 0; h < kHeads; ++h) {
    if (lane == 0) {
      s_m[row_group][h] = m[h];
      s_l[row_group][h] = l[h];
    }
#pragma unroll
    for (int t = 0; t < kVpt; ++t) {
      const int c = lane + t * kTpr;
      if (c < Cfg::kVecsPerRow)
#pragma unroll
        for (int e = 0; e < kElems; ++e) s_acc[row_group][h][c * kElems + e] = acc[h][t][e];
    }
  }
  __syncthreads();

  for (int idx = tid; idx < kHeads * kHeadDim; idx += kDecodeThreads) {
    const int h = idx / kHeadDim;
    const int d = idx % kHeadDim;
    if (h >= heads_here) continue;
    float m_all = -INFINITY;
#pragma unroll
    for (int g = 0; g < kGroups; ++g) m_all = fmaxf(m_all, s_m[g][h]);
    float o = 0.f, lse = -INFINITY;
    if (m_all != -INFINITY) {
      float l_all = 0.f;
#pragma unroll
      for (int g = 0; g < kGroups; ++g) {
        const float w = exp2f(s_m[g][h] - m_all);  // 0 for a group that saw no key
        l_all = fmaf(w, s_l[g][h], l_all);
        o = fmaf(w, s_acc[g][h][d], o);
      }
      o /= l_all;
      lse = (m_all + log2f(l_all)) * kLn2;  // natural-log lse (the op contract)
    }
    const int hq = head0 + h;
    if (num_splits == 1) {
      T* out = static_cast<T*>(p.out) + b * p.o_batch_stride + int64_t(hq) * p.o_head_stride;
      out[d] = from_float<T>(o);
      if (d == 0) p.lse[b * p.lse_batch_stride + hq] = lse;
    } else {
      // Workspace: o_part [num_splits, batch, Hq, D] then lse_part [num_splits, batch, Hq], fp32.
      const int64_t row = (int64_t(split) * p.batch + b) * p.num_heads_q + hq;
      float* o_part = static_cast<float*>(p.workspace);
      float* lse_part = o_part + int64_t(num_splits) * p.batch * p.num_heads_q * p.head_dim;
      o_part[row * p.head_dim + d] = o;
      if (d == 0) lse_part[row] = lse;
    }
  }
}

// One warp per (batch, q head): weights w_s = exp(lse_s - max), out = sum w_s o_s / sum w_s,
// lse = max + log(sum w_s). All splits empty (empty sequence) -> out 0, lse -inf.
template <typename T>
__global__ void __launch_bounds__(kCombineWarps * 32)
    decode_combine_kernel(const DecodeParams p, int num_splits) {
  __shared__ float s_w[kCombineWarps][kMaxSplits];
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t rows = int64_t(p.batch) * p.num_heads_q;
  const int64_t row = int64_t(blockIdx.x) * kCombineWarps + warp;
  if (row >= rows) return;  // whole warp exits; no block-wide barrier follows
  const int b = int(row / p.num_heads_q);
  const int hq = int(row % p.num_heads_q);
  const float* o_part = static_cast<const float*>(p.workspace);
  const float* lse_part = o_part + int64_t(num_splits) * rows * p.head_dim;

  float m_all = -INFINITY;
  for (int s = lane; s < num_splits; s += 32) m_all = fmaxf(m_all, lse_part[s * rows + row]);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) m_all = fmaxf(m_all, __shfl_xor_sync(0xffffffffu, m_all, off));

  float l_all = 0.f;
  for (int s = lane; s < num_splits; s += 32) {
    const float w = m_all == -INFINITY ? 0.f : expf(lse_part[s * rows + row] - m_all);
    s_w[warp][s] = w;
    l_all += w;
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) l_all += __shfl_xor_sync(0xffffffffu, l_all, off);
  __syncwarp();

  const float inv = m_all == -INFINITY ? 0.f : 1.f / l_all;
  T* out = static_cast<T*>(p.out) + b * p.o_batch_stride + int64_t(hq) * p.o_head_stride;
  for (int d = lane; d < p.head_dim; d += 32) {
    float o = 0.f;
    for (int s = 0; s < num_splits; ++s) o = fmaf(s_w[warp][s], o_part[(s * rows + row) * p.head_dim + d], o);
    out[d] = from_float<T>(o * inv);
  }
  if (lane == 0) p.lse[b * p.lse_batch_stride + hq] = m_all == -INFINITY ? -INFINITY : m_all + logf(l_all);
}

template <typename T, int kHeadDim, int kHeads>
cudaError_t launch_decode(const DecodeParams& p, int num_splits, cudaStream_t stream) {
  const int group = p.num_heads_q / p.num_heads_k;
  const int head_tiles = int(ceil_div(group, kHeads));
  const dim3 grid(num_splits, p.num_heads_k * head_tiles, p.batch);
  decode_split_kernel<T, kHeadDim, kHeads><<<grid, kDecodeThreads, 0, stream>>>(p, num_splits, head_tiles);
  FLUX_CUDA_CHECK_LAUNCH();
  if (num_splits > 1) {
    const int64_t rows = int64_t(p.batch) * p.num_heads_q;
    const unsigned blocks = unsigned(ceil_div(rows, int64_t(kCombineWarps)));
    decode_combine_kernel<T><<<blocks, kCombineWarps * 32, 0, stream>>>(p, num_splits);
    FLUX_CUDA_CHECK_LAUNCH();
  }
  return cudaSuccess;
}

template <typename T, int kHeadDim>
cudaError_t dispatch_heads(const DecodeParams& p, int num_splits, cudaStream_t stream) {
  switch (heads_per_cta(p.num_heads_q / p.num_heads_k)) {
    case 1: return launch_decode<T, kHeadDim, 1>(p, num_splits, stream);
    case 2: return launch_decode<T, kHeadDim, 2>(p, num_splits, stream);
    case 4: return launch_decode<T, kHeadDim, 4>(p, num_splits, stream);
    default: return launch_decode<T, kHeadDim, 8>(p, num_splits, stream);
  }
}

template <typename T>
cudaError_t dispatch_head_dim(const DecodeParams& p, int num_splits, cudaStream_t stream) {
  switch (p.head_dim) {
    case 32: return dispatch_heads<T, 32>(p, num_splits, stream);
    case 64: return dispatch_heads<T, 64>(p, num_splits, stream);
    case 96: return dispatch_heads<T, 96>(p, num_splits, stream);
    case 128: return dispatch_heads<T, 128>(p, num_splits, stream);
    case 256: return dispatch_heads<T, 256>(p, num_splits, stream);
    default: return cudaErrorInvalidValue;
  }
}

// 16-byte loads need every row start of q, K and V on a 16-byte boundary.
bool vector_loads_ok(const DecodeParams& p, size_t elem_size) {
  return rows_16b_aligned(p.q, elem_size, p.q_batch_stride, p.q_head_stride, 0) &&
         rows_16b_aligned(p.k_cache, elem_size, p.k_page_stride, p.k_row_stride, p.k_head_stride) &&
         rows_16b_aligned(p.v_cache, elem_size, p.v_page_stride, p.v_row_stride, p.v_head_stride);
}

}  // namespace

size_t decode_workspace_bytes(const DecodeParams& params, int num_sms) {
  const int splits = choose_num_splits(params, num_sms);
  return splits > 1 ? size_t(splits) * partial_bytes_per_split(params) : 0;
}

cudaError_t run_decode_attention(DecodeParams& params, cudaStream_t stream) {
  const DecodeParams& p = params;
  if (p.num_heads_k <= 0 || p.num_heads_q % p.num_heads_k != 0 || p.batch < 0 || p.batch > 65535)
    return cudaErrorInvalidValue;
  if (p.block_table != nullptr && p.page_size <= 0) return cudaErrorInvalidValue;
  const int group = p.num_heads_q / p.num_heads_k;
  if (int64_t(p.num_heads_k) * ceil_div(group, heads_per_cta(group)) > 65535) return cudaErrorInvalidValue;
  if (p.batch == 0) return cudaSuccess;
  const size_t elem_size = p.dtype == DataType::kFloat32 ? 4 : 2;
  if (p.dtype == DataType::kFloat64 || !vector_loads_ok(p, elem_size)) return cudaErrorInvalidValue;

  int device = 0, num_sms = 0;
  FLUX_CUDA_CHECK(cudaGetDevice(&device));
  FLUX_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device));

  int num_splits = choose_num_splits(p, num_sms);
  // A workspace smaller than decode_workspace_bytes asked for (e.g. sized with another SM count)
  // means fewer splits, never an overrun.
  if (num_splits > 1) {
    const size_t fit = p.workspace == nullptr ? 0 : p.workspace_bytes / partial_bytes_per_split(p);
    if (size_t(num_splits) > fit) num_splits = fit >= 2 ? int(fit) : 1;
  }
  params.num_splits = num_splits;  // report the split count used

  switch (p.dtype) {
    case DataType::kFloat32: return dispatch_head_dim<float>(p, num_splits, stream);
    case DataType::kFloat16: return dispatch_head_dim<__half>(p, num_splits, stream);
    case DataType::kBFloat16: return dispatch_head_dim<__nv_bfloat16>(p, num_splits, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace flux
