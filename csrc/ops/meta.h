#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>

namespace flux_attention {

using MetaOptTensor = std::optional<at::Tensor>;
using MetaOptSymInt = std::optional<c10::SymInt>;

std::tuple<at::Tensor, at::Tensor> full_attention_meta(const at::Tensor& q, const at::Tensor& k,
                                                       const at::Tensor& v, const MetaOptTensor& cu_q,
                                                       const MetaOptTensor& cu_k, MetaOptSymInt max_q,
                                                       MetaOptSymInt max_k, bool causal,
                                                       std::optional<double> scale);
std::tuple<at::Tensor, at::Tensor> sparse_attention_meta(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const MetaOptTensor& cu_q,
    const MetaOptTensor& cu_k, MetaOptSymInt max_q, MetaOptSymInt max_k, std::optional<double> scale,
    int64_t sink_tokens, int64_t local_blocks, int64_t block_size);
std::tuple<at::Tensor, at::Tensor> flux_attention_meta(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& use_sparse,
    const MetaOptTensor& cu_q, const MetaOptTensor& cu_k, MetaOptSymInt max_q, MetaOptSymInt max_k,
    std::optional<double> scale, int64_t sink_tokens, int64_t local_blocks, int64_t block_size);
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_meta(
    const at::Tensor& dout, const MetaOptTensor& dlse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const MetaOptTensor& cu_q,
    const MetaOptTensor& cu_k, MetaOptSymInt max_q, MetaOptSymInt max_k, bool causal, double scale,
    int64_t sparse_mode, const MetaOptTensor& use_sparse, int64_t sink_tokens, int64_t local_blocks,
    int64_t block_size);
std::tuple<at::Tensor, at::Tensor> decode_attention_meta(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& cache_seqlens, const MetaOptTensor& block_table,
    const MetaOptTensor& use_sparse, std::optional<double> scale, int64_t sink_tokens,
    int64_t local_blocks, int64_t block_size);
void append_kv_meta(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k_new,
                    const at::Tensor& v_new, const at::Tensor& positions, const MetaOptTensor& block_table);
at::Tensor pool_queries_meta(const at::Tensor& q, const MetaOptTensor& cu_seqlens, int64_t pool_size,
                             const MetaOptTensor& attention_mask);
at::Tensor pool_queries_backward_meta(const at::Tensor& grad, const at::Tensor& q,
                                      const MetaOptTensor& cu_seqlens, int64_t pool_size,
                                      const MetaOptTensor& attention_mask);

}  // namespace flux_attention
