// full_attention, sparse_attention, flux_attention and their shared backward: check the inputs,
// fill one AttnFwdParams / AttnBwdParams, run the CPU kernel or the CUDA launcher. The three public
// ops differ only in the SparseMode they put in the params.
#include "attention.h"

#include <cmath>

#include <ATen/ATen.h>

#include "device.h"

namespace flux_attention {

using at::Tensor;
using checks::describe;

namespace {

int64_t max_seqlen_from(const Tensor& cu) {
  if (cu.size(0) < 2) return 0;
  // On CUDA this is a device-to-host copy; callers who care pass max_seqlen_* explicitly.
  return (cu.slice(0, 1) - cu.slice(0, 0, -1)).max().item<int64_t>();
}

void check_max_seqlen(const char* op, const char* name, const Tensor& cu, int64_t given) {
  FLUX_CHECK(given >= 0, op, name, " must be non-negative; got ", given);
  if (cu.device().is_cpu()) {
    const int64_t actual = max_seqlen_from(cu);
    FLUX_CHECK(given >= actual, op, name, " (", given,
               ") is smaller than the longest sequence in cu_seqlens (", actual, ")");
  }
}

}  // namespace

AttnShape check_attention_inputs(const char* op, const Tensor& q, const Tensor& k, const Tensor& v,
                                 const std::optional<Tensor>& cu_seqlens_q,
                                 const std::optional<Tensor>& cu_seqlens_k,
                                 std::optional<int64_t> max_seqlen_q,
                                 std::optional<int64_t> max_seqlen_k) {
  checks::check_defined(op, "q", q);
  checks::check_defined(op, "k", k);
  checks::check_defined(op, "v", v);
  checks::check_same_device(op, "k", k, "q", q);
  checks::check_same_device(op, "v", v, "q", q);
  checks::kernel_dtype(op, "q", q);
  checks::check_same_dtype(op, "k", k, "q", q);
  checks::check_same_dtype(op, "v", v, "q", q);

  AttnShape s;
  s.varlen = cu_seqlens_q.has_value() || cu_seqlens_k.has_value();
  if (s.varlen) {
    FLUX_CHECK(cu_seqlens_q.has_value() && cu_seqlens_k.has_value(), op,
               "varlen input needs both cu_seqlens_q and cu_seqlens_k; got only ",
               cu_seqlens_q.has_value() ? "cu_seqlens_q" : "cu_seqlens_k");
    FLUX_CHECK(q.dim() == 3, op, "q must be [total_q, heads, head_dim] with cu_seqlens; got ",
               describe(q));
    FLUX_CHECK(k.dim() == 3, op, "k must be [total_k, kv_heads, head_dim] with cu_seqlens; got ",
               describe(k));
    FLUX_CHECK(v.dim() == 3, op, "v must be [total_k, kv_heads, head_dim] with cu_seqlens; got ",
               describe(v));
    const Tensor& cq = *cu_seqlens_q;
    const Tensor& ck = *cu_seqlens_k;
    FLUX_CHECK(cq.dim() == 1 && cq.size(0) >= 1, op,
               "cu_seqlens_q must be a 1-D int32 tensor of batch + 1 offsets; got ", describe(cq));
    s.batch = cq.size(0) - 1;
    checks::check_int32_vector(op, "cu_seqlens_q", cq, s.batch + 1, q);
    checks::check_int32_vector(op, "cu_seqlens_k", ck, s.batch + 1, q);
    s.total_q = q.size(0);
    s.total_k = k.size(0);
    FLUX_CHECK(v.size(0) == s.total_k, op, "v.size(0) must equal k.size(0) (total_k); got v ",
               describe(v), ", k ", describe(k));
    checks::check_cu_seqlens_values(op, "cu_seqlens_q", cq, s.total_q);
    checks::check_cu_seqlens_values(op, "cu_seqlens_k", ck, s.total_k);
    if (max_seqlen_q) check_max_seqlen(op, "max_seqlen_q", cq, *max_seqlen_q);
    if (max_seqlen_k) check_max_seqlen(op, "max_seqlen_k", ck, *max_seqlen_k);
    s.seqlen_q = max_seqlen_q ? *max_seqlen_q : max_seqlen_from(cq);
    s.seqlen_k = max_seqlen_k ? *max_seqlen_k : max_seqlen_from(ck);
  } else {
    FLUX_CHECK(q.dim() == 4, op, "q must be [batch, seqlen_q, heads, head_dim] (or varlen ",
               "[total_q, heads, head_dim] with cu_seqlens_q); got ", describe(q));
    FLUX_CHECK(k.dim() == 4, op, "k must be [batch, seqlen_k, kv_heads, head_dim]; got ", describe(k));
    FLUX_CHECK(v.dim() == 4, op, "v must be [batch, seqlen_k, kv_heads, head_dim]; got ", describe(v));
    s.batch = q.size(0);
    FLUX_CHECK(k.size(0) == s.batch, op, "k.size(0) (batch) must equal q.size(0) (", s.batch,
               "); got k ", describe(k));
    FLUX_CHECK(v.size(0) == s.batch, op, "v.size(0) (batch) must equal q.size(0) (", s.batch,
               "); got v ", describe(v));
    s.seqlen_q = q.size(1);
    s.seqlen_k = k.size(1);
    FLUX_CHECK(v.size(1) == s.seqlen_k, op, "v.size(1) must equal k.size(1) (seqlen_k); got v ",
               describe(v), ", k ", describe(k));
    s.total_q = s.batch * s.seqlen_q;
    s.total_k = s.batch * s.seqlen_k;
  }
  const int64_t h = q.dim() - 2;  // heads dimension
  s.heads_q = q.size(h);
  s.heads_k = k.size(h);
  s.head_dim = q.size(-1);
  FLUX_CHECK(v.size(h) == s.heads_k, op, "v.size(", h, ") (kv heads) must equal k.size(", h,
             ") (", s.heads_k, "); got v ", describe(v));
  FLUX_CHECK(s.heads_k > 0 && s.heads_q % s.heads_k == 0, op, "k.size(", h,
             ") (kv heads) must divide q.size(", h, ") (q heads); got k ", describe(k), ", q ",
             describe(q));
  FLUX_CHECK(k.size(-1) == s.head_dim, op, "k.size(-1) (head_dim) must equal q.size(-1) (",
             s.head_dim, "); got k ", describe(k));
  FLUX_CHECK(v.size(-1) == s.head_dim, op, "v.size(-1) (head_dim) must equal q.size(-1) (",
             s.head_dim, "); got v ", describe(v));
  checks::check_head_dim(op, q, s.head_dim);
  return s;
}

flux::StreamingPattern make_pattern(const char* op, int64_t sink_tokens, int64_t local_blocks,
                                    int64_t block_size) {
  constexpr int64_t kMax = int64_t(1) << 30;
  FLUX_CHECK(sink_tokens < kMax && local_blocks < kMax && block_size < kMax, op,
             "sink_tokens, local_blocks and block_size must each be below 2^30; got ", sink_tokens,
             ", ", local_blocks, ", ", block_size);
  flux::StreamingPattern p;
  p.sink_tokens = static_cast<int>(sink_tokens);
  p.local_blocks = static_cast<int>(local_blocks);
  p.block_size = static_cast<int>(block_size);
  checks::check_pattern(op, p);
  return p;
}

void check_use_sparse(const char* op, const Tensor& use_sparse, int64_t batch, const Tensor& q) {
  FLUX_CHECK(use_sparse.dim() == 1 && use_sparse.size(0) == batch &&
                 use_sparse.scalar_type() == at::kBool,
             op, "use_sparse must be a 1-D bool tensor with one flag per sequence (", batch,
             "); got ", describe(use_sparse));
  checks::check_same_device(op, "use_sparse", use_sparse, "q", q);
}

double resolve_scale(std::optional<double> scale, int64_t head_dim) {
  return scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(head_dim));
}

namespace {

// Strides of a [B, S, H, D] (padded) or [T, H, D] (varlen) tensor as (batch, row, head).
struct RowStrides {
  int64_t batch, row, head;
};

RowStrides row_strides(const Tensor& t, bool varlen) {
  if (varlen) return {0, t.stride(0), t.stride(1)};
  return {t.stride(0), t.stride(1), t.stride(2)};
}

void fill_fwd(flux::AttnFwdParams& p, const AttnShape& s, const Tensor& q, const Tensor& k,
              const Tensor& v, const Tensor& out, const Tensor& lse,
              const std::optional<Tensor>& cu_q, const std::optional<Tensor>& cu_k,
              const AttnConfig& cfg, const Tensor& use_sparse) {
  p.dtype = checks::kernel_dtype("attention", "q", q);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  const RowStrides sq = row_strides(q, s.varlen), sk = row_strides(k, s.varlen),
                   sv = row_strides(v, s.varlen), so = row_strides(out, s.varlen);
  p.q_batch_stride = sq.batch, p.q_row_stride = sq.row, p.q_head_stride = sq.head;
  p.k_batch_stride = sk.batch, p.k_row_stride = sk.row, p.k_head_stride = sk.head;
  p.v_batch_stride = sv.batch, p.v_row_stride = sv.row, p.v_head_stride = sv.head;
  p.o_batch_stride = so.batch, p.o_row_stride = so.row, p.o_head_stride = so.head;
  if (s.varlen) {  // lse [Hq, total_q]
    p.lse_batch_stride = 0;
    p.lse_head_stride = lse.stride(0);
  } else {  // lse [B, Hq, Sq]
    p.lse_batch_stride = lse.stride(0);
    p.lse_head_stride = lse.stride(1);
  }
  p.batch = static_cast<int>(s.batch);
  p.num_heads_q = static_cast<int>(s.heads_q);
  p.num_heads_k = static_cast<int>(s.heads_k);
  p.head_dim = static_cast<int>(s.head_dim);
  p.seqlen_q = s.seqlen_q;
  p.seqlen_k = s.seqlen_k;
  p.cu_seqlens_q = s.varlen ? cu_q->data_ptr<int32_t>() : nullptr;
  p.cu_seqlens_k = s.varlen ? cu_k->data_ptr<int32_t>() : nullptr;
  p.total_q = s.total_q;
  p.total_k = s.total_k;
  p.causal = cfg.causal || cfg.mode != flux::SparseMode::kDense;
  p.scale = static_cast<float>(cfg.scale);
  p.sparse_mode = cfg.mode;
  p.use_sparse = cfg.mode == flux::SparseMode::kPerSequence ? use_sparse.data_ptr<bool>() : nullptr;
  p.pattern = cfg.pattern;
}

Tensor contiguous_cu(const std::optional<Tensor>& cu) { return cu ? cu->contiguous() : Tensor(); }

}  // namespace

std::tuple<Tensor, Tensor> attention_forward(const char* op, const Tensor& q_in, const Tensor& k_in,
                                             const Tensor& v_in,
                                             const std::optional<Tensor>& cu_seqlens_q,
                                             const std::optional<Tensor>& cu_seqlens_k,
                                             std::optional<int64_t> max_seqlen_q,
                                             std::optional<int64_t> max_seqlen_k,
                                             const AttnConfig& cfg_in,
                                             const std::optional<Tensor>& use_sparse) {
  const AttnShape s = check_attention_inputs(op, q_in, k_in, v_in, cu_seqlens_q, cu_seqlens_k,
                                             max_seqlen_q, max_seqlen_k);
  if (cfg_in.mode == flux::SparseMode::kPerSequence) {
    FLUX_CHECK(use_sparse.has_value(), op, "use_sparse is required");
    check_use_sparse(op, *use_sparse, s.batch, q_in);
  }
  const AttnConfig& cfg = cfg_in;
  const Tensor q = checks::unit_last_stride(q_in);
  const Tensor k = checks::unit_last_stride(k_in);
  const Tensor v = checks::unit_last_stride(v_in);
  const std::optional<Tensor> cu_q = s.varlen ? std::optional<Tensor>(contiguous_cu(cu_seqlens_q))
                                              : std::nullopt;
  const std::optional<Tensor> cu_k = s.varlen ? std::optional<Tensor>(contiguous_cu(cu_seqlens_k))
                                              : std::nullopt;
  const Tensor flags = use_sparse ? use_sparse->contiguous() : Tensor();

  Tensor out = at::empty(q.sizes(), q.options());
  Tensor lse = s.varlen ? at::empty({s.heads_q, s.total_q}, q.options().dtype(at::kFloat))
                        : at::empty({s.batch, s.heads_q, s.seqlen_q}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};

  flux::AttnFwdParams p;
  fill_fwd(p, s, q, k, v, out, lse, cu_q, cu_k, cfg, flags);
  run_on_device(op, q, [&] { flux::cpu::attention_fwd(p); }, FLUX_CUDA_LAUNCH(flux::run_attention_fwd(p, stream)));
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> attention_backward_impl(
    const char* op, const Tensor& dout_in, const std::optional<Tensor>& dlse_in, const Tensor& q_in,
    const Tensor& k_in, const Tensor& v_in, const Tensor& out_in, const Tensor& lse_in,
    const std::optional<Tensor>& cu_seqlens_q, const std::optional<Tensor>& cu_seqlens_k,
    std::optional<int64_t> max_seqlen_q, std::optional<int64_t> max_seqlen_k, const AttnConfig& cfg,
    const std::optional<Tensor>& use_sparse) {
  const AttnShape s = check_attention_inputs(op, q_in, k_in, v_in, cu_seqlens_q, cu_seqlens_k,
                                             max_seqlen_q, max_seqlen_k);
  FLUX_CHECK(dout_in.sizes() == q_in.sizes(), op, "dout must have the shape of q; got dout ",
             describe(dout_in), ", q ", describe(q_in));
  FLUX_CHECK(out_in.sizes() == q_in.sizes(), op, "out must have the shape of q; got out ",
             describe(out_in), ", q ", describe(q_in));
  checks::check_same_dtype(op, "dout", dout_in, "q", q_in);
  checks::check_same_dtype(op, "out", out_in, "q", q_in);
  checks::check_same_device(op, "dout", dout_in, "q", q_in);
  checks::check_same_device(op, "out", out_in, "q", q_in);
  const std::vector<int64_t> lse_shape =
      s.varlen ? std::vector<int64_t>{s.heads_q, s.total_q}
               : std::vector<int64_t>{s.batch, s.heads_q, s.seqlen_q};
  FLUX_CHECK(lse_in.sizes() == at::IntArrayRef(lse_shape) && lse_in.scalar_type() == at::kFloat,
             op, "lse must be fp32 of shape ", at::IntArrayRef(lse_shape), "; got ",
             describe(lse_in));
  if (dlse_in) {
    FLUX_CHECK(dlse_in->sizes() == lse_in.sizes(), op, "dlse must have the shape of lse; got ",
               describe(*dlse_in));
  }
  if (cfg.mode == flux::SparseMode::kPerSequence) {
    FLUX_CHECK(use_sparse.has_value(), op, "use_sparse is required for sparse_mode 2");
    check_use_sparse(op, *use_sparse, s.batch, q_in);
  }

  const Tensor q = checks::unit_last_stride(q_in);
  const Tensor k = checks::unit_last_stride(k_in);
  const Tensor v = checks::unit_last_stride(v_in);
  const Tensor out = checks::unit_last_stride(out_in);
  const Tensor dout = checks::unit_last_stride(dout_in);
  const Tensor lse = lse_in.contiguous();
  const Tensor dlse = dlse_in ? dlse_in->to(at::kFloat).contiguous() : Tensor();
  const std::optional<Tensor> cu_q = s.varlen ? std::optional<Tensor>(contiguous_cu(cu_seqlens_q))
                                              : std::nullopt;
  const std::optional<Tensor> cu_k = s.varlen ? std::optional<Tensor>(contiguous_cu(cu_seqlens_k))
                                              : std::nullopt;
  const Tensor flags = use_sparse ? use_sparse->contiguous() : Tensor();

  // dk/dv rows outside every sequence (varlen padding) are never written by the kernels: zero them.
  Tensor dq = s.varlen ? at::zeros(q.sizes(), q.options()) : at::empty(q.sizes(), q.options());
  Tensor dk = s.varlen ? at::zeros(k.sizes(), k.options()) : at::empty(k.sizes(), k.options());
  Tensor dv = s.varlen ? at::zeros(v.sizes(), v.options()) : at::empty(v.sizes(), v.options());
  if (q.numel() == 0 || k.numel() == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }

  flux::AttnBwdParams p;
  fill_fwd(p, s, q, k, v, out, lse, cu_q, cu_k, cfg, flags);
  p.dout = dout.data_ptr();
  p.dlse = dlse.defined() ? dlse.data_ptr<float>() : nullptr;
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  const RowStrides sdo = row_strides(dout, s.varlen), sdq = row_strides(dq, s.varlen),
                   sdk = row_strides(dk, s.varlen), sdv = row_strides(dv, s.varlen);
  p.do_batch_stride = sdo.batch, p.do_row_stride = sdo.row, p.do_head_stride = sdo.head;
  p.dq_batch_stride = sdq.batch, p.dq_row_stride = sdq.row, p.dq_head_stride = sdq.head;
  p.dk_batch_stride = sdk.batch, p.dk_row_stride = sdk.row, p.dk_head_stride = sdk.head;
  p.dv_batch_stride = sdv.batch, p.dv_row_stride = sdv.row, p.dv_head_stride = sdv.head;
  p.deterministic = at::globalContext().deterministicAlgorithms();

  if (q.device().is_cpu()) {
    flux::cpu::attention_bwd(p);
  } else {
#ifdef FLUX_WITH_CUDA
    if (!q.device().is_cuda()) fail_no_kernel(op, q);
    const size_t bytes = flux::attention_bwd_workspace_bytes(p);
    Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, q.options().dtype(at::kByte));
    p.workspace = bytes ? workspace.data_ptr() : nullptr;
    p.workspace_bytes = bytes;
    run_cuda(op, q, [&](cudaStream_t stream) { return flux::run_attention_bwd(p, stream); });
#else
    fail_no_kernel(op, q);
#endif
  }
  return {dq, dk, dv};
}

// ---- the registered backend kernels (CPU and CUDA) ----

std::tuple<Tensor, Tensor> full_attention_kernel(const Tensor& q, const Tensor& k, const Tensor& v,
                                                  const std::optional<Tensor>& cu_seqlens_q,
                                                  const std::optional<Tensor>& cu_seqlens_k,
                                                  std::optional<int64_t> max_seqlen_q,
                                                  std::optional<int64_t> max_seqlen_k, bool causal,
                                                  std::optional<double> scale) {
  AttnConfig cfg;
  cfg.causal = causal;
  cfg.scale = resolve_scale(scale, q.size(-1));
  cfg.mode = flux::SparseMode::kDense;
  return attention_forward("full_attention", q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                           max_seqlen_k, cfg, std::nullopt);
}

std::tuple<Tensor, Tensor> sparse_attention_kernel(const Tensor& q, const Tensor& k, const Tensor& v,
                                                    const std::optional<Tensor>& cu_seqlens_q,
                                                    const std::optional<Tensor>& cu_seqlens_k,
                                                    std::optional<int64_t> max_seqlen_q,
                                                    std::optional<int64_t> max_seqlen_k,
                                                    std::optional<double> scale, int64_t sink_tokens,
                                                    int64_t local_blocks, int64_t block_size) {
  AttnConfig cfg;
  cfg.causal = true;
  cfg.scale = resolve_scale(scale, q.size(-1));
  cfg.mode = flux::SparseMode::kStreaming;
  cfg.pattern = make_pattern("sparse_attention", sink_tokens, local_blocks, block_size);
  return attention_forward("sparse_attention", q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                           max_seqlen_k, cfg, std::nullopt);
}

std::tuple<Tensor, Tensor> flux_attention_kernel(const Tensor& q, const Tensor& k, const Tensor& v,
                                                  const Tensor& use_sparse,
                                                  const std::optional<Tensor>& cu_seqlens_q,
                                                  const std::optional<Tensor>& cu_seqlens_k,
                                                  std::optional<int64_t> max_seqlen_q,
                                                  std::optional<int64_t> max_seqlen_k,
                                                  std::optional<double> scale, int64_t sink_tokens,
                                                  int64_t local_blocks, int64_t block_size) {
  AttnConfig cfg;
  cfg.causal = true;
  cfg.scale = resolve_scale(scale, q.size(-1));
  cfg.mode = flux::SparseMode::kPerSequence;
  cfg.pattern = make_pattern("flux_attention", sink_tokens, local_blocks, block_size);
  return attention_forward("flux_attention", q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                           max_seqlen_k, cfg, use_sparse);
}

std::tuple<Tensor, Tensor, Tensor> attention_backward_kernel(
    const Tensor& dout, const std::optional<Tensor>& dlse, const Tensor& q, const Tensor& k,
    const Tensor& v, const Tensor& out, const Tensor& lse,
    const std::optional<Tensor>& cu_seqlens_q, const std::optional<Tensor>& cu_seqlens_k,
    std::optional<int64_t> max_seqlen_q, std::optional<int64_t> max_seqlen_k, bool causal,
    double scale, int64_t sparse_mode, const std::optional<Tensor>& use_sparse, int64_t sink_tokens,
    int64_t local_blocks, int64_t block_size) {
  const char* op = "attention_backward";
  FLUX_CHECK(sparse_mode >= 0 && sparse_mode <= 2, op,
             "sparse_mode must be 0 (dense), 1 (streaming) or 2 (per sequence); got ", sparse_mode);
  AttnConfig cfg;
  cfg.causal = causal;
  cfg.scale = scale;
  cfg.mode = static_cast<flux::SparseMode>(sparse_mode);
  if (cfg.mode != flux::SparseMode::kDense) {
    cfg.pattern = make_pattern(op, sink_tokens, local_blocks, block_size);
  }
  return attention_backward_impl(op, dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                 max_seqlen_q, max_seqlen_k, cfg, use_sparse);
}

}  // namespace flux_attention
