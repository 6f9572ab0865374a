// Entry points of the sm_90a kernels, called from the op families' one dispatch place
// (attention_fwd.cu). Torch-free and CuTe-free, so the dispatch files stay light to compile.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "flux/params.h"

namespace flux::sm90 {

// Does the sm_90a forward take this call? 16-bit dtypes, head_dim 64 / 128, a Hopper device, and
// what TMA needs: 16-byte aligned bases and strides, coordinates that fit in int32.
bool fwd_sm90_supported(const AttnFwdParams& p);

// Whether the consumer warpgroups take turns issuing wgmma (default on; FLUX_SM90_PINGPONG=0 off).
bool fwd_pingpong_enabled();

// Keys per K/V tile for this call: 176 for dense non-causal hd128 (FA3's tile: each tile's fixed
// cost spread over 37% more keys), 128 otherwise. FLUX_SM90_FWD_BLOCK_N=128 forces 128 (A/B
// timing; read per call, host only). Causal and sparse calls keep 128: most of their tiles are
// diagonal or partial, where a wider tile masks more work away.
int fwd_block_n(const AttnFwdParams& p);

// One explicit instantiation per (dtype, head dim) lives in csrc/cuda/inst/attn_fwd_sm90_*.cu.
template <typename T, int kHeadDim>
cudaError_t run_attention_fwd_sm90(const AttnFwdParams& p, cudaStream_t stream);

}  // namespace flux::sm90
