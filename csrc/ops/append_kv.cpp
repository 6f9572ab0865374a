// append_kv: the KV-cache write of a decode step (or of a prefill chunk), on the device, with no
// host synchronisation, so that append + decode_attention together replay in a CUDA graph.
#include "append_kv.h"

#include <ATen/ATen.h>

#include "device.h"

namespace flux_attention {

using at::Tensor;
using checks::describe;

namespace {

// CPU only (device values would need a host sync): every row lands inside the cache and on a page
// of the pool.
void check_positions(const char* op, const Tensor& positions, const std::optional<Tensor>& table,
                     int64_t new_tokens, int64_t capacity, int64_t page_size, int64_t num_pages) {
  if (!positions.device().is_cpu()) return;
  const Tensor pos = positions.contiguous();
  const int32_t* s = pos.data_ptr<int32_t>();
  const Tensor bt = table ? table->contiguous() : Tensor();
  for (int64_t b = 0; b < pos.numel(); ++b) {
    FLUX_CHECK(s[b] >= 0 && s[b] + new_tokens <= capacity, op, "positions[", b, "] = ", s[b], " plus ",
               new_tokens, " new rows must fit the cache: positions must lie in [0, ", capacity - new_tokens,
               "] (capacity ", capacity, " per sequence)");
    if (!bt.defined() || new_tokens == 0) continue;
    const int32_t* row = bt.data_ptr<int32_t>() + b * bt.size(1);
    for (int64_t i = s[b] / page_size; i <= (s[b] + new_tokens - 1) / page_size; ++i) {
      FLUX_CHECK(row[i] >= 0 && row[i] < num_pages, op, "block_table[", b, ", ", i, "] = ", row[i],
                 " is not a page of k_cache (", num_pages, " pages)");
    }
  }
}

}  // namespace

void append_kv_kernel(const Tensor& k_cache, const Tensor& v_cache, const Tensor& k_new_in,
                      const Tensor& v_new_in, const Tensor& positions,
                      const std::optional<Tensor>& block_table) {
  const char* op = "append_kv";
  checks::check_defined(op, "k_cache", k_cache);
  checks::check_defined(op, "v_cache", v_cache);
  checks::check_defined(op, "k_new", k_new_in);
  checks::check_defined(op, "v_new", v_new_in);
  const flux::DataType dtype = checks::kernel_dtype(op, "k_cache", k_cache);
  checks::check_same_device(op, "v_cache", v_cache, "k_cache", k_cache);
  checks::check_same_device(op, "k_new", k_new_in, "k_cache", k_cache);
  checks::check_same_device(op, "v_new", v_new_in, "k_cache", k_cache);
  checks::check_same_dtype(op, "v_cache", v_cache, "k_cache", k_cache);
  checks::check_same_dtype(op, "k_new", k_new_in, "k_cache", k_cache);
  checks::check_same_dtype(op, "v_new", v_new_in, "k_cache", k_cache);
  FLUX_CHECK(k_cache.dim() == 4, op,
             "k_cache must be [batch, capacity, kv_heads, head_dim] or, with block_table, "
             "[num_pages, page_size, kv_heads, head_dim]; got ",
             describe(k_cache));
  FLUX_CHECK(v_cache.sizes() == k_cache.sizes(), op, "v_cache must have the shape of k_cache; got v_cache ",
             describe(v_cache), ", k_cache ", describe(k_cache));
  // The caches are written in place, so they cannot be made contiguous here.
  FLUX_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1, op,
             "k_cache and v_cache must have a contiguous last dimension (they are written in place); got "
             "strides ",
             k_cache.stride(3), " and ", v_cache.stride(3));
  FLUX_CHECK(k_new_in.dim() == 3 || k_new_in.dim() == 4, op,
             "k_new must be [batch, kv_heads, head_dim] or [batch, new_tokens, kv_heads, head_dim]; got ",
             describe(k_new_in));
  FLUX_CHECK(v_new_in.sizes() == k_new_in.sizes(), op, "v_new must have the shape of k_new; got v_new ",
             describe(v_new_in), ", k_new ", describe(k_new_in));
  // [B, Hkv, D] is the one-token case of [B, Tn, Hkv, D].
  const Tensor k_new = k_new_in.dim() == 3 ? k_new_in.unsqueeze(1) : k_new_in;
  const Tensor v_new = v_new_in.dim() == 3 ? v_new_in.unsqueeze(1) : v_new_in;
  const int64_t batch = k_new.size(0), new_tokens = k_new.size(1);
  FLUX_CHECK(k_new.size(2) == k_cache.size(2) && k_new.size(3) == k_cache.size(3), op,
             "k_new must have the kv heads and head_dim of k_cache (", k_cache.size(2), ", ", k_cache.size(3),
             "); got k_new ", describe(k_new_in), ", k_cache ", describe(k_cache));
  FLUX_CHECK(positions.dim() == 1 && positions.scalar_type() == at::kInt && positions.size(0) == batch, op,
             "positions must be a 1-D int32 tensor with one entry per sequence (", batch, "); got ",
             describe(positions));
  checks::check_same_device(op, "positions", positions, "k_cache", k_cache);

  const bool paged = block_table.has_value();
  int64_t capacity = 0, page_size = 0;
  if (paged) {
    const Tensor& bt = *block_table;
    FLUX_CHECK(bt.dim() == 2 && bt.size(0) == batch && bt.scalar_type() == at::kInt, op,
               "block_table must be an int32 tensor [batch (", batch, "), max_pages]; got ", describe(bt));
    checks::check_same_device(op, "block_table", bt, "k_cache", k_cache);
    page_size = k_cache.size(1);
    FLUX_CHECK(page_size > 0, op, "k_cache.size(1) (page_size) must be positive; got ", describe(k_cache));
    capacity = bt.size(1) * page_size;
  } else {
    FLUX_CHECK(k_cache.size(0) == batch, op,
               "k_cache.size(0) must equal k_new.size(0) (batch) for a contiguous cache; got k_cache ",
               describe(k_cache), ", k_new ", describe(k_new_in), " (pass block_table for a paged cache)");
    capacity = k_cache.size(1);
  }
  check_positions(op, positions, block_table, new_tokens, capacity, page_size, k_cache.size(0));
  if (batch == 0 || new_tokens == 0 || k_new.numel() == 0) return;

  const Tensor kn = checks::unit_last_stride(k_new);
  const Tensor vn = checks::unit_last_stride(v_new);
  const Tensor pos = positions.contiguous();
  const Tensor table = paged ? block_table->contiguous() : Tensor();

  flux::AppendKVParams p;
  p.dtype = dtype;
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.k_new = kn.data_ptr();
  p.v_new = vn.data_ptr();
  p.k_page_stride = k_cache.stride(0), p.k_row_stride = k_cache.stride(1), p.k_head_stride = k_cache.stride(2);
  p.v_page_stride = v_cache.stride(0), p.v_row_stride = v_cache.stride(1), p.v_head_stride = v_cache.stride(2);
  p.kn_batch_stride = kn.stride(0), p.kn_token_stride = kn.stride(1), p.kn_head_stride = kn.stride(2);
  p.vn_batch_stride = vn.stride(0), p.vn_token_stride = vn.stride(1), p.vn_head_stride = vn.stride(2);
  p.batch = static_cast<int>(batch);
  p.new_tokens = static_cast<int>(new_tokens);
  p.num_heads_k = static_cast<int>(k_cache.size(2));
  p.head_dim = static_cast<int>(k_cache.size(3));
  p.positions = pos.data_ptr<int32_t>();
  p.capacity = capacity;
  p.block_table = paged ? table.data_ptr<int32_t>() : nullptr;
  p.block_table_stride = paged ? table.stride(0) : 0;
  p.page_size = static_cast<int>(page_size);
  p.num_pages = k_cache.size(0);

  run_on_device(op, k_cache, [&] { flux::cpu::append_kv(p); }, FLUX_CUDA_LAUNCH(flux::run_append_kv(p, stream)));
}

}  // namespace flux_attention
