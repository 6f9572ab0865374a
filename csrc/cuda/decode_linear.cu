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
// physical k for A and B (kb + 8t + 0..3 in the first MMA, + 4..7 in the second). The warps of a
// block (8; 16 when the grid is under one wave) split k, 32 consecutive k per warp and block step,
// and reduce through shared memory once; each warp streams its weight chunks through a private
// cp.async ring, 3-7 steps ahead. Tokens past `rows` are zero in B and never written. SwiGLU loads
// the gate and up rows of the same features and applies silu(gate) * up in the epilogue, so the
// MLP's gate and up outputs never go to memory. Every launch uses programmatic dependent launch:
// the ring's first stages are issued before griddepcontrol.wait (weights are never the previous
// kernel's output), so a layer's matrices overlap their predecessor's tail.
//
// The CUDA-core path (fp32, unaligned data, in_features % 32 != 0, FLUX_DECODE_LINEAR_KERNEL=simt)
// gives each block 4 weight rows, strides its threads over k and accumulates every token row in
// fp32. Measured on the H200 (docs/perf_notes.md "Decode linear layers", the 8B layer's seven
// matrices): the tensor-core path streams a layer at 3.59 TB/s at 1 row, 3.44 at 4, 3.39 at 8
// (cuBLAS 3.07-3.15: 1.14x / 1.12x / 1.08x); the CUDA-core one at 3.4 TB/s at 1 row, 1.4 at 4.
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

constexpr int kMmaFeatures = 16;  // the M of mma.m16n8k16: weight rows per block
constexpr int kMmaTokens = 8;     // the N: token rows (kDecodeLinearMaxRows)
static_assert(kMmaTokens == kDecodeLinearMaxRows, "one MMA column per token row");

template <typename T>
__device__ __forceinline__ void mma_chunk(float (&c)[4], const uint4& lo, const uint4& hi, const uint4& x) {
  const uint32_t a0[4] = {lo.x, hi.x, lo.y, hi.y};
  ptx::mma_16816<T>(c, a0, x.x, x.y);
  const uint32_t a1[4] = {lo.z, hi.z, lo.w, hi.w};
  ptx::mma_16816<T>(c, a1, x.z, x.w);
}

// What one tensor-core launch computes: one plain linear, one SwiGLU pair (up != nullptr, one
// matrix), or up to kDecodeLinearMaxGroup plain linears of the same x, whose 16-feature blocks are
// laid end to end in one grid (matrix i owns blocks [m[i - 1].block_end, m[i].block_end)).
struct MmaMatrix {
  const void* weight;
  const void* bias;
  void* out;
  int64_t out_features, weight_row_stride, out_row_stride;
  uint32_t block_end;
};

struct MmaLaunch {
  const void* x = nullptr;
  const void* up = nullptr;
  int rows = 0;
  int count = 0;
  int64_t in_features = 0, x_row_stride = 0;
  MmaMatrix m[kDecodeLinearMaxGroup];
};

// This block's matrix and its first block, by selects (a dynamic index into the kernel's parameter
// struct would copy it to local memory).
__device__ __forceinline__ MmaMatrix block_matrix(const MmaLaunch& L, uint32_t& first_block) {
  MmaMatrix mat = L.m[0];
  first_block = 0;
#pragma unroll
  for (int i = 1; i < kDecodeLinearMaxGroup; ++i) {
    if (i < L.count && blockIdx.x >= L.m[i - 1].block_end) {
      first_block = L.m[i - 1].block_end;
      mat = L.m[i];
    }
  }
  return mat;
}

// The block's 16 x 8 output tile: each warp's C fragments (acc[0..1] = feature g, tokens 2t and
// 2t + 1; acc[2..3] = feature g + 8) summed over the warps through shared memory, then SwiGLU or the
// bias, written for the live token rows and features.
template <typename T, bool kSwiglu, int kWarps>
__device__ __forceinline__ void store_tile(const MmaMatrix& mat, int rows, int64_t f0, const float (&acc)[4],
                                           const float (&acc_up)[4]) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  constexpr int kTile = kMmaFeatures * kMmaTokens;
  __shared__ float partial[kSwiglu ? 2 : 1][kWarps][kTile];
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int idx = (g + 8 * (e / 2)) * kMmaTokens + 2 * t + (e % 2);
    partial[0][warp][idx] = acc[e];
    if constexpr (kSwiglu) partial[kSwiglu ? 1 : 0][warp][idx] = acc_up[e];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kTile; i += kWarps * 32) {
    const int feature = i / kMmaTokens, r = i % kMmaTokens;
    const int64_t f = f0 + feature;
    if (r >= rows || f >= mat.out_features) continue;
    float sum = 0.f, up = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      sum += partial[0][w][i];
      if constexpr (kSwiglu) up += partial[kSwiglu ? 1 : 0][w][i];
    }
    float y;
    if constexpr (kSwiglu) y = silu(sum) * up;
    else y = mat.bias ? sum + to_float(static_cast<const T*>(mat.bias)[f]) : sum;
    static_cast<T*>(mat.out)[r * mat.out_row_stride + f] = from_float<T>(y);
  }
}

// The weight chunks go global -> shared by cp.async into a ring private to each warp (kStages
// stages of one block step: 16 rows x 32 k per warp, 1 KB, 2 KB for SwiGLU), so the bytes in flight
// do not depend on how ptxas allocates registers: kStages - 1 steps ahead per warp. (Loading them
// into registers a few steps at a time, the first version, streamed at 2.6 TB/s: ptxas reused the
// registers of the chunks just multiplied for the next loads, so each warp's loads came in bursts
// with a DRAM latency of nothing in flight between them.)
// A lane writes and reads back only its own 16-byte slots (slot = chunk x 32 + lane), so the ring
// needs __syncwarp only and every access is one contiguous 512-byte row of the warp.
template <bool kSwiglu>
constexpr int chunks_per_step() {
  return kSwiglu ? 4 : 2;  // rows g and g + 8, of the gate and up matrices for SwiGLU
}
template <bool kSwiglu, int kWarps, int kStages>
constexpr size_t ring_bytes() {
  return size_t(kWarps) * kStages * chunks_per_step<kSwiglu>() * 32 * 16;
}

template <typename T, bool kSwiglu, int kWarps, int kStages>
__global__ void __launch_bounds__(kWarps * 32) decode_linear_mma_kernel(const MmaLaunch L) {
  pdl_launch_dependents();
  extern __shared__ __align__(16) uint4 ring[];  // [kWarps][kStages][kChunks][32]
  constexpr int kChunks = chunks_per_step<kSwiglu>();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  uint32_t first_block;
  const MmaMatrix mat = block_matrix(L, first_block);
  const int64_t f0 = int64_t(blockIdx.x - first_block) * kMmaFeatures;
  // Rows g and g + 8 of this block's features; missing features of the last block re-read the last
  // row (in bounds; their sums are dropped).
  const int64_t f_lo = f0 + g < mat.out_features ? f0 + g : mat.out_features - 1;
  const int64_t f_hi = f0 + g + 8 < mat.out_features ? f0 + g + 8 : mat.out_features - 1;
  const T* src[kChunks];
  src[0] = static_cast<const T*>(mat.weight) + f_lo * mat.weight_row_stride;
  src[1] = static_cast<const T*>(mat.weight) + f_hi * mat.weight_row_stride;
  if constexpr (kSwiglu) {
    src[2] = static_cast<const T*>(L.up) + f_lo * mat.weight_row_stride;
    src[3] = static_cast<const T*>(L.up) + f_hi * mat.weight_row_stride;
  }
  uint4* my_ring = ring + size_t(warp) * kStages * kChunks * 32 + lane;
  const uint32_t ring_u32 = ptx::smem_u32(my_ring);

  // Block step s of this warp covers k in [s * kStepK + warp * 32, + 32); lane (g, t) takes the
  // 8 k from 8t. in_features % 32 == 0 on this path, so a step is whole or entirely past the end.
  constexpr int64_t kStepK = kWarps * 32;
  const int64_t k_lane = int64_t(warp) * 32 + 8 * t;
  const int64_t first_k = int64_t(warp) * 32;
  const int64_t steps = first_k < L.in_features ? ceil_div(L.in_features - first_k, kStepK) : 0;
  const auto issue = [&](int64_t step) {
    const int64_t k = k_lane + step * kStepK;
    const bool in = step < steps;
    const uint32_t dst = ring_u32 + uint32_t(step % kStages) * (kChunks * 32 * 16);
#pragma unroll
    for (int c = 0; c < kChunks; ++c) ptx::cp_async_16(dst + c * 32 * 16, in ? src[c] + k : src[c], in);
    ptx::cp_async_commit();  // one group per step, empty past the end, so wait_group counts stay fixed
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) issue(s);  // the weights are not the kernel before's: ahead of the wait
  pdl_wait();  // the activations (and the output) are

  const bool token = g < L.rows;
  const T* x = static_cast<const T*>(L.x) + (token ? g : 0) * L.x_row_stride;
  float acc[4] = {0.f, 0.f, 0.f, 0.f}, acc_up[4] = {0.f, 0.f, 0.f, 0.f};
  const uint4 zero = make_uint4(0, 0, 0, 0);
  for (int64_t step = 0; step < steps; ++step) {
    const int64_t k = k_lane + step * kStepK;
    const uint4 xv = token ? *reinterpret_cast<const uint4*>(x + k) : zero;
    ptx::cp_async_wait<kStages - 2>();  // this step's group has landed
    __syncwarp();
    const uint4* slot = my_ring + (step % kStages) * (kChunks * 32);
    uint4 w[kChunks];
#pragma unroll
    for (int c = 0; c < kChunks; ++c) w[c] = slot[c * 32];
    __syncwarp();  // every lane has read the stage the next issue refills (step - 1's)
    issue(step + kStages - 1);
    mma_chunk<T>(acc, w[0], w[1], xv);
    if constexpr (kSwiglu) mma_chunk<T>(acc_up, w[2], w[3], xv);
  }
  ptx::cp_async_wait<0>();  // no copy may land after the block has exited
  store_tile<T, kSwiglu, kWarps>(mat, L.rows, f0, acc, acc_up);
}

// Ring depth, measured on the H200 (bench/decode_linear.py, 2026-12-02): 4 stages (3 steps ahead)
// for the 4096-wide inputs and SwiGLU (3 or 6 for every matrix: no better per layer); the
// 14336-wide down_proj streams 3.3 -> 3.5 TB/s with 8 (its 256 blocks give ~2 per SM, so each
// warp needs more steps ahead).
int ring_stages(const MmaLaunch& L) {
  if (L.up != nullptr) return 4;
  return L.in_features >= 8192 ? 8 : 4;
}

template <typename T, bool kSwiglu, int kWarps, int kStages>
cudaError_t launch_ring(const MmaLaunch& L, cudaStream_t stream) {
  constexpr auto kernel = decode_linear_mma_kernel<T, kSwiglu, kWarps, kStages>;
  constexpr size_t smem = ring_bytes<kSwiglu, kWarps, kStages>();
  static_assert(smem <= 200 * 1024, "the ring must fit in one SM's shared memory");
  // Over 48 KB of dynamic shared memory needs an opt-in.
  FLUX_CUDA_CHECK(opt_in_shared_memory<kernel>(int(smem)));
  const dim3 grid(L.m[L.count - 1].block_end);
  return launch_pdl(kernel, grid, dim3(kWarps * 32), smem, stream, L);
}

template <typename T, bool kSwiglu, int kWarps>
cudaError_t launch_ring_stages(const MmaLaunch& L, cudaStream_t stream) {
  if constexpr (!kSwiglu) {
    if (ring_stages(L) == 8) return launch_ring<T, kSwiglu, kWarps, 8>(L, stream);
  }
  return launch_ring<T, kSwiglu, kWarps, 4>(L, stream);
}

template <typename T>
cudaError_t launch_mma(const MmaLaunch& L, cudaStream_t stream) {
  // Under one wave of 16-feature blocks (the k and v projections alone: 64 blocks) 16 warps per
  // block put twice the bytes in flight on the SMs that have work (k_proj at 4 rows: 7.4 -> 5.0 us).
  const bool wide = L.m[L.count - 1].block_end < 128;
  if (L.up != nullptr) {
    return wide ? launch_ring_stages<T, true, 16>(L, stream) : launch_ring_stages<T, true, 8>(L, stream);
  }
  return wide ? launch_ring_stages<T, false, 16>(L, stream) : launch_ring_stages<T, false, 8>(L, stream);
}

// FLUX_DECODE_LINEAR_KERNEL=simt forces the CUDA-core path (A/B timing); read per call (host
// getenv, graph-safe).
bool simt_forced() {
  const char* env = std::getenv("FLUX_DECODE_LINEAR_KERNEL");
  return env != nullptr && std::strcmp(env, "simt") == 0;
}

// The tensor-core kernel (16-bit types only) at every row count (1 row: 3.57 TB/s per 8B layer, the
// CUDA-core one 3.4) for data with 16-byte aligned rows; in_features % 32 == 0 (every model width) makes
// each warp's k step whole.
template <typename T>
bool mma_eligible(const DecodeLinearParams& p) {
  constexpr int kVec = vec_of<T>();
  return p.in_features % 32 == 0 && p.x_row_stride % kVec == 0 &&
         p.weight_row_stride % kVec == 0 && aligned16(p.x) && aligned16(p.weight) &&
         (p.up == nullptr || aligned16(p.up)) && !simt_forced();
}

// Appends p's weight (and bias, out) as the next matrix of L.
void add_matrix(MmaLaunch& L, const DecodeLinearParams& p) {
  MmaMatrix& m = L.m[L.count];
  m.weight = p.weight;
  m.bias = p.bias;
  m.out = p.out;
  m.out_features = p.out_features;
  m.weight_row_stride = p.weight_row_stride;
  m.out_row_stride = p.out_row_stride;
  const uint32_t before = L.count > 0 ? L.m[L.count - 1].block_end : 0;
  m.block_end = before + uint32_t(ceil_div(p.out_features, int64_t(kMmaFeatures)));
  ++L.count;
}

MmaLaunch launch_of(const DecodeLinearParams& p) {
  MmaLaunch L;
  L.x = p.x;
  L.up = p.up;
  L.rows = p.rows;
  L.in_features = p.in_features;
  L.x_row_stride = p.x_row_stride;
  add_matrix(L, p);
  return L;
}

// ---- dispatch -----------------------------------------------------------------------------------

template <typename T>
cudaError_t launch(const DecodeLinearParams& p, cudaStream_t stream) {
  if constexpr (sizeof(T) == 2) {
    if (mma_eligible<T>(p)) return launch_mma<T>(launch_of(p), stream);
  }
  constexpr int kVec = vec_of<T>();
  const bool vec = p.in_features % kVec == 0 && p.x_row_stride % kVec == 0 && p.weight_row_stride % kVec == 0 &&
                   aligned16(p.x) && aligned16(p.weight) && (p.up == nullptr || aligned16(p.up));
  return vec ? launch_vec<T, kVec>(p, stream) : launch_vec<T, 1>(p, stream);
}

bool valid(const DecodeLinearParams& p) {
  return p.rows <= kDecodeLinearMaxRows && p.in_features > 0 && p.out_features <= (int64_t(1) << 31) &&
         !(p.up != nullptr && p.bias != nullptr);
}

cudaError_t launch_by_dtype(const DecodeLinearParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DataType::kFloat32: return launch<float>(p, stream);
    case DataType::kFloat16: return launch<__half>(p, stream);
    case DataType::kBFloat16: return launch<__nv_bfloat16>(p, stream);
    case DataType::kFloat64: break;  // fp64 is CPU only (as for every op of the library)
  }
  return cudaErrorInvalidValue;
}

// One launch for the whole group when every member takes the tensor-core path; otherwise (fp32,
// odd shapes) one launch per member.
template <typename T>
cudaError_t launch_group(const DecodeLinearGroupParams& g, cudaStream_t stream) {
  if constexpr (sizeof(T) == 2) {
    bool together = true;
    for (int i = 0; i < g.count; ++i) together = together && g.linear[i].out_features > 0 && mma_eligible<T>(g.linear[i]);
    if (together) {
      MmaLaunch L = launch_of(g.linear[0]);
      for (int i = 1; i < g.count; ++i) add_matrix(L, g.linear[i]);
      return launch_mma<T>(L, stream);
    }
  }
  for (int i = 0; i < g.count; ++i) {
    if (g.linear[i].out_features > 0) FLUX_CUDA_CHECK(launch<T>(g.linear[i], stream));
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t run_decode_linear(const DecodeLinearParams& params, cudaStream_t stream) {
  if (params.rows <= 0 || params.out_features <= 0) return cudaSuccess;
  if (!valid(params)) return cudaErrorInvalidValue;
  return launch_by_dtype(params, stream);
}

cudaError_t run_decode_linear_group(const DecodeLinearGroupParams& params, cudaStream_t stream) {
  if (params.count < 1 || params.count > kDecodeLinearMaxGroup) return cudaErrorInvalidValue;
  const DecodeLinearParams& first = params.linear[0];
  if (first.rows <= 0) return cudaSuccess;
  for (int i = 0; i < params.count; ++i) {
    const DecodeLinearParams& p = params.linear[i];
    if (!valid(p) || p.up != nullptr || p.dtype != first.dtype || p.x != first.x || p.rows != first.rows ||
        p.in_features != first.in_features || p.x_row_stride != first.x_row_stride)
      return cudaErrorInvalidValue;
  }
  switch (first.dtype) {
    case DataType::kFloat32: return launch_group<float>(params, stream);
    case DataType::kFloat16: return launch_group<__half>(params, stream);
    case DataType::kBFloat16: return launch_group<__nv_bfloat16>(params, stream);
    case DataType::kFloat64: break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace flux
