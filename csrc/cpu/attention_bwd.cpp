// CPU attention backward. Probabilities are recomputed from the saved lse tile by tile, never stored.
// Deterministic without atomics: every output element is accumulated by exactly one work item in a
// fixed order.
//   pass 0, per (sequence, q head):            delta_i = rowsum(dO_i * O_i) - dlse_i
//   pass 1, per (sequence, key tile, kv head): dK, dV over every q head of the GQA group and every
//                                              row tile that sees the key tile (rows_for_keys)
//   pass 2, per (sequence, query tile, q head): dQ over the key tiles the rows visit
#include <cmath>
#include <limits>
#include <vector>

#include "attention_common.h"
#include "kernels.h"

namespace flux::cpu {
namespace {

using namespace detail;

// Pass 1's per-thread tiles (Q, dO, P, dS, a transposed P/dS, dK and dV accumulators: seven 64 KiB
// tiles at D = 128, fp32) plus the K^T/V^T panels it reads stay inside a 1 MiB L2. Measured (fp32,
// D = 128, 2 threads, S = 4096 dense/causal, 8192 streaming): 64x128, 128x256 and 256x128 all within
// +-6 % of 128x128.
constexpr int64_t kBlockQ = 128;
constexpr int64_t kBlockK = 128;

FLUX_CPU_VEC_BEGIN

// Rows [i0, i0 + m) of one q head against keys [j0, j0 + n): leaves P = exp(S - lse) in s and
// dS = P * (dP - delta) in dp, both [m x n] with leading dimension kBlockK. qs holds scale * Q, so
// S = qs * K^T is already scaled. Rows whose lse is -inf saw no key in the forward: zero rows, which
// also keeps a non-finite dlse on such a row from turning 0 * (dP - delta) into NaN.
template <typename A>
void probs_and_grads(const RowRule& rule, TileKind kind, int64_t i0, int64_t m, int64_t j0, int64_t n,
                     int64_t d, const A* qs, const A* dout, int64_t ld_dout, const A* kt, const A* vt,
                     int64_t ld_panel, const A* lse, const A* delta, A* s, A* dp) {
  const A ninf = -std::numeric_limits<A>::infinity();
  tile_gemm(m, n, d, qs, d, kt, ld_panel, s, kBlockK, /*accumulate=*/false);
  tile_gemm(m, n, d, dout, ld_dout, vt, ld_panel, dp, kBlockK, /*accumulate=*/false);
  for (int64_t r = 0; r < m; ++r) {
    A* sr = s + r * kBlockK;
    A* dpr = dp + r * kBlockK;
    if (lse[r] == ninf) {
      zero_row(n, sr);
      zero_row(n, dpr);
      continue;
    }
    if (kind == TileKind::kPartial) mask_row(rule, i0 + r, j0, j0 + n, sr);
    exp_sub_sum(sr, n, lse[r]);
    softmax_grad_row(sr, dpr, n, delta[r]);
  }
}

template <typename T>
void attention_bwd_kernel(const AttnBwdParams& p) {
  using A = acc_t<T>;
  constexpr bool kNarrow = !std::is_same_v<T, A>;
  const int64_t d = p.head_dim;
  const int64_t hq = p.num_heads_q;
  const int64_t hkv = p.num_heads_k;
  const int64_t group = hq / hkv;
  const A scale = static_cast<A>(p.scale);

  const std::vector<Sequence> seqs = resolve_sequences(p, "flux::cpu::attention_bwd");
  const int64_t rows = total_rows(seqs);

  // Pass 0. lse and delta per (q head, packed row), in the accumulation type.
  std::vector<A> lse_rows(hq * rows);
  std::vector<A> delta_rows(hq * rows);
  run_items(
      int64_t(seqs.size()) * hq, [] { return 0; },
      [&](int&, int64_t item) {
        const Sequence& seq = seqs[item / hq];
        const int64_t h = item % hq;
        const T* o = row_ptr<const T>(p.out, p.o_batch_stride, p.o_row_stride, p.o_head_stride, seq.b,
                                      seq.q_row0, h);
        const T* dout = row_ptr<const T>(p.dout, p.do_batch_stride, p.do_row_stride,
                                         p.do_head_stride, seq.b, seq.q_row0, h);
        const int64_t lse_off = seq.b * p.lse_batch_stride + h * p.lse_head_stride + seq.q_row0;
        A* lse = lse_rows.data() + h * rows + seq.flat_q0;
        A* delta = delta_rows.data() + h * rows + seq.flat_q0;
        for (int64_t i = 0; i < seq.len_q; ++i) {
          lse[i] = static_cast<A>(p.lse[lse_off + i]);
          const A dlse = p.dlse != nullptr ? static_cast<A>(p.dlse[lse_off + i]) : A(0);
          delta[i] = dot_row<T, A>(dout + i * p.do_row_stride, o + i * p.o_row_stride, d) - dlse;
        }
      });

  KeyPanels<A> kt_panels(seqs, PanelLayout::kTransposed, hkv, d, kBlockK);
  KeyPanels<A> vt_panels(seqs, PanelLayout::kTransposed, hkv, d, kBlockK);
  stage_panels<T>(kt_panels, seqs, p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride, d);
  stage_panels<T>(vt_panels, seqs, p.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride, d);
  // dQ = dS * K reads fp32/fp64 K in place; fp16/bf16 K is widened once.
  KeyPanels<A> k_rows(kNarrow ? seqs : std::vector<Sequence>{}, PanelLayout::kRows, hkv, d, kBlockK);
  if constexpr (kNarrow) {
    stage_panels<T>(k_rows, seqs, p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride, d);
  }

  // Pass 1: dK, dV.
  struct KeyScratch {
    explicit KeyScratch(int64_t d)
        : qs(kBlockQ * d), dout(kBlockQ * d), s(kBlockQ * kBlockK), dp(kBlockQ * kBlockK),
          tr(kBlockK * kBlockQ), dk(kBlockK * d), dv(kBlockK * d) {}
    Buffer<A> qs, dout;  // scale * Q and dO rows of the current row tile
    Buffer<A> s, dp;     // P and dS [kBlockQ x kBlockK]
    Buffer<A> tr;        // P^T or dS^T [kBlockK x kBlockQ]
    Buffer<A> dk, dv;    // accumulators [kBlockK x d]
  };
  const std::vector<SeqTile> key_tiles = plan_key_tiles(seqs, kBlockK);
  run_items(
      int64_t(key_tiles.size()) * hkv, [d] { return KeyScratch(d); },
      [&](KeyScratch& w, int64_t item) {
        const SeqTile& tile = key_tiles[item / hkv];
        const int64_t kvh = item % hkv;
        const Sequence& seq = seqs[tile.seq];
        const int64_t j0 = tile.lo, j1 = tile.hi, n = j1 - j0;

        const A* kt = kt_panels.at(tile.seq, j0, kvh);
        const A* vt = vt_panels.at(tile.seq, j0, kvh);
        std::fill(w.dk.get(), w.dk.get() + n * d, A(0));
        std::fill(w.dv.get(), w.dv.get() + n * d, A(0));

        for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
          const T* q = row_ptr<const T>(p.q, p.q_batch_stride, p.q_row_stride, p.q_head_stride, seq.b,
                                        seq.q_row0, h);
          const T* dout = row_ptr<const T>(p.dout, p.do_batch_stride, p.do_row_stride,
                                           p.do_head_stride, seq.b, seq.q_row0, h);
          const A* lse = lse_rows.data() + h * rows + seq.flat_q0;
          const A* delta = delta_rows.data() + h * rows + seq.flat_q0;
          for_each_row_tile(seq.rule, j0, j1, kBlockQ, [&](int64_t i0, int64_t i1, TileKind kind) {
            const int64_t m = i1 - i0;
            load_tile(q + i0 * p.q_row_stride, p.q_row_stride, m, d, scale, w.qs.get());
            const A* dout_tile = nullptr;
            int64_t ld_dout = 0;
            if constexpr (kNarrow) {
              load_tile(dout + i0 * p.do_row_stride, p.do_row_stride, m, d, A(1), w.dout.get());
              dout_tile = w.dout.get();
              ld_dout = d;
            } else {
              dout_tile = dout + i0 * p.do_row_stride;
              ld_dout = p.do_row_stride;
            }
            probs_and_grads(seq.rule, kind, i0, m, j0, n, d, w.qs.get(), dout_tile, ld_dout, kt, vt,
                            kBlockK, lse + i0, delta + i0, w.s.get(), w.dp.get());
            transpose(w.s.get(), kBlockK, m, n, w.tr.get(), kBlockQ);  // P^T
            tile_gemm(n, d, m, w.tr.get(), kBlockQ, dout_tile, ld_dout, w.dv.get(), d, true);
            transpose(w.dp.get(), kBlockK, m, n, w.tr.get(), kBlockQ);  // dS^T
            tile_gemm(n, d, m, w.tr.get(), kBlockQ, w.qs.get(), d, w.dk.get(), d, true);
          });
        }

        T* dk = row_ptr<T>(p.dk, p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride, seq.b,
                           seq.k_row0 + j0, kvh);
        T* dv = row_ptr<T>(p.dv, p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride, seq.b,
                           seq.k_row0 + j0, kvh);
        for (int64_t r = 0; r < n; ++r) {
          store_row(w.dk.get() + r * d, d, A(1), dk + r * p.dk_row_stride);
          store_row(w.dv.get() + r * d, d, A(1), dv + r * p.dv_row_stride);
        }
      });

  // Pass 2: dQ.
  struct QueryScratch {
    explicit QueryScratch(int64_t d)
        : qs(kBlockQ * d), dout(kBlockQ * d), s(kBlockQ * kBlockK), dp(kBlockQ * kBlockK),
          dq(kBlockQ * d) {}
    Buffer<A> qs, dout;
    Buffer<A> s, dp;
    Buffer<A> dq;     // accumulator [kBlockQ x d], unscaled
  };
  const std::vector<SeqTile> query_tiles = plan_query_tiles(seqs, kBlockQ);
  run_items(
      int64_t(query_tiles.size()) * hq, [d] { return QueryScratch(d); },
      [&](QueryScratch& w, int64_t item) {
        const SeqTile& tile = query_tiles[item / hq];
        const int64_t h = item % hq;
        const int64_t kvh = h / group;
        const Sequence& seq = seqs[tile.seq];
        const int64_t i0 = tile.lo, i1 = tile.hi, m = i1 - i0;

        load_tile(row_ptr<const T>(p.q, p.q_batch_stride, p.q_row_stride, p.q_head_stride, seq.b,
                                   seq.q_row0 + i0, h),
                  p.q_row_stride, m, d, scale, w.qs.get());
        const T* dout = row_ptr<const T>(p.dout, p.do_batch_stride, p.do_row_stride, p.do_head_stride,
                                         seq.b, seq.q_row0 + i0, h);
        const A* dout_tile = nullptr;
        int64_t ld_dout = 0;
        if constexpr (kNarrow) {
          load_tile(dout, p.do_row_stride, m, d, A(1), w.dout.get());
          dout_tile = w.dout.get();
          ld_dout = d;
        } else {
          dout_tile = dout;
          ld_dout = p.do_row_stride;
        }
        const A* lse = lse_rows.data() + h * rows + seq.flat_q0 + i0;
        const A* delta = delta_rows.data() + h * rows + seq.flat_q0 + i0;
        std::fill(w.dq.get(), w.dq.get() + m * d, A(0));

        const T* k = row_ptr<const T>(p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride, seq.b,
                                      seq.k_row0, kvh);
        for_each_key_tile(seq.rule, i0, i1, kBlockK, [&](int64_t j0, int64_t j1, TileKind kind) {
          const int64_t n = j1 - j0;
          const A* k_tile = nullptr;
          int64_t ld_k = 0;
          if constexpr (kNarrow) {
            k_tile = k_rows.at(tile.seq, j0, kvh);
            ld_k = k_rows.ld();
          } else {
            k_tile = k + j0 * p.k_row_stride;
            ld_k = p.k_row_stride;
          }
          probs_and_grads(seq.rule, kind, i0, m, j0, n, d, w.qs.get(), dout_tile, ld_dout,
                          kt_panels.at(tile.seq, j0, kvh), vt_panels.at(tile.seq, j0, kvh),
                          kt_panels.ld(), lse, delta, w.s.get(), w.dp.get());
          tile_gemm(m, d, n, w.dp.get(), kBlockK, k_tile, ld_k, w.dq.get(), d, true);
        });

        T* dq = row_ptr<T>(p.dq, p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride, seq.b,
                           seq.q_row0 + i0, h);
        for (int64_t r = 0; r < m; ++r) store_row(w.dq.get() + r * d, d, scale, dq + r * p.dq_row_stride);
      });
}

void attention_bwd_dispatch(const AttnBwdParams& p) {
  dispatch_dtype(p.dtype, "flux::cpu::attention_bwd", [&](auto tag) {
    attention_bwd_kernel<typename decltype(tag)::type>(p);
  });
}

FLUX_CPU_VEC_END

}  // namespace

void attention_bwd(const AttnBwdParams& params) {
  detail::check_cpu_isa("flux::cpu::attention_bwd");
  attention_bwd_dispatch(params);
}

}  // namespace flux::cpu
