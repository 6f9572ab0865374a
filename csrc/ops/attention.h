// Attention op family: shared checks and the backend kernels registered for CPU and CUDA.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

#include "flux/params.h"

namespace flux_attention {

struct AttnShape {
  bool varlen = false;
  int64_t batch = 0, seqlen_q = 0, seqlen_k = 0;  // seqlen_*: max over sequences when varlen
  int64_t heads_q = 0, heads_k = 0, head_dim = 0;
  int64_t total_q = 0, total_k = 0;
};

struct AttnConfig {
  bool causal = false;
  double scale = 1.0;  // resolved (never "default") by the time it gets here
  flux::SparseMode mode = flux::SparseMode::kDense;
  flux::StreamingPattern pattern{};
};

AttnShape check_attention_inputs(const char* op, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const std::optional<at::Tensor>& cu_seqlens_q,
                                 const std::optional<at::Tensor>& cu_seqlens_k,
                                 std::optional<int64_t> max_seqlen_q,
                                 std::optional<int64_t> max_seqlen_k);

flux::StreamingPattern make_pattern(const char* op, int64_t sink_tokens, int64_t local_blocks,
                                    int64_t block_size);
void check_use_sparse(const char* op, const at::Tensor& use_sparse, int64_t batch, const at::Tensor& q);
double resolve_scale(std::optional<double> scale, int64_t head_dim);

std::tuple<at::Tensor, at::Tensor> attention_forward(
    const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    std::optional<int64_t> max_seqlen_q, std::optional<int64_t> max_seqlen_k, const AttnConfig& cfg,
    const std::optional<at::Tensor>& use_sparse);

std::tuple<at::Tensor, at::Tensor> full_attention_kernel(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    std::optional<int64_t> max_seqlen_q, std::optional<int64_t> max_seqlen_k, bool causal,
    std::optional<double> scale);

std::tuple<at::Tensor, at::Tensor> sparse_attention_kernel(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    std::optional<int64_t> max_seqlen_q, std::optional<int64_t> max_seqlen_k,
    std::optional<double> scale, int64_t sink_tokens, int64_t local_blocks, int64_t block_size);

std::tuple<at::Tensor, at::Tensor> flux_attention_kernel(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& use_sparse,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    std::optional<int64_t> max_seqlen_q, std::optional<int64_t> max_seqlen_k,
    std::optional<double> scale, int64_t sink_tokens, int64_t local_blocks, int64_t block_size);

// sparse_mode: 0 dense (honours causal), 1 streaming, 2 per sequence (use_sparse).
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_kernel(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    std::optional<int64_t> max_seqlen_q, std::optional<int64_t> max_seqlen_k, bool causal,
    double scale, int64_t sparse_mode, const std::optional<at::Tensor>& use_sparse,
    int64_t sink_tokens, int64_t local_blocks, int64_t block_size);

}  // namespace flux_attention
