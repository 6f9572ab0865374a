// pool_queries: the Layer Router's input (DESIGN.md section 1), the mean of each sequence's first and
// last pool_size query rows, then over heads. Reads 2 * pool_size rows per sequence, not the sequence.
#include "pool.h"

#include <ATen/ATen.h>

#include "device.h"

namespace flux_attention {

using at::Tensor;
using checks::describe;

namespace {

struct PoolInputs {
  Tensor q, cu, mask;
  int64_t batch = 0;
};

PoolInputs check_pool_inputs(const char* op, const Tensor& q_in,
                             const std::optional<Tensor>& cu_seqlens, int64_t pool_size,
                             const std::optional<Tensor>& attention_mask) {
  checks::check_defined(op, "q", q_in);
  checks::kernel_dtype(op, "q", q_in);
  FLUX_CHECK(pool_size > 0 && pool_size < (int64_t(1) << 30), op,
             "pool_size must be positive; got ", pool_size);
  PoolInputs in;
  if (cu_seqlens) {
    FLUX_CHECK(q_in.dim() == 3, op, "q must be [total, heads, head_dim] with cu_seqlens; got ",
               describe(q_in));
    FLUX_CHECK(!attention_mask, op,
               "attention_mask applies to padded q [batch, seqlen, heads, head_dim]; pass either "
               "cu_seqlens or attention_mask, not both");
    const Tensor& cu = *cu_seqlens;
    FLUX_CHECK(cu.dim() == 1 && cu.size(0) >= 1, op,
               "cu_seqlens must be a 1-D int32 tensor of batch + 1 offsets; got ", describe(cu));
    in.batch = cu.size(0) - 1;
    checks::check_int32_vector(op, "cu_seqlens", cu, in.batch + 1, q_in);
    checks::check_cu_seqlens_values(op, "cu_seqlens", cu, q_in.size(0));
    in.cu = cu.contiguous();
  } else {
    FLUX_CHECK(q_in.dim() == 4, op,
               "q must be [batch, seqlen, heads, head_dim] (or [total, heads, head_dim] with "
               "cu_seqlens); got ",
               describe(q_in));
    in.batch = q_in.size(0);
    if (attention_mask) {
      const Tensor& m = *attention_mask;
      FLUX_CHECK(m.dim() == 2 && m.size(0) == q_in.size(0) && m.size(1) == q_in.size(1), op,
                 "attention_mask must be [batch, seqlen] = [", q_in.size(0), ", ", q_in.size(1),
                 "]; got ", describe(m));
      FLUX_CHECK(m.scalar_type() == at::kBool || at::isIntegralType(m.scalar_type(), false), op,
                 "attention_mask must be bool or integer (1 = token, 0 = padding); got ",
                 describe(m));
      checks::check_same_device(op, "attention_mask", m, "q", q_in);
      in.mask = (m.scalar_type() == at::kBool ? m : m.ne(0)).contiguous();
    }
  }
  checks::check_head_dim(op, q_in, q_in.size(-1));
  in.q = checks::unit_last_stride(q_in);
  return in;
}

void fill_pool(flux::PoolParams& p, const PoolInputs& in, int64_t pool_size) {
  const Tensor& q = in.q;
  const bool varlen = in.cu.defined();
  p.dtype = checks::kernel_dtype("pool_queries", "q", q);
  p.q = q.data_ptr();
  p.q_batch_stride = varlen ? 0 : q.stride(0);
  p.q_row_stride = varlen ? q.stride(0) : q.stride(1);
  p.q_head_stride = varlen ? q.stride(1) : q.stride(2);
  p.batch = static_cast<int>(in.batch);
  p.num_heads = static_cast<int>(q.size(-2));
  p.head_dim = static_cast<int>(q.size(-1));
  p.seqlen = varlen ? 0 : q.size(1);
  p.cu_seqlens = varlen ? in.cu.data_ptr<int32_t>() : nullptr;
  p.mask = in.mask.defined() ? in.mask.data_ptr<bool>() : nullptr;
  p.mask_batch_stride = in.mask.defined() ? in.mask.stride(0) : 0;
  p.pool_size = static_cast<int>(pool_size);
}

}  // namespace

Tensor pool_queries_kernel(const Tensor& q_in, const std::optional<Tensor>& cu_seqlens,
                           int64_t pool_size, const std::optional<Tensor>& attention_mask) {
  const char* op = "pool_queries";
  const PoolInputs in = check_pool_inputs(op, q_in, cu_seqlens, pool_size, attention_mask);
  Tensor out = at::empty({in.batch, in.q.size(-1)}, in.q.options());
  if (out.numel() == 0) return out;
  flux::PoolParams p;
  fill_pool(p, in, pool_size);
  p.out = out.data_ptr();
  p.o_batch_stride = out.stride(0);
  run_on_device(op, in.q, [&] { flux::cpu::pool_queries(p); },
                FLUX_CUDA_LAUNCH(flux::run_pool_queries(p, stream)));
  return out;
}

Tensor pool_queries_backward_kernel(const Tensor& grad_in, const Tensor& q_in,
                                    const std::optional<Tensor>& cu_seqlens, int64_t pool_size,
                                    const std::optional<Tensor>& attention_mask) {
  const char* op = "pool_queries_backward";
  const PoolInputs in = check_pool_inputs(op, q_in, cu_seqlens, pool_size, attention_mask);
  FLUX_CHECK(grad_in.dim() == 2 && grad_in.size(0) == in.batch &&
                 grad_in.size(1) == in.q.size(-1),
             op, "grad must be [batch, head_dim] = [", in.batch, ", ", in.q.size(-1), "]; got ",
             describe(grad_in));
  checks::check_same_device(op, "grad", grad_in, "q", q_in);
  const Tensor grad = grad_in.to(in.q.scalar_type()).contiguous();
  // Varlen rows past cu_seqlens[-1] belong to no sequence and are not visited by the kernels.
  Tensor dq = in.cu.defined() ? at::zeros(in.q.sizes(), in.q.options())
                              : at::empty(in.q.sizes(), in.q.options());
  if (dq.numel() == 0) return dq;
  flux::PoolBwdParams p;
  fill_pool(p, in, pool_size);
  p.dout = grad.data_ptr();
  p.do_batch_stride = grad.stride(0);
  p.dq = dq.data_ptr();
  const bool varlen = in.cu.defined();
  p.dq_batch_stride = varlen ? 0 : dq.stride(0);
  p.dq_row_stride = varlen ? dq.stride(0) : dq.stride(1);
  p.dq_head_stride = varlen ? dq.stride(1) : dq.stride(2);
  run_on_device(op, in.q, [&] { flux::cpu::pool_queries_bwd(p); },
                FLUX_CUDA_LAUNCH(flux::run_pool_queries_bwd(p, stream)));
  return dq;
}

}  // namespace flux_attention
