#pragma once

#include <optional>

#include <ATen/core/Tensor.h>

namespace flux_attention {

// append_kv: writes k_new/v_new ([B, Hkv, D] or [B, Tn, Hkv, D]) into k_cache/v_cache at cache
// position positions[b] + t of each sequence (contiguous cache, or paged through block_table).
void append_kv_kernel(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k_new,
                      const at::Tensor& v_new, const at::Tensor& positions,
                      const std::optional<at::Tensor>& block_table);

}  // namespace flux_attention
