// Producer warpgroup of the sm90 attention backward: the TMA load warp and the dQ writer warp.
// Torch-free.
#pragma once

#include "bwd_common.cuh"

namespace flux::sm90::bwd {

// Warp 0, one thread: K and V of the block once, then per (q head, query tile) the Q tile with its
// lse tile and the dO tile with its delta tile, into the kStages-deep pipelines.
template <class Tr>
CUTE_DEVICE void load_warp(const KernelParams<Tr>& P, typename Tr::SharedStorage& ss,
                           typename Tr::Pipeline& pipe_q, typename Tr::Pipeline& pipe_do,
                           const CtaWork& w) {
  constexpr int kBlockM = Tr::kBlockM;
  constexpr int kBlockN = Tr::kBlockN;
  constexpr int kHeadDim = Tr::kHeadDim;
  const AttnBwdParams& p = P.p;

  Tensor sQ = make_tensor(make_smem_ptr(ss.smem_q), typename Tr::SmemLayoutQ{});    // (M,D,PIPE)
  Tensor sdO = make_tensor(make_smem_ptr(ss.smem_do), typename Tr::SmemLayoutdO{});  // (M,D,PIPE)
  Tensor sK = make_tensor(make_smem_ptr(ss.smem_k), typename Tr::SmemLayoutK{});     // (N,D)
  Tensor sV = make_tensor(make_smem_ptr(ss.smem_v), typename Tr::SmemLayoutV{});     // (N,D)

  // Varlen tensors are one batch of packed rows: the sequence's rows start at q_start / k_start.
  const int bq = p.cu_seqlens_q != nullptr ? 0 : w.b;
  const int bk = p.cu_seqlens_k != nullptr ? 0 : w.b;
  const int q_row0 = static_cast<int>(w.sc.q_start);
  const int k_row0 = static_cast<int>(w.sc.k_start);

  {
    Tensor mK = P.tma_k.get_tma_tensor(P.shape_k)(_, _, w.hk, bk);  // (rows_k,D)
    Tensor mV = P.tma_v.get_tma_tensor(P.shape_k)(_, _, w.hk, bk);  // (rows_k,D)
    Tensor gK = local_tile(domain_offset(make_coord(k_row0, _0{}), mK),
                           Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(w.n_block, _0{}));  // (N,D)
    Tensor gV = local_tile(domain_offset(make_coord(k_row0, _0{}), mV),
                           Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(w.n_block, _0{}));  // (N,D)
    auto tma_k = P.tma_k.get_slice(_0{});
    auto tma_v = P.tma_v.get_slice(_0{});
    auto& bar = reinterpret_cast<uint64_t&>(ss.barrier_kv);
    ss.barrier_kv.arrive_and_expect_tx(2 * Tr::kTmaBytesK);
    copy(P.tma_k.with(bar), tma_k.partition_S(gK), tma_k.partition_D(sK));
    copy(P.tma_v.with(bar), tma_v.partition_S(gV), tma_v.partition_D(sV));
  }

  auto tma_q = P.tma_q.get_slice(_0{});
  auto tma_do = P.tma_do.get_slice(_0{});
  Tensor tQsQ = tma_q.partition_D(sQ);     // (TMA,TMA_M,TMA_D,PIPE)
  Tensor tdOsdO = tma_do.partition_D(sdO);  // (TMA,TMA_M,TMA_D,PIPE)
  typename Tr::PipelineState wr = cutlass::make_producer_start_state<typename Tr::Pipeline>();
  for (int gi = 0; gi < w.group; ++gi) {
    const int h = w.hk * w.group + gi;
    Tensor mQ = P.tma_q.get_tma_tensor(P.shape_q)(_, _, h, bq);     // (rows_q,D)
    Tensor mdO = P.tma_do.get_tma_tensor(P.shape_q)(_, _, h, bq);   // (rows_q,D)
    Tensor gQ = local_tile(domain_offset(make_coord(q_row0, _0{}), mQ),
                           Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(_, _0{}));   // (M,D,m)
    Tensor gdO = local_tile(domain_offset(make_coord(q_row0, _0{}), mdO),
                            Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(_, _0{}));  // (M,D,m)
    Tensor tQgQ = tma_q.partition_S(gQ);      // (TMA,TMA_M,TMA_D,m)
    Tensor tdOgdO = tma_do.partition_S(gdO);  // (TMA,TMA_M,TMA_D,m)
    const int64_t stats_row0 = int64_t(h) * P.ws.rows + w.pad0;
    for (int64_t mt = w.mt_begin; mt < w.mt_end; ++mt) {
      const int m = static_cast<int>(mt);
      const int64_t stats = stats_row0 + mt * kBlockM;
      pipe_q.producer_acquire(wr);
      uint64_t* bar_q = pipe_q.producer_get_barrier(wr);
      copy(P.tma_q.with(*bar_q, 0, TMA::CacheHintSm90::EVICT_LAST), tQgQ(_, _, _, m),
           tQsQ(_, _, _, wr.index()));
      SM90_BULK_COPY_G2S::copy(P.ws.lse_log2 + stats, bar_q, ss.smem_lse + wr.index() * kBlockM,
                               Tr::kBytesRowStats);
      pipe_do.producer_acquire(wr);
      uint64_t* bar_do = pipe_do.producer_get_barrier(wr);
      copy(P.tma_do.with(*bar_do, 0, TMA::CacheHintSm90::EVICT_LAST), tdOgdO(_, _, _, m),
           tdOsdO(_, _, _, wr.index()));
      SM90_BULK_COPY_G2S::copy(P.ws.delta + stats, bar_do, ss.smem_delta + wr.index() * kBlockM,
                               Tr::kBytesRowStats);
      ++wr;
    }
  }
}

// Warp 1: for every (q head, query tile), waits for each consumer WG's half of the dQ tile in
// smem, adds it into the fp32 accumulator with one bulk reduce, and hands the buffer back.
// Deterministic mode orders the adds of a tile by key block: the CTA whose key block is the r-th
// one the tile visits (streaming.h's row view, attn::key_tile_walk) waits until r adds are done.
// Lower key blocks have lower blockIdx (n_block is the slowest index), so they were scheduled
// first and the wait cannot deadlock.
template <class Tr>
CUTE_DEVICE void dq_writer_warp(const KernelParams<Tr>& P, typename Tr::SharedStorage& ss,
                                const CtaWork& w) {
  constexpr int kBlockM = Tr::kBlockM;
  constexpr int kHeadDim = Tr::kHeadDim;
  constexpr uint32_t kNamed = Tr::kMmaThreads / Tr::kMmaWarpGroups + Tr::kDqWriterThreads;
  const bool lane0 = (threadIdx.x % 32) == 0;
  const bool deterministic = P.p.deterministic;
  const int64_t sems_per_head = P.ws.rows / kMinBlockM;
  for (int gi = 0; gi < w.group; ++gi) {
    const int h = w.hk * w.group + gi;
    for (int64_t mt = w.mt_begin; mt < w.mt_end; ++mt) {
      const int64_t row = w.pad0 + mt * kBlockM;  // padded row of the tile's first query
      float* g_tile = P.ws.dq_accum + (int64_t(h) * P.ws.rows + row) * kHeadDim;
      for (int wg = 0; wg < Tr::kMmaWarpGroups; ++wg) {
        cutlass::arch::NamedBarrier::arrive(kNamed, uint32_t(BwdBarrier::kdQEmpty0) + wg);
      }
      int* sem = P.ws.dq_sem + int64_t(h) * sems_per_head + row / kBlockM;
      if (deterministic) {
        const int64_t m0 = mt * kBlockM;
        const attn::KeyTileWalk walk =
            attn::key_tile_walk(w.sc.rule, m0, imin(m0 + kBlockM, w.sc.len_q), Tr::kBlockN);
        const int rank = static_cast<int>(w.n_block < walk.sink_n
                                              ? w.n_block
                                              : walk.sink_n + (w.n_block - walk.local_0));
        if (lane0) {
          while (ld_acquire_gpu(sem) != rank) __nanosleep(32);
          fence_proxy_async_global();
        }
        __syncwarp();
      }
      for (int wg = 0; wg < Tr::kMmaWarpGroups; ++wg) {
        cutlass::arch::NamedBarrier::sync(kNamed, uint32_t(BwdBarrier::kdQFull0) + wg);
        if (lane0) {
          bulk_reduce_add_f32(g_tile + wg * Tr::kdQPerWG, ss.smem_dq + wg * Tr::kdQPerWG,
                              Tr::kdQPerWG * sizeof(float));
          bulk_commit_group();
        }
      }
      if (lane0) {
        if (deterministic) {
          bulk_wait_all();
          fence_proxy_async_global();
          red_release_gpu_add(sem, 1);
        } else {
          bulk_wait_read_all();
        }
      }
      __syncwarp();
    }
  }
  if (lane0) bulk_wait_all();
}

}  // namespace flux::sm90::bwd
