// The fused model ops (flux/model_ops.h): input checks, output allocation, device dispatch, and the
// inference-only autograd guard. flux_attention/fused.py puts them into transformers' modules.
#include "model_ops.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "device.h"
#include "flux/model_ops.h"
#include "op_handles.h"

namespace flux_attention {

using at::Tensor;
using checks::describe;
using TensorPair = std::tuple<Tensor, Tensor>;

namespace {

void check_float_pair(const char* op, const char* name, const Tensor& t, const char* ref_name,
                      const Tensor& ref) {
  checks::check_defined(op, name, t);
  checks::check_same_device(op, name, t, ref_name, ref);
  checks::check_same_dtype(op, name, t, ref_name, ref);
}

void check_rope(const char* op, const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin) {
  checks::check_defined(op, "q", q);
  checks::kernel_dtype(op, "q", q);
  check_float_pair(op, "k", k, "q", q);
  check_float_pair(op, "cos", cos, "q", q);
  check_float_pair(op, "sin", sin, "q", q);
  FLUX_CHECK(q.dim() == 4 && k.dim() == 4, op,
             "q and k must be [batch, heads, seqlen, head_dim] (transformers' layout); got q ", describe(q),
             ", k ", describe(k));
  FLUX_CHECK(k.size(0) == q.size(0) && k.size(2) == q.size(2) && k.size(3) == q.size(3), op,
             "k must match q's batch, seqlen and head_dim; got q ", describe(q), ", k ", describe(k));
  FLUX_CHECK(q.size(3) % 2 == 0, op, "head_dim must be even (rotate_half); got q ", describe(q));
  FLUX_CHECK(cos.dim() == 3 && (cos.size(0) == q.size(0) || cos.size(0) == 1) && cos.size(1) == q.size(2) &&
                 cos.size(2) == q.size(3),
             op, "cos must be [batch or 1, seqlen, head_dim] = [", q.size(0), ", ", q.size(2), ", ", q.size(3),
             "]; got ", describe(cos));
  FLUX_CHECK(sin.sizes() == cos.sizes(), op, "sin must have cos's shape ", describe(cos), "; got ",
             describe(sin));
  FLUX_CHECK(q.size(0) * q.size(2) <= int64_t(0x7fffffff), op, "batch * seqlen must be < 2^31; got q ",
             describe(q));
}

}  // namespace

Tensor rms_norm_kernel(const Tensor& x_in, const Tensor& weight_in, double eps) {
  const char* op = "rms_norm";
  checks::check_defined(op, "x", x_in);
  checks::kernel_dtype(op, "x", x_in);
  check_float_pair(op, "weight", weight_in, "x", x_in);
  FLUX_CHECK(x_in.dim() >= 1, op, "x must have at least one dimension; got ", describe(x_in));
  const int64_t cols = x_in.size(-1);
  FLUX_CHECK(weight_in.dim() == 1 && weight_in.size(0) == cols, op, "weight must be [", cols,
             "] (x's last dimension); got ", describe(weight_in));
  FLUX_CHECK(std::isfinite(eps) && eps >= 0, op, "eps must be finite and >= 0; got ", eps);
  Tensor out = at::empty(x_in.sizes(), x_in.options());
  if (out.numel() == 0) return out;
  // Rows as a [rows, cols] view where x allows it (a copy otherwise); the columns must be dense.
  const Tensor x = checks::unit_last_stride(x_in).reshape({-1, cols});
  const Tensor weight = weight_in.contiguous();
  flux::RmsNormParams p;
  p.dtype = checks::kernel_dtype(op, "x", x);
  p.x = x.data_ptr();
  p.weight = weight.data_ptr();
  p.out = out.data_ptr();
  p.rows = x.size(0);
  p.cols = cols;
  p.x_row_stride = x.stride(0);
  p.out_row_stride = cols;
  p.eps = float(eps);
  run_on_device(op, x, [&] { flux::cpu::rms_norm(p); },
                FLUX_CUDA_LAUNCH(flux::run_rms_norm(p, stream)));
  return out;
}

Tensor silu_mul_kernel(const Tensor& gate_in, const Tensor& up_in) {
  const char* op = "silu_mul";
  checks::check_defined(op, "gate", gate_in);
  checks::kernel_dtype(op, "gate", gate_in);
  check_float_pair(op, "up", up_in, "gate", gate_in);
  FLUX_CHECK(up_in.sizes() == gate_in.sizes(), op, "up must have gate's shape ", describe(gate_in),
             "; got ", describe(up_in));
  const Tensor gate = gate_in.contiguous(), up = up_in.contiguous();
  Tensor out = at::empty(gate.sizes(), gate.options());
  if (out.numel() == 0) return out;
  flux::SiluMulParams p;
  p.dtype = checks::kernel_dtype(op, "gate", gate);
  p.gate = gate.data_ptr();
  p.up = up.data_ptr();
  p.out = out.data_ptr();
  p.n = out.numel();
  run_on_device(op, gate, [&] { flux::cpu::silu_mul(p); },
                FLUX_CUDA_LAUNCH(flux::run_silu_mul(p, stream)));
  return out;
}

TensorPair rotary_embedding_kernel(const Tensor& q_in, const Tensor& k_in, const Tensor& cos_in,
                                   const Tensor& sin_in) {
  const char* op = "rotary_embedding";
  check_rope(op, q_in, k_in, cos_in, sin_in);
  const Tensor q = checks::unit_last_stride(q_in), k = checks::unit_last_stride(k_in);
  // sin is read with cos's strides.
  const Tensor cos = cos_in.contiguous(), sin = sin_in.contiguous();
  // Outputs keep the inputs' memory layout: transformers hands q and k as [B, H, S, D] views of
  // [B, S, H, D] projections, and attention reads them back in that order without a copy.
  Tensor q_out = at::empty_like(q), k_out = at::empty_like(k);
  if (q.numel() + k.numel() == 0) return {q_out, k_out};
  flux::RopeParams p;
  p.dtype = checks::kernel_dtype(op, "q", q);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.cos = cos.data_ptr();
  p.sin = sin.data_ptr();
  p.q_out = q_out.data_ptr();
  p.k_out = k_out.data_ptr();
  p.batch = int(q.size(0));
  p.heads_q = int(q.size(1));
  p.heads_k = int(k.size(1));
  p.seqlen = q.size(2);
  p.head_dim = int(q.size(3));
  p.q_batch_stride = q.stride(0), p.q_head_stride = q.stride(1), p.q_row_stride = q.stride(2);
  p.k_batch_stride = k.stride(0), p.k_head_stride = k.stride(1), p.k_row_stride = k.stride(2);
  p.qo_batch_stride = q_out.stride(0), p.qo_head_stride = q_out.stride(1), p.qo_row_stride = q_out.stride(2);
  p.ko_batch_stride = k_out.stride(0), p.ko_head_stride = k_out.stride(1), p.ko_row_stride = k_out.stride(2);
  p.cos_batch_stride = cos.size(0) == 1 ? 0 : cos.stride(0);
  p.cos_row_stride = cos.stride(1);
  run_on_device(op, q, [&] { flux::cpu::rotary_embedding(p); },
                FLUX_CUDA_LAUNCH(flux::run_rotary_embedding(p, stream)));
  return {q_out, k_out};
}

namespace {

// x [..., in] as a [rows, in] view with unit column stride; weight [out, in] likewise.
struct LinearShapes {
  Tensor x, weight;
  int64_t rows = 0, in_features = 0, out_features = 0;
};

LinearShapes check_decode_linear(const char* op, const Tensor& x_in, const char* weight_name,
                                 const Tensor& weight_in) {
  checks::check_defined(op, "x", x_in);
  checks::kernel_dtype(op, "x", x_in);
  check_float_pair(op, weight_name, weight_in, "x", x_in);
  FLUX_CHECK(x_in.dim() >= 1, op, "x must have at least one dimension ([..., in_features]); got ",
             describe(x_in));
  FLUX_CHECK(weight_in.dim() == 2 && weight_in.size(1) == x_in.size(-1), op, weight_name,
             " must be [out_features, ", x_in.size(-1), "] (nn.Linear's layout; x's last dimension); got ",
             describe(weight_in));
  LinearShapes s;
  s.in_features = x_in.size(-1);
  s.out_features = weight_in.size(0);
  s.rows = 1;
  for (int64_t d = 0; d + 1 < x_in.dim(); ++d) s.rows *= x_in.size(d);
  FLUX_CHECK(s.rows <= flux::kDecodeLinearMaxRows, op, "x has ", s.rows,
             " token rows (the product of its leading dimensions); this decode kernel takes at most ",
             flux::kDecodeLinearMaxRows, ". Use torch.nn.functional.linear for more rows");
  FLUX_CHECK(s.out_features <= (int64_t(1) << 31), op, weight_name, " has more than 2^31 rows: ",
             describe(weight_in));
  s.x = checks::unit_last_stride(x_in).reshape({s.rows, s.in_features});
  s.weight = checks::unit_last_stride(weight_in);
  return s;
}

std::vector<int64_t> linear_out_shape(const Tensor& x, int64_t out_features) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  return shape;
}

// The optional bias of a linear with out_features outputs, checked ("<name> must be [n]") and
// contiguous; undefined when absent.
Tensor checked_bias(const char* op, const char* name, const std::optional<Tensor>& bias, const Tensor& x,
                    const LinearShapes& s, const char* weight_name) {
  if (!bias.has_value() || !bias->defined()) return Tensor();
  check_float_pair(op, name, *bias, "x", x);
  FLUX_CHECK(bias->dim() == 1 && bias->size(0) == s.out_features, op, name, " must be [", s.out_features,
             "] (", weight_name, "'s out_features); got ", describe(*bias));
  return bias->contiguous();
}

// The kernel parameters of one linear (or SwiGLU pair) writing its [rows, out_features] output.
flux::DecodeLinearParams linear_params(const char* op, const LinearShapes& s, const Tensor& up, const Tensor& bias,
                                       const Tensor& out) {
  flux::DecodeLinearParams p;
  p.dtype = checks::kernel_dtype(op, "x", s.x);
  p.x = s.x.data_ptr();
  p.weight = s.weight.data_ptr();
  p.up = up.defined() ? up.data_ptr() : nullptr;
  p.bias = bias.defined() ? bias.data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.rows = int(s.rows);
  p.in_features = s.in_features;
  p.out_features = s.out_features;
  p.x_row_stride = s.x.stride(0);
  p.weight_row_stride = s.weight.stride(0);
  p.out_row_stride = s.out_features;
  return p;
}

// An empty sum (in_features == 0): the bias alone (silu(0) * 0 = 0 for SwiGLU).
void fill_empty_sum(Tensor& out, const Tensor& bias) {
  if (bias.defined()) out.copy_(bias.expand_as(out));
  else out.zero_();
}

Tensor run_decode_linear(const char* op, const LinearShapes& s, const Tensor& up, const Tensor& bias,
                         std::vector<int64_t> out_shape) {
  Tensor out = at::empty({s.rows, s.out_features}, s.x.options());
  if (out.numel() > 0 && s.in_features == 0) {
    fill_empty_sum(out, bias);
  } else if (out.numel() > 0) {
    const flux::DecodeLinearParams p = linear_params(op, s, up, bias, out);
    run_on_device(op, s.x, [&] { flux::cpu::decode_linear(p); },
                  FLUX_CUDA_LAUNCH(flux::run_decode_linear(p, stream)));
  }
  return out.view(out_shape);
}

}  // namespace

Tensor decode_linear_kernel(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias_in) {
  const char* op = "decode_linear";
  const LinearShapes s = check_decode_linear(op, x, "weight", weight);
  const Tensor bias = checked_bias(op, "bias", bias_in, x, s, "weight");
  return run_decode_linear(op, s, Tensor(), bias, linear_out_shape(x, s.out_features));
}

Tensor decode_swiglu_kernel(const Tensor& x, const Tensor& gate_weight, const Tensor& up_weight) {
  const char* op = "decode_swiglu";
  const LinearShapes s = check_decode_linear(op, x, "gate_weight", gate_weight);
  check_float_pair(op, "up_weight", up_weight, "x", x);
  FLUX_CHECK(up_weight.sizes() == gate_weight.sizes(), op, "up_weight must have gate_weight's shape ",
             describe(gate_weight), "; got ", describe(up_weight));
  // The kernel reads up with gate's row stride: both as they are when their strides agree.
  LinearShapes sc = s;
  Tensor up = checks::unit_last_stride(up_weight);
  if (up.strides() != s.weight.strides()) {
    sc.weight = s.weight.contiguous();
    up = up.contiguous();
  }
  return run_decode_linear(op, sc, up, Tensor(), linear_out_shape(x, s.out_features));
}

std::vector<Tensor> decode_linear_group_kernel(const Tensor& x, at::TensorList weights,
                                               const c10::List<std::optional<Tensor>>& biases) {
  const char* op = "decode_linear_group";
  const int64_t n = int64_t(weights.size());
  FLUX_CHECK(n >= 1 && n <= flux::kDecodeLinearMaxGroup, op, "weights must hold 1 to ",
             flux::kDecodeLinearMaxGroup, " matrices (a layer's q, k and v projections); got ", n);
  FLUX_CHECK(biases.size() == 0 || int64_t(biases.size()) == n, op,
             "biases must be empty or hold one entry (a tensor or None) per weight: ", n, "; got ",
             biases.size());
  std::vector<LinearShapes> shapes;
  std::vector<Tensor> bias(n), outs(n);
  for (int64_t i = 0; i < n; ++i) {
    const std::string name = "weights[" + std::to_string(i) + "]";
    shapes.push_back(check_decode_linear(op, x, name.c_str(), weights[i]));
    const std::string bias_name = "biases[" + std::to_string(i) + "]";
    bias[i] = checked_bias(op, bias_name.c_str(), biases.size() ? std::optional<Tensor>(biases.get(i)) : std::nullopt,
                           x, shapes[i], name.c_str());
  }
  // Every member reads the first member's [rows, in] view of x: the group kernel takes one x, and
  // check_decode_linear copies a non-viewable x afresh for each weight.
  const LinearShapes& s0 = shapes[0];
  flux::DecodeLinearGroupParams g;
  g.count = int(n);
  for (int64_t i = 0; i < n; ++i) {
    LinearShapes s = shapes[i];
    s.x = s0.x;
    outs[i] = at::empty({s.rows, s.out_features}, s0.x.options());
    g.linear[i] = linear_params(op, s, Tensor(), bias[i], outs[i]);
  }
  if (s0.rows > 0 && s0.in_features == 0) {
    for (int64_t i = 0; i < n; ++i) fill_empty_sum(outs[i], bias[i]);
  } else if (s0.rows > 0) {
    run_on_device(op, s0.x, [&] { flux::cpu::decode_linear_group(g); },
                  FLUX_CUDA_LAUNCH(flux::run_decode_linear_group(g, stream)));
  }
  for (int64_t i = 0; i < n; ++i) outs[i] = outs[i].view(linear_out_shape(x, shapes[i].out_features));
  return outs;
}

// ---- meta ----------------------------------------------------------------------------------------

Tensor rms_norm_meta(const Tensor& x, const Tensor&, double) {
  return at::empty_symint(x.sym_sizes(), x.options());
}

Tensor silu_mul_meta(const Tensor& gate, const Tensor&) {
  return at::empty_symint(gate.sym_sizes(), gate.options());
}

TensorPair rotary_embedding_meta(const Tensor& q, const Tensor& k, const Tensor&, const Tensor&) {
  return {at::empty_like(q), at::empty_like(k)};
}

Tensor decode_linear_meta(const Tensor& x, const Tensor& weight, const std::optional<Tensor>&) {
  auto shape = x.sym_sizes().vec();
  shape.back() = weight.sym_size(0);
  return at::empty_symint(shape, x.options());
}

Tensor decode_swiglu_meta(const Tensor& x, const Tensor& gate_weight, const Tensor&) {
  auto shape = x.sym_sizes().vec();
  shape.back() = gate_weight.sym_size(0);
  return at::empty_symint(shape, x.options());
}

std::vector<Tensor> decode_linear_group_meta(const Tensor& x, at::TensorList weights,
                                             const c10::List<std::optional<Tensor>>&) {
  std::vector<Tensor> outs;
  for (const Tensor& w : weights) {
    auto shape = x.sym_sizes().vec();
    shape.back() = w.sym_size(0);
    outs.push_back(at::empty_symint(shape, x.options()));
  }
  return outs;
}

// ---- autograd guard ------------------------------------------------------------------------------

namespace {

void refuse_grad(const char* op, std::initializer_list<const Tensor*> inputs) {
  if (!at::GradMode::is_enabled()) return;
  for (const Tensor* t : inputs) {
    FLUX_CHECK(!(t->defined() && t->requires_grad()), op,
               "an input requires grad, but this inference kernel has no backward. Call it under "
               "torch.no_grad() / torch.inference_mode(); modules patched by "
               "flux_attention.fuse_ops fall back to their own forward when gradients are needed");
  }
}

}  // namespace

Tensor rms_norm_autograd(const Tensor& x, const Tensor& weight, double eps) {
  refuse_grad("rms_norm", {&x, &weight});
  at::AutoDispatchBelowADInplaceOrView below;
  return handles::rms_norm().call(x, weight, eps);
}

Tensor silu_mul_autograd(const Tensor& gate, const Tensor& up) {
  refuse_grad("silu_mul", {&gate, &up});
  at::AutoDispatchBelowADInplaceOrView below;
  return handles::silu_mul().call(gate, up);
}

TensorPair rotary_embedding_autograd(const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin) {
  refuse_grad("rotary_embedding", {&q, &k, &cos, &sin});
  at::AutoDispatchBelowADInplaceOrView below;
  return handles::rotary_embedding().call(q, k, cos, sin);
}

Tensor decode_linear_autograd(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias) {
  refuse_grad("decode_linear", {&x, &weight, bias.has_value() ? &*bias : &x});
  at::AutoDispatchBelowADInplaceOrView below;
  return handles::decode_linear().call(x, weight, bias);
}

Tensor decode_swiglu_autograd(const Tensor& x, const Tensor& gate_weight, const Tensor& up_weight) {
  refuse_grad("decode_swiglu", {&x, &gate_weight, &up_weight});
  at::AutoDispatchBelowADInplaceOrView below;
  return handles::decode_swiglu().call(x, gate_weight, up_weight);
}

std::vector<Tensor> decode_linear_group_autograd(const Tensor& x, at::TensorList weights,
                                                 const c10::List<std::optional<Tensor>>& biases) {
  refuse_grad("decode_linear_group", {&x});
  for (const Tensor& w : weights) refuse_grad("decode_linear_group", {&w});
  for (size_t i = 0; i < biases.size(); ++i) {
    const std::optional<Tensor> b = biases.get(i);
    if (b.has_value()) refuse_grad("decode_linear_group", {&*b});
  }
  at::AutoDispatchBelowADInplaceOrView below;
  return handles::decode_linear_group().call(x, weights, biases);
}

}  // namespace flux_attention
