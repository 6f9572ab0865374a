// The C++ API of flux_attention: thin calls through the PyTorch dispatcher, so C++ users get the
// same checks, device dispatch and autograd as Python users of torch.ops.flux_attention.*.
// Shapes and semantics: README.md "Op reference" and shared/DESIGN.md section 3.
#pragma once

#include <optional>
#include <tuple>
#include <vector>

#include <ATen/core/Generator.h>
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>

namespace flux_attention {

// Default streaming pattern (DESIGN.md section 1): 128 sink tokens + 16 local blocks of 128.
struct Streaming {
  int64_t sink_tokens = 128;
  int64_t local_blocks = 16;
  int64_t block_size = 128;
};

// Variable-length batches: q [total_q, Hq, D] with cu_seqlens_q [B+1] (int32), likewise k/v.
// max_seqlen_* are upper bounds that CUDA uses to size its grid without reading cu_seqlens on the
// host; when absent they are computed (a device-to-host copy on CUDA).
struct Varlen {
  at::Tensor cu_seqlens_q;
  at::Tensor cu_seqlens_k;
  std::optional<int64_t> max_seqlen_q;
  std::optional<int64_t> max_seqlen_k;
};

// Padded q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] -> out [B, Sq, Hq, D], lse [B, Hq, Sq] (fp32).
// Varlen -> out [total_q, Hq, D], lse [Hq, total_q].
std::tuple<at::Tensor, at::Tensor> full_attention(const at::Tensor& q, const at::Tensor& k,
                                                  const at::Tensor& v, bool causal = false,
                                                  std::optional<double> scale = std::nullopt,
                                                  const std::optional<Varlen>& varlen = std::nullopt);

std::tuple<at::Tensor, at::Tensor> sparse_attention(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& v, Streaming pattern = {},
                                                    std::optional<double> scale = std::nullopt,
                                                    const std::optional<Varlen>& varlen = std::nullopt);

// use_sparse: bool [B]; sequence b takes the streaming pattern iff use_sparse[b], else dense causal.
std::tuple<at::Tensor, at::Tensor> flux_attention(const at::Tensor& q, const at::Tensor& k,
                                                  const at::Tensor& v, const at::Tensor& use_sparse,
                                                  Streaming pattern = {},
                                                  std::optional<double> scale = std::nullopt,
                                                  const std::optional<Varlen>& varlen = std::nullopt);

// q [B, Hq, D] (or [B, Tq, Hq, D]: Tq new tokens, causal among themselves at the end of the cache);
// contiguous cache [B, capacity, Hkv, D] or paged [pages, page_size, Hkv, D] with block_table
// [B, max_pages] (int32); cache_seqlens [B] (int32) counts the new tokens.
// -> out shaped like q, lse [B, Hq] (or [B, Hq, Tq]).
std::tuple<at::Tensor, at::Tensor> decode_attention(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& block_table = std::nullopt,
    const std::optional<at::Tensor>& use_sparse = std::nullopt, Streaming pattern = {},
    std::optional<double> scale = std::nullopt);

// Writes k_new / v_new ([B, Hkv, D] or [B, Tn, Hkv, D]) into the cache in place at positions
// positions[b] + t (positions: int32 [B], the lengths before the append); same cache layouts as
// decode_attention. No host synchronisation on CUDA.
void append_kv(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k_new,
               const at::Tensor& v_new, const at::Tensor& positions,
               const std::optional<at::Tensor>& block_table = std::nullopt);

// q varlen [total, H, D] with cu_seqlens, or padded [B, S, H, D] with an optional attention_mask
// [B, S] (bool or integer, 1 = token) -> [B, D] in q's dtype.
at::Tensor pool_queries(const at::Tensor& q, const std::optional<at::Tensor>& cu_seqlens,
                        int64_t pool_size = 150,
                        const std::optional<at::Tensor>& attention_mask = std::nullopt);

// logits [B, 2] -> gate z [B] (index 1 = full attention); straight-through when hard.
at::Tensor gumbel_route(const at::Tensor& logits, double tau = 1.0, bool hard = true,
                        std::optional<at::Generator> generator = std::nullopt);

// The fused model ops (inference only: they refuse inputs that require grad under grad mode).
// x [..., C], weight [C] -> weight * x / sqrt(mean(x^2) + eps), fp32 math, one rounding.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps = 1e-6);
// silu(gate) * up, same shapes.
at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up);
// transformers' apply_rotary_pos_emb: q [B, Hq, S, D], k [B, Hk, S, D], cos/sin [B or 1, S, D];
// the outputs keep q's and k's memory layouts.
std::tuple<at::Tensor, at::Tensor> rotary_embedding(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& cos, const at::Tensor& sin);
// Linear layers at 1-8 token rows (decode): x [..., in] times weight [out, in]^T (+ bias [out]);
// decode_swiglu: silu(x gate^T) * (x up^T). fp32 accumulation, one rounding.
at::Tensor decode_linear(const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias = std::nullopt);
at::Tensor decode_swiglu(const at::Tensor& x, const at::Tensor& gate_weight, const at::Tensor& up_weight);
// Up to 3 linears of one x (a layer's q, k and v projections) in one weight stream; biases empty or
// one (possibly undefined) per weight.
std::vector<at::Tensor> decode_linear_group(const at::Tensor& x, at::TensorList weights,
                                            const c10::List<std::optional<at::Tensor>>& biases = c10::List<std::optional<at::Tensor>>());

}  // namespace flux_attention
