// sm90 attention backward, bf16, head dim 64 (one instantiation per file: compile time and memory).
#include "../sm90/bwd_kernel.cuh"

template cudaError_t flux::sm90::run_attention_bwd_sm90<flux::DataType::kBFloat16, 64>(
    const flux::AttnBwdParams&, cudaStream_t);
