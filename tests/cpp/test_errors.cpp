// Bad input fails with a message that starts with "flux_attention.<op>:" and names the argument at
// fault (STYLE.md section 3), before any kernel runs. Each REQUIRE_THROWS_WITH matches both.
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include "catch_compat.h"
#include "ops/api.h"

using flux_attention::Streaming;
using flux_attention::Varlen;
using flux_test::HasText;

namespace {

at::Tensor f32(at::IntArrayRef shape) { return at::randn(shape, at::kFloat); }

at::Tensor i32(const std::vector<int32_t>& v) { return at::tensor(v, at::kInt); }

Varlen varlen(const at::Tensor& cu_q, const at::Tensor& cu_k) {
  Varlen vl;
  vl.cu_seqlens_q = cu_q;
  vl.cu_seqlens_k = cu_k;
  return vl;
}

// A message prefix for op: "flux_attention.<op>: ".
std::string op(const char* name) { return std::string("flux_attention.") + name + ": "; }

}  // namespace

TEST_CASE("full_attention rejects mismatched shapes and dtypes", "[errors][full]") {
  const at::Tensor q = f32({2, 8, 4, 16}), k = f32({2, 8, 2, 16}), v = f32({2, 8, 2, 16});
  const auto P = HasText(op("full_attention"));

  // GQA needs kv heads to divide q heads (dimension 2 in the padded layout).
  REQUIRE_THROWS_WITH(flux_attention::full_attention(q, f32({2, 8, 3, 16}), f32({2, 8, 3, 16})),
                      P && HasText("k.size(2)"));
  REQUIRE_THROWS_WITH(flux_attention::full_attention(q, f32({2, 8, 2, 32}), v), P && HasText("k.size(-1)"));
  REQUIRE_THROWS_WITH(flux_attention::full_attention(q, k, f32({2, 7, 2, 16})), P && HasText("v.size(1)"));
  REQUIRE_THROWS_WITH(flux_attention::full_attention(q, f32({3, 8, 2, 16}), v), P && HasText("k.size(0)"));
  REQUIRE_THROWS_WITH(flux_attention::full_attention(f32({8, 4, 16}), k, v), P && HasText("q must be"));
  REQUIRE_THROWS_WITH(flux_attention::full_attention(q, k.to(at::kDouble), v),
                      P && HasText("k must have the dtype of q"));
  REQUIRE_THROWS_WITH(flux_attention::full_attention(q.to(at::kInt), k.to(at::kInt), v.to(at::kInt)),
                      P && HasText("q must be"));
  REQUIRE_THROWS_WITH(flux_attention::full_attention(f32({2, 8, 4, 300}), f32({2, 8, 2, 300}),
                                                     f32({2, 8, 2, 300})),
                      P && HasText("head_dim"));
}

TEST_CASE("varlen attention validates cu_seqlens", "[errors][varlen]") {
  const at::Tensor q = f32({10, 4, 16}), k = f32({12, 2, 16}), v = f32({12, 2, 16});
  const auto P = HasText(op("full_attention"));

  Varlen only_q;
  only_q.cu_seqlens_q = i32({0, 4, 10});
  REQUIRE_THROWS_WITH(flux_attention::full_attention(q, k, v, false, std::nullopt, only_q),
                      P && HasText("cu_seqlens_k"));
  REQUIRE_THROWS_WITH(flux_attention::full_attention(
                          q, k, v, false, std::nullopt, varlen(at::tensor({0, 4, 10}, at::kLong), i32({0, 5, 12}))),
                      P && HasText("cu_seqlens_q must be a 1-D int32"));
  REQUIRE_THROWS_WITH(flux_attention::full_attention(q, k, v, false, std::nullopt,
                                                     varlen(i32({0, 4, 10}), i32({0, 5}))),
                      P && HasText("cu_seqlens_k"));
  REQUIRE_THROWS_WITH(flux_attention::full_attention(q, k, v, false, std::nullopt,
                                                     varlen(i32({0, 7, 4}), i32({0, 5, 12}))),
                      P && HasText("cu_seqlens_q must be non-decreasing"));
  REQUIRE_THROWS_WITH(flux_attention::full_attention(q, k, v, false, std::nullopt,
                                                     varlen(i32({1, 4, 10}), i32({0, 5, 12}))),
                      P && HasText("cu_seqlens_q[0]"));
  REQUIRE_THROWS_WITH(flux_attention::full_attention(q, k, v, false, std::nullopt,
                                                     varlen(i32({0, 4, 10}), i32({0, 5, 13}))),
                      P && HasText("cu_seqlens_k[-1]"));
  Varlen short_max = varlen(i32({0, 4, 10}), i32({0, 5, 12}));
  short_max.max_seqlen_q = 5;  // the second sequence has 6 rows
  REQUIRE_THROWS_WITH(flux_attention::full_attention(q, k, v, false, std::nullopt, short_max),
                      P && HasText("max_seqlen_q"));
  REQUIRE_THROWS_WITH(flux_attention::full_attention(f32({10, 4, 4, 16}), k, v, false, std::nullopt,
                                                     varlen(i32({0, 4, 10}), i32({0, 5, 12}))),
                      P && HasText("q must be [total_q"));
}

TEST_CASE("sparse and flux attention validate the pattern and the flags", "[errors][sparse]") {
  const at::Tensor q = f32({2, 8, 4, 16}), k = f32({2, 8, 2, 16}), v = f32({2, 8, 2, 16});
  const auto S = HasText(op("sparse_attention"));
  REQUIRE_THROWS_WITH(flux_attention::sparse_attention(q, k, v, Streaming{6, 2, 4}),
                      S && HasText("sink_tokens (6) must be a multiple of block_size"));
  REQUIRE_THROWS_WITH(flux_attention::sparse_attention(q, k, v, Streaming{0, 2, 4}),
                      S && HasText("sink_tokens"));
  REQUIRE_THROWS_WITH(flux_attention::sparse_attention(q, k, v, Streaming{4, 0, 4}),
                      S && HasText("local_blocks"));
  REQUIRE_THROWS_WITH(flux_attention::sparse_attention(q, k, v, Streaming{4, 2, 0}),
                      S && HasText("block_size"));
  REQUIRE_THROWS_WITH(flux_attention::sparse_attention(q, f32({2, 8, 3, 16}), f32({2, 8, 3, 16})),
                      S && HasText("k.size(2)"));

  const auto F = HasText(op("flux_attention"));
  REQUIRE_THROWS_WITH(flux_attention::flux_attention(q, k, v, at::zeros({3}, at::kBool)),
                      F && HasText("use_sparse"));
  REQUIRE_THROWS_WITH(flux_attention::flux_attention(q, k, v, at::zeros({2}, at::kInt)),
                      F && HasText("use_sparse"));
  REQUIRE_THROWS_WITH(flux_attention::flux_attention(q, k, v, at::zeros({2}, at::kBool), Streaming{4, 2, 3}),
                      F && HasText("sink_tokens"));
}

TEST_CASE("decode_attention validates the cache and its metadata", "[errors][decode]") {
  const at::Tensor q = f32({2, 4, 16});
  const at::Tensor kc = f32({2, 10, 2, 16}), vc = f32({2, 10, 2, 16});
  const auto D = HasText(op("decode_attention"));
  REQUIRE_THROWS_WITH(flux_attention::decode_attention(f32({2, 1, 1, 4, 16}), kc, vc, i32({3, 4})),
                      D && HasText("q must be [batch, heads, head_dim]"));
  REQUIRE_THROWS_WITH(flux_attention::decode_attention(q, kc, vc, i32({3, 11})),
                      D && HasText("cache_seqlens[1]"));
  REQUIRE_THROWS_WITH(flux_attention::decode_attention(q, kc, vc, at::tensor({3, 4}, at::kLong)),
                      D && HasText("cache_seqlens"));
  REQUIRE_THROWS_WITH(flux_attention::decode_attention(q, f32({3, 10, 2, 16}), f32({3, 10, 2, 16}),
                                                       i32({3, 4})),
                      D && HasText("k_cache.size(0)"));
  REQUIRE_THROWS_WITH(flux_attention::decode_attention(q, kc, f32({2, 10, 2, 8}), i32({3, 4})),
                      D && HasText("v_cache"));
  REQUIRE_THROWS_WITH(flux_attention::decode_attention(q, f32({2, 10, 3, 16}), f32({2, 10, 3, 16}),
                                                       i32({3, 4})),
                      D && HasText("k_cache.size(2)"));
  // Paged: 5 pages of 4 tokens; sequence 0 needs 2 pages and its second entry points past the pool.
  const at::Tensor pages = f32({5, 4, 2, 16});
  REQUIRE_THROWS_WITH(flux_attention::decode_attention(q, pages, pages, i32({7, 4}),
                                                       i32({0, 5, 1, 2}).view({2, 2})),
                      D && HasText("block_table[0, 1]"));
  REQUIRE_THROWS_WITH(flux_attention::decode_attention(q, pages, pages, i32({7, 4}),
                                                       i32({0, 1, 2, 3, 4, 0}).view({3, 2})),
                      D && HasText("block_table"));
  REQUIRE_THROWS_WITH(flux_attention::decode_attention(q, kc, vc, i32({3, 4}), std::nullopt,
                                                       at::ones({1}, at::kBool)),
                      D && HasText("use_sparse"));
}

TEST_CASE("pool_queries and gumbel_route validate their arguments", "[errors][pool][gumbel]") {
  const auto P = HasText(op("pool_queries"));
  REQUIRE_THROWS_WITH(flux_attention::pool_queries(f32({10, 2, 8}), i32({0, 4, 10}), 0),
                      P && HasText("pool_size"));
  REQUIRE_THROWS_WITH(flux_attention::pool_queries(f32({10, 2, 8}), i32({0, 4, 11}), 4),
                      P && HasText("cu_seqlens[-1]"));
  REQUIRE_THROWS_WITH(flux_attention::pool_queries(f32({2, 5, 2, 8}), std::nullopt, 4,
                                                   at::ones({2, 6}, at::kBool)),
                      P && HasText("attention_mask"));
  REQUIRE_THROWS_WITH(flux_attention::pool_queries(f32({10, 2, 8}), i32({0, 4, 10}), 4,
                                                   at::ones({2, 5}, at::kBool)),
                      P && HasText("attention_mask"));
  REQUIRE_THROWS_WITH(flux_attention::pool_queries(f32({2, 5, 2, 8}), std::nullopt, 4,
                                                   at::ones({2, 5}, at::kFloat)),
                      P && HasText("attention_mask"));

  const auto G = HasText(op("gumbel_route"));
  REQUIRE_THROWS_WITH(flux_attention::gumbel_route(f32({4, 3})), G && HasText("logits"));
  REQUIRE_THROWS_WITH(flux_attention::gumbel_route(at::zeros({4, 2}, at::kLong)), G && HasText("logits"));
  REQUIRE_THROWS_WITH(flux_attention::gumbel_route(f32({4, 2}), 0.0), G && HasText("tau"));
}
