// Host side of the sm90 attention backward that needs no CuTe: which params qualify, and how much
// workspace they need (bwd_sm90.h). The launchers are in csrc/cuda/inst/.
#include "bwd_sm90.h"

#include <cstdint>

#include "bwd_workspace.cuh"

namespace flux::sm90 {
namespace {

constexpr int64_t kMaxInt32 = 0x7fffffff;

// Base 16-byte aligned and every stride (elements of 2 bytes) a positive multiple of 16 bytes below
// 2^40 bytes: what TMA descriptors and the 16-byte vector loads / 4-byte pair stores need. The batch
// stride may be 0 when the batch mode has extent 1 (varlen, or a single sequence).
bool tma_ok(const AttnBwdParams& p, const void* ptr, int64_t batch_stride, int64_t row_stride,
            int64_t head_stride) {
  const auto ok = [](int64_t s) { return s > 0 && (s * 2) % 16 == 0 && s * 2 < (int64_t(1) << 40); };
  const bool batch_ok = ok(batch_stride) || (batch_stride == 0 && (p.is_varlen() || p.batch == 1));
  return ptr != nullptr && reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && batch_ok && ok(row_stride) &&
         ok(head_stride);
}

}  // namespace

bool bwd_supports(const AttnBwdParams& p) {
  if (p.dtype != DataType::kFloat16 && p.dtype != DataType::kBFloat16) return false;
  if (p.head_dim != 64 && p.head_dim != 128) return false;
  if (p.batch <= 0 || p.num_heads_q <= 0 || p.num_heads_k <= 0) return false;
  if (p.num_heads_q % p.num_heads_k != 0) return false;
  if (p.lse == nullptr) return false;
  if (!tma_ok(p, p.q, p.q_batch_stride, p.q_row_stride, p.q_head_stride) ||
      !tma_ok(p, p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride) ||
      !tma_ok(p, p.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride) ||
      !tma_ok(p, p.out, p.o_batch_stride, p.o_row_stride, p.o_head_stride) ||
      !tma_ok(p, p.dout, p.do_batch_stride, p.do_row_stride, p.do_head_stride) ||
      !tma_ok(p, p.dq, p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride) ||
      !tma_ok(p, p.dk, p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride) ||
      !tma_ok(p, p.dv, p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride)) {
    return false;
  }
  // TMA extents, row indices and the padded workspace rows are 32-bit in the kernels.
  const int64_t rows_q = p.is_varlen() ? p.total_q : p.seqlen_q;
  const int64_t rows_k = p.is_varlen() ? p.total_k : p.seqlen_k;
  if (rows_q < 1 || rows_k < 1 || rows_q > kMaxInt32 || rows_k > kMaxInt32) return false;
  if (p.seqlen_q > kMaxInt32 || p.seqlen_k > kMaxInt32) return false;
  if (bwd::padded_rows(p) > kMaxInt32) return false;
  const int64_t ctas = (p.seqlen_k + 127) / 128 * int64_t(p.num_heads_k) * p.batch;
  if (ctas > kMaxInt32) return false;
  return true;
}

size_t bwd_workspace_bytes(const AttnBwdParams& p) { return bwd::workspace_sizes(p).total(); }

}  // namespace flux::sm90
