# Finds LibTorch for the CPU-only CMake build and defines the interface target flux::torch_cpu
# (torch_cpu + c10, torch's include dirs, its ABI flag and the C++ standard its headers need).
#
# Torch_DIR comes from CMAKE_PREFIX_PATH (the Makefile passes torch.utils.cmake_prefix_path of the
# project venv). When that is missing we ask a Python ourselves (FLUX_PYTHON, else
# Python3_EXECUTABLE, else <repo>/.venv/bin/python), so a bare `cmake -S . -B build/cmake` works in a
# bootstrapped checkout.

set(FLUX_PYTHON "" CACHE FILEPATH "Python whose torch provides LibTorch when CMAKE_PREFIX_PATH does not")

# A CUDA build of torch (every PyPI Linux wheel) includes Caffe2's public/cuda.cmake from its
# config, which runs find_package(CUDA), enable_language(CUDA) and looks for cuDNN, cuSPARSELt and
# friends; without a toolkit it stops configure with a FATAL_ERROR, and with one it still pulls nvcc
# into a build that compiles no CUDA. That file starts with an include guard on the target
# torch::cudart (it returns at once when the target exists). Declaring it first as an empty
# interface target makes the guard skip the whole search. Nothing here links torch::cudart: only
# torch_cuda and c10_cuda name it, and this build links torch_cpu and c10. The op sources compile
# their CUDA paths only under FLUX_WITH_CUDA, which this build never defines.
if(NOT TARGET torch::cudart)
  add_library(torch::cudart INTERFACE IMPORTED)
endif()

# PyPI wheels link kineto into libtorch_cpu, so TorchConfig's "library kineto not found" warning
# is harmless here.
find_package(Torch CONFIG QUIET)

if(NOT Torch_FOUND)
  if(NOT FLUX_PYTHON AND Python3_EXECUTABLE)
    set(FLUX_PYTHON "${Python3_EXECUTABLE}")
  elseif(NOT FLUX_PYTHON AND EXISTS "${PROJECT_SOURCE_DIR}/.venv/bin/python")
    set(FLUX_PYTHON "${PROJECT_SOURCE_DIR}/.venv/bin/python")
  endif()
  if(FLUX_PYTHON)
    execute_process(
      COMMAND "${FLUX_PYTHON}" -c "import torch.utils; print(torch.utils.cmake_prefix_path)"
      OUTPUT_VARIABLE _flux_torch_prefix
      OUTPUT_STRIP_TRAILING_WHITESPACE
      RESULT_VARIABLE _flux_py_rc
      ERROR_QUIET)
    if(_flux_py_rc EQUAL 0)
      find_package(Torch CONFIG QUIET PATHS "${_flux_torch_prefix}" NO_DEFAULT_PATH)
    endif()
  endif()
endif()

if(NOT Torch_FOUND)
  message(FATAL_ERROR
    "LibTorch not found. Pass the venv's torch to CMake:\n"
    "  cmake -S . -B build/cmake -G Ninja "
    "-DCMAKE_PREFIX_PATH=\"$(.venv/bin/python -c 'import torch.utils; "
    "print(torch.utils.cmake_prefix_path)')\"\n"
    "or set FLUX_PYTHON to a Python that has torch installed.")
endif()

foreach(_t torch_cpu c10)
  if(NOT TARGET ${_t})
    message(FATAL_ERROR "torch's CMake config (${Torch_DIR}) defines no target '${_t}'")
  endif()
endforeach()

# Use the standard torch's config declares on its `torch` target, at least C++17: torch 2.14 says 20
# (its ATen.h has an #error below C++20); torch 2.11 (the H200 image) declares none and builds as 17.
set(FLUX_TORCH_CXX_STANDARD 17)
get_target_property(_flux_torch_std torch CXX_STANDARD)
if(_flux_torch_std AND _flux_torch_std GREATER FLUX_TORCH_CXX_STANDARD)
  set(FLUX_TORCH_CXX_STANDARD ${_flux_torch_std})
endif()

# TORCH_CXX_FLAGS carries -D_GLIBCXX_USE_CXX11_ABI=<0|1> on releases that shipped both ABIs. Newer
# configs leave it empty because those wheels are built with the C++11 ABI only; say so explicitly
# rather than rely on the compiler's default, since a mismatch links but fails on std::string.
separate_arguments(_flux_torch_cxx_flags UNIX_COMMAND "${TORCH_CXX_FLAGS}")
if(NOT _flux_torch_cxx_flags MATCHES "_GLIBCXX_USE_CXX11_ABI")
  list(APPEND _flux_torch_cxx_flags -D_GLIBCXX_USE_CXX11_ABI=1)
endif()

add_library(flux_torch_cpu INTERFACE)
add_library(flux::torch_cpu ALIAS flux_torch_cpu)
target_link_libraries(flux_torch_cpu INTERFACE torch_cpu c10)
# torch_cpu's own interface only has <prefix>/include; the C++ frontend headers (torch/torch.h,
# torch/csrc/api/include) come from TORCH_INCLUDE_DIRS. SYSTEM keeps torch's warnings out of ours.
target_include_directories(flux_torch_cpu SYSTEM INTERFACE ${TORCH_INCLUDE_DIRS})
target_compile_options(flux_torch_cpu INTERFACE ${_flux_torch_cxx_flags})
target_compile_features(flux_torch_cpu INTERFACE cxx_std_${FLUX_TORCH_CXX_STANDARD})

message(STATUS "flux: LibTorch ${Torch_VERSION} from ${Torch_DIR} (CPU only, C++${FLUX_TORCH_CXX_STANDARD}, "
               "flags: ${_flux_torch_cxx_flags})")
