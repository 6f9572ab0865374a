// Meta (fake) kernels: output shapes and dtypes only, no data access, symbolic sizes throughout, so
// torch.compile and torch.library.opcheck can trace every op. Value checks live in the real kernels.
#include "meta.h"

#include <ATen/ATen.h>

namespace flux_attention {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using OptSymInt = std::optional<c10::SymInt>;

namespace {

std::tuple<Tensor, Tensor> attention_meta(const Tensor& q, bool varlen) {
  Tensor out = at::empty_symint(q.sym_sizes(), q.options());
  const auto f32 = q.options().dtype(at::kFloat);
  Tensor lse = varlen ? at::empty_symint({q.sym_size(1), q.sym_size(0)}, f32)
                      : at::empty_symint({q.sym_size(0), q.sym_size(2), q.sym_size(1)}, f32);
  return {out, lse};
}

}  // namespace

std::tuple<Tensor, Tensor> full_attention_meta(const Tensor& q, const Tensor&, const Tensor&,
                                               const OptTensor& cu_q, const OptTensor&, OptSymInt,
                                               OptSymInt, bool, std::optional<double>) {
  return attention_meta(q, cu_q.has_value());
}

std::tuple<Tensor, Tensor> sparse_attention_meta(const Tensor& q, const Tensor&, const Tensor&,
                                                 const OptTensor& cu_q, const OptTensor&, OptSymInt,
                                                 OptSymInt, std::optional<double>, int64_t, int64_t,
                                                 int64_t) {
  return attention_meta(q, cu_q.has_value());
}

std::tuple<Tensor, Tensor> flux_attention_meta(const Tensor& q, const Tensor&, const Tensor&,
                                               const Tensor&, const OptTensor& cu_q, const OptTensor&,
                                               OptSymInt, OptSymInt, std::optional<double>, int64_t,
                                               int64_t, int64_t) {
  return attention_meta(q, cu_q.has_value());
}

std::tuple<Tensor, Tensor, Tensor> attention_backward_meta(
    const Tensor&, const OptTensor&, const Tensor& q, const Tensor& k, const Tensor& v,
    const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, OptSymInt, OptSymInt, bool,
    double, int64_t, const OptTensor&, int64_t, int64_t, int64_t) {
  return {at::empty_symint(q.sym_sizes(), q.options()), at::empty_symint(k.sym_sizes(), k.options()),
          at::empty_symint(v.sym_sizes(), v.options())};
}

std::tuple<Tensor, Tensor> decode_attention_meta(const Tensor& q, const Tensor&, const Tensor&,
                                                 const Tensor&, const OptTensor&, const OptTensor&,
                                                 std::optional<double>, int64_t, int64_t, int64_t) {
  // q [B, Hq, D] -> lse [B, Hq]; q [B, Tq, Hq, D] -> lse [B, Hq, Tq].
  if (q.dim() == 4) {
    return {at::empty_symint(q.sym_sizes(), q.options()),
            at::empty_symint({q.sym_size(0), q.sym_size(2), q.sym_size(1)}, q.options().dtype(at::kFloat))};
  }
  return {at::empty_symint(q.sym_sizes(), q.options()),
          at::empty_symint({q.sym_size(0), q.sym_size(1)}, q.options().dtype(at::kFloat))};
}

void append_kv_meta(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                    const OptTensor&) {
  // Mutates the caches in place: nothing to allocate, no shape to produce.
}

Tensor pool_queries_meta(const Tensor& q, const OptTensor& cu_seqlens, int64_t, const OptTensor&) {
  const c10::SymInt batch = cu_seqlens ? cu_seqlens->sym_size(0) - 1 : q.sym_size(0);
  return at::empty_symint({batch, q.sym_size(-1)}, q.options());
}

Tensor pool_queries_backward_meta(const Tensor&, const Tensor& q, const OptTensor&, int64_t,
                                  const OptTensor&) {
  return at::empty_symint(q.sym_sizes(), q.options());
}

}  // namespace flux_attention
