// Decode attention on the CPU: a few new query tokens per sequence against a contiguous or paged KV
// cache.
//
// Work is split over (batch, kv head) so that the Hq / Hkv query heads of a group share every K/V row
// they read (GQA is never expanded); several new tokens are handled one after the other, each with
// the rule of its own position (flux/decode_keys.h). Keys are visited in chunks: scores of a whole
// chunk are computed first, so the online-softmax rescale of the accumulators happens once per
// chunk, not once per key.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "flux/decode_keys.h"
#include "flux/params.h"
#include "flux/streaming.h"
#include "kernels.h"

namespace flux::cpu {
namespace {

// Keys per online-softmax step: large enough to amortise the rescale over many keys, small enough
// that the score block (heads x chunk) stays in L1.
constexpr int64_t kKeyChunk = 64;

// fp64 inputs accumulate in fp64 (gradcheck needs it); everything else in fp32.
template <typename T>
using AccType = std::conditional_t<std::is_same_v<T, double>, double, float>;

RowRule rule_of(const DecodeParams& p, int64_t b) {
  const int64_t seqlen = std::max<int64_t>(0, p.cache_seqlens[b]);
  const bool streaming = p.sparse_mode == SparseMode::kStreaming ||
                         (p.sparse_mode == SparseMode::kPerSequence && p.use_sparse[b]);
  return decode_rule(seqlen, p.seqlen_q, streaming, p.pattern);
}

// Offset (in elements) of token j of sequence b, kv head h, in a cache with the given strides.
int64_t cache_offset(const DecodeParams& p, int64_t b, int64_t j, int64_t page_stride,
                     int64_t row_stride, int64_t head_stride, int64_t h) {
  if (p.block_table == nullptr) return b * page_stride + j * row_stride + h * head_stride;
  const int64_t page = p.block_table[b * p.block_table_stride + j / p.page_size];
  return page * page_stride + (j % p.page_size) * row_stride + h * head_stride;
}

template <typename T>
void decode_impl(const DecodeParams& p) {
  using Acc = AccType<T>;
  using Vec = at::vec::Vectorized<Acc>;
  const int64_t hkv = p.num_heads_k;
  const int64_t group = p.num_heads_q / p.num_heads_k;
  const int64_t dim = p.head_dim;
  const T* q = static_cast<const T*>(p.q);
  const T* k_cache = static_cast<const T*>(p.k_cache);
  const T* v_cache = static_cast<const T*>(p.v_cache);
  T* out = static_cast<T*>(p.out);

  at::parallel_for(0, int64_t(p.batch) * hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<Acc> q_s(group * dim), acc(group * dim), k_buf(dim), v_buf(dim);
    std::vector<Acc> scores(group * kKeyChunk), m(group), l(group);
    std::vector<const T*> k_rows(kKeyChunk), v_rows(kKeyChunk);

    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / hkv;
      const int64_t kvh = task % hkv;
      const RowRule rule = rule_of(p, b);
      for (int64_t tok = 0; tok < p.seqlen_q; ++tok) {
        const DecodeKeys vk = decode_keys_for_row(rule, tok);

        for (int64_t g = 0; g < group; ++g) {
          const T* q_row =
              q + b * p.q_batch_stride + tok * p.q_token_stride + (kvh * group + g) * p.q_head_stride;
          for (int64_t d = 0; d < dim; ++d) q_s[g * dim + d] = static_cast<Acc>(q_row[d]) * Acc(p.scale);
        }
        std::fill(acc.begin(), acc.end(), Acc(0));
        std::fill(m.begin(), m.end(), -std::numeric_limits<Acc>::infinity());
        std::fill(l.begin(), l.end(), Acc(0));

        for (int64_t c0 = 0; c0 < vk.n_visible; c0 += kKeyChunk) {
          const int64_t n = std::min(kKeyChunk, vk.n_visible - c0);
          for (int64_t i = 0; i < n; ++i) {
            const int64_t j = vk.key(c0 + i);
            k_rows[i] = k_cache + cache_offset(p, b, j, p.k_page_stride, p.k_row_stride, p.k_head_stride, kvh);
            v_rows[i] = v_cache + cache_offset(p, b, j, p.v_page_stride, p.v_row_stride, p.v_head_stride, kvh);
          }

          for (int64_t i = 0; i < n; ++i) {
            const Acc* k_row;
            if constexpr (std::is_same_v<T, Acc>) {
              k_row = k_rows[i];
            } else {
              at::vec::convert(k_rows[i], k_buf.data(), dim);
              k_row = k_buf.data();
            }
            for (int64_t g = 0; g < group; ++g) {
              scores[g * kKeyChunk + i] = at::vec::map2_reduce_all<Acc>(
                  [](Vec x, Vec y) { return x * y; }, [](Vec x, Vec y) { return x + y; },
                  q_s.data() + g * dim, k_row, dim);
            }
          }

          for (int64_t g = 0; g < group; ++g) {
            Acc* s = scores.data() + g * kKeyChunk;
            const Acc m_new = std::max(m[g], *std::max_element(s, s + n));
            // m[g] = -inf on the first chunk gives alpha = 0 against the (zero) accumulators; m_new is
            // finite since every visited key has a finite score.
            const Acc alpha = std::exp(m[g] - m_new);
            Acc sum = 0;
            for (int64_t i = 0; i < n; ++i) {
              s[i] = std::exp(s[i] - m_new);
              sum += s[i];
            }
            l[g] = l[g] * alpha + sum;
            m[g] = m_new;
            Acc* a = acc.data() + g * dim;
            at::vec::map([alpha](Vec x) { return x * Vec(alpha); }, a, a, dim);
          }

          for (int64_t i = 0; i < n; ++i) {
            const Acc* v_row;
            if constexpr (std::is_same_v<T, Acc>) {
              v_row = v_rows[i];
            } else {
              at::vec::convert(v_rows[i], v_buf.data(), dim);
              v_row = v_buf.data();
            }
            for (int64_t g = 0; g < group; ++g) {
              const Vec pv(scores[g * kKeyChunk + i]);
              Acc* a = acc.data() + g * dim;
              at::vec::map2([pv](Vec x, Vec v) { return at::vec::fmadd(pv, v, x); }, a, a, v_row, dim);
            }
          }
        }

        for (int64_t g = 0; g < group; ++g) {
          const int64_t hq = kvh * group + g;
          T* o = out + b * p.o_batch_stride + tok * p.o_token_stride + hq * p.o_head_stride;
          float* lse = p.lse + b * p.lse_batch_stride + hq * p.lse_head_stride + tok * p.lse_token_stride;
          if (l[g] > Acc(0)) {
            const Acc inv = Acc(1) / l[g];
            for (int64_t d = 0; d < dim; ++d) o[d] = static_cast<T>(acc[g * dim + d] * inv);
            *lse = static_cast<float>(m[g] + std::log(l[g]));
          } else {
            for (int64_t d = 0; d < dim; ++d) o[d] = static_cast<T>(Acc(0));
            *lse = -std::numeric_limits<float>::infinity();
          }
        }
      }
    }
  });
}

}  // namespace

void decode_attention(const DecodeParams& params) {
  if (params.batch <= 0 || params.num_heads_k <= 0) return;
  switch (params.dtype) {
    case DataType::kFloat32: return decode_impl<float>(params);
    case DataType::kFloat64: return decode_impl<double>(params);
    case DataType::kFloat16: return decode_impl<c10::Half>(params);
    case DataType::kBFloat16: return decode_impl<c10::BFloat16>(params);
  }
}

}  // namespace flux::cpu
