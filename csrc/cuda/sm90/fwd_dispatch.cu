// Which calls the sm_90a forward takes (launch_sm90.h). Host code only: no CuTe here.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "arch.h"
#include "launch_sm90.h"

namespace flux::sm90 {
namespace {

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Strides in elements of a 16-bit type: TMA needs byte strides that are multiples of 16, below 2^40.
bool tma_stride_ok(int64_t s) { return s >= 0 && s % 8 == 0 && s < (int64_t(1) << 39); }

constexpr int64_t kInt32Max = 0x7fffffff;

}  // namespace

bool fwd_pingpong_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("FLUX_SM90_PINGPONG");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return on;
}

int fwd_block_n(const AttnFwdParams& p) {
  if (p.head_dim != 128 || p.causal || p.sparse_mode != SparseMode::kDense || !fwd_pingpong_enabled()) return 128;
  const char* v = std::getenv("FLUX_SM90_FWD_BLOCK_N");
  return v != nullptr && std::strcmp(v, "128") == 0 ? 128 : 176;
}

bool fwd_sm90_supported(const AttnFwdParams& p) {
  if (p.dtype != DataType::kBFloat16 && p.dtype != DataType::kFloat16) return false;
  if (p.head_dim != 64 && p.head_dim != 128) return false;
  // The kernel folds the scale into exp2 after taking the row max of the raw scores, which is the
  // max of the scaled scores only for a positive scale.
  if (!(p.scale > 0.0f) || !std::isfinite(p.scale)) return false;
  const void* const bases[] = {p.q, p.k, p.v, p.out};
  for (const void* ptr : bases) {
    if (!aligned16(ptr)) return false;
  }
  // A stride may be 0 (a broadcast) only along an extent of 1, where the launcher replaces it.
  const bool one_q_head = p.num_heads_q == 1, one_k_head = p.num_heads_k == 1;
  const bool one_batch = p.batch == 1 || p.is_varlen();
  const struct { int64_t stride; bool unit_extent; } strides[] = {
      {p.q_row_stride, false}, {p.q_head_stride, one_q_head}, {p.q_batch_stride, one_batch},
      {p.k_row_stride, false}, {p.k_head_stride, one_k_head}, {p.k_batch_stride, one_batch},
      {p.v_row_stride, false}, {p.v_head_stride, one_k_head}, {p.v_batch_stride, one_batch},
      {p.o_row_stride, false}, {p.o_head_stride, one_q_head}, {p.o_batch_stride, one_batch}};
  for (const auto& s : strides) {
    if (!tma_stride_ok(s.stride) || (s.stride == 0 && !s.unit_extent)) return false;
  }
  const int64_t rows_q = p.is_varlen() ? p.total_q : p.seqlen_q;
  const int64_t rows_k = p.is_varlen() ? p.total_k : p.seqlen_k;
  // TMA descriptors need non-empty extents; empty inputs take the portable path (nothing to compute).
  if (rows_q < 1 || rows_k < 1) return false;
  if (rows_q > kInt32Max || rows_k > kInt32Max || p.seqlen_q > 65535 * 128) return false;
  return enabled_on_current_device();
}

}  // namespace flux::sm90
