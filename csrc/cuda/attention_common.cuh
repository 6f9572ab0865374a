// Device building blocks of the portable (sm_80-style, mma.sync) attention kernels, forward and
// backward: per-sequence coordinates, the key-tile walk over flux/streaming.h, shared-memory tile
// copies and warp-level tile products. Torch-free.
//
// Warp tile products. Every product is computed by one warp for 16 output rows, with the fp32
// accumulator in the register layout of mma.sync.m16n8k16 (PTX ISA, "Matrix fragments for mma.m16n8k16"):
// lane = 4 * g + t holds, for each 8-column block j, the elements
//   [0] (row g, col 8j + 2t)   [1] (row g, col 8j + 2t + 1)
//   [2] (row g + 8, col 8j + 2t)   [3] (row g + 8, col 8j + 2t + 1).
// fp16 / bf16 use the tensor cores; fp32 runs the same products with FMAs on the same layout, so the
// kernels above this file are written once for all three dtypes (fp32 must keep fp32 accuracy: TF32
// would fail the tests' fp32 tolerance).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cuda_utils.cuh"
#include "flux/params.h"
#include "flux/streaming.h"

namespace flux::attn {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---- dtype / head-dim dispatch (host) --------------------------------------------------------

template <typename T> struct TypeTag { using type = T; };
template <int D> using HeadDim = std::integral_constant<int, D>;

inline bool supported_head_dim(int d) {
  return d == 32 || d == 64 || d == 96 || d == 128 || d == 256;
}

template <typename T, typename F>
cudaError_t dispatch_head_dim(int head_dim, F&& f) {
  switch (head_dim) {
    case 32: return f(TypeTag<T>{}, HeadDim<32>{});
    case 64: return f(TypeTag<T>{}, HeadDim<64>{});
    case 96: return f(TypeTag<T>{}, HeadDim<96>{});
    case 128: return f(TypeTag<T>{}, HeadDim<128>{});
    case 256: return f(TypeTag<T>{}, HeadDim<256>{});
    default: return cudaErrorInvalidValue;
  }
}

// Calls f(TypeTag<T>, HeadDim<D>) for the params' dtype and head dim; fp64 (CPU-only) and
// unsupported head dims give cudaErrorInvalidValue.
template <typename F>
cudaError_t dispatch_dtype_head_dim(DataType dtype, int head_dim, F&& f) {
  switch (dtype) {
    case DataType::kFloat16: return dispatch_head_dim<__half>(head_dim, f);
    case DataType::kBFloat16: return dispatch_head_dim<__nv_bfloat16>(head_dim, f);
    case DataType::kFloat32: return dispatch_head_dim<float>(head_dim, f);
    default: return cudaErrorInvalidValue;
  }
}

// Host-side checks shared by forward and backward (no device memory is read).
inline cudaError_t validate_attention_params(const AttnFwdParams& p) {
  if (p.dtype != DataType::kFloat16 && p.dtype != DataType::kBFloat16 &&
      p.dtype != DataType::kFloat32) {
    return cudaErrorInvalidValue;
  }
  if (!supported_head_dim(p.head_dim)) return cudaErrorInvalidValue;
  if (p.batch < 0 || p.seqlen_q < 0 || p.seqlen_k < 0) return cudaErrorInvalidValue;
  if (p.num_heads_q <= 0 || p.num_heads_k <= 0 || p.num_heads_q % p.num_heads_k != 0) {
    return cudaErrorInvalidValue;
  }
  // Heads and batch index grid.y / grid.z.
  if (p.num_heads_q > 65535 || p.batch > 65535) return cudaErrorInvalidValue;
  if (p.sparse_mode == SparseMode::kPerSequence && p.use_sparse == nullptr && p.batch > 0) {
    return cudaErrorInvalidValue;
  }
  if (p.sparse_mode != SparseMode::kDense && p.sparse_mode != SparseMode::kStreaming &&
      p.sparse_mode != SparseMode::kPerSequence) {
    return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

// Raises the dynamic shared-memory limit of a kernel when it needs more than the default 48 KB.
template <typename Kernel>
cudaError_t set_smem_limit(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(bytes));
}

// Bits of a kernel's vec_mask: which tensors may move as 16-byte vectors (see rows_16b_aligned).
enum VecBit : uint32_t {
  kVecQ = 1u << 0,
  kVecK = 1u << 1,
  kVecV = 1u << 2,
  kVecO = 1u << 3,
  kVecDO = 1u << 4,
  kVecDQ = 1u << 5,
  kVecDK = 1u << 6,
  kVecDV = 1u << 7,
};

// Shared-memory row pitch: head_dim plus 16 bytes, so that the 8 row groups of an mma fragment
// land in different banks (row pitch = 4 words mod 32 for every supported head dim).
template <typename T, int kHeadDim>
constexpr int smem_pitch() {
  return kHeadDim + 16 / static_cast<int>(sizeof(T));
}

// ---- per-sequence coordinates ---------------------------------------------------------------

struct SeqCoords {
  int64_t q_start;  // first row of the sequence in q (varlen), 0 when padded
  int64_t k_start;
  int64_t len_q;
  int64_t len_k;
  RowRule rule;
};

// Reads cu_seqlens and use_sparse on the device: the host never learns the lengths.
__device__ __forceinline__ SeqCoords seq_coords(const AttnFwdParams& p, int b) {
  SeqCoords s;
  if (p.cu_seqlens_q != nullptr) {
    s.q_start = p.cu_seqlens_q[b];
    s.len_q = p.cu_seqlens_q[b + 1] - s.q_start;
  } else {
    s.q_start = 0;
    s.len_q = p.seqlen_q;
  }
  if (p.cu_seqlens_k != nullptr) {
    s.k_start = p.cu_seqlens_k[b];
    s.len_k = p.cu_seqlens_k[b + 1] - s.k_start;
  } else {
    s.k_start = 0;
    s.len_k = p.seqlen_k;
  }
  const bool streaming = p.sparse_mode == SparseMode::kStreaming ||
                         (p.sparse_mode == SparseMode::kPerSequence && p.use_sparse[b]);
  // Per-sequence mode is dense *causal* for the sequences that are not streaming.
  const bool causal = p.causal || p.sparse_mode != SparseMode::kDense;
  s.rule = make_row_rule(s.len_q, s.len_k, causal, streaming, p.pattern);
  return s;
}

// ---- key-tile walk --------------------------------------------------------------------------

// The key tiles (of kBlockN keys, aligned to multiples of kBlockN) that a block of query rows must
// visit: those covering key_ranges_for_rows, each tile once even when the sink interval and the
// local interval end and start inside the same tile. Tiles inside the gap come out kSkip from
// classify_tile, so callers still classify every tile.
struct KeyTileWalk {
  int64_t count;    // tiles to visit
  int64_t sink_n;   // tiles 0 .. sink_n - 1 cover the sink interval
  int64_t local_0;  // then tiles local_0, local_0 + 1, ...

  __host__ __device__ __forceinline__ int64_t tile(int64_t it) const {
    return it < sink_n ? it : local_0 + (it - sink_n);
  }
};

__host__ __device__ __forceinline__ KeyTileWalk key_tile_walk(const RowRule& r, int64_t i0, int64_t i1,
                                                     int block_n) {
  const KeyRanges kr = key_ranges_for_rows(r, i0, i1);
  KeyTileWalk w;
  w.sink_n = ceil_div<int64_t>(kr.a_end, block_n);
  w.local_0 = imax(kr.b_start / block_n, w.sink_n);
  const int64_t local_end = ceil_div<int64_t>(kr.b_end, block_n);
  w.count = w.sink_n + imax(int64_t(0), local_end - w.local_0);
  return w;
}

// is_visible(rule, row, j0 + c) for the keys c in [0, kBlockN) of one tile, with the parts that
// depend only on the row (streaming.h's row_key_end / row_sink_end / row_local_start, the terms
// is_visible is made of) computed once per row and tile instead of once per element. Bounds are
// clamped to [-1, span + 1] so the per-element test is a 32-bit compare.
struct RowTileMask {
  int key_end;      // keys c >= key_end are invisible
  int sink_end;     // keys c < sink_end are visible (sink part)
  int local_start;  // keys c >= local_start are visible (local part)

  __host__ __device__ __forceinline__ bool visible(int c) const {
    return c < key_end && (c < sink_end || c >= local_start);
  }
};

__host__ __device__ __forceinline__ int clamp_rel(int64_t x, int64_t j0, int span) {
  return static_cast<int>(imin(imax(x - j0, int64_t(-1)), int64_t(span) + 1));
}

__host__ __device__ __forceinline__ RowTileMask row_tile_mask(const RowRule& r, int64_t row, int64_t j0,
                                                     int span) {
  RowTileMask m;
  m.key_end = clamp_rel(row_key_end(r, row), j0, span);
  if (r.streaming) {
    m.sink_end = clamp_rel(row_sink_end(r, row), j0, span);
    m.local_start = clamp_rel(row_local_start(r, row), j0, span);
  } else {  // dense: every key below key_end
    m.sink_end = 0;
    m.local_start = 0;
  }
  return m;
}

// ---- shared-memory tile copies ----------------------------------------------------------------

// smem[r][0, D) = gmem row r for r < valid, zeros for valid <= r < kRows. Zero fill instead of
// reading past the sequence: rows outside it may hold anything (the tests poison them with NaN).
template <typename T, int kRows, int kHeadDim, int kThreads>
__device__ __forceinline__ void load_rows(T* smem, int pitch, const T* gmem, int64_t row_stride,
                                          int64_t valid, bool vec) {
  if (vec) {
    constexpr int kElems = 16 / sizeof(T);
    constexpr int kChunks = kHeadDim / kElems;
    for (int idx = threadIdx.x; idx < kRows * kChunks; idx += kThreads) {
      const int r = idx / kChunks;
      const int c = (idx % kChunks) * kElems;
      uint4 val = make_uint4(0u, 0u, 0u, 0u);
      if (r < valid) val = *reinterpret_cast<const uint4*>(gmem + r * row_stride + c);
      *reinterpret_cast<uint4*>(smem + r * pitch + c) = val;
    }
  } else {
    for (int idx = threadIdx.x; idx < kRows * kHeadDim; idx += kThreads) {
      const int r = idx / kHeadDim;
      const int c = idx % kHeadDim;
      smem[r * pitch + c] = r < valid ? gmem[r * row_stride + c] : from_float<T>(0.0f);
    }
  }
}

// gmem row r = smem[r][0, D) for r < valid, by the threads [0, nthreads) of the caller's group
// (a warp or the whole CTA; `tid` is the thread's index inside it).
template <typename T, int kRows, int kHeadDim>
__device__ __forceinline__ void store_rows(T* gmem, int64_t row_stride, const T* smem, int pitch,
                                           int64_t valid, bool vec, int tid, int nthreads) {
  const int rows = valid < kRows ? static_cast<int>(valid) : kRows;
  if (vec) {
    constexpr int kElems = 16 / sizeof(T);
    constexpr int kChunks = kHeadDim / kElems;
    for (int idx = tid; idx < rows * kChunks; idx += nthreads) {
      const int r = idx / kChunks;
      const int c = (idx % kChunks) * kElems;
      *reinterpret_cast<uint4*>(gmem + r * row_stride + c) =
          *reinterpret_cast<const uint4*>(smem + r * pitch + c);
    }
  } else {
    for (int idx = tid; idx < rows * kHeadDim; idx += nthreads) {
      const int r = idx / kHeadDim;
      const int c = idx % kHeadDim;
      gmem[r * row_stride + c] = smem[r * pitch + c];
    }
  }
}

// Writes a 16 x (8 * NT) fp32 accumulator (times `mul`) into smem as T, at rows [0, 16) of `smem`.
template <typename T, int NT>
__device__ __forceinline__ void acc_to_smem(T* smem, int pitch, const float (&acc)[NT][4],
                                            float mul_lo, float mul_hi) {
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2;
  const int t = lane & 3;
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    T* lo = smem + g * pitch + 8 * j + 2 * t;
    T* hi = lo + 8 * pitch;
    lo[0] = from_float<T>(acc[j][0] * mul_lo);
    lo[1] = from_float<T>(acc[j][1] * mul_lo);
    hi[0] = from_float<T>(acc[j][2] * mul_hi);
    hi[1] = from_float<T>(acc[j][3] * mul_hi);
  }
}

// ---- warp tile products -----------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4],
                                          const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<T, __half>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    static_assert(std::is_same_v<T, __nv_bfloat16>, "mma_16816 takes fp16 or bf16");
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

template <typename T>
__device__ __forceinline__ uint32_t ld_pair(const T* p) {  // two consecutive 16-bit elements
  return *reinterpret_cast<const uint32_t*>(p);
}

template <typename T>
__device__ __forceinline__ uint32_t ld_two(const T* lo, const T* hi) {  // two scattered ones
  const uint32_t a = *reinterpret_cast<const uint16_t*>(lo);
  const uint32_t b = *reinterpret_cast<const uint16_t*>(hi);
  return a | (b << 16);
}

// acc[16 x 8NT] += A[16 x K] * B^T, A rows at sA + r * lda, B stored as [8NT rows][K] at sB
// (row n of sB is column n of the product: K for Q K^T, Q for K Q^T, V for dO V^T, ...).
template <typename T, int NT, int K>
__device__ __forceinline__ void warp_gemm_nt(float (&acc)[NT][4], const T* sA, int lda,
                                             const T* sB, int ldb) {
  static_assert(K % 16 == 0, "K must be a multiple of 16");
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2;
  const int t = lane & 3;
  if constexpr (std::is_same_v<T, float>) {
    const float* a_lo = sA + g * lda;
    const float* a_hi = a_lo + 8 * lda;
#pragma unroll 2
    for (int k = 0; k < K; k += 4) {
      const float4 x = *reinterpret_cast<const float4*>(a_lo + k);
      const float4 y = *reinterpret_cast<const float4*>(a_hi + k);
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const float4 b0 = *reinterpret_cast<const float4*>(sB + (8 * j + 2 * t) * ldb + k);
        const float4 b1 = *reinterpret_cast<const float4*>(sB + (8 * j + 2 * t + 1) * ldb + k);
        acc[j][0] += x.x * b0.x + x.y * b0.y + x.z * b0.z + x.w * b0.w;
        acc[j][1] += x.x * b1.x + x.y * b1.y + x.z * b1.z + x.w * b1.w;
        acc[j][2] += y.x * b0.x + y.y * b0.y + y.z * b0.z + y.w * b0.w;
        acc[j][3] += y.x * b1.x + y.y * b1.y + y.z * b1.z + y.w * b1.w;
      }
    }
  } else {
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
      const T* ap = sA + g * lda + 16 * kk + 2 * t;
      const uint32_t a[4] = {ld_pair(ap), ld_pair(ap + 8 * lda), ld_pair(ap + 8),
                             ld_pair(ap + 8 * lda + 8)};
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const T* bp = sB + (8 * j + g) * ldb + 16 * kk + 2 * t;
        const uint32_t b[2] = {ld_pair(bp), ld_pair(bp + 8)};
        mma_16816<T>(acc[j], a, b);
      }
    }
  }
}

// acc[16 x 8NT] += P[16 x 16KT] * B, P an fp32 accumulator (layout above, 2KT column blocks) used
// as the A operand without leaving registers, B stored row-major [16KT rows][>= 8NT] at sB
// (V for P V, dO for P^T dO, Q for dS^T Q, K for dS K). 16-bit dtypes round P to T first, as the
// tensor-core operand requires.
template <typename T, int NT, int KT>
__device__ __forceinline__ void warp_gemm_rn(float (&acc)[NT][4], const float (&p)[2 * KT][4],
                                             const T* sB, int ldb) {
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2;
  const int t = lane & 3;
  if constexpr (std::is_same_v<T, float>) {
    // Row g of P is spread over the 4 lanes of the quad: fetch each lane's pair by shuffle.
    const int quad = lane & ~3;
#pragma unroll
    for (int jj = 0; jj < 2 * KT; ++jj) {
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        const float p00 = __shfl_sync(0xffffffffu, p[jj][0], quad | s);  // (g,     8jj + 2s)
        const float p01 = __shfl_sync(0xffffffffu, p[jj][1], quad | s);  // (g,     8jj + 2s + 1)
        const float p10 = __shfl_sync(0xffffffffu, p[jj][2], quad | s);  // (g + 8, 8jj + 2s)
        const float p11 = __shfl_sync(0xffffffffu, p[jj][3], quad | s);  // (g + 8, 8jj + 2s + 1)
        const float* b0 = sB + (8 * jj + 2 * s) * ldb + 2 * t;
        const float* b1 = b0 + ldb;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const float2 x0 = *reinterpret_cast<const float2*>(b0 + 8 * j);
          const float2 x1 = *reinterpret_cast<const float2*>(b1 + 8 * j);
          acc[j][0] += p00 * x0.x + p01 * x1.x;
          acc[j][1] += p00 * x0.y + p01 * x1.y;
          acc[j][2] += p10 * x0.x + p11 * x1.x;
          acc[j][3] += p10 * x0.y + p11 * x1.y;
        }
      }
    }
  } else {
#pragma unroll
    for (int kk = 0; kk < KT; ++kk) {
      // The C layout of column blocks 2kk and 2kk+1 is exactly the A layout of k-block kk.
      const uint32_t a[4] = {pack2<T>(p[2 * kk][0], p[2 * kk][1]),
                             pack2<T>(p[2 * kk][2], p[2 * kk][3]),
                             pack2<T>(p[2 * kk + 1][0], p[2 * kk + 1][1]),
                             pack2<T>(p[2 * kk + 1][2], p[2 * kk + 1][3])};
      const T* base = sB + (16 * kk + 2 * t) * ldb + g;
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const T* bp = base + 8 * j;
        const uint32_t b[2] = {ld_two(bp, bp + ldb), ld_two(bp + 8 * ldb, bp + 9 * ldb)};
        mma_16816<T>(acc[j], a, b);
      }
    }
  }
}

template <int NT>
__device__ __forceinline__ void zero_acc(float (&acc)[NT][4]) {
#pragma unroll
  for (int j = 0; j < NT; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = 0.0f;
  }
}

}  // namespace flux::attn
