#pragma once

#include <optional>
#include <tuple>
#include <vector>

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>

namespace flux_attention {

// Device kernels (CPU and CUDA keys): check inputs, allocate outputs, call the device's kernel.
at::Tensor rms_norm_kernel(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor silu_mul_kernel(const at::Tensor& gate, const at::Tensor& up);
std::tuple<at::Tensor, at::Tensor> rotary_embedding_kernel(const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& cos, const at::Tensor& sin);
at::Tensor decode_linear_kernel(const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias);
at::Tensor decode_swiglu_kernel(const at::Tensor& x, const at::Tensor& gate_weight, const at::Tensor& up_weight);
std::vector<at::Tensor> decode_linear_group_kernel(const at::Tensor& x, at::TensorList weights,
                                                   const c10::List<std::optional<at::Tensor>>& biases);

// Meta: output shapes for torch.compile / fake tensors.
at::Tensor rms_norm_meta(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor silu_mul_meta(const at::Tensor& gate, const at::Tensor& up);
std::tuple<at::Tensor, at::Tensor> rotary_embedding_meta(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& cos, const at::Tensor& sin);
at::Tensor decode_linear_meta(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);
at::Tensor decode_swiglu_meta(const at::Tensor& x, const at::Tensor& gate_weight, const at::Tensor& up_weight);
std::vector<at::Tensor> decode_linear_group_meta(const at::Tensor& x, at::TensorList weights,
                                                 const c10::List<std::optional<at::Tensor>>& biases);

// Autograd: these are inference kernels without a backward. Under grad mode with an input that
// requires grad they raise (naming the fix) instead of returning outputs that cannot backpropagate;
// otherwise they run the device kernel.
at::Tensor rms_norm_autograd(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor silu_mul_autograd(const at::Tensor& gate, const at::Tensor& up);
std::tuple<at::Tensor, at::Tensor> rotary_embedding_autograd(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& cos, const at::Tensor& sin);
at::Tensor decode_linear_autograd(const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias);
at::Tensor decode_swiglu_autograd(const at::Tensor& x, const at::Tensor& gate_weight,
                                  const at::Tensor& up_weight);
std::vector<at::Tensor> decode_linear_group_autograd(const at::Tensor& x, at::TensorList weights,
                                                     const c10::List<std::optional<at::Tensor>>& biases);

}  // namespace flux_attention
