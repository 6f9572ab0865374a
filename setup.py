"""Builds flux_attention._C: the op library (CPU kernels always, CUDA kernels when possible).

Knobs (environment variables):
  FLUX_CUDA       auto (default): CUDA kernels when nvcc and a CUDA build of torch are present;
                  1 forces them (error if impossible); 0 builds CPU only.
  FLUX_CUDA_ARCHS CUDA targets, default "90a" (Hopper: wgmma, TMA, setmaxnreg).
  FLUX_CPU_VEC    auto (default) | avx512 | avx2 | none: the vector ISA of the CPU kernels. auto takes
                  the best this machine supports, so the build is for this machine only.
  CUTLASS_DIR     CUTLASS checkout whose include/ (and tools/util/include/) to use instead of the
                  headers shipped in the PyPI package nvidia-cutlass.
  MAX_JOBS        parallel compile jobs (ninja); NVCC_THREADS: nvcc --threads (default 2).
  FLUX_DEBUG      1: -O0 -g, kernels keep their debug output paths.
"""

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env(name, default):
    return os.environ.get(name, default).strip().lower()


def _cuda_wanted():
    mode = _env("FLUX_CUDA", "auto")
    if mode not in ("auto", "0", "1"):
        sys.exit(f"setup.py: FLUX_CUDA must be auto, 0 or 1; got {mode!r}")
    if mode == "0":
        return False
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    have_nvcc = CUDA_HOME is not None and shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc"))
    have_torch_cuda = torch.version.cuda is not None
    if mode == "1" and not (have_nvcc and have_torch_cuda):
        sys.exit(
            "setup.py: FLUX_CUDA=1 but "
            + ("no nvcc was found (set CUDA_HOME)" if not have_nvcc else "torch is a CPU-only build")
        )
    return bool(have_nvcc and have_torch_cuda)


def _cpu_vec_flags():
    choice = _env("FLUX_CPU_VEC", "auto")
    if choice == "auto":
        flags = set()
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("flags"):
                        flags = set(line.split(":", 1)[1].split())
                        break
        except OSError:
            pass
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= flags:
            choice = "avx512"
        elif {"avx2", "fma"} <= flags:
            choice = "avx2"
        else:
            choice = "none"
    # at::vec picks its implementation from CPU_CAPABILITY_*; the inline namespace CPU_CAPABILITY keeps
    # our instantiations apart from libtorch's own.
    if choice == "avx512":
        return ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
                "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    if choice == "avx2":
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    if choice == "none":
        return ["-DCPU_CAPABILITY=DEFAULT"]
    sys.exit(f"setup.py: FLUX_CPU_VEC must be auto, avx512, avx2 or none; got {choice!r}")


def _cutlass_includes():
    base = os.environ.get("CUTLASS_DIR")
    if base:
        dirs = [os.path.join(base, "include"), os.path.join(base, "tools", "util", "include")]
    else:
        try:
            import cutlass_library
        except ImportError:
            return []
        src = os.path.join(os.path.dirname(cutlass_library.__file__), "source")
        dirs = [os.path.join(src, "include"), os.path.join(src, "tools", "util", "include")]
    return [d for d in dirs if os.path.isdir(d)]


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def build_extension():
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    debug = _env("FLUX_DEBUG", "0") == "1"
    with_cuda = _cuda_wanted()
    opt = ["-O0", "-g"] if debug else ["-O3", "-DNDEBUG"]
    include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]
    sources = _sources("csrc/ops/*.cpp") + _sources("csrc/cpu/*.cpp") + _sources("csrc/python/*.cpp")
    # torch >= 2.10 headers need C++20 (the kernels under csrc/cuda/ stay C++17: no torch there).
    cxx = opt + ["-std=c++20", "-fopenmp"] + _cpu_vec_flags()
    if debug:
        cxx.append("-DFLUX_DEBUG")
    if not with_cuda:
        print("flux-attention: building CPU kernels only (FLUX_CUDA=0 or no CUDA toolkit/torch)")
        ext = CppExtension("flux_attention._C", sources, include_dirs=include_dirs,
                           extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
        return ext, BuildExtension

    archs = [a.strip() for a in os.environ.get("FLUX_CUDA_ARCHS", "90a").split(",") if a.strip()]
    cu_sources = _sources("csrc/cuda/**/*.cu")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    nvcc = opt + gencode + [
        "-std=c++17",
        "--expt-relaxed-constexpr",
        "--expt-extended-lambda",
        "--use_fast_math",
        "-lineinfo",
        f"--threads={os.environ.get('NVCC_THREADS', '2')}",
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_OPERATORS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    ]
    if debug:
        nvcc.append("-DFLUX_DEBUG")
    defines = ["-DFLUX_WITH_CUDA", f'-DFLUX_CUDA_ARCHS="{",".join(archs)}"']
    print(f"flux-attention: building CPU + CUDA kernels for sm_{', sm_'.join(archs)}: "
          f"{len(cu_sources)} CUDA sources")
    ext = CUDAExtension(
        "flux_attention._C",
        sources + cu_sources,
        include_dirs=include_dirs + _cutlass_includes(),
        extra_compile_args={"cxx": cxx + defines, "nvcc": nvcc + defines},
        extra_link_args=["-fopenmp"],
    )
    return ext, BuildExtension


ext, build_ext = build_extension()
setup(
    ext_modules=[ext],
    cmdclass={"build_ext": build_ext.with_options(use_ninja=True)},
)
