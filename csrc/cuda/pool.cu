// Router-input pooling on CUDA (params.h PoolParams) and its gradient.
//
// Forward: one block per (16-byte slice of head_dim, sequence). It reads only the 2m pooled rows of
// the sequence (all heads, its slice), never the rest, so its cost does not grow with the sequence:
// at 128K tokens x 32 heads x 128 it reads 2.4 MB over D / 8 blocks per sequence. Each thread keeps
// kPoolUnroll 16-byte loads in flight; one block-wide tree reduction at the end, no atomics, so the
// result is deterministic.
//
// Backward: a grid-stride write of dq, every row of the sequence's slot (padding included), with the
// multiplicity (0, 1 or 2) of each row.
//
// Padded input with a mask: the valid run (first index, length) is found on the device. A mask with
// valid first or last token (right or left padding, and the unpadded case) is monotone, so a block-
// wide k-ary search finds the boundary in two or three probe rounds; any other contiguous run falls
// back to a full scan of the mask row.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cuda_utils.cuh"
#include "flux/launch.h"
#include "flux/params.h"

namespace flux {
namespace {

constexpr int kPoolThreads = 512;  // 8 x 16-byte loads in flight per thread -> 64 KB per block
constexpr int kPoolUnroll = 8;
constexpr int kPoolBwdThreads = 256;
// Blocks per SM for the backward grid: enough to saturate writes, few enough that the per-block
// mask search stays negligible.
constexpr int kPoolBwdBlocksPerSm = 8;

template <typename T>
using AccType = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
__device__ __forceinline__ AccType<T> to_acc(T x) {
  if constexpr (std::is_same_v<T, __half>) return __half2float(x);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(x);
  else return x;
}

template <typename T>
__device__ __forceinline__ T from_acc(AccType<T> x) {
  if constexpr (std::is_same_v<T, __half>) return __float2half_rn(x);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(x);
  else return x;
}

// kVec consecutive elements: one 16-byte transaction when kVec * sizeof(T) == 16, else kVec == 1.
template <typename T, int kVec>
__device__ __forceinline__ void load_pack(const T* ptr, AccType<T>* out) {
  static_assert(kVec == 1 || kVec * sizeof(T) == 16, "packs are one element or 16 bytes");
  if constexpr (kVec == 1) {
    out[0] = to_acc(__ldg(ptr));  // q and dout are read-only for the kernel's lifetime
  } else {
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(ptr));
    T v[kVec];
    memcpy(v, &u, sizeof(u));
#pragma unroll
    for (int e = 0; e < kVec; ++e) out[e] = to_acc(v[e]);
  }
}

template <typename T, int kVec>
__device__ __forceinline__ void store_pack(T* ptr, const AccType<T>* in) {
  static_assert(kVec == 1 || kVec * sizeof(T) == 16, "packs are one element or 16 bytes");
  if constexpr (kVec == 1) {
    ptr[0] = from_acc<T>(in[0]);
  } else {
    T v[kVec];
#pragma unroll
    for (int e = 0; e < kVec; ++e) v[e] = from_acc<T>(in[e]);
    uint4 u;
    memcpy(&u, v, sizeof(u));
    *reinterpret_cast<uint4*>(ptr) = u;
  }
}

// Shared scratch of the valid-run search.
struct RunScratch {
  long long range[2];
  long long first;
  unsigned long long count;
  int first_fail;
};

// Smallest X in [lo, hi] with mask[i] == want for lo <= i < X and mask[i] != want for X <= i < hi
// (the caller guarantees that shape). Every thread of the block calls it and gets the same X.
template <int kThreads>
__device__ int64_t block_partition_point(const bool* mask, int64_t lo, int64_t hi, bool want, RunScratch& s) {
  if (threadIdx.x == 0) {
    s.range[0] = lo;
    s.range[1] = hi;
    s.first_fail = kThreads;
  }
  __syncthreads();
  for (;;) {
    const int64_t cur_lo = s.range[0], cur_hi = s.range[1];
    if (cur_lo >= cur_hi) {
      __syncthreads();  // all reads of s done before a later call rewrites it
      return cur_lo;
    }
    // Probe lo, lo + step, ...: the first probe that fails brackets X between it and its predecessor.
    const int64_t step = (cur_hi - cur_lo + kThreads - 1) / kThreads;
    const int64_t probe = cur_lo + int64_t(threadIdx.x) * step;
    if (probe < cur_hi && mask[probe] != want) atomicMin(&s.first_fail, int(threadIdx.x));
    __syncthreads();
    if (threadIdx.x == 0) {
      const int t = s.first_fail;
      if (t == kThreads) {
        s.range[0] = cur_lo + ((cur_hi - 1 - cur_lo) / step) * step + 1;  // past the last probe
      } else {
        s.range[1] = cur_lo + int64_t(t) * step;
        if (t > 0) s.range[0] = cur_lo + int64_t(t - 1) * step + 1;
      }
      s.first_fail = kThreads;
    }
    __syncthreads();
  }
}

// Sequence b as (index of its first row along q's row dimension, number of rows); row i of the
// sequence is at q + b * q_batch_stride + (first + i) * q_row_stride. Block-uniform call.
struct SeqRun {
  int64_t first;
  int64_t n;
};

template <int kThreads>
__device__ SeqRun sequence_run(const PoolParams& p, int b, RunScratch& s) {
  SeqRun run{0, 0};
  if (p.cu_seqlens != nullptr) {
    run.first = p.cu_seqlens[b];
    run.n = max(0, p.cu_seqlens[b + 1] - p.cu_seqlens[b]);
    return run;
  }
  const int64_t len = p.seqlen;
  if (p.mask == nullptr) {
    run.n = len;
    return run;
  }
  if (len <= 0) return run;
  const bool* mask = p.mask + b * p.mask_batch_stride;
  if (mask[0]) {  // right padding: valid prefix
    run.n = block_partition_point<kThreads>(mask, 0, len, true, s);
    return run;
  }
  if (mask[len - 1]) {  // left padding: valid suffix
    run.first = block_partition_point<kThreads>(mask, 0, len, false, s);
    run.n = len - run.first;
    return run;
  }
  // A run strictly inside the row (or none): scan it all.
  if (threadIdx.x == 0) {
    s.first = len;
    s.count = 0;
  }
  __syncthreads();
  long long first = len;
  unsigned long long count = 0;
  for (int64_t i = threadIdx.x; i < len; i += kThreads) {
    if (mask[i]) {
      first = first < i ? first : i;
      ++count;
    }
  }
  if (count > 0) {
    atomicMin(&s.first, first);
    atomicAdd(&s.count, count);
  }
  __syncthreads();
  run.n = int64_t(s.count);
  run.first = run.n > 0 ? int64_t(s.first) : 0;
  __syncthreads();  // all reads of s done before a later call rewrites it
  return run;
}

__device__ __forceinline__ int64_t pooled_rows(const PoolParams& p, int64_t n) {
  const int64_t pool = p.pool_size > 0 ? p.pool_size : 0;
  return pool < n ? pool : n;
}

// Grid: (head_dim / kVec, batch).
template <typename T, int kVec>
__global__ void __launch_bounds__(kPoolThreads) pool_fwd_kernel(const PoolParams p) {
  using Acc = AccType<T>;
  __shared__ RunScratch scratch;
  __shared__ Acc s_red[kPoolThreads][kVec];
  const int c = blockIdx.x;
  const int b = blockIdx.y;
  const int tid = threadIdx.x;

  const SeqRun run = sequence_run<kPoolThreads>(p, b, scratch);
  const int64_t m = pooled_rows(p, run.n);
  const int heads = p.num_heads;
  const int64_t items = 2 * m * heads;  // (pooled row k, head h), h fastest
  const T* base = static_cast<const T*>(p.q) + b * p.q_batch_stride + int64_t(c) * kVec;

  Acc acc[kVec];
#pragma unroll
  for (int e = 0; e < kVec; ++e) acc[e] = Acc(0);
  for (int64_t it0 = tid; it0 < items; it0 += int64_t(kPoolThreads) * kPoolUnroll) {
    Acc x[kPoolUnroll][kVec];
#pragma unroll
    for (int u = 0; u < kPoolUnroll; ++u) {
      const int64_t it = it0 + int64_t(u) * kPoolThreads;
      if (it < items) {
        const int64_t k = it / heads;
        const int h = int(it % heads);
        // Pooled rows 0..m-1 are the first m tokens, m..2m-1 the last m (an overlap counts twice).
        const int64_t i = k < m ? k : run.n - 2 * m + k;
        load_pack<T, kVec>(base + (run.first + i) * p.q_row_stride + int64_t(h) * p.q_head_stride, x[u]);
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) x[u][e] = Acc(0);
      }
    }
#pragma unroll
    for (int u = 0; u < kPoolUnroll; ++u)
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[e] += x[u][e];
  }

#pragma unroll
  for (int e = 0; e < kVec; ++e) s_red[tid][e] = acc[e];
  __syncthreads();
  for (int stride = kPoolThreads / 2; stride > 0; stride /= 2) {
    if (tid < stride)
#pragma unroll
      for (int e = 0; e < kVec; ++e) s_red[tid][e] += s_red[tid + stride][e];
    __syncthreads();
  }
  if (tid < kVec) {
    const Acc inv = m > 0 ? Acc(1) / Acc(items) : Acc(0);  // items = H * 2m
    T* out = static_cast<T*>(p.out) + b * p.o_batch_stride + int64_t(c) * kVec;
    out[tid] = from_acc<T>(s_red[0][tid] * inv);
  }
}

// Grid: (row blocks, batch). Block-strided over the rows of sequence b's slot.
template <typename T, int kVec>
__global__ void __launch_bounds__(kPoolBwdThreads) pool_bwd_kernel(const PoolBwdParams p) {
  using Acc = AccType<T>;
  __shared__ RunScratch scratch;
  const int b = blockIdx.y;
  const SeqRun run = sequence_run<kPoolBwdThreads>(p, b, scratch);
  const int64_t m = pooled_rows(p, run.n);
  const Acc coef = m > 0 ? Acc(1) / Acc(2 * m * p.num_heads) : Acc(0);

  // Varlen: the slot is exactly the sequence's rows. Padded: all seqlen rows, padding included.
  const bool varlen = p.cu_seqlens != nullptr;
  const int64_t row_begin = varlen ? run.first : 0;
  const int64_t row_end = varlen ? run.first + run.n : p.seqlen;
  const int vecs = p.head_dim / kVec;
  const int per_row = p.num_heads * vecs;
  const T* dout = static_cast<const T*>(p.dout) + b * p.do_batch_stride;
  T* dq = static_cast<T*>(p.dq) + b * p.dq_batch_stride;

  for (int64_t i = row_begin + blockIdx.x; i < row_end; i += gridDim.x) {
    const int64_t rel = i - run.first;
    int w = 0;
    if (rel >= 0 && rel < run.n) w = int(rel < m) + int(rel >= run.n - m);
    const Acc scale = coef * Acc(w);
    for (int j = threadIdx.x; j < per_row; j += kPoolBwdThreads) {
      const int h = j / vecs;
      const int cv = j % vecs;
      Acc g[kVec];
      if (w != 0) {
        load_pack<T, kVec>(dout + cv * kVec, g);
#pragma unroll
        for (int e = 0; e < kVec; ++e) g[e] *= scale;
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) g[e] = Acc(0);
      }
      store_pack<T, kVec>(dq + i * p.dq_row_stride + int64_t(h) * p.dq_head_stride + cv * kVec, g);
    }
  }
}

bool valid_pool(const PoolParams& p) {
  return p.batch >= 0 && p.batch <= 65535 && p.num_heads > 0 && p.head_dim > 0;
}

template <typename T>
cudaError_t launch_pool_fwd(const PoolParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec_ok = p.head_dim % kVec == 0 &&
                      rows_16b_aligned(p.q, sizeof(T), p.q_batch_stride, p.q_row_stride, p.q_head_stride);
  if (vec_ok) {
    pool_fwd_kernel<T, kVec><<<dim3(p.head_dim / kVec, p.batch), kPoolThreads, 0, stream>>>(p);
  } else {
    pool_fwd_kernel<T, 1><<<dim3(p.head_dim, p.batch), kPoolThreads, 0, stream>>>(p);
  }
  FLUX_CUDA_CHECK_LAUNCH();
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_pool_bwd(const PoolBwdParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  int device = 0, num_sms = 0;
  FLUX_CUDA_CHECK(cudaGetDevice(&device));
  FLUX_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device));
  // Rows per sequence are known on the host only as a bound (padded: seqlen; varlen: max_seqlen,
  // possibly 0 = unknown); the kernel strides, so the grid size affects speed only.
  const int64_t row_bound = p.seqlen > 0 ? p.seqlen : 1024;
  const int64_t per_seq = ceil_div(int64_t(kPoolBwdBlocksPerSm) * num_sms, int64_t(p.batch));
  const unsigned blocks = unsigned(row_bound < per_seq ? row_bound : per_seq);
  const bool vec_ok = p.head_dim % kVec == 0 &&
                      rows_16b_aligned(p.dq, sizeof(T), p.dq_batch_stride, p.dq_row_stride,
                                       p.dq_head_stride) &&
                      rows_16b_aligned(p.dout, sizeof(T), p.do_batch_stride, 0, 0);
  if (vec_ok) {
    pool_bwd_kernel<T, kVec><<<dim3(blocks, p.batch), kPoolBwdThreads, 0, stream>>>(p);
  } else {
    pool_bwd_kernel<T, 1><<<dim3(blocks, p.batch), kPoolBwdThreads, 0, stream>>>(p);
  }
  FLUX_CUDA_CHECK_LAUNCH();
  return cudaSuccess;
}

}  // namespace

cudaError_t run_pool_queries(PoolParams& params, cudaStream_t stream) {
  if (!valid_pool(params)) return cudaErrorInvalidValue;
  if (params.batch == 0) return cudaSuccess;
  switch (params.dtype) {
    case DataType::kFloat32: return launch_pool_fwd<float>(params, stream);
    case DataType::kFloat64: return launch_pool_fwd<double>(params, stream);
    case DataType::kFloat16: return launch_pool_fwd<__half>(params, stream);
    case DataType::kBFloat16: return launch_pool_fwd<__nv_bfloat16>(params, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t run_pool_queries_bwd(PoolBwdParams& params, cudaStream_t stream) {
  if (!valid_pool(params)) return cudaErrorInvalidValue;
  if (params.batch == 0) return cudaSuccess;
  switch (params.dtype) {
    case DataType::kFloat32: return launch_pool_bwd<float>(params, stream);
    case DataType::kFloat64: return launch_pool_bwd<double>(params, stream);
    case DataType::kFloat16: return launch_pool_bwd<__half>(params, stream);
    case DataType::kBFloat16: return launch_pool_bwd<__nv_bfloat16>(params, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace flux
