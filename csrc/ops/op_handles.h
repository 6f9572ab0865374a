// Typed dispatcher handles for every registered op: the C++ API and the autograd functions call the
// ops through these, so they get the same device dispatch (and, for the API, autograd) as Python.
#pragma once

#include <optional>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/core/List.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/SymInt.h>

namespace flux_attention::handles {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using OptSymInt = std::optional<c10::SymInt>;
using TensorPair = std::tuple<Tensor, Tensor>;

// The signature goes last and variadic: its template arguments contain commas.
#define FLUX_OP_HANDLE(fn, name, ...)                                                        \
  inline c10::TypedOperatorHandle<__VA_ARGS__> fn() {                                        \
    static const auto handle = c10::Dispatcher::singleton()                                  \
                                   .findSchemaOrThrow("flux_attention::" name, "")           \
                                   .typed<__VA_ARGS__>();                                    \
    return handle;                                                                           \
  }

FLUX_OP_HANDLE(full_attention, "full_attention",
               TensorPair(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                          const OptTensor&, OptSymInt, OptSymInt, bool, std::optional<double>))
FLUX_OP_HANDLE(sparse_attention, "sparse_attention",
               TensorPair(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                          const OptTensor&, OptSymInt, OptSymInt, std::optional<double>, int64_t,
                          int64_t, int64_t))
FLUX_OP_HANDLE(flux_attention, "flux_attention",
               TensorPair(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                          const OptTensor&, const OptTensor&, OptSymInt, OptSymInt,
                          std::optional<double>, int64_t, int64_t, int64_t))
FLUX_OP_HANDLE(attention_backward, "attention_backward",
               std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const OptTensor&, const Tensor&,
                                                  const Tensor&, const Tensor&, const Tensor&,
                                                  const Tensor&, const OptTensor&, const OptTensor&,
                                                  OptSymInt, OptSymInt, bool, double, int64_t,
                                                  const OptTensor&, int64_t, int64_t, int64_t))
FLUX_OP_HANDLE(decode_attention, "decode_attention",
               TensorPair(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                          const OptTensor&, const OptTensor&, std::optional<double>, int64_t,
                          int64_t, int64_t))
FLUX_OP_HANDLE(append_kv, "append_kv",
               void(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                    const OptTensor&))
FLUX_OP_HANDLE(pool_queries, "pool_queries",
               Tensor(const Tensor&, const OptTensor&, int64_t, const OptTensor&))
FLUX_OP_HANDLE(pool_queries_backward, "pool_queries_backward",
               Tensor(const Tensor&, const Tensor&, const OptTensor&, int64_t, const OptTensor&))
FLUX_OP_HANDLE(gumbel_route, "gumbel_route",
               Tensor(const Tensor&, double, bool, std::optional<at::Generator>))
FLUX_OP_HANDLE(gumbel_route_sample, "gumbel_route_sample",
               TensorPair(const Tensor&, double, bool, std::optional<at::Generator>))
FLUX_OP_HANDLE(gumbel_route_backward, "gumbel_route_backward",
               Tensor(const Tensor&, const Tensor&, double))

FLUX_OP_HANDLE(rms_norm, "rms_norm", Tensor(const Tensor&, const Tensor&, double))
FLUX_OP_HANDLE(silu_mul, "silu_mul", Tensor(const Tensor&, const Tensor&))
FLUX_OP_HANDLE(rotary_embedding, "rotary_embedding",
               TensorPair(const Tensor&, const Tensor&, const Tensor&, const Tensor&))
FLUX_OP_HANDLE(decode_linear, "decode_linear", Tensor(const Tensor&, const Tensor&, const OptTensor&))
FLUX_OP_HANDLE(decode_swiglu, "decode_swiglu", Tensor(const Tensor&, const Tensor&, const Tensor&))
FLUX_OP_HANDLE(decode_linear_group, "decode_linear_group",
               std::vector<Tensor>(const Tensor&, at::TensorList, const c10::List<OptTensor>&))

#undef FLUX_OP_HANDLE

}  // namespace flux_attention::handles
