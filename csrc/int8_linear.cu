// The deployed int8 linear layer on CUDA: asymmetric activation quantization with row
// sums, and the int8 x int8 -> int32 GEMM on the tensor cores with the dequantization
// epilogue (4-bit weights: packed two per byte, unpacked into shared memory).
// Contract: int8_linear.h. Torch-free (compile-checked with plain nvcc, csrc/compile_check.py).
//
// GEMM design. A 128 x 128 output tile per block of 8 warps (4 along M x 2 along N, each
// warp 32 x 64 = 2 x 4 WMMA 16x16x16 int8 fragments with int32 accumulators), K walked in
// steps of 32. The next K step's tiles are loaded from global memory into registers while
// the tensor cores work on the current one, then stored into the other of two shared
// buffers (one barrier per step). WMMA wants fragment pointers 32-byte aligned, and a
// 16-wide step inside a row-major tile starts 16 bytes in, so the shared tiles are kept
// as 16-column panels: A as [BK/16][BM][16] (a panel of 16 k per row) and B as
// [BN/16][BK][16] (a panel of 16 n per k), every fragment starting on a 256-byte
// boundary, with 16-byte rows (ldm = 16). The epilogue goes fragment by fragment through
// a 16 x 16 int32 scratch per warp: each lane finishes 8 outputs of one row.
//
// The vectorised loads (16 bytes; 8 bytes of packed 4-bit weights) need K and N to be
// multiples of 16 and 16-byte aligned operands, as every ViT layer has; other shapes take
// the same kernel with element-wise, bounds-checked loads.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>

#include "cuda_common.cuh"
#include "int8_linear.h"

namespace {

using fastquant_cuda::kWarpSize;
using fastquant_cuda::load_float;
using fastquant_cuda::store_out;
using fastquant_cuda::warp_max;
using fastquant_cuda::warp_min;
using fastquant_cuda::warp_sum;

constexpr float kScaleFloor = 1e-8f;

// ---------------------------------------------------------------------------------------
// Quantization: one warp per row, 8 rows per block.

constexpr int kQuantWarps = 8;

template <typename T>
__global__ void __launch_bounds__(kQuantWarps* kWarpSize)
    quantize_asym_kernel(const T* __restrict__ x, int64_t rows, int64_t cols, int64_t ld_x, float qmax,
                         int per_token, const float* __restrict__ scale, const float* __restrict__ zero,
                         int8_t* __restrict__ a, int32_t* __restrict__ rowsum, float* __restrict__ s_x,
                         float* __restrict__ c_x) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kQuantWarps + threadIdx.x / kWarpSize;
  if (row >= rows) return;  // whole warps leave together: the shuffles below stay full
  const T* xr = x + row * ld_x;
  float s, z;
  if (per_token) {
    float lo = 0.0f, hi = 0.0f;  // the range always includes 0
    for (int64_t c = lane; c < cols; c += kWarpSize) {
      const float v = load_float(xr + c);
      lo = fminf(lo, v);
      hi = fmaxf(hi, v);
    }
    lo = warp_min(lo);
    hi = warp_max(hi);
    s = fmaxf(__fdiv_rn(__fsub_rn(hi, lo), qmax), kScaleFloor);
    z = fminf(fmaxf(rintf(__fdiv_rn(-lo, s)), 0.0f), qmax);
  } else {
    s = __ldg(scale);
    z = __ldg(zero);
  }
  const float o = __fmul_rn(__fadd_rn(qmax, 1.0f), 0.5f);
  int8_t* ar = a + row * cols;
  int32_t sum = 0;
  for (int64_t c = lane; c < cols; c += kWarpSize) {
    // rintf: round half to even, as torch.round; IEEE division as PyTorch's.
    float q = __fadd_rn(rintf(__fdiv_rn(load_float(xr + c), s)), z);
    q = __fsub_rn(fminf(fmaxf(q, 0.0f), qmax), o);
    const int32_t v = static_cast<int32_t>(q);
    ar[c] = static_cast<int8_t>(v);
    sum += v;
  }
  sum = warp_sum(sum);
  if (lane == 0) {
    rowsum[row] = sum;
    s_x[row] = s;
    c_x[row] = __fsub_rn(o, z);
  }
}

// ---------------------------------------------------------------------------------------
// GEMM.

constexpr int kBM = 128, kBN = 128, kBK = 32;
constexpr int kWarpsM = 4, kWarpsN = 2;
constexpr int kThreads = kWarpsM * kWarpsN * kWarpSize;  // 256
constexpr int kWarpTileM = kBM / kWarpsM;                // 32
constexpr int kWarpTileN = kBN / kWarpsN;                // 64
constexpr int kFragM = kWarpTileM / 16;                  // 2
constexpr int kFragN = kWarpTileN / 16;                  // 4
constexpr int kPanel = 16;                               // bytes per panel row (ldm)
constexpr int kATile = kBM * kBK;                        // bytes of one A tile
constexpr int kBTile = kBK * kBN;                        // bytes of one B tile

struct __align__(256) GemmSmem {
  int8_t a[2][kATile];  // [buffer][BK/16 panels][BM rows][16]
  int8_t b[2][kBTile];  // [buffer][BN/16 panels][BK rows][16]
  int32_t scratch[kWarpsM * kWarpsN][16 * 16];
};

// Offsets into the panel layouts.
__device__ __forceinline__ int a_offset(int m, int k) { return (k / kPanel) * (kBM * kPanel) + m * kPanel + (k % kPanel); }
__device__ __forceinline__ int b_offset(int k, int n) { return (n / kPanel) * (kBK * kPanel) + k * kPanel + (n % kPanel); }

// Per thread and K step: one 16-byte chunk of A (128 rows x 2 chunks) and one of B
// (32 rows x 8 chunks), or for packed 4-bit B one 8-byte chunk (16 packed rows x 16).
struct Staged {
  int4 a;
  int4 b;   // int8 B
  uint2 p;  // packed B
};

template <bool kVec, bool kW4>
__device__ __forceinline__ void load_tiles(Staged& st, const int8_t* __restrict__ a, const uint8_t* __restrict__ b,
                                           int64_t M, int64_t N, int64_t K, int64_t m0, int64_t n0, int64_t k0) {
  const int t = threadIdx.x;
  // A: row t / 2, 16 columns from (t % 2) * 16.
  {
    const int64_t m = m0 + t / 2, k = k0 + (t % 2) * 16;
    if constexpr (kVec) {
      st.a = (m < M && k < K) ? __ldg(reinterpret_cast<const int4*>(a + m * K + k)) : make_int4(0, 0, 0, 0);
    } else {
      int8_t bytes[16];
#pragma unroll
      for (int i = 0; i < 16; ++i) bytes[i] = (m < M && k + i < K) ? a[m * K + k + i] : int8_t(0);
      st.a = *reinterpret_cast<const int4*>(bytes);
    }
  }
  if constexpr (!kW4) {
    // B: row t / 8, 16 columns from (t % 8) * 16.
    const int64_t k = k0 + t / 8, n = n0 + (t % 8) * 16;
    if constexpr (kVec) {
      st.b = (k < K && n < N) ? __ldg(reinterpret_cast<const int4*>(b + k * N + n)) : make_int4(0, 0, 0, 0);
    } else {
      int8_t bytes[16];
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        bytes[i] = (k < K && n + i < N) ? static_cast<int8_t>(b[k * N + n + i]) : int8_t(0);
      }
      st.b = *reinterpret_cast<const int4*>(bytes);
    }
  } else {
    // Packed B: packed row t / 16 (k = 2 j and 2 j + 1), 8 columns from (t % 16) * 8.
    // A missing byte reads as 0x88: two zero codes.
    const int64_t j = k0 / 2 + t / 16, n = n0 + (t % 16) * 8;
    const int64_t packed_rows = (K + 1) / 2;
    if constexpr (kVec) {
      st.p = (j < packed_rows && n < N) ? __ldg(reinterpret_cast<const uint2*>(b + j * N + n))
                                        : make_uint2(0x88888888u, 0x88888888u);
    } else {
      uint8_t bytes[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) bytes[i] = (j < packed_rows && n + i < N) ? b[j * N + n + i] : uint8_t(0x88);
      st.p = *reinterpret_cast<const uint2*>(bytes);
    }
  }
}

template <bool kW4>
__device__ __forceinline__ void store_tiles(const Staged& st, int8_t* sa, int8_t* sb) {
  const int t = threadIdx.x;
  *reinterpret_cast<int4*>(sa + a_offset(t / 2, (t % 2) * 16)) = st.a;
  if constexpr (!kW4) {
    *reinterpret_cast<int4*>(sb + b_offset(t / 8, (t % 8) * 16)) = st.b;
  } else {
    const int j = t / 16, n = (t % 16) * 8;
    const uint8_t* packed = reinterpret_cast<const uint8_t*>(&st.p);
    int8_t lo[8], hi[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      lo[i] = static_cast<int8_t>(static_cast<int>(packed[i] & 0xF) - 8);
      hi[i] = static_cast<int8_t>(static_cast<int>(packed[i] >> 4) - 8);
    }
    *reinterpret_cast<uint2*>(sb + b_offset(2 * j, n)) = *reinterpret_cast<const uint2*>(lo);
    *reinterpret_cast<uint2*>(sb + b_offset(2 * j + 1, n)) = *reinterpret_cast<const uint2*>(hi);
  }
}

template <typename OutT, bool kVec, bool kW4>
__global__ void __launch_bounds__(kThreads)
    int8_gemm_kernel(const int8_t* __restrict__ a, const uint8_t* __restrict__ b,
                     const int32_t* __restrict__ rowsum, const float* __restrict__ s_x,
                     const float* __restrict__ c_x, const float* __restrict__ s_w, const float* __restrict__ c_w,
                     const float* __restrict__ b_sum, const float* __restrict__ bias, OutT* __restrict__ out,
                     int64_t M, int64_t N, int64_t K) {
  using namespace nvcuda;
  __shared__ GemmSmem smem;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int wm = warp / kWarpsN, wn = warp % kWarpsN;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBM, n0 = static_cast<int64_t>(blockIdx.x) * kBN;

  wmma::fragment<wmma::accumulator, 16, 16, 16, int> acc[kFragM][kFragN];
#pragma unroll
  for (int i = 0; i < kFragM; ++i)
#pragma unroll
    for (int j = 0; j < kFragN; ++j) wmma::fill_fragment(acc[i][j], 0);

  const int64_t steps = (K + kBK - 1) / kBK;
  Staged st;
  load_tiles<kVec, kW4>(st, a, b, M, N, K, m0, n0, 0);
  store_tiles<kW4>(st, smem.a[0], smem.b[0]);
  __syncthreads();
  for (int64_t step = 0; step < steps; ++step) {
    const int cur = static_cast<int>(step & 1);
    if (step + 1 < steps) load_tiles<kVec, kW4>(st, a, b, M, N, K, m0, n0, (step + 1) * kBK);
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, signed char, wmma::row_major> fa[kFragM];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, signed char, wmma::row_major> fb[kFragN];
#pragma unroll
      for (int i = 0; i < kFragM; ++i) {
        wmma::load_matrix_sync(fa[i], smem.a[cur] + a_offset(wm * kWarpTileM + i * 16, kk), kPanel);
      }
#pragma unroll
      for (int j = 0; j < kFragN; ++j) {
        wmma::load_matrix_sync(fb[j], smem.b[cur] + b_offset(kk, wn * kWarpTileN + j * 16), kPanel);
      }
#pragma unroll
      for (int i = 0; i < kFragM; ++i)
#pragma unroll
        for (int j = 0; j < kFragN; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    if (step + 1 < steps) store_tiles<kW4>(st, smem.a[cur ^ 1], smem.b[cur ^ 1]);
    __syncthreads();
  }

  // Epilogue: lane -> row lane / 2 of the fragment, 8 columns from (lane % 2) * 8.
  int32_t* scratch = smem.scratch[warp];
  const int r = lane / 2, c0 = (lane % 2) * 8;
#pragma unroll
  for (int i = 0; i < kFragM; ++i) {
    const int64_t m = m0 + wm * kWarpTileM + i * 16 + r;
    const bool row_ok = m < M;
    const float row_a = row_ok ? __int2float_rn(rowsum[m]) : 0.0f;
    const float row_c = row_ok ? c_x[m] : 0.0f;
    const float row_s = row_ok ? s_x[m] : 0.0f;
#pragma unroll
    for (int j = 0; j < kFragN; ++j) {
      wmma::store_matrix_sync(scratch, acc[i][j], 16, wmma::mem_row_major);
      __syncwarp();
      if (row_ok) {
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const int64_t n = n0 + wn * kWarpTileN + j * 16 + c0 + e;
          if (n < N) {
            // The twin's order, each operation rounded on its own.
            float y = __fadd_rn(__int2float_rn(scratch[r * 16 + c0 + e]), __fmul_rn(row_a, c_w[n]));
            y = __fadd_rn(y, __fmul_rn(row_c, b_sum[n]));
            y = __fmul_rn(y, __fmul_rn(row_s, s_w[n]));
            if (bias != nullptr) y = __fadd_rn(y, bias[n]);
            store_out(out + m * N + n, y);
          }
        }
      }
      __syncwarp();
    }
  }
}

template <typename OutT, bool kW4>
cudaError_t launch_gemm(const int8_t* a, const void* b, const int32_t* rowsum, const float* s_x, const float* c_x,
                        const float* s_w, const float* c_w, const float* b_sum, const float* bias, void* out,
                        int64_t M, int64_t N, int64_t K, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((N + kBN - 1) / kBN), static_cast<unsigned>((M + kBM - 1) / kBM));
  const auto aligned = [](const void* p) { return (reinterpret_cast<uintptr_t>(p) % 16) == 0; };
  const bool vec = K % 16 == 0 && N % 16 == 0 && aligned(a) && aligned(b);
  const auto* bb = static_cast<const uint8_t*>(b);
  auto* o = static_cast<OutT*>(out);
  if (vec) {
    int8_gemm_kernel<OutT, true, kW4><<<grid, kThreads, 0, stream>>>(a, bb, rowsum, s_x, c_x, s_w, c_w, b_sum,
                                                                      bias, o, M, N, K);
  } else {
    int8_gemm_kernel<OutT, false, kW4><<<grid, kThreads, 0, stream>>>(a, bb, rowsum, s_x, c_x, s_w, c_w, b_sum,
                                                                       bias, o, M, N, K);
  }
  return cudaGetLastError();
}

template <typename OutT>
cudaError_t launch_gemm_w(int w4, const int8_t* a, const void* b, const int32_t* rowsum, const float* s_x,
                          const float* c_x, const float* s_w, const float* c_w, const float* b_sum,
                          const float* bias, void* out, int64_t M, int64_t N, int64_t K, cudaStream_t stream) {
  return w4 ? launch_gemm<OutT, true>(a, b, rowsum, s_x, c_x, s_w, c_w, b_sum, bias, out, M, N, K, stream)
            : launch_gemm<OutT, false>(a, b, rowsum, s_x, c_x, s_w, c_w, b_sum, bias, out, M, N, K, stream);
}

// One thread per packed byte.
__global__ void pack_int4_kernel(const int8_t* __restrict__ w, uint8_t* __restrict__ packed, int64_t K, int64_t N,
                                 int64_t total) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int64_t j = i / N, n = i % N;
  const uint8_t lo = static_cast<uint8_t>(w[(2 * j) * N + n] + 8);
  const uint8_t hi = 2 * j + 1 < K ? static_cast<uint8_t>(w[(2 * j + 1) * N + n] + 8) : uint8_t(8);
  packed[i] = static_cast<uint8_t>(lo | static_cast<uint8_t>(hi << 4));
}

}  // namespace

extern "C" cudaError_t fastquant_pack_int4(const int8_t* w, uint8_t* packed, int64_t K, int64_t N,
                                           cudaStream_t stream) {
  if (K <= 0 || N <= 0 || w == nullptr || packed == nullptr) return cudaErrorInvalidValue;
  const int64_t total = (K + 1) / 2 * N;
  constexpr int threads = 256;
  const int64_t blocks = (total + threads - 1) / threads;
  if (blocks > INT32_MAX) return cudaErrorInvalidValue;
  pack_int4_kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(w, packed, K, N, total);
  return cudaGetLastError();
}

extern "C" cudaError_t fastquant_quantize_asym(const void* x, int x_dtype, int64_t rows, int64_t cols,
                                               int64_t ld_x, int bits, int per_token, const float* scale,
                                               const float* zero, int8_t* a, int32_t* rowsum, float* s_x,
                                               float* c_x, cudaStream_t stream) {
  if (rows < 0 || cols <= 0 || ld_x < cols || bits < 2 || bits > 8) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  if (x == nullptr || a == nullptr || rowsum == nullptr || s_x == nullptr || c_x == nullptr ||
      (!per_token && (scale == nullptr || zero == nullptr))) {
    return cudaErrorInvalidValue;
  }
  const int64_t blocks = (rows + kQuantWarps - 1) / kQuantWarps;
  if (blocks > INT32_MAX) return cudaErrorInvalidValue;
  const float qmax = static_cast<float>((1 << bits) - 1);
  const unsigned grid = static_cast<unsigned>(blocks);
  constexpr int threads = kQuantWarps * kWarpSize;
  switch (x_dtype) {
    case FASTQUANT_FLOAT32:
      quantize_asym_kernel<float><<<grid, threads, 0, stream>>>(static_cast<const float*>(x), rows, cols, ld_x,
                                                                qmax, per_token, scale, zero, a, rowsum, s_x, c_x);
      break;
    case FASTQUANT_FLOAT16:
      quantize_asym_kernel<__half><<<grid, threads, 0, stream>>>(static_cast<const __half*>(x), rows, cols, ld_x,
                                                                 qmax, per_token, scale, zero, a, rowsum, s_x, c_x);
      break;
    case FASTQUANT_BFLOAT16:
      quantize_asym_kernel<__nv_bfloat16><<<grid, threads, 0, stream>>>(static_cast<const __nv_bfloat16*>(x), rows,
                                                                        cols, ld_x, qmax, per_token, scale, zero, a,
                                                                        rowsum, s_x, c_x);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

extern "C" cudaError_t fastquant_int8_gemm(const int8_t* a, const void* b, int w4, const int32_t* rowsum,
                                           const float* s_x, const float* c_x, const float* s_w,
                                           const float* c_w, const float* b_sum, const float* bias, void* out,
                                           int out_dtype, int64_t M, int64_t N, int64_t K,
                                           cudaStream_t stream) {
  if (M < 0 || N <= 0 || K <= 0) return cudaErrorInvalidValue;
  if (M == 0) return cudaSuccess;
  if (a == nullptr || b == nullptr || rowsum == nullptr || s_x == nullptr || c_x == nullptr || s_w == nullptr ||
      c_w == nullptr || b_sum == nullptr || out == nullptr) {
    return cudaErrorInvalidValue;
  }
  if ((M + kBM - 1) / kBM > 65535 || (N + kBN - 1) / kBN > INT32_MAX) return cudaErrorInvalidValue;
  switch (out_dtype) {
    case FASTQUANT_FLOAT32:
      return launch_gemm_w<float>(w4, a, b, rowsum, s_x, c_x, s_w, c_w, b_sum, bias, out, M, N, K, stream);
    case FASTQUANT_FLOAT16:
      return launch_gemm_w<__half>(w4, a, b, rowsum, s_x, c_x, s_w, c_w, b_sum, bias, out, M, N, K, stream);
    case FASTQUANT_BFLOAT16:
      return launch_gemm_w<__nv_bfloat16>(w4, a, b, rowsum, s_x, c_x, s_w, c_w, b_sum, bias, out, M, N, K, stream);
    default:
      return cudaErrorInvalidValue;
  }
}
