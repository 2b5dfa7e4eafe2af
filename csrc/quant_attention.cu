// Fused quantized attention for inference: Q, K, V quantized in the kernel (uniform, per
// head for Q and K), Q K^T on int8 tensor cores with the zero-point corrections, softmax
// in float32, the probabilities log-quantized (log2 or log-sqrt2), and P V on fp16 tensor
// cores with V's codes (exact in fp16) and P's levels as exact powers of two (log-sqrt2's
// odd levels in a second product scaled by sqrt(2)); the scales are applied once at the
// end. Contract: fastquant/ops/attention.py; launcher: quant_attention.h. Torch-free (compile-checked with plain nvcc, csrc/compile_check.py).
//
// One block of 4 warps per (batch, head, 64 queries); each warp owns 16 query rows. The
// whole key range (N <= 256, padded to NK, a multiple of 32 and at least 64) stays in
// shared memory, so the softmax sees complete rows and the probabilities can be quantized
// before P V (an online softmax could not: the log quantizer needs the final
// probabilities). Shared memory, in 256-byte-aligned segments:
//   s   int32 [64][NK]   Q K^T of the block's rows; each row is then overwritten in place
//                        by its fp16 P' row(s) (after the warp has read it), and the warp's
//                        rows finally hold its float32 [16][64] P V result
//   vh  fp16  [NK][64]   V's codes plus c_v
//   kq  int8  [4][NK][16] K's codes as 16-column panels (WMMA fragments must start on
//                        32-byte boundaries, which a 16-wide step into a 64-byte row is not)
//   qq  int8  [4][64][16] Q's codes, the same panels
//   then the row sums of K's and Q's codes, and the level table. (vh holds q_v - z_v =
//   a_v + c_v, integers within +-255, exact in fp16, so P V needs no correction.)
// At NK = 256 that is 118 KiB (the kernel opts in to more than 48 KiB).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>

#include "cuda_common.cuh"
#include "quant_attention.h"

namespace {

using fastquant_cuda::kWarpSize;
using fastquant_cuda::load_float;
using fastquant_cuda::store_out;
using fastquant_cuda::warp_max;
using fastquant_cuda::warp_sum;

constexpr int kD = 64;       // head dimension
constexpr int kBQ = 64;      // queries per block
constexpr int kWarps = 4;    // 16 query rows each
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kMaxKeys = FASTQUANT_ATTENTION_MAX_KEYS;
constexpr int kMaxLevels = 256;  // p_bits <= 8
constexpr float kSqrt2 = 1.41421356237309504880f;

// clamp(round(x / s) + z, 0, qmax) - o, as fastquant.ops.attention._codes.
__device__ __forceinline__ int quantize(float x, float s, float z, float qmax, float o) {
  const float q = __fadd_rn(rintf(__fdiv_rn(x, s)), z);
  return static_cast<int>(__fsub_rn(fminf(fmaxf(q, 0.0f), qmax), o));
}

// The log quantizer's code of p (LogQuantizer.quantize): the level at or above p from p's
// binary exponent and mantissa, then the nearer of it and the next one down, in value.
__device__ __forceinline__ int log_code(float p, float p_scale, int steps, int zero_code, const float* lev) {
  const float r = fmaxf(__fdiv_rn(p, p_scale), 1e-30f);
  int e;
  const float m = 2.0f * frexpf(r, &e);  // r = m 2^(e-1), m in [1, 2)
  const int up = m > 1.0f ? (steps == 1 ? 1 : (m > kSqrt2 ? 2 : 1)) : 0;
  const int hi = min(max(-steps * (e - 1) - up, 0), zero_code);
  const int lo = min(hi + 1, zero_code);
  return fabsf(lev[hi] - p) <= fabsf(p - lev[lo]) ? hi : lo;
}

// The level 2^(-c / steps) without the scale, as an exact power of two and a flag: log2's
// levels are 2^-c; log-sqrt2's even codes 2^(-c/2), its odd codes sqrt(2) 2^(-(c+1)/2),
// whose power of two goes to a second P' row (the factor sqrt(2) is applied once, to that
// row's P V), so no level is rounded (fp16 keeps powers of two down to 2^-24).
__device__ __forceinline__ float level_power(int c, int steps, bool* odd) {
  *odd = steps == 2 && (c & 1);
  return ldexpf(1.0f, steps == 1 ? -c : -((c + 1) / 2));
}

struct Layout {
  int nk;
  size_t s, vh, kq, qq, rk, rq, lev, bytes;
};

__host__ __device__ inline size_t align256(size_t n) { return (n + 255) / 256 * 256; }

__host__ __device__ inline Layout layout_for(int n) {
  Layout l;
  l.nk = (n + 31) / 32 * 32;
  if (l.nk < 64) l.nk = 64;  // a warp's rows must hold its 16 x 64 float result
  size_t off = 0;
  l.s = off;   off = align256(off + static_cast<size_t>(kBQ) * l.nk * 4);
  l.vh = off;  off = align256(off + static_cast<size_t>(l.nk) * kD * 2);
  l.kq = off;  off = align256(off + static_cast<size_t>(l.nk) * kD);
  l.qq = off;  off = align256(off + static_cast<size_t>(kBQ) * kD);
  l.rk = off;  off = align256(off + static_cast<size_t>(l.nk) * 4);
  l.rq = off;  off = align256(off + kBQ * 4);
  l.lev = off; off = align256(off + kMaxLevels * 4);
  l.bytes = off;
  return l;
}

template <typename InT, typename OutT>
__global__ void __launch_bounds__(kThreads)
    quant_attention_kernel(const InT* __restrict__ q, const InT* __restrict__ k, const InT* __restrict__ v, int64_t H,
                           int N, int64_t stride_b, int64_t stride_h, int64_t stride_n, const float* __restrict__ s_q,
                           const float* __restrict__ z_q, const float* __restrict__ s_k,
                           const float* __restrict__ z_k, float s_v, float z_v, float qmax, float sm_scale,
                           const float* __restrict__ levels, float p_scale, int p_steps, int zero_code,
                           OutT* __restrict__ out) {
  using namespace nvcuda;
  extern __shared__ __align__(1024) unsigned char smem[];
  const Layout L = layout_for(N);
  const int nk = L.nk;
  int32_t* s_acc = reinterpret_cast<int32_t*>(smem + L.s);
  __half* vh = reinterpret_cast<__half*>(smem + L.vh);
  int8_t* kq = reinterpret_cast<int8_t*>(smem + L.kq);
  int8_t* qq = reinterpret_cast<int8_t*>(smem + L.qq);
  int32_t* rk = reinterpret_cast<int32_t*>(smem + L.rk);
  int32_t* rq = reinterpret_cast<int32_t*>(smem + L.rq);
  float* lev = reinterpret_cast<float*>(smem + L.lev);

  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t bh = blockIdx.x;
  const int64_t b = bh / H, h = bh % H;
  const int q0 = blockIdx.y * kBQ;
  const int64_t base = b * stride_b + h * stride_h;
  const float o = __fmul_rn(__fadd_rn(qmax, 1.0f), 0.5f);
  const float sq = s_q[h], zq = z_q[h], sk = s_k[h], zk = z_k[h];
  const int cq = __float2int_rn(__fsub_rn(o, zq)), ck = __float2int_rn(__fsub_rn(o, zk));
  const int cv_i = __float2int_rn(__fsub_rn(o, z_v));

  for (int i = threadIdx.x; i <= zero_code; i += kThreads) lev[i] = levels[i];

  // Codes of K and V (every key of the row; padding keys are zeros), one warp per key,
  // two of the 64 dimensions per lane.
  for (int n = warp; n < nk; n += kWarps) {
    int ak0 = 0, ak1 = 0, av0 = 0, av1 = 0;
    if (n < N) {
      const int64_t off = base + n * stride_n;
      ak0 = quantize(load_float(k + off + lane), sk, zk, qmax, o);
      ak1 = quantize(load_float(k + off + lane + 32), sk, zk, qmax, o);
      av0 = quantize(load_float(v + off + lane), s_v, z_v, qmax, o);
      av1 = quantize(load_float(v + off + lane + 32), s_v, z_v, qmax, o);
    }
    // d = lane -> panel lane / 16; d = lane + 32 -> panel lane / 16 + 2.
    kq[(lane / 16) * nk * 16 + n * 16 + lane % 16] = static_cast<int8_t>(ak0);
    kq[(lane / 16 + 2) * nk * 16 + n * 16 + lane % 16] = static_cast<int8_t>(ak1);
    // V enters as q_v - z_v = a_v + c_v: integers within +-255, exact in fp16 (0 for padding).
    vh[n * kD + lane] = __int2half_rn(n < N ? av0 + cv_i : 0);
    vh[n * kD + lane + 32] = __int2half_rn(n < N ? av1 + cv_i : 0);
    const int sum = warp_sum(ak0 + ak1);
    if (lane == 0) rk[n] = sum;
  }
  // Codes of this block's queries (rows past N are zeros).
  for (int r = warp; r < kBQ; r += kWarps) {
    int a0 = 0, a1 = 0;
    if (q0 + r < N) {
      const int64_t off = base + static_cast<int64_t>(q0 + r) * stride_n;
      a0 = quantize(load_float(q + off + lane), sq, zq, qmax, o);
      a1 = quantize(load_float(q + off + lane + 32), sq, zq, qmax, o);
    }
    qq[(lane / 16) * kBQ * 16 + r * 16 + lane % 16] = static_cast<int8_t>(a0);
    qq[(lane / 16 + 2) * kBQ * 16 + r * 16 + lane % 16] = static_cast<int8_t>(a1);
    const int sum = warp_sum(a0 + a1);
    if (lane == 0) rq[r] = sum;
  }
  __syncthreads();

  // T = a_q a_k^T for the warp's 16 rows, 16 keys at a time.
  const int r0 = warp * 16;
  int32_t* s_rows = s_acc + static_cast<size_t>(r0) * nk;
  for (int j0 = 0; j0 < nk; j0 += 16) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, int> acc;
    wmma::fill_fragment(acc, 0);
#pragma unroll
    for (int dc = 0; dc < kD / 16; ++dc) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, signed char, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, signed char, wmma::col_major> fb;
      wmma::load_matrix_sync(fa, qq + dc * kBQ * 16 + r0 * 16, 16);
      wmma::load_matrix_sync(fb, kq + dc * nk * 16 + j0 * 16, 16);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(s_rows + j0, acc, nk, wmma::mem_row_major);
  }
  __syncwarp();

  // Softmax and log quantization, row by row; P' (fp16) replaces the row's T in place.
  const float f = __fmul_rn(__fmul_rn(sq, sk), sm_scale);
  const int dcc = kD * cq * ck;
  const int per_lane = nk / kWarpSize;  // <= 8
  for (int rr = 0; rr < 16; ++rr) {
    const int r = r0 + rr;
    int32_t* srow = s_acc + static_cast<size_t>(r) * nk;
    float sv[kMaxKeys / kWarpSize];
    float mx = -INFINITY;
#pragma unroll
    for (int t = 0; t < kMaxKeys / kWarpSize; ++t) {
      const int j = lane + t * kWarpSize;
      sv[t] = -INFINITY;
      if (t < per_lane && j < N) {
        const int tot = srow[j] + ck * rq[r] + cq * rk[j] + dcc;
        sv[t] = __fmul_rn(__int2float_rn(tot), f);
        mx = fmaxf(mx, sv[t]);
      }
    }
    mx = warp_max(mx);
    float l = 0.0f;
#pragma unroll
    for (int t = 0; t < kMaxKeys / kWarpSize; ++t) {
      const int j = lane + t * kWarpSize;
      sv[t] = (t < per_lane && j < N) ? expf(__fsub_rn(sv[t], mx)) : 0.0f;
      l += sv[t];
    }
    l = warp_sum(l);
    __syncwarp();  // every lane has read its T values before the row is overwritten
    // P' row: the even (or log2) levels in halves [0, nk), log-sqrt2's odd levels in
    // halves [nk, 2 nk) of the row's nk int32 slots.
    __half* prow = reinterpret_cast<__half*>(srow);
#pragma unroll
    for (int t = 0; t < kMaxKeys / kWarpSize; ++t) {
      const int j = lane + t * kWarpSize;
      if (t < per_lane) {
        __half he = __float2half_rn(0.0f), ho = __float2half_rn(0.0f);
        if (j < N) {
          const int c = log_code(__fdiv_rn(sv[t], l), p_scale, p_steps, zero_code, lev);
          if (c != zero_code) {
            bool odd;
            const __half hp = __float2half_rn(level_power(c, p_steps, &odd));
            (odd ? ho : he) = hp;
          }
        }
        prow[j] = he;
        if (p_steps == 2) prow[nk + j] = ho;
      }
    }
  }
  __syncwarp();

  // O = P' (a_v + c_v): the warp's 16 rows x 64 dimensions, 16 keys at a time.
  // (log-sqrt2: a second product for the odd levels, added times sqrt(2).)
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> oacc[kD / 16];
#pragma unroll
  for (int dc = 0; dc < kD / 16; ++dc) wmma::fill_fragment(oacc[dc], 0.0f);
  const __half* p_rows = reinterpret_cast<const __half*>(s_rows);
  for (int k0 = 0; k0 < nk; k0 += 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fp;
    wmma::load_matrix_sync(fp, p_rows + k0, 2 * nk);
#pragma unroll
    for (int dc = 0; dc < kD / 16; ++dc) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> fv;
      wmma::load_matrix_sync(fv, vh + k0 * kD + dc * 16, kD);
      wmma::mma_sync(oacc[dc], fp, fv, oacc[dc]);
    }
  }
  if (p_steps == 2) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> odd[kD / 16];
#pragma unroll
    for (int dc = 0; dc < kD / 16; ++dc) wmma::fill_fragment(odd[dc], 0.0f);
    for (int k0 = 0; k0 < nk; k0 += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fp;
      wmma::load_matrix_sync(fp, p_rows + nk + k0, 2 * nk);
#pragma unroll
      for (int dc = 0; dc < kD / 16; ++dc) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> fv;
        wmma::load_matrix_sync(fv, vh + k0 * kD + dc * 16, kD);
        wmma::mma_sync(odd[dc], fp, fv, odd[dc]);
      }
    }
    // Accumulator fragments of one shape share their element layout.
#pragma unroll
    for (int dc = 0; dc < kD / 16; ++dc)
#pragma unroll
      for (int i = 0; i < oacc[dc].num_elements; ++i) oacc[dc].x[i] = __fmaf_rn(kSqrt2, odd[dc].x[i], oacc[dc].x[i]);
  }
  __syncwarp();  // all of P' is read before the rows take the result
  float* o_rows = reinterpret_cast<float*>(s_rows);
#pragma unroll
  for (int dc = 0; dc < kD / 16; ++dc) wmma::store_matrix_sync(o_rows + dc * 16, oacc[dc], kD, wmma::mem_row_major);
  __syncwarp();

  // out[b, n, h, :] = (p_scale s_v) P' (a_v + c_v).
  const float scale_out = __fmul_rn(p_scale, s_v);
  for (int rr = 0; rr < 16; ++rr) {
    const int n = q0 + r0 + rr;
    if (n >= N) break;
    OutT* orow = out + ((b * N + n) * H + h) * kD;
    store_out(orow + lane, __fmul_rn(scale_out, o_rows[rr * kD + lane]));
    store_out(orow + lane + 32, __fmul_rn(scale_out, o_rows[rr * kD + lane + 32]));
  }
}

template <typename InT, typename OutT>
cudaError_t launch(const void* q, const void* k, const void* v, int64_t B, int64_t H, int64_t N, int64_t sb,
                   int64_t sh, int64_t sn, const float* s_q, const float* z_q, const float* s_k, const float* z_k,
                   float s_v, float z_v, float qmax, float sm_scale, const float* levels, float p_scale, int p_steps,
                   int zero_code, void* out, cudaStream_t stream) {
  const Layout L = layout_for(static_cast<int>(N));
  auto kernel = quant_attention_kernel<InT, OutT>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(L.bytes));
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(B * H), static_cast<unsigned>((N + kBQ - 1) / kBQ));
  kernel<<<grid, kThreads, L.bytes, stream>>>(static_cast<const InT*>(q), static_cast<const InT*>(k),
                                              static_cast<const InT*>(v), H, static_cast<int>(N), sb, sh, sn, s_q,
                                              z_q, s_k, z_k, s_v, z_v, qmax, sm_scale, levels, p_scale, p_steps,
                                              zero_code, static_cast<OutT*>(out));
  return cudaGetLastError();
}

template <typename InT>
cudaError_t launch_out(int out_dtype, const void* q, const void* k, const void* v, int64_t B, int64_t H, int64_t N,
                       int64_t sb, int64_t sh, int64_t sn, const float* s_q, const float* z_q, const float* s_k,
                       const float* z_k, float s_v, float z_v, float qmax, float sm_scale, const float* levels,
                       float p_scale, int p_steps, int zero_code, void* out, cudaStream_t stream) {
  switch (out_dtype) {
    case FASTQUANT_FLOAT32:
      return launch<InT, float>(q, k, v, B, H, N, sb, sh, sn, s_q, z_q, s_k, z_k, s_v, z_v, qmax, sm_scale, levels,
                                p_scale, p_steps, zero_code, out, stream);
    case FASTQUANT_FLOAT16:
      return launch<InT, __half>(q, k, v, B, H, N, sb, sh, sn, s_q, z_q, s_k, z_k, s_v, z_v, qmax, sm_scale, levels,
                                 p_scale, p_steps, zero_code, out, stream);
    case FASTQUANT_BFLOAT16:
      return launch<InT, __nv_bfloat16>(q, k, v, B, H, N, sb, sh, sn, s_q, z_q, s_k, z_k, s_v, z_v, qmax, sm_scale,
                                        levels, p_scale, p_steps, zero_code, out, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

extern "C" cudaError_t fastquant_quant_attention(const void* q, const void* k, const void* v, int in_dtype,
                                                 int64_t B, int64_t H, int64_t N, int64_t D, int64_t stride_b,
                                                 int64_t stride_h, int64_t stride_n, const float* s_q,
                                                 const float* z_q, const float* s_k, const float* z_k, float s_v,
                                                 float z_v, int a_bits, float sm_scale, const float* levels,
                                                 float p_scale, int p_steps, int p_bits, void* out, int out_dtype,
                                                 cudaStream_t stream) {
  if (B < 0 || H <= 0 || N <= 0 || N > kMaxKeys || D != kD || a_bits < 2 || a_bits > 8 || p_bits < 2 ||
      p_bits > 8 || (p_steps != 1 && p_steps != 2) || !(p_scale > 0.0f) || !(s_v > 0.0f)) {
    return cudaErrorInvalidValue;
  }
  if (B == 0) return cudaSuccess;
  if (q == nullptr || k == nullptr || v == nullptr || s_q == nullptr || z_q == nullptr || s_k == nullptr ||
      z_k == nullptr || levels == nullptr || out == nullptr || B * H > INT32_MAX) {
    return cudaErrorInvalidValue;
  }
  const float qmax = static_cast<float>((1 << a_bits) - 1);
  const int zero_code = (1 << p_bits) - 1;
  switch (in_dtype) {
    case FASTQUANT_FLOAT32:
      return launch_out<float>(out_dtype, q, k, v, B, H, N, stride_b, stride_h, stride_n, s_q, z_q, s_k, z_k, s_v,
                               z_v, qmax, sm_scale, levels, p_scale, p_steps, zero_code, out, stream);
    case FASTQUANT_FLOAT16:
      return launch_out<__half>(out_dtype, q, k, v, B, H, N, stride_b, stride_h, stride_n, s_q, z_q, s_k, z_k, s_v,
                                z_v, qmax, sm_scale, levels, p_scale, p_steps, zero_code, out, stream);
    case FASTQUANT_BFLOAT16:
      return launch_out<__nv_bfloat16>(out_dtype, q, k, v, B, H, N, stride_b, stride_h, stride_n, s_q, z_q, s_k,
                                       z_k, s_v, z_v, qmax, sm_scale, levels, p_scale, p_steps, zero_code, out,
                                       stream);
    default:
      return cudaErrorInvalidValue;
  }
}
