// Plain-ATen references for the op tests, in double precision with explicit masks. They share no code
// with the library: the key set comes from DESIGN.md section 1 written as arange comparisons (not from
// flux/streaming.h), and K/V heads are expanded, which the kernels must never do.
#pragma once

#include <cstdint>
#include <limits>
#include <string>
#include <utility>

#include <ATen/ATen.h>

#include "ops/api.h"

namespace flux_test {

// Which keys row i of a (lq, lk) sequence sees: bool [lq, lk].
inline at::Tensor reference_mask(int64_t lq, int64_t lk, bool causal, bool streaming,
                                 const flux_attention::Streaming& p) {
  const auto opts = at::TensorOptions().dtype(at::kLong);
  const at::Tensor i = at::arange(lq, opts).unsqueeze(1);
  const at::Tensor j = at::arange(lk, opts).unsqueeze(0);
  if (!causal && !streaming) return at::ones({lq, lk}, at::kBool);
  const at::Tensor t = i + (lk - lq);  // bottom-right alignment
  at::Tensor mask = j <= t;
  if (streaming) {
    const at::Tensor t_block = at::div(t, p.block_size, "floor");
    const at::Tensor j_block = at::div(j, p.block_size, "floor");
    mask = mask & ((j < p.sink_tokens) | (j_block >= t_block - (p.local_blocks - 1)));
  }
  return mask;
}

struct RefAttention {
  at::Tensor out;  // [lq, Hq, D]
  at::Tensor lse;  // [Hq, lq]; -inf for rows that see nothing
};

// One sequence: q [lq, Hq, D], k/v [lk, Hkv, D] (any floating dtype; computed in double and
// differentiable), mask [lq, lk].
inline RefAttention reference_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const at::Tensor& mask, double scale) {
  const int64_t group = q.size(1) / k.size(1);
  const at::Tensor qd = q.to(at::kDouble);
  const at::Tensor kd = k.to(at::kDouble).repeat_interleave(group, 1);
  const at::Tensor vd = v.to(at::kDouble).repeat_interleave(group, 1);
  const at::Tensor s = at::einsum("ihd,jhd->hij", {qd, kd}) * scale;
  // A finite fill keeps fully masked rows NaN-free in forward and backward; they are replaced below.
  const at::Tensor sm = s.masked_fill(mask.logical_not().unsqueeze(0), -1e30);
  const at::Tensor lse = at::logsumexp(sm, {-1});
  const at::Tensor p = at::exp(sm - lse.unsqueeze(-1));
  const at::Tensor out = at::einsum("hij,jhd->ihd", {p, vd});
  const at::Tensor any = mask.any(1);
  RefAttention r;
  r.out = at::where(any.view({-1, 1, 1}), out, at::zeros_like(out));
  r.lse = at::where(any.view({1, -1}), lse,
                    at::full_like(lse, -std::numeric_limits<double>::infinity()));
  return r;
}

// max |a - b| over elements (0 for empty tensors); NaN anywhere makes it NaN.
inline double max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0) return 0.0;
  const at::Tensor d = (a.to(at::kDouble) - b.to(at::kDouble)).abs();
  if (d.isnan().any().item<bool>()) return std::numeric_limits<double>::quiet_NaN();
  return d.max().item<double>();
}

// LSE comparison: -inf exactly where the reference has -inf, and a relative error elsewhere.
inline double lse_error(const at::Tensor& lse, const at::Tensor& ref) {
  if (lse.numel() == 0) return 0.0;
  const at::Tensor a = lse.to(at::kDouble), b = ref.to(at::kDouble);
  const at::Tensor ref_empty = at::isneginf(b);
  if (!at::equal(at::isneginf(a), ref_empty)) return std::numeric_limits<double>::infinity();
  const at::Tensor fa = a.masked_fill(ref_empty, 0.0), fb = b.masked_fill(ref_empty, 0.0);
  const at::Tensor d = (fa - fb).abs() / (fb.abs() + 1.0);
  if (d.isnan().any().item<bool>()) return std::numeric_limits<double>::quiet_NaN();
  return d.max().item<double>();
}

inline std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

}  // namespace flux_test
