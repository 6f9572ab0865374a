// Linear layers at decode's 1-8 token rows on CUDA (flux/model_ops.h DecodeLinearParams).
//
// With so few rows a linear layer is a stream of its weight matrix: the floor is the weight's bytes
// over HBM bandwidth (the 8B model's 436 MB per layer: ~0.10 ms at 4.2 TB/s). cuBLAS's small-M
// kernels reach ~3.6 TB/s on the large MLP matrices but 0.8-2.9 TB/s on q/k/v/o, where launch and
// tail latency dominate (a 1024 x 4096 k_proj is 8 MB: 2 us of traffic). Here each block owns
// kWeightRows weight rows (4 features, or 2 SwiGLU features with their gate and up rows), its
// threads stride over the in_features with 16-byte streaming loads (L1 left to the activations,
// which every block re-reads from L1/L2), accumulate in fp32 for every token row, and reduce
// across the block once at the end. SwiGLU's silu(gate) * up is the epilogue, so the MLP's gate
// and up outputs never go to memory.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_utils.cuh"
#include "flux/model_ops.h"
#include "vec_io.cuh"

namespace flux {
namespace {

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

template <typename T>
cudaError_t launch(const DecodeLinearParams& p, cudaStream_t stream) {
  constexpr int kVec = vec_of<T>();
  const bool vec = p.in_features % kVec == 0 && p.x_row_stride % kVec == 0 && p.weight_row_stride % kVec == 0 &&
                   aligned16(p.x) && aligned16(p.weight) && (p.up == nullptr || aligned16(p.up));
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
