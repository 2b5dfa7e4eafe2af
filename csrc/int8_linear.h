// Launchers of csrc/int8_linear.cu: the deployed int8 linear layer on CUDA (the CUDA C++
// twin of kernels/int8_linear.py; contract in that module's docstring and in
// fastquant/ops/int8_linear.py). Torch-free: included by the kernel file and by the torch
// binding (bindings.cpp).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "quant_int8.h"  // FastquantDtype

// Asymmetric activation quantization of a row-major [rows, cols] x with row stride ld_x
// (elements), float32 math, codes moved into int8:
//   per token (per_token != 0): lo = min(min_c x, 0), hi = max(max_c x, 0),
//       s = max((hi - lo) / qmax, 1e-8), z = clamp(round(-lo / s), 0, qmax)
//   per tensor: s = *scale, z = *zero (device pointers)
//   a[r, c] = clamp(round(x / s) + z, 0, qmax) - o      (qmax = 2^bits - 1, o = 2^(bits-1))
//   rowsum[r] = sum_c a[r, c];  s_x[r] = s;  c_x[r] = o - z
// with IEEE division and round half to even, so the codes equal the PyTorch twin's bit
// for bit. a is contiguous [rows, cols]. bits in 2..8.
extern "C" cudaError_t fastquant_quantize_asym(const void* x, int x_dtype, int64_t rows, int64_t cols,
                                               int64_t ld_x, int bits, int per_token, const float* scale,
                                               const float* zero, int8_t* a, int32_t* rowsum, float* s_x,
                                               float* c_x, cudaStream_t stream);

// out[M, N] (contiguous, out_dtype) = (((acc + rowsum c_w) + c_x b_sum) * (s_x s_w)) + bias,
// acc = a @ b in int32 on the tensor cores (WMMA, int8 inputs). a: int8 [M, K] contiguous.
// b: int8 [K, N] contiguous (w4 == 0), or 4-bit codes packed two per byte, uint8
// [ceil(K/2), N], row j holding k = 2j in the low nibble and k = 2j + 1 in the high one,
// each nibble the code + 8 (w4 != 0; kernels/int8_linear.py pack_int4_t). Per row: rowsum
// int32, s_x, c_x; per column: s_w, c_w, b_sum; bias may be null. The epilogue rounds
// each float operation separately (no fused multiply-add), in the twin's order, so a
// float32 output equals fastquant.ops.int8_linear.torch_int8_gemm's bit for bit.
extern "C" cudaError_t fastquant_int8_gemm(const int8_t* a, const void* b, int w4, const int32_t* rowsum,
                                           const float* s_x, const float* c_x, const float* s_w,
                                           const float* c_w, const float* b_sum, const float* bias, void* out,
                                           int out_dtype, int64_t M, int64_t N, int64_t K,
                                           cudaStream_t stream);

// 4-bit weight packing for the GEMM above: w int8 [K, N] contiguous (codes minus 8, values
// -8..7) -> packed uint8 [ceil(K/2), N], packed[j, n] = (w[2j, n] + 8) | (w[2j+1, n] + 8) << 4
// in uint8 arithmetic, an odd K's missing high nibble being code 8 (zero). The same bytes as
// fastquant.ops.int8_linear.pack_int4_t.
extern "C" cudaError_t fastquant_pack_int4(const int8_t* w, uint8_t* packed, int64_t K, int64_t N,
                                           cudaStream_t stream);
