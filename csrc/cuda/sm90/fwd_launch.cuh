// Host side of the sm_90a forward: which calls it takes, TMA descriptors, grid, launch. Included
// only by the per-instantiation files under csrc/cuda/inst/.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "../cuda_utils.cuh"
#include "flux/params.h"
#include "fwd_kernel.cuh"
#include "launch_sm90.h"

namespace flux::sm90 {

template <class Cfg>
FwdArgs<Cfg> make_fwd_args(const AttnFwdParams& p) {
  using namespace cute;
  using Element = typename Cfg::Element;
  FwdArgs<Cfg> a;
  a.p = p;
  const bool varlen = p.is_varlen();
  // Varlen: one packed sequence per head, batch extent 1. A stride along an extent of 1 is never
  // used, but TMA wants every stride a non-zero multiple of 16 bytes: such strides (batch of a
  // varlen input, heads of an MQA k/v, a broadcast) become the row stride.
  a.shape_q = make_shape(int32_t(varlen ? p.total_q : p.seqlen_q), int32_t(Cfg::kHeadDim),
                         int32_t(p.num_heads_q), int32_t(varlen ? 1 : p.batch));
  a.shape_kv = make_shape(int32_t(varlen ? p.total_k : p.seqlen_k), int32_t(Cfg::kHeadDim),
                          int32_t(p.num_heads_k), int32_t(varlen ? 1 : p.batch));
  auto gmem = [&](const void* ptr, const GmemShape& shape, int64_t row, int64_t head, int64_t batch) {
    return make_tensor(make_gmem_ptr(static_cast<Element const*>(ptr)), shape,
                       make_stride(row, _1{}, get<2>(shape) == 1 ? row : head,
                                   get<3>(shape) == 1 ? row : batch));
  };
  a.tma_q = make_tma_copy(SM90_TMA_LOAD{}, gmem(p.q, a.shape_q, p.q_row_stride, p.q_head_stride, p.q_batch_stride),
                          typename Cfg::SmemLayoutQ{});
  a.tma_k = make_tma_copy(SM90_TMA_LOAD{}, gmem(p.k, a.shape_kv, p.k_row_stride, p.k_head_stride, p.k_batch_stride),
                          take<0, 2>(typename Cfg::SmemLayoutK{}));
  a.tma_v = make_tma_copy(SM90_TMA_LOAD{}, gmem(p.v, a.shape_kv, p.v_row_stride, p.v_head_stride, p.v_batch_stride),
                          take<0, 2>(typename Cfg::SmemLayoutV{}));
  return a;
}

template <typename T, int kHeadDim, bool kPingpong, int kBlockN>
cudaError_t launch_fwd(const AttnFwdParams& p, cudaStream_t stream) {
  using Cfg = FwdConfig<T, kHeadDim, kPingpong, kBlockN>;
  const FwdArgs<Cfg> args = make_fwd_args<Cfg>(p);
  constexpr auto kernel = attention_fwd_sm90_kernel<Cfg>;
  const int smem = Cfg::kSmemBytes + 1024;  // + alignment slack (see the kernel)
  FLUX_CUDA_CHECK(opt_in_shared_memory<kernel>(smem));
  const int64_t m_blocks = ceil_div<int64_t>(p.seqlen_q, Cfg::kBlockM);
  if (m_blocks > 65535) return cudaErrorInvalidValue;  // grid.y; fwd_sm90_supported rules it out
  const dim3 grid(static_cast<unsigned>(p.num_heads_q), static_cast<unsigned>(m_blocks),
                  static_cast<unsigned>(p.batch));
  kernel<<<grid, Cfg::kThreads, smem, stream>>>(args);
  FLUX_CUDA_CHECK_LAUNCH();
  return cudaSuccess;
}

template <typename T, int kHeadDim>
cudaError_t run_attention_fwd_sm90(const AttnFwdParams& p, cudaStream_t stream) {
  // FLUX_SM90_PINGPONG=0 selects the variant without warpgroup turn-taking (kept for measurement,
  // 128-key tiles only).
  if (!fwd_pingpong_enabled()) return launch_fwd<T, kHeadDim, false, 128>(p, stream);
  if constexpr (kHeadDim == 128) {
    if (fwd_block_n(p) == 176) return launch_fwd<T, kHeadDim, true, 176>(p, stream);
  }
  return launch_fwd<T, kHeadDim, true, 128>(p, stream);
}

}  // namespace flux::sm90
