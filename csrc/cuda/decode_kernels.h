// Host-side declarations shared by the decode .cu files: the two split kernels (tensor-core and
// CUDA-core), the combine kernel, and what the split heuristic needs to know about each. Torch-free.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "flux/params.h"

namespace flux::decode {

// Tensor-core split kernel (decode_split_mma.cu): fp16/bf16, head_dim 64 or 128. One CTA serves
// every (token, q head) row of a kv head's group, 16 rows at a time.
bool mma_supported(const DecodeParams& p);
int64_t mma_work_units(const DecodeParams& p);  // CTAs per split
int64_t mma_granule();                          // keys per warp tile (split chunks are multiples)
int mma_ctas_per_sm(const DecodeParams& p);     // resident CTAs per SM (occupancy query, cached)
cudaError_t launch_split_mma(const DecodeParams& p, int num_splits, cudaStream_t stream);

// CUDA-core split kernel (decode_split_simt.cu): every dtype and head dim, the portable fallback.
int64_t simt_work_units(const DecodeParams& p);
cudaError_t launch_split_simt(const DecodeParams& p, int num_splits, cudaStream_t stream);

// Merges num_splits partials per row into out and lse (decode.cu).
cudaError_t launch_combine(const DecodeParams& p, int num_splits, cudaStream_t stream);

}  // namespace flux::decode
