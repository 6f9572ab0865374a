// decode_attention: one new query token (or a few: q [B, Tq, Hq, D]) per sequence against a
// contiguous or paged KV cache.
#include "decode.h"

#include <ATen/ATen.h>

#include "attention.h"
#include "device.h"

#ifdef FLUX_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#endif

namespace flux_attention {

using at::Tensor;
using checks::describe;

namespace {

// CPU only: every sequence fits its cache and every page it uses exists.
void check_cache_values(const char* op, const Tensor& seqlens, const std::optional<Tensor>& table,
                        int64_t capacity, int64_t page_size, int64_t num_pages) {
  if (!seqlens.device().is_cpu()) return;
  const Tensor sl = seqlens.contiguous();
  const int32_t* s = sl.data_ptr<int32_t>();
  const Tensor bt = table ? table->contiguous() : Tensor();
  for (int64_t b = 0; b < sl.numel(); ++b) {
    FLUX_CHECK(s[b] >= 0 && s[b] <= capacity, op, "cache_seqlens[", b, "] = ", s[b],
               " must lie in [0, ", capacity, "] (the cache capacity per sequence)");
    if (!bt.defined()) continue;
    const int32_t* row = bt.data_ptr<int32_t>() + b * bt.size(1);
    const int64_t pages_used = (s[b] + page_size - 1) / page_size;
    for (int64_t i = 0; i < pages_used; ++i) {
      FLUX_CHECK(row[i] >= 0 && row[i] < num_pages, op, "block_table[", b, ", ", i, "] = ", row[i],
                 " is not a page of k_cache (", num_pages, " pages)");
    }
  }
}

}  // namespace

std::tuple<Tensor, Tensor> decode_attention_kernel(const Tensor& q_in, const Tensor& k_in,
                                                    const Tensor& v_in, const Tensor& cache_seqlens,
                                                    const std::optional<Tensor>& block_table,
                                                    const std::optional<Tensor>& use_sparse,
                                                    std::optional<double> scale,
                                                    int64_t sink_tokens, int64_t local_blocks,
                                                    int64_t block_size) {
  const char* op = "decode_attention";
  checks::check_defined(op, "q", q_in);
  checks::check_defined(op, "k_cache", k_in);
  checks::check_defined(op, "v_cache", v_in);
  checks::check_same_device(op, "k_cache", k_in, "q", q_in);
  checks::check_same_device(op, "v_cache", v_in, "q", q_in);
  const flux::DataType dtype = checks::kernel_dtype(op, "q", q_in);
  checks::check_same_dtype(op, "k_cache", k_in, "q", q_in);
  checks::check_same_dtype(op, "v_cache", v_in, "q", q_in);
  FLUX_CHECK(q_in.dim() == 3 || q_in.dim() == 4, op,
             "q must be [batch, heads, head_dim] or, for several new tokens per sequence, [batch, "
             "new_tokens, heads, head_dim]; got ",
             describe(q_in));
  // One code path for both layouts: a [B, Hq, D] query is the Tq = 1 case of [B, Tq, Hq, D].
  const bool multi = q_in.dim() == 4;
  FLUX_CHECK(k_in.dim() == 4, op,
             "k_cache must be [batch, capacity, kv_heads, head_dim] or, with block_table, "
             "[num_pages, page_size, kv_heads, head_dim]; got ",
             describe(k_in));
  FLUX_CHECK(v_in.sizes() == k_in.sizes(), op, "v_cache must have the shape of k_cache; got v_cache ",
             describe(v_in), ", k_cache ", describe(k_in));
  const int64_t batch = q_in.size(0);
  const int64_t new_tokens = multi ? q_in.size(1) : 1;
  const int64_t heads_q = q_in.size(-2), head_dim = q_in.size(-1);
  const int64_t heads_k = k_in.size(2);
  FLUX_CHECK(k_in.size(3) == head_dim, op, "k_cache.size(3) (head_dim) must equal q.size(", q_in.dim() - 1,
             ") (", head_dim, "); got k_cache ", describe(k_in));
  FLUX_CHECK(heads_k > 0 && heads_q % heads_k == 0, op,
             "k_cache.size(2) (kv heads) must divide q.size(", q_in.dim() - 2, ") (q heads); got k_cache ",
             describe(k_in), ", q ", describe(q_in));
  FLUX_CHECK(batch * new_tokens <= 65535, op, "batch * new_tokens must be at most 65535; got q ",
             describe(q_in));
  checks::check_head_dim(op, q_in, head_dim);
  checks::check_int32_vector(op, "cache_seqlens", cache_seqlens, batch, q_in);

  const bool paged = block_table.has_value();
  int64_t capacity = 0, page_size = 0;
  if (paged) {
    const Tensor& bt = *block_table;
    FLUX_CHECK(bt.dim() == 2 && bt.size(0) == batch && bt.scalar_type() == at::kInt, op,
               "block_table must be an int32 tensor [batch (", batch, "), max_pages]; got ",
               describe(bt));
    checks::check_same_device(op, "block_table", bt, "q", q_in);
    page_size = k_in.size(1);
    FLUX_CHECK(page_size > 0, op, "k_cache.size(1) (page_size) must be positive; got ",
               describe(k_in));
    capacity = bt.size(1) * page_size;
  } else {
    FLUX_CHECK(k_in.size(0) == batch, op,
               "k_cache.size(0) must equal q.size(0) (batch) for a contiguous cache; got k_cache ",
               describe(k_in), ", q ", describe(q_in), " (pass block_table for a paged cache)");
    capacity = k_in.size(1);
  }
  check_cache_values(op, cache_seqlens, block_table, capacity, page_size, k_in.size(0));

  flux::DecodeParams p;
  if (use_sparse) {
    check_use_sparse(op, *use_sparse, batch, q_in);
    p.pattern = make_pattern(op, sink_tokens, local_blocks, block_size);
    p.sparse_mode = flux::SparseMode::kPerSequence;
  }

  // The CUDA kernel reads rows as 16-byte vectors; anything else (rare: odd slicing) is copied.
  const Tensor q = checks::vector_aligned_rows(q_in);
  const Tensor k = checks::vector_aligned_rows(k_in);
  const Tensor v = checks::vector_aligned_rows(v_in);
  const Tensor seqlens = cache_seqlens.contiguous();
  const Tensor table = paged ? block_table->contiguous() : Tensor();
  const Tensor flags = use_sparse ? use_sparse->contiguous() : Tensor();

  Tensor out = at::empty(q.sizes(), q.options());
  Tensor lse = multi ? at::empty({batch, heads_q, new_tokens}, q.options().dtype(at::kFloat))
                     : at::empty({batch, heads_q}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};

  p.dtype = dtype;
  p.q = q.data_ptr();
  p.k_cache = k.data_ptr();
  p.v_cache = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.q_batch_stride = q.stride(0), p.q_head_stride = q.stride(-2);
  p.q_token_stride = multi ? q.stride(1) : 0;
  p.k_page_stride = k.stride(0), p.k_row_stride = k.stride(1), p.k_head_stride = k.stride(2);
  p.v_page_stride = v.stride(0), p.v_row_stride = v.stride(1), p.v_head_stride = v.stride(2);
  p.o_batch_stride = out.stride(0), p.o_head_stride = out.stride(-2);
  p.o_token_stride = multi ? out.stride(1) : 0;
  p.lse_batch_stride = lse.stride(0), p.lse_head_stride = lse.stride(1);
  p.lse_token_stride = multi ? lse.stride(2) : 0;
  p.batch = static_cast<int>(batch);
  p.seqlen_q = static_cast<int>(new_tokens);
  p.num_heads_q = static_cast<int>(heads_q);
  p.num_heads_k = static_cast<int>(heads_k);
  p.head_dim = static_cast<int>(head_dim);
  p.cache_seqlens = seqlens.data_ptr<int32_t>();
  p.max_seqlen_k = capacity;
  p.block_table = paged ? table.data_ptr<int32_t>() : nullptr;
  p.block_table_stride = paged ? table.stride(0) : 0;
  p.page_size = static_cast<int>(page_size);
  p.scale = static_cast<float>(resolve_scale(scale, head_dim));
  p.use_sparse = use_sparse ? flags.data_ptr<bool>() : nullptr;

  if (q.device().is_cpu()) {
    flux::cpu::decode_attention(p);
  } else {
#ifdef FLUX_WITH_CUDA
    if (!q.device().is_cuda()) fail_no_kernel(op, q);
    c10::cuda::CUDAGuard guard(q.device());  // the SM count (and split count) of q's device
    const int num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    p.num_splits = 0;  // let the launcher's heuristic choose from the SM count and cache capacity
    const size_t bytes = flux::decode_workspace_bytes(p, num_sms);
    Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, q.options().dtype(at::kByte));
    p.workspace = bytes ? workspace.data_ptr() : nullptr;
    p.workspace_bytes = bytes;
    run_cuda(op, q, [&](cudaStream_t stream) { return flux::run_decode_attention(p, stream); });
#else
    fail_no_kernel(op, q);
#endif
  }
  return {out, lse};
}

}  // namespace flux_attention
