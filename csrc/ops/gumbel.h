#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

namespace flux_attention {

// (z, soft): z [B] the gate (hard 0/1 or soft), soft [B, 2] fp32 = softmax((logits + g) / tau).
std::tuple<at::Tensor, at::Tensor> gumbel_route_sample(const at::Tensor& logits, double tau, bool hard,
                                                       std::optional<at::Generator> generator);
at::Tensor gumbel_route_kernel(const at::Tensor& logits, double tau, bool hard,
                               std::optional<at::Generator> generator);
// d logits [B, 2] for d z [B]: the gradient of soft[:, 1] (straight-through for hard gates).
at::Tensor gumbel_route_backward_kernel(const at::Tensor& grad_z, const at::Tensor& soft, double tau);

}  // namespace flux_attention
