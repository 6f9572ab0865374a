#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>

namespace flux_attention {

std::tuple<at::Tensor, at::Tensor> full_attention_autograd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    std::optional<c10::SymInt> max_seqlen_q, std::optional<c10::SymInt> max_seqlen_k, bool causal,
    std::optional<double> scale);

std::tuple<at::Tensor, at::Tensor> sparse_attention_autograd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    std::optional<c10::SymInt> max_seqlen_q, std::optional<c10::SymInt> max_seqlen_k,
    std::optional<double> scale, int64_t sink_tokens, int64_t local_blocks, int64_t block_size);

std::tuple<at::Tensor, at::Tensor> flux_attention_autograd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& use_sparse,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    std::optional<c10::SymInt> max_seqlen_q, std::optional<c10::SymInt> max_seqlen_k,
    std::optional<double> scale, int64_t sink_tokens, int64_t local_blocks, int64_t block_size);

at::Tensor pool_queries_autograd(const at::Tensor& q, const std::optional<at::Tensor>& cu_seqlens,
                                 int64_t pool_size, const std::optional<at::Tensor>& attention_mask);

at::Tensor gumbel_route_autograd(const at::Tensor& logits, double tau, bool hard,
                                 std::optional<at::Generator> generator);

}  // namespace flux_attention
