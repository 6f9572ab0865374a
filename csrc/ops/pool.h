#pragma once

#include <optional>

#include <ATen/core/Tensor.h>

namespace flux_attention {

at::Tensor pool_queries_kernel(const at::Tensor& q, const std::optional<at::Tensor>& cu_seqlens,
                               int64_t pool_size, const std::optional<at::Tensor>& attention_mask);

at::Tensor pool_queries_backward_kernel(const at::Tensor& grad, const at::Tensor& q,
                                        const std::optional<at::Tensor>& cu_seqlens,
                                        int64_t pool_size,
                                        const std::optional<at::Tensor>& attention_mask);

}  // namespace flux_attention
