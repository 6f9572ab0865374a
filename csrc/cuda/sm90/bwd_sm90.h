// The sm_90a attention backward (wgmma + TMA, warp-specialised), as seen from the dispatcher in
// csrc/cuda/attention_bwd.cu. Torch-free and CuTe-free: the kernels live in bwd_*.cuh, one
// explicit instantiation per (dtype, head dim) in csrc/cuda/inst/attn_bwd_sm90_<dtype>_hd<D>.cu.
//
// Kernels of one call (all on `stream`, no host sync, no allocation):
//   1. memset of the fp32 dQ accumulator (and, deterministic mode, the dQ tile semaphores);
//   2. preprocess: delta = rowsum(dO * O) - dlse and lse * log2(e) into the workspace, in the
//      tile-padded row layout of bwd_workspace.cuh;
//   3. main kernel: one CTA per (key block of 128, kv head, sequence), dK / dV in registers across
//      the query blocks that see the key block (streaming.h's column view) and across the q heads of
//      the GQA group; dQ partial tiles reduced into the fp32 accumulator with cp.reduce.async.bulk;
//   4. postprocess: dQ = scale * dQ_accum, converted to the output dtype.
#pragma once

#include <cstddef>

#include <cuda_runtime_api.h>

#include "flux/params.h"

namespace flux::sm90 {

// Host: may the sm90 backward run these params? fp16 / bf16, head dim 64 or 128, and every tensor it
// touches through TMA or vector stores 16-byte aligned (base pointer and every stride). Does not
// look at the device (the dispatcher asks enabled_on_current_device() too).
bool bwd_supports(const AttnBwdParams& p);

// Host: scratch bytes the sm90 backward needs (lse, delta, dQ accumulator, semaphores).
size_t bwd_workspace_bytes(const AttnBwdParams& p);

// The launcher of one instantiation. Requires bwd_supports(p) and a workspace of at least
// bwd_workspace_bytes(p) bytes (checked by the caller).
template <DataType kDtype, int kHeadDim>
cudaError_t run_attention_bwd_sm90(const AttnBwdParams& p, cudaStream_t stream);

// Defined in bwd_kernel.cuh, explicitly instantiated once each in csrc/cuda/inst/.
extern template cudaError_t run_attention_bwd_sm90<DataType::kBFloat16, 64>(const AttnBwdParams&, cudaStream_t);
extern template cudaError_t run_attention_bwd_sm90<DataType::kBFloat16, 128>(const AttnBwdParams&, cudaStream_t);
extern template cudaError_t run_attention_bwd_sm90<DataType::kFloat16, 64>(const AttnBwdParams&, cudaStream_t);
extern template cudaError_t run_attention_bwd_sm90<DataType::kFloat16, 128>(const AttnBwdParams&, cudaStream_t);

}  // namespace flux::sm90
