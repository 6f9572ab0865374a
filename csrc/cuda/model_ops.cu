// The fused model ops on CUDA (flux/model_ops.h): RMSNorm, SiLU(gate) * up, rotary embedding.
//
// All three are streams: the floor is their bytes over HBM bandwidth, so each reads every input
// element once with 16-byte loads, computes in fp32 and writes once. At the
// Llama-3.1-8B shape and 128K tokens that is 2 GB per RMSNorm (transformers' fp32 code moves ~18),
// 11 GB for SiLU * up (19), 2.5 GB for the rotary embedding of q and k (~13 plus a transposing
// copy of q and k before attention, which the layout-preserving outputs here make unnecessary).
// Paths without 16-byte alignment (odd sizes or strides) take the same kernels one element at a time.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_utils.cuh"
#include "flux/model_ops.h"
#include "vec_io.cuh"

namespace flux {
namespace {

// Element I/O: load_vec / store_vec of vec_io.cuh (fp32 math for every dtype).

// Every kernel here is launched with programmatic dependent launch (launch_pdl): at decode they
// run on a few rows between weight streams, and a plain launch would add its ~2 us of launch
// latency to each. Each waits for the kernel before (whose output it reads) before touching
// memory, then lets the next PDL kernel (a decode_linear) be scheduled and start its weight
// prefetch while this one runs.
__device__ __forceinline__ void pdl_prologue() {
  pdl_wait();
  pdl_launch_dependents();
}

// ---- RMSNorm ------------------------------------------------------------------------------------

constexpr int kNormThreads = 256;
constexpr int64_t kFewRows = 64;  // up to here a row gets a whole block (see launch_rms_norm_vec)

// kRowThreads threads per row (8, 32 or the whole block): a row's sum of squares is reduced by
// shuffles inside its group, and across warps through shared memory when a block holds one row.
// The second pass re-reads the row from L1/L2 (a row is at most a few tens of KB).
template <typename T, int kVec, int kRowThreads>
__global__ void __launch_bounds__(kNormThreads) rms_norm_kernel(const RmsNormParams p) {
  pdl_prologue();
  constexpr int kRowsPerBlock = kNormThreads / kRowThreads;
  const int t = threadIdx.x % kRowThreads;
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kRowThreads;
  const bool active = row < p.rows;  // inactive threads still join the block-wide reduction
  const T* x = static_cast<const T*>(p.x) + (active ? row : 0) * p.x_row_stride;
  const T* w = static_cast<const T*>(p.weight);
  T* out = static_cast<T*>(p.out) + (active ? row : 0) * p.out_row_stride;
  const int64_t chunks = p.cols / kVec;

  float ss = 0;
  if (active) {
    for (int64_t c = t; c < chunks; c += kRowThreads) {
      float v[kVec];
      load_vec<T, kVec>(x + c * kVec, v);
#pragma unroll
      for (int e = 0; e < kVec; ++e) ss += v[e] * v[e];
    }
  }
  constexpr int kShuffleWidth = kRowThreads < 32 ? kRowThreads : 32;
#pragma unroll
  for (int off = kShuffleWidth / 2; off > 0; off /= 2) ss += __shfl_xor_sync(0xffffffffu, ss, off);
  if constexpr (kRowThreads > 32) {
    __shared__ float partial[kNormThreads / 32];
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = ss;
    __syncthreads();
    ss = 0;
#pragma unroll
    for (int i = 0; i < kNormThreads / 32; ++i) ss += partial[i];
  }
  if (!active) return;
  const float inv = rsqrtf(ss / float(p.cols) + p.eps);

  for (int64_t c = t; c < chunks; c += kRowThreads) {
    float v[kVec], g[kVec];
    load_vec<T, kVec>(x + c * kVec, v);
    load_vec<T, kVec>(w + c * kVec, g);
#pragma unroll
    for (int e = 0; e < kVec; ++e) v[e] = v[e] * inv * g[e];
    store_vec<T, kVec>(out + c * kVec, v);
  }
}

template <typename T, int kVec>
cudaError_t launch_rms_norm_vec(const RmsNormParams& p, cudaStream_t stream) {
  const int64_t chunks = p.cols / kVec;
  auto grid = [&](int row_threads) {
    return dim3(unsigned(ceil_div(p.rows, int64_t(kNormThreads / row_threads))));
  };
  // Decode normalises a handful of rows: a warp per row would leave each lane 16 dependent-latency
  // loads of a 4096-wide row (~14 us at 4 rows on the H200, measured by bench/e2e_profile.py); a
  // block per row gives each thread 2 and the launch costs what a launch costs (~2-3 us).
  const bool few_rows = p.rows <= kFewRows;
  if (chunks <= 32) return launch_pdl(rms_norm_kernel<T, kVec, 8>, grid(8), dim3(kNormThreads), 0, stream, p);
  if (chunks <= 512 && !few_rows)
    return launch_pdl(rms_norm_kernel<T, kVec, 32>, grid(32), dim3(kNormThreads), 0, stream, p);
  return launch_pdl(rms_norm_kernel<T, kVec, kNormThreads>, grid(kNormThreads), dim3(kNormThreads), 0, stream, p);
}

template <typename T>
cudaError_t launch_rms_norm(const RmsNormParams& p, cudaStream_t stream) {
  constexpr int kVec = vec_of<T>();
  const bool vec = p.cols % kVec == 0 && p.x_row_stride % kVec == 0 && p.out_row_stride % kVec == 0 &&
                   aligned16(p.x) && aligned16(p.out) && aligned16(p.weight);
  return vec ? launch_rms_norm_vec<T, kVec>(p, stream) : launch_rms_norm_vec<T, 1>(p, stream);
}

// ---- SiLU(gate) * up ----------------------------------------------------------------------------

constexpr int kEltThreads = 256;

__device__ __forceinline__ float silu(float g) { return g / (1.f + __expf(-g)); }

template <typename T, int kVec>
__global__ void __launch_bounds__(kEltThreads) silu_mul_kernel(const SiluMulParams p) {
  pdl_prologue();
  const T* gate = static_cast<const T*>(p.gate);
  const T* up = static_cast<const T*>(p.up);
  T* out = static_cast<T*>(p.out);
  const int64_t chunks = p.n / kVec;
  for (int64_t c = int64_t(blockIdx.x) * kEltThreads + threadIdx.x; c < chunks;
       c += int64_t(gridDim.x) * kEltThreads) {
    float g[kVec], u[kVec];
    load_vec<T, kVec>(gate + c * kVec, g);
    load_vec<T, kVec>(up + c * kVec, u);
#pragma unroll
    for (int e = 0; e < kVec; ++e) g[e] = silu(g[e]) * u[e];
    store_vec<T, kVec>(out + c * kVec, g);
  }
}

template <typename T>
cudaError_t launch_silu_mul(const SiluMulParams& p, cudaStream_t stream) {
  constexpr int kVec = vec_of<T>();
  const bool vec = p.n % kVec == 0 && aligned16(p.gate) && aligned16(p.up) && aligned16(p.out);
  const int64_t chunks = vec ? p.n / kVec : p.n;
  int device = 0, sms = 0;
  FLUX_CUDA_CHECK(cudaGetDevice(&device));
  FLUX_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  // Grid-stride: 8 blocks of 256 per SM keep enough 16-byte loads in flight for HBM.
  int64_t blocks = ceil_div(chunks, int64_t(kEltThreads));
  if (blocks > int64_t(sms) * 8) blocks = int64_t(sms) * 8;
  if (vec) return launch_pdl(silu_mul_kernel<T, kVec>, dim3(unsigned(blocks)), dim3(kEltThreads), 0, stream, p);
  return launch_pdl(silu_mul_kernel<T, 1>, dim3(unsigned(blocks)), dim3(kEltThreads), 0, stream, p);
}

// ---- rotary embedding ---------------------------------------------------------------------------

constexpr int kRopeThreads = 128;

// Blocks (sequence x position, y): the y blocks of a position split its (head, chunk of head_dim / 2)
// pairs of q and k, so the position's cos/sin row is read from L1 by the heads of a block. y = 1
// in prefill; at decode (a few positions) y covers the pairs in one pass instead of three dependent
// rounds of loads by one block (Llama-8B: 320 pairs, 128 threads).
template <typename T, int kVec>
__global__ void __launch_bounds__(kRopeThreads) rope_kernel(const RopeParams p) {
  pdl_prologue();
  const int64_t b = blockIdx.x / p.seqlen;
  const int64_t s = blockIdx.x % p.seqlen;
  const int half = p.head_dim / 2;
  const int chunks = half / kVec;
  const int items = (p.heads_q + p.heads_k) * chunks;
  const T* cos = static_cast<const T*>(p.cos) + b * p.cos_batch_stride + s * p.cos_row_stride;
  const T* sin = static_cast<const T*>(p.sin) + b * p.cos_batch_stride + s * p.cos_row_stride;
  for (int item = blockIdx.y * kRopeThreads + threadIdx.x; item < items; item += gridDim.y * kRopeThreads) {
    int head = item / chunks;
    const int i0 = (item % chunks) * kVec;
    const T* src;
    T* dst;
    if (head < p.heads_q) {
      src = static_cast<const T*>(p.q) + b * p.q_batch_stride + head * p.q_head_stride + s * p.q_row_stride;
      dst = static_cast<T*>(p.q_out) + b * p.qo_batch_stride + head * p.qo_head_stride + s * p.qo_row_stride;
    } else {
      head -= p.heads_q;
      src = static_cast<const T*>(p.k) + b * p.k_batch_stride + head * p.k_head_stride + s * p.k_row_stride;
      dst = static_cast<T*>(p.k_out) + b * p.ko_batch_stride + head * p.ko_head_stride + s * p.ko_row_stride;
    }
    float x1[kVec], x2[kVec], c1[kVec], c2[kVec], s1[kVec], s2[kVec];
    load_vec<T, kVec>(src + i0, x1);
    load_vec<T, kVec>(src + half + i0, x2);
    load_vec<T, kVec>(cos + i0, c1);
    load_vec<T, kVec>(cos + half + i0, c2);
    load_vec<T, kVec>(sin + i0, s1);
    load_vec<T, kVec>(sin + half + i0, s2);
    float o1[kVec], o2[kVec];
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      o1[e] = x1[e] * c1[e] - x2[e] * s1[e];
      o2[e] = x2[e] * c2[e] + x1[e] * s2[e];
    }
    store_vec<T, kVec>(dst + i0, o1);
    store_vec<T, kVec>(dst + half + i0, o2);
  }
}

template <typename T>
cudaError_t launch_rope(const RopeParams& p, cudaStream_t stream) {
  constexpr int kVec = vec_of<T>();
  auto ok = [](int64_t stride) { return stride % kVec == 0; };
  const bool vec = (p.head_dim / 2) % kVec == 0 && aligned16(p.q) && aligned16(p.k) && aligned16(p.q_out) &&
                   aligned16(p.k_out) && aligned16(p.cos) && aligned16(p.sin) && ok(p.q_batch_stride) &&
                   ok(p.q_head_stride) && ok(p.q_row_stride) && ok(p.k_batch_stride) && ok(p.k_head_stride) &&
                   ok(p.k_row_stride) && ok(p.qo_batch_stride) && ok(p.qo_head_stride) && ok(p.qo_row_stride) &&
                   ok(p.ko_batch_stride) && ok(p.ko_head_stride) && ok(p.ko_row_stride) &&
                   ok(p.cos_batch_stride) && ok(p.cos_row_stride);
  const int64_t positions = int64_t(p.batch) * p.seqlen;
  const int64_t items = int64_t(p.heads_q + p.heads_k) * ((p.head_dim / 2) / (vec ? kVec : 1));
  const dim3 grid(unsigned(positions), unsigned(positions >= 256 ? 1 : ceil_div(items, int64_t(kRopeThreads))));
  if (vec) return launch_pdl(rope_kernel<T, kVec>, grid, dim3(kRopeThreads), 0, stream, p);
  return launch_pdl(rope_kernel<T, 1>, grid, dim3(kRopeThreads), 0, stream, p);
}

template <template <typename> class Launch, typename P>
cudaError_t dispatch(const P& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DataType::kFloat32: return Launch<float>::run(p, stream);
    case DataType::kFloat64: break;  // fp64 is CPU only (as for every op of the library)
    case DataType::kFloat16: return Launch<__half>::run(p, stream);
    case DataType::kBFloat16: return Launch<__nv_bfloat16>::run(p, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
struct NormLaunch {
  static cudaError_t run(const RmsNormParams& p, cudaStream_t s) { return launch_rms_norm<T>(p, s); }
};
template <typename T>
struct SiluLaunch {
  static cudaError_t run(const SiluMulParams& p, cudaStream_t s) { return launch_silu_mul<T>(p, s); }
};
template <typename T>
struct RopeLaunch {
  static cudaError_t run(const RopeParams& p, cudaStream_t s) { return launch_rope<T>(p, s); }
};

}  // namespace

cudaError_t run_rms_norm(const RmsNormParams& params, cudaStream_t stream) {
  if (params.rows <= 0 || params.cols <= 0) return cudaSuccess;
  return dispatch<NormLaunch>(params, stream);
}

cudaError_t run_silu_mul(const SiluMulParams& params, cudaStream_t stream) {
  if (params.n <= 0) return cudaSuccess;
  return dispatch<SiluLaunch>(params, stream);
}

cudaError_t run_rotary_embedding(const RopeParams& params, cudaStream_t stream) {
  if (params.batch <= 0 || params.seqlen <= 0 || params.heads_q + params.heads_k <= 0) return cudaSuccess;
  if (params.head_dim <= 0 || params.head_dim % 2 != 0 || int64_t(params.batch) * params.seqlen > 0x7fffffff)
    return cudaErrorInvalidValue;
  return dispatch<RopeLaunch>(params, stream);
}

}  // namespace flux
