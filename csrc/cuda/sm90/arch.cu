// Device capability query behind flux::sm90::enabled_on_current_device (arch.h).
#include "arch.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

#include <cuda_runtime_api.h>

namespace flux::sm90 {
namespace {

constexpr int kMaxDevices = 64;
// Per device: 0 unknown, 1 sm90 usable, 2 not. Racing first queries compute the same answer.
std::atomic<int> g_state[kMaxDevices];

bool disabled_by_env() {
  static const bool disabled = [] {
    const char* v = std::getenv("FLUX_DISABLE_SM90");
    return v != nullptr && std::strcmp(v, "") != 0 && std::strcmp(v, "0") != 0;
  }();
  return disabled;
}

}  // namespace

bool enabled_on_current_device() {
  if (disabled_by_env()) return false;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxDevices) return false;
  int state = g_state[dev].load(std::memory_order_relaxed);
  if (state == 0) {
    int major = 0, minor = 0;
    const bool ok = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
                    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) == cudaSuccess;
    state = ok && major == 9 && minor == 0 ? 1 : 2;
    g_state[dev].store(state, std::memory_order_relaxed);
  }
  return state == 1;
}

}  // namespace flux::sm90
