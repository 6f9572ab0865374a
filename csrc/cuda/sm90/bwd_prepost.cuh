// The small kernels around the sm90 backward main loop: preprocess (delta, lse in exp2 units) and
// postprocess (fp32 dQ accumulator -> dQ). Torch-free.
#pragma once

#include "bwd_common.cuh"

namespace flux::sm90::bwd {

constexpr int kPreWarps = 8;  // rows per preprocess CTA (one warp per row)

// delta = rowsum(dO * O) - dlse and lse * log2(e) (+inf for rows that saw no key, so that
// exp2(s - it) is 0, not inf) into the tile-padded workspace rows.
template <typename T, int kHeadDim>  // T: the CuTe element type
__global__ void __launch_bounds__(32 * kPreWarps)
    attention_bwd_sm90_preprocess(const AttnBwdParams p, const Workspace ws) {
  static_assert(kHeadDim % 64 == 0, "two-element loads per lane");
  const int b = blockIdx.z;
  const int h = blockIdx.y;
  const attn::SeqCoords sc = attn::seq_coords(p, b);
  const int64_t row = int64_t(blockIdx.x) * kPreWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= sc.len_q) return;  // warp-uniform; no barrier in this kernel
  const int64_t grow = sc.q_start + row;
  const T* o = static_cast<const T*>(p.out) + b * p.o_batch_stride + grow * p.o_row_stride +
               int64_t(h) * p.o_head_stride;
  const T* d = static_cast<const T*>(p.dout) + b * p.do_batch_stride + grow * p.do_row_stride +
               int64_t(h) * p.do_head_stride;
  // Rows are 16-byte aligned (bwd_supports): each lane reads kHeadDim / 32 contiguous elements.
  constexpr int kPerLane = kHeadDim / 32;
  using Vec = cutlass::AlignedArray<T, kPerLane>;
  const Vec ov = reinterpret_cast<const Vec*>(o)[lane];
  const Vec dv = reinterpret_cast<const Vec*>(d)[lane];
  float acc = 0.0f;
#pragma unroll
  for (int c = 0; c < kPerLane; ++c) acc += float(ov[c]) * float(dv[c]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) {
    const int64_t stats = b * p.lse_batch_stride + int64_t(h) * p.lse_head_stride + grow;
    const float dl = p.dlse != nullptr ? p.dlse[stats] : 0.0f;
    const float lse = p.lse[stats];
    const int64_t idx = int64_t(h) * ws.rows + pad_start(p, sc.q_start, b) + row;
    ws.delta[idx] = acc - dl;
    ws.lse_log2[idx] = lse == -INFINITY ? INFINITY : lse * attn::kLog2e;
  }
}

// dQ = scale * dQ_accum. One CTA per (query tile, q head, sequence), 256 threads: thread t reads
// the values the consumer thread t stored (bwd_consumer.cuh, "dQ -> this WG's smem buffer") and
// finds their coordinates from the same TiledMma partition.
template <class Tr>
__global__ void __launch_bounds__(Tr::kMmaThreads)
    attention_bwd_sm90_postprocess(const AttnBwdParams p, const Workspace ws) {
  using Element = typename Tr::Element;
  constexpr int kBlockM = Tr::kBlockM;
  constexpr int kHeadDim = Tr::kHeadDim;
  const int b = blockIdx.z;
  const int h = blockIdx.y;
  const attn::SeqCoords sc = attn::seq_coords(p, b);
  const int64_t m0 = int64_t(blockIdx.x) * kBlockM;
  if (m0 >= sc.len_q) return;
  const int tid = threadIdx.x;
  const int wg = tid / 128;
  const int tid_wg = tid % 128;
  const int64_t row0 = pad_start(p, sc.q_start, b) + m0;
  const float4* g = reinterpret_cast<const float4*>(
                        ws.dq_accum + (int64_t(h) * ws.rows + row0) * kHeadDim + wg * Tr::kdQPerWG) +
                    tid_wg;

  typename Tr::TiledMmadQ mma_dq;
  Tensor cdQ = make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{});
  Tensor tdQcdQ = mma_dq.get_thread_slice(tid).partition_C(cdQ);  // ((2,2,V),1,1) of (row, d)
  static_assert(decltype(size(tdQcdQ))::value == Tr::kdQPerThread, "dQ fragment size");

  using T2 = cutlass::Array<Element, 2>;
  Element* dq = static_cast<Element*>(p.dq) + b * p.dq_batch_stride + int64_t(h) * p.dq_head_stride;
  const float scale = p.scale;
#pragma unroll
  for (int v = 0; v < Tr::kdQPerThread / 4; ++v) {
    const float4 x = g[v * 128];
    const float vals[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
    for (int e = 0; e < 4; e += 2) {
      const int i = 4 * v + e;
      const int r = get<0>(tdQcdQ(i));
      const int c = get<1>(tdQcdQ(i));  // element i + 1 is (r, c + 1)
      if (m0 + r < sc.len_q) {
        T2 out;
        out[0] = Element(vals[e] * scale);
        out[1] = Element(vals[e + 1] * scale);
        *reinterpret_cast<T2*>(dq + (sc.q_start + m0 + r) * p.dq_row_stride + c) = out;
      }
    }
  }
}

}  // namespace flux::sm90::bwd
