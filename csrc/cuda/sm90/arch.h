// Which CUDA kernels a call may use on the current device. Torch-free.
//
// The sm_90a kernels (wgmma, TMA, setmaxnreg) only run on compute capability 9.0 parts (H100/H200),
// and only when this build compiled them (FLUX_CUDA_ARCHS contains 90a). Everything else takes the
// portable mma.sync kernels. FLUX_DISABLE_SM90=1 in the environment forces the portable kernels too,
// so tests and benchmarks can compare both paths in one process.
#pragma once

namespace flux::sm90 {

// True when the calling thread's current CUDA device is sm_90 and FLUX_DISABLE_SM90 is not set.
// Cached per device after the first query; never synchronizes.
bool enabled_on_current_device();

}  // namespace flux::sm90
