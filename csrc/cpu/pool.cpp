// Router-input pooling on the CPU (params.h PoolParams): mean of the first and last min(P, n) query
// rows of each sequence, then mean over heads, and its gradient. Only those 2m rows are read.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "flux/params.h"
#include "kernels.h"

namespace flux::cpu {
namespace {

// fp64 inputs accumulate in fp64 (gradcheck needs it); everything else in fp32.
template <typename T>
using AccType = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Sequence b as (index of its first row along q's row dimension, number of rows); the row pointer of
// row i of the sequence is q + b * q_batch_stride + (first + i) * q_row_stride.
struct SeqRun {
  int64_t first = 0;
  int64_t n = 0;
};

SeqRun sequence_run(const PoolParams& p, int64_t b) {
  SeqRun run;
  if (p.cu_seqlens != nullptr) {
    run.first = p.cu_seqlens[b];
    run.n = std::max<int64_t>(0, int64_t(p.cu_seqlens[b + 1]) - p.cu_seqlens[b]);
    return run;
  }
  if (p.mask == nullptr) {
    run.n = p.seqlen;
    return run;
  }
  // The valid tokens are one contiguous run (left or right padding): its first index and length.
  const bool* mask = p.mask + b * p.mask_batch_stride;
  int64_t first = -1, count = 0;
  for (int64_t i = 0; i < p.seqlen; ++i) {
    if (!mask[i]) continue;
    if (first < 0) first = i;
    ++count;
  }
  run.first = first < 0 ? 0 : first;
  run.n = count;
  return run;
}

int64_t pooled_rows(const PoolParams& p, int64_t n) {
  return std::min<int64_t>(std::max(p.pool_size, 0), n);
}

template <typename T>
void pool_impl(const PoolParams& p) {
  using Acc = AccType<T>;
  using Vec = at::vec::Vectorized<Acc>;
  const int64_t dim = p.head_dim;
  const T* q = static_cast<const T*>(p.q);
  T* out = static_cast<T*>(p.out);

  at::parallel_for(0, p.batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<Acc> acc(dim), buf(dim);
    for (int64_t b = begin; b < end; ++b) {
      const SeqRun run = sequence_run(p, b);
      const int64_t m = pooled_rows(p, run.n);
      T* o = out + b * p.o_batch_stride;
      if (m == 0) {
        for (int64_t d = 0; d < dim; ++d) o[d] = static_cast<T>(Acc(0));
        continue;
      }
      std::fill(acc.begin(), acc.end(), Acc(0));
      // First m rows, then last m rows: a row in both ranges is added twice, as specified.
      const int64_t starts[2] = {0, run.n - m};
      for (const int64_t start : starts) {
        for (int64_t i = start; i < start + m; ++i) {
          const T* row = q + b * p.q_batch_stride + (run.first + i) * p.q_row_stride;
          for (int64_t h = 0; h < p.num_heads; ++h) {
            const Acc* x;
            if constexpr (std::is_same_v<T, Acc>) {
              x = row + h * p.q_head_stride;
            } else {
              at::vec::convert(row + h * p.q_head_stride, buf.data(), dim);
              x = buf.data();
            }
            at::vec::map2([](Vec a, Vec v) { return a + v; }, acc.data(), acc.data(), x, dim);
          }
        }
      }
      const Acc inv = Acc(1) / Acc(int64_t(p.num_heads) * 2 * m);
      for (int64_t d = 0; d < dim; ++d) o[d] = static_cast<T>(acc[d] * inv);
    }
  });
}

template <typename T>
void pool_bwd_impl(const PoolBwdParams& p) {
  using Acc = AccType<T>;
  const int64_t dim = p.head_dim;
  const T* dout = static_cast<const T*>(p.dout);
  T* dq = static_cast<T*>(p.dq);

  at::parallel_for(0, p.batch, 1, [&](int64_t begin, int64_t end) {
    // grad[w][d] = dout[b, d] * w / (H * 2m) for the multiplicities w = 0, 1, 2.
    std::vector<T> grad(3 * dim);
    for (int64_t b = begin; b < end; ++b) {
      const SeqRun run = sequence_run(p, b);
      const int64_t m = pooled_rows(p, run.n);
      const Acc coef = m > 0 ? Acc(1) / Acc(int64_t(p.num_heads) * 2 * m) : Acc(0);
      for (int64_t d = 0; d < dim; ++d) {
        const Acc g = static_cast<Acc>(dout[b * p.do_batch_stride + d]) * coef;
        grad[d] = static_cast<T>(Acc(0));
        grad[dim + d] = static_cast<T>(g);
        grad[2 * dim + d] = static_cast<T>(g * Acc(2));
      }
      // Every row of the sequence's slot is written, padding rows included (with zeros).
      const bool varlen = p.cu_seqlens != nullptr;
      const int64_t row_begin = varlen ? run.first : 0;
      const int64_t row_end = varlen ? run.first + run.n : p.seqlen;
      for (int64_t i = row_begin; i < row_end; ++i) {
        const int64_t rel = i - run.first;
        int w = 0;
        if (rel >= 0 && rel < run.n) w = int(rel < m) + int(rel >= run.n - m);
        T* row = dq + b * p.dq_batch_stride + i * p.dq_row_stride;
        for (int64_t h = 0; h < p.num_heads; ++h) {
          std::copy(grad.begin() + w * dim, grad.begin() + (w + 1) * dim, row + h * p.dq_head_stride);
        }
      }
    }
  });
}

}  // namespace

void pool_queries(const PoolParams& params) {
  if (params.batch <= 0) return;
  switch (params.dtype) {
    case DataType::kFloat32: return pool_impl<float>(params);
    case DataType::kFloat64: return pool_impl<double>(params);
    case DataType::kFloat16: return pool_impl<c10::Half>(params);
    case DataType::kBFloat16: return pool_impl<c10::BFloat16>(params);
  }
}

void pool_queries_bwd(const PoolBwdParams& params) {
  if (params.batch <= 0) return;
  switch (params.dtype) {
    case DataType::kFloat32: return pool_bwd_impl<float>(params);
    case DataType::kFloat64: return pool_bwd_impl<double>(params);
    case DataType::kFloat16: return pool_bwd_impl<c10::Half>(params);
    case DataType::kBFloat16: return pool_bwd_impl<c10::BFloat16>(params);
  }
}

}  // namespace flux::cpu
