// Synchronisation primitives of the sm_90a kernels: mbarrier pipeline state, named-barrier ids and
// the warpgroup MMA issue helper. Torch-free.
#pragma once

#include <cute/tensor.hpp>
#include <cute/arch/mma_sm90_gmma.hpp>
#include <cutlass/arch/barrier.h>

namespace flux::sm90 {

// Named barriers (bar.sync / bar.arrive). Id 0 is __syncthreads; every other id is listed here and
// nowhere else, so two uses can never collide.
enum class NamedBarrierId : int {
  kEpilogue = 1,  // + consumer warpgroup index (up to 3): a warpgroup's O tile is staged in smem
  kScheduler = 4, // + consumer warpgroup index: whose turn it is to issue wgmma (pingpong)
};

__device__ __forceinline__ void named_barrier_sync(int id, int num_threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(num_threads) : "memory");
}

__device__ __forceinline__ void named_barrier_arrive(int id, int num_threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(num_threads) : "memory");
}

// Position in a ring of kStages mbarrier-guarded slots. The phase bit flips each time the ring wraps:
// a consumer waits for parity `phase` on a full barrier, a producer for parity `phase ^ 1` on an empty
// one (a fresh mbarrier counts its "previous" phase as complete, so the first lap never blocks).
template <int kStages>
struct PipeState {
  int stage = 0;
  uint32_t phase = 0;
  __device__ __forceinline__ void advance() {
    if (++stage == kStages) {
      stage = 0;
      phase ^= 1u;
    }
  }
};

__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t arrivals) {
  cutlass::arch::ClusterBarrier::init(bar, arrivals);
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  cutlass::arch::ClusterBarrier::wait(bar, parity);
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) { cutlass::arch::ClusterBarrier::arrive(bar); }
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(bar, bytes);
}

// Issues C (+)= A * B over every k-block of the operands as one wgmma batch and commits it; the
// caller decides when to wait (cute::warpgroup_wait<N>). A may live in registers (RS) or shared
// memory (SS, as descriptors). kZeroInit overwrites C instead of accumulating.
template <bool kZeroInit, class TiledMma, class TensorA, class TensorB, class TensorC>
__device__ __forceinline__ void wgmma_issue(TiledMma& mma, TensorA& tA, TensorB const& tB, TensorC& tC) {
  using namespace cute;
  // Descriptor tensors (SS operands) also count as rmem; only a real register A needs fencing.
  constexpr bool kRegA = !is_same_v<typename TensorA::iterator, GMMA::DescriptorIterator>;
  if constexpr (kRegA) warpgroup_fence_operand(tA);
  warpgroup_fence_operand(tC);
  warpgroup_arrive();
  mma.accumulate_ = kZeroInit ? GMMA::ScaleOut::Zero : GMMA::ScaleOut::One;
  CUTE_UNROLL
  for (int kb = 0; kb < size<2>(tA); ++kb) {
    cute::gemm(mma, tA(_, _, kb), tB(_, _, kb), tC);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  warpgroup_fence_operand(tC);
  if constexpr (kRegA) warpgroup_fence_operand(tA);
}

}  // namespace flux::sm90
