// 16-byte element I/O shared by the streaming kernels (model_ops.cu, decode_linear.cu): kVec
// consecutive elements as one 16-byte access converted to fp32, or one element when a pointer or a
// stride rules the vector out (kVec == 1: the same kernels on unaligned data). Torch-free.
#pragma once

#include <cstdint>
#include <cstring>

#include "cuda_utils.cuh"

namespace flux {

template <typename T>
constexpr int vec_of() {
  return int(16 / sizeof(T));
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

template <typename T, int kVec>
__device__ __forceinline__ void unpack_vec(const uint4& u, float (&out)[kVec]) {
  T v[kVec];
  memcpy(v, &u, sizeof(u));
#pragma unroll
  for (int e = 0; e < kVec; ++e) out[e] = to_float(v[e]);
}

template <typename T, int kVec>
__device__ __forceinline__ void load_vec(const T* ptr, float (&out)[kVec]) {
  static_assert(kVec == 1 || kVec * sizeof(T) == 16, "one element or 16 bytes");
  if constexpr (kVec == 1) {
    out[0] = to_float(ptr[0]);
  } else {
    unpack_vec<T, kVec>(*reinterpret_cast<const uint4*>(ptr), out);
  }
}

// 16 bytes read once (weights streamed by a GEMV): not allocated in L1, so that the rows that are
// re-read (the activations) keep it. Read-only for the kernel's lifetime (ld.global.nc).
__device__ __forceinline__ uint4 load_stream16(const void* ptr) {
  uint4 u;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(u.x), "=r"(u.y), "=r"(u.z), "=r"(u.w)
      : "l"(ptr));
  return u;
}

// As load_vec, for data read once (weights streamed by a GEMV): bypasses L1 so that the rows that
// are re-read (the activations) keep it. Read-only for the kernel's lifetime (ld.global.nc).
template <typename T, int kVec>
__device__ __forceinline__ void load_vec_stream(const T* ptr, float (&out)[kVec]) {
  static_assert(kVec == 1 || kVec * sizeof(T) == 16, "one element or 16 bytes");
  if constexpr (kVec == 1) {
    out[0] = to_float(__ldg(ptr));
  } else {
    unpack_vec<T, kVec>(load_stream16(ptr), out);
  }
}

template <typename T, int kVec>
__device__ __forceinline__ void store_vec(T* ptr, const float (&in)[kVec]) {
  if constexpr (kVec == 1) {
    ptr[0] = from_float<T>(in[0]);
  } else {
    T v[kVec];
#pragma unroll
    for (int e = 0; e < kVec; ++e) v[e] = from_float<T>(in[e]);
    uint4 u;
    memcpy(&u, v, sizeof(u));
    *reinterpret_cast<uint4*>(ptr) = u;
  }
}

}  // namespace flux
