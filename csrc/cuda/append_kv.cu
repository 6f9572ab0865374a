// append_kv on CUDA: new K/V rows scattered into a contiguous or paged cache at positions read on
// the device, so the decode step (append, bump the lengths, decode) never synchronises with the
// host and replays in a CUDA graph. A pure copy: one thread per 16-byte vector of a row (or per
// element when a row is not 16-byte aligned), K and V in the same thread.
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_utils.cuh"
#include "flux/launch.h"
#include "flux/params.h"

namespace flux {
namespace {

constexpr int kAppendThreads = 256;

// Copy unit: uint4 (16 bytes) when every row start is 16-byte aligned, else one element.
template <typename Unit>
__global__ void __launch_bounds__(kAppendThreads) append_kv_kernel(const AppendKVParams p, int64_t units_per_row,
                                                                  int64_t elems_per_unit) {
  // Launched with PDL (a decode step's append follows RoPE and precedes the attention): wait for
  // the new rows, then let the attention kernel be scheduled.
  pdl_wait();
  pdl_launch_dependents();
  const int64_t total = int64_t(p.batch) * p.new_tokens * p.num_heads_k * units_per_row;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t u = idx % units_per_row;
    int64_t rest = idx / units_per_row;
    const int64_t h = rest % p.num_heads_k;
    rest /= p.num_heads_k;
    const int64_t t = rest % p.new_tokens;
    const int64_t b = rest / p.new_tokens;
    const int64_t pos = int64_t(p.positions[b]) + t;
    if (pos < 0 || pos >= p.capacity) continue;  // rejected on CPU; dropped here (no host sync)
    int64_t page = b, row = pos;
    if (p.block_table != nullptr) {
      page = p.block_table[b * p.block_table_stride + pos / p.page_size];
      row = pos % p.page_size;
      if (page < 0 || page >= p.num_pages) continue;
    }
    const int64_t e = u * elems_per_unit;  // element offset within the row
    const int64_t es = int64_t(sizeof(Unit)) / elems_per_unit;  // bytes per element
    auto dst = [&](void* base, int64_t page_stride, int64_t row_stride, int64_t head_stride) {
      return reinterpret_cast<Unit*>(static_cast<char*>(base) +
                                     (page * page_stride + row * row_stride + h * head_stride + e) * es);
    };
    auto src = [&](const void* base, int64_t batch_stride, int64_t token_stride, int64_t head_stride) {
      return reinterpret_cast<const Unit*>(static_cast<const char*>(base) +
                                           (b * batch_stride + t * token_stride + h * head_stride + e) * es);
    };
    Unit* kd = dst(p.k_cache, p.k_page_stride, p.k_row_stride, p.k_head_stride);
    Unit* vd = dst(p.v_cache, p.v_page_stride, p.v_row_stride, p.v_head_stride);
    const Unit* ks = src(p.k_new, p.kn_batch_stride, p.kn_token_stride, p.kn_head_stride);
    const Unit* vs = src(p.v_new, p.vn_batch_stride, p.vn_token_stride, p.vn_head_stride);
    *kd = *ks;
    *vd = *vs;
  }
}

template <typename Element>
cudaError_t launch(const AppendKVParams& p, cudaStream_t stream) {
  const size_t es = sizeof(Element);
  const bool vec = rows_16b_aligned(p.k_cache, es, p.k_page_stride, p.k_row_stride, p.k_head_stride) &&
                   rows_16b_aligned(p.v_cache, es, p.v_page_stride, p.v_row_stride, p.v_head_stride) &&
                   rows_16b_aligned(p.k_new, es, p.kn_batch_stride, p.kn_token_stride, p.kn_head_stride) &&
                   rows_16b_aligned(p.v_new, es, p.vn_batch_stride, p.vn_token_stride, p.vn_head_stride) &&
                   (p.head_dim * es) % 16 == 0;
  const int64_t elems_per_unit = vec ? int64_t(16 / es) : 1;
  const int64_t units_per_row = p.head_dim / elems_per_unit;
  const int64_t total = int64_t(p.batch) * p.new_tokens * p.num_heads_k * units_per_row;
  if (total == 0) return cudaSuccess;
  // A grid-stride loop: a decode step appends a few thousand vectors, a prefill may append millions.
  const int64_t wanted = ceil_div(total, int64_t(kAppendThreads));
  const unsigned blocks = unsigned(wanted < (int64_t(1) << 16) ? wanted : (int64_t(1) << 16));
  if (vec) return launch_pdl(append_kv_kernel<uint4>, dim3(blocks), dim3(kAppendThreads), 0, stream, p, units_per_row,
                             elems_per_unit);
  return launch_pdl(append_kv_kernel<Element>, dim3(blocks), dim3(kAppendThreads), 0, stream, p, units_per_row,
                    elems_per_unit);
}

}  // namespace

cudaError_t run_append_kv(const AppendKVParams& params, cudaStream_t stream) {
  const AppendKVParams& p = params;
  if (p.batch < 0 || p.new_tokens < 0 || p.num_heads_k <= 0 || p.head_dim <= 0) return cudaErrorInvalidValue;
  if (p.block_table != nullptr && p.page_size <= 0) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case DataType::kFloat32: return launch<float>(p, stream);
    case DataType::kFloat16:
    case DataType::kBFloat16: return launch<uint16_t>(p, stream);  // a copy: only the width matters
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace flux
