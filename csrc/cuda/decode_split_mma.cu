// Decode split kernel on tensor cores (fp16/bf16, head_dim 64 or 128): the fast path.
//
// Decode is a pure stream over the KV cache (~1 FLOP per byte), so the kernel is built around
// keeping enough bytes in flight, not around math:
// - One CTA = 4 warps serves one (split, kv head, row tile, sequence). Its 16 "rows" are the (new
//   token, q head) pairs of the kv head's GQA group (PackGQA: each K/V row is read once for all of
//   them and the group is the M of the MMA; 32 q / 8 kv heads and one new token use 4 of 16 rows).
// - Each warp streams its own contiguous share of the split through a private kStages-deep ring of
//   16-key K/V tiles filled by cp.async (16-byte copies straight into shared memory, no register
//   staging). Warps never wait for each other inside the loop: only cp.async.wait_group and
//   __syncwarp. 2 CTAs/SM x 4 warps x (kStages - 1) x 8 KB = 128 KB in flight per SM at D = 128,
//   ~4x what Little's law asks for 4.3 TB/s over 132 SMs at ~1 us of loaded latency.
// - S = Q K^T and O += P V run on mma.sync m16n8k16 with fp32 accumulators: Q stays in registers as
//   A fragments, K/V come from shared memory by ldmatrix (V transposed on the fly), P is reused from
//   the S accumulators as the A operand (FA2's register trick). Tiles are XOR-swizzled (16-byte
//   chunk c of row r at c ^ (r % 8)) so cp.async writes and ldmatrix reads are bank-conflict-free.
// - The 4 warps' softmax states merge through shared memory at the end; a split writes a normalised
//   fp32 partial that decode.cu's combine kernel merges by lse.
// The split count depends only on shapes and max_seqlen_k (decode.cu), the keys of each split on the
// device from cache_seqlens, so the launch is CUDA-graph capturable.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "cuda_utils.cuh"
#include "decode_common.cuh"
#include "decode_kernels.h"
#include "flux/decode_keys.h"
#include "flux/params.h"
#include "flux/streaming.h"
#include "ptx_sm80.cuh"

namespace flux::decode {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kTileKeys = 16;  // keys per pipeline stage: the K of one P V mma
constexpr int kStages = 3;     // 3 x 8 KB per warp at D = 128: 2 CTAs/SM fit in 228 KB of smem
constexpr int kRows = 16;      // (token, q head) rows per CTA: the M of mma.m16n8k16

template <int kHeadDim>
struct MmaConfig {
  static constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per row (8 x 16-bit)
  static constexpr int kRowBytes = kHeadDim * 2;
  static constexpr int kTileBytes = kTileKeys * kRowBytes;  // K (or V) of one stage
  static constexpr int kStageBytes = 2 * kTileBytes;
  static constexpr int kWarpBytes = kStages * kStageBytes;
  static constexpr int kPipeBytes = kWarps * kWarpBytes;
  // The merge reuses the pipeline buffers: o [kWarps][kRows][D], then m and l [kWarps][kRows].
  static constexpr int kMergeBytes = (kWarps * kRows * kHeadDim + 2 * kWarps * kRows) * 4;
  static constexpr int kSmemBytes = kPipeBytes > kMergeBytes ? kPipeBytes : kMergeBytes;
  static constexpr int kCopiesPerLane = kTileKeys * kChunks / 32;  // 16-byte copies of K (and of V)
  static constexpr int kKSteps = kHeadDim / 16;                    // k-steps of Q K^T
  static constexpr int kDimTiles = kHeadDim / 8;                   // n-tiles of P V
  static_assert(kHeadDim == 64 || kHeadDim == 128, "the tensor-core decode kernel is built for D = 64, 128");
  static_assert(kChunks >= 8, "the XOR swizzle needs >= 8 chunks per row");
  static_assert((kTileKeys * kChunks) % 32 == 0, "a tile must split evenly over the lanes");
  static_assert(kCtasPerSm * (kSmemBytes + 1024) <= 228 * 1024, "two CTAs per SM must fit in shared memory");
};

// Byte offset of 16-byte chunk c of key row r inside a swizzled tile.
template <int kHeadDim>
__device__ __forceinline__ uint32_t tile_offset(int r, int c) {
  return uint32_t(r * MmaConfig<kHeadDim>::kRowBytes + ((c ^ (r & 7)) << 4));
}

// Grid: (num_splits, num_heads_k * row_tiles, batch).
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kThreads, kCtasPerSm)
    decode_split_mma_kernel(const DecodeParams p, int num_splits, int row_tiles, bool interleave) {
  using Cfg = MmaConfig<kHeadDim>;
  extern __shared__ __align__(128) unsigned char smem[];
  // Programmatic dependent launch both ways: this grid is launched with PDL (it may be scheduled
  // while the kernel before finishes; every read of q, the cache and the lengths comes after the
  // wait), and the combine kernel may be scheduled right after and waits in griddepcontrol.wait
  // for this grid's writes, so both launch latencies (~2-3 us each, 2% of a B=1 128K decode) hide
  // under kernels that run. The split grid is one wave.
  pdl_wait();
  pdl_launch_dependents();

  const int split = blockIdx.x;
  const int kvh = blockIdx.y / row_tiles;
  const int row_tile = blockIdx.y % row_tiles;
  const int b = blockIdx.z;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4;  // fragment row (and row + 8)
  const int t4 = lane % 4;  // fragment column pair
  const int group = p.num_heads_q / p.num_heads_k;
  const int rows_total = p.seqlen_q * group;
  const int row0 = row_tile * kRows;
  const int rows_here = min(kRows, rows_total - row0);

  const int64_t seqlen = imax(0, p.cache_seqlens[b]);
  const RowRule rule = decode_rule(seqlen, p.seqlen_q, is_streaming(p, b), p.pattern);
  const DecodeKeys keys = decode_keys_for_rows(rule);
  const SplitRange cta = split_range(keys.n_visible, num_splits, split, kTileKeys);
  // This warp's tiles of the split: tile i starts at key w_begin + i * tile_stride. By default a
  // contiguous share per warp; `interleave` has the warps take turns, so the CTA reads one window
  // of kWarps * 16 keys at a time (a tuning knob: which one the memory system prefers is measured).
  // Keys at or past w_end (only in the sequence's last tile) are zero-filled and masked.
  const int64_t cta_tiles = ceil_div(cta.end - cta.begin, int64_t(kTileKeys));
  const int64_t w_end = cta.end;
  int64_t w_begin, tile_stride;
  int n_tiles;
  if (interleave) {
    w_begin = cta.begin + int64_t(warp) * kTileKeys;
    tile_stride = int64_t(kWarps) * kTileKeys;
    n_tiles = cta_tiles > warp ? int(ceil_div(cta_tiles - warp, int64_t(kWarps))) : 0;
  } else {
    const int64_t tiles_per_warp = ceil_div(cta_tiles, int64_t(kWarps));
    w_begin = imin(cta.end, cta.begin + warp * tiles_per_warp * kTileKeys);
    tile_stride = kTileKeys;
    n_tiles = int(ceil_div(imin(cta.end, w_begin + tiles_per_warp * kTileKeys) - w_begin, int64_t(kTileKeys)));
  }

  // Q as A fragments: qa[kk][0] = (row g, dims 16kk + 2t..), [1] = row g + 8, [2]/[3] = dims + 8.
  // Rows past the group (padding of the 16-row tile) are zero and never written out.
  uint32_t qa[Cfg::kKSteps][4];
  {
    const T* q = static_cast<const T*>(p.q);
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
      const int r = g + 8 * rh;
      const int row = row0 + r;
      const bool valid = r < rows_here;
      const T* q_row = q + int64_t(b) * p.q_batch_stride + int64_t(valid ? row / group : 0) * p.q_token_stride +
                       int64_t(kvh * group + (valid ? row % group : 0)) * p.q_head_stride;
#pragma unroll
      for (int kk = 0; kk < Cfg::kKSteps; ++kk) {
        qa[kk][rh] = valid ? __ldg(reinterpret_cast<const unsigned int*>(q_row + 16 * kk + 2 * t4)) : 0u;
        qa[kk][2 + rh] = valid ? __ldg(reinterpret_cast<const unsigned int*>(q_row + 16 * kk + 8 + 2 * t4)) : 0u;
      }
    }
  }

  const T* k_cache = static_cast<const T*>(p.k_cache);
  const T* v_cache = static_cast<const T*>(p.v_cache);
  unsigned char* warp_smem = smem + warp * Cfg::kWarpBytes;

  // Lane -> copies of a tile: copy c is chunk `chunk` of row r0 + c * kRowStep, for K and for V.
  // The swizzled shared-memory offsets are the same for every tile: computed once.
  constexpr int kRowStep = 32 / Cfg::kChunks;
  const int r0 = lane / Cfg::kChunks;
  const int chunk = lane % Cfg::kChunks;
  uint32_t dst_off[Cfg::kCopiesPerLane];
#pragma unroll
  for (int c = 0; c < Cfg::kCopiesPerLane; ++c) dst_off[c] = tile_offset<kHeadDim>(r0 + c * kRowStep, chunk);
  const bool paged = p.block_table != nullptr;
  const int32_t* table_row = paged ? p.block_table + int64_t(b) * p.block_table_stride : nullptr;
  const int64_t k_head_off = int64_t(kvh) * p.k_head_stride + chunk * 8;
  const int64_t v_head_off = int64_t(kvh) * p.v_head_stride + chunk * 8;

  // Copies tile i of this warp (keys w_begin + i * tile_stride ..) into ring slot `slot`. Keys past the
  // sequence's visible range are zero-filled (no read) and masked to -inf below, so poisoned or
  // out-of-bounds memory never reaches the math.
  // With a page table, the page of a tile's first key is looked up one tile ahead of its copies
  // (page_of(i + 1) is loaded while tile i - kStages + 2 is computed), so the table read's latency
  // is not added to every copy's.
  auto page_of = [&](int i) -> int32_t {
    if (!paged || i >= n_tiles) return 0;
    return __ldg(table_row + int(keys.key(w_begin + int64_t(i) * tile_stride)) / p.page_size);
  };
  auto issue = [&](int i, int slot, int32_t first_page) {
    const int64_t v0 = w_begin + int64_t(i) * tile_stride;
    const uint32_t k_dst = ptx::smem_u32(warp_smem + slot * Cfg::kStageBytes);
    const uint32_t v_dst = k_dst + Cfg::kTileBytes;
    const int64_t j0 = keys.key(v0);
    // Fast path (all but a handful of tiles): the tile's 16 keys are consecutive cache rows of one
    // page, so a lane's sources are an arithmetic progression from one base address.
    bool contiguous = !(v0 < keys.sink_end && keys.sink_end < v0 + kTileKeys);
    int64_t page = b, row0 = j0;
    if (paged) {
      const int page_idx = int(j0) / p.page_size;  // 32-bit: cache positions are int32
      row0 = j0 - int64_t(page_idx) * p.page_size;
      contiguous = contiguous && row0 + kTileKeys <= p.page_size;
      if (contiguous) page = first_page;
    }
    if (contiguous) {
      const T* k_src = k_cache + page * p.k_page_stride + (row0 + r0) * p.k_row_stride + k_head_off;
      const T* v_src = v_cache + page * p.v_page_stride + (row0 + r0) * p.v_row_stride + v_head_off;
#pragma unroll
      for (int c = 0; c < Cfg::kCopiesPerLane; ++c) {
        const bool ok = v0 + r0 + c * kRowStep < w_end;  // row 0 always is: its address is valid
        const int64_t dr = c * kRowStep;
        ptx::cp_async_16(k_dst + dst_off[c], ok ? k_src + dr * p.k_row_stride : k_src, ok);
        ptx::cp_async_16(v_dst + dst_off[c], ok ? v_src + dr * p.v_row_stride : v_src, ok);
      }
      return;
    }
    // Slow path: the tile straddles the sink/window gap or a page boundary; one row at a time.
    for (int c = 0; c < Cfg::kCopiesPerLane; ++c) {
      const int64_t v = v0 + r0 + c * kRowStep;
      const bool ok = v < w_end;
      int64_t k_off = k_head_off, v_off = v_head_off;
      if (ok) {
        const int64_t j = keys.key(v);
        int64_t pg = b, in_page = j;
        if (paged) {
          const int page_idx = int(j) / p.page_size;
          in_page = j - int64_t(page_idx) * p.page_size;
          pg = __ldg(table_row + page_idx);
        }
        k_off += pg * p.k_page_stride + in_page * p.k_row_stride;
        v_off += pg * p.v_page_stride + in_page * p.v_row_stride;
      }
      ptx::cp_async_16(k_dst + dst_off[c], k_cache + k_off, ok);
      ptx::cp_async_16(v_dst + dst_off[c], v_cache + v_off, ok);
    }
  };

  float o[Cfg::kDimTiles][4];
#pragma unroll
  for (int dt = 0; dt < Cfg::kDimTiles; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[dt][e] = 0.f;
  float m[2] = {-INFINITY, -INFINITY};  // running max of rows g and g + 8 (log2 domain)
  float l[2] = {0.f, 0.f};              // this lane's share of the running sums
  const float scale_log2 = p.scale * kLog2e;
  // Several new tokens see slightly different keys (causal among themselves, per-position windows):
  // tiles the rows do not all see in full get an element mask.
  const bool multi_token = p.seqlen_q > 1;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_tiles) issue(s, s, page_of(s));
    ptx::cp_async_commit();
  }

  int32_t page_ahead = page_of(kStages - 1);
  for (int i = 0; i < n_tiles; ++i) {
    ptx::cp_async_wait<kStages - 2>();  // this lane's copies of tile i have landed ...
    __syncwarp();                       // ... and every lane's; slot (i - 1) % kStages is free again
    {
      const int next = i + kStages - 1;
      if (next < n_tiles) issue(next, next % kStages, page_ahead);
      page_ahead = page_of(next + 1);
      ptx::cp_async_commit();  // possibly empty: keeps the group count uniform
    }
    const unsigned char* stage = warp_smem + (i % kStages) * Cfg::kStageBytes;
    const uint32_t k_tile = ptx::smem_u32(stage);
    const uint32_t v_tile = k_tile + Cfg::kTileBytes;

    // S = Q K^T over 16 keys: two n-tiles of 8 keys; one ldmatrix.x4 gives the B fragments of two
    // k-steps (chunks 4kp..4kp+3 of 8 key rows).
    float s[2][4];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
#pragma unroll
    for (int kp = 0; kp < Cfg::kKSteps / 2; ++kp) {
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        uint32_t bk[4];
        ptx::ldmatrix_x4(bk, k_tile + tile_offset<kHeadDim>(nt * 8 + (lane & 7), 4 * kp + (lane >> 3)));
        ptx::mma_16816<T>(s[nt], qa[2 * kp], bk[0], bk[1]);
        ptx::mma_16816<T>(s[nt], qa[2 * kp + 1], bk[2], bk[3]);
      }
    }

    // Scale into the log2 domain; mask keys past the visible range and, for several new tokens,
    // keys a row's token does not see. Element e of n-tile nt: row g + 8 (e / 2), key 8 nt + 2 t + e % 2.
    const int64_t v0 = w_begin + int64_t(i) * tile_stride;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] *= scale_log2;
    bool need_mask = v0 + kTileKeys > keys.n_visible;
    if (multi_token && !need_mask) {
      const int64_t j_first = keys.key(v0);
      const int64_t j_last = keys.key(v0 + kTileKeys - 1);
      need_mask = j_last - j_first != kTileKeys - 1 ||
                  classify_tile(rule, 0, p.seqlen_q, j_first, j_last + 1) != TileKind::kFull;
    }
    if (need_mask) {
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t v = v0 + nt * 8 + 2 * t4 + (e & 1);
          bool visible = v < keys.n_visible;
          const int row = row0 + g + 8 * (e >> 1);
          if (visible && multi_token && row < rows_total) visible = is_visible(rule, row / group, keys.key(v));
          if (!visible) s[nt][e] = -INFINITY;
        }
    }

    // Online softmax per row; the 4 lanes of a quad hold a row's 16 scores.
    float alpha[2];
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
      float mx = fmaxf(fmaxf(s[0][2 * rh], s[0][2 * rh + 1]), fmaxf(s[1][2 * rh], s[1][2 * rh + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m[rh], mx);
      // A row that has seen only masked keys keeps m = -inf; subtracting 0 instead keeps
      // exp2(-inf - -inf) = NaN out (its p are all 0 and alpha is 0).
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      alpha[rh] = exp2f(m[rh] - m_use);
      m[rh] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 2 * rh; e < 2 * rh + 2; ++e) {
          s[nt][e] = exp2f(s[nt][e] - m_use);
          sum += s[nt][e];
        }
      l[rh] = l[rh] * alpha[rh] + sum;
    }
#pragma unroll
    for (int dt = 0; dt < Cfg::kDimTiles; ++dt) {
      o[dt][0] *= alpha[0];
      o[dt][1] *= alpha[0];
      o[dt][2] *= alpha[1];
      o[dt][3] *= alpha[1];
    }

    // O += P V: the S accumulators of key n-tiles 0 and 1 are the A fragment of one k-step; V's B
    // fragments (keys 2t.., dim g) come from ldmatrix.trans of the row-major tile, two dim tiles
    // per x4 (matrices: keys 0-7 / 8-15 of chunk 2dp, then of chunk 2dp + 1).
    const uint32_t pa[4] = {pack2<T>(s[0][0], s[0][1]), pack2<T>(s[0][2], s[0][3]), pack2<T>(s[1][0], s[1][1]),
                            pack2<T>(s[1][2], s[1][3])};
#pragma unroll
    for (int dp = 0; dp < Cfg::kDimTiles / 2; ++dp) {
      uint32_t bv[4];
      const int key = (lane & 7) + ((lane >> 3) & 1) * 8;
      ptx::ldmatrix_x4_trans(bv, v_tile + tile_offset<kHeadDim>(key, 2 * dp + (lane >> 4)));
      ptx::mma_16816<T>(o[2 * dp], pa, bv[0], bv[1]);
      ptx::mma_16816<T>(o[2 * dp + 1], pa, bv[2], bv[3]);
    }
  }
  ptx::cp_async_wait<0>();  // only empty groups can be left; drain before the buffers are reused

  // Row sums over the quad, then merge the warps through shared memory.
#pragma unroll
  for (int rh = 0; rh < 2; ++rh) {
    l[rh] += __shfl_xor_sync(0xffffffffu, l[rh], 1);
    l[rh] += __shfl_xor_sync(0xffffffffu, l[rh], 2);
  }
  __syncthreads();  // every warp is done with its ring
  float* s_o = reinterpret_cast<float*>(smem);        // [kWarps][kRows][kHeadDim]
  float* s_m = s_o + kWarps * kRows * kHeadDim;       // [kWarps][kRows]
  float* s_l = s_m + kWarps * kRows;                  // [kWarps][kRows]
#pragma unroll
  for (int dt = 0; dt < Cfg::kDimTiles; ++dt) {
    *reinterpret_cast<float2*>(s_o + (warp * kRows + g) * kHeadDim + dt * 8 + 2 * t4) = make_float2(o[dt][0], o[dt][1]);
    *reinterpret_cast<float2*>(s_o + (warp * kRows + g + 8) * kHeadDim + dt * 8 + 2 * t4) =
        make_float2(o[dt][2], o[dt][3]);
  }
  if (t4 == 0) {
    s_m[warp * kRows + g] = m[0];
    s_m[warp * kRows + g + 8] = m[1];
    s_l[warp * kRows + g] = l[0];
    s_l[warp * kRows + g + 8] = l[1];
  }
  __syncthreads();

  // o = sum_w 2^(m_w - M) o_w / sum_w 2^(m_w - M) l_w; a warp that saw no key has m_w = -inf.
  for (int idx = threadIdx.x; idx < rows_here * kHeadDim; idx += kThreads) {
    const int r = idx / kHeadDim;
    const int d = idx % kHeadDim;
    float m_all = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m_all = fmaxf(m_all, s_m[w * kRows + r]);
    float out = 0.f, lse = -INFINITY;
    if (m_all != -INFINITY) {
      float l_all = 0.f, acc = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float wt = exp2f(s_m[w * kRows + r] - m_all);
        l_all = fmaf(wt, s_l[w * kRows + r], l_all);
        acc = fmaf(wt, s_o[(w * kRows + r) * kHeadDim + d], acc);
      }
      out = acc / l_all;
      lse = (m_all + log2f(l_all)) * kLn2;  // natural-log lse (the op contract)
    }
    const int row = row0 + r;
    const int tok = row / group;
    const int hq = kvh * group + row % group;
    if (num_splits == 1) {
      static_cast<T*>(p.out)[out_offset(p, b, tok, hq) + d] = from_float<T>(out);
      if (d == 0) p.lse[lse_offset(p, b, tok, hq)] = lse;
    } else {
      const int64_t prow = partial_row(p, split, b, tok, hq);
      o_partials(p)[prow * p.head_dim + d] = out;
      if (d == 0) lse_partials(p, num_splits)[prow] = lse;
    }
  }
}

// Interleaved warp order is the default (measured on the H200 with one CTA per SM: equal or better
// at every shape of bench/decode.py); FLUX_DECODE_WARP_ORDER=contiguous restores contiguous shares.
bool interleave_warps() {
  const char* env = std::getenv("FLUX_DECODE_WARP_ORDER");
  return env == nullptr || std::strcmp(env, "contiguous") != 0;
}

// Over 48 KB of dynamic shared memory needs an opt-in (once per device); the whole carveout goes to
// shared memory so that kCtasPerSm CTAs fit (cp.async.cg bypasses L1).
template <typename T, int kHeadDim>
cudaError_t set_attributes() {
  return opt_in_shared_memory<decode_split_mma_kernel<T, kHeadDim>>(MmaConfig<kHeadDim>::kSmemBytes,
                                                                     /*max_carveout=*/true);
}

// Resident CTAs per SM as the occupancy calculator sees them (kCtasPerSm by design; fewer would
// mean a config that no longer fits, and the split heuristic then still fills exactly one wave).
template <typename T, int kHeadDim>
int resident_ctas() {
  int n = 0;
  if (set_attributes<T, kHeadDim>() != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, decode_split_mma_kernel<T, kHeadDim>, kThreads,
                                                    MmaConfig<kHeadDim>::kSmemBytes) != cudaSuccess) {
    (void)cudaGetLastError();  // a failed query must not leak into the next launch check
    return kCtasPerSm;
  }
  return n < 1 ? 1 : (n > kCtasPerSm ? kCtasPerSm : n);
}

template <typename T, int kHeadDim>
cudaError_t launch(const DecodeParams& p, int num_splits, cudaStream_t stream) {
  using Cfg = MmaConfig<kHeadDim>;
  const auto kernel = decode_split_mma_kernel<T, kHeadDim>;
  FLUX_CUDA_CHECK((set_attributes<T, kHeadDim>()));
  const int row_tiles = int(ceil_div(int64_t(p.seqlen_q) * (p.num_heads_q / p.num_heads_k), int64_t(kRows)));
  const dim3 grid(num_splits, p.num_heads_k * row_tiles, p.batch);
  return launch_pdl(kernel, grid, dim3(kThreads), Cfg::kSmemBytes, stream, p, num_splits, row_tiles,
                    interleave_warps());
}

template <typename T>
cudaError_t dispatch_head_dim(const DecodeParams& p, int num_splits, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return launch<T, 64>(p, num_splits, stream);
    case 128: return launch<T, 128>(p, num_splits, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

bool mma_supported(const DecodeParams& p) {
  return (p.dtype == DataType::kBFloat16 || p.dtype == DataType::kFloat16) && (p.head_dim == 64 || p.head_dim == 128);
}

int64_t mma_work_units(const DecodeParams& p) {
  const int64_t rows = int64_t(p.seqlen_q) * (p.num_heads_q / p.num_heads_k);
  return int64_t(p.batch) * p.num_heads_k * ceil_div(rows, int64_t(kRows));
}

int64_t mma_granule() { return kTileKeys; }

int mma_ctas_per_sm(const DecodeParams& p) {
  // Per (dtype, head_dim) and process: the answer depends only on the kernel and the device type.
  static const int bf16_64 = resident_ctas<__nv_bfloat16, 64>();
  static const int bf16_128 = resident_ctas<__nv_bfloat16, 128>();
  static const int f16_64 = resident_ctas<__half, 64>();
  static const int f16_128 = resident_ctas<__half, 128>();
  if (p.dtype == DataType::kBFloat16) return p.head_dim == 64 ? bf16_64 : bf16_128;
  return p.head_dim == 64 ? f16_64 : f16_128;
}

cudaError_t launch_split_mma(const DecodeParams& p, int num_splits, cudaStream_t stream) {
  if (mma_work_units(p) / p.batch > 65535) return cudaErrorInvalidValue;  // grid.y
  switch (p.dtype) {
    case DataType::kFloat16: return dispatch_head_dim<__half>(p, num_splits, stream);
    case DataType::kBFloat16: return dispatch_head_dim<__nv_bfloat16>(p, num_splits, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace flux::decode
