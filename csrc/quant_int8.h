// Launchers of csrc/quant_int8.cu. Torch-free: included by the kernel file and by the
// torch binding (bindings.cpp), which is the only file that sees both worlds.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

// Element type of the input x, as passed to the launchers.
enum FastquantDtype : int {
  FASTQUANT_FLOAT32 = 0,
  FASTQUANT_FLOAT16 = 1,
  FASTQUANT_BFLOAT16 = 2,
};

// Per-token symmetric int8 quantization of a row-major [rows, cols] matrix x:
//   scale[r]  = max(amax(|x[r, :]|) / 127, 1e-8)               (float32, IEEE division)
//   q[r, c]   = clamp(round_half_to_even(x[r, c] / scale[r]), -127, 127)
// computed in float32, bit-identical to fastquant.ops.int8.torch_quantize_per_token_int8
// for finite input. x and q are contiguous, rows >= 0, cols > 0. Enqueues on `stream`
// and returns the launch status (cudaErrorInvalidValue for bad arguments).
extern "C" cudaError_t fastquant_quantize_per_token_int8(const void* x, int x_dtype, int8_t* q,
                                                         float* scale, int64_t rows, int64_t cols,
                                                         cudaStream_t stream);
