// Entry point of the sm90 attention backward main kernel and its host launcher (all four kernels
// of one call). Included by the per-instantiation files in csrc/cuda/inst/. Torch-free.
#pragma once

#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/device_kernel.h>  // CUTLASS_GRID_CONSTANT

#include "../cuda_utils.cuh"
#include "bwd_consumer.cuh"
#include "bwd_prepost.cuh"
#include "bwd_producer.cuh"
#include "bwd_sm90.h"

namespace flux::sm90::bwd {

template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads, 1)
    attention_bwd_sm90_kernel(CUTLASS_GRID_CONSTANT const KernelParams<Tr> P) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ char smem_raw[];
  auto& ss = *reinterpret_cast<typename Tr::SharedStorage*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));

  const CtaWork w = make_cta_work<Tr::kBlockM, Tr::kBlockN>(P.p, P.hb_count);
  if (w.n0 >= w.sc.len_k) return;  // a key block past its sequence: nothing to do (CTA-uniform)

  const int warp = cutlass::canonical_warp_idx_sync();
  const int warp_group = cutlass::canonical_warp_group_idx();
  if (warp == 0 && cute::elect_one_sync()) {
    cute::prefetch_tma_descriptor(P.tma_q.get_tma_descriptor());
    cute::prefetch_tma_descriptor(P.tma_do.get_tma_descriptor());
    cute::prefetch_tma_descriptor(P.tma_k.get_tma_descriptor());
    cute::prefetch_tma_descriptor(P.tma_v.get_tma_descriptor());
    ss.barrier_kv.init(1);
  }
  using Pipeline = typename Tr::Pipeline;
  typename Pipeline::Params pp;
  pp.transaction_bytes = Tr::kTmaBytesQ + Tr::kBytesRowStats;  // a Q (dO) tile + its lse (delta) tile
  pp.role = warp_group == 0 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  pp.is_leader = threadIdx.x == 0;  // the one thread that issues the loads
  pp.num_consumers = Tr::kMmaThreads;
  Pipeline pipe_q(ss.pipeline_q, pp, Shape<_1, _1, _1>{});   // warp 0 initialises the barriers
  Pipeline pipe_do(ss.pipeline_do, pp, Shape<_1, _1, _1>{});
  cutlass::arch::fence_barrier_init();
  __syncthreads();

  if (warp_group == 0) {
    cutlass::arch::warpgroup_reg_dealloc<Tr::kProducerRegs>();
    if (warp == 0) {
      if (threadIdx.x == 0) load_warp<Tr>(P, ss, pipe_q, pipe_do, w);
    } else if (warp == 1) {
      dq_writer_warp<Tr>(P, ss, w);
    }
  } else {
    cutlass::arch::warpgroup_reg_alloc<Tr::kMmaRegs>();
    consumer_warpgroups<Tr>(P, ss, pipe_q, pipe_do, w);
  }
#endif
}

// (rows, D, heads, batch) view of a [B, S, H, D] or varlen [total, H, D] tensor for TMA.
template <class Tr>
auto tma_view(const void* ptr, int64_t rows, int heads, int batch, int64_t row_stride,
              int64_t head_stride, int64_t batch_stride) {
  using Element = typename Tr::Element;
  return make_tensor(make_gmem_ptr(static_cast<const Element*>(ptr)),
                     make_shape(static_cast<int32_t>(rows), int32_t(Tr::kHeadDim), int32_t(heads),
                                int32_t(batch)),
                     make_stride(row_stride, _1{}, head_stride, batch_stride));
}

inline bool descriptor_set(const TmaDescriptor* d) {
  const unsigned char* bytes = reinterpret_cast<const unsigned char*>(d);
  for (size_t i = 0; i < sizeof(TmaDescriptor); ++i) {
    if (bytes[i] != 0) return true;
  }
  return false;
}

template <DataType kDtype, int kHeadDim>
cudaError_t launch(const AttnBwdParams& p, cudaStream_t stream) {
  using Tr = BwdTraits<kDtype, kHeadDim>;
  using Element = typename Tr::Element;
  const Workspace ws = carve_workspace(p, p.workspace);
  const WorkspaceSizes sizes = workspace_sizes(p);

  // 1. zero the dQ accumulator (and the semaphores that follow it).
  FLUX_CUDA_CHECK(cudaMemsetAsync(ws.dq_accum, 0, sizes.dq_accum + (p.deterministic ? sizes.dq_sem : 0),
                                  stream));

  // 2. delta, lse in exp2 units.
  const unsigned heads_q = static_cast<unsigned>(p.num_heads_q);
  const unsigned batch = static_cast<unsigned>(p.batch);
  if (p.seqlen_q > 0) {
    const dim3 grid(static_cast<unsigned>(flux::ceil_div<int64_t>(p.seqlen_q, kPreWarps)), heads_q, batch);
    attention_bwd_sm90_preprocess<Element, kHeadDim><<<grid, 32 * kPreWarps, 0, stream>>>(p, ws);
    FLUX_CUDA_CHECK_LAUNCH();
  }

  // 3. main kernel. TMA descriptors over the whole tensors (varlen: one batch of packed rows).
  const bool varlen = p.is_varlen();
  const int64_t rows_q = varlen ? p.total_q : p.seqlen_q;
  const int64_t rows_k = varlen ? p.total_k : p.seqlen_k;
  const int batch_t = varlen ? 1 : p.batch;
  KernelParams<Tr> kp{
      p, ws,
      make_tma_copy(SM90_TMA_LOAD{},
                    tma_view<Tr>(p.q, rows_q, p.num_heads_q, batch_t, p.q_row_stride, p.q_head_stride,
                                 varlen ? 0 : p.q_batch_stride),
                    take<0, 2>(typename Tr::SmemLayoutQ{})),
      make_tma_copy(SM90_TMA_LOAD{},
                    tma_view<Tr>(p.dout, rows_q, p.num_heads_q, batch_t, p.do_row_stride,
                                 p.do_head_stride, varlen ? 0 : p.do_batch_stride),
                    take<0, 2>(typename Tr::SmemLayoutdO{})),
      make_tma_copy(SM90_TMA_LOAD{},
                    tma_view<Tr>(p.k, rows_k, p.num_heads_k, batch_t, p.k_row_stride, p.k_head_stride,
                                 varlen ? 0 : p.k_batch_stride),
                    typename Tr::SmemLayoutK{}),
      make_tma_copy(SM90_TMA_LOAD{},
                    tma_view<Tr>(p.v, rows_k, p.num_heads_k, batch_t, p.v_row_stride, p.v_head_stride,
                                 varlen ? 0 : p.v_batch_stride),
                    typename Tr::SmemLayoutV{}),
      make_shape(int32_t(rows_q), int32_t(kHeadDim), int32_t(p.num_heads_q), int32_t(batch_t)),
      make_shape(int32_t(rows_k), int32_t(kHeadDim), int32_t(p.num_heads_k), int32_t(batch_t)),
      p.scale * attn::kLog2e,
      p.num_heads_k * p.batch};
  // CuTe reports a failed cuTensorMapEncodeTiled only on stderr (and asserts in debug builds) and
  // leaves the descriptor zeroed: refuse to launch with one.
  if (!descriptor_set(kp.tma_q.get_tma_descriptor()) || !descriptor_set(kp.tma_do.get_tma_descriptor()) ||
      !descriptor_set(kp.tma_k.get_tma_descriptor()) || !descriptor_set(kp.tma_v.get_tma_descriptor())) {
    return cudaErrorInvalidValue;
  }
  const int64_t n_blocks = flux::ceil_div<int64_t>(p.seqlen_k, Tr::kBlockN);
  const int64_t ctas = n_blocks * kp.hb_count;
  if (ctas > 0) {
    auto kernel = attention_bwd_sm90_kernel<Tr>;
    FLUX_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(Tr::kSmemBytes)));
    kernel<<<static_cast<unsigned>(ctas), Tr::kThreads, Tr::kSmemBytes, stream>>>(kp);
    FLUX_CUDA_CHECK_LAUNCH();
  }

  // 4. dQ = scale * dQ_accum.
  if (p.seqlen_q > 0) {
    const dim3 grid(static_cast<unsigned>(flux::ceil_div<int64_t>(p.seqlen_q, Tr::kBlockM)), heads_q, batch);
    attention_bwd_sm90_postprocess<Tr><<<grid, Tr::kMmaThreads, 0, stream>>>(p, ws);
    FLUX_CUDA_CHECK_LAUNCH();
  }
  return cudaSuccess;
}

}  // namespace flux::sm90::bwd

namespace flux::sm90 {

template <DataType kDtype, int kHeadDim>
cudaError_t run_attention_bwd_sm90(const AttnBwdParams& p, cudaStream_t stream) {
  return bwd::launch<kDtype, kHeadDim>(p, stream);
}

}  // namespace flux::sm90
