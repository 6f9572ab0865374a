// CPU attention forward: tiled online softmax (FlashAttention's recurrence), one work item per
// (sequence, query tile, q head). Scores exist only as one [kBlockQ x kBlockK] tile per thread.
#include <cmath>
#include <limits>
#include <vector>

#include "attention_common.h"
#include "kernels.h"

namespace flux::cpu {
namespace {

using namespace detail;

// Query rows per work item and keys per step. The [kBlockQ x kBlockK] score tile, the Q and output
// tiles and a K^T panel (D = 128, fp32: 128 + 64 + 64 + 128 KiB) stay within a 1 MiB L2, and S = 4096
// x 8 heads still makes 256 items to balance. Measured (fp32, D = 128, 2 threads, S = 4096 and 8192,
// dense/causal/streaming): 128x128, 128x512, 64x256 and 256x256 all within +-5 % of 128x256.
constexpr int64_t kBlockQ = 128;
constexpr int64_t kBlockK = 256;

FLUX_CPU_VEC_BEGIN

template <typename T>
void attention_fwd_kernel(const AttnFwdParams& p) {
  using A = acc_t<T>;
  constexpr bool kNarrow = !std::is_same_v<T, A>;
  const A ninf = -std::numeric_limits<A>::infinity();
  const int64_t d = p.head_dim;
  const int64_t hq = p.num_heads_q;
  const int64_t group = p.num_heads_q / p.num_heads_k;
  const A scale = static_cast<A>(p.scale);

  const std::vector<Sequence> seqs = resolve_sequences(p, "flux::cpu::attention_fwd");
  const std::vector<SeqTile> tiles = plan_query_tiles(seqs, kBlockQ);

  KeyPanels<A> k_panels(seqs, PanelLayout::kTransposed, p.num_heads_k, d, kBlockK);
  stage_panels<T>(k_panels, seqs, p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride, d);
  // fp32/fp64 V is read in place; fp16/bf16 V is widened once.
  KeyPanels<A> v_panels(kNarrow ? seqs : std::vector<Sequence>{}, PanelLayout::kRows,
                        p.num_heads_k, d, kBlockK);
  if constexpr (kNarrow) {
    stage_panels<T>(v_panels, seqs, p.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride, d);
  }

  struct Scratch {
    explicit Scratch(int64_t d)
        : q(kBlockQ * d), s(kBlockQ * kBlockK), o(kBlockQ * d), row_max(kBlockQ), row_sum(kBlockQ) {}
    Buffer<A> q;  // scale * Q rows
    Buffer<A> s;  // scores, then probabilities
    Buffer<A> o;  // unnormalised output
    Buffer<A> row_max;
    Buffer<A> row_sum;
  };

  run_items(
      int64_t(tiles.size()) * hq, [d] { return Scratch(d); },
      [&](Scratch& w, int64_t item) {
        const SeqTile& tile = tiles[item / hq];
        const int64_t h = item % hq;
        const int64_t kvh = h / group;
        const Sequence& seq = seqs[tile.seq];
        const int64_t i0 = tile.lo, i1 = tile.hi, m = i1 - i0;

        const T* q = row_ptr<const T>(p.q, p.q_batch_stride, p.q_row_stride, p.q_head_stride, seq.b,
                                      seq.q_row0 + i0, h);
        load_tile(q, p.q_row_stride, m, d, scale, w.q.get());
        std::fill(w.o.get(), w.o.get() + m * d, A(0));
        std::fill(w.row_max.get(), w.row_max.get() + m, ninf);
        std::fill(w.row_sum.get(), w.row_sum.get() + m, A(0));
        const T* v = row_ptr<const T>(p.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride, seq.b,
                                      seq.k_row0, kvh);

        for_each_key_tile(seq.rule, i0, i1, kBlockK, [&](int64_t j0, int64_t j1, TileKind kind) {
          const int64_t n = j1 - j0;
          A* s = w.s.get();
          tile_gemm(m, n, d, w.q.get(), d, k_panels.at(tile.seq, j0, kvh), k_panels.ld(), s, kBlockK,
                    /*accumulate=*/false);

          for (int64_t r = 0; r < m; ++r) {
            A* sr = s + r * kBlockK;
            if (kind == TileKind::kPartial) mask_row(seq.rule, i0 + r, j0, j1, sr);
            const A old_max = w.row_max.get()[r];
            const A new_max = nan_max(old_max, row_max(sr, n));
            if (new_max == ninf) {  // nothing visible yet: exp(-inf - -inf) would be NaN
              std::fill(sr, sr + n, A(0));
              continue;
            }
            const A sum = exp_sub_sum(sr, n, new_max);
            if (new_max != old_max) {
              if (old_max != ninf) {
                const A alpha = std::exp(old_max - new_max);
                w.row_sum.get()[r] *= alpha;
                scale_row(w.o.get() + r * d, d, alpha);
              }
              w.row_max.get()[r] = new_max;
            }
            w.row_sum.get()[r] += sum;
          }

          if constexpr (kNarrow) {
            tile_gemm(m, d, n, s, kBlockK, v_panels.at(tile.seq, j0, kvh), v_panels.ld(), w.o.get(), d,
                      true);
          } else {
            tile_gemm(m, d, n, s, kBlockK, v + j0 * p.v_row_stride, p.v_row_stride, w.o.get(), d, true);
          }
        });

        T* out = row_ptr<T>(p.out, p.o_batch_stride, p.o_row_stride, p.o_head_stride, seq.b,
                            seq.q_row0 + i0, h);
        float* lse = p.lse + seq.b * p.lse_batch_stride + h * p.lse_head_stride + seq.q_row0 + i0;
        for (int64_t r = 0; r < m; ++r) {
          const A sum = w.row_sum.get()[r];
          T* out_r = out + r * p.o_row_stride;
          if (sum == A(0)) {  // the row sees no key
            zero_row(d, out_r);
            lse[r] = -std::numeric_limits<float>::infinity();
          } else {
            store_row(w.o.get() + r * d, d, A(1) / sum, out_r);
            lse[r] = static_cast<float>(w.row_max.get()[r] + std::log(sum));
          }
        }
      });
}

void attention_fwd_dispatch(const AttnFwdParams& p) {
  dispatch_dtype(p.dtype, "flux::cpu::attention_fwd", [&](auto tag) {
    attention_fwd_kernel<typename decltype(tag)::type>(p);
  });
}

FLUX_CPU_VEC_END

}  // namespace

void attention_fwd(const AttnFwdParams& params) {
  detail::check_cpu_isa("flux::cpu::attention_fwd");
  attention_fwd_dispatch(params);
}

}  // namespace flux::cpu
