// sm90 attention backward, fp16, head dim 128 (one instantiation per file: compile time and memory).
#include "../sm90/bwd_kernel.cuh"

template cudaError_t flux::sm90::run_attention_bwd_sm90<flux::DataType::kFloat16, 128>(
    const flux::AttnBwdParams&, cudaStream_t);
