// Small helpers shared by the kernel files (plain CUDA, no torch headers).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace layerroute {

constexpr int kWarpSize = 32;

// Threads for a one-block-per-row kernel: a whole number of warps, at most 256, no more
// than the row needs.
inline int threads_for_row(int64_t items_per_row) {
  const int64_t warps = (items_per_row + kWarpSize - 1) / kWarpSize;
  return static_cast<int>(warps < 1 ? 1 : (warps > 8 ? 8 : warps)) * kWarpSize;
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Round-to-nearest-even, as torch rounds.
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

}  // namespace layerroute
