// The transformer block's memory-bound ops outside attention, fused (inference): RMSNorm, SiLU(gate)
// * up, and rotary position embedding of q and k. Each reads its inputs once and writes its output
// once, computing in fp32 (fp64 for fp64) and rounding once, where transformers' PyTorch code makes
// 4-10 passes and rounds after each (docs/perf_notes.md "Model ops"). Torch-free like params.h.
#pragma once

#include <cstdint>

#include "flux/params.h"

#ifdef FLUX_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace flux {

// out[r, :] = weight * x[r, :] / sqrt(mean(x[r, :]^2) + eps), rows r < rows. Row r of x starts at
// x + r * x_row_stride (elements; the columns are contiguous); out likewise. weight has x's dtype.
struct RmsNormParams {
  DataType dtype = DataType::kFloat32;
  const void* x = nullptr;
  const void* weight = nullptr;
  void* out = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t x_row_stride = 0;
  int64_t out_row_stride = 0;
  float eps = 1e-6f;
};

// out[i] = silu(gate[i]) * up[i] = gate[i] / (1 + exp(-gate[i])) * up[i]; all three contiguous,
// n elements.
struct SiluMulParams {
  DataType dtype = DataType::kFloat32;
  const void* gate = nullptr;
  const void* up = nullptr;
  void* out = nullptr;
  int64_t n = 0;
};

// transformers' apply_rotary_pos_emb with rotate_half (Llama, Mistral, Qwen2/3):
//   out[..., i]     = x[..., i]     * cos[i]     - x[..., i + h] * sin[i]
//   out[..., i + h] = x[..., i + h] * cos[i + h] + x[..., i]     * sin[i + h],   h = head_dim / 2,
// for x = q [batch, heads_q, seqlen, head_dim] and k [batch, heads_k, seqlen, head_dim] (any
// strides, unit stride along head_dim; outputs with their own strides) and cos, sin [batch or 1,
// seqlen, head_dim] (cos_batch_stride 0 when shared by the batch; sin has cos's strides).
struct RopeParams {
  DataType dtype = DataType::kFloat32;
  const void* q = nullptr;
  const void* k = nullptr;
  const void* cos = nullptr;
  const void* sin = nullptr;
  void* q_out = nullptr;
  void* k_out = nullptr;
  int batch = 0;
  int heads_q = 0;
  int heads_k = 0;
  int64_t seqlen = 0;
  int head_dim = 0;  // even
  int64_t q_batch_stride = 0, q_head_stride = 0, q_row_stride = 0;
  int64_t k_batch_stride = 0, k_head_stride = 0, k_row_stride = 0;
  int64_t qo_batch_stride = 0, qo_head_stride = 0, qo_row_stride = 0;
  int64_t ko_batch_stride = 0, ko_head_stride = 0, ko_row_stride = 0;
  int64_t cos_batch_stride = 0, cos_row_stride = 0;
};

// Linear layers at decode's few token rows (inference): out[r, n] = sum_k x[r, k] * w[n, k] (+ bias[n]),
// or with `up` set, silu(x . gate[n]) * (x . up[n]) (SwiGLU: gate_proj and up_proj in one pass of x).
// With 1-8 rows a linear layer is a read of its weight matrix; cuBLAS's small-M kernels read the
// 8B model's smaller matrices at 0.8-3 TB/s (docs/perf_notes.md "Decode linear layers"). Weights are
// [out_features, in_features] rows (nn.Linear's layout) with weight_row_stride elements between rows;
// x rows start x_row_stride apart; out is [rows, out_features] with out_row_stride. fp32 accumulation.
constexpr int kDecodeLinearMaxRows = 8;

struct DecodeLinearParams {
  DataType dtype = DataType::kFloat32;
  const void* x = nullptr;
  const void* weight = nullptr;  // the linear's weight, or SwiGLU's gate weight
  const void* up = nullptr;      // SwiGLU's up weight (weight's shape and strides); nullptr: plain linear
  const void* bias = nullptr;    // [out_features] or nullptr (plain linear only)
  void* out = nullptr;
  int rows = 0;  // 1..kDecodeLinearMaxRows
  int64_t in_features = 0;
  int64_t out_features = 0;
  int64_t x_row_stride = 0;
  int64_t weight_row_stride = 0;
  int64_t out_row_stride = 0;
};

// Plain linears of one input in one launch (a layer's q, k and v projections): their weights stream
// as one grid, which saves the ramp-up and tail of the launches it replaces (k_proj of the 8B model
// is 8 MB, ~2 us of traffic under ~3 us of fixed cost). Every member is a plain linear (up ==
// nullptr) with the same dtype, x, rows, in_features and x_row_stride; each has its own weight, bias,
// out and out_features.
constexpr int kDecodeLinearMaxGroup = 3;

struct DecodeLinearGroupParams {
  DecodeLinearParams linear[kDecodeLinearMaxGroup];
  int count = 0;  // 1..kDecodeLinearMaxGroup
};

namespace cpu {
// csrc/cpu/model_ops.cpp
void rms_norm(const RmsNormParams& params);
void silu_mul(const SiluMulParams& params);
void rotary_embedding(const RopeParams& params);
void decode_linear(const DecodeLinearParams& params);
void decode_linear_group(const DecodeLinearGroupParams& params);
}  // namespace cpu

#ifdef FLUX_WITH_CUDA
// csrc/cuda/model_ops.cu. No allocation, no host read of device memory: graph capturable.
cudaError_t run_rms_norm(const RmsNormParams& params, cudaStream_t stream);
cudaError_t run_silu_mul(const SiluMulParams& params, cudaStream_t stream);
cudaError_t run_rotary_embedding(const RopeParams& params, cudaStream_t stream);
// csrc/cuda/decode_linear.cu
cudaError_t run_decode_linear(const DecodeLinearParams& params, cudaStream_t stream);
cudaError_t run_decode_linear_group(const DecodeLinearGroupParams& params, cudaStream_t stream);
#endif

}  // namespace flux
