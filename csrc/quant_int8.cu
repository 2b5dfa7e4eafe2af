// Per-token symmetric int8 quantization: the CUDA twin of kernels/quant_int8.py.
//
// Contract (quant_int8.h): per row r of a row-major [rows, cols] input, in float32,
//   scale[r] = max(amax(|x[r, :]|) / 127, 1e-8)
//   q[r, c]  = clamp(round_half_to_even(x[r, c] / scale[r]), -127, 127)
// bit-identical to the PyTorch reference for finite input. That rules out --use_fast_math
// and shortcuts such as multiplying by 1/scale: a last-bit difference in x / scale moves
// a value that sits on a rounding tie to the other integer.
//
// This file includes no torch header, so it compiles in seconds with plain nvcc and can
// be compile-checked on a machine without a GPU (csrc/compile_check.py).

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "cuda_common.cuh"
#include "quant_int8.h"

namespace {

using fastquant_cuda::kWarpSize;
using fastquant_cuda::load_float;
using fastquant_cuda::warp_max;

constexpr int kMaxThreads = 256;
// Elements each thread handles in the common case: enough independent loads per thread
// to cover memory latency, while a 384-wide ViT-S row still spreads over three warps.
constexpr int kElementsPerThread = 4;
constexpr float kQmax = 127.0f;
constexpr float kScaleFloor = 1e-8f;

// Maximum of v over the block, returned to every thread. blockDim.x must be a multiple
// of 32 and at most kMaxThreads. 0 is a neutral element because the inputs are |x|.
__device__ float block_max(float v) {
  __shared__ float per_warp[kMaxThreads / kWarpSize];
  __shared__ float result;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  v = warp_max(v);
  if (lane == 0) per_warp[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int num_warps = blockDim.x / kWarpSize;
    v = warp_max(lane < num_warps ? per_warp[lane] : 0.0f);
    if (lane == 0) result = v;
  }
  __syncthreads();
  return result;
}

// One block per row. The first pass reduces amax, the second quantizes; the second read
// of the row is served by L1/L2 for ViT-sized rows (a 3072-wide fp32 row is 12 KiB), so
// the kernel stays close to one pass over DRAM without holding the row in registers.
template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    quantize_per_token_int8_kernel(const T* __restrict__ x, int8_t* __restrict__ q,
                                   float* __restrict__ scale, int64_t cols) {
  const int64_t row = blockIdx.x;
  const T* x_row = x + row * cols;
  int8_t* q_row = q + row * cols;

  float amax = 0.0f;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    amax = fmaxf(amax, fabsf(load_float(x_row + c)));
  }
  amax = block_max(amax);

  // __fdiv_rn: IEEE round-to-nearest division whatever the compiler flags, as in PyTorch.
  const float s = fmaxf(__fdiv_rn(amax, kQmax), kScaleFloor);
  if (threadIdx.x == 0) scale[row] = s;

  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    // __float2int_rn rounds half to even (cvt.rni), like torch.round.
    const int v = __float2int_rn(__fdiv_rn(load_float(x_row + c), s));
    q_row[c] = static_cast<int8_t>(min(max(v, -127), 127));
  }
}

template <typename T>
void launch(const void* x, int8_t* q, float* scale, int64_t rows, int64_t cols, int threads,
            cudaStream_t stream) {
  quantize_per_token_int8_kernel<T><<<static_cast<unsigned>(rows), threads, 0, stream>>>(
      static_cast<const T*>(x), q, scale, cols);
}

}  // namespace

extern "C" cudaError_t fastquant_quantize_per_token_int8(const void* x, int x_dtype, int8_t* q,
                                                         float* scale, int64_t rows, int64_t cols,
                                                         cudaStream_t stream) {
  if (rows < 0 || cols <= 0) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  // One block per row: gridDim.x holds at most 2^31 - 1 blocks.
  if (rows > INT32_MAX || x == nullptr || q == nullptr || scale == nullptr) {
    return cudaErrorInvalidValue;
  }
  // Whole warps (block_max relies on it), about kElementsPerThread elements per thread.
  const int64_t wanted = (cols + kElementsPerThread - 1) / kElementsPerThread;
  const int threads = static_cast<int>(
      std::min<int64_t>(kMaxThreads, (wanted + kWarpSize - 1) / kWarpSize * kWarpSize));

  switch (x_dtype) {
    case FASTQUANT_FLOAT32:
      launch<float>(x, q, scale, rows, cols, threads, stream);
      break;
    case FASTQUANT_FLOAT16:
      launch<__half>(x, q, scale, rows, cols, threads, stream);
      break;
    case FASTQUANT_BFLOAT16:
      launch<__nv_bfloat16>(x, q, scale, rows, cols, threads, stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}
