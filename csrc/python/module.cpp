// flux_attention._C: importing it runs the TORCH_LIBRARY static initialisers that register every op
// (csrc/ops/registration.cpp). The module itself only answers questions about the build; no math here.
#include <torch/extension.h>

#ifdef FLUX_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace {

bool built_with_cuda() {
#ifdef FLUX_WITH_CUDA
  return true;
#else
  return false;
#endif
}

pybind11::dict build_info() {
  pybind11::dict info;
  info["cuda"] = built_with_cuda();
#ifdef FLUX_WITH_CUDA
  info["cuda_runtime"] = CUDART_VERSION;
#endif
#ifdef FLUX_CUDA_ARCHS
  info["cuda_archs"] = FLUX_CUDA_ARCHS;
#endif
  info["torch"] = TORCH_VERSION;
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "flux-attention op library (ops live in torch.ops.flux_attention)";
  m.def("built_with_cuda", &built_with_cuda, "True when the CUDA kernels were compiled in.");
  m.def("build_info", &build_info, "Build configuration: CUDA on/off, runtime version, archs, torch.");
}
