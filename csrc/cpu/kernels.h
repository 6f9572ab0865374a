// CPU kernels, one entry point per op family. They take the same torch-free params structs as the
// CUDA launchers (csrc/include/flux/params.h); their bodies use ATen's CPU utilities
// (at::parallel_for, at::vec, cpublas) but never see a tensor.
#pragma once

#include "flux/params.h"

namespace flux::cpu {

// csrc/cpu/attention_fwd.cpp: tiled online softmax, parallel over (batch, head, query tile).
void attention_fwd(const AttnFwdParams& params);

// csrc/cpu/attention_bwd.cpp: recomputes probabilities from lse; deterministic (no atomics): one pass
// over key tiles for dk/dv, one over query tiles for dq.
void attention_bwd(const AttnBwdParams& params);

// csrc/cpu/decode.cpp
void decode_attention(const DecodeParams& params);

// csrc/cpu/append_kv.cpp (positions and pages checked by the op layer)
void append_kv(const AppendKVParams& params);

// csrc/cpu/pool.cpp
void pool_queries(const PoolParams& params);
void pool_queries_bwd(const PoolBwdParams& params);

}  // namespace flux::cpu
