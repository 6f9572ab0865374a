// decode_attention on CUDA: picks the split kernel and the split count, launches it, then merges
// the split-KV partials. The one dispatch place of the decode family.
//
// Split-KV (flash-decoding): the keys the new tokens of a sequence see (flux/decode_keys.h, so an
// SA sequence visits only sink + window) are cut into num_splits contiguous chunks, one CTA each
// per (kv head, row tile, sequence); a combine kernel merges the normalised partials by lse.
// num_splits depends only on shapes, params.max_seqlen_k and the SM count, never on cache_seqlens
// values: a decode step sized once replays in a CUDA graph with any lengths.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "cuda_utils.cuh"
#include "decode_common.cuh"
#include "decode_kernels.h"
#include "flux/launch.h"
#include "flux/params.h"

namespace flux {
namespace decode {
namespace {

constexpr int kCombineThreads = 128;
static_assert(kMaxSplits % kCombineThreads == 0, "each thread loads the same number of lse partials");

enum class SplitKernel { kMma, kSimt };

// FLUX_DECODE_KERNEL=simt forces the CUDA-core kernel (A/B timing, or a fallback should the
// tensor-core kernel misbehave on some device); anything else, or unset, picks the fastest that
// supports the inputs. Read per call: it is a host-side getenv, graph-safe.
SplitKernel choose_kernel(const DecodeParams& p) {
  const char* env = std::getenv("FLUX_DECODE_KERNEL");
  if (env != nullptr && std::strcmp(env, "simt") == 0) return SplitKernel::kSimt;
  return mma_supported(p) ? SplitKernel::kMma : SplitKernel::kSimt;
}

// One full wave: as many splits as fit kCtasPerSm * num_sms CTAs, so at batch 1 every SM streams
// (B = 1, Hkv = 8: 33 splits of a 128K cache on 132 SMs) and every CTA gets the same share.
// Bounded by the keys a sequence can see (max_seqlen_k, or the window when the whole batch is
// streaming) so that splits keep >= kMinKeysPerSplit keys.
int choose_num_splits(const DecodeParams& p, SplitKernel kernel, int num_sms) {
  if (p.num_splits > 0) return p.num_splits < kMaxSplits ? p.num_splits : kMaxSplits;
  // FLUX_DECODE_SPLITS=n fixes the split count (measurement of the heuristic; host getenv).
  if (const char* forced = std::getenv("FLUX_DECODE_SPLITS")) {
    const int n = std::atoi(forced);
    if (n > 0) return n < kMaxSplits ? n : kMaxSplits;
  }
  if (p.batch <= 0 || p.num_heads_k <= 0 || num_sms <= 0) return 1;
  const int64_t units = kernel == SplitKernel::kMma ? mma_work_units(p) : simt_work_units(p);
  // The tensor-core kernel runs one CTA per SM with twice the keys each: on the H200 (bench/decode.py,
  // 2026-12-01) that beat two CTAs per SM at every B in {1, 4, 8} and L in {8K, 32K, 128K}, by 1-13%
  // (B=1 L=128K: 0.133 vs 0.141 ms). FLUX_DECODE_CTAS_PER_SM=2 restores the two-CTA wave.
  const char* env = std::getenv("FLUX_DECODE_CTAS_PER_SM");
  int ctas_per_sm = kernel == SplitKernel::kMma ? 1 : kCtasPerSm;
  if (kernel == SplitKernel::kMma && env != nullptr && std::strcmp(env, "2") == 0) ctas_per_sm = mma_ctas_per_sm(p);
  const int64_t slots = int64_t(ctas_per_sm) * num_sms;
  if (units >= slots) return 1;
  int64_t splits = slots / units;
  int64_t max_keys = p.max_seqlen_k;  // <= 0: unknown
  if (p.sparse_mode == SparseMode::kStreaming) {
    const int64_t window = int64_t(p.pattern.sink_tokens) + int64_t(p.pattern.local_blocks) * p.pattern.block_size +
                           p.seqlen_q;
    max_keys = max_keys > 0 ? imin(max_keys, window) : window;
  }
  if (max_keys > 0) splits = imin(splits, ceil_div(max_keys, kMinKeysPerSplit));
  return int(imax(1, imin(splits, kMaxSplits)));
}

// One CTA per (sequence, token, q head) row: weights w_s = exp(lse_s - max), out = sum w_s o_s /
// sum w_s, lse = max + log(sum w_s). All splits empty (no visible key) -> out 0, lse -inf.
// Latency, not bandwidth, is its cost (B=1: 32 rows x 16 splits x 512 B, from L2): the lse loads are
// one round trip for every split at once, then the threads split into head_dim / 4 float4 columns x
// `groups` split groups so each thread has a few independent o loads in flight (16 splits at
// D = 128: 4 per thread, one round trip), and the groups add up in shared memory in a fixed order
// (deterministic). The previous warp-per-row version looped over the splits serially per lane.
template <typename T>
__global__ void __launch_bounds__(kCombineThreads) decode_combine_kernel(const DecodeParams p, int num_splits) {
  constexpr int kWarps = kCombineThreads / 32;
  constexpr int kLsePerThread = kMaxSplits / kCombineThreads;
  __shared__ float s_w[kMaxSplits];
  __shared__ float s_max[kWarps], s_sum[kWarps];
  __shared__ float4 s_acc[kCombineThreads];
  // Launched early (programmatic dependent launch): wait until the split kernel's partials are
  // complete and visible. A no-op when there is no programmatic dependency. Then let the next
  // kernel (o_proj in a decode step, the next layer's split kernel in a benchmark) be scheduled:
  // its launch latency hides under this merge, and it waits for our output in its own pdl_wait.
  pdl_wait();
  pdl_launch_dependents();
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int64_t rows = partial_rows(p);
  const int64_t row = blockIdx.x;
  const float* lse_part = lse_partials(p, num_splits);

  float lse[kLsePerThread];
  float m = -INFINITY;
#pragma unroll
  for (int i = 0; i < kLsePerThread; ++i) {
    const int s = tid + i * kCombineThreads;
    lse[i] = s < num_splits ? lse_part[s * rows + row] : -INFINITY;
    m = fmaxf(m, lse[i]);
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
  if (lane == 0) s_max[warp] = m;
  __syncthreads();
  float m_all = s_max[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) m_all = fmaxf(m_all, s_max[w]);

  float l = 0.f;
#pragma unroll
  for (int i = 0; i < kLsePerThread; ++i) {
    const int s = tid + i * kCombineThreads;
    if (s < num_splits) {
      const float w = m_all == -INFINITY ? 0.f : expf(lse[i] - m_all);
      s_w[s] = w;
      l += w;
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) l += __shfl_xor_sync(0xffffffffu, l, off);
  if (lane == 0) s_sum[warp] = l;
  __syncthreads();  // s_w and s_sum complete
  float l_all = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) l_all += s_sum[w];

  // Thread -> (split group, float4 column); head_dim is a multiple of 4 (32, 64, 96, 128, 256).
  const int cols = p.head_dim / 4;
  const int groups = kCombineThreads / cols;
  const int grp = tid / cols;
  const int col = tid % cols;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  if (grp < groups) {
    const float4* o_part = reinterpret_cast<const float4*>(o_partials(p));
#pragma unroll 4
    for (int s = grp; s < num_splits; s += groups) {
      const float w = s_w[s];
      const float4 o = o_part[(s * rows + row) * cols + col];
      acc.x = fmaf(w, o.x, acc.x);
      acc.y = fmaf(w, o.y, acc.y);
      acc.z = fmaf(w, o.z, acc.z);
      acc.w = fmaf(w, o.w, acc.w);
    }
  }
  s_acc[tid] = acc;
  __syncthreads();
  if (tid >= cols) return;
  for (int g = 1; g < groups; ++g) {
    const float4 o = s_acc[g * cols + tid];
    acc.x += o.x;
    acc.y += o.y;
    acc.z += o.z;
    acc.w += o.w;
  }
  const int64_t b = row / (int64_t(p.seqlen_q) * p.num_heads_q);
  const int64_t tok = row / p.num_heads_q % p.seqlen_q;
  const int64_t hq = row % p.num_heads_q;
  const float inv = m_all == -INFINITY ? 0.f : 1.f / l_all;
  T* out = static_cast<T*>(p.out) + out_offset(p, b, tok, hq) + 4 * tid;
  out[0] = from_float<T>(acc.x * inv);
  out[1] = from_float<T>(acc.y * inv);
  out[2] = from_float<T>(acc.z * inv);
  out[3] = from_float<T>(acc.w * inv);
  if (tid == 0) p.lse[lse_offset(p, b, tok, hq)] = m_all == -INFINITY ? -INFINITY : m_all + logf(l_all);
}

// 16-byte loads need every row start of q, K and V on a 16-byte boundary.
bool vector_loads_ok(const DecodeParams& p, size_t elem_size) {
  return rows_16b_aligned(p.q, elem_size, p.q_batch_stride, p.q_head_stride, p.q_token_stride) &&
         rows_16b_aligned(p.k_cache, elem_size, p.k_page_stride, p.k_row_stride, p.k_head_stride) &&
         rows_16b_aligned(p.v_cache, elem_size, p.v_page_stride, p.v_row_stride, p.v_head_stride);
}

}  // namespace

template <typename T>
cudaError_t launch_combine_as(const DecodeParams& p, int num_splits, cudaStream_t stream) {
  // Programmatic stream serialization lets this launch start while the split kernel runs (it
  // triggers early; the combine waits in griddepcontrol.wait). Graph capture records it as a
  // programmatic edge.
  return launch_pdl(decode_combine_kernel<T>, dim3(unsigned(partial_rows(p))), dim3(kCombineThreads), 0, stream, p,
                    num_splits);
}

cudaError_t launch_combine(const DecodeParams& p, int num_splits, cudaStream_t stream) {
  switch (p.dtype) {
    case DataType::kFloat32: return launch_combine_as<float>(p, num_splits, stream);
    case DataType::kFloat16: return launch_combine_as<__half>(p, num_splits, stream);
    case DataType::kBFloat16: return launch_combine_as<__nv_bfloat16>(p, num_splits, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace decode

size_t decode_workspace_bytes(const DecodeParams& params, int num_sms) {
  const int splits = decode::choose_num_splits(params, decode::choose_kernel(params), num_sms);
  return splits > 1 ? size_t(splits) * decode::partial_bytes_per_split(params) : 0;
}

cudaError_t run_decode_attention(DecodeParams& params, cudaStream_t stream) {
  using namespace decode;
  const DecodeParams& p = params;
  if (p.num_heads_k <= 0 || p.num_heads_q % p.num_heads_k != 0 || p.batch < 0 || p.seqlen_q < 1 ||
      int64_t(p.batch) * p.seqlen_q > 65535)
    return cudaErrorInvalidValue;
  if (p.block_table != nullptr && p.page_size <= 0) return cudaErrorInvalidValue;
  if (p.batch == 0) return cudaSuccess;
  const size_t elem_size = p.dtype == DataType::kFloat32 ? 4 : 2;
  if (p.dtype == DataType::kFloat64 || !vector_loads_ok(p, elem_size)) return cudaErrorInvalidValue;

  int device = 0, num_sms = 0;
  FLUX_CUDA_CHECK(cudaGetDevice(&device));
  FLUX_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device));

  const SplitKernel kernel = choose_kernel(p);
  int num_splits = choose_num_splits(p, kernel, num_sms);
  // A workspace smaller than decode_workspace_bytes asked for (e.g. sized with another SM count)
  // means fewer splits, never an overrun.
  if (num_splits > 1) {
    const size_t fit = p.workspace == nullptr ? 0 : p.workspace_bytes / partial_bytes_per_split(p);
    if (size_t(num_splits) > fit) num_splits = fit >= 2 ? int(fit) : 1;
  }
  params.num_splits = num_splits;  // report the split count used

  FLUX_CUDA_CHECK(kernel == SplitKernel::kMma ? launch_split_mma(p, num_splits, stream)
                                              : launch_split_simt(p, num_splits, stream));
  if (num_splits > 1) FLUX_CUDA_CHECK(launch_combine(p, num_splits, stream));
  return cudaSuccess;
}

}  // namespace flux
