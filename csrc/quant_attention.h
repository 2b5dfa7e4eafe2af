// Launcher of csrc/quant_attention.cu: fused quantized attention for inference, the CUDA
// C++ twin of fastquant.ops.attention.torch_quant_attention (contract there). Torch-free.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "quant_int8.h"  // FastquantDtype

// Largest sequence length the kernel takes: a whole row of keys stays in shared memory.
#define FASTQUANT_ATTENTION_MAX_KEYS 256

// q, k, v: [B, H, N, D] of dtype `in_dtype` with element strides (stride_b, stride_h,
// stride_n) shared by the three and unit stride along D (views of one qkv tensor, or
// three contiguous tensors of one shape). D must be 64; 1 <= N <= 256.
// s_q, z_q, s_k, z_k: float32 [H] on the device (per-head steps and zero points of Q and
// K); s_v, z_v: V's step and zero point; a_bits: 2..8 bits of Q, K, V; sm_scale: the
// softmax scale; levels: float32 [2^p_bits] on the device, the log quantizer's level
// values p_scale 2^(-c / p_steps) for c < 2^p_bits - 1 and 0 for the last code (as
// LogQuantizer.dequantize computes them); p_steps: 1 (log2) or 2 (log-sqrt2).
// out: [B, N, H, D] contiguous, `out_dtype`.
extern "C" cudaError_t fastquant_quant_attention(const void* q, const void* k, const void* v, int in_dtype,
                                                 int64_t B, int64_t H, int64_t N, int64_t D, int64_t stride_b,
                                                 int64_t stride_h, int64_t stride_n, const float* s_q,
                                                 const float* z_q, const float* s_k, const float* z_k, float s_v,
                                                 float z_v, int a_bits, float sm_scale, const float* levels,
                                                 float p_scale, int p_steps, int p_bits, void* out, int out_dtype,
                                                 cudaStream_t stream);
