// CUDA launchers, one per op family. Torch-free: the op layer fills the params and turns a
// non-success cudaError_t into a TORCH_CHECK with the op's name. Launchers never allocate and never
// read device memory on the host, so every call is CUDA-graph capturable.
#pragma once

#include <cstddef>

#include <cuda_runtime_api.h>

#include "flux/params.h"

namespace flux {

// Forward attention (dense, streaming or per-sequence), out + lse.
cudaError_t run_attention_fwd(AttnFwdParams& params, cudaStream_t stream);

// Backward attention: dq, dk, dv from dout (and optional dlse).
size_t attention_bwd_workspace_bytes(const AttnBwdParams& params);
cudaError_t run_attention_bwd(AttnBwdParams& params, cudaStream_t stream);

// Decode: a few new query tokens per sequence against a contiguous or paged cache. The workspace
// size depends only on shapes, params.max_seqlen_k and num_sms (never on cache_seqlens values), so a
// decode step sized once replays in a CUDA graph.
size_t decode_workspace_bytes(const DecodeParams& params, int num_sms);
cudaError_t run_decode_attention(DecodeParams& params, cudaStream_t stream);

// KV append: new K/V rows written into a contiguous or paged cache at device-given positions.
cudaError_t run_append_kv(const AppendKVParams& params, cudaStream_t stream);

// Router input pooling and its gradient.
cudaError_t run_pool_queries(PoolParams& params, cudaStream_t stream);
cudaError_t run_pool_queries_bwd(PoolBwdParams& params, cudaStream_t stream);

}  // namespace flux
