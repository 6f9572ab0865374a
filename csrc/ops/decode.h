#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace flux_attention {

std::tuple<at::Tensor, at::Tensor> decode_attention_kernel(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& block_table,
    const std::optional<at::Tensor>& use_sparse, std::optional<double> scale, int64_t sink_tokens,
    int64_t local_blocks, int64_t block_size);

}  // namespace flux_attention
