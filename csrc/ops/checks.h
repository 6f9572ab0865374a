// Input checks shared by every op. Each failure names the op, the argument and what was expected
// and received, e.g.
//   flux_attention.full_attention: k.size(2) (kv heads) must divide q.size(2) (q heads); got
//   k [1, 4096, 6, 128] bf16 cpu, q [1, 4096, 32, 128] bf16 cpu
// All checks run before any allocation and are identical on CPU and CUDA, except that values inside
// device tensors (cu_seqlens, cache_seqlens, block tables) are only checked on CPU: reading them on a
// GPU would need a host synchronisation in the hot path.
#pragma once

#include <string>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "flux/params.h"

// FLUX_CHECK(cond, op, message pieces...): TORCH_CHECK with the "flux_attention.<op>: " prefix.
#define FLUX_CHECK(cond, op, ...) TORCH_CHECK((cond), "flux_attention.", op, ": ", __VA_ARGS__)

namespace flux_attention::checks {

// "[2, 128, 8, 64] bf16 cuda:0", or "undefined".
std::string describe(const at::Tensor& t);

// dtype of t as the kernels' enum; errors (naming `name`) for anything the device does not support.
flux::DataType kernel_dtype(const char* op, const char* name, const at::Tensor& t);

void check_defined(const char* op, const char* name, const at::Tensor& t);
void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim);
void check_same_device(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                       const at::Tensor& ref);
void check_same_dtype(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                      const at::Tensor& ref);
void check_int32_vector(const char* op, const char* name, const at::Tensor& t, int64_t len,
                        const at::Tensor& device_ref);

// cu_seqlens on CPU: starts at 0, non-decreasing, ends at most at `total`.
void check_cu_seqlens_values(const char* op, const char* name, const at::Tensor& cu, int64_t total);

// Head dims the kernels are built for on this tensor's device.
void check_head_dim(const char* op, const at::Tensor& q, int64_t head_dim);

void check_pattern(const char* op, const flux::StreamingPattern& pattern);

// Returns t itself when its last dimension is contiguous, else a contiguous copy: the kernels need
// unit stride along head_dim (every other stride is free).
at::Tensor unit_last_stride(const at::Tensor& t);

// Returns t when its last dimension is contiguous and its base pointer and every other stride are
// multiples of 16 bytes (so each row can be read as 16-byte vectors), else a contiguous copy.
at::Tensor vector_aligned_rows(const at::Tensor& t);

}  // namespace flux_attention::checks
