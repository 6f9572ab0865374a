// gumbel_route: the Layer Router's training-time decision (DESIGN.md section 1). Written with ATen
// ops, so one implementation serves CPU, CUDA and Meta (registered as CompositeExplicitAutograd); the
// work is [B, 2] elements and never worth a kernel of its own.
#include "gumbel.h"

#include <ATen/ATen.h>

#include "checks.h"

namespace flux_attention {

using at::Tensor;

namespace {

// Inside both logarithms, so u = 0 and u -> 1 stay finite.
constexpr double kGumbelEps = 1e-10;

void check_logits(const char* op, const Tensor& logits, double tau) {
  checks::check_defined(op, "logits", logits);
  FLUX_CHECK(logits.dim() == 2 && logits.size(1) == 2, op,
             "logits must be [batch, 2] (index 1 = full attention, 0 = sparse); got ",
             checks::describe(logits));
  FLUX_CHECK(at::isFloatingType(logits.scalar_type()), op, "logits must be floating point; got ",
             checks::describe(logits));
  FLUX_CHECK(tau > 0.0, op, "tau must be positive; got ", tau);
}

}  // namespace

std::tuple<Tensor, Tensor> gumbel_route_sample(const Tensor& logits, double tau, bool hard,
                                               std::optional<at::Generator> generator) {
  check_logits("gumbel_route", logits, tau);
  const Tensor u = at::rand(logits.sizes(), generator, logits.options().dtype(at::kFloat));
  const Tensor g = -at::log(-at::log(u + kGumbelEps) + kGumbelEps);
  const Tensor soft = at::softmax((logits.to(at::kFloat) + g) / tau, /*dim=*/1);
  const Tensor p_fa = soft.select(1, 1);
  // Ties go to sparse attention: argmax over [sparse, full] returns the first maximum.
  // copy=true: z must never alias soft (both are outputs of the op).
  const Tensor z = hard ? p_fa.gt(soft.select(1, 0)).to(logits.scalar_type())
                        : p_fa.to(logits.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
  return {z, soft};
}

Tensor gumbel_route_kernel(const Tensor& logits, double tau, bool hard,
                           std::optional<at::Generator> generator) {
  return std::get<0>(gumbel_route_sample(logits, tau, hard, std::move(generator)));
}

Tensor gumbel_route_backward_kernel(const Tensor& grad_z, const Tensor& soft, double tau) {
  const char* op = "gumbel_route_backward";
  FLUX_CHECK(soft.dim() == 2 && soft.size(1) == 2, op, "soft must be [batch, 2]; got ",
             checks::describe(soft));
  FLUX_CHECK(grad_z.dim() == 1 && grad_z.size(0) == soft.size(0), op,
             "grad_z must be [batch] = [", soft.size(0), "]; got ", checks::describe(grad_z));
  // d softmax_1 / d logit_k = soft_k * (delta_k1 - soft_1) / tau.
  const Tensor p1 = soft.select(1, 1).unsqueeze(1);
  const Tensor onehot1 = at::zeros_like(soft);
  onehot1.select(1, 1).fill_(1.0);
  const Tensor jac = soft * (onehot1 - p1) / tau;
  return (jac * grad_z.to(at::kFloat).unsqueeze(1)).to(grad_z.scalar_type());
}

}  // namespace flux_attention
