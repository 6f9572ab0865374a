// The fused model ops on the CPU (flux/model_ops.h): one pass over the inputs, fp32 accumulation
// (fp64 for fp64, which the float64 reference tests use), one rounding per output element.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "flux/model_ops.h"

namespace flux::cpu {
namespace {

template <typename T>
using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename Fn>
void for_dtype(DataType dtype, Fn&& fn) {
  switch (dtype) {
    case DataType::kFloat32: fn(float{}); break;
    case DataType::kFloat64: fn(double{}); break;
    case DataType::kFloat16: fn(c10::Half{}); break;
    case DataType::kBFloat16: fn(c10::BFloat16{}); break;
  }
}

template <typename T>
void rms_norm_as(const RmsNormParams& p) {
  const T* x = static_cast<const T*>(p.x);
  const T* w = static_cast<const T*>(p.weight);
  T* out = static_cast<T*>(p.out);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, p.cols));
  at::parallel_for(0, p.rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * p.x_row_stride;
      T* orow = out + r * p.out_row_stride;
      Acc<T> ss = 0;
      for (int64_t c = 0; c < p.cols; ++c) {
        const Acc<T> v = Acc<T>(xr[c]);
        ss += v * v;
      }
      const Acc<T> inv = Acc<T>(1) / std::sqrt(ss / Acc<T>(p.cols) + Acc<T>(p.eps));
      for (int64_t c = 0; c < p.cols; ++c) orow[c] = T(Acc<T>(xr[c]) * inv * Acc<T>(w[c]));
    }
  });
}

template <typename T>
void silu_mul_as(const SiluMulParams& p) {
  const T* g = static_cast<const T*>(p.gate);
  const T* u = static_cast<const T*>(p.up);
  T* out = static_cast<T*>(p.out);
  at::parallel_for(0, p.n, 16384, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Acc<T> gi = Acc<T>(g[i]);
      out[i] = T(gi / (Acc<T>(1) + std::exp(-gi)) * Acc<T>(u[i]));
    }
  });
}

template <typename T>
void rope_rows(const T* src, T* dst, const T* cos, const T* sin, int half) {
  for (int i = 0; i < half; ++i) {
    const Acc<T> x1 = Acc<T>(src[i]), x2 = Acc<T>(src[i + half]);
    dst[i] = T(x1 * Acc<T>(cos[i]) - x2 * Acc<T>(sin[i]));
    dst[i + half] = T(x2 * Acc<T>(cos[i + half]) + x1 * Acc<T>(sin[i + half]));
  }
}

template <typename T>
void rope_as(const RopeParams& p) {
  const int half = p.head_dim / 2;
  const int64_t tokens = int64_t(p.batch) * p.seqlen;
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / p.seqlen, s = t % p.seqlen;
      const T* cos = static_cast<const T*>(p.cos) + b * p.cos_batch_stride + s * p.cos_row_stride;
      const T* sin = static_cast<const T*>(p.sin) + b * p.cos_batch_stride + s * p.cos_row_stride;
      for (int h = 0; h < p.heads_q; ++h)
        rope_rows(static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride + s * p.q_row_stride,
                  static_cast<T*>(p.q_out) + b * p.qo_batch_stride + h * p.qo_head_stride + s * p.qo_row_stride,
                  cos, sin, half);
      for (int h = 0; h < p.heads_k; ++h)
        rope_rows(static_cast<const T*>(p.k) + b * p.k_batch_stride + h * p.k_head_stride + s * p.k_row_stride,
                  static_cast<T*>(p.k_out) + b * p.ko_batch_stride + h * p.ko_head_stride + s * p.ko_row_stride,
                  cos, sin, half);
    }
  });
}

template <typename T>
void decode_linear_as(const DecodeLinearParams& p) {
  const T* x = static_cast<const T*>(p.x);
  const T* w = static_cast<const T*>(p.weight);
  const T* up = static_cast<const T*>(p.up);
  const T* bias = static_cast<const T*>(p.bias);
  T* out = static_cast<T*>(p.out);
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, p.in_features));
  at::parallel_for(0, p.out_features, grain, [&](int64_t begin, int64_t end) {
    for (int64_t f = begin; f < end; ++f) {
      const T* wf = w + f * p.weight_row_stride;
      const T* uf = up ? up + f * p.weight_row_stride : nullptr;
      for (int r = 0; r < p.rows; ++r) {
        const T* xr = x + r * p.x_row_stride;
        Acc<T> g = 0, u = 0;
        for (int64_t k = 0; k < p.in_features; ++k) {
          g += Acc<T>(xr[k]) * Acc<T>(wf[k]);
          if (uf) u += Acc<T>(xr[k]) * Acc<T>(uf[k]);
        }
        Acc<T> y = uf ? g / (Acc<T>(1) + std::exp(-g)) * u : g;
        if (bias) y += Acc<T>(bias[f]);
        out[r * p.out_row_stride + f] = T(y);
      }
    }
  });
}

}  // namespace

void rms_norm(const RmsNormParams& params) {
  for_dtype(params.dtype, [&](auto tag) { rms_norm_as<decltype(tag)>(params); });
}

void silu_mul(const SiluMulParams& params) {
  for_dtype(params.dtype, [&](auto tag) { silu_mul_as<decltype(tag)>(params); });
}

void rotary_embedding(const RopeParams& params) {
  for_dtype(params.dtype, [&](auto tag) { rope_as<decltype(tag)>(params); });
}

void decode_linear(const DecodeLinearParams& params) {
  for_dtype(params.dtype, [&](auto tag) { decode_linear_as<decltype(tag)>(params); });
}

void decode_linear_group(const DecodeLinearGroupParams& params) {
  for (int i = 0; i < params.count; ++i) decode_linear(params.linear[i]);
}

}  // namespace flux::cpu
