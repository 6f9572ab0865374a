// Workspace of the sm90 attention backward: where lse, delta, the fp32 dQ accumulator and the
// deterministic-mode semaphores live. Host and device; torch-free, CuTe-free.
//
// Row layout ("tile-padded"). Every per-row buffer is indexed by a padded row
//   pad_start(b) + i,   pad_start(b) = floor((q_start(b) + b * kPadRows) / kPadRows) * kPadRows
// with q_start(b) = cu_seqlens_q[b] (varlen) or b * seqlen_q (padded). Each sequence then starts on
// a multiple of kPadRows, so its query tiles (kBlockM divides kPadRows) are whole, aligned and never
// shared with the next sequence: the dQ accumulator is stored tile by tile in the register order of
// the MMA (bwd_traits.cuh), and TMA-style bulk copies of lse / delta need 16-byte aligned tiles.
// Disjointness: with x = q_start(b) + b P and n = len_b, sequence b uses rows up to
// floor(x / P) P + ceil(n / P) P <= floor((x + n) / P) P + P <= pad_start(b + 1).
// Rows of a tile past the end of its sequence hold garbage and are only ever read under a mask.
#pragma once

#include <cstddef>
#include <cstdint>

#include "flux/params.h"

namespace flux::sm90::bwd {

constexpr int kPadRows = 128;      // a multiple of every kBlockM of the sm90 backward
constexpr int kMinBlockM = 64;     // the smallest kBlockM: sizes the semaphore array
constexpr size_t kWsAlign = 256;   // alignment of each buffer inside the workspace

struct Workspace {
  float* lse_log2 = nullptr;  // [Hq][rows]: lse * log2(e), +inf where lse = -inf (no key seen)
  float* delta = nullptr;     // [Hq][rows]: rowsum(dO * O) - dlse
  float* dq_accum = nullptr;  // [Hq][rows / kBlockM][kBlockM * D] fp32, tile-major, MMA order
  int* dq_sem = nullptr;      // [Hq][rows / kMinBlockM]: deterministic mode, adds done per dQ tile
  int64_t rows = 0;           // padded rows per head
};

__host__ __device__ inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Rows of every per-head buffer: all sequences padded, plus slack for the round-down of pad_start.
inline int64_t padded_rows(const AttnFwdParams& p) {
  const int64_t total = p.is_varlen() ? p.total_q : int64_t(p.batch) * p.seqlen_q;
  return round_up(total + int64_t(p.batch) * kPadRows, kPadRows);
}

// Padded row of query 0 of sequence b; q_start is the sequence's first row in q (varlen:
// cu_seqlens_q[b]; padded input: unused, the sequences are packed at b * seqlen_q).
__host__ __device__ inline int64_t pad_start(const AttnFwdParams& p, int64_t q_start, int b) {
  const int64_t packed = p.cu_seqlens_q != nullptr ? q_start : int64_t(b) * p.seqlen_q;
  return (packed + int64_t(b) * kPadRows) / kPadRows * kPadRows;
}

inline size_t align_ws(size_t x) { return (x + kWsAlign - 1) / kWsAlign * kWsAlign; }

// Byte sizes of the four buffers, in workspace order.
struct WorkspaceSizes {
  size_t lse, delta, dq_accum, dq_sem;
  size_t total() const { return lse + delta + dq_accum + dq_sem; }
};

inline WorkspaceSizes workspace_sizes(const AttnFwdParams& p) {
  const int64_t rows = padded_rows(p);
  const size_t per_head = static_cast<size_t>(rows) * static_cast<size_t>(p.num_heads_q);
  WorkspaceSizes s;
  s.lse = align_ws(per_head * sizeof(float));
  s.delta = s.lse;
  s.dq_accum = align_ws(per_head * static_cast<size_t>(p.head_dim) * sizeof(float));
  s.dq_sem = align_ws(per_head / kMinBlockM * sizeof(int));
  return s;
}

inline Workspace carve_workspace(const AttnFwdParams& p, void* base) {
  const WorkspaceSizes s = workspace_sizes(p);
  char* c = static_cast<char*>(base);
  Workspace w;
  w.rows = padded_rows(p);
  w.lse_log2 = reinterpret_cast<float*>(c);
  w.delta = reinterpret_cast<float*>(c + s.lse);
  w.dq_accum = reinterpret_cast<float*>(c + s.lse + s.delta);
  w.dq_sem = reinterpret_cast<int*>(c + s.lse + s.delta + s.dq_accum);
  return w;
}

}  // namespace flux::sm90::bwd
