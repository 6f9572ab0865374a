// The sm_90a attention forward kernel (roles and tiles: fwd_config.cuh). One kernel serves dense,
// causal, streaming and per-sequence attention: which key tiles a query tile visits, and which of
// them need a per-element mask, come from flux/streaming.h at run time, per tile. A general
// block-sparse mode slots in at the same seam: KeyTileWalk (attention_common.cuh) is the only thing
// producer and consumers agree on, so a walk over a per-query-block list of key blocks (with the
// fully unmasked ones listed apart, as FlexAttention's BlockMask keeps them) replaces it without
// touching the pipeline or the math.
#pragma once

#include "fwd_config.cuh"  // first: it sets the CuTe configuration macro (see there)

#include <cmath>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include "../attention_common.cuh"
#include "flux/params.h"
#include "flux/streaming.h"
#include "flux/tile_mask_plan.h"
#include "sync.cuh"

namespace flux::sm90 {

template <class Cfg>
struct FwdArgs {
  typename Cfg::TmaQ tma_q;
  typename Cfg::TmaKV tma_k;
  typename Cfg::TmaKV tma_v;
  GmemShape shape_q;   // as the TMA descriptors were built (see fwd_launch.cuh)
  GmemShape shape_kv;
  AttnFwdParams p;     // pointers, strides and lengths for everything TMA does not do
};

// Rows [0, valid) of a BLK_N x D shared-memory slot from global rows, zeros below, with 16-byte
// cp.async (zero-filling; all in flight at once). The producer warp uses it instead of TMA for the
// V tile that ends past its sequence in a varlen batch: TMA would bring in the next sequence's rows
// (or, past cu_seqlens[-1], rows that may hold anything), and although their probabilities are 0,
// 0 * NaN is NaN, so one sequence's NaN would leak into another. K needs no such care: masked
// scores are overwritten with -inf whatever they were.
template <class Cfg, class SmemTile>
__device__ __forceinline__ void load_tile_zero_fill(SmemTile&& s, const typename Cfg::Element* g,
                                                    int64_t row_stride, int64_t valid, int lane) {
  constexpr int kChunks = Cfg::kHeadDim / 8;  // 16-byte chunks per row
#pragma unroll 8
  for (int idx = lane; idx < Cfg::kBlockN * kChunks; idx += 32) {
    const int r = idx / kChunks;
    const int c = (idx % kChunks) * 8;
    const bool in = r < valid;
    // The 128-byte swizzle permutes whole 16-byte chunks, so 8 consecutive elements stay together.
    const uint32_t dst = cute::cast_smem_ptr_to_uint(&s(r, c));
    const void* src = in ? static_cast<const void*>(g + r * row_stride + c) : static_cast<const void*>(g);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(in ? 16 : 0)
                 : "memory");
  }
  asm volatile("cp.async.wait_all;\n" ::: "memory");
}

template <class Cfg>
__device__ __forceinline__ void fwd_producer(const FwdArgs<Cfg>& args, typename Cfg::SharedStorage& ss,
                                             int b, int h, int m_block) {
  using namespace cute;
  using Element = typename Cfg::Element;
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kHeadDim = Cfg::kHeadDim;
  const AttnFwdParams& p = args.p;
  const int lane = threadIdx.x % 32;
  const int bq = (p.cu_seqlens_q != nullptr) ? 0 : b;
  const int hk = h / (p.num_heads_q / p.num_heads_k);
  const attn::SeqCoords sc = attn::seq_coords(p, b);
  const int64_t m0 = int64_t(m_block) * kBlockM;
  const attn::KeyTileWalk walk = attn::key_tile_walk(sc.rule, m0, flux::imin(m0 + kBlockM, sc.len_q), kBlockN);

  Tensor mQ = args.tma_q.get_tma_tensor(args.shape_q);   // (rows, D, Hq, B)
  Tensor mK = args.tma_k.get_tma_tensor(args.shape_kv);  // (rows, D, Hkv, B)
  Tensor mV = args.tma_v.get_tma_tensor(args.shape_kv);
  Tensor gQ = local_tile(domain_offset(make_coord(int32_t(sc.q_start), _0{}), mQ(_, _, h, bq)),
                         Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(m_block, _0{}));  // (BLK_M, D)
  Tensor gK = local_tile(domain_offset(make_coord(int32_t(sc.k_start), _0{}), mK(_, _, hk, bq)),
                         Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_, _0{}));  // (BLK_N, D, n)
  Tensor gV = local_tile(domain_offset(make_coord(int32_t(sc.k_start), _0{}), mV(_, _, hk, bq)),
                         Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_, _0{}));  // (BLK_N, D, n)

  Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), typename Cfg::SmemLayoutQ{});  // (BLK_M, D)
  Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename Cfg::SmemLayoutK{});  // (BLK_N, D, PIPE)
  Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), typename Cfg::SmemLayoutV{});  // (BLK_N, D, PIPE)

  auto [tQgQ, tQsQ] = tma_partition(args.tma_q, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sQ),
                                    group_modes<0, 2>(gQ));  // (TMA), (TMA)
  auto [tKgK, tKsK] = tma_partition(args.tma_k, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sK),
                                    group_modes<0, 2>(gK));  // (TMA, n), (TMA, PIPE)
  auto [tVgV, tVsV] = tma_partition(args.tma_v, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sV),
                                    group_modes<0, 2>(gV));  // (TMA, n), (TMA, PIPE)

  if (lane == 0) {
    mbar_arrive_expect_tx(&ss.bar_q, Cfg::kBytesQ);
    copy(args.tma_q.with(ss.bar_q), tQgQ, tQsQ);
  }

  // Padded inputs: TMA zero-fills rows past seqlen_k (outside the tensor's batch slice). Varlen
  // inputs: the ragged last V tile of a sequence goes through load_tile_zero_fill instead.
  const bool varlen = p.cu_seqlens_q != nullptr;
  const Element* v_seq = static_cast<const Element*>(p.v) + sc.k_start * p.v_row_stride +
                         int64_t(hk) * p.v_head_stride;

  PipeState<Cfg::kStages> pipe;
  const int sink_n = static_cast<int>(walk.sink_n), local_0 = static_cast<int>(walk.local_0);
  for (int it = static_cast<int>(walk.count) - 1; it >= 0; --it) {
    const int n = it < sink_n ? it : local_0 + (it - sink_n);
    const int64_t j0 = int64_t(n) * kBlockN;
    const bool manual = varlen && j0 + kBlockN > sc.len_k;

    mbar_wait(&ss.bar_k_empty[pipe.stage], pipe.phase ^ 1u);
    if (lane == 0) {
      mbar_arrive_expect_tx(&ss.bar_k_full[pipe.stage], Cfg::kBytesKV);
      copy(args.tma_k.with(ss.bar_k_full[pipe.stage]), tKgK(_, n), tKsK(_, pipe.stage));
    }

    mbar_wait(&ss.bar_v_empty[pipe.stage], pipe.phase ^ 1u);
    if (!manual) {
      if (lane == 0) {
        mbar_arrive_expect_tx(&ss.bar_v_full[pipe.stage], Cfg::kBytesKV);
        copy(args.tma_v.with(ss.bar_v_full[pipe.stage]), tVgV(_, n), tVsV(_, pipe.stage));
      }
    } else {
      load_tile_zero_fill<Cfg>(sV(_, _, pipe.stage), v_seq + j0 * p.v_row_stride, p.v_row_stride,
                               sc.len_k - j0, lane);
      cutlass::arch::fence_view_async_shared();  // cp.async writes, read next by wgmma (async proxy)
      __syncwarp();
      if (lane == 0) mbar_arrive(&ss.bar_v_full[pipe.stage]);
    }
    pipe.advance();
  }
}

// Per-thread softmax state of the two accumulator rows a thread holds. The fp32 accumulator of a
// 64 x N wgmma tile holds, in thread t = 32 w + 4 g + q of the warpgroup, element i (i < N / 2) at
//   row 16 w + g + 8 ((i / 2) % 2),  column 2 q + (i % 2) + 8 (i / 4)
// (checked against CuTe's partition_C in tests/cpp/sm90_layouts.cu): row half r = (i / 2) % 2, and
// the 4 threads of a quad share a row, hence the xor-1 / xor-2 shuffles.
struct RowSoftmax {
  float max[2];  // running max of the raw scores (before scale)
  float sum[2];  // this thread's share of the running sum of exp

  __device__ __forceinline__ static float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
  }
  __device__ __forceinline__ static float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
  }

  // Folds the scores of one key tile (raw q.k in acc, masked entries -inf) into the state and turns
  // acc into probabilities exp2(s * scale_log2 - max * scale_log2). Returns the factor by which the
  // output accumulated so far must be multiplied (alpha), per row.
  template <bool kFirst, class Acc>
  __device__ __forceinline__ void update(Acc& acc, float scale_log2, float (&alpha)[2]) {
    using namespace cute;
    constexpr int kN = decltype(size(acc))::value;
    CUTE_UNROLL
    for (int r = 0; r < 2; ++r) {
      float mx = kFirst ? -INFINITY : max[r];
      CUTE_UNROLL
      for (int i = 2 * r; i < kN; i += 4) mx = fmaxf(mx, fmaxf(acc(i), acc(i + 1)));
      mx = quad_max(mx);
      // A row that has seen no visible key keeps max -inf; offsetting by 0 instead keeps exp2 at 0
      // (not NaN from -inf - -inf).
      const float offset = mx == -INFINITY ? 0.0f : mx * scale_log2;
      alpha[r] = kFirst ? 0.0f : exp2f(max[r] * scale_log2 - offset);
      max[r] = mx;
      float s = 0.0f;
      CUTE_UNROLL
      for (int i = 2 * r; i < kN; i += 4) {
        acc(i) = exp2f(fmaf(acc(i), scale_log2, -offset));
        acc(i + 1) = exp2f(fmaf(acc(i + 1), scale_log2, -offset));
        s += acc(i) + acc(i + 1);
      }
      sum[r] = kFirst ? s : sum[r] * alpha[r] + s;
    }
  }
};

// The keys a thread's two accumulator rows (row_lo and row_lo + 8) see, as absolute key positions:
// j < key_end and (j < sink_end or j >= local_start), streaming.h's rule (sink_end = local_start = 0
// when not streaming). Fixed for the whole key loop, so computed once, in 32 bits (a sequence has
// fewer than 2^31 keys); key_end <= seqlen_k also masks the ragged end of the keys. The fields are
// attention_common.cuh's RowTileMask without its per-tile clamp; building RowBounds from
// row_tile_mask (clamped at key 0) compiled to a 29% longer kernel, so the three values are kept here.
struct RowBounds {
  int key_end[2];
  int sink_end[2];
  int local_start[2];

  __device__ __forceinline__ RowBounds(const RowRule& rule, int64_t row_lo) {
    CUTE_UNROLL
    for (int r = 0; r < 2; ++r) {
      const int64_t row = row_lo + 8 * r;
      key_end[r] = static_cast<int>(row_key_end(rule, row));
      sink_end[r] = static_cast<int>(row_sink_end(rule, row));
      local_start[r] = static_cast<int>(row_local_start(rule, row));
    }
  }
};

// Scores of key positions a row must not see become -inf. Only the tiles that the TileMaskPlan
// marks come here (the diagonal, window and sink edges, the ragged end of the keys).
template <class Acc>
__device__ __forceinline__ void mask_tile(Acc& acc, const RowBounds& rb, int j0_col0) {
  using namespace cute;
  constexpr int kN = decltype(size(acc))::value;
  CUTE_UNROLL
  for (int r = 0; r < 2; ++r) {
    CUTE_UNROLL
    for (int i = 2 * r; i < kN; i += 4) {
      CUTE_UNROLL
      for (int e = 0; e < 2; ++e) {
        const int j = j0_col0 + 8 * (i / 4) + e;
        const bool visible = j < rb.key_end[r] && (j < rb.sink_end[r] || j >= rb.local_start[r]);
        if (!visible) acc(i + e) = -INFINITY;
      }
    }
  }
}

// Two fp32 values as one 32-bit word of 16-bit elements (the first in the low half).
template <class Element>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi) {
  if constexpr (std::is_same_v<Element, cutlass::bfloat16_t>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}

template <class Acc, class Frag>
__device__ __forceinline__ void convert_to_operand(const Acc& acc, Frag& frag) {
  using namespace cute;
  using Element = typename Frag::value_type;
  constexpr int kN = decltype(size(acc))::value;
  static_assert(decltype(size(frag))::value == kN, "P operand and S accumulator differ in size");
  // The S accumulator and the A operand of the P V wgmma enumerate their elements in the same order
  // (tests/cpp/sm90_layouts.cu), so the conversion is element-wise, two at a time.
  uint32_t* out = reinterpret_cast<uint32_t*>(raw_pointer_cast(frag.data()));
  CUTE_UNROLL
  for (int i = 0; i < kN; i += 2) out[i / 2] = pack_pair<Element>(acc(i), acc(i + 1));
}

template <class Acc>
__device__ __forceinline__ void scale_rows(Acc& acc, const float (&f)[2]) {
  using namespace cute;
  CUTE_UNROLL
  for (int i = 0; i < decltype(size(acc))::value; ++i) acc(i) *= f[(i / 2) % 2];
}

template <class Cfg>
__device__ __forceinline__ void fwd_consumer(const FwdArgs<Cfg>& args, typename Cfg::SharedStorage& ss,
                                             int b, int h, int m_block, int wg) {
  using namespace cute;
  using Element = typename Cfg::Element;
  constexpr int kBlockN = Cfg::kBlockN, kHeadDim = Cfg::kHeadDim, kNumWG = Cfg::kNumMmaWarpgroups;
  constexpr int kWgThreads = 128;
  const AttnFwdParams& p = args.p;
  const int t = threadIdx.x - kWgThreads * (wg + 1);  // thread index inside this warpgroup
  const attn::SeqCoords sc = attn::seq_coords(p, b);
  const int64_t m0 = int64_t(m_block) * Cfg::kBlockM;
  const attn::KeyTileWalk walk =
      attn::key_tile_walk(sc.rule, m0, flux::imin(m0 + Cfg::kBlockM, sc.len_q), kBlockN);

  Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), typename Cfg::SmemLayoutQ{});    // (BLK_M, D)
  Tensor sQw = local_tile(sQ, Shape<_64, Int<kHeadDim>>{}, make_coord(wg, _0{}));       // (64, D)
  Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename Cfg::SmemLayoutK{});    // (BLK_N, D, PIPE)
  Tensor sVt = make_tensor(make_smem_ptr(ss.v.data()), typename Cfg::SmemLayoutVt{});  // (D, BLK_N, PIPE)

  typename Cfg::TiledMmaQK mma_qk;
  typename Cfg::TiledMmaPV mma_pv;
  auto thr_qk = mma_qk.get_thread_slice(t);
  auto thr_pv = mma_pv.get_thread_slice(t);
  Tensor tSrQ = thr_qk.partition_fragment_A(sQw);  // (MMA, 1, D/16) descriptors
  Tensor tSrK = thr_qk.partition_fragment_B(sK);   // (MMA, 1, D/16, PIPE) descriptors
  Tensor tOrV = thr_pv.partition_fragment_B(sVt);  // (MMA, 1, BLK_N/16, PIPE) descriptors
  Tensor tSrS = partition_fragment_C(mma_qk, Shape<_64, Int<kBlockN>>{});   // (MMA, 1, 1) fp32
  Tensor tOrO = partition_fragment_C(mma_pv, Shape<_64, Int<kHeadDim>>{});  // (MMA, 1, 1) fp32
  Tensor tOrP = make_tensor<Element>(partition_shape_A(mma_pv, Shape<_64, Int<kBlockN>>{}));  // (MMA, 1, BLK_N/16)
  Tensor tScS = thr_qk.partition_C(make_identity_tensor(Shape<_64, Int<kBlockN>>{}));
  const int row_in_wg = get<0>(tScS(0));  // rows row_in_wg and row_in_wg + 8 of this warpgroup
  const int col0 = get<1>(tScS(0));

  const int64_t m0w = m0 + 64 * wg;  // first query row of this warpgroup
  const int64_t m1w = flux::imin(m0w + 64, sc.len_q);
  const bool has_rows = m0w < sc.len_q;
  const float scale_log2 = p.scale * attn::kLog2e;
  // The key loop runs on 32-bit tile indices (a sequence has < 2^31 tiles), and which tiles need the
  // element mask is decided once, here, as two thresholds (streaming.h's TileMaskPlan): classifying
  // every tile in 64-bit arithmetic cost ~100 instructions per warp and tile and spilled registers.
  const int count = static_cast<int>(walk.count);
  const int sink_n = static_cast<int>(walk.sink_n), local_0 = static_cast<int>(walk.local_0);
  auto tile_of = [&](int it) { return it < sink_n ? it : local_0 + (it - sink_n); };
  const TileMaskPlan plan64 = tile_mask_plan(sc.rule, m0w, m1w, kBlockN);  // m1w <= m0w: rows past the end
  const int mask_from = static_cast<int>(plan64.mask_from);
  const int band_lo = static_cast<int>(plan64.band_lo), band_hi = static_cast<int>(plan64.band_hi);
  auto needs_mask = [&](int n) { return n >= mask_from || (n >= band_lo && n < band_hi); };
  const RowBounds bounds(sc.rule, m0w + row_in_wg);

  // Pingpong: warpgroup w issues its wgmma batch only after w - 1 has issued its own, so one
  // warpgroup's exp2 runs under the other's matrix products.
  const int sched_mine = int(NamedBarrierId::kScheduler) + wg;
  const int sched_next = int(NamedBarrierId::kScheduler) + (wg + 1) % kNumWG;
  auto sched_wait = [&] { if constexpr (Cfg::kPingpong) named_barrier_sync(sched_mine, 2 * kWgThreads); };
  auto sched_pass = [&](bool last) {
    // The last warpgroup's final hand-over would have no one to receive it.
    if constexpr (Cfg::kPingpong) {
      if (!(last && wg == kNumWG - 1)) named_barrier_arrive(sched_next, 2 * kWgThreads);
    }
  };
  if constexpr (Cfg::kPingpong) {
    if (wg == kNumWG - 1 && count > 0) named_barrier_arrive(int(NamedBarrierId::kScheduler), 2 * kWgThreads);
  }

  clear(tOrO);
  RowSoftmax sm;
  sm.max[0] = sm.max[1] = -INFINITY;
  sm.sum[0] = sm.sum[1] = 0.0f;
  float alpha[2];

  mbar_wait(&ss.bar_q, 0);
  PipeState<Cfg::kStages> pipe;

  if (count > 0) {
    // First tile: S only, nothing to overlap with.
    int n = tile_of(count - 1);
    mbar_wait(&ss.bar_k_full[pipe.stage], pipe.phase);
    sched_wait();
    wgmma_issue<true>(mma_qk, tSrQ, tSrK(_, _, _, pipe.stage), tSrS);
    sched_pass(count == 1);
    warpgroup_wait<0>();
    mbar_arrive(&ss.bar_k_empty[pipe.stage]);
    if (needs_mask(n)) mask_tile(tSrS, bounds, n * kBlockN + col0);
    sm.update<true>(tSrS, scale_log2, alpha);
    convert_to_operand(tSrS, tOrP);
    PipeState<Cfg::kStages> prev = pipe;
    pipe.advance();

    for (int it = count - 2; it >= 0; --it) {
      n = tile_of(it);
      mbar_wait(&ss.bar_k_full[pipe.stage], pipe.phase);
      sched_wait();
      wgmma_issue<true>(mma_qk, tSrQ, tSrK(_, _, _, pipe.stage), tSrS);
      mbar_wait(&ss.bar_v_full[prev.stage], prev.phase);
      wgmma_issue<false>(mma_pv, tOrP, tOrV(_, _, _, prev.stage), tOrO);
      sched_pass(it == 0);
      warpgroup_wait<1>();  // S of this tile is ready; P V of the previous one may still run
      mbar_arrive(&ss.bar_k_empty[pipe.stage]);
      if (needs_mask(n)) mask_tile(tSrS, bounds, n * kBlockN + col0);
      sm.update<false>(tSrS, scale_log2, alpha);
      warpgroup_wait<0>();
      mbar_arrive(&ss.bar_v_empty[prev.stage]);
      scale_rows(tOrO, alpha);
      convert_to_operand(tSrS, tOrP);
      prev = pipe;
      pipe.advance();
    }

    mbar_wait(&ss.bar_v_full[prev.stage], prev.phase);
    wgmma_issue<false>(mma_pv, tOrP, tOrV(_, _, _, prev.stage), tOrO);
    warpgroup_wait<0>();
    mbar_arrive(&ss.bar_v_empty[prev.stage]);
  }

  // Epilogue: normalise, write lse, stage O in this warpgroup's rows of sQ (its own wgmma reads of
  // them are complete), then store the rows inside the sequence with 16-byte writes.
  float inv[2];
  CUTE_UNROLL
  for (int r = 0; r < 2; ++r) {
    const float l = RowSoftmax::quad_sum(sm.sum[r]);
    // l == 0 exactly when the row saw no key: out 0, lse -inf. A NaN l must stay NaN in both.
    inv[r] = l == 0.0f ? 0.0f : 1.0f / l;
    const float lse = l == 0.0f ? -INFINITY : (sm.max[r] * scale_log2 + log2f(l)) * attn::kLn2;
    const int64_t row = m0w + row_in_wg + 8 * r;
    if ((t % 4) == 0 && row < sc.len_q) {
      p.lse[b * p.lse_batch_stride + int64_t(h) * p.lse_head_stride + sc.q_start + row] = lse;
    }
  }
  scale_rows(tOrO, inv);
  Tensor tOsO = thr_pv.partition_C(sQw);  // (MMA, 1, 1) view of smem
  // Elements i, i + 1 are columns 2q, 2q + 1 of one row: adjacent inside a 16-byte chunk, which the
  // swizzle moves whole, so each pair is one aligned 32-bit store.
  CUTE_UNROLL
  for (int i = 0; i < size(tOrO); i += 2) {
    *reinterpret_cast<uint32_t*>(&tOsO(i)) = pack_pair<Element>(tOrO(i), tOrO(i + 1));
  }
  named_barrier_sync(int(NamedBarrierId::kEpilogue) + wg, kWgThreads);
  if (!has_rows) return;
  constexpr int kChunks = kHeadDim / 8;
  Element* o_rows = static_cast<Element*>(p.out) + b * p.o_batch_stride + (sc.q_start + m0w) * p.o_row_stride +
                    int64_t(h) * p.o_head_stride;
  const int64_t rows = m1w - m0w;
  for (int idx = t; idx < 64 * kChunks; idx += kWgThreads) {
    const int r = idx / kChunks;
    const int c = (idx % kChunks) * 8;
    if (r < rows) {
      *reinterpret_cast<uint4*>(o_rows + r * p.o_row_stride + c) = *reinterpret_cast<const uint4*>(&sQw(r, c));
    }
  }
}

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1)
    attention_fwd_sm90_kernel(CUTE_GRID_CONSTANT const FwdArgs<Cfg> args) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace cute;
  using SharedStorage = typename Cfg::SharedStorage;
  extern __shared__ char smem_raw[];
  // 128-byte swizzled TMA tiles need 1024-byte aligned slots; the launcher adds the slack.
  SharedStorage& ss = *reinterpret_cast<SharedStorage*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));

  const AttnFwdParams& p = args.p;
  // grid (q heads, query tiles, batch); the heaviest query tiles (last rows: most keys under a
  // causal mask) are launched first, so the tail of the grid is short tiles.
  const int h = blockIdx.x;
  const int b = blockIdx.z;
  const int m_block = gridDim.y - 1 - blockIdx.y;
  // Varlen grids are sized by max_seqlen_q: tiles past this sequence's end have nothing to do.
  // Uniform over the CTA. The roles compute the rest of their coordinates after the register
  // split, so nothing computed here stays live across setmaxnreg.
  const int64_t len_q = p.cu_seqlens_q != nullptr ? p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b] : p.seqlen_q;
  if (int64_t(m_block) * Cfg::kBlockM >= len_q) return;

  const int warp = __shfl_sync(0xffffffffu, int(threadIdx.x) / 32, 0);
  const int warpgroup = warp / 4;
  if (threadIdx.x == 0) {
    constexpr uint32_t kConsumers = 128 * Cfg::kNumMmaWarpgroups;
    mbar_init(&ss.bar_q, 1);
    CUTE_UNROLL
    for (int s = 0; s < Cfg::kStages; ++s) {
      mbar_init(&ss.bar_k_full[s], 1);
      mbar_init(&ss.bar_v_full[s], 1);
      mbar_init(&ss.bar_k_empty[s], kConsumers);
      mbar_init(&ss.bar_v_empty[s], kConsumers);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  if (warpgroup == 0) {
    cutlass::arch::warpgroup_reg_dealloc<Cfg::kProducerRegs>();
    if (warp == 0) fwd_producer<Cfg>(args, ss, b, h, m_block);
  } else {
    cutlass::arch::warpgroup_reg_alloc<Cfg::kConsumerRegs>();
    fwd_consumer<Cfg>(args, ss, b, h, m_block, warpgroup - 1);
  }
#endif
}

}  // namespace flux::sm90
