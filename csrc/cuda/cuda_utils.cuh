// Small CUDA helpers shared by every kernel file: error propagation, integer helpers, the mapping
// from flux::DataType to CUDA element types and fp32 conversions. Torch-free.
#pragma once

#include <atomic>
#include <cstdint>
#include <utility>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include "flux/params.h"

// Launchers return cudaError_t instead of exiting (STYLE.md section 7): the op layer turns it into
// a TORCH_CHECK naming the op, so a bad launch raises in Python instead of killing the process.
#define FLUX_CUDA_CHECK(expr)                     \
  do {                                            \
    const cudaError_t flux_err_ = (expr);         \
    if (flux_err_ != cudaSuccess) return flux_err_; \
  } while (0)

// After a <<<...>>> launch: configuration errors (too much shared memory, bad grid) surface here.
#define FLUX_CUDA_CHECK_LAUNCH() FLUX_CUDA_CHECK(cudaGetLastError())

namespace flux {

template <typename I>
__host__ __device__ __forceinline__ constexpr I ceil_div(I a, I b) {
  return (a + b - 1) / b;
}

// The CUDA element type of a DataType. fp64 has no CUDA kernels (CPU only), hence no entry.
template <DataType> struct CudaType;
template <> struct CudaType<DataType::kFloat32> { using type = float; };
template <> struct CudaType<DataType::kFloat16> { using type = __half; };
template <> struct CudaType<DataType::kBFloat16> { using type = __nv_bfloat16; };

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Two floats rounded to a 16-bit pair in one 32-bit register, lower index in the low half: the
// operand format of mma.sync for .f16 / .bf16.
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// Host: may rows of this tensor be moved as 16-byte vectors? True when the base pointer and every
// stride (in elements) keep each row start 16-byte aligned; head_dim * elem_size is a multiple of 16
// for every supported head dim, so the row itself then splits into whole vectors.
inline bool rows_16b_aligned(const void* ptr, size_t elem_size, int64_t s0, int64_t s1, int64_t s2) {
  const auto ok = [&](int64_t s) { return (s * static_cast<int64_t>(elem_size)) % 16 == 0; };
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && ok(s0) && ok(s1) && ok(s2);
}

// Programmatic dependent launch (sm_90): a kernel launched with launch_pdl may start while the
// kernel before it in the stream finishes. It must call pdl_wait() before it reads anything that
// kernel wrote or writes anything it reads; work that touches neither (streaming a weight matrix)
// can go first and hides the launch gap. pdl_launch_dependents() lets the next PDL launch be
// scheduled once every block of this grid has started. Both are no-ops without a programmatic
// dependency (a plain launch, or a kernel before that was not launched with the attribute).
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// kernel<<<grid, block, smem, stream>>>(args...) with programmatic stream serialization allowed.
// Graph capture records the dependency as a programmatic edge, so replays keep the overlap.
template <typename... KernelArgs, typename... Args>
cudaError_t launch_pdl(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                       Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

// cudaFuncSetAttribute(Kernel, MaxDynamicSharedMemorySize, bytes) (and the whole carveout to shared
// memory when max_carveout), once per kernel and device: the call takes the driver's lock and costs
// microseconds, which per launch made an eager decode step (7 linear launches per layer)
// measurably host-bound. Racing first calls just set the same value twice. Devices past 63 set it
// every call.
template <auto Kernel>
cudaError_t opt_in_shared_memory(int bytes, bool max_carveout = false) {
  static std::atomic<uint64_t> done{0};
  int device = 0;
  FLUX_CUDA_CHECK(cudaGetDevice(&device));
  const uint64_t bit = device < 64 ? uint64_t(1) << device : 0;
  if (bit != 0 && (done.load(std::memory_order_acquire) & bit) != 0) return cudaSuccess;
  FLUX_CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  if (max_carveout) {
    FLUX_CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                         int(cudaSharedmemCarveoutMaxShared)));
  }
  done.fetch_or(bit, std::memory_order_release);
  return cudaSuccess;
}

}  // namespace flux
