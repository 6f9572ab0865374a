// Consumer warpgroups of the sm90 attention backward: per query tile the five products (see
// bwd_traits.cuh), the mask, the dQ hand-off, and the dK / dV epilogue. Torch-free.
#pragma once

#include "bwd_common.cuh"

namespace flux::sm90::bwd {

// Rows [valid, R) of an (R, C) smem tile set to zero (R, C static). Used on varlen tiles whose last
// rows lie past the sequence: TMA loaded other sequences' rows there (or, past the last one,
// whatever the tensor holds, NaN in the tests), and a zero probability times NaN is NaN inside a
// wgmma. Padded inputs need none of this: TMA fills rows past the tensor's extent with zeros.
template <class Element, class STensor>
CUTE_DEVICE void zero_tail_rows(STensor&& s, int valid, int tid, int nthreads) {
  constexpr int kRows = decltype(size<0>(s))::value;
  constexpr int kCols = decltype(size<1>(s))::value;
  for (int idx = tid; idx < (kRows - valid) * kCols; idx += nthreads) {
    s(valid + idx / kCols, idx % kCols) = Element(0);
  }
}

// The lse or delta values of a thread's kCols query columns (column ni is query
// q_base + 8 (ni / 2) + ni % 2, shared by the 8 lanes of the same t = lane % 4). Holding all of them
// (16 at hd128, 32 at hd64) costs registers the S^T / dP^T / dK / dV accumulators need (hd128
// spilled inside the main loop that way), so lane (g, t) keeps only columns g + 8 i of its list
// and value ni comes by shuffle from lane (ni % 8) * 4 + t (FlashAttention-3's "ShuffleLSE").
template <int kCols>
struct RowStats {
  static constexpr bool kShuffle = kCols >= 16;
  static constexpr int kHeld = kShuffle ? kCols / 8 : kCols;
  static_assert(!kShuffle || kCols % 8 == 0, "shuffled stats: 8 lanes share a column list");
  float v[kHeld];
  int src_lane_base;

  CUTE_DEVICE RowStats(const float* smem, int q_base) {
    const int lane = threadIdx.x % 32;
    src_lane_base = lane % 4;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kHeld; ++i) {
      const int ni = kShuffle ? lane / 4 + 8 * i : i;
      v[i] = smem[q_base + 8 * (ni / 2) + ni % 2];
    }
  }
  CUTE_DEVICE float get(int ni) const {
    if constexpr (kShuffle) {
      return __shfl_sync(0xffffffffu, v[ni / 8], (ni % 8) * 4 + src_lane_base);
    } else {
      return v[ni];
    }
  }
};

template <class Tr>
CUTE_DEVICE void consumer_warpgroups(const KernelParams<Tr>& P, typename Tr::SharedStorage& ss,
                                     typename Tr::Pipeline& pipe_q, typename Tr::Pipeline& pipe_do,
                                     const CtaWork& w) {
  using Element = typename Tr::Element;
  constexpr int kBlockM = Tr::kBlockM;
  constexpr int kBlockN = Tr::kBlockN;
  constexpr int kHeadDim = Tr::kHeadDim;
  constexpr int kMmaThreads = Tr::kMmaThreads;
  constexpr uint32_t kNamed = kMmaThreads / Tr::kMmaWarpGroups + Tr::kDqWriterThreads;
  const AttnBwdParams& p = P.p;
  const int tid = threadIdx.x - (Tr::kThreads - kMmaThreads);  // 0 .. 255
  const int wg = __shfl_sync(0xffffffffu, tid / 128, 0);          // warp-uniform
  const int tid_wg = tid % 128;
  const bool varlen_q = p.cu_seqlens_q != nullptr;
  const bool varlen_k = p.cu_seqlens_k != nullptr;

  Tensor sQ = make_tensor(make_smem_ptr(ss.smem_q), typename Tr::SmemLayoutQ{});     // (M,D,PIPE)
  Tensor sdO = make_tensor(make_smem_ptr(ss.smem_do), typename Tr::SmemLayoutdO{});  // (M,D,PIPE)
  Tensor sK = make_tensor(make_smem_ptr(ss.smem_k), typename Tr::SmemLayoutK{});     // (N,D)
  Tensor sV = make_tensor(make_smem_ptr(ss.smem_v), typename Tr::SmemLayoutV{});     // (N,D)
  Tensor sdS = make_tensor(make_smem_ptr(ss.smem_ds), typename Tr::SmemLayoutdS{});  // (M,N,PIPE)
  Tensor sQt = make_tensor(make_smem_ptr(ss.smem_q), typename Tr::SmemLayoutQt{});     // (D,M,PIPE)
  Tensor sdOt = make_tensor(make_smem_ptr(ss.smem_do), typename Tr::SmemLayoutdOt{});  // (D,M,PIPE)
  Tensor sKt = make_tensor(make_smem_ptr(ss.smem_k), typename Tr::SmemLayoutKt{});     // (D,N)
  Tensor sdSt = make_tensor(make_smem_ptr(ss.smem_ds), typename Tr::SmemLayoutdSt{});  // (N,M,PIPE)

  typename Tr::TiledMmaSdP mma_sdp;
  typename Tr::TiledMmadKV mma_dkv;
  typename Tr::TiledMmadQ mma_dq;
  auto wg_sdp = mma_sdp.get_slice(wg * 128);
  auto wg_dkv = mma_dkv.get_slice(wg * 128);
  auto wg_dq = mma_dq.get_slice(wg * 128);

  // Operand descriptors (smem) of the five products.
  Tensor tSrK = wg_sdp.partition_fragment_A(sK);      // (MMA,MMA_M,MMA_K)        S^T = K Q^T
  Tensor tSrQ = wg_sdp.partition_fragment_B(sQ);      // (MMA,MMA_N,MMA_K,PIPE)
  Tensor tdPrV = wg_sdp.partition_fragment_A(sV);     // (MMA,MMA_M,MMA_K)        dP^T = V dO^T
  Tensor tdPrdO = wg_sdp.partition_fragment_B(sdO);   // (MMA,MMA_N,MMA_K,PIPE)
  Tensor tdVrdO = wg_dkv.partition_fragment_B(sdOt);  // (MMA,MMA_N,MMA_K,PIPE)   dV += P^T dO
  Tensor tdKrQ = wg_dkv.partition_fragment_B(sQt);    // (MMA,MMA_N,MMA_K,PIPE)   dK += dS^T Q
  Tensor tdQrdS = wg_dq.partition_fragment_A(sdS);    // (MMA,MMA_M,MMA_K,PIPE)   dQ = dS K
  Tensor tdQrK = wg_dq.partition_fragment_B(sKt);     // (MMA,MMA_N,MMA_K)

  // dS^T registers -> sdS (through its transposed view, so coordinates are (key, query)).
  auto r2s_ds = make_tiled_copy_C(typename Tr::SmemCopyAtomdS{}, mma_sdp);
  auto thr_r2s_ds = r2s_ds.get_thread_slice(tid);
  Tensor tdSsdS = thr_r2s_ds.partition_D(as_position_independent_swizzle_tensor(sdSt));  // (CPY,CPY_N,CPY_M,PIPE)

  // (key, query) of each S^T accumulator element of this thread, as (2 keys) x (kBlockM / 4 queries).
  Tensor cS = make_identity_tensor(Shape<Int<kBlockN>, Int<kBlockM>>{});
  Tensor tScS = mma_sdp.get_thread_slice(tid).partition_C(cS);             // ((2,2,V),1,1)
  Tensor tScS_rc = make_tensor(tScS.data(), acc_rowcol(tScS.layout()));   // (2,2V)
  static_assert(decltype(size<0>(tScS_rc))::value == 2, "two key rows per thread");
  constexpr int kCols = decltype(size<1>(tScS_rc))::value;  // kBlockM / 4 query columns
  // Column ni of the thread is query q_base + 8 (ni / 2) + ni % 2 (mode (2, V) of the rowcol view;
  // checked in tests/cuda/sm90_bwd_layouts.cu).
  const int q_base = get<1>(tScS_rc(0, 0));
  auto col_q = [&](int ni) { return q_base + 8 * (ni / 2) + ni % 2; };

  // The element-level mask in the column view: key j is seen exactly by the query rows
  // rows_for_keys(rule, j, j + 1) (streaming.h), an interval; keys past the sequence by none.
  // Per thread it is two intervals, fixed for the whole CTA.
  int key_row_lo[2], key_row_hi[2];
  CUTLASS_PRAGMA_UNROLL
  for (int mi = 0; mi < 2; ++mi) {
    const int64_t j = w.n0 + get<0>(tScS_rc(mi, 0));
    key_row_lo[mi] = key_row_hi[mi] = 0;
    if (j < w.sc.len_k) {
      const RowRange rr = rows_for_keys(w.sc.rule, j, j + 1);
      key_row_lo[mi] = static_cast<int>(rr.lo);
      key_row_hi[mi] = static_cast<int>(imax(rr.lo, rr.hi));
    }
  }

  Tensor tdKrdK = partition_fragment_C(mma_dkv, Shape<Int<kBlockN>, Int<kHeadDim>>{});  // ((2,2,V),1,1)
  Tensor tdVrdV = partition_fragment_C(mma_dkv, Shape<Int<kBlockN>, Int<kHeadDim>>{});
  clear(tdKrdK);
  clear(tdVrdV);

  ss.barrier_kv.wait(0);
  if (varlen_k && w.n0 + kBlockN > w.sc.len_k) {
    const int valid = static_cast<int>(w.sc.len_k - w.n0);
    zero_tail_rows<Element>(sK, valid, tid, kMmaThreads);
    zero_tail_rows<Element>(sV, valid, tid, kMmaThreads);
    cutlass::arch::fence_view_async_shared();
    cutlass::arch::NamedBarrier::sync(kMmaThreads, uint32_t(BwdBarrier::kZeroFill));
  }

  const float scale_log2 = P.scale_log2;
  typename Tr::PipelineState rd;
  for (int gi = 0; gi < w.group; ++gi) {
    CUTLASS_PRAGMA_NO_UNROLL
    for (int64_t mt = w.mt_begin; mt < w.mt_end; ++mt) {
      const int64_t m0 = mt * kBlockM;
      // classify_tile's kFull, per warp, from the column view: the warp's part of the tile needs no
      // mask iff the row interval of each of its keys covers all kBlockM rows. Exact (rows or keys
      // past the sequence have intervals that cannot cover), warp-uniform, and free of the 64-bit
      // divisions classify_tile does for streaming rules. (kSkip cannot occur in [mt_begin,
      // mt_end): see CtaWork.)
      const int tile_lo = static_cast<int>(m0);
      const bool rows_covered = key_row_lo[0] <= tile_lo && tile_lo + kBlockM <= key_row_hi[0] &&
                                key_row_lo[1] <= tile_lo && tile_lo + kBlockM <= key_row_hi[1];
      const bool need_mask = __any_sync(0xffffffffu, !rows_covered);
#if defined(FLUX_DEBUG)
      assert(classify_tile(w.sc.rule, m0, imin(m0 + kBlockM, w.sc.len_q), w.n0, w.n1) != TileKind::kSkip);
#endif
      const int stage = rd.index();

      pipe_q.consumer_wait(rd);
      if (varlen_q && m0 + kBlockM > w.sc.len_q) {
        pipe_do.consumer_wait(rd);
        const int valid = static_cast<int>(w.sc.len_q - m0);
        zero_tail_rows<Element>(sQ(_, _, stage), valid, tid, kMmaThreads);
        zero_tail_rows<Element>(sdO(_, _, stage), valid, tid, kMmaThreads);
        cutlass::arch::fence_view_async_shared();
        cutlass::arch::NamedBarrier::sync(kMmaThreads, uint32_t(BwdBarrier::kZeroFill));
      }

      Tensor tSrS = partition_fragment_C(mma_sdp, Shape<Int<kBlockN>, Int<kBlockM>>{});   // ((2,2,V),1,1)
      wg_gemm<true, -1>(mma_sdp, tSrK, tSrQ(_, _, _, stage), tSrS);
      Tensor tdPrdP = partition_fragment_C(mma_sdp, Shape<Int<kBlockN>, Int<kBlockM>>{});
      pipe_do.consumer_wait(rd);
      wg_gemm<true, -1>(mma_sdp, tdPrV, tdPrdO(_, _, _, stage), tdPrdP);

      // P^T = exp2(S^T scale log2 e - lse log2 e), zero where masked; overlaps the dP^T wgmma.
      warpgroup_wait<1>();
      Tensor scores = make_tensor(tSrS.data(), acc_rowcol(tSrS.layout()));  // (2 keys, kCols queries)
      Tensor dS = make_tensor(tdPrdP.data(), acc_rowcol(tdPrdP.layout()));  // (2 keys, kCols queries)
      // Visible query columns [lo, hi) of the thread's two keys, relative to the tile.
      int lo[2], span[2];
      CUTLASS_PRAGMA_UNROLL
      for (int mi = 0; mi < 2; ++mi) {
        lo[mi] = key_row_lo[mi] - static_cast<int>(m0);
        span[mi] = key_row_hi[mi] - key_row_lo[mi];
      }
      auto visible = [&](int mi, int ni) {  // one compare: q - lo in [0, span)
        return static_cast<unsigned>(col_q(ni) - lo[mi]) < static_cast<unsigned>(span[mi]);
      };
      RowStats<kCols> lse(ss.smem_lse + stage * kBlockM, q_base);
      auto probabilities = [&](auto masked) {
        CUTLASS_PRAGMA_UNROLL
        for (int ni = 0; ni < kCols; ++ni) {
          const float l = lse.get(ni);
          CUTLASS_PRAGMA_UNROLL
          for (int mi = 0; mi < 2; ++mi) {
            const float pr = exp2f(scores(mi, ni) * scale_log2 - l);
            if constexpr (decltype(masked)::value) {
              scores(mi, ni) = visible(mi, ni) ? pr : 0.0f;
            } else {
              scores(mi, ni) = pr;
            }
          }
        }
      };
      if (need_mask) probabilities(cute::true_type{}); else probabilities(cute::false_type{});

      // dS^T = P^T (dP^T - delta). Masked: a select, not a product, keeps NaN / inf of dP^T at
      // rows or keys outside the sequence out of dS.
      warpgroup_wait<0>();
      RowStats<kCols> delta(ss.smem_delta + stage * kBlockM, q_base);
      auto score_grads = [&](auto masked) {
        CUTLASS_PRAGMA_UNROLL
        for (int ni = 0; ni < kCols; ++ni) {
          const float d = delta.get(ni);
          CUTLASS_PRAGMA_UNROLL
          for (int mi = 0; mi < 2; ++mi) {
            const float ds = scores(mi, ni) * (dS(mi, ni) - d);
            if constexpr (decltype(masked)::value) {
              dS(mi, ni) = visible(mi, ni) ? ds : 0.0f;
            } else {
              dS(mi, ni) = ds;
            }
          }
        }
      };
      if (need_mask) score_grads(cute::true_type{}); else score_grads(cute::false_type{});
      Tensor rP = convert_fragment<Element>(tSrS);
      Tensor rdS = convert_fragment<Element>(tdPrdP);

      // dS -> smem for dQ (both WGs' halves are needed: barrier below). The buffer of this stage
      // was last read by the dQ product two tiles ago, which both WGs finished before they met at
      // the previous tile's kdSReady barrier.
      cute::copy(r2s_ds, thr_r2s_ds.retile_S(rdS), tdSsdS(_, _, _, stage));

      // dV += P^T dO
      Tensor tdVrP = make_tensor(rP.data(), acc_as_a_operand(tSrS.layout()));
      wg_gemm<false, -1>(mma_dkv, tdVrP, tdVrdO(_, _, _, stage), tdVrdV);

      cutlass::arch::fence_view_async_shared();
      cutlass::arch::NamedBarrier::sync(kMmaThreads, uint32_t(BwdBarrier::kdSReady));

      // dQ = dS K; waiting for all but this batch retires dV, the last reader of dO.
      Tensor tdQrdQ = partition_fragment_C(mma_dq, Shape<Int<kBlockM>, Int<kHeadDim>>{});  // ((2,2,V),1,1)
      wg_gemm<true, 1>(mma_dq, tdQrdS(_, _, _, stage), tdQrK, tdQrdQ);
      pipe_do.consumer_release(rd);

      // dK += dS^T Q; waiting for all but this batch retires dQ.
      Tensor tdKrdS = make_tensor(rdS.data(), acc_as_a_operand(tdPrdP.layout()));
      wg_gemm<false, 1>(mma_dkv, tdKrdS, tdKrQ(_, _, _, stage), tdKrdK);

      // dQ -> this WG's smem buffer, for the writer warp.
      cutlass::arch::NamedBarrier::sync(kNamed, uint32_t(BwdBarrier::kdQEmpty0) + wg);
      {
        float4* s_dq = reinterpret_cast<float4*>(ss.smem_dq + wg * Tr::kdQPerWG) + tid_wg;
        CUTLASS_PRAGMA_UNROLL
        for (int v = 0; v < Tr::kdQPerThread / 4; ++v) {
          s_dq[v * 128] = make_float4(tdQrdQ(4 * v), tdQrdQ(4 * v + 1), tdQrdQ(4 * v + 2),
                                      tdQrdQ(4 * v + 3));
        }
      }
      cutlass::arch::fence_view_async_shared();
      cutlass::arch::NamedBarrier::arrive(kNamed, uint32_t(BwdBarrier::kdQFull0) + wg);

      warpgroup_wait<0>();  // dK done: the last reader of Q
      pipe_q.consumer_release(rd);
      ++rd;
    }
  }

  // Epilogue: dK = scale * sum dS^T Q, dV; rows past the sequence are not stored (varlen: they
  // belong to the next sequence).
  Tensor cKV = make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{});
  Tensor tKVcKV = mma_dkv.get_thread_slice(tid).partition_C(cKV);  // ((2,2,V),1,1) of (key, d)
  using T2 = cutlass::Array<Element, 2>;
  const int valid_keys = static_cast<int>(imin(int64_t(kBlockN), w.sc.len_k - w.n0));
  const int64_t row0 = w.sc.k_start + w.n0;
  Element* dk = static_cast<Element*>(p.dk) + w.b * p.dk_batch_stride +
                int64_t(w.hk) * p.dk_head_stride + row0 * p.dk_row_stride;
  Element* dv = static_cast<Element*>(p.dv) + w.b * p.dv_batch_stride +
                int64_t(w.hk) * p.dv_head_stride + row0 * p.dv_row_stride;
  const float scale = p.scale;
  CUTLASS_PRAGMA_UNROLL
  for (int i = 0; i < size(tdKrdK); i += 2) {
    const int key = get<0>(tKVcKV(i));
    const int col = get<1>(tKVcKV(i));  // tKVcKV(i + 1) is (key, col + 1)
    if (key < valid_keys) {
      T2 k2, v2;
      k2[0] = Element(tdKrdK(i) * scale);
      k2[1] = Element(tdKrdK(i + 1) * scale);
      v2[0] = Element(tdVrdV(i));
      v2[1] = Element(tdVrdV(i + 1));
      *reinterpret_cast<T2*>(dk + key * p.dk_row_stride + col) = k2;
      *reinterpret_cast<T2*>(dv + key * p.dv_row_stride + col) = v2;
    }
  }
}

}  // namespace flux::sm90::bwd
