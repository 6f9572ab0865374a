// The C++ API (csrc/ops/api.h) on small CPU shapes against the double-precision references of
// reference.h: forward values and LSE, gradients through torch::autograd, decode against contiguous and
// paged caches, pooling and the Gumbel router. Positions no op may read (varlen rows past
// cu_seqlens[-1], cache slots past cache_seqlens, pages outside the block table) hold NaN.
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/csrc/autograd/autograd.h>

#include "catch_compat.h"
#include "ops/api.h"
#include "reference.h"

using flux_attention::Streaming;
using flux_attention::Varlen;
using flux_test::lse_error;
using flux_test::max_abs_diff;

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// The kernels receive the softmax scale as fp32 (flux/params.h), so the reference rounds the scale
// the same way; otherwise a scale like 1/sqrt(32) alone puts fp64 outputs ~3e-8 off and the fp64
// bounds below could not see whether the kernels really accumulate in fp64.
double kernel_scale(std::optional<double> scale, int64_t head_dim) {
  const double s = scale ? *scale : 1.0 / std::sqrt(static_cast<double>(head_dim));
  return static_cast<double>(static_cast<float>(s));
}

// Error bounds against the fp64 reference. The LSE output is fp32 whatever the input dtype, and the
// backward recomputes probabilities from it, so fp64 gradients are only as exact as an fp32 LSE.
struct Tolerance {
  double out, lse, grad;
};
// Half-precision bounds cover the output's own rounding (bf16: 2^-8 relative) plus probabilities
// rounded before the PV product, on values of order 1.
Tolerance tolerance(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble: return {1e-9, 1e-6, 1e-6};
    case at::kFloat: return {5e-6, 2e-6, 2e-5};
    case at::kHalf: return {4e-3, 2e-3, 3e-3};
    default: return {1.6e-2, 2e-3, 2.5e-2};
  }
}

at::Tensor randn(at::IntArrayRef shape, at::ScalarType dtype) {
  return at::randn(shape, at::TensorOptions().dtype(dtype));
}

at::Tensor int32_tensor(const std::vector<int64_t>& v) {
  return at::tensor(std::vector<int32_t>(v.begin(), v.end()), at::kInt);
}

at::Tensor bool_tensor(const std::vector<bool>& v) {
  at::Tensor t = at::empty({static_cast<int64_t>(v.size())}, at::kBool);
  for (size_t i = 0; i < v.size(); ++i) t[i] = static_cast<bool>(v[i]);
  return t;
}

std::vector<int64_t> offsets(const std::vector<int64_t>& lens) {
  std::vector<int64_t> cu{0};
  for (int64_t l : lens) cu.push_back(cu.back() + l);
  return cu;
}

// ---- attention batches (padded or varlen) and the per-sequence reference ----

struct Batch {
  at::Tensor q, k, v;  // padded [B, S, H, D] or varlen [T, H, D]
  bool varlen = false;
  std::vector<int64_t> cu_q, cu_k;  // varlen offsets (host copies)
  int64_t batch = 0;

  std::optional<Varlen> varlen_arg() const {
    if (!varlen) return std::nullopt;
    Varlen vl;
    vl.cu_seqlens_q = int32_tensor(cu_q);
    vl.cu_seqlens_k = int32_tensor(cu_k);
    return vl;
  }
  // Sequence b of a q-like (is_q) or k-like tensor, [L, H, D].
  at::Tensor seq(const at::Tensor& t, int64_t b, bool is_q) const {
    if (!varlen) return t[b];
    const auto& cu = is_q ? cu_q : cu_k;
    return t.slice(0, cu[b], cu[b + 1]);
  }
  // The rows that belong to some sequence (varlen tails excluded).
  at::Tensor valid(const at::Tensor& t, bool is_q) const {
    return varlen ? t.slice(0, 0, (is_q ? cu_q : cu_k).back()) : t;
  }
  at::Tensor valid_lse(const at::Tensor& lse) const {
    return varlen ? lse.slice(1, 0, cu_q.back()) : lse;
  }
};

Batch padded_batch(int64_t b, int64_t lq, int64_t lk, int64_t hq, int64_t hkv, int64_t d,
                   at::ScalarType dtype, bool strided) {
  Batch bt;
  bt.batch = b;
  if (strided) {  // [B, H, S, D] storage seen as [B, S, H, D]: no unit stride on the row dimension
    bt.q = randn({b, hq, lq, d}, dtype).transpose(1, 2);
    bt.k = randn({b, hkv, lk, d}, dtype).transpose(1, 2);
    bt.v = randn({b, hkv, lk, d}, dtype).transpose(1, 2);
  } else {
    bt.q = randn({b, lq, hq, d}, dtype);
    bt.k = randn({b, lk, hkv, d}, dtype);
    bt.v = randn({b, lk, hkv, d}, dtype);
  }
  return bt;
}

// Varlen batch with `tail` extra NaN rows after the last sequence of q and of k/v.
Batch varlen_batch(const std::vector<int64_t>& lens_q, const std::vector<int64_t>& lens_k, int64_t hq,
                   int64_t hkv, int64_t d, at::ScalarType dtype, int64_t tail = 3) {
  Batch bt;
  bt.varlen = true;
  bt.batch = static_cast<int64_t>(lens_q.size());
  bt.cu_q = offsets(lens_q);
  bt.cu_k = offsets(lens_k);
  bt.q = randn({bt.cu_q.back() + tail, hq, d}, dtype);
  bt.k = randn({bt.cu_k.back() + tail, hkv, d}, dtype);
  bt.v = randn({bt.cu_k.back() + tail, hkv, d}, dtype);
  for (at::Tensor* t : {&bt.q, &bt.k, &bt.v}) t->slice(0, t->size(0) - tail).fill_(kNaN);
  return bt;
}

struct AttnCall {
  enum Op { kFull, kSparse, kFlux } op = kFull;
  bool causal = false;
  Streaming pattern{};
  std::optional<double> scale;
  std::vector<bool> use_sparse;  // kFlux: one flag per sequence

  bool streaming(int64_t b) const { return op == kSparse || (op == kFlux && use_sparse[b]); }
  bool is_causal() const { return op != kFull || causal; }
  std::string str() const {
    std::string s = op == kFull ? (causal ? "full causal" : "full") : op == kSparse ? "sparse" : "flux";
    if (op != kFull) {
      s += " sink=" + std::to_string(pattern.sink_tokens) +
           " local_blocks=" + std::to_string(pattern.local_blocks) +
           " block=" + std::to_string(pattern.block_size);
    }
    if (op == kFlux) {
      s += " use_sparse=";
      for (bool f : use_sparse) s += f ? '1' : '0';
    }
    if (scale) s += " scale=" + std::to_string(*scale);
    return s;
  }
};

std::tuple<at::Tensor, at::Tensor> run(const AttnCall& c, const Batch& bt, const at::Tensor& q,
                                       const at::Tensor& k, const at::Tensor& v) {
  switch (c.op) {
    case AttnCall::kFull:
      return flux_attention::full_attention(q, k, v, c.causal, c.scale, bt.varlen_arg());
    case AttnCall::kSparse:
      return flux_attention::sparse_attention(q, k, v, c.pattern, c.scale, bt.varlen_arg());
    default:
      return flux_attention::flux_attention(q, k, v, bool_tensor(c.use_sparse), c.pattern, c.scale,
                                            bt.varlen_arg());
  }
}

// Reference output and LSE over the valid rows, in the op's layout.
flux_test::RefAttention reference(const AttnCall& c, const Batch& bt, const at::Tensor& q,
                                  const at::Tensor& k, const at::Tensor& v) {
  std::vector<at::Tensor> outs, lses;
  const double scale = kernel_scale(c.scale, q.size(-1));
  for (int64_t b = 0; b < bt.batch; ++b) {
    const at::Tensor qb = bt.seq(q, b, true), kb = bt.seq(k, b, false), vb = bt.seq(v, b, false);
    const at::Tensor mask = flux_test::reference_mask(qb.size(0), kb.size(0), c.is_causal(),
                                                      c.streaming(b), c.pattern);
    flux_test::RefAttention r = flux_test::reference_attention(qb, kb, vb, mask, scale);
    outs.push_back(r.out);
    lses.push_back(r.lse);
  }
  flux_test::RefAttention r;
  r.out = bt.varlen ? at::cat(outs, 0) : at::stack(outs, 0);
  r.lse = bt.varlen ? at::cat(lses, 1) : at::stack(lses, 0);
  return r;
}

std::string describe(const AttnCall& c, const Batch& bt) {
  std::string s = c.str() + (bt.varlen ? " varlen" : " padded") + " q " + flux_test::shape_str(bt.q) +
                  " k " + flux_test::shape_str(bt.k) + " " + std::string(c10::toString(bt.q.scalar_type()));
  if (bt.varlen) {
    s += " cu_q=";
    for (int64_t x : bt.cu_q) s += std::to_string(x) + ",";
    s += " cu_k=";
    for (int64_t x : bt.cu_k) s += std::to_string(x) + ",";
  }
  return s;
}

void check_forward(const AttnCall& c, const Batch& bt) {
  INFO(describe(c, bt));
  const Tolerance tol = tolerance(bt.q.scalar_type());
  const auto [out, lse] = run(c, bt, bt.q, bt.k, bt.v);
  REQUIRE(out.sizes() == bt.q.sizes());
  REQUIRE(out.scalar_type() == bt.q.scalar_type());
  REQUIRE(lse.scalar_type() == at::kFloat);
  if (bt.varlen) {
    REQUIRE(lse.sizes() == at::IntArrayRef({bt.q.size(1), bt.q.size(0)}));
  } else {
    REQUIRE(lse.sizes() == at::IntArrayRef({bt.q.size(0), bt.q.size(2), bt.q.size(1)}));
  }
  const flux_test::RefAttention ref = reference(c, bt, bt.q, bt.k, bt.v);
  const double out_err = max_abs_diff(bt.valid(out, true), ref.out);
  const double lse_err = lse_error(bt.valid_lse(lse), ref.lse);
  CHECK(out_err <= tol.out);
  CHECK(lse_err <= tol.lse);
}

// Gradients of sum(out * gout) + sum(lse * glse) (rows that see no key contribute no LSE term)
// through the op's autograd against autograd through the reference.
void check_backward(const AttnCall& c, const Batch& bt) {
  INFO(describe(c, bt));
  const Tolerance tol = tolerance(bt.q.scalar_type());
  auto leaf = [](const at::Tensor& t) { return t.detach().clone().set_requires_grad(true); };
  const at::Tensor q = leaf(bt.q), k = leaf(bt.k), v = leaf(bt.v);
  const auto [out, lse] = run(c, bt, q, k, v);
  REQUIRE(out.requires_grad());
  const at::Tensor gout = at::randn_like(bt.valid(out, true).to(at::kDouble));
  const at::Tensor glse = at::randn_like(bt.valid_lse(lse).to(at::kDouble));
  auto loss_of = [&](const at::Tensor& o, const at::Tensor& l) {
    const at::Tensor finite = at::isfinite(l);
    return (o.to(at::kDouble) * gout).sum() +
           (at::where(finite, l.to(at::kDouble), at::zeros_like(glse)) * glse).sum();
  };
  const at::Tensor loss = loss_of(bt.valid(out, true), bt.valid_lse(lse));
  const auto grads = torch::autograd::grad({loss}, {q, k, v});

  const at::Tensor rq = leaf(bt.q), rk = leaf(bt.k), rv = leaf(bt.v);
  const flux_test::RefAttention ref = reference(c, bt, rq, rk, rv);
  const at::Tensor ref_loss = loss_of(ref.out, ref.lse);
  const auto ref_grads = torch::autograd::grad({ref_loss}, {rq, rk, rv});

  const char* names[] = {"dq", "dk", "dv"};
  for (int i = 0; i < 3; ++i) {
    INFO(names[i]);
    REQUIRE(grads[i].sizes() == ref_grads[i].sizes());
    // Varlen tail rows are in no sequence: zero gradient, like the reference's.
    const double err = max_abs_diff(grads[i], ref_grads[i]);
    const double magnitude = ref_grads[i].abs().max().item<double>() + 1.0;
    CHECK(err / magnitude <= tol.grad);
  }
}

struct Shape {
  int64_t batch, lq, lk, hq, hkv, d;
};

}  // namespace

// ---- full_attention ----

TEST_CASE("full_attention matches the reference on padded input", "[ops][full]") {
  const Shape s = GENERATE(values<Shape>({
      {1, 1, 1, 1, 1, 16},
      {2, 7, 7, 4, 2, 16},      // GQA
      {2, 13, 29, 4, 1, 32},    // MQA, Lq < Lk
      {1, 29, 13, 6, 3, 8},     // Lq > Lk: causal rows before the first key see nothing
      {3, 33, 33, 2, 2, 64},
      {1, 17, 40, 2, 1, 128},
  }));
  const bool causal = GENERATE(false, true);
  const at::ScalarType dtype = GENERATE(at::kFloat, at::kDouble);
  at::manual_seed(s.lq * 1000 + s.lk + causal);
  AttnCall c;
  c.causal = causal;
  check_forward(c, padded_batch(s.batch, s.lq, s.lk, s.hq, s.hkv, s.d, dtype, false));
}

TEST_CASE("attention in fp16 and bf16", "[ops][half]") {
  const at::ScalarType dtype = GENERATE(at::kHalf, at::kBFloat16);
  at::manual_seed(13);
  AttnCall c;
  SECTION("full causal, padded") {
    c.causal = true;
    check_forward(c, padded_batch(2, 21, 35, 4, 2, 64, dtype, false));
  }
  SECTION("sparse, varlen") {
    c.op = AttnCall::kSparse;
    c.pattern = {4, 2, 4};
    check_forward(c, varlen_batch({17, 0, 30}, {17, 5, 30}, 4, 1, 64, dtype));
  }
  SECTION("flux, backward") {
    c.op = AttnCall::kFlux;
    c.pattern = {4, 2, 4};
    c.use_sparse = {true, false};
    check_backward(c, varlen_batch({26, 19}, {26, 19}, 2, 1, 64, dtype));
  }
}

TEST_CASE("full_attention honours strides and an explicit scale", "[ops][full]") {
  at::manual_seed(7);
  AttnCall c;
  c.causal = GENERATE(false, true);
  c.scale = 0.37;
  check_forward(c, padded_batch(2, 19, 23, 4, 2, 32, at::kFloat, /*strided=*/true));
}

TEST_CASE("full_attention matches the reference on varlen input", "[ops][full][varlen]") {
  struct Lens {
    std::vector<int64_t> q, k;
  };
  const Lens lens = GENERATE(values<Lens>({
      {{5, 0, 17, 1}, {5, 0, 17, 1}},  // a zero-length sequence in the middle
      {{3, 11, 9}, {8, 11, 30}},       // Lq <= Lk per sequence
      {{12, 4}, {5, 0}},               // Lq > Lk, and a sequence with queries but no keys
  }));
  const bool causal = GENERATE(false, true);
  const at::ScalarType dtype = GENERATE(at::kFloat, at::kDouble);
  at::manual_seed(static_cast<uint64_t>(lens.q.size() * 100 + causal));
  AttnCall c;
  c.causal = causal;
  check_forward(c, varlen_batch(lens.q, lens.k, 4, 2, 16, dtype));
}

TEST_CASE("full_attention gradients match reference autograd", "[ops][full][backward]") {
  const at::ScalarType dtype = GENERATE(at::kDouble, at::kFloat);
  const bool causal = GENERATE(false, true);
  at::manual_seed(11 + causal);
  AttnCall c;
  c.causal = causal;
  SECTION("padded, GQA, Lq != Lk") { check_backward(c, padded_batch(2, 9, 14, 4, 2, 16, dtype, false)); }
  SECTION("padded, Lq > Lk") { check_backward(c, padded_batch(1, 14, 9, 2, 1, 8, dtype, false)); }
  SECTION("varlen with NaN tail") { check_backward(c, varlen_batch({6, 0, 13}, {6, 3, 20}, 4, 1, 16, dtype)); }
}

// ---- sparse_attention and flux_attention ----

TEST_CASE("sparse_attention matches the streaming reference", "[ops][sparse]") {
  const Streaming pattern = GENERATE(values<Streaming>({{4, 2, 4}, {8, 3, 4}, {2, 1, 2}, {3, 4, 1}}));
  const Shape s = GENERATE(values<Shape>({
      {2, 1, 1, 2, 1, 16},
      {1, 23, 23, 4, 2, 16},
      {2, 40, 40, 2, 2, 32},
      {1, 9, 37, 4, 4, 16},   // Lq < Lk (decode-like tail of a longer context)
      {1, 37, 9, 2, 1, 16},   // Lq > Lk
  }));
  const at::ScalarType dtype = GENERATE(at::kFloat, at::kDouble);
  at::manual_seed(s.lq * 31 + pattern.block_size);
  AttnCall c;
  c.op = AttnCall::kSparse;
  c.pattern = pattern;
  check_forward(c, padded_batch(s.batch, s.lq, s.lk, s.hq, s.hkv, s.d, dtype, false));
}

TEST_CASE("sparse_attention on varlen input", "[ops][sparse][varlen]") {
  at::manual_seed(5);
  AttnCall c;
  c.op = AttnCall::kSparse;
  c.pattern = {4, 2, 4};
  check_forward(c, varlen_batch({1, 26, 0, 13}, {1, 26, 0, 30}, 4, 2, 16, at::kFloat));
}

TEST_CASE("flux_attention routes each sequence by its own flag", "[ops][flux]") {
  const std::vector<bool> flags = GENERATE(values<std::vector<bool>>({
      {false, false, false, false},
      {true, true, true, true},
      {true, false, true, false},
      {false, false, true, false},  // one sparse sequence among dense ones
  }));
  at::manual_seed(3);
  AttnCall c;
  c.op = AttnCall::kFlux;
  c.pattern = {4, 2, 4};
  c.use_sparse = flags;
  SECTION("varlen") { check_forward(c, varlen_batch({30, 7, 0, 21}, {30, 19, 4, 21}, 4, 2, 16, at::kFloat)); }
  SECTION("padded") { check_forward(c, padded_batch(4, 25, 31, 4, 1, 16, at::kFloat, false)); }
}

TEST_CASE("sparse and flux attention gradients match reference autograd", "[ops][sparse][backward]") {
  const at::ScalarType dtype = GENERATE(at::kDouble, at::kFloat);
  at::manual_seed(17);
  AttnCall c;
  c.pattern = {4, 2, 4};
  SECTION("sparse padded") {
    c.op = AttnCall::kSparse;
    check_backward(c, padded_batch(2, 27, 27, 4, 2, 16, dtype, false));
  }
  SECTION("sparse varlen") {
    c.op = AttnCall::kSparse;
    check_backward(c, varlen_batch({19, 0, 26}, {23, 2, 26}, 2, 1, 16, dtype));
  }
  SECTION("flux varlen, mixed flags") {
    c.op = AttnCall::kFlux;
    c.use_sparse = {true, false, true};
    check_backward(c, varlen_batch({25, 18, 9}, {25, 30, 9}, 4, 2, 16, dtype));
  }
}

// ---- decode_attention ----

namespace {

struct DecodeCase {
  std::vector<int64_t> lens;  // cache_seqlens, the new token included
  std::vector<bool> use_sparse;
  int64_t page_size;          // 0: contiguous cache
};

void check_decode(const DecodeCase& dc, at::ScalarType dtype) {
  const int64_t batch = static_cast<int64_t>(dc.lens.size()), hq = 4, hkv = 2, d = 16;
  const Streaming pattern{4, 2, 4};
  int64_t capacity = 0;
  for (int64_t l : dc.lens) capacity = std::max(capacity, l);
  capacity += 5;
  // The logical cache of each sequence; slots at or past cache_seqlens are NaN.
  const at::Tensor k_logical = randn({batch, capacity, hkv, d}, dtype);
  const at::Tensor v_logical = randn({batch, capacity, hkv, d}, dtype);
  for (int64_t b = 0; b < batch; ++b) {
    k_logical[b].slice(0, dc.lens[b]).fill_(kNaN);
    v_logical[b].slice(0, dc.lens[b]).fill_(kNaN);
  }
  const at::Tensor q = randn({batch, hq, d}, dtype);
  const at::Tensor seqlens = int32_tensor(dc.lens);
  std::optional<at::Tensor> flags;
  if (!dc.use_sparse.empty()) flags = bool_tensor(dc.use_sparse);

  at::Tensor out, lse;
  std::string layout;
  if (dc.page_size == 0) {
    layout = "contiguous";
    std::tie(out, lse) = flux_attention::decode_attention(q, k_logical, v_logical, seqlens,
                                                          std::nullopt, flags, pattern);
  } else {
    // Pages in shuffled order; page 0 is a NaN page that no sequence owns, and block table entries
    // past a sequence's last page point at it, so reading them shows up as NaN.
    const int64_t ps = dc.page_size, pages_per_seq = (capacity + ps - 1) / ps;
    const int64_t num_pages = 1 + batch * pages_per_seq;
    const at::Tensor perm = at::randperm(num_pages - 1, at::kLong) + 1;
    at::Tensor k_pages = at::full({num_pages, ps, hkv, d}, kNaN, at::TensorOptions().dtype(dtype));
    at::Tensor v_pages = at::full({num_pages, ps, hkv, d}, kNaN, at::TensorOptions().dtype(dtype));
    std::vector<int64_t> table(static_cast<size_t>(batch * pages_per_seq), 0);
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t used = (dc.lens[b] + ps - 1) / ps;
      for (int64_t i = 0; i < used; ++i) {
        const int64_t page = perm[b * pages_per_seq + i].item<int64_t>();
        table[b * pages_per_seq + i] = page;
        const int64_t lo = i * ps, hi = std::min(lo + ps, capacity);
        k_pages[page].slice(0, 0, hi - lo).copy_(k_logical[b].slice(0, lo, hi));
        v_pages[page].slice(0, 0, hi - lo).copy_(v_logical[b].slice(0, lo, hi));
      }
    }
    const at::Tensor block_table = int32_tensor(table).view({batch, pages_per_seq});
    layout = "paged (page_size " + std::to_string(ps) + ")";
    std::tie(out, lse) = flux_attention::decode_attention(q, k_pages, v_pages, seqlens, block_table,
                                                          flags, pattern);
  }
  INFO(layout << " " << c10::toString(dtype));
  REQUIRE(out.sizes() == q.sizes());
  REQUIRE(lse.sizes() == at::IntArrayRef({batch, hq}));

  const Tolerance tol = tolerance(dtype);
  const double scale = kernel_scale(std::nullopt, d);
  for (int64_t b = 0; b < batch; ++b) {
    const bool sparse = !dc.use_sparse.empty() && dc.use_sparse[b];
    const int64_t len = dc.lens[b];
    INFO("sequence " << b << " cache_seqlens " << len << (sparse ? " sparse" : " dense"));
    const at::Tensor mask = flux_test::reference_mask(1, len, true, sparse, pattern);
    const flux_test::RefAttention r = flux_test::reference_attention(
        q[b].unsqueeze(0), k_logical[b].slice(0, 0, len), v_logical[b].slice(0, 0, len), mask, scale);
    CHECK(max_abs_diff(out[b], r.out[0]) <= tol.out);
    CHECK(lse_error(lse[b], r.lse.select(1, 0)) <= tol.lse);
  }
}

}  // namespace

TEST_CASE("decode_attention against contiguous and paged caches", "[ops][decode]") {
  const DecodeCase dc = GENERATE(values<DecodeCase>({
      {{1, 17, 40}, {}, 0},
      {{1, 17, 40}, {}, 4},
      {{1, 17, 40}, {}, 3},                                  // pages not aligned to the pattern
      {{9, 40, 23, 4}, {true, false, true, true}, 0},
      {{9, 40, 23, 4}, {true, false, true, true}, 4},
      {{0, 12}, {false, true}, 0},                           // an empty cache sees nothing
  }));
  const at::ScalarType dtype = GENERATE(at::kFloat, at::kDouble);
  at::manual_seed(static_cast<uint64_t>(dc.lens.size() * 10 + dc.page_size));
  check_decode(dc, dtype);
}

TEST_CASE("decode_attention equals the last row of sparse/full attention", "[ops][decode]") {
  // The decode rule is the prefill rule at the new token's position: compare the two ops directly.
  at::manual_seed(23);
  const int64_t len = 37, hq = 4, hkv = 2, d = 16;
  const Streaming pattern{4, 2, 4};
  const at::Tensor q = randn({1, len, hq, d}, at::kDouble);
  const at::Tensor k = randn({1, len, hkv, d}, at::kDouble);
  const at::Tensor v = randn({1, len, hkv, d}, at::kDouble);
  const bool sparse = GENERATE(false, true);
  const auto [out_prefill, lse_prefill] = sparse
      ? flux_attention::sparse_attention(q, k, v, pattern)
      : flux_attention::full_attention(q, k, v, /*causal=*/true);
  const auto [out_dec, lse_dec] = flux_attention::decode_attention(
      q.select(1, len - 1), k, v, int32_tensor({len}), std::nullopt, bool_tensor({sparse}), pattern);
  CHECK(max_abs_diff(out_dec[0], out_prefill[0][len - 1]) <= 1e-9);
  CHECK(max_abs_diff(lse_dec[0], lse_prefill[0].select(1, len - 1)) <= 1e-5);
}

TEST_CASE("decode_attention with several new tokens equals the last rows of the prefill ops", "[ops][decode]") {
  // q [1, Tq, Hq, D]: the Tq tokens are causal among themselves, each with its own window.
  at::manual_seed(29);
  const int64_t len = 37, tq = 5, hq = 4, hkv = 2, d = 16;
  const Streaming pattern{4, 2, 4};
  const at::Tensor q = randn({1, len, hq, d}, at::kDouble);
  const at::Tensor k = randn({1, len, hkv, d}, at::kDouble);
  const at::Tensor v = randn({1, len, hkv, d}, at::kDouble);
  const bool sparse = GENERATE(false, true);
  const auto [out_prefill, lse_prefill] = sparse
      ? flux_attention::sparse_attention(q, k, v, pattern)
      : flux_attention::full_attention(q, k, v, /*causal=*/true);
  const auto [out_dec, lse_dec] = flux_attention::decode_attention(
      q.slice(1, len - tq, len), k, v, int32_tensor({len}), std::nullopt, bool_tensor({sparse}), pattern);
  REQUIRE(lse_dec.sizes() == at::IntArrayRef({1, hq, tq}));
  CHECK(max_abs_diff(out_dec[0], out_prefill[0].slice(0, len - tq, len)) <= 1e-9);
  CHECK(max_abs_diff(lse_dec[0], lse_prefill[0].slice(1, len - tq, len)) <= 1e-5);
}

TEST_CASE("append_kv writes rows at the given positions, then decode reads them", "[ops][decode]") {
  at::manual_seed(31);
  const int64_t hkv = 2, d = 16;
  const at::Tensor k_cache = at::full({2, 12, hkv, d}, kNaN, at::TensorOptions().dtype(at::kFloat));
  const at::Tensor v_cache = at::full({2, 12, hkv, d}, kNaN, at::TensorOptions().dtype(at::kFloat));
  const at::Tensor k_new = randn({2, 3, hkv, d}, at::kFloat);
  const at::Tensor v_new = randn({2, 3, hkv, d}, at::kFloat);
  flux_attention::append_kv(k_cache, v_cache, k_new, v_new, int32_tensor({0, 9}));
  CHECK(at::equal(k_cache[0].slice(0, 0, 3), k_new[0]));
  CHECK(at::equal(v_cache[1].slice(0, 9, 12), v_new[1]));
  CHECK(at::isnan(k_cache[0].slice(0, 3)).all().item<bool>());
  CHECK(at::isnan(k_cache[1].slice(0, 0, 9)).all().item<bool>());
  REQUIRE_THROWS_WITH(flux_attention::append_kv(k_cache, v_cache, k_new, v_new, int32_tensor({0, 10})),
                      flux_test::HasText("flux_attention.append_kv: positions[1] = 10"));
}

// ---- pool_queries ----

namespace {

// Mean of the first and last min(P, n) rows (a row in both counted twice), then over heads.
at::Tensor reference_pool(const at::Tensor& rows, int64_t pool) {
  const int64_t n = rows.size(0), m = std::min(pool, n);
  if (n == 0) return at::zeros({rows.size(2)}, rows.options().dtype(at::kDouble));
  const at::Tensor r = rows.to(at::kDouble);
  return (r.slice(0, 0, m).sum(0) + r.slice(0, n - m, n).sum(0)).sum(0) /
         static_cast<double>(2 * m * rows.size(1));
}

}  // namespace

TEST_CASE("pool_queries on varlen input, with gradients", "[ops][pool]") {
  const int64_t pool = GENERATE(1, 4, 150);
  const at::ScalarType dtype = GENERATE(at::kFloat, at::kDouble);
  at::manual_seed(pool);
  const std::vector<int64_t> lens{0, 3, 8, 25, 1};
  const std::vector<int64_t> cu = offsets(lens);
  at::Tensor q = randn({cu.back() + 2, 3, 16}, dtype);
  q.slice(0, cu.back()).fill_(kNaN);
  q = q.detach().set_requires_grad(true);
  const at::Tensor out = flux_attention::pool_queries(q, int32_tensor(cu), pool);
  INFO("pool_size " << pool << " " << c10::toString(dtype));
  REQUIRE(out.sizes() == at::IntArrayRef({5, 16}));
  REQUIRE(out.scalar_type() == dtype);

  const at::Tensor rq = q.detach().clone().set_requires_grad(true);
  std::vector<at::Tensor> refs;
  for (size_t b = 0; b < lens.size(); ++b) refs.push_back(reference_pool(rq.slice(0, cu[b], cu[b + 1]), pool));
  const at::Tensor ref = at::stack(refs);
  const Tolerance tol = tolerance(dtype);
  CHECK(max_abs_diff(out, ref) <= tol.out);

  const at::Tensor g = at::randn({5, 16}, at::kDouble);
  const auto dq = torch::autograd::grad({(out.to(at::kDouble) * g).sum()}, {q});
  const auto dq_ref = torch::autograd::grad({(ref * g).sum()}, {rq});
  CHECK(max_abs_diff(dq[0], dq_ref[0]) <= tol.out);
}

TEST_CASE("pool_queries on padded input with an attention mask", "[ops][pool]") {
  at::manual_seed(9);
  const int64_t batch = 3, seqlen = 12, heads = 2, d = 8, pool = 3;
  // Row 0 left-padded (4 pads), row 1 right-padded (5 valid), row 2 full.
  const std::vector<std::pair<int64_t, int64_t>> runs{{4, 12}, {0, 5}, {0, 12}};
  at::Tensor mask = at::zeros({batch, seqlen}, at::kLong);
  at::Tensor q = randn({batch, seqlen, heads, d}, at::kDouble);
  for (int64_t b = 0; b < batch; ++b) {
    mask[b].slice(0, runs[b].first, runs[b].second).fill_(1);
    q[b].slice(0, 0, runs[b].first).fill_(kNaN);
    q[b].slice(0, runs[b].second).fill_(kNaN);
  }
  const bool bool_mask = GENERATE(false, true);
  const at::Tensor m = bool_mask ? mask.to(at::kBool) : mask;
  const at::Tensor out = flux_attention::pool_queries(q, std::nullopt, pool, m);
  REQUIRE(out.sizes() == at::IntArrayRef({batch, d}));
  for (int64_t b = 0; b < batch; ++b) {
    INFO("sequence " << b);
    CHECK(max_abs_diff(out[b], reference_pool(q[b].slice(0, runs[b].first, runs[b].second), pool)) <=
          1e-12);
  }
  // Without a mask every row counts.
  const at::Tensor full = randn({batch, seqlen, heads, d}, at::kDouble);
  const at::Tensor out_full = flux_attention::pool_queries(full, std::nullopt, pool);
  for (int64_t b = 0; b < batch; ++b) CHECK(max_abs_diff(out_full[b], reference_pool(full[b], pool)) <= 1e-12);
}

// ---- gumbel_route ----

namespace {

at::Generator seeded(uint64_t seed) { return at::make_generator<at::CPUGeneratorImpl>(seed); }

}  // namespace

TEST_CASE("gumbel_route: a hard gate is the argmax of the soft one, with its gradient", "[ops][gumbel]") {
  const double tau = GENERATE(1.5, 1.0, 0.5);
  at::manual_seed(1);
  const at::Tensor logits = at::randn({64, 2}, at::kDouble);
  const at::Tensor lh = logits.clone().set_requires_grad(true);
  const at::Tensor ls = logits.clone().set_requires_grad(true);
  const at::Tensor hard = flux_attention::gumbel_route(lh, tau, true, seeded(42));
  const at::Tensor soft = flux_attention::gumbel_route(ls, tau, false, seeded(42));
  INFO("tau " << tau);
  REQUIRE(hard.sizes() == at::IntArrayRef({64}));
  REQUIRE(hard.scalar_type() == at::kDouble);
  // Same noise: forward takes the hard one-hot, and index 1 (full attention) wins iff soft > 1/2.
  CHECK(at::equal(hard, soft.gt(0.5).to(at::kDouble)));
  CHECK(hard.gt(0.0).any().item<bool>());
  CHECK(hard.eq(0.0).any().item<bool>());

  const at::Tensor g = at::randn({64}, at::kDouble);
  const at::Tensor dh = torch::autograd::grad({(hard * g).sum()}, {lh})[0];
  const at::Tensor ds = torch::autograd::grad({(soft * g).sum()}, {ls})[0];
  // Straight-through: the hard gate's gradient is the soft gate's.
  CHECK(max_abs_diff(dh, ds) <= 1e-6);
  // d z / d logit_1 = z (1 - z) / tau = -d z / d logit_0 for z = softmax((logits + g) / tau)[1].
  const at::Tensor z = soft.detach();
  const at::Tensor dz = z * (1 - z) / tau * g;
  CHECK(max_abs_diff(ds.select(1, 1), dz) <= 1e-6);
  CHECK(max_abs_diff(ds.select(1, 0), -dz) <= 1e-6);
}

TEST_CASE("gumbel_route: seeded, and distributed as softmax(logits)", "[ops][gumbel]") {
  const int64_t n = 20000;
  const at::Tensor logits = at::tensor({0.0, 1.0}, at::kDouble).repeat({n, 1});
  const at::Tensor a = flux_attention::gumbel_route(logits, 1.0, true, seeded(7));
  const at::Tensor b = flux_attention::gumbel_route(logits, 1.0, true, seeded(7));
  const at::Tensor c = flux_attention::gumbel_route(logits, 1.0, true, seeded(8));
  CHECK(at::equal(a, b));
  CHECK_FALSE(at::equal(a, c));
  // Gumbel-max: P(index 1) = softmax(logits)[1] = sigmoid(1) whatever tau; 5 standard errors.
  const double p = 1.0 / (1.0 + std::exp(-1.0));
  const double se = std::sqrt(p * (1 - p) / n);
  for (double tau : {1.0, 0.5}) {
    const double mean = flux_attention::gumbel_route(logits, tau, true, seeded(99)).mean().item<double>();
    INFO("tau " << tau << " P(full) " << mean << " expected " << p);
    CHECK(std::abs(mean - p) <= 5 * se);
  }
  // A 100-logit margin beats any noise a float uniform can produce.
  const at::Tensor sure = at::tensor({0.0, 100.0, 100.0, 0.0}, at::kFloat).view({2, 2});
  const at::Tensor z = flux_attention::gumbel_route(sure, 1.0, true, seeded(3));
  CHECK(z[0].item<float>() == 1.0f);
  CHECK(z[1].item<float>() == 0.0f);
}

// ---- fused model ops ----

TEST_CASE("rms_norm, silu_mul and rotary_embedding in fp64 against their formulas", "[ops][model_ops]") {
  at::manual_seed(21);
  const at::Tensor x = randn({5, 3, 40}, at::kDouble), w = randn({40}, at::kDouble);
  const at::Tensor norm = flux_attention::rms_norm(x, w, 1e-5);
  CHECK(max_abs_diff(norm, w * x * at::rsqrt(x.pow(2).mean(-1, true) + 1e-5)) <= 1e-12);

  const at::Tensor g = randn({7, 33}, at::kDouble), u = randn({7, 33}, at::kDouble);
  CHECK(max_abs_diff(flux_attention::silu_mul(g, u), g * at::sigmoid(g) * u) <= 1e-12);

  // q as transformers hands it: a [B, H, S, D] view of [B, S, H, D].
  const at::Tensor q = randn({2, 6, 4, 10}, at::kDouble).transpose(1, 2);
  const at::Tensor k = randn({2, 6, 2, 10}, at::kDouble).transpose(1, 2);
  const at::Tensor cos = randn({1, 6, 10}, at::kDouble), sin = randn({1, 6, 10}, at::kDouble);
  const auto [qo, ko] = flux_attention::rotary_embedding(q, k, cos, sin);
  auto rotate_half = [](const at::Tensor& t) {
    return at::cat({-t.slice(-1, 5, 10), t.slice(-1, 0, 5)}, -1);
  };
  const at::Tensor c = cos.unsqueeze(1), s = sin.unsqueeze(1);
  CHECK(max_abs_diff(qo, q * c + rotate_half(q) * s) <= 1e-12);
  CHECK(max_abs_diff(ko, k * c + rotate_half(k) * s) <= 1e-12);
  CHECK(qo.strides() == q.strides());  // the layout is kept

  // Inference kernels: an input that requires grad is refused, naming the op.
  const at::Tensor xg = x.detach().clone().set_requires_grad(true);
  REQUIRE_THROWS_WITH(flux_attention::rms_norm(xg, w), flux_test::HasText("rms_norm: an input requires grad"));
}

TEST_CASE("decode_linear and decode_swiglu in fp64 against matmuls", "[ops][model_ops]") {
  at::manual_seed(22);
  const at::Tensor x = randn({3, 1, 40}, at::kDouble), w = randn({9, 40}, at::kDouble);
  const at::Tensor b = randn({9}, at::kDouble), up = randn({9, 40}, at::kDouble);
  CHECK(max_abs_diff(flux_attention::decode_linear(x, w, b), at::matmul(x, w.t()) + b) <= 1e-12);
  const at::Tensor gate = at::matmul(x, w.t());
  CHECK(max_abs_diff(flux_attention::decode_swiglu(x, w, up), gate * at::sigmoid(gate) * at::matmul(x, up.t())) <=
        1e-12);
  REQUIRE_THROWS_WITH(flux_attention::decode_linear(randn({9, 40}, at::kDouble), w),
                      flux_test::HasText("decode_linear: x has 9 token rows"));
}
