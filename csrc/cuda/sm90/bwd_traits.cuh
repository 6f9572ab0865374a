// Compile-time configuration of the sm90 attention backward: tile sizes, wgmma tilings, shared
// memory layouts, TMA types, named barriers and the shared-storage struct. Torch-free.
//
// One CTA = 3 warpgroups (384 threads):
//   WG0  producer: warp 0 issues the TMA loads (K, V once; Q + lse and dO + delta per query block),
//        warp 1 reduces each dQ tile into the fp32 accumulator (cp.reduce.async.bulk), warps 2-3 idle;
//   WG1, WG2  consumers ("MMA warpgroups"): WG w owns keys [64 w, 64 w + 64) of the key block for
//        S, dP, dV and dK, and half of the dQ tile.
// Per query block (kBlockM rows of one q head) the consumers compute, with S^T = K Q^T so that the
// probabilities come out key-major, ready to be the register A operand of the dV / dK products:
//   S^T  = K Q^T            SS wgmma  (kBlockN x kBlockM), WG w: keys 64w..
//   dP^T = V dO^T           SS wgmma
//   P^T  = exp2(S^T * scale log2 e - lse log2 e),  dS^T = P^T * (dP^T - delta)
//   dV  += P^T dO           RS wgmma  (kBlockN x D), A = P^T from registers
//   dK  += dS^T Q           RS wgmma
//   dQ   = dS K             SS wgmma  (kBlockM x D), A = dS stored to smem by both WGs (stmatrix .trans)
// This is the FlashAttention-3 hopper/ backward tiling (SdP_swapAB, dKV from registers, dQ from smem).
#pragma once

#include <cute/tensor.hpp>
#include <cute/arch/copy_sm90.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/numeric_types.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "flux/params.h"

namespace flux::sm90::bwd {

using namespace cute;

template <DataType> struct CuteElement;
template <> struct CuteElement<DataType::kBFloat16> { using type = cutlass::bfloat16_t; };
template <> struct CuteElement<DataType::kFloat16> { using type = cutlass::half_t; };

// Named barriers (ids relative to CUTLASS's reserved ones; 8 are available to users).
enum class BwdBarrier : uint32_t {
  kdSReady = 0,   // both consumer WGs wrote their half of dS to smem (256 threads)
  kZeroFill = 1,  // ragged varlen tile rows zeroed in smem (256 threads)
  kdQEmpty0 = 2,  // sdQ[w] may be overwritten (consumer WG w + dQ writer warp: 160 threads)
  kdQEmpty1 = 3,
  kdQFull0 = 4,   // sdQ[w] holds this query block's dQ part (160 threads)
  kdQFull1 = 5,
};

template <DataType kDtype, int kHeadDim_>
struct BwdTraits {
  using Element = typename CuteElement<kDtype>::type;
  using Accum = float;

  static constexpr int kHeadDim = kHeadDim_;
  static_assert(kHeadDim == 64 || kHeadDim == 128, "sm90 backward: head dim 64 or 128");
  static constexpr int kBlockN = 128;  // keys per CTA (two 64-row wgmma atoms, one per WG)
  // Query rows per step. hd128: S^T, dP^T (32 regs each), dK, dV (64 each) and dQ (32) fit the
  // consumers' 240 registers at 64 rows; hd64 halves dK/dV/dQ and affords 128 rows (FA3's choice).
  static constexpr int kBlockM = kHeadDim == 64 ? 128 : 64;
  static constexpr int kStages = 2;  // Q/lse, dO/delta and dS buffers: load block i+1 during block i
  static constexpr int kMmaWarpGroups = 2;
  static constexpr int kMmaThreads = kMmaWarpGroups * 128;
  static constexpr int kThreads = kMmaThreads + 128;
  // 24 * 128 + 240 * 256 = 168 * 384: the whole register file the CTA gets at launch with
  // __launch_bounds__(384, 1); setmaxnreg moves registers from the producer WG to the consumers.
  static constexpr int kProducerRegs = 24;
  static constexpr int kMmaRegs = 240;
  static_assert(kProducerRegs * 128 + kMmaRegs * kMmaThreads == 168 * kThreads, "register split");
  static constexpr int kDqWriterThreads = 32;

  using TileShapeSdP = Shape<Int<kBlockN>, Int<kBlockM>, Int<kHeadDim>>;  // (keys, queries, D)
  using TileShapedKV = Shape<Int<kBlockN>, Int<kHeadDim>, Int<kBlockM>>;  // (keys, D, queries)

  // S^T / dP^T: 2 atoms of 64 keys x kBlockM queries stacked along M (one per WG).
  using TiledMmaSdP = decltype(make_tiled_mma(
      SM90::GMMA::ss_op_selector<Element, Element, Accum, TileShapeSdP>(), Layout<Shape<_2, _1, _1>>{}));
  // dV / dK: 2 atoms of 64 keys x D, A (P^T, dS^T) from registers K-major, B (dO, Q) MN-major.
  using TiledMmadKV = decltype(make_tiled_mma(
      SM90::GMMA::rs_op_selector<Element, Element, Accum, TileShapedKV, GMMA::Major::K,
                                 GMMA::Major::MN>(),
      Layout<Shape<_2, _1, _1>>{}));
  // dQ = dS K: 64 x 64 atoms; hd64 stacks them along the queries (2 x 64 rows x 64 cols), hd128
  // along the head dim (64 rows x 2 x 64 cols): each WG always owns 64 x 64 = 32 fp32 per thread.
  using AtomLayoutdQ =
      std::conditional_t<kHeadDim == 64, Layout<Shape<_2, _1, _1>>, Layout<Shape<_1, _2, _1>>>;
  using TiledMmadQ = decltype(make_tiled_mma(
      SM90::GMMA::ss_op_selector<Element, Element, Accum, Shape<_64, _64, Int<kBlockN>>,
                                 GMMA::Major::K, GMMA::Major::MN>(),
      AtomLayoutdQ{}));
  static_assert(size(TiledMmaSdP{}) == kMmaThreads && size(TiledMmadKV{}) == kMmaThreads &&
                size(TiledMmadQ{}) == kMmaThreads, "every product spans both consumer WGs");

  // ---- shared memory ---------------------------------------------------------------------
  // One swizzle atom everywhere: 8 rows x 64 elements (128 B), 128-byte swizzle. Every tile has a
  // contiguous extent >= 64 (D or keys), which keeps TMA writes, wgmma reads and stmatrix writes
  // bank-conflict-free. A tile read both K-major and MN-major (Q, dO, K, dS) uses the same bytes
  // through a transposed view (the "t" layouts below).
  using SmemAtom = GMMA::Layout_K_SW128_Atom<Element>;
  using SmemLayoutQ = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>, Int<kStages>>{}));
  using SmemLayoutdO = SmemLayoutQ;
  using SmemLayoutK = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  using SmemLayoutV = SmemLayoutK;
  using SmemLayoutdS = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockM>, Int<kBlockN>, Int<kStages>>{}));
  // Transposed views (same bytes): (D, queries, stage), (D, keys), (keys, queries, stage).
  using SmemLayoutQt = decltype(composition(
      SmemLayoutQ{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockM>, Int<kStages>>{},
                                 Stride<Int<kBlockM>, _1, Int<kBlockM * kHeadDim>>{})));
  using SmemLayoutdOt = SmemLayoutQt;
  using SmemLayoutKt = decltype(composition(
      SmemLayoutK{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockN>>{}, Stride<Int<kBlockN>, _1>{})));
  using SmemLayoutdSt = decltype(composition(
      SmemLayoutdS{}, make_layout(Shape<Int<kBlockN>, Int<kBlockM>, Int<kStages>>{},
                                  Stride<Int<kBlockM>, _1, Int<kBlockM * kBlockN>>{})));

  // dS^T registers -> dS in smem: stmatrix .trans writes 8x8 blocks transposed, so the key-major
  // accumulator lands query-major (keys contiguous, the K-major A operand of dQ = dS K).
  static constexpr int kdSPerThread = kBlockM * kBlockN / kMmaThreads;
  static_assert(kdSPerThread % 8 == 0, "stmatrix x4 needs 8 values per thread and block");
  using SmemCopyAtomdS = Copy_Atom<SM90_U16x8_STSM_T, Element>;

  // dQ partial tile in smem, fp32, per WG: kBlockM * D / 2 floats in the order "float4 v of
  // thread t at v * 512 + 4 t": consecutive threads store consecutive 16 bytes (conflict-free), and
  // the same order is the accumulator's layout in global memory (bwd_prepost.cuh undoes it).
  static constexpr int kdQPerWG = kBlockM * kHeadDim / kMmaWarpGroups;
  static constexpr int kdQPerThread = kdQPerWG / 128;
  static_assert(kdQPerThread % 4 == 0, "dQ is stored as float4");

  struct SharedStorage {
    // 1024-byte alignment: the 128-byte swizzle repeats every 8 rows of 128 bytes, and TMA and
    // wgmma apply it to absolute shared addresses.
    alignas(1024) Element smem_k[cosize_v<SmemLayoutK>];
    alignas(1024) Element smem_v[cosize_v<SmemLayoutV>];
    alignas(1024) Element smem_q[cosize_v<SmemLayoutQ>];
    alignas(1024) Element smem_do[cosize_v<SmemLayoutdO>];
    alignas(1024) Element smem_ds[cosize_v<SmemLayoutdS>];
    alignas(128) float smem_dq[kMmaWarpGroups * kdQPerWG];
    alignas(128) float smem_lse[kStages * kBlockM];
    alignas(128) float smem_delta[kStages * kBlockM];
    alignas(16) typename cutlass::PipelineTmaAsync<kStages>::SharedStorage pipeline_q;
    alignas(16) typename cutlass::PipelineTmaAsync<kStages>::SharedStorage pipeline_do;
    alignas(16) cutlass::arch::ClusterTransactionBarrier barrier_kv;
  };
  // Dynamic shared memory: the struct plus slack to align its start to 1024 bytes.
  static constexpr size_t kSmemBytes = sizeof(SharedStorage) + 1024;
  static_assert(kSmemBytes <= 227 * 1024, "sm90 backward: shared memory over the 227 KB limit");

  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  using PipelineState = typename Pipeline::PipelineState;

  // ---- TMA ---------------------------------------------------------------------------------
  // Global tensors as (rows, D, heads, batch) with unit stride on D; varlen passes batch = 1 and
  // offsets rows by cu_seqlens on the device. TMA zero-fills rows past `rows`.
  using ShapeQKV = Shape<int32_t, int32_t, int32_t, int32_t>;
  using StrideQKV = Stride<int64_t, _1, int64_t, int64_t>;
  using TmaQ = decltype(make_tma_copy(
      SM90_TMA_LOAD{},
      make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)), ShapeQKV{}, StrideQKV{}),
      take<0, 2>(SmemLayoutQ{})));
  using TmaK = decltype(make_tma_copy(
      SM90_TMA_LOAD{},
      make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)), ShapeQKV{}, StrideQKV{}),
      SmemLayoutK{}));
  static constexpr uint32_t kTmaBytesQ = kBlockM * kHeadDim * sizeof(Element);
  static constexpr uint32_t kTmaBytesK = kBlockN * kHeadDim * sizeof(Element);
  static constexpr uint32_t kBytesRowStats = kBlockM * sizeof(float);  // one lse or delta tile
  static_assert(kBytesRowStats % 16 == 0, "bulk copies move multiples of 16 bytes");
};

}  // namespace flux::sm90::bwd
