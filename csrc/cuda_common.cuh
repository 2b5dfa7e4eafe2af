// Device helpers shared by the CUDA kernels (csrc/*.cu). Torch-free.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fastquant_cuda {

constexpr int kWarpSize = 32;

// Loads widen fp16 and bf16 to float32 exactly; __ldg reads through the read-only cache.
__device__ __forceinline__ float load_float(const float* p) { return __ldg(p); }
__device__ __forceinline__ float load_float(const __half* p) { return __half2float(__ldg(p)); }
__device__ __forceinline__ float load_float(const __nv_bfloat16* p) { return __bfloat162float(__ldg(p)); }

// Stores round float32 to nearest (even) in the output type.
__device__ __forceinline__ void store_out(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_out(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store_out(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// Reductions over a full warp (every lane must take part); the result is in every lane.
__device__ __forceinline__ float warp_max(float v) {
  for (int off = kWarpSize / 2; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}
__device__ __forceinline__ float warp_min(float v) {
  for (int off = kWarpSize / 2; off > 0; off >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
  for (int off = kWarpSize / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}
__device__ __forceinline__ int warp_sum(int v) {
  for (int off = kWarpSize / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

}  // namespace fastquant_cuda
