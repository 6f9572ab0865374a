// append_kv on the CPU: new K/V rows copied into a contiguous or paged cache. The op layer has
// already checked every position and page, so each row is a plain copy of head_dim elements.
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>

#include "flux/params.h"
#include "kernels.h"

namespace flux::cpu {

void append_kv(const AppendKVParams& p) {
  if (p.batch <= 0 || p.new_tokens <= 0 || p.num_heads_k <= 0) return;
  const int64_t es = p.dtype == DataType::kFloat64 ? 8 : p.dtype == DataType::kFloat32 ? 4 : 2;
  const int64_t row_bytes = p.head_dim * es;
  const int64_t rows = int64_t(p.batch) * p.new_tokens;
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / p.new_tokens;
      const int64_t t = r % p.new_tokens;
      const int64_t pos = int64_t(p.positions[b]) + t;
      if (pos < 0 || pos >= p.capacity) continue;
      int64_t page = b, row = pos;
      if (p.block_table != nullptr) {
        page = p.block_table[b * p.block_table_stride + pos / p.page_size];
        row = pos % p.page_size;
        if (page < 0 || page >= p.num_pages) continue;
      }
      for (int64_t h = 0; h < p.num_heads_k; ++h) {
        char* kd = static_cast<char*>(p.k_cache) +
                   (page * p.k_page_stride + row * p.k_row_stride + h * p.k_head_stride) * es;
        char* vd = static_cast<char*>(p.v_cache) +
                   (page * p.v_page_stride + row * p.v_row_stride + h * p.v_head_stride) * es;
        const char* ks = static_cast<const char*>(p.k_new) +
                         (b * p.kn_batch_stride + t * p.kn_token_stride + h * p.kn_head_stride) * es;
        const char* vs = static_cast<const char*>(p.v_new) +
                         (b * p.vn_batch_stride + t * p.vn_token_stride + h * p.vn_head_stride) * es;
        std::memcpy(kd, ks, row_bytes);
        std::memcpy(vd, vs, row_bytes);
      }
    }
  });
}

}  // namespace flux::cpu
