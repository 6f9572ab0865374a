// Decode split kernel on CUDA cores: every dtype (fp32, fp16, bf16) and head dim (32..256). The
// portable path; fp16/bf16 at D = 64 / 128 take the tensor-core kernel (decode_split_mma.cu) unless
// FLUX_DECODE_KERNEL=simt (decode.cu).
//
// One CTA handles (split, kv head, head tile, sequence x new token): it reads each K/V row of its
// chunk once and applies it to all the q heads of its tile (GQA is never expanded), then writes a
// normalised partial (out, lse) that the combine kernel merges by lse. Several new tokens
// (speculative decoding) are independent CTAs, each with the rule of its own position, so they read
// the cache once per token.
//
// Inside a CTA the 128 threads form row groups of kThreadsPerRow lanes; a row group owns one key row
// at a time (16-byte loads, each lane a slice of head_dim) and keeps its own online-softmax state, so
// the main loop needs no barrier. Row groups are merged through shared memory at the end.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_utils.cuh"
#include "decode_common.cuh"
#include "decode_kernels.h"
#include "flux/decode_keys.h"
#include "flux/params.h"
#include "flux/streaming.h"

namespace flux::decode {
namespace {

constexpr int kDecodeThreads = 128;
// Keys each row group loads before using any: 2 x 4 independent 16-byte loads in flight per thread.
constexpr int kRowsPerIter = 4;
// q heads held in registers per CTA (q + accumulators); with kHeads = 8 and 16-bit types the kernel
// takes 254 registers, which still fits kCtasPerSm = 2 CTAs of 128 threads per SM.
constexpr int kMaxHeadsPerCta = 8;

// q heads per CTA: the smallest power of two covering the GQA group, capped by registers.
int heads_per_cta(int group) {
  int h = 1;
  while (h < group && h < kMaxHeadsPerCta) h *= 2;
  return h;
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

// Grid: (num_splits, num_heads_k * head_tiles, batch * seqlen_q).
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
  const int b = blockIdx.z / p.seqlen_q;
  const int tok = blockIdx.z % p.seqlen_q;  // which new token: its own rule, its own pass
  const int group = p.num_heads_q / p.num_heads_k;
  const int head0 = kvh * group + head_tile * kHeads;  // first q head of this CTA
  const int heads_here = min(kHeads, group - head_tile * kHeads);

  const int tid = threadIdx.x;
  const int lane = tid % kTpr;        // slice of head_dim within the row group
  const int row_group = tid / kTpr;

  const int64_t seqlen = imax(0, p.cache_seqlens[b]);
  const RowRule rule = decode_rule(seqlen, p.seqlen_q, is_streaming(p, b), p.pattern);
  const DecodeKeys vk = decode_keys_for_row(rule, tok);
  const SplitRange range = split_range(vk.n_visible, num_splits, split, Cfg::kTile);

  // q in registers, pre-multiplied by scale * log2(e) so the softmax runs on exp2.
  float q[kHeads][kVpt][kElems];
  {
    const float q_scale = p.scale * kLog2e;
    const T* q_base = static_cast<const T*>(p.q) + b * p.q_batch_stride + int64_t(tok) * p.q_token_stride;
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
        const int64_t j = vk.key(v);
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
      static_cast<T*>(p.out)[out_offset(p, b, tok, hq) + d] = from_float<T>(o);
      if (d == 0) p.lse[lse_offset(p, b, tok, hq)] = lse;
    } else {
      const int64_t row = partial_row(p, split, b, tok, hq);
      o_partials(p)[row * p.head_dim + d] = o;
      if (d == 0) lse_partials(p, num_splits)[row] = lse;
    }
  }
}

template <typename T, int kHeadDim, int kHeads>
cudaError_t launch(const DecodeParams& p, int num_splits, cudaStream_t stream) {
  const int group = p.num_heads_q / p.num_heads_k;
  const int head_tiles = int(ceil_div(group, kHeads));
  const dim3 grid(num_splits, p.num_heads_k * head_tiles, p.batch * p.seqlen_q);
  decode_split_kernel<T, kHeadDim, kHeads><<<grid, kDecodeThreads, 0, stream>>>(p, num_splits, head_tiles);
  FLUX_CUDA_CHECK_LAUNCH();
  return cudaSuccess;
}

template <typename T, int kHeadDim>
cudaError_t dispatch_heads(const DecodeParams& p, int num_splits, cudaStream_t stream) {
  switch (heads_per_cta(p.num_heads_q / p.num_heads_k)) {
    case 1: return launch<T, kHeadDim, 1>(p, num_splits, stream);
    case 2: return launch<T, kHeadDim, 2>(p, num_splits, stream);
    case 4: return launch<T, kHeadDim, 4>(p, num_splits, stream);
    default: return launch<T, kHeadDim, 8>(p, num_splits, stream);
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

}  // namespace

int64_t simt_work_units(const DecodeParams& p) {
  const int group = p.num_heads_q / p.num_heads_k;
  return int64_t(p.batch) * p.seqlen_q * p.num_heads_k * ceil_div(group, heads_per_cta(group));
}

cudaError_t launch_split_simt(const DecodeParams& p, int num_splits, cudaStream_t stream) {
  if (simt_work_units(p) / (int64_t(p.batch) * p.seqlen_q) > 65535) return cudaErrorInvalidValue;  // grid.y
  switch (p.dtype) {
    case DataType::kFloat32: return dispatch_head_dim<float>(p, num_splits, stream);
    case DataType::kFloat16: return dispatch_head_dim<__half>(p, num_splits, stream);
    case DataType::kBFloat16: return dispatch_head_dim<__nv_bfloat16>(p, num_splits, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace flux::decode
