// Device helpers shared by the kernels: dtype conversion, 16-byte packs, reductions, dispatch.
// Compiled with torch's -D__CUDA_NO_HALF_OPERATORS__ / _CONVERSIONS__ flags, so conversions are
// spelled out with intrinsics.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ops.h"

namespace fuselm {

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ float to_float<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// N elements of T loaded or stored as one access; 16 bytes when N == kVec<T>.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Elements of T in one 16-byte vector: 8 bf16/fp16, 4 fp32.
template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over a 1-D block whose size is a multiple of 32; every thread gets the total.
// smem: 32 floats of shared memory, used once per kernel.
__device__ __forceinline__ float block_sum(float v, float* smem) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  const int num_warps = blockDim.x >> 5;
  v = lane < num_warps ? smem[lane] : 0.f;
  return warp_sum(v);
}

inline bool is_aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

inline int round_up32(int64_t n) { return static_cast<int>((n + 31) / 32 * 32); }

}  // namespace fuselm

// Runs the statement block with T bound to the element type of `dtype`.
#define FUSELM_DISPATCH_FLOAT(dtype, T, ...)            \
  switch (dtype) {                                      \
    case ::fuselm::DType::kFloat32: {                   \
      using T = float;                                  \
      __VA_ARGS__;                                      \
      break;                                            \
    }                                                   \
    case ::fuselm::DType::kFloat16: {                   \
      using T = __half;                                 \
      __VA_ARGS__;                                      \
      break;                                            \
    }                                                   \
    case ::fuselm::DType::kBFloat16: {                  \
      using T = __nv_bfloat16;                          \
      __VA_ARGS__;                                      \
      break;                                            \
    }                                                   \
    default:                                            \
      return cudaErrorInvalidValue;                     \
  }
