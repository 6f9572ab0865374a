// Attention forward, portable CUDA path: one CTA per (64-query tile, q head, sequence), K/V tiles
// through shared memory, mma.sync tensor-core products (FMA for fp32), fp32 online softmax.
// Dense, streaming and per-sequence modes, padded or varlen, GQA; the key set of every row comes
// from flux/streaming.h. run_attention_fwd is the one place that picks the kernel for a call.
#include <cmath>

#include "attention_common.cuh"
#include "cuda_utils.cuh"
#include "flux/launch.h"
#include "flux/streaming.h"
#include "sm90/launch_sm90.h"

namespace flux {
namespace {

using attn::SeqCoords;

template <typename T, int kHeadDim>
struct FwdTraits {
  static constexpr int kBlockM = 64;  // 4 warps x 16 rows: one mma row block per warp
  // hd256 halves the key tile: the O accumulator alone is 128 fp32 registers per thread there.
  static constexpr int kBlockN = kHeadDim <= 128 ? 64 : 32;
  static constexpr int kWarps = kBlockM / 16;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kPitch = attn::smem_pitch<T, kHeadDim>();
  static constexpr size_t kSmemBytes = size_t(kBlockM + 2 * kBlockN) * kPitch * sizeof(T);
  static_assert(kBlockN % 16 == 0 && kHeadDim % 16 == 0, "tiles must be whole mma blocks");
};

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(FwdTraits<T, kHeadDim>::kThreads)
    attention_fwd_kernel(const AttnFwdParams p, const uint32_t vec_mask) {
  using Tr = FwdTraits<T, kHeadDim>;
  constexpr int kBlockM = Tr::kBlockM;
  constexpr int kBlockN = Tr::kBlockN;
  constexpr int kPitch = Tr::kPitch;
  constexpr int kNS = kBlockN / 8;   // column blocks of S
  constexpr int kNO = kHeadDim / 8;  // column blocks of O

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // (kBlockM, kPitch), reused to stage O
  T* sK = sQ + kBlockM * kPitch;           // (kBlockN, kPitch)
  T* sV = sK + kBlockN * kPitch;           // (kBlockN, kPitch)

  const int b = blockIdx.z;
  const int h = blockIdx.y;
  const SeqCoords sc = attn::seq_coords(p, b);
  const int64_t m0 = int64_t(blockIdx.x) * kBlockM;
  // Varlen grids are sized by max_seqlen: tiles past this sequence's end have nothing to do.
  // Uniform over the CTA, before any barrier.
  if (m0 >= sc.len_q) return;
  const int64_t m1 = imin(m0 + kBlockM, sc.len_q);
  const int hk = h / (p.num_heads_q / p.num_heads_k);

  const T* q_tile = static_cast<const T*>(p.q) + b * p.q_batch_stride +
                    (sc.q_start + m0) * p.q_row_stride + int64_t(h) * p.q_head_stride;
  const T* k_seq = static_cast<const T*>(p.k) + b * p.k_batch_stride + sc.k_start * p.k_row_stride +
                   int64_t(hk) * p.k_head_stride;
  const T* v_seq = static_cast<const T*>(p.v) + b * p.v_batch_stride + sc.k_start * p.v_row_stride +
                   int64_t(hk) * p.v_head_stride;

  attn::load_rows<T, kBlockM, kHeadDim, Tr::kThreads>(sQ, kPitch, q_tile, p.q_row_stride, m1 - m0,
                                                      vec_mask & attn::kVecQ);

  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int64_t row_lo = m0 + 16 * warp + g;  // rows of this thread's accumulator entries
  const int64_t row_hi = row_lo + 8;
  const T* sQw = sQ + 16 * warp * kPitch;

  // log2(e) folded into the scale: the softmax runs on exp2 (one MUFU op, no extra multiply).
  const float scale_log2 = p.scale * attn::kLog2e;
  float acc_o[kNO][4];
  attn::zero_acc(acc_o);
  float row_max[2] = {-INFINITY, -INFINITY};  // in scale_log2 units
  float row_sum[2] = {0.0f, 0.0f};            // this thread's partial sums, reduced at the end

  const attn::KeyTileWalk walk = attn::key_tile_walk(sc.rule, m0, m1, kBlockN);
  for (int64_t it = 0; it < walk.count; ++it) {
    const int64_t j0 = walk.tile(it) * kBlockN;
    const int64_t j1 = imin(j0 + kBlockN, sc.len_k);
    const TileKind kind = classify_tile(sc.rule, m0, m1, j0, j1);
    if (kind == TileKind::kSkip) continue;
    // A ragged last key tile holds zero-filled rows that must not enter the softmax.
    const bool need_mask = kind == TileKind::kPartial || j0 + kBlockN > sc.len_k;

    __syncthreads();  // every warp is done with the previous K/V tile (and sQ is loaded)
    attn::load_rows<T, kBlockN, kHeadDim, Tr::kThreads>(sK, kPitch, k_seq + j0 * p.k_row_stride,
                                                        p.k_row_stride, j1 - j0,
                                                        vec_mask & attn::kVecK);
    attn::load_rows<T, kBlockN, kHeadDim, Tr::kThreads>(sV, kPitch, v_seq + j0 * p.v_row_stride,
                                                        p.v_row_stride, j1 - j0,
                                                        vec_mask & attn::kVecV);
    __syncthreads();

    float s[kNS][4];
    attn::zero_acc(s);
    attn::warp_gemm_nt<T, kNS, kHeadDim>(s, sQw, kPitch, sK, kPitch);

#pragma unroll
    for (int j = 0; j < kNS; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] *= scale_log2;
    }
    if (need_mask) {
      const attn::RowTileMask mask_lo = attn::row_tile_mask(sc.rule, row_lo, j0, kBlockN);
      const attn::RowTileMask mask_hi = attn::row_tile_mask(sc.rule, row_hi, j0, kBlockN);
#pragma unroll
      for (int j = 0; j < kNS; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int c = 8 * j + 2 * t + (e & 1);
          if (!(e < 2 ? mask_lo : mask_hi).visible(c)) s[j][e] = -INFINITY;
        }
      }
    }

    // Online softmax, rows g (entries 0, 1) and g + 8 (entries 2, 3); a row is shared by the 4
    // lanes of a quad, hence the xor-1/xor-2 shuffles.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = row_max[r];
#pragma unroll
      for (int j = 0; j < kNS; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      // A row with no visible key so far keeps max -inf; subtracting 0 instead keeps exp2 at 0
      // rather than NaN (-inf - -inf).
      const float ref = mx == -INFINITY ? 0.0f : mx;
      const float alpha = exp2f(row_max[r] - ref);
      row_max[r] = mx;
      row_sum[r] *= alpha;
#pragma unroll
      for (int j = 0; j < kNO; ++j) {
        acc_o[j][2 * r] *= alpha;
        acc_o[j][2 * r + 1] *= alpha;
      }
#pragma unroll
      for (int j = 0; j < kNS; ++j) {
        const float p0 = exp2f(s[j][2 * r] - ref);
        const float p1 = exp2f(s[j][2 * r + 1] - ref);
        s[j][2 * r] = p0;
        s[j][2 * r + 1] = p1;
        row_sum[r] += p0 + p1;
      }
    }

    attn::warp_gemm_rn<T, kNO, kBlockN / 16>(acc_o, s, sV, kPitch);
  }

  // Every warp is past its last read of sK/sV and every thread's part of the sQ load is done,
  // so each warp may now stage its O rows in its own 16 rows of sQ.
  __syncthreads();

  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = row_sum[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    // l == 0 exactly when the row saw no key: out 0, lse -inf. A NaN l (NaN in the row's scores)
    // must stay NaN in both, so compare with 0 rather than test l > 0.
    inv[r] = l == 0.0f ? 0.0f : 1.0f / l;
    const float lse = l == 0.0f ? -INFINITY : (row_max[r] + log2f(l)) * attn::kLn2;
    const int64_t row = r == 0 ? row_lo : row_hi;
    if (t == 0 && row < sc.len_q) {
      p.lse[b * p.lse_batch_stride + int64_t(h) * p.lse_head_stride + sc.q_start + row] = lse;
    }
  }

  T* sO = sQ + 16 * warp * kPitch;
  attn::acc_to_smem<T, kNO>(sO, kPitch, acc_o, inv[0], inv[1]);
  __syncwarp();
  const int64_t w0 = m0 + 16 * warp;
  if (w0 < sc.len_q) {
    T* o_rows = static_cast<T*>(p.out) + b * p.o_batch_stride + (sc.q_start + w0) * p.o_row_stride +
                int64_t(h) * p.o_head_stride;
    attn::store_rows<T, 16, kHeadDim>(o_rows, p.o_row_stride, sO, kPitch, sc.len_q - w0,
                                      vec_mask & attn::kVecO, lane, 32);
  }
}

template <typename T, int kHeadDim>
cudaError_t run_attention_fwd_mma(AttnFwdParams& p, cudaStream_t stream) {
  using Tr = FwdTraits<T, kHeadDim>;
  const size_t es = sizeof(T);
  uint32_t vec = 0;
  if (rows_16b_aligned(p.q, es, p.q_batch_stride, p.q_row_stride, p.q_head_stride)) vec |= attn::kVecQ;
  if (rows_16b_aligned(p.k, es, p.k_batch_stride, p.k_row_stride, p.k_head_stride)) vec |= attn::kVecK;
  if (rows_16b_aligned(p.v, es, p.v_batch_stride, p.v_row_stride, p.v_head_stride)) vec |= attn::kVecV;
  if (rows_16b_aligned(p.out, es, p.o_batch_stride, p.o_row_stride, p.o_head_stride)) vec |= attn::kVecO;

  auto kernel = attention_fwd_kernel<T, kHeadDim>;
  FLUX_CUDA_CHECK(attn::set_smem_limit(kernel, Tr::kSmemBytes));
  const dim3 grid(static_cast<unsigned>(ceil_div<int64_t>(p.seqlen_q, Tr::kBlockM)),
                  static_cast<unsigned>(p.num_heads_q), static_cast<unsigned>(p.batch));
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p, vec);
  FLUX_CUDA_CHECK_LAUNCH();
  return cudaSuccess;
}

}  // namespace

cudaError_t run_attention_fwd(AttnFwdParams& params, cudaStream_t stream) {
  FLUX_CUDA_CHECK(attn::validate_attention_params(params));
  if (params.q == nullptr || params.k == nullptr || params.v == nullptr || params.out == nullptr ||
      params.lse == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (params.batch == 0 || params.seqlen_q == 0) return cudaSuccess;  // no row to write
  // grid.x counts query tiles; every FwdTraits instance has the same kBlockM.
  if (ceil_div<int64_t>(params.seqlen_q, FwdTraits<float, 32>::kBlockM) > int64_t(0x7fffffff)) {
    return cudaErrorInvalidValue;
  }
  // Kernel choice, the only one for the forward: the sm_90a kernel (wgmma + TMA, warp-specialised)
  // for 16-bit dtypes at head_dim 64 / 128 on Hopper; the portable mma.sync kernel otherwise.
  if (sm90::fwd_sm90_supported(params)) {
    const bool bf16 = params.dtype == DataType::kBFloat16;
    if (params.head_dim == 128) {
      return bf16 ? sm90::run_attention_fwd_sm90<__nv_bfloat16, 128>(params, stream)
                  : sm90::run_attention_fwd_sm90<__half, 128>(params, stream);
    }
    return bf16 ? sm90::run_attention_fwd_sm90<__nv_bfloat16, 64>(params, stream)
                : sm90::run_attention_fwd_sm90<__half, 64>(params, stream);
  }
  return attn::dispatch_dtype_head_dim(params.dtype, params.head_dim, [&](auto tag, auto hd) {
    using T = typename decltype(tag)::type;
    return run_attention_fwd_mma<T, decltype(hd)::value>(params, stream);
  });
}

}  // namespace flux
