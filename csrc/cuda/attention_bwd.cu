// Attention backward: the dispatcher (run_attention_bwd, bottom) and the portable CUDA path. On
// Hopper, fp16 / bf16 at head dims 64 and 128 take the sm_90a kernels of sm90/bwd_*.cuh instead.
// The portable path: three kernels, no atomics (deterministic by design):
//   1. preprocess: delta_i = rowsum(dO_i * O_i) - dlse_i, one warp per (row, q head), into the
//      workspace;
//   2. dK/dV: one CTA per (key tile, kv head, sequence); it loops over the q heads of the GQA group
//      and the query tiles that see the key tile (streaming.h's column view), and owns its dK/dV
//      rows outright;
//   3. dQ: one CTA per (query tile, q head, sequence), walking key tiles as the forward does.
// Probabilities are recomputed from the saved lse. Like the forward, run_attention_bwd is the one
// place that picks the kernels.
//
// Portable workspace layout (the sm90 one is in sm90/bwd_workspace.cuh): delta, fp32, in the layout of lse: padded [B, Hq, Sq] (batch stride Hq * Sq,
// head stride Sq), varlen [Hq, total_q] (head stride total_q); row i of sequence b at
// b * batch_stride + h * head_stride + q_start(b) + i.
#include <cmath>

#include "attention_common.cuh"
#include "cuda_utils.cuh"
#include "flux/launch.h"
#include "flux/streaming.h"
#include "sm90/arch.h"
#include "sm90/bwd_sm90.h"

namespace flux {
namespace {

using attn::SeqCoords;

struct DeltaBuf {
  float* data;
  int64_t batch_stride;
  int64_t head_stride;

  __device__ __forceinline__ int64_t index(int b, int h, int64_t row) const {
    return b * batch_stride + h * head_stride + row;
  }
};

DeltaBuf delta_layout(const AttnBwdParams& p) {
  DeltaBuf d;
  d.data = static_cast<float*>(p.workspace);
  if (p.is_varlen()) {
    d.batch_stride = 0;
    d.head_stride = p.total_q;
  } else {
    d.batch_stride = int64_t(p.num_heads_q) * p.seqlen_q;
    d.head_stride = p.seqlen_q;
  }
  return d;
}

int64_t delta_rows(const AttnBwdParams& p) {
  return p.is_varlen() ? p.total_q : int64_t(p.batch) * p.seqlen_q;
}

// lse -> the exp2 offset of its row: log2(e) * lse, or +inf for a row that saw no key (lse = -inf),
// so that exp2(x - offset) is 0 there instead of inf.
__device__ __forceinline__ float lse_offset(float lse) {
  return lse == -INFINITY ? INFINITY : lse * attn::kLog2e;
}

// ---- 1. delta ----------------------------------------------------------------------------------

constexpr int kPreWarps = 8;

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(32 * kPreWarps)
    attention_bwd_preprocess_kernel(const AttnBwdParams p, const DeltaBuf delta) {
  const int b = blockIdx.z;
  const int h = blockIdx.y;
  const SeqCoords sc = attn::seq_coords(p, b);
  const int64_t row = int64_t(blockIdx.x) * kPreWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= sc.len_q) return;  // warp-uniform; this kernel has no barrier
  const int64_t grow = sc.q_start + row;
  const T* o = static_cast<const T*>(p.out) + b * p.o_batch_stride + grow * p.o_row_stride +
               int64_t(h) * p.o_head_stride;
  const T* d = static_cast<const T*>(p.dout) + b * p.do_batch_stride + grow * p.do_row_stride +
               int64_t(h) * p.do_head_stride;
  float acc = 0.0f;
#pragma unroll
  for (int c = lane; c < kHeadDim; c += 32) acc += to_float(o[c]) * to_float(d[c]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) {
    const float dl = p.dlse != nullptr
                         ? p.dlse[b * p.lse_batch_stride + int64_t(h) * p.lse_head_stride + grow]
                         : 0.0f;
    delta.data[delta.index(b, h, grow)] = acc - dl;
  }
}

// ---- 2. dK / dV --------------------------------------------------------------------------------

template <typename T, int kHeadDim>
struct BwdKVTraits {
  static constexpr int kBlockN = 64;  // keys per CTA: 4 slabs of 16, one mma row block each
  // Each warp keeps dK and dV for its 16 keys x kDSlice columns in registers (kDSlice / 4 fp32 per
  // thread each). hd256 splits the columns over two warps (which then both recompute S and dP for
  // their slab) to stay within 255 registers.
  static constexpr int kSplitD = kHeadDim == 256 ? 2 : 1;
  static constexpr int kDSlice = kHeadDim / kSplitD;
  // S^T and dP^T take kBlockM / 2 registers each per thread; 32 query rows keep hd >= 96 unspilled.
  static constexpr int kBlockM = kHeadDim <= 64 ? 64 : 32;
  static constexpr int kSlabs = kBlockN / 16;
  static constexpr int kWarps = kSlabs * kSplitD;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kPitch = attn::smem_pitch<T, kHeadDim>();
  static constexpr size_t kSmemBytes =
      size_t(2 * kBlockN + 2 * kBlockM) * kPitch * sizeof(T) + 2 * kBlockM * sizeof(float) +
      kBlockM * sizeof(attn::RowTileMask);
  static_assert(kBlockM % 16 == 0 && kDSlice % 8 == 0, "tiles must be whole mma blocks");
};

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(BwdKVTraits<T, kHeadDim>::kThreads)
    attention_bwd_dkdv_kernel(const AttnBwdParams p, const DeltaBuf delta, const uint32_t vec_mask) {
  using Tr = BwdKVTraits<T, kHeadDim>;
  constexpr int kBlockM = Tr::kBlockM;
  constexpr int kBlockN = Tr::kBlockN;
  constexpr int kPitch = Tr::kPitch;
  constexpr int kDSlice = Tr::kDSlice;
  constexpr int kNS = kBlockM / 8;      // column blocks of S^T (query rows)
  constexpr int kNAcc = kDSlice / 8;    // column blocks of this warp's dK / dV slice

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);  // (kBlockN, kPitch), reused to stage dK
  T* sV = sK + kBlockN * kPitch;           // (kBlockN, kPitch), reused to stage dV
  T* sQ = sV + kBlockN * kPitch;           // (kBlockM, kPitch)
  T* sdO = sQ + kBlockM * kPitch;          // (kBlockM, kPitch)
  float* sLse = reinterpret_cast<float*>(sdO + kBlockM * kPitch);  // (kBlockM) exp2 offsets
  float* sDelta = sLse + kBlockM;                                  // (kBlockM)
  // Per query row, its visible keys of this key tile (kBlockM); only filled for masked tiles.
  attn::RowTileMask* sMask = reinterpret_cast<attn::RowTileMask*>(sDelta + kBlockM);

  const int b = blockIdx.z;
  const int hk = blockIdx.y;
  const SeqCoords sc = attn::seq_coords(p, b);
  const int64_t n0 = int64_t(blockIdx.x) * kBlockN;
  if (n0 >= sc.len_k) return;  // uniform over the CTA, before any barrier
  const int64_t n1 = imin(n0 + kBlockN, sc.len_k);
  const int group = p.num_heads_q / p.num_heads_k;

  const T* k_tile = static_cast<const T*>(p.k) + b * p.k_batch_stride +
                    (sc.k_start + n0) * p.k_row_stride + int64_t(hk) * p.k_head_stride;
  const T* v_tile = static_cast<const T*>(p.v) + b * p.v_batch_stride +
                    (sc.k_start + n0) * p.v_row_stride + int64_t(hk) * p.v_head_stride;
  attn::load_rows<T, kBlockN, kHeadDim, Tr::kThreads>(sK, kPitch, k_tile, p.k_row_stride, n1 - n0,
                                                      vec_mask & attn::kVecK);
  attn::load_rows<T, kBlockN, kHeadDim, Tr::kThreads>(sV, kPitch, v_tile, p.v_row_stride, n1 - n0,
                                                      vec_mask & attn::kVecV);

  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int slab = warp % Tr::kSlabs;  // keys [16 slab, 16 slab + 16) of the tile
  const int dpart = warp / Tr::kSlabs; // dK/dV columns [dpart kDSlice, (dpart + 1) kDSlice)
  const T* sKw = sK + 16 * slab * kPitch;
  const T* sVw = sV + 16 * slab * kPitch;
  // This thread's accumulator rows are keys (16 slab + g) and (16 slab + g + 8), its columns are
  // query rows: the products below are transposed (S^T = K Q^T) so that a warp owns its keys.
  const int key_lo = 16 * slab + g;
  const int key_hi = key_lo + 8;

  const float scale_log2 = p.scale * attn::kLog2e;
  float acc_dk[kNAcc][4];
  float acc_dv[kNAcc][4];
  attn::zero_acc(acc_dk);
  attn::zero_acc(acc_dv);

  const RowRange rows = rows_for_keys(sc.rule, n0, n1);
  const int64_t mt_begin = rows.lo / kBlockM;
  const int64_t mt_end = rows.hi > rows.lo ? ceil_div<int64_t>(rows.hi, kBlockM) : mt_begin;

  for (int gi = 0; gi < group; ++gi) {
    const int h = hk * group + gi;
    const T* q_seq = static_cast<const T*>(p.q) + b * p.q_batch_stride +
                     sc.q_start * p.q_row_stride + int64_t(h) * p.q_head_stride;
    const T* do_seq = static_cast<const T*>(p.dout) + b * p.do_batch_stride +
                      sc.q_start * p.do_row_stride + int64_t(h) * p.do_head_stride;
    const float* lse_seq = p.lse + b * p.lse_batch_stride + int64_t(h) * p.lse_head_stride + sc.q_start;
    const float* delta_seq = delta.data + delta.index(b, h, sc.q_start);

    for (int64_t mt = mt_begin; mt < mt_end; ++mt) {
      const int64_t m0 = mt * kBlockM;
      const int64_t m1 = imin(m0 + kBlockM, sc.len_q);
      const TileKind kind = classify_tile(sc.rule, m0, m1, n0, n1);
      if (kind == TileKind::kSkip) continue;
      // Ragged tiles carry zero-filled rows / keys; the mask also drops them (with their lse
      // offset of +inf they would contribute 0 anyway).
      const bool need_mask =
          kind == TileKind::kPartial || m0 + kBlockM > sc.len_q || n0 + kBlockN > sc.len_k;

      __syncthreads();  // every warp is done with the previous Q/dO tile (and K/V are loaded)
      attn::load_rows<T, kBlockM, kHeadDim, Tr::kThreads>(sQ, kPitch, q_seq + m0 * p.q_row_stride,
                                                          p.q_row_stride, m1 - m0,
                                                          vec_mask & attn::kVecQ);
      attn::load_rows<T, kBlockM, kHeadDim, Tr::kThreads>(sdO, kPitch,
                                                          do_seq + m0 * p.do_row_stride,
                                                          p.do_row_stride, m1 - m0,
                                                          vec_mask & attn::kVecDO);
      for (int r = threadIdx.x; r < kBlockM; r += Tr::kThreads) {
        const bool in = m0 + r < sc.len_q;
        sLse[r] = in ? lse_offset(lse_seq[m0 + r]) : INFINITY;
        sDelta[r] = in ? delta_seq[m0 + r] : 0.0f;
        if (need_mask) {
          // key_end = -1: a row past the sequence sees no key.
          sMask[r] = in ? attn::row_tile_mask(sc.rule, m0 + r, n0, kBlockN)
                        : attn::RowTileMask{-1, 0, 0};
        }
      }
      __syncthreads();

      float s[kNS][4];
      attn::zero_acc(s);
      attn::warp_gemm_nt<T, kNS, kHeadDim>(s, sKw, kPitch, sQ, kPitch);
      float dp[kNS][4];
      attn::zero_acc(dp);
      attn::warp_gemm_nt<T, kNS, kHeadDim>(dp, sVw, kPitch, sdO, kPitch);

      // P^T and dS^T = P^T * (dP^T - delta); entry (key, query row c).
#pragma unroll
      for (int j = 0; j < kNS; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int c = 8 * j + 2 * t + (e & 1);
          float pr = exp2f(s[j][e] * scale_log2 - sLse[c]);
          if (need_mask && !sMask[c].visible(e < 2 ? key_lo : key_hi)) pr = 0.0f;
          s[j][e] = pr;
          dp[j][e] = pr * (dp[j][e] - sDelta[c]);
        }
      }

      attn::warp_gemm_rn<T, kNAcc, kBlockM / 16>(acc_dv, s, sdO + dpart * kDSlice, kPitch);
      attn::warp_gemm_rn<T, kNAcc, kBlockM / 16>(acc_dk, dp, sQ + dpart * kDSlice, kPitch);
    }
  }

  // All reads of sK/sV (and of the first K/V load, when no query tile ran) are done: stage dK, dV.
  __syncthreads();
  attn::acc_to_smem<T, kNAcc>(sK + 16 * slab * kPitch + dpart * kDSlice, kPitch, acc_dk, p.scale,
                              p.scale);
  attn::acc_to_smem<T, kNAcc>(sV + 16 * slab * kPitch + dpart * kDSlice, kPitch, acc_dv, 1.0f, 1.0f);
  __syncthreads();  // rows are written by kSplitD warps and stored by all threads

  T* dk_tile = static_cast<T*>(p.dk) + b * p.dk_batch_stride + (sc.k_start + n0) * p.dk_row_stride +
               int64_t(hk) * p.dk_head_stride;
  T* dv_tile = static_cast<T*>(p.dv) + b * p.dv_batch_stride + (sc.k_start + n0) * p.dv_row_stride +
               int64_t(hk) * p.dv_head_stride;
  attn::store_rows<T, kBlockN, kHeadDim>(dk_tile, p.dk_row_stride, sK, kPitch, n1 - n0,
                                         vec_mask & attn::kVecDK, threadIdx.x, Tr::kThreads);
  attn::store_rows<T, kBlockN, kHeadDim>(dv_tile, p.dv_row_stride, sV, kPitch, n1 - n0,
                                         vec_mask & attn::kVecDV, threadIdx.x, Tr::kThreads);
}

// ---- 3. dQ -------------------------------------------------------------------------------------

template <typename T, int kHeadDim>
struct BwdQTraits {
  static constexpr int kBlockM = 64;  // 4 warps x 16 query rows
  // dQ takes kHeadDim / 2 registers per thread, S and dP kBlockN / 2 each: hd256 halves the keys.
  static constexpr int kBlockN = kHeadDim <= 128 ? 64 : 32;
  static constexpr int kWarps = kBlockM / 16;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kPitch = attn::smem_pitch<T, kHeadDim>();
  static constexpr size_t kSmemBytes = size_t(2 * kBlockM + 2 * kBlockN) * kPitch * sizeof(T);
};

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(BwdQTraits<T, kHeadDim>::kThreads)
    attention_bwd_dq_kernel(const AttnBwdParams p, const DeltaBuf delta, const uint32_t vec_mask) {
  using Tr = BwdQTraits<T, kHeadDim>;
  constexpr int kBlockM = Tr::kBlockM;
  constexpr int kBlockN = Tr::kBlockN;
  constexpr int kPitch = Tr::kPitch;
  constexpr int kNS = kBlockN / 8;
  constexpr int kNQ = kHeadDim / 8;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // (kBlockM, kPitch), reused to stage dQ
  T* sdO = sQ + kBlockM * kPitch;          // (kBlockM, kPitch)
  T* sK = sdO + kBlockM * kPitch;          // (kBlockN, kPitch)
  T* sV = sK + kBlockN * kPitch;           // (kBlockN, kPitch)

  const int b = blockIdx.z;
  const int h = blockIdx.y;
  const SeqCoords sc = attn::seq_coords(p, b);
  const int64_t m0 = int64_t(blockIdx.x) * kBlockM;
  if (m0 >= sc.len_q) return;  // uniform over the CTA, before any barrier
  const int64_t m1 = imin(m0 + kBlockM, sc.len_q);
  const int hk = h / (p.num_heads_q / p.num_heads_k);

  const T* q_tile = static_cast<const T*>(p.q) + b * p.q_batch_stride +
                    (sc.q_start + m0) * p.q_row_stride + int64_t(h) * p.q_head_stride;
  const T* do_tile = static_cast<const T*>(p.dout) + b * p.do_batch_stride +
                     (sc.q_start + m0) * p.do_row_stride + int64_t(h) * p.do_head_stride;
  const T* k_seq = static_cast<const T*>(p.k) + b * p.k_batch_stride + sc.k_start * p.k_row_stride +
                   int64_t(hk) * p.k_head_stride;
  const T* v_seq = static_cast<const T*>(p.v) + b * p.v_batch_stride + sc.k_start * p.v_row_stride +
                   int64_t(hk) * p.v_head_stride;
  attn::load_rows<T, kBlockM, kHeadDim, Tr::kThreads>(sQ, kPitch, q_tile, p.q_row_stride, m1 - m0,
                                                      vec_mask & attn::kVecQ);
  attn::load_rows<T, kBlockM, kHeadDim, Tr::kThreads>(sdO, kPitch, do_tile, p.do_row_stride,
                                                      m1 - m0, vec_mask & attn::kVecDO);

  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int64_t row_lo = m0 + 16 * warp + g;
  const int64_t row_hi = row_lo + 8;
  const T* sQw = sQ + 16 * warp * kPitch;
  const T* sdOw = sdO + 16 * warp * kPitch;

  // Per-row constants; rows past the sequence get offset +inf (P = 0) and are never stored.
  float offset[2];
  float row_delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t row = r == 0 ? row_lo : row_hi;
    const bool in = row < sc.len_q;
    offset[r] = in ? lse_offset(p.lse[b * p.lse_batch_stride + int64_t(h) * p.lse_head_stride +
                                      sc.q_start + row])
                   : INFINITY;
    row_delta[r] = in ? delta.data[delta.index(b, h, sc.q_start + row)] : 0.0f;
  }

  const float scale_log2 = p.scale * attn::kLog2e;
  float acc_dq[kNQ][4];
  attn::zero_acc(acc_dq);

  const attn::KeyTileWalk walk = attn::key_tile_walk(sc.rule, m0, m1, kBlockN);
  for (int64_t it = 0; it < walk.count; ++it) {
    const int64_t j0 = walk.tile(it) * kBlockN;
    const int64_t j1 = imin(j0 + kBlockN, sc.len_k);
    const TileKind kind = classify_tile(sc.rule, m0, m1, j0, j1);
    if (kind == TileKind::kSkip) continue;
    const bool need_mask = kind == TileKind::kPartial || j0 + kBlockN > sc.len_k;

    __syncthreads();  // every warp is done with the previous K/V tile (and sQ/sdO are loaded)
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
    float dp[kNS][4];
    attn::zero_acc(dp);
    attn::warp_gemm_nt<T, kNS, kHeadDim>(dp, sdOw, kPitch, sV, kPitch);

    attn::RowTileMask mask[2];
    if (need_mask) {
      mask[0] = attn::row_tile_mask(sc.rule, row_lo, j0, kBlockN);
      mask[1] = attn::row_tile_mask(sc.rule, row_hi, j0, kBlockN);
    }
#pragma unroll
    for (int j = 0; j < kNS; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float pr = exp2f(s[j][e] * scale_log2 - offset[e >> 1]);
        if (need_mask && !mask[e >> 1].visible(8 * j + 2 * t + (e & 1))) pr = 0.0f;
        dp[j][e] = pr * (dp[j][e] - row_delta[e >> 1]);
      }
    }

    attn::warp_gemm_rn<T, kNQ, kBlockN / 16>(acc_dq, dp, sK, kPitch);
  }

  // Every warp is past its last read of sK and every thread's part of the sQ load is done.
  __syncthreads();
  T* sdQ = sQ + 16 * warp * kPitch;
  attn::acc_to_smem<T, kNQ>(sdQ, kPitch, acc_dq, p.scale, p.scale);
  __syncwarp();
  const int64_t w0 = m0 + 16 * warp;
  if (w0 < sc.len_q) {
    T* dq_rows = static_cast<T*>(p.dq) + b * p.dq_batch_stride +
                 (sc.q_start + w0) * p.dq_row_stride + int64_t(h) * p.dq_head_stride;
    attn::store_rows<T, 16, kHeadDim>(dq_rows, p.dq_row_stride, sdQ, kPitch, sc.len_q - w0,
                                      vec_mask & attn::kVecDQ, lane, 32);
  }
}

// ---- launcher ----------------------------------------------------------------------------------

template <typename T, int kHeadDim>
cudaError_t run_attention_bwd_mma(AttnBwdParams& p, cudaStream_t stream) {
  using TrKV = BwdKVTraits<T, kHeadDim>;
  using TrQ = BwdQTraits<T, kHeadDim>;
  const size_t es = sizeof(T);
  uint32_t vec = 0;
  if (rows_16b_aligned(p.q, es, p.q_batch_stride, p.q_row_stride, p.q_head_stride)) vec |= attn::kVecQ;
  if (rows_16b_aligned(p.k, es, p.k_batch_stride, p.k_row_stride, p.k_head_stride)) vec |= attn::kVecK;
  if (rows_16b_aligned(p.v, es, p.v_batch_stride, p.v_row_stride, p.v_head_stride)) vec |= attn::kVecV;
  if (rows_16b_aligned(p.dout, es, p.do_batch_stride, p.do_row_stride, p.do_head_stride)) {
    vec |= attn::kVecDO;
  }
  if (rows_16b_aligned(p.dq, es, p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride)) {
    vec |= attn::kVecDQ;
  }
  if (rows_16b_aligned(p.dk, es, p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride)) {
    vec |= attn::kVecDK;
  }
  if (rows_16b_aligned(p.dv, es, p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride)) {
    vec |= attn::kVecDV;
  }
  const DeltaBuf delta = delta_layout(p);
  const unsigned heads_q = static_cast<unsigned>(p.num_heads_q);
  const unsigned batch = static_cast<unsigned>(p.batch);

  if (p.seqlen_q > 0) {
    const dim3 grid(static_cast<unsigned>(ceil_div<int64_t>(p.seqlen_q, kPreWarps)), heads_q, batch);
    attention_bwd_preprocess_kernel<T, kHeadDim><<<grid, 32 * kPreWarps, 0, stream>>>(p, delta);
    FLUX_CUDA_CHECK_LAUNCH();
  }
  // dK/dV runs even when no query row exists: its CTAs then write zeros, which is the gradient.
  if (p.seqlen_k > 0) {
    auto kernel = attention_bwd_dkdv_kernel<T, kHeadDim>;
    FLUX_CUDA_CHECK(attn::set_smem_limit(kernel, TrKV::kSmemBytes));
    const dim3 grid(static_cast<unsigned>(ceil_div<int64_t>(p.seqlen_k, TrKV::kBlockN)),
                    static_cast<unsigned>(p.num_heads_k), batch);
    kernel<<<grid, TrKV::kThreads, TrKV::kSmemBytes, stream>>>(p, delta, vec);
    FLUX_CUDA_CHECK_LAUNCH();
  }
  if (p.seqlen_q > 0) {
    auto kernel = attention_bwd_dq_kernel<T, kHeadDim>;
    FLUX_CUDA_CHECK(attn::set_smem_limit(kernel, TrQ::kSmemBytes));
    const dim3 grid(static_cast<unsigned>(ceil_div<int64_t>(p.seqlen_q, TrQ::kBlockM)), heads_q,
                    batch);
    kernel<<<grid, TrQ::kThreads, TrQ::kSmemBytes, stream>>>(p, delta, vec);
    FLUX_CUDA_CHECK_LAUNCH();
  }
  return cudaSuccess;
}

// The sm_90a kernels (wgmma, TMA) when the device is a Hopper part and the inputs qualify
// (fp16 / bf16, head dim 64 / 128, 16-byte aligned rows); else the portable kernels above. The
// workspace size and the launch ask the same question, so they always agree.
bool use_sm90(const AttnBwdParams& p) {
  return sm90::bwd_supports(p) && sm90::enabled_on_current_device();
}

cudaError_t run_attention_bwd_sm90(const AttnBwdParams& p, cudaStream_t stream) {
  const bool bf16 = p.dtype == DataType::kBFloat16;
  if (p.head_dim == 64) {
    return bf16 ? sm90::run_attention_bwd_sm90<DataType::kBFloat16, 64>(p, stream)
                : sm90::run_attention_bwd_sm90<DataType::kFloat16, 64>(p, stream);
  }
  return bf16 ? sm90::run_attention_bwd_sm90<DataType::kBFloat16, 128>(p, stream)
              : sm90::run_attention_bwd_sm90<DataType::kFloat16, 128>(p, stream);
}

}  // namespace

size_t attention_bwd_workspace_bytes(const AttnBwdParams& params) {
  if (params.num_heads_q <= 0) return 0;
  if (use_sm90(params)) return sm90::bwd_workspace_bytes(params);
  const int64_t rows = delta_rows(params);
  return rows > 0 ? static_cast<size_t>(rows) * static_cast<size_t>(params.num_heads_q) * sizeof(float)
                  : 0;
}

cudaError_t run_attention_bwd(AttnBwdParams& params, cudaStream_t stream) {
  FLUX_CUDA_CHECK(attn::validate_attention_params(params));
  if (params.q == nullptr || params.k == nullptr || params.v == nullptr || params.out == nullptr ||
      params.lse == nullptr || params.dout == nullptr || params.dq == nullptr ||
      params.dk == nullptr || params.dv == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (params.batch == 0 || (params.seqlen_q == 0 && params.seqlen_k == 0)) return cudaSuccess;
  const size_t need = attention_bwd_workspace_bytes(params);
  if (need > 0 && (params.workspace == nullptr || params.workspace_bytes < need)) {
    return cudaErrorInvalidValue;
  }
  if (ceil_div<int64_t>(params.seqlen_q, kPreWarps) > int64_t(0x7fffffff) ||
      ceil_div<int64_t>(params.seqlen_k, 16) > int64_t(0x7fffffff)) {
    return cudaErrorInvalidValue;
  }
  // Kernel choice (the one place): sm90 when use_sm90, else the portable mma.sync kernels for
  // every dtype / head dim, behind the same launcher and workspace contract.
  if (use_sm90(params)) return run_attention_bwd_sm90(params, stream);
  return attn::dispatch_dtype_head_dim(params.dtype, params.head_dim, [&](auto tag, auto hd) {
    using T = typename decltype(tag)::type;
    return run_attention_bwd_mma<T, decltype(hd)::value>(params, stream);
  });
}

}  // namespace flux
