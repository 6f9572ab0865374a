// The one place where an op crosses from ATen to a kernel: CPU kernels are called directly; CUDA
// launchers run on the current stream of the tensor's device and return cudaError_t, which becomes a
// TORCH_CHECK naming the op. Builds without CUDA (FLUX_WITH_CUDA undefined) fail with a sentence.
#pragma once

#include <ATen/core/Tensor.h>

#include "checks.h"

#ifdef FLUX_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "flux/launch.h"
#endif

#include "cpu/kernels.h"

namespace flux_attention {

[[noreturn]] inline void fail_no_kernel(const char* op, const at::Tensor& ref) {
#ifdef FLUX_WITH_CUDA
  const char* why = "";
#else
  const char* why = ref.device().is_cuda()
                        ? " (this build has no CUDA kernels: reinstall with a CUDA toolkit and a CUDA "
                          "build of torch, or FLUX_CUDA=1)"
                        : "";
#endif
  FLUX_CHECK(false, op, "no kernel for device ", ref.device().str(), why);
  TORCH_INTERNAL_ASSERT(false);  // unreachable; keeps [[noreturn]] honest
}

#ifdef FLUX_WITH_CUDA
// Runs launch(stream) under a device guard for ref's device and checks its cudaError_t.
template <typename Launch>
void run_cuda(const char* op, const at::Tensor& ref, Launch&& launch) {
  c10::cuda::CUDAGuard guard(ref.device());
  const cudaError_t err = launch(c10::cuda::getCurrentCUDAStream().stream());
  FLUX_CHECK(err == cudaSuccess, op, "CUDA kernel failed: ", cudaGetErrorName(err), ": ",
             cudaGetErrorString(err));
}
#endif

// The CPU / CUDA fork of an op: cpu() on the CPU; on CUDA the launcher that FLUX_CUDA_LAUNCH wraps
// (a cudaError_t expression of `stream`, under run_cuda); a sentence naming the op anywhere else.
// FLUX_CUDA_LAUNCH compiles to nothing in CPU-only builds, where the CUDA launchers do not exist.
// Ops whose CUDA path first sizes a workspace (attention backward, decode) write the fork out, with
// run_cuda, so that the allocation stays next to the launch it serves.
#ifdef FLUX_WITH_CUDA
#define FLUX_CUDA_LAUNCH(...) [&](cudaStream_t stream) { return __VA_ARGS__; }
#else
#define FLUX_CUDA_LAUNCH(...) nullptr
#endif

template <typename Cpu, typename Cuda>
void run_on_device(const char* op, const at::Tensor& ref, Cpu&& cpu, Cuda&& cuda) {
  if (ref.device().is_cpu()) {
    cpu();
    return;
  }
#ifdef FLUX_WITH_CUDA
  if (!ref.device().is_cuda()) fail_no_kernel(op, ref);
  run_cuda(op, ref, cuda);
#else
  (void)cuda;
  fail_no_kernel(op, ref);
#endif
}

}  // namespace flux_attention
