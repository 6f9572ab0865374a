// Device helpers of the sm90 attention backward: kernel params, the per-CTA schedule shared by the
// three roles, accumulator layout views, wgmma issue, bulk reduce. Torch-free.
#pragma once

#include <cstdint>

#include <cute/tensor.hpp>
#include <cutlass/numeric_conversion.h>

#include "../attention_common.cuh"
#include "bwd_traits.cuh"
#include "bwd_workspace.cuh"
#include "flux/streaming.h"

namespace flux::sm90::bwd {

using namespace cute;

template <class Tr>
struct KernelParams {
  AttnBwdParams p;  // pointers, strides, sizes, rule (scale, causal, streaming pattern, ...)
  Workspace ws;
  typename Tr::TmaQ tma_q, tma_do;
  typename Tr::TmaK tma_k, tma_v;
  typename Tr::ShapeQKV shape_q, shape_k;  // (rows, D, heads, batch) of the TMA coordinate tensors
  float scale_log2;                        // softmax scale * log2(e)
  int hb_count;                            // kv heads * batch: blockIdx.x = n_block * hb_count + b * Hkv + hk
};

// Which CTA this is, and the query tiles it visits. Every role (producer, dQ writer, consumers)
// walks the same list: for each q head of the GQA group, the query tiles [mt_begin, mt_end) whose
// rows may see a key of the block, from streaming.h's column view. Inside that range no tile is
// kSkip (the rows seeing a key tile form one interval, and every row of it sees a key of the tile),
// so the list needs no per-tile test (checked against brute force over random rules and lengths in
// development); the consumers decide per tile whether the per-element mask is needed.
struct CtaWork {
  int b, hk, n_block;
  int64_t n0, n1;  // keys [n0, n1) of this CTA, sequence coordinates
  int64_t mt_begin, mt_end;
  int group;       // q heads per kv head
  attn::SeqCoords sc;
  int64_t pad0;    // padded row of the sequence's first query (bwd_workspace.cuh)
};

template <int kBlockM, int kBlockN>
__device__ __forceinline__ CtaWork make_cta_work(const AttnBwdParams& p, int hb_count) {
  CtaWork w;
  w.n_block = static_cast<int>(blockIdx.x / hb_count);
  const int rest = static_cast<int>(blockIdx.x % hb_count);
  w.hk = rest % p.num_heads_k;
  w.b = rest / p.num_heads_k;
  w.sc = attn::seq_coords(p, w.b);
  w.group = p.num_heads_q / p.num_heads_k;
  w.n0 = int64_t(w.n_block) * kBlockN;
  w.n1 = imin(w.n0 + kBlockN, w.sc.len_k);
  w.pad0 = pad_start(p, w.sc.q_start, w.b);
  w.mt_begin = w.mt_end = 0;
  if (w.n0 < w.sc.len_k) {
    const RowRange rows = rows_for_keys(w.sc.rule, w.n0, w.n1);
    if (rows.hi > rows.lo) {
      w.mt_begin = rows.lo / kBlockM;
      w.mt_end = ceil_div<int64_t>(rows.hi, kBlockM);
    }
  }
  return w;
}

// ---- accumulator layout views ----------------------------------------------------------------
// A wgmma accumulator fragment has layout ((2, 2, V), MMA_M, MMA_N): mode 0.0 = two adjacent
// columns, 0.1 = rows r and r + 8, 0.2 = V column blocks of 8.

// (nrow = (2, MMA_M), ncol = (2, V, MMA_N)): index by (row, column) of the thread's elements.
template <class Layout>
CUTE_HOST_DEVICE constexpr auto acc_rowcol(Layout l) {
  static_assert(decltype(rank<0>(l))::value == 3 && decltype(size<0, 0>(l))::value == 2 &&
                decltype(size<0, 1>(l))::value == 2, "expects a wgmma accumulator layout");
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)),
                     make_layout(get<0, 0>(l), get<0, 2>(l), get<2>(l)));
}

// The accumulator of a (M x N) product reread as the register A operand of a (M x K = N) product:
// ((2, 2, 2), MMA_M, (V / 2, MMA_N)). Columns 16k..16k+15 of the accumulator (blocks 2k, 2k+1) are
// exactly the k-th 16-wide A fragment (PTX ISA, wgmma register fragments). Checked against CuTe's
// own A partition in tests/cuda/sm90_bwd_layouts.cu.
template <class Layout>
CUTE_HOST_DEVICE constexpr auto acc_as_a_operand(Layout l) {
  auto v = logical_divide(get<0>(l), Shape<Underscore, Underscore, _2>{});  // (2, 2, (2, V / 2))
  return make_layout(make_layout(get<0>(v), get<1>(v), get<2, 0>(v)), get<1>(l),
                     make_layout(get<2, 1>(v), get<2>(l)));
}

// fp32 fragment -> Element fragment of the same layout (round to nearest even).
template <class To, class Engine, class Layout>
CUTE_DEVICE auto convert_fragment(Tensor<Engine, Layout> const& src) {
  Tensor dst = make_tensor_like<To>(src);
  constexpr int kN = decltype(size(src))::value;
  cutlass::NumericArrayConverter<To, float, kN> convert;
  *reinterpret_cast<cutlass::Array<To, kN>*>(dst.data()) =
      convert(*reinterpret_cast<const cutlass::Array<float, kN>*>(src.data()));
  return dst;
}

// ---- wgmma issue ---------------------------------------------------------------------------------
// C (+)= A B over the K blocks of the operands; kWait >= 0 waits until at most kWait wgmma batches
// of this warpgroup are still in flight (the one just issued counts).
template <bool kZeroInit, int kWait, class TiledMma, class TA, class TB, class TC>
CUTE_DEVICE void wg_gemm(TiledMma& mma, TA const& tA, TB const& tB, TC& tC) {
  constexpr bool kARegs = !cute::is_base_of<GMMA::DescriptorIterator, typename TiledMma::FrgTypeA>::value;
  if constexpr (kARegs) warpgroup_fence_operand(const_cast<TA&>(tA));
  warpgroup_fence_operand(tC);
  warpgroup_arrive();
  mma.accumulate_ = kZeroInit ? GMMA::ScaleOut::Zero : GMMA::ScaleOut::One;
  CUTLASS_PRAGMA_UNROLL
  for (int k = 0; k < size<2>(tA); ++k) {
    cute::gemm(mma, tA(_, _, k), tB(_, _, k), tC);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  if constexpr (kWait >= 0) warpgroup_wait<kWait>();
  warpgroup_fence_operand(tC);
  if constexpr (kARegs) warpgroup_fence_operand(const_cast<TA&>(tA));
}

// ---- bulk async (TMA engine, non-tensor) -----------------------------------------------------------

// gmem[0, bytes) += smem[0, bytes) as fp32, element-wise atomic at L2. 16-byte aligned, bytes % 16 == 0.
CUTE_DEVICE void bulk_reduce_add_f32(float* gmem, const float* smem, uint32_t bytes) {
  const uint32_t s = cast_smem_ptr_to_uint(smem);
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n"
               :: "l"(gmem), "r"(s), "r"(bytes) : "memory");
}
CUTE_DEVICE void bulk_commit_group() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// The smem sources of every committed bulk group have been read (they may be overwritten).
CUTE_DEVICE void bulk_wait_read_all() { asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory"); }
// Every committed bulk group has completed, its global writes performed.
CUTE_DEVICE void bulk_wait_all() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }

// Deterministic dQ: per-tile counters of finished adds.
CUTE_DEVICE int ld_acquire_gpu(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}
CUTE_DEVICE void red_release_gpu_add(int* p, int v) {
  asm volatile("red.release.gpu.global.add.s32 [%0], %1;\n" :: "l"(p), "r"(v) : "memory");
}
// Orders global accesses of the async proxy (bulk reduce) with the generic proxy (the counters).
CUTE_DEVICE void fence_proxy_async_global() { asm volatile("fence.proxy.async.global;\n" ::: "memory"); }

}  // namespace flux::sm90::bwd
