// Every schema of the library, and which kernel serves each dispatch key. The CPU and CUDA keys share
// one kernel per op: it checks inputs and hands params to the device's kernel (csrc/ops/device.h).
#include <torch/library.h>

#include "append_kv.h"
#include "attention.h"
#include "autograd.h"
#include "decode.h"
#include "gumbel.h"
#include "meta.h"
#include "model_ops.h"
#include "pool.h"

TORCH_LIBRARY(flux_attention, m) {
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  m.def(
      "full_attention(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q=None, "
      "Tensor? cu_seqlens_k=None, SymInt? max_seqlen_q=None, SymInt? max_seqlen_k=None, "
      "bool causal=False, float? scale=None) -> (Tensor out, Tensor lse)",
      tags);
  m.def(
      "sparse_attention(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q=None, "
      "Tensor? cu_seqlens_k=None, SymInt? max_seqlen_q=None, SymInt? max_seqlen_k=None, "
      "float? scale=None, int sink_tokens=128, int local_blocks=16, int block_size=128) "
      "-> (Tensor out, Tensor lse)",
      tags);
  m.def(
      "flux_attention(Tensor q, Tensor k, Tensor v, Tensor use_sparse, Tensor? cu_seqlens_q=None, "
      "Tensor? cu_seqlens_k=None, SymInt? max_seqlen_q=None, SymInt? max_seqlen_k=None, "
      "float? scale=None, int sink_tokens=128, int local_blocks=16, int block_size=128) "
      "-> (Tensor out, Tensor lse)",
      tags);
  m.def(
      "attention_backward(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, SymInt? max_seqlen_q, "
      "SymInt? max_seqlen_k, bool causal, float scale, int sparse_mode, Tensor? use_sparse, "
      "int sink_tokens, int local_blocks, int block_size) -> (Tensor dq, Tensor dk, Tensor dv)",
      tags);
  m.def(
      "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, "
      "Tensor? block_table=None, Tensor? use_sparse=None, float? scale=None, int sink_tokens=128, "
      "int local_blocks=16, int block_size=128) -> (Tensor out, Tensor lse)",
      tags);
  m.def(
      "append_kv(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k_new, Tensor v_new, Tensor positions, "
      "Tensor? block_table=None) -> ()",
      tags);
  m.def("pool_queries(Tensor q, Tensor? cu_seqlens=None, int pool_size=150, "
        "Tensor? attention_mask=None) -> Tensor",
        tags);
  m.def("pool_queries_backward(Tensor grad, Tensor q, Tensor? cu_seqlens, int pool_size, "
        "Tensor? attention_mask) -> Tensor",
        tags);
  m.def("gumbel_route(Tensor logits, float tau=1.0, bool hard=True, Generator? generator=None) "
        "-> Tensor",
        tags);
  m.def("gumbel_route_sample(Tensor logits, float tau, bool hard, Generator? generator=None) "
        "-> (Tensor z, Tensor soft)",
        tags);
  m.def("gumbel_route_backward(Tensor grad_z, Tensor soft, float tau) -> Tensor", tags);
  // The transformer block's memory-bound ops outside attention, fused (csrc/ops/model_ops.cpp).
  m.def("rms_norm(Tensor x, Tensor weight, float eps=1e-06) -> Tensor", tags);
  m.def("silu_mul(Tensor gate, Tensor up) -> Tensor", tags);
  m.def("rotary_embedding(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor q_out, Tensor k_out)",
        tags);
  // Linear layers at decode's 1-8 token rows: weight streams (csrc/cuda/decode_linear.cu).
  m.def("decode_linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor", tags);
  m.def("decode_swiglu(Tensor x, Tensor gate_weight, Tensor up_weight) -> Tensor", tags);
  m.def("decode_linear_group(Tensor x, Tensor[] weights, Tensor?[] biases) -> Tensor[]", tags);
}

#define FLUX_REGISTER_DEVICE_KERNELS(m)                                  \
  m.impl("full_attention", &flux_attention::full_attention_kernel);     \
  m.impl("sparse_attention", &flux_attention::sparse_attention_kernel); \
  m.impl("flux_attention", &flux_attention::flux_attention_kernel);     \
  m.impl("attention_backward", &flux_attention::attention_backward_kernel); \
  m.impl("decode_attention", &flux_attention::decode_attention_kernel); \
  m.impl("append_kv", &flux_attention::append_kv_kernel);               \
  m.impl("pool_queries", &flux_attention::pool_queries_kernel);         \
  m.impl("pool_queries_backward", &flux_attention::pool_queries_backward_kernel); \
  m.impl("rms_norm", &flux_attention::rms_norm_kernel);                 \
  m.impl("silu_mul", &flux_attention::silu_mul_kernel);                 \
  m.impl("rotary_embedding", &flux_attention::rotary_embedding_kernel);         \
  m.impl("decode_linear", &flux_attention::decode_linear_kernel);       \
  m.impl("decode_swiglu", &flux_attention::decode_swiglu_kernel);       \
  m.impl("decode_linear_group", &flux_attention::decode_linear_group_kernel)

TORCH_LIBRARY_IMPL(flux_attention, CPU, m) { FLUX_REGISTER_DEVICE_KERNELS(m); }

// Registered even in CPU-only builds: the kernels then fail with a sentence naming the missing CUDA
// build instead of "no kernel registered for CUDA".
TORCH_LIBRARY_IMPL(flux_attention, CUDA, m) { FLUX_REGISTER_DEVICE_KERNELS(m); }

TORCH_LIBRARY_IMPL(flux_attention, Meta, m) {
  m.impl("full_attention", &flux_attention::full_attention_meta);
  m.impl("sparse_attention", &flux_attention::sparse_attention_meta);
  m.impl("flux_attention", &flux_attention::flux_attention_meta);
  m.impl("attention_backward", &flux_attention::attention_backward_meta);
  m.impl("decode_attention", &flux_attention::decode_attention_meta);
  m.impl("append_kv", &flux_attention::append_kv_meta);
  m.impl("pool_queries", &flux_attention::pool_queries_meta);
  m.impl("pool_queries_backward", &flux_attention::pool_queries_backward_meta);
  m.impl("rms_norm", &flux_attention::rms_norm_meta);
  m.impl("silu_mul", &flux_attention::silu_mul_meta);
  m.impl("rotary_embedding", &flux_attention::rotary_embedding_meta);
  m.impl("decode_linear", &flux_attention::decode_linear_meta);
  m.impl("decode_swiglu", &flux_attention::decode_swiglu_meta);
  m.impl("decode_linear_group", &flux_attention::decode_linear_group_meta);
}

// gumbel_route is a handful of ATen ops on [B, 2]: one composite kernel serves every backend.
TORCH_LIBRARY_IMPL(flux_attention, CompositeExplicitAutograd, m) {
  m.impl("gumbel_route", &flux_attention::gumbel_route_kernel);
  m.impl("gumbel_route_sample", &flux_attention::gumbel_route_sample);
  m.impl("gumbel_route_backward", &flux_attention::gumbel_route_backward_kernel);
}

TORCH_LIBRARY_IMPL(flux_attention, Autograd, m) {
  m.impl("full_attention", &flux_attention::full_attention_autograd);
  m.impl("sparse_attention", &flux_attention::sparse_attention_autograd);
  m.impl("flux_attention", &flux_attention::flux_attention_autograd);
  m.impl("pool_queries", &flux_attention::pool_queries_autograd);
  m.impl("gumbel_route", &flux_attention::gumbel_route_autograd);
  m.impl("rms_norm", &flux_attention::rms_norm_autograd);
  m.impl("silu_mul", &flux_attention::silu_mul_autograd);
  m.impl("rotary_embedding", &flux_attention::rotary_embedding_autograd);
  m.impl("decode_linear", &flux_attention::decode_linear_autograd);
  m.impl("decode_swiglu", &flux_attention::decode_swiglu_autograd);
  m.impl("decode_linear_group", &flux_attention::decode_linear_group_autograd);
}
