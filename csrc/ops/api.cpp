#include "api.h"

#include "op_handles.h"

namespace flux_attention {

using at::Tensor;

namespace {

using OptSymInt = std::optional<c10::SymInt>;

OptSymInt sym(const std::optional<int64_t>& v) { return v ? OptSymInt(c10::SymInt(*v)) : std::nullopt; }

struct VarlenArgs {
  std::optional<Tensor> cu_q, cu_k;
  OptSymInt max_q, max_k;
};

VarlenArgs unpack(const std::optional<Varlen>& varlen) {
  VarlenArgs a;
  if (varlen) {
    a.cu_q = varlen->cu_seqlens_q;
    a.cu_k = varlen->cu_seqlens_k;
    a.max_q = sym(varlen->max_seqlen_q);
    a.max_k = sym(varlen->max_seqlen_k);
  }
  return a;
}

}  // namespace

std::tuple<Tensor, Tensor> full_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                          bool causal, std::optional<double> scale,
                                          const std::optional<Varlen>& varlen) {
  const VarlenArgs a = unpack(varlen);
  return handles::full_attention().call(q, k, v, a.cu_q, a.cu_k, a.max_q, a.max_k, causal, scale);
}

std::tuple<Tensor, Tensor> sparse_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                            Streaming pattern, std::optional<double> scale,
                                            const std::optional<Varlen>& varlen) {
  const VarlenArgs a = unpack(varlen);
  return handles::sparse_attention().call(q, k, v, a.cu_q, a.cu_k, a.max_q, a.max_k, scale,
                                          pattern.sink_tokens, pattern.local_blocks,
                                          pattern.block_size);
}

std::tuple<Tensor, Tensor> flux_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                          const Tensor& use_sparse, Streaming pattern,
                                          std::optional<double> scale,
                                          const std::optional<Varlen>& varlen) {
  const VarlenArgs a = unpack(varlen);
  return handles::flux_attention().call(q, k, v, use_sparse, a.cu_q, a.cu_k, a.max_q, a.max_k,
                                        scale, pattern.sink_tokens, pattern.local_blocks,
                                        pattern.block_size);
}

std::tuple<Tensor, Tensor> decode_attention(const Tensor& q, const Tensor& k_cache,
                                            const Tensor& v_cache, const Tensor& cache_seqlens,
                                            const std::optional<Tensor>& block_table,
                                            const std::optional<Tensor>& use_sparse,
                                            Streaming pattern, std::optional<double> scale) {
  return handles::decode_attention().call(q, k_cache, v_cache, cache_seqlens, block_table,
                                          use_sparse, scale, pattern.sink_tokens,
                                          pattern.local_blocks, pattern.block_size);
}

void append_kv(const Tensor& k_cache, const Tensor& v_cache, const Tensor& k_new, const Tensor& v_new,
               const Tensor& positions, const std::optional<Tensor>& block_table) {
  handles::append_kv().call(k_cache, v_cache, k_new, v_new, positions, block_table);
}

Tensor pool_queries(const Tensor& q, const std::optional<Tensor>& cu_seqlens, int64_t pool_size,
                    const std::optional<Tensor>& attention_mask) {
  return handles::pool_queries().call(q, cu_seqlens, pool_size, attention_mask);
}

Tensor gumbel_route(const Tensor& logits, double tau, bool hard,
                    std::optional<at::Generator> generator) {
  return handles::gumbel_route().call(logits, tau, hard, std::move(generator));
}

Tensor rms_norm(const Tensor& x, const Tensor& weight, double eps) {
  return handles::rms_norm().call(x, weight, eps);
}

Tensor silu_mul(const Tensor& gate, const Tensor& up) { return handles::silu_mul().call(gate, up); }

std::tuple<Tensor, Tensor> rotary_embedding(const Tensor& q, const Tensor& k, const Tensor& cos,
                                            const Tensor& sin) {
  return handles::rotary_embedding().call(q, k, cos, sin);
}

Tensor decode_linear(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias) {
  return handles::decode_linear().call(x, weight, bias);
}

Tensor decode_swiglu(const Tensor& x, const Tensor& gate_weight, const Tensor& up_weight) {
  return handles::decode_swiglu().call(x, gate_weight, up_weight);
}

std::vector<Tensor> decode_linear_group(const Tensor& x, at::TensorList weights,
                                        const c10::List<std::optional<Tensor>>& biases) {
  return handles::decode_linear_group().call(x, weights, biases);
}

}  // namespace flux_attention
