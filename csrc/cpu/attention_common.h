// Pieces shared by the CPU attention kernels (attention_fwd.cpp, attention_bwd.cpp): dtype dispatch,
// sequence resolution from the layout rules of flux/params.h, tile iteration over flux/streaming.h's
// key and row ranges, a load-balancing work queue, and the vectorised row primitives and tile GEMM.
//
// Orientation used throughout: tiles are row-major, a score tile S is [rows x keys] with leading
// dimension kBlockK of its kernel, and K (V too in the backward) is staged once as transposed
// [head_dim x keys] panels, so that every product is a plain row-major C = A * B (the only form
// cpublas::brgemm takes).
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <new>
#include <tuple>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

// Everything <ATen/cpu/vec/vec.h> includes besides the vector types, included here first so that the
// target region below compiles only at::vec (which lives in its own CPU_CAPABILITY namespace) and our
// kernels for AVX2: an inline function of a shared header compiled for AVX2 here could be the copy
// the linker keeps for the whole library.
#include <ATen/NumericUtils.h>
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <ATen/native/quantized/AffineQuantizerBase.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/Load.h>
#include <c10/util/MathConstants.h>
#include <c10/util/TypeCast.h>
#include <c10/util/complex.h>
#include <c10/util/copysign.h>
#include <c10/util/irange.h>
#include <c10/util/qint32.h>
#include <c10/util/qint8.h>
#include <c10/util/quint8.h>

#include "flux/params.h"
#include "flux/streaming.h"

#if defined(AT_PARALLEL_OPENMP) && AT_PARALLEL_OPENMP && !defined(_OPENMP)
// ATen's OpenMP parallel_for is a header template: without -fopenmp it silently runs on one thread.
#warning "csrc/cpu attention kernels compiled without -fopenmp: at::parallel_for will be serial"
#endif

// at::vec picks its implementation from CPU_CAPABILITY_* macros. setup.py defines them (FLUX_CPU_VEC)
// and then its choice stands. A build that defines none (CMake, a plain compile) would get the scalar
// fallback, whose exp is std::exp per element (the softmax then costs more than both GEMMs): there
// GCC's target pragma compiles at::vec and the kernels (between FLUX_CPU_VEC_BEGIN/END) for
// AVX2+FMA+F16C, and the entry points stay baseline code that checks the CPU first (check_cpu_isa).
// Define CPU_CAPABILITY=DEFAULT for a build that must run on pre-AVX2 x86.
#if !defined(CPU_CAPABILITY) && defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FLUX_CPU_TARGET_AVX2 1
#define FLUX_CPU_VEC_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,f16c\")")
#define FLUX_CPU_VEC_END _Pragma("GCC pop_options")
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#else
#define FLUX_CPU_TARGET_AVX2 0
#define FLUX_CPU_VEC_BEGIN
#define FLUX_CPU_VEC_END
#endif

FLUX_CPU_VEC_BEGIN
// sleef.h declares its AVX2 entry points (used by at::vec's AVX2 types) only under __AVX__, a macro
// GCC's target pragma does not define in C++.
#if FLUX_CPU_TARGET_AVX2 && !defined(__AVX__)
#define __AVX__ 1
#define FLUX_CPU_DEFINED_AVX_MACRO 1
#endif
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#if defined(FLUX_CPU_DEFINED_AVX_MACRO)
#undef __AVX__
#undef FLUX_CPU_DEFINED_AVX_MACRO
#endif
FLUX_CPU_VEC_END

namespace flux::cpu::detail {

inline void check_cpu_isa(const char* op) {
#if FLUX_CPU_TARGET_AVX2
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                                __builtin_cpu_supports("f16c");
  TORCH_CHECK(supported, op,
              ": the CPU attention kernels of this build are compiled for AVX2+FMA+F16C, "
              "which this CPU does not support");
#else
  (void)op;
#endif
}

// ---------------------------------------------------------------------------------------------------
// dtypes

template <typename T>
struct TypeTag {
  using type = T;
};

// fp16/bf16 tiles are widened to fp32; fp64 stays fp64 end to end.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename F>
void dispatch_dtype(DataType dtype, const char* op, F&& f) {
  switch (dtype) {
    case DataType::kFloat32:
      f(TypeTag<float>{});
      return;
    case DataType::kFloat64:
      f(TypeTag<double>{});
      return;
    case DataType::kFloat16:
      f(TypeTag<c10::Half>{});
      return;
    case DataType::kBFloat16:
      f(TypeTag<c10::BFloat16>{});
      return;
  }
  TORCH_CHECK(false, op, ": unsupported dtype code ", static_cast<int>(dtype));
}

// ---------------------------------------------------------------------------------------------------
// sequences

struct Sequence {
  int b = 0;
  int64_t q_row0 = 0;  // row of the sequence's first query in the row dimension (cu_seqlens_q[b] or 0)
  int64_t k_row0 = 0;
  int64_t len_q = 0;
  int64_t len_k = 0;
  int64_t flat_q0 = 0;  // first query in a packed numbering of all sequences' rows (kernel scratch)
  RowRule rule;
};

inline std::vector<Sequence> resolve_sequences(const AttnFwdParams& p, const char* op) {
  TORCH_CHECK(p.batch >= 0 && p.num_heads_q > 0 && p.num_heads_k > 0 && p.head_dim > 0, op,
              ": bad sizes batch=", p.batch, " num_heads_q=", p.num_heads_q,
              " num_heads_k=", p.num_heads_k, " head_dim=", p.head_dim);
  TORCH_CHECK(p.num_heads_q % p.num_heads_k == 0, op, ": num_heads_k (", p.num_heads_k,
              ") must divide num_heads_q (", p.num_heads_q, ")");
  TORCH_CHECK(p.sparse_mode != SparseMode::kPerSequence || p.use_sparse != nullptr, op,
              ": sparse_mode kPerSequence needs use_sparse");
  std::vector<Sequence> seqs(p.batch);
  int64_t flat = 0;
  for (int b = 0; b < p.batch; ++b) {
    Sequence& s = seqs[b];
    s.b = b;
    if (p.cu_seqlens_q != nullptr) {
      s.q_row0 = p.cu_seqlens_q[b];
      s.len_q = int64_t(p.cu_seqlens_q[b + 1]) - p.cu_seqlens_q[b];
    } else {
      s.len_q = p.seqlen_q;
    }
    if (p.cu_seqlens_k != nullptr) {
      s.k_row0 = p.cu_seqlens_k[b];
      s.len_k = int64_t(p.cu_seqlens_k[b + 1]) - p.cu_seqlens_k[b];
    } else {
      s.len_k = p.seqlen_k;
    }
    TORCH_CHECK(s.len_q >= 0 && s.len_k >= 0, op, ": sequence ", b, " has negative length (q ",
                s.len_q, ", k ", s.len_k, "); cu_seqlens must be non-decreasing");
    s.flat_q0 = flat;
    flat += s.len_q;
    const bool streaming = p.sparse_mode == SparseMode::kStreaming ||
                           (p.sparse_mode == SparseMode::kPerSequence && p.use_sparse[b]);
    // kPerSequence runs its dense sequences causally (DESIGN.md section 3, flux_attention).
    const bool causal = p.causal || p.sparse_mode != SparseMode::kDense;
    s.rule = make_row_rule(s.len_q, s.len_k, causal, streaming, p.pattern);
  }
  return seqs;
}

inline int64_t total_rows(const std::vector<Sequence>& seqs) {
  return seqs.empty() ? 0 : seqs.back().flat_q0 + seqs.back().len_q;
}

// Element (b, row, h, 0) of a [.., rows, heads, D] operand; `row` already includes cu_seqlens.
template <typename T, typename Void>
inline T* row_ptr(Void* base, int64_t batch_stride, int64_t row_stride, int64_t head_stride, int64_t b,
                  int64_t row, int64_t h) {
  return static_cast<T*>(base) + b * batch_stride + row * row_stride + h * head_stride;
}

// ---------------------------------------------------------------------------------------------------
// tiles

// Calls f(j0, j1, kind) for the key tiles rows [i0, i1) must visit: only inside key_ranges_for_rows
// (so a streaming row tile costs O(window), not O(Lk)), skipping kSkip tiles. Tiles never cross a
// multiple of `tile`, so each lies inside one staged panel (KeyPanels); a range starting mid-panel
// (the streaming window) begins with a shorter tile.
template <typename F>
inline void for_each_key_tile(const RowRule& r, int64_t i0, int64_t i1, int64_t tile, F&& f) {
  const KeyRanges kr = key_ranges_for_rows(r, i0, i1);
  auto run = [&](int64_t lo, int64_t hi) {
    for (int64_t j0 = lo; j0 < hi;) {
      const int64_t j1 = std::min(hi, (j0 / tile + 1) * tile);
      const TileKind kind = classify_tile(r, i0, i1, j0, j1);
      if (kind != TileKind::kSkip) f(j0, j1, kind);
      j0 = j1;
    }
  };
  run(0, kr.a_end);
  run(kr.b_start, kr.b_end);
}

// Calls f(i0, i1, kind) for the row tiles that see keys [j0, j1) (rows_for_keys), skipping kSkip.
template <typename F>
inline void for_each_row_tile(const RowRule& r, int64_t j0, int64_t j1, int64_t tile, F&& f) {
  const RowRange rr = rows_for_keys(r, j0, j1);
  for (int64_t i0 = rr.lo; i0 < rr.hi; i0 += tile) {
    const int64_t i1 = std::min(rr.hi, i0 + tile);
    const TileKind kind = classify_tile(r, i0, i1, j0, j1);
    if (kind != TileKind::kSkip) f(i0, i1, kind);
  }
}

// Keys rows [i0, i1) visit, for ordering work items by cost.
inline int64_t key_span(const RowRule& r, int64_t i0, int64_t i1) {
  const KeyRanges kr = key_ranges_for_rows(r, i0, i1);
  return kr.a_end + std::max<int64_t>(0, kr.b_end - kr.b_start);
}

// A tile of one sequence: query rows (forward, dq) or keys (dk/dv) [lo, hi).
struct SeqTile {
  int32_t seq;
  int64_t lo;
  int64_t hi;
  int64_t cost;
};

// Sorts tiles costliest first: the work queue then hands out long causal/varlen tiles before short
// ones, which keeps every thread busy until the end (longest-processing-time-first).
inline void sort_by_cost(std::vector<SeqTile>& tiles) {
  std::stable_sort(tiles.begin(), tiles.end(),
                   [](const SeqTile& a, const SeqTile& b) { return a.cost > b.cost; });
}

inline std::vector<SeqTile> plan_query_tiles(const std::vector<Sequence>& seqs, int64_t tile) {
  std::vector<SeqTile> tiles;
  for (size_t s = 0; s < seqs.size(); ++s) {
    for (int64_t i0 = 0; i0 < seqs[s].len_q; i0 += tile) {
      const int64_t i1 = std::min(seqs[s].len_q, i0 + tile);
      tiles.push_back({int32_t(s), i0, i1, (i1 - i0) * (1 + key_span(seqs[s].rule, i0, i1))});
    }
  }
  sort_by_cost(tiles);
  return tiles;
}

inline std::vector<SeqTile> plan_key_tiles(const std::vector<Sequence>& seqs, int64_t tile) {
  std::vector<SeqTile> tiles;
  for (size_t s = 0; s < seqs.size(); ++s) {
    for (int64_t j0 = 0; j0 < seqs[s].len_k; j0 += tile) {
      const int64_t j1 = std::min(seqs[s].len_k, j0 + tile);
      const RowRange rr = rows_for_keys(seqs[s].rule, j0, j1);
      tiles.push_back({int32_t(s), j0, j1, (j1 - j0) * (1 + std::max<int64_t>(0, rr.hi - rr.lo))});
    }
  }
  sort_by_cost(tiles);
  return tiles;
}

// Sets s[j - j0] = -inf for the keys of [j0, j1) row i does not see. This is is_visible in its row
// form (row i hides [key_end(i), Lk) and, when streaming, [sink_end(i), local_start(i))), evaluated
// once per row instead of once per element; it runs on kPartial tiles only.
template <typename A>
inline void mask_row(const RowRule& r, int64_t i, int64_t j0, int64_t j1, A* s) {
  const A ninf = -std::numeric_limits<A>::infinity();
  auto hide = [&](int64_t lo, int64_t hi) {
    lo = std::max(lo, j0);
    hi = std::min(hi, j1);
    for (int64_t j = lo; j < hi; ++j) s[j - j0] = ninf;
  };
  hide(row_key_end(r, i), j1);
  if (r.streaming) hide(row_sink_end(r, i), row_local_start(r, i));
}

// ---------------------------------------------------------------------------------------------------
// threads and scratch

// Runs body(scratch, item) for every item in [0, n) on at::parallel_for's threads, one scratch per
// thread. Items are claimed from a shared counter instead of parallel_for's static split because
// causal, streaming and varlen items differ in cost by up to Lk / tile. Every item writes only its
// own outputs in a fixed order, so results do not depend on which thread ran which item.
template <typename MakeScratch, typename Body>
void run_items(int64_t n, MakeScratch&& make_scratch, Body&& body) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    auto scratch = make_scratch();
    for (int64_t item = next.fetch_add(1, std::memory_order_relaxed); item < n;
         item = next.fetch_add(1, std::memory_order_relaxed)) {
      body(scratch, item);
    }
  });
}

// 64-byte aligned (one cache line, one AVX-512 vector), uninitialised.
template <typename A>
class Buffer {
 public:
  explicit Buffer(int64_t n)
      : data_(static_cast<A*>(::operator new[](sizeof(A) * std::max<int64_t>(n, 1),
                                                 std::align_val_t(64)))) {}
  A* get() const { return data_.get(); }

 private:
  struct Free {
    void operator()(A* ptr) const { ::operator delete[](ptr, std::align_val_t(64)); }
  };
  std::unique_ptr<A, Free> data_;
};

enum class PanelLayout { kTransposed, kRows };

// Key-side operands staged once per call, one panel per (aligned key tile, kv head): transposed
// panels [d x tile] (K^T, V^T: the B operands of S = Q K^T and dP = dO V^T, leading dimension tile)
// or widened fp16/bf16 rows [tile x d]. Building them per (query tile, key tile) pair instead cost
// ~12 % of the forward (strided transposes repeated Lq / kBlockQ times), and a GQA group now shares
// one copy. Memory: one fp32/fp64 copy of K (or V) per staged operand.
template <typename A>
class KeyPanels {
 public:
  KeyPanels(const std::vector<Sequence>& seqs, PanelLayout layout, int64_t heads, int64_t d,
            int64_t tile)
      : layout_(layout), heads_(heads), d_(d), tile_(tile), first_(first_tiles(seqs, tile)),
        data_(heads * first_.back() * d * tile) {}

  // Key j0 of sequence `seq`, kv head h: its column of a transposed panel or its row of a row panel.
  A* at(int64_t seq, int64_t j0, int64_t h) const {
    A* panel = data_.get() + (h * first_.back() + first_[seq] + j0 / tile_) * d_ * tile_;
    return panel + (layout_ == PanelLayout::kTransposed ? j0 % tile_ : (j0 % tile_) * d_);
  }
  // Leading dimension of the panels as a GEMM operand.
  int64_t ld() const { return layout_ == PanelLayout::kTransposed ? tile_ : d_; }
  PanelLayout layout() const { return layout_; }
  int64_t heads() const { return heads_; }
  int64_t tile() const { return tile_; }

 private:
  static std::vector<int64_t> first_tiles(const std::vector<Sequence>& seqs, int64_t tile) {
    std::vector<int64_t> first(seqs.size() + 1, 0);
    for (size_t s = 0; s < seqs.size(); ++s) first[s + 1] = first[s] + (seqs[s].len_k + tile - 1) / tile;
    return first;
  }

  PanelLayout layout_;
  int64_t heads_;
  int64_t d_;
  int64_t tile_;
  std::vector<int64_t> first_;
  Buffer<A> data_;
};

}  // namespace flux::cpu::detail

FLUX_CPU_VEC_BEGIN
namespace flux::cpu::detail {

using at::vec::Vectorized;

template <typename A>
inline Vectorized<A> vexp(const Vectorized<A>& x);
// ATen's inline polynomial exp (the one its CPU flash attention uses) rather than a Sleef call: its
// ~1e-6 relative error left the outputs' error unchanged against fp64 (fp32 rounding of the GEMMs
// dominates), and it is exactly 0 below ln(FLT_MIN), so masked -inf scores vanish.
template <>
inline Vectorized<float> vexp(const Vectorized<float>& x) {
  return x.exp_u20();
}
template <>
inline Vectorized<double> vexp(const Vectorized<double>& x) {
  return x.exp();
}

template <typename A>
inline A hsum(const Vectorized<A>& v) {
  alignas(64) A lanes[Vectorized<A>::size()];
  v.store(lanes);
  A s = 0;
  for (int k = 0; k < Vectorized<A>::size(); ++k) s += lanes[k];
  return s;
}

// A NaN score (a NaN in the query row) must make the row NaN, not vanish into std::max.
template <typename A>
inline A nan_max(A a, A b) {
  return (b > a || std::isnan(b)) && !std::isnan(a) ? b : a;
}

template <typename A>
inline A hmax(const Vectorized<A>& v) {
  alignas(64) A lanes[Vectorized<A>::size()];
  v.store(lanes);
  A m = lanes[0];
  for (int k = 1; k < Vectorized<A>::size(); ++k) m = nan_max(m, lanes[k]);
  return m;
}

// The last n % W elements, with the lanes past them set to `fill`.
template <typename A>
inline Vectorized<A> load_tail(const A* x, int64_t rem, A fill) {
  return Vectorized<A>::set(Vectorized<A>(fill), Vectorized<A>::loadu(x, rem), rem);
}

// dst[c] = mul * src[c], widening fp16/bf16 to fp32.
template <typename T, typename A>
inline void load_row(const T* src, int64_t n, A mul, A* dst) {
  using VA = Vectorized<A>;
  const VA vmul(mul);
  int64_t c = 0;
  if constexpr (std::is_same_v<T, A>) {
    for (; c + VA::size() <= n; c += VA::size()) (VA::loadu(src + c) * vmul).store(dst + c);
  } else {
    using VT = Vectorized<T>;
    for (; c + VT::size() <= n; c += VT::size()) {
      auto [lo, hi] = at::vec::convert_to_float<T>(VT::loadu(src + c));
      (lo * vmul).store(dst + c);
      (hi * vmul).store(dst + c + VA::size());
    }
  }
  for (; c < n; ++c) dst[c] = mul * static_cast<A>(src[c]);
}

// dst[c] = T(mul * src[c]), rounding to nearest even for fp16/bf16.
template <typename T, typename A>
inline void store_row(const A* src, int64_t n, A mul, T* dst) {
  using VA = Vectorized<A>;
  const VA vmul(mul);
  int64_t c = 0;
  if constexpr (std::is_same_v<T, A>) {
    for (; c + VA::size() <= n; c += VA::size()) (VA::loadu(src + c) * vmul).store(dst + c);
  } else {
    using VT = Vectorized<T>;
    for (; c + VT::size() <= n; c += VT::size()) {
      const VA lo = VA::loadu(src + c) * vmul;
      const VA hi = VA::loadu(src + c + VA::size()) * vmul;
      at::vec::convert_from_float<T>(lo, hi).store(dst + c);
    }
  }
  for (; c < n; ++c) dst[c] = static_cast<T>(mul * src[c]);
}

template <typename T>
inline void zero_row(int64_t n, T* dst) {
  std::fill(dst, dst + n, T(0));
}

// dst[c * ld_dst + r] = src[r * ld_src + c] for r < rows, c < cols.
template <typename A>
inline void transpose(const A* src, int64_t ld_src, int64_t rows, int64_t cols, A* dst,
                      int64_t ld_dst) {
#if defined(CPU_CAPABILITY_AVX512)
  // AVX-512's version takes any shape (16 x 16 blocks, masked edges).
  if constexpr (std::is_same_v<A, float>) {
    at::vec::transpose_mxn<float>(src, ld_src, dst, ld_dst, int(rows), int(cols));
    return;
  }
#endif
  int64_t r = 0;
  if constexpr (std::is_same_v<A, float>) {
    for (; r + 8 <= rows; r += 8) {
      int64_t c = 0;
      for (; c + 8 <= cols; c += 8) {
        at::vec::transpose_mxn<float, 8, 8>(src + r * ld_src + c, ld_src, dst + c * ld_dst + r, ld_dst);
      }
      for (; c < cols; ++c) {
        for (int64_t k = 0; k < 8; ++k) dst[c * ld_dst + r + k] = src[(r + k) * ld_src + c];
      }
    }
  }
  for (; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) dst[c * ld_dst + r] = src[r * ld_src + c];
  }
}

template <typename A>
inline A row_max(const A* x, int64_t n) {
  using V = Vectorized<A>;
  const A ninf = -std::numeric_limits<A>::infinity();
  V vmax(ninf);
  int64_t c = 0;
  for (; c + V::size() <= n; c += V::size()) vmax = at::vec::maximum(vmax, V::loadu(x + c));
  if (c < n) vmax = at::vec::maximum(vmax, load_tail(x + c, n - c, ninf));
  return hmax(vmax);
}

// x[c] = exp(x[c] - m); returns the sum of the new values.
template <typename A>
inline A exp_sub_sum(A* x, int64_t n, A m) {
  using V = Vectorized<A>;
  const V vm(m);
  V vsum(A(0));
  int64_t c = 0;
  for (; c + V::size() <= n; c += V::size()) {
    const V e = vexp(V::loadu(x + c) - vm);
    e.store(x + c);
    vsum = vsum + e;
  }
  if (c < n) {
    const int64_t rem = n - c;
    const V e = vexp(load_tail(x + c, rem, -std::numeric_limits<A>::infinity()) - vm);
    e.store(x + c, rem);
    vsum = vsum + e;
  }
  return hsum(vsum);
}

template <typename A>
inline void scale_row(A* x, int64_t n, A s) {
  using V = Vectorized<A>;
  const V vs(s);
  int64_t c = 0;
  for (; c + V::size() <= n; c += V::size()) (V::loadu(x + c) * vs).store(x + c);
  for (; c < n; ++c) x[c] *= s;
}

// dp[c] = p[c] * (dp[c] - delta): the softmax backward of one row.
template <typename A>
inline void softmax_grad_row(const A* p, A* dp, int64_t n, A delta) {
  using V = Vectorized<A>;
  const V vd(delta);
  int64_t c = 0;
  for (; c + V::size() <= n; c += V::size()) {
    (V::loadu(p + c) * (V::loadu(dp + c) - vd)).store(dp + c);
  }
  for (; c < n; ++c) dp[c] = p[c] * (dp[c] - delta);
}

// sum_c a[c] * b[c] in the accumulation type.
template <typename T, typename A>
inline A dot_row(const T* a, const T* b, int64_t n) {
  using VA = Vectorized<A>;
  VA acc(A(0));
  int64_t c = 0;
  if constexpr (std::is_same_v<T, A>) {
    for (; c + VA::size() <= n; c += VA::size()) {
      acc = at::vec::fmadd(VA::loadu(a + c), VA::loadu(b + c), acc);
    }
  } else {
    using VT = Vectorized<T>;
    for (; c + VT::size() <= n; c += VT::size()) {
      auto [a0, a1] = at::vec::convert_to_float<T>(VT::loadu(a + c));
      auto [b0, b1] = at::vec::convert_to_float<T>(VT::loadu(b + c));
      acc = at::vec::fmadd(a0, b0, acc);
      acc = at::vec::fmadd(a1, b1, acc);
    }
  }
  A s = hsum(acc);
  for (; c < n; ++c) s += static_cast<A>(a[c]) * static_cast<A>(b[c]);
  return s;
}

// C[m x n] = A[m x k] * B[k x n] (+ C when accumulate); row-major with leading dimensions.
//
// fp32 goes through cpublas::brgemm, ATen's exported entry to its CPU BLAS (oneDNN's JIT brgemm
// micro-kernel, MKL/OpenBLAS sgemm when oneDNN is off). cpublas::gemm itself cannot be called from an
// extension: libtorch_cpu exports neither its overloads nor internal::normalize_last_dims, which its
// template calls, so the library would fail to load with an undefined symbol.
inline void tile_gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                      int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  if (m == 0 || n == 0) return;
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, accumulate, a, b, c, /*is_vnni=*/false);
}

// ATen exports no fp64 tile product at all; fp64 exists for gradcheck-sized problems, where a
// vectorised row-times-panel loop is fast enough.
inline void tile_gemm(int64_t m, int64_t n, int64_t k, const double* a, int64_t lda, const double* b,
                      int64_t ldb, double* c, int64_t ldc, bool accumulate) {
  using V = Vectorized<double>;
  for (int64_t i = 0; i < m; ++i) {
    double* ci = c + i * ldc;
    if (!accumulate) zero_row(n, ci);
    for (int64_t p = 0; p < k; ++p) {
      const double aip = a[i * lda + p];
      const double* bp = b + p * ldb;
      const V va(aip);
      int64_t j = 0;
      for (; j + V::size() <= n; j += V::size()) {
        at::vec::fmadd(va, V::loadu(bp + j), V::loadu(ci + j)).store(ci + j);
      }
      for (; j < n; ++j) ci[j] += aip * bp[j];
    }
  }
}

// Loads rows [0, rows) of a [rows x D] operand (row stride ld) as fp32/fp64 scaled by mul.
template <typename T, typename A>
inline void load_tile(const T* src, int64_t ld, int64_t rows, int64_t d, A mul, A* dst) {
  for (int64_t r = 0; r < rows; ++r) load_row(src + r * ld, d, mul, dst + r * d);
}

// Writes the transposed panel dst[d x rows] (leading dimension ld_dst) of a [rows x D] operand;
// fp16/bf16 rows are widened into `stage` ([rows x D]) first.
template <typename T, typename A>
inline void load_tile_transposed(const T* src, int64_t ld, int64_t rows, int64_t d, A* stage, A* dst,
                                 int64_t ld_dst) {
  if constexpr (std::is_same_v<T, A>) {
    transpose(src, ld, rows, d, dst, ld_dst);
  } else {
    load_tile(src, ld, rows, d, A(1), stage);
    transpose(stage, d, rows, d, dst, ld_dst);
  }
}

// Fills every panel of `panels` from a key-side operand (k or v: base pointer and strides).
template <typename T, typename A>
void stage_panels(KeyPanels<A>& panels, const std::vector<Sequence>& seqs,
                  const void* src, int64_t batch_stride, int64_t row_stride, int64_t head_stride,
                  int64_t d) {
  const int64_t tile = panels.tile();
  const int64_t heads = panels.heads();
  std::vector<SeqTile> tiles;
  for (size_t s = 0; s < seqs.size(); ++s) {
    for (int64_t j0 = 0; j0 < seqs[s].len_k; j0 += tile) {
      tiles.push_back({int32_t(s), j0, std::min(seqs[s].len_k, j0 + tile), 0});
    }
  }
  run_items(
      int64_t(tiles.size()) * heads, [&] { return Buffer<A>(tile * d); },
      [&](Buffer<A>& stage, int64_t item) {
        const SeqTile& t = tiles[item / heads];
        const int64_t h = item % heads;
        const Sequence& seq = seqs[t.seq];
        const T* rows =
            row_ptr<const T>(src, batch_stride, row_stride, head_stride, seq.b, seq.k_row0 + t.lo, h);
        A* dst = panels.at(t.seq, t.lo, h);
        if (panels.layout() == PanelLayout::kTransposed) {
          load_tile_transposed(rows, row_stride, t.hi - t.lo, d, stage.get(), dst, tile);
        } else {
          load_tile(rows, row_stride, t.hi - t.lo, d, A(1), dst);
        }
      });
}

}  // namespace flux::cpu::detail
FLUX_CPU_VEC_END
