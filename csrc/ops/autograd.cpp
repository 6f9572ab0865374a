// C++ autograd for the differentiable ops. Each forward re-enters the dispatcher below the autograd
// key (so the CPU/CUDA/Meta kernel runs) and each backward calls a separately registered backward op,
// so torch.compile sees both halves as ops. Saved: q, k, v, out, lse (never the probabilities).
#include "autograd.h"

#include <cmath>

#include <torch/autograd.h>

#include "op_handles.h"

namespace flux_attention {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;
using OptSymInt = std::optional<c10::SymInt>;

namespace {

enum AttentionKind : int64_t { kFull = 0, kSparse = 1, kFlux = 2 };

Tensor or_undefined(const OptTensor& t) { return t ? *t : Tensor(); }
OptTensor defined_or_none(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

class AttentionFunction : public torch::autograd::Function<AttentionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                               int64_t kind, const OptTensor& use_sparse, const OptTensor& cu_q,
                               const OptTensor& cu_k, OptSymInt max_q, OptSymInt max_k, bool causal,
                               std::optional<double> scale, int64_t sink_tokens,
                               int64_t local_blocks, int64_t block_size) {
    at::AutoDispatchBelowADInplaceOrView guard;
    std::tuple<Tensor, Tensor> res;
    switch (kind) {
      case kFull:
        res = handles::full_attention().call(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale);
        break;
      case kSparse:
        res = handles::sparse_attention().call(q, k, v, cu_q, cu_k, max_q, max_k, scale,
                                               sink_tokens, local_blocks, block_size);
        break;
      default:
        res = handles::flux_attention().call(q, k, v, *use_sparse, cu_q, cu_k, max_q, max_k, scale,
                                             sink_tokens, local_blocks, block_size);
        break;
    }
    const Tensor& out = std::get<0>(res);
    const Tensor& lse = std::get<1>(res);
    ctx->save_for_backward({q, k, v, out, lse, or_undefined(use_sparse), or_undefined(cu_q),
                            or_undefined(cu_k)});
    ctx->saved_data["kind"] = kind;
    ctx->saved_data["causal"] = causal || kind != kFull;
    ctx->saved_data["scale"] =
        scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(q.sym_size(-1).guard_int(__FILE__, __LINE__)));
    ctx->saved_data["max_q"] = max_q ? c10::IValue(*max_q) : c10::IValue();
    ctx->saved_data["max_k"] = max_k ? c10::IValue(*max_k) : c10::IValue();
    ctx->saved_data["sink_tokens"] = sink_tokens;
    ctx->saved_data["local_blocks"] = local_blocks;
    ctx->saved_data["block_size"] = block_size;
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3], &lse = saved[4];
    const Tensor dout = grads[0].defined() ? grads[0] : at::zeros_like(out);
    const OptTensor dlse = defined_or_none(grads[1]);
    const auto sym = [&](const char* key) -> OptSymInt {
      const c10::IValue& iv = ctx->saved_data[key];
      return iv.isNone() ? OptSymInt() : OptSymInt(iv.toSymInt());
    };
    auto [dq, dk, dv] = handles::attention_backward().call(
        dout, dlse, q, k, v, out, lse, defined_or_none(saved[6]), defined_or_none(saved[7]),
        sym("max_q"), sym("max_k"), ctx->saved_data["causal"].toBool(),
        ctx->saved_data["scale"].toDouble(), ctx->saved_data["kind"].toInt(),
        defined_or_none(saved[5]), ctx->saved_data["sink_tokens"].toInt(),
        ctx->saved_data["local_blocks"].toInt(), ctx->saved_data["block_size"].toInt());
    // One gradient per forward input: q, k, v, then 11 non-differentiable arguments.
    variable_list result(14);
    result[0] = dq;
    result[1] = dk;
    result[2] = dv;
    return result;
  }
};

class PoolFunction : public torch::autograd::Function<PoolFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& q, const OptTensor& cu_seqlens,
                        int64_t pool_size, const OptTensor& attention_mask) {
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor out = handles::pool_queries().call(q, cu_seqlens, pool_size, attention_mask);
    // The backward reads q's shape and layout only; saving q keeps one reference, no copy.
    ctx->save_for_backward({q, or_undefined(cu_seqlens), or_undefined(attention_mask)});
    ctx->saved_data["pool_size"] = pool_size;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    Tensor dq = handles::pool_queries_backward().call(grads[0], saved[0], defined_or_none(saved[1]),
                                                      ctx->saved_data["pool_size"].toInt(),
                                                      defined_or_none(saved[2]));
    return {dq, Tensor(), Tensor(), Tensor()};
  }
};

class GumbelFunction : public torch::autograd::Function<GumbelFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& logits, double tau, bool hard,
                        std::optional<at::Generator> generator) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [z, soft] = handles::gumbel_route_sample().call(logits, tau, hard, std::move(generator));
    ctx->save_for_backward({soft});
    ctx->saved_data["tau"] = tau;
    return z;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    Tensor dlogits = handles::gumbel_route_backward().call(grads[0], saved[0],
                                                           ctx->saved_data["tau"].toDouble());
    return {dlogits, Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor> pair(const variable_list& v) { return {v[0], v[1]}; }

}  // namespace

std::tuple<Tensor, Tensor> full_attention_autograd(const Tensor& q, const Tensor& k, const Tensor& v,
                                                   const OptTensor& cu_q, const OptTensor& cu_k,
                                                   OptSymInt max_q, OptSymInt max_k, bool causal,
                                                   std::optional<double> scale) {
  return pair(AttentionFunction::apply(q, k, v, int64_t(kFull), OptTensor(), cu_q, cu_k, max_q, max_k,
                                       causal, scale, int64_t(0), int64_t(0), int64_t(1)));
}

std::tuple<Tensor, Tensor> sparse_attention_autograd(const Tensor& q, const Tensor& k, const Tensor& v,
                                                     const OptTensor& cu_q, const OptTensor& cu_k,
                                                     OptSymInt max_q, OptSymInt max_k,
                                                     std::optional<double> scale, int64_t sink_tokens,
                                                     int64_t local_blocks, int64_t block_size) {
  return pair(AttentionFunction::apply(q, k, v, int64_t(kSparse), OptTensor(), cu_q, cu_k, max_q,
                                       max_k, true, scale, sink_tokens, local_blocks, block_size));
}

std::tuple<Tensor, Tensor> flux_attention_autograd(const Tensor& q, const Tensor& k, const Tensor& v,
                                                   const Tensor& use_sparse, const OptTensor& cu_q,
                                                   const OptTensor& cu_k, OptSymInt max_q,
                                                   OptSymInt max_k, std::optional<double> scale,
                                                   int64_t sink_tokens, int64_t local_blocks,
                                                   int64_t block_size) {
  return pair(AttentionFunction::apply(q, k, v, int64_t(kFlux), OptTensor(use_sparse), cu_q, cu_k,
                                       max_q, max_k, true, scale, sink_tokens, local_blocks,
                                       block_size));
}

Tensor pool_queries_autograd(const Tensor& q, const OptTensor& cu_seqlens, int64_t pool_size,
                             const OptTensor& attention_mask) {
  return PoolFunction::apply(q, cu_seqlens, pool_size, attention_mask);
}

Tensor gumbel_route_autograd(const Tensor& logits, double tau, bool hard,
                             std::optional<at::Generator> generator) {
  return GumbelFunction::apply(logits, tau, hard, std::move(generator));
}

}  // namespace flux_attention
