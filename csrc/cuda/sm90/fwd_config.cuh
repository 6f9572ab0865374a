// Compile-time configuration of the sm_90a attention forward kernel: tile sizes, warp roles,
// shared-memory layouts, the two warpgroup MMAs and the TMA copy types. Torch-free; used by the
// kernel (fwd_kernel.cuh), its launcher (fwd_launch.cuh) and the host layout check.
//
// Shape of the work. One CTA computes a kBlockM x D tile of O for one (query tile, q head, sequence):
//   warpgroup 0        producer: one warp issues TMA loads of Q (once) and of K / V tiles into a
//                      kStages-deep ring of shared-memory slots, guarded by mbarriers;
//   warpgroups 1..W    consumers: each owns 64 query rows. S = Q K^T (SS wgmma), masking and online
//                      softmax in registers, O += P V (RS wgmma: P never leaves registers).
// Consumers overlap the softmax of key tile j with the P V product of tile j-1 ("intra-warpgroup
// overlap"), and optionally take turns issuing wgmma ("pingpong"), so the tensor cores stay busy
// while the other warpgroup runs exp2.
#pragma once

// The 64 x 176 wgmma of the wide key tile is one of CuTe's "extended" MMA shapes, which its headers
// declare (and its op selectors consider) only under this macro; without it the selector silently
// tiles S with 64 x 16 MMAs (11x the instructions: 0.73x cuDNN measured). It must precede every
// CuTe include of the translation unit, so this header goes first wherever it is used; the
// static_assert on the chosen MMA below catches any other order.
#ifndef CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED
#define CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED
#endif

#include <cute/tensor.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/numeric_types.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace flux::sm90 {

// The CuTe element type of a CUDA 16-bit type (binary-identical).
template <typename T> struct CuteType;
template <> struct CuteType<__nv_bfloat16> { using type = cutlass::bfloat16_t; };
template <> struct CuteType<__half> { using type = cutlass::half_t; };

// Global tensors as TMA sees them: (rows, head_dim, heads, batch). Varlen inputs are one packed
// sequence of `total` rows with batch extent 1; a CTA offsets its rows by cu_seqlens on the device.
using GmemShape = cute::Shape<int32_t, int32_t, int32_t, int32_t>;
using GmemStride = cute::Stride<int64_t, cute::_1, int64_t, int64_t>;

// kBlockN_: keys per tile, 128 or (hd128) 176. 176 (FA3's choice for dense non-causal hd128,
// dispatched by fwd_block_n) amortises each key tile's fixed cost (row max and sum shuffles, the O
// rescale, mbarrier waits, the pingpong hand-over) over 37% more columns (docs/perf_notes.md has the
// measurements). The layouts test (tests/cpp/sm90_layouts.cu) checks both widths.
template <typename T, int kHeadDim_, bool kPingpong_ = true, int kBlockN_ = 128>
struct FwdConfig {
  using Element = typename CuteType<T>::type;
  static constexpr int kHeadDim = kHeadDim_;
  static_assert(kHeadDim == 64 || kHeadDim == 128, "sm90 forward: head_dim 64 or 128");

  // hd128: 2 consumer warpgroups (128 query rows) with 2 K/V stages fill 160 KB of shared memory
  // (208 KB with 176-key tiles); a third stage would leave no room for anything else. hd64: rows
  // are cheaper in registers and each K/V byte is reused by fewer FLOPs, so 3 consumers (192 rows)
  // and 3 stages amortise loads.
  static constexpr int kNumMmaWarpgroups = kHeadDim == 64 ? 3 : 2;
  static constexpr int kBlockM = 64 * kNumMmaWarpgroups;
  static constexpr int kBlockN = kBlockN_;
  // wgmma: N of S = Q K^T a multiple of 8 up to 256, K of O = P V a multiple of 16.
  static_assert(kBlockN % 16 == 0 && kBlockN <= 256, "sm90 forward: BLK_N a multiple of 16, at most 256");
  static_assert(kBlockN == 128 || kHeadDim == 128, "sm90 forward: the wide key tile is for hd128");
  static constexpr int kStages = kHeadDim == 64 ? 3 : 2;
  static constexpr int kThreads = 128 * (kNumMmaWarpgroups + 1);
  static constexpr bool kPingpong = kPingpong_;

  // Register budget per thread after setmaxnreg: the CTA's registers at launch (168 per thread x 384
  // threads = 64512 at hd128) redistributed over the warpgroups; setmaxnreg.inc waits until
  // setmaxnreg.dec has freed enough, so the split must sum to at most 504 per thread slot (2
  // consumers) or it never fits: 32 + 2 x 240 = 512 (tried for 176-key tiles, 2026-12-03) made every
  // such call hang on the H200. 128-key tiles: 40 + 2 x 232 (the producer's 32-bit tile walk does
  // not spill at 40). 176-key tiles hold 88 S + 64 O + 44 P accumulator registers: 24 + 2 x 240
  // (FA3's split for this tile), the producer spilling a few bytes outside its loop. 3 consumers
  // (hd64): 32 + 3 x 160 = 512 on 128 x 512 = 65536 at launch (ptxas: ~500 bytes of spills).
  static constexpr int kProducerRegs = kNumMmaWarpgroups == 3 ? 32 : (kBlockN > 128 ? 24 : 40);
  static constexpr int kConsumerRegs = kNumMmaWarpgroups == 3 ? 160 : (kBlockN > 128 ? 240 : 232);
  static_assert(kNumMmaWarpgroups == 3 || kProducerRegs + 2 * kConsumerRegs <= 504,
                "sm90 forward: the setmaxnreg split must fit the registers the CTA launched with");

  // Shared memory: 128-byte swizzle, K-major (head_dim contiguous), the only layout in which both
  // TMA writes and wgmma reads are bank-conflict-free for 16-bit rows of >= 64 elements.
  using SmemAtom = cute::GMMA::Layout_K_SW128_Atom<Element>;  // (8, 64)
  using SmemLayoutQ = decltype(cute::tile_to_shape(
      SmemAtom{}, cute::Shape<cute::Int<kBlockM>, cute::Int<kHeadDim>>{}));  // (BLK_M, D)
  using SmemLayoutK = decltype(cute::tile_to_shape(
      SmemAtom{}, cute::Shape<cute::Int<kBlockN>, cute::Int<kHeadDim>, cute::Int<kStages>>{}));  // (BLK_N, D, PIPE)
  using SmemLayoutV = SmemLayoutK;
  // V read as the B operand of O = P V: (D, BLK_N, PIPE), head_dim contiguous (MN-major for wgmma).
  using SmemLayoutVt = decltype(cute::composition(
      SmemLayoutV{}, cute::make_ordered_layout(
                         cute::Shape<cute::Int<kHeadDim>, cute::Int<kBlockN>, cute::Int<kStages>>{},
                         cute::Step<cute::_2, cute::_1, cute::_3>{})));

  // One warpgroup's products: S (64 x BLK_N) = Q_w K^T, both operands from shared memory;
  // O (64 x D) += P V with P in registers (A must then be K-major, i.e. row-major P: it is).
  using TiledMmaQK = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<Element, Element, float,
                                 cute::Shape<cute::_64, cute::Int<kBlockN>, cute::Int<kHeadDim>>>()));
  static_assert(cute::size<1>(typename TiledMmaQK::AtomShape_MNK{}) == kBlockN,
                "sm90 forward: S = Q K^T must be one wgmma per k step (CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED "
                "was not defined before CuTe's first include)");
  using TiledMmaPV = decltype(cute::make_tiled_mma(
      cute::GMMA::rs_op_selector<Element, Element, float,
                                 cute::Shape<cute::_64, cute::Int<kHeadDim>, cute::Int<kBlockN>>,
                                 cute::GMMA::Major::K, cute::GMMA::Major::MN>()));

  // TMA copy types (the descriptors are built on the host in fwd_launch.cuh).
  using GmemTensor = decltype(cute::make_tensor(cute::make_gmem_ptr(static_cast<Element const*>(nullptr)),
                                                GmemShape{}, GmemStride{}));
  using TmaQ = decltype(cute::make_tma_copy(cute::SM90_TMA_LOAD{}, GmemTensor{}, SmemLayoutQ{}));
  using TmaKV = decltype(cute::make_tma_copy(
      cute::SM90_TMA_LOAD{}, GmemTensor{}, cute::take<0, 2>(SmemLayoutK{})));

  static constexpr uint32_t kBytesQ = kBlockM * kHeadDim * sizeof(Element);
  static constexpr uint32_t kBytesKV = kBlockN * kHeadDim * sizeof(Element);

  struct SharedStorage {
    // Q is also where each consumer warpgroup stages its 64 rows of O for the final store.
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutQ>> q;
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutK>> k;
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutV>> v;
    alignas(16) uint64_t bar_q;
    uint64_t bar_k_full[kStages];
    uint64_t bar_k_empty[kStages];
    uint64_t bar_v_full[kStages];
    uint64_t bar_v_empty[kStages];
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage));
  static_assert(kSmemBytes <= 227 * 1024, "sm90 forward: shared memory over the 227 KB per-CTA limit");
};

}  // namespace flux::sm90
