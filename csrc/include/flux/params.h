// Parameter structs shared by every kernel (CPU and CUDA) and filled by the op layer (csrc/ops).
//
// This header is torch-free on purpose: kernels see raw pointers, element strides and sizes, never a
// tensor. The op layer checks inputs, fills one of these structs and calls exactly one run function.
#pragma once

#include <cstddef>
#include <cstdint>

namespace flux {

enum class DataType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// Which key set each sequence attends to (DESIGN.md section 1).
enum class SparseMode : int {
  kDense = 0,        // every sequence: full attention (causal or not)
  kStreaming = 1,    // every sequence: sink + local blocks (always causal)
  kPerSequence = 2,  // sequence b is streaming iff use_sparse[b], else dense causal
};

// The streaming ("sink + sliding window") pattern, at block granularity.
// A query at key position t (block r = t / block_size) sees key j <= t iff
//   j < sink_tokens  or  j / block_size >= r - (local_blocks - 1).
struct StreamingPattern {
  int sink_tokens = 128;  // a positive multiple of block_size
  int local_blocks = 16;  // local blocks including the query's own block
  int block_size = 128;
};

// Forward attention, padded or varlen.
//
// Element (b, i, h, d) of q lives at
//   q + b * q_batch_stride + (q_start(b) + i) * q_row_stride + h * q_head_stride + d
// where q_start(b) = cu_seqlens_q[b] for varlen input (then q_batch_stride == 0) and 0 otherwise.
// k, v, out follow the same rule with their own strides and cu_seqlens_k / cu_seqlens_q.
// lse (fp32, natural log) of row i of (b, h) lives at
//   lse + b * lse_batch_stride + h * lse_head_stride + q_start(b) + i.
// Rows that see no key get out = 0 and lse = -inf.
struct AttnFwdParams {
  DataType dtype = DataType::kFloat32;

  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;

  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  int64_t o_batch_stride = 0, o_row_stride = 0, o_head_stride = 0;
  int64_t lse_batch_stride = 0, lse_head_stride = 0;

  int batch = 0;
  int num_heads_q = 0;
  int num_heads_k = 0;  // num_heads_q % num_heads_k == 0; q head h reads kv head h / (Hq / Hkv)
  int head_dim = 0;

  // Padded input: the length of every sequence. Varlen input: an upper bound (max_seqlen), used by
  // CUDA launchers to size the grid; the true lengths come from cu_seqlens.
  int64_t seqlen_q = 0;
  int64_t seqlen_k = 0;
  const int32_t* cu_seqlens_q = nullptr;  // [batch + 1] or null (padded)
  const int32_t* cu_seqlens_k = nullptr;  // [batch + 1] or null (padded)
  int64_t total_q = 0;                    // rows of q (varlen) or batch * seqlen_q (padded)
  int64_t total_k = 0;

  bool causal = false;  // bottom-right aligned when the lengths differ
  float scale = 1.0f;   // softmax scale, applied to q.k

  SparseMode sparse_mode = SparseMode::kDense;
  const bool* use_sparse = nullptr;  // [batch], read on the device, only for kPerSequence
  StreamingPattern pattern{};

  bool is_varlen() const { return cu_seqlens_q != nullptr; }
};

// Backward of AttnFwdParams: recomputes probabilities from the saved lse.
struct AttnBwdParams : AttnFwdParams {
  const void* dout = nullptr;  // same layout rule as out
  const float* dlse = nullptr; // optional gradient of lse (same layout as lse), may be null
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  int64_t do_batch_stride = 0, do_row_stride = 0, do_head_stride = 0;
  int64_t dq_batch_stride = 0, dq_row_stride = 0, dq_head_stride = 0;
  int64_t dk_batch_stride = 0, dk_row_stride = 0, dk_head_stride = 0;
  int64_t dv_batch_stride = 0, dv_row_stride = 0, dv_head_stride = 0;

  bool deterministic = false;  // no atomics whose order changes run to run

  // Scratch memory owned by the caller, at least attention_bwd_workspace_bytes(*this) bytes.
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

// New query tokens (one, or a few for speculative decoding) per sequence against a KV cache.
//
// Contiguous cache: k_cache [batch, capacity, Hkv, D]; token j of sequence b lives at
//   k_cache + b * k_page_stride + j * k_row_stride + h * k_head_stride.
// Paged cache (block_table != null): k_cache [num_pages, page_size, Hkv, D]; token j of sequence b
// lives in page block_table[b * block_table_stride + j / page_size], row j % page_size.
// The seqlen_q new tokens are the last ones of the cache: token t of sequence b sits at position
// cache_seqlens[b] - seqlen_q + t and attends causally (bottom-right aligned, as full_attention with
// Lq != Lk), with the streaming rule of its own position when the sequence is sparse.
// Element (b, t, h, d) of q lives at q + b * q_batch_stride + t * q_token_stride + h * q_head_stride
// + d (out likewise); lse (fp32, natural log) of (b, h, t) at
//   lse + b * lse_batch_stride + h * lse_head_stride + t * lse_token_stride.
// Rows that see no key get out = 0 and lse = -inf.
struct DecodeParams {
  DataType dtype = DataType::kFloat32;

  const void* q = nullptr;  // [batch, seqlen_q, Hq, D]
  const void* k_cache = nullptr;
  const void* v_cache = nullptr;
  void* out = nullptr;   // [batch, seqlen_q, Hq, D]
  float* lse = nullptr;  // [batch, Hq, seqlen_q]

  int64_t q_batch_stride = 0, q_head_stride = 0, q_token_stride = 0;
  int64_t k_page_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t v_page_stride = 0, v_row_stride = 0, v_head_stride = 0;
  int64_t o_batch_stride = 0, o_head_stride = 0, o_token_stride = 0;
  int64_t lse_batch_stride = 0, lse_head_stride = 1, lse_token_stride = 0;

  int batch = 0;
  int seqlen_q = 1;  // new tokens per sequence (1 for plain decoding)
  int num_heads_q = 0;
  int num_heads_k = 0;
  int head_dim = 0;

  const int32_t* cache_seqlens = nullptr;  // [batch], tokens in the cache including the new ones
  int64_t max_seqlen_k = 0;                // cache capacity per sequence (an upper bound)

  const int32_t* block_table = nullptr;  // [batch, max_pages] or null (contiguous)
  int64_t block_table_stride = 0;
  int page_size = 0;

  float scale = 1.0f;
  SparseMode sparse_mode = SparseMode::kDense;
  const bool* use_sparse = nullptr;
  StreamingPattern pattern{};

  void* workspace = nullptr;  // split-KV partials, decode_workspace_bytes(*this) bytes
  size_t workspace_bytes = 0;
  int num_splits = 1;  // chosen by the launcher heuristic when 0
};

// Writes new K/V rows into a contiguous or paged cache (the layouts of DecodeParams): row t of
// sequence b goes to cache position positions[b] + t. Rows whose position falls outside
// [0, capacity) or whose page is not in [0, num_pages) are not written (the op layer rejects them
// on CPU; on CUDA, where checking would need a host sync, they are dropped).
struct AppendKVParams {
  DataType dtype = DataType::kFloat32;

  void* k_cache = nullptr;
  void* v_cache = nullptr;
  const void* k_new = nullptr;  // [batch, new_tokens, Hkv, D]
  const void* v_new = nullptr;

  int64_t k_page_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t v_page_stride = 0, v_row_stride = 0, v_head_stride = 0;
  int64_t kn_batch_stride = 0, kn_token_stride = 0, kn_head_stride = 0;
  int64_t vn_batch_stride = 0, vn_token_stride = 0, vn_head_stride = 0;

  int batch = 0;
  int new_tokens = 0;
  int num_heads_k = 0;
  int head_dim = 0;

  const int32_t* positions = nullptr;  // [batch]: cache position of row 0 (the length before)
  int64_t capacity = 0;                // positions per sequence the cache can address
  const int32_t* block_table = nullptr;  // [batch, max_pages] or null (contiguous)
  int64_t block_table_stride = 0;
  int page_size = 0;
  int64_t num_pages = 0;  // paged: k_cache.size(0)
};

// Mean of the first and last pool_size tokens of each sequence, then over heads:
// out[b, d] = mean_h mean_{i in F_b ++ L_b} q[b, i, h, d], F_b/L_b the first/last min(P, n_b) tokens
// (a row in both is counted twice). An empty sequence gives zeros.
struct PoolParams {
  DataType dtype = DataType::kFloat32;
  const void* q = nullptr;  // varlen [total, H, D] or padded [batch, S, H, D]
  void* out = nullptr;      // [batch, D], dtype of q
  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t o_batch_stride = 0;
  int batch = 0;
  int num_heads = 0;
  int head_dim = 0;
  int64_t seqlen = 0;                   // padded: S; varlen: max_seqlen bound (may be 0)
  const int32_t* cu_seqlens = nullptr;  // varlen
  // Padded input only: valid-token mask [batch, S] (left or right padding, one contiguous run of
  // valid tokens per row). Null means every token is valid.
  const bool* mask = nullptr;
  int64_t mask_batch_stride = 0;
  int pool_size = 150;
};

// Gradient of pool_queries: dq[b, i, h, :] = dout[b, :] * w(b, i) / (H * 2 * m_b), w in {0, 1, 2}.
struct PoolBwdParams : PoolParams {
  const void* dout = nullptr;  // [batch, D]
  void* dq = nullptr;          // same layout as q
  int64_t dq_batch_stride = 0, dq_row_stride = 0, dq_head_stride = 0;
  int64_t do_batch_stride = 0;
};

}  // namespace flux
