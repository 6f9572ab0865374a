// Linear layers at decode's 1-8 token rows on CUDA (flux/model_ops.h DecodeLinearParams).
//
// With so few rows a linear layer is a stream of its weight matrix: the floor is the weight's bytes
// over HBM bandwidth (the 8B model's 436 MB per layer: ~0.10 ms at 4.2 TB/s). cuBLAS's small-M
// kernels reach ~3.5 TB/s on the large MLP matrices but 1.1-2.4 TB/s on q/k/v/o, where launch and
// tail latency dominate (a 1024 x 4096 k_proj is 8 MB: 2 us of traffic).
//
// The fast path (bf16/fp16, 16-byte aligned rows) runs on tensor cores, so that 8 token rows cost
// what 1 costs: a warp computes 16 features x 8 token rows with mma.sync m16n8k16, W as A (16 x 16)
// and X^T as B (16 x 8). The dot product does not care in which order k is summed, so each lane
// loads whole 16-byte chunks (8 consecutive k) of its two weight rows and of its token row, and the
// chunk's four 32-bit pairs serve as that lane's k-slots of two MMAs: lane (g, t) holds k-slots
// {2t, 2t+1, 2t+8, 2t+9} of rows g and g+8 (A) and of token g (B), and maps them to the same
// physical k for A and B (kb + 8t + 0..3 in the first MMA, + 4..7 in the second). The 8 warps of a
// block split k (256 consecutive k per block step: 512 B of each weight row) and reduce through
// shared memory once; tokens past `rows` are zero in B and never written. SwiGLU loads the gate and
// up rows of the same features and applies silu(gate) * up in the epilogue, so the MLP's gate and up
// outputs never go to memory.
//
// The CUDA-core path (one token row, fp32, unaligned data, FLUX_DECODE_LINEAR_KERNEL=simt) gives
// each block 4 weight rows, strides its threads over k and accumulates every token row in fp32.
// Measured on the H200 (docs/perf_notes.md "Decode linear layers"): at 1 row it streams the 8B
// layer at 3.4 TB/s (cuBLAS 3.05); the tensor-core path holds 2.6 TB/s at 1-8 rows, short of
// cuBLAS's 3.0, so flux_attention.fuse_ops uses these kernels at one token row only.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include <cstdlib>
#include <cstring>

#include "cuda_utils.cuh"
#include "flux/model_ops.h"
#include "ptx_sm80.cuh"
#include "vec_io.cuh"

namespace flux {
namespace {

// ---- CUDA-core path -----------------------------------------------------------------------------

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kWeightRows = 4;  // weight rows per block: 4 linear features or 2 SwiGLU features

__device__ __forceinline__ float silu(float g) { return g / (1.f + __expf(-g)); }

// kRows: the token-row capacity (1, 2, 4 or 8); p.rows <= kRows rows are live.
template <typename T, int kVec, int kRows, bool kSwiglu>
__global__ void __launch_bounds__(kThreads) decode_linear_kernel(const DecodeLinearParams p) {
  constexpr int kFeatures = kSwiglu ? kWeightRows / 2 : kWeightRows;
  const int64_t f0 = int64_t(blockIdx.x) * kFeatures;
  const T* w[kWeightRows];
#pragma unroll
  for (int j = 0; j < kWeightRows; ++j) {
    const bool up = kSwiglu && j >= kFeatures;
    int64_t f = f0 + (up ? j - kFeatures : j);
    // The last block's missing features re-read the last row (in bounds; their sums are dropped).
    if (f >= p.out_features) f = p.out_features - 1;
    w[j] = static_cast<const T*>(up ? p.up : p.weight) + f * p.weight_row_stride;
  }
  const T* x = static_cast<const T*>(p.x);

  float acc[kWeightRows][kRows];
#pragma unroll
  for (int j = 0; j < kWeightRows; ++j)
#pragma unroll
    for (int r = 0; r < kRows; ++r) acc[j][r] = 0.f;

  const int64_t chunks = p.in_features / kVec;
#pragma unroll 2
  for (int64_t c = threadIdx.x; c < chunks; c += kThreads) {
    float wv[kWeightRows][kVec];
#pragma unroll
    for (int j = 0; j < kWeightRows; ++j) load_vec_stream<T, kVec>(w[j] + c * kVec, wv[j]);
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (r < p.rows) {
        float xv[kVec];
        load_vec<T, kVec>(x + r * p.x_row_stride + c * kVec, xv);
#pragma unroll
        for (int j = 0; j < kWeightRows; ++j)
#pragma unroll
          for (int e = 0; e < kVec; ++e) acc[j][r] = fmaf(wv[j][e], xv[e], acc[j][r]);
      }
    }
  }

  // Block reduction: shuffles inside each warp, then the warps' partials through shared memory.
  __shared__ float partial[kWarps][kWeightRows * kRows];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int j = 0; j < kWeightRows; ++j)
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float v = acc[j][r];
#pragma unroll
      for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
      if (lane == 0) partial[warp][j * kRows + r] = v;
    }
  __syncthreads();
  const int i = threadIdx.x;
  if (i >= kFeatures * kRows) return;
  const int feature = i / kRows, r = i % kRows;
  const int64_t f = f0 + feature;
  if (f >= p.out_features || r >= p.rows) return;
  float sum = 0.f;
#pragma unroll
  for (int k = 0; k < kWarps; ++k) sum += partial[k][feature * kRows + r];
  float y;
  if constexpr (kSwiglu) {
    float up = 0.f;
#pragma unroll
    for (int k = 0; k < kWarps; ++k) up += partial[k][(feature + kFeatures) * kRows + r];
    y = silu(sum) * up;
  } else {
    y = p.bias ? sum + to_float(static_cast<const T*>(p.bias)[f]) : sum;
  }
  static_cast<T*>(p.out)[r * p.out_row_stride + f] = from_float<T>(y);
}

template <typename T, int kVec, int kRows>
cudaError_t launch_rows(const DecodeLinearParams& p, cudaStream_t stream) {
  const bool swiglu = p.up != nullptr;
  const int64_t features = swiglu ? kWeightRows / 2 : kWeightRows;
  const dim3 grid(unsigned(ceil_div(p.out_features, features)));
  if (swiglu) decode_linear_kernel<T, kVec, kRows, true><<<grid, kThreads, 0, stream>>>(p);
  else decode_linear_kernel<T, kVec, kRows, false><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int kVec>
cudaError_t launch_vec(const DecodeLinearParams& p, cudaStream_t stream) {
  if (p.rows <= 1) return launch_rows<T, kVec, 1>(p, stream);
  if (p.rows <= 2) return launch_rows<T, kVec, 2>(p, stream);
  if (p.rows <= 4) return launch_rows<T, kVec, 4>(p, stream);
  return launch_rows<T, kVec, 8>(p, stream);
}

// ---- tensor-core path ---------------------------------------------------------------------------

constexpr int kMmaWarps = 8;
constexpr int kMmaFeatures = 16;  // the M of mma.m16n8k16: weight rows per block
constexpr int kMmaTokens = 8;     // the N: token rows (kDecodeLinearMaxRows)
constexpr int kMmaUnroll = 4;     // block steps whose loads are issued before their MMAs
static_assert(kMmaTokens == kDecodeLinearMaxRows, "one MMA column per token row");

template <typename T>
__device__ __forceinline__ void mma_chunk(float (&c)[4], const uint4& lo, const uint4& hi, const uint4& x) {
  const uint32_t a0[4] = {lo.x, hi.x, lo.y, hi.y};
  ptx::mma_16816<T>(c, a0, x.x, x.y);
  const uint32_t a1[4] = {lo.z, hi.z, lo.w, hi.w};
  ptx::mma_16816<T>(c, a1, x.z, x.w);
}

template <typename T, bool kSwiglu>
__global__ void __launch_bounds__(kMmaWarps * 32) decode_linear_mma_kernel(const DecodeLinearParams p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int64_t f0 = int64_t(blockIdx.x) * kMmaFeatures;
  // Rows g and g + 8 of this block's features; missing features of the last block re-read the last
  // row (in bounds; their sums are dropped).
  const int64_t f_lo = f0 + g < p.out_features ? f0 + g : p.out_features - 1;
  const int64_t f_hi = f0 + g + 8 < p.out_features ? f0 + g + 8 : p.out_features - 1;
  const T* w_lo = static_cast<const T*>(p.weight) + f_lo * p.weight_row_stride;
  const T* w_hi = static_cast<const T*>(p.weight) + f_hi * p.weight_row_stride;
  const T* u_lo = kSwiglu ? static_cast<const T*>(p.up) + f_lo * p.weight_row_stride : nullptr;
  const T* u_hi = kSwiglu ? static_cast<const T*>(p.up) + f_hi * p.weight_row_stride : nullptr;
  const bool token = g < p.rows;
  const T* x = static_cast<const T*>(p.x) + (token ? g : 0) * p.x_row_stride;

  float acc[4] = {0.f, 0.f, 0.f, 0.f}, acc_up[4] = {0.f, 0.f, 0.f, 0.f};
  constexpr int64_t kStepK = kMmaWarps * 32;  // k per block step: 8 warps x 4 lanes x 8
  const uint4 zero = make_uint4(0, 0, 0, 0);
  // The loop bound is warp-uniform (mma.sync needs the whole warp): a lane past in_features loads
  // zeros instead of leaving the loop.
  for (int64_t kb = int64_t(warp) * 32; kb < p.in_features; kb += kStepK * kMmaUnroll) {
    uint4 wl[kMmaUnroll], wh[kMmaUnroll], ul[kMmaUnroll], uh[kMmaUnroll], xv[kMmaUnroll];
#pragma unroll
    for (int u = 0; u < kMmaUnroll; ++u) {
      const int64_t k = kb + 8 * t + u * kStepK;
      const bool in = k < p.in_features;  // in_features % 8 == 0 on this path: whole chunks
      wl[u] = in ? load_stream16(w_lo + k) : zero;
      wh[u] = in ? load_stream16(w_hi + k) : zero;
      if constexpr (kSwiglu) {
        ul[u] = in ? load_stream16(u_lo + k) : zero;
        uh[u] = in ? load_stream16(u_hi + k) : zero;
      }
      xv[u] = in && token ? *reinterpret_cast<const uint4*>(x + k) : zero;
    }
#pragma unroll
    for (int u = 0; u < kMmaUnroll; ++u) {
      mma_chunk<T>(acc, wl[u], wh[u], xv[u]);
      if constexpr (kSwiglu) mma_chunk<T>(acc_up, ul[u], uh[u], xv[u]);
    }
  }

  // C fragments: acc[0..1] = (feature g, tokens 2t, 2t+1), acc[2..3] = (feature g + 8, same tokens).
  constexpr int kTile = kMmaFeatures * kMmaTokens;
  __shared__ float partial[kSwiglu ? 2 : 1][kMmaWarps][kTile];
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int idx = (g + 8 * (e / 2)) * kMmaTokens + 2 * t + (e % 2);
    partial[0][warp][idx] = acc[e];
    if constexpr (kSwiglu) partial[kSwiglu ? 1 : 0][warp][idx] = acc_up[e];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kTile; i += kMmaWarps * 32) {
    const int feature = i / kMmaTokens, r = i % kMmaTokens;
    const int64_t f = f0 + feature;
    if (r >= p.rows || f >= p.out_features) continue;
    float sum = 0.f, up = 0.f;
#pragma unroll
    for (int w = 0; w < kMmaWarps; ++w) {
      sum += partial[0][w][i];
      if constexpr (kSwiglu) up += partial[kSwiglu ? 1 : 0][w][i];
    }
    float y;
    if constexpr (kSwiglu) y = silu(sum) * up;
    else y = p.bias ? sum + to_float(static_cast<const T*>(p.bias)[f]) : sum;
    static_cast<T*>(p.out)[r * p.out_row_stride + f] = from_float<T>(y);
  }
}

template <typename T>
cudaError_t launch_mma(const DecodeLinearParams& p, cudaStream_t stream) {
  const dim3 grid(unsigned(ceil_div(p.out_features, int64_t(kMmaFeatures))));
  if (p.up != nullptr) decode_linear_mma_kernel<T, true><<<grid, kMmaWarps * 32, 0, stream>>>(p);
  else decode_linear_mma_kernel<T, false><<<grid, kMmaWarps * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

// FLUX_DECODE_LINEAR_KERNEL=simt forces the CUDA-core path (A/B timing); read per call (host
// getenv, graph-safe).
bool simt_forced() {
  const char* env = std::getenv("FLUX_DECODE_LINEAR_KERNEL");
  return env != nullptr && std::strcmp(env, "simt") == 0;
}

// ---- dispatch -----------------------------------------------------------------------------------

template <typename T>
cudaError_t launch(const DecodeLinearParams& p, cudaStream_t stream) {
  constexpr int kVec = vec_of<T>();
  const bool vec = p.in_features % kVec == 0 && p.x_row_stride % kVec == 0 && p.weight_row_stride % kVec == 0 &&
                   aligned16(p.x) && aligned16(p.weight) && (p.up == nullptr || aligned16(p.up));
  if constexpr (sizeof(T) == 2) {
    // One token row: the CUDA-core kernel streams at 3.4 TB/s per layer (1.12x cuBLAS); the
    // tensor-core one at 2.6 TB/s whatever the rows (0.87x cuBLAS; bench/decode_linear.py,
    // 2026-12-02), which beats the CUDA-core kernel from 2 rows on.
    // in_features % 32 == 0 (every model width): the shapes the tensor-core path has run on the
    // H200; other widths take the CUDA-core path until the MMA tail has run there too.
    if (vec && p.rows > 1 && p.in_features % 32 == 0 && !simt_forced()) return launch_mma<T>(p, stream);
  }
  return vec ? launch_vec<T, kVec>(p, stream) : launch_vec<T, 1>(p, stream);
}

}  // namespace

cudaError_t run_decode_linear(const DecodeLinearParams& params, cudaStream_t stream) {
  if (params.rows <= 0 || params.out_features <= 0) return cudaSuccess;
  if (params.rows > kDecodeLinearMaxRows || params.in_features <= 0 || params.out_features > (int64_t(1) << 31) ||
      (params.up != nullptr && params.bias != nullptr))
    return cudaErrorInvalidValue;
  switch (params.dtype) {
    case DataType::kFloat32: return launch<float>(params, stream);
    case DataType::kFloat16: return launch<__half>(params, stream);
    case DataType::kBFloat16: return launch<__nv_bfloat16>(params, stream);
    case DataType::kFloat64: break;  // fp64 is CPU only (as for every op of the library)
  }
  return cudaErrorInvalidValue;
}

}  // namespace flux
