// CPU kernels of fastquant's deployed linear layer (module fastquant._C_cpu).
//
// An Int8Linear computes y = s_x s_w [acc + c_w A + c_x B'] + b with acc the int8 x int8 ->
// int32 product of the activation codes a (moved into int8) and the weight codes, and A the
// row sums of a (see fastquant/deploy.py for the algebra).
// (The attention's fake quantization gets one-pass kernels too: fake_quant_uniform for
// uniform quantizers per tensor or per head, fake_quant_log for the softmax's log2 and
// log-sqrt2 quantizers.) In PyTorch that is about ten
// elementwise passes over [rows, features] tensors around the GEMM; here it is three:
//
//   quantize: x (float32) -> a (int8) and A (int32) in one pass, with one step and zero
//             point for the tensor, or per row computed from the row's range in the same
//             pass (dynamic per-token quantization);
//   product:  at::_int_mm (oneDNN; VNNI on x86);
//   epilogue: the int32 accumulator -> float32 output with all corrections, scales and
//             the bias in one pass.
//
// Every float operation happens in the same order as the PyTorch reference in
// fastquant/deploy.py (true division, round half to even, no fused multiply-add: see the
// -ffp-contract=off flag in setup.py), so the codes are identical to the reference's and
// the outputs equal within float rounding of the epilogue; the tests check both.
// Rows are spread over torch's intra-op threads (at::parallel_for).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

namespace {

// Functions with loops the compiler should vectorise are cloned for AVX-512, AVX2 and the
// baseline; the loader picks the best one the CPU has.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FQ_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FQ_CLONES
#endif

constexpr float kScaleFloor = 1e-8f;  // as range_to_qparams' clamp_min

// a[k] = clamp(nearbyint(x[k] / s) + z, 0, qmax) - o; returns the sum of a.
FQ_CLONES int32_t quantize_row(const float* x, int8_t* a, int64_t k, float s, float z, float qmax, float o) {
  int32_t sum = 0;
  for (int64_t j = 0; j < k; ++j) {
    float q = std::nearbyint(x[j] / s) + z;
    q = std::min(std::max(q, 0.0f), qmax) - o;
    const int32_t v = static_cast<int32_t>(q);
    a[j] = static_cast<int8_t>(v);
    sum += v;
  }
  return sum;
}

FQ_CLONES void row_range(const float* x, int64_t k, float* lo, float* hi) {
  float mn = x[0], mx = x[0];
  for (int64_t j = 1; j < k; ++j) {
    mn = std::min(mn, x[j]);
    mx = std::max(mx, x[j]);
  }
  *lo = mn;
  *hi = mx;
}

// out[j] = ((float)acc[j] + r * c_w[j] + add[j]) * mul[j]
FQ_CLONES void epilogue_row(const int32_t* acc, float* out, int64_t n, float r, const float* c_w, const float* add,
                            const float* mul) {
  for (int64_t j = 0; j < n; ++j) {
    float v = static_cast<float>(acc[j]) + r * c_w[j];
    out[j] = (v + add[j]) * mul[j];
  }
}

// out[j] = (((float)acc[j] + r * c_w[j]) + c_x * b_sum[j]) * (s_x * s_w[j]) (+ bias[j])
FQ_CLONES void epilogue_row_dynamic(const int32_t* acc, float* out, int64_t n, float r, const float* c_w, float c_x,
                                    const float* b_sum, float s_x, const float* s_w, const float* bias) {
  for (int64_t j = 0; j < n; ++j) {
    float v = static_cast<float>(acc[j]) + r * c_w[j];
    const float corr = c_x * b_sum[j];
    const float scale = s_x * s_w[j];
    v = (v + corr) * scale;
    out[j] = bias ? v + bias[j] : v;
  }
}

// out[j] = (clamp(nearbyint(x[j] / s) + z, 0, qmax) - z) * s
FQ_CLONES void fake_quant_span(const float* x, float* out, int64_t n, float s, float z, float qmax) {
  for (int64_t j = 0; j < n; ++j) {
    const float q = std::min(std::max(std::nearbyint(x[j] / s) + z, 0.0f), qmax);
    out[j] = (q - z) * s;
  }
}

void check_vec(const at::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 1 &&
                  t.size(0) == n,
              "fastquant._C_cpu: ", name, " must be a contiguous float32 CPU vector of length ", n, ", got ",
              t.scalar_type(), " of shape ", t.sizes());
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight_t, int64_t a_bits) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "int8_linear: x must be a contiguous 2-D float32 CPU tensor, got ", x.scalar_type(), " of shape ",
              x.sizes(), " on ", x.device());
  TORCH_CHECK(weight_t.device().is_cpu() && weight_t.scalar_type() == at::kChar && weight_t.dim() == 2 &&
                  weight_t.size(0) == x.size(1),
              "int8_linear: weight_t must be an int8 [", x.size(1), ", N] CPU tensor, got ", weight_t.scalar_type(),
              " of shape ", weight_t.sizes());
  TORCH_CHECK(a_bits >= 2 && a_bits <= 8, "int8_linear: a_bits must be 2..8, got ", a_bits);
  TORCH_CHECK(x.size(1) > 0 && x.size(1) < (int64_t{1} << 23),
              "int8_linear: the row sums must stay exact in float32; got ", x.size(1), " features");
}

constexpr int64_t kGrain = 16;  // rows per task

// Per-tensor input step (calibrated): y = ((acc + A c_w) + col_add) * col_scale.
at::Tensor int8_linear_static(const at::Tensor& x, const at::Tensor& weight_t, double x_scale, double x_zero,
                              int64_t a_bits, const at::Tensor& w_corr, const at::Tensor& col_add,
                              const at::Tensor& col_scale) {
  check_inputs(x, weight_t, a_bits);
  const int64_t m = x.size(0), k = x.size(1), n = weight_t.size(1);
  check_vec(w_corr, n, "w_corr");
  check_vec(col_add, n, "col_add");
  check_vec(col_scale, n, "col_scale");
  const float s = static_cast<float>(x_scale), z = static_cast<float>(x_zero);
  const float qmax = static_cast<float>((1 << a_bits) - 1), o = static_cast<float>(1 << (a_bits - 1));
  at::Tensor a = at::empty({m, k}, x.options().dtype(at::kChar));
  std::vector<int32_t> rows(static_cast<size_t>(m));
  const float* xp = x.data_ptr<float>();
  int8_t* ap = a.data_ptr<int8_t>();
  at::parallel_for(0, m, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) rows[i] = quantize_row(xp + i * k, ap + i * k, k, s, z, qmax, o);
  });
  const at::Tensor acc = at::_int_mm(a, weight_t);
  at::Tensor out = at::empty({m, n}, x.options());
  const int32_t* cp = acc.data_ptr<int32_t>();
  float* op = out.data_ptr<float>();
  const float *cw = w_corr.data_ptr<float>(), *ad = col_add.data_ptr<float>(), *ml = col_scale.data_ptr<float>();
  const int64_t ldc = acc.stride(0);
  at::parallel_for(0, m, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      epilogue_row(cp + i * ldc, op + i * n, n, static_cast<float>(rows[i]), cw, ad, ml);
  });
  return out;
}

// Per-token input (dynamic): each row's step and zero point from its range, as
// range_to_qparams; y = ((acc + A c_w) + (o - z_x) B') * (s_x s_w) + bias.
// Returns (y, s_x, z_x).
std::tuple<at::Tensor, at::Tensor, at::Tensor> int8_linear_dynamic(const at::Tensor& x, const at::Tensor& weight_t,
                                                                   int64_t a_bits, const at::Tensor& w_corr,
                                                                   const at::Tensor& b_sum, const at::Tensor& w_scale,
                                                                   const c10::optional<at::Tensor>& bias) {
  check_inputs(x, weight_t, a_bits);
  const int64_t m = x.size(0), k = x.size(1), n = weight_t.size(1);
  check_vec(w_corr, n, "w_corr");
  check_vec(b_sum, n, "b_sum");
  check_vec(w_scale, n, "w_scale");
  if (bias) check_vec(*bias, n, "bias");
  const float qmax = static_cast<float>((1 << a_bits) - 1), o = static_cast<float>(1 << (a_bits - 1));
  at::Tensor a = at::empty({m, k}, x.options().dtype(at::kChar));
  at::Tensor sx = at::empty({m}, x.options()), zx = at::empty({m}, x.options());
  std::vector<int32_t> rows(static_cast<size_t>(m));
  const float* xp = x.data_ptr<float>();
  int8_t* ap = a.data_ptr<int8_t>();
  float *sp = sx.data_ptr<float>(), *zp = zx.data_ptr<float>();
  at::parallel_for(0, m, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float lo, hi;
      row_range(xp + i * k, k, &lo, &hi);
      lo = std::min(lo, 0.0f);
      hi = std::max(hi, 0.0f);
      const float s = std::max((hi - lo) / qmax, kScaleFloor);
      const float z = std::min(std::max(std::nearbyint(-lo / s), 0.0f), qmax);
      sp[i] = s;
      zp[i] = z;
      rows[i] = quantize_row(xp + i * k, ap + i * k, k, s, z, qmax, o);
    }
  });
  const at::Tensor acc = at::_int_mm(a, weight_t);
  at::Tensor out = at::empty({m, n}, x.options());
  const int32_t* cp = acc.data_ptr<int32_t>();
  float* op = out.data_ptr<float>();
  const float *cw = w_corr.data_ptr<float>(), *bs = b_sum.data_ptr<float>(), *ws = w_scale.data_ptr<float>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  const int64_t ldc = acc.stride(0);
  at::parallel_for(0, m, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      epilogue_row_dynamic(cp + i * ldc, op + i * n, n, static_cast<float>(rows[i]), cw, o - zp[i], bs, sp[i], ws,
                           bp);
  });
  return {out, sx, zx};
}

// Uniform fake quantization in one pass, with one step and zero point for the whole tensor
// or one per channel of a dimension: x is viewed as [rows, inner] (contiguous) and row r
// uses channel r % channels (per head of [B, H, N, D]: inner = N * D, channels = H).
at::Tensor fake_quant_uniform(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
                              int64_t inner, int64_t bits) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat,
              "fake_quant_uniform: x must be a float32 CPU tensor, got ", x.scalar_type(), " on ", x.device());
  TORCH_CHECK(bits >= 2 && bits <= 16, "fake_quant_uniform: bits must be 2..16, got ", bits);
  const int64_t channels = scale.numel();
  TORCH_CHECK(scale.scalar_type() == at::kFloat && zero_point.scalar_type() == at::kFloat &&
                  zero_point.numel() == channels && channels > 0 && scale.is_contiguous() && zero_point.is_contiguous(),
              "fake_quant_uniform: scale and zero_point must be contiguous float32 vectors of one length");
  const at::Tensor xc = x.contiguous();
  const int64_t n = xc.numel();
  TORCH_CHECK(inner > 0 && n % inner == 0, "fake_quant_uniform: inner (", inner, ") must divide x's size (", n, ")");
  at::Tensor out = at::empty_like(xc);
  const float qmax = static_cast<float>((int64_t{1} << bits) - 1);
  const float *xp = xc.data_ptr<float>(), *sp = scale.data_ptr<float>(), *zp = zero_point.data_ptr<float>();
  float* op = out.data_ptr<float>();
  constexpr int64_t kSpan = 4096;  // elements per task
  const int64_t spans = (inner + kSpan - 1) / kSpan, rows = n / inner;
  at::parallel_for(0, rows * spans, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r = t / spans, lo = (t % spans) * kSpan, c = r % channels;
      const int64_t off = r * inner + lo;
      fake_quant_span(xp + off, op + off, std::min(kSpan, inner - lo), sp[c], zp[c], qmax);
    }
  });
  return out;
}

// The code of a log quantizer's nearest level to p, in value (LogQuantizer.quantize).
// levels[q] = scale * 2^(-q / steps) for q < zero_code, levels[zero_code] = 0 (made by
// the caller with the quantizer's own dequantize). The upper candidate
// hi = clamp(floor(-steps * log2(p / scale)), 0, zero_code) is read from the exponent and
// mantissa bits of r = max(p / scale, 1e-30) (a normal float) instead of a log2 call; where
// float rounding could put it one code off (p within rounding of a level) both candidate
// pairs hold that level and it is the nearer one, so the chosen level is the same. Of hi
// and the next code down, the nearer level in value wins.
inline int log_code(float p, float scale, int steps, int zero_code, const float* levels) {
  constexpr float kSqrt2 = 1.41421356237309504880f;
  const float r = std::max(p / scale, 1e-30f);
  int32_t bits;
  std::memcpy(&bits, &r, sizeof(bits));
  const int32_t ex = ((bits >> 23) & 0xff) - 127;  // r = m 2^ex, m in [1, 2)
  const int32_t mbits = (bits & 0x7fffff) | 0x3f800000;
  float m;
  std::memcpy(&m, &mbits, sizeof(m));
  // floor(-steps * log2(r)) = -steps * ex - ceil(steps * log2(m)) for m in [1, 2)
  const int up = (m > 1.0f) ? ((steps == 1) ? 1 : (m > kSqrt2 ? 2 : 1)) : 0;
  int hi = -steps * ex - up;
  hi = std::min(std::max(hi, 0), zero_code);
  const int lo = std::min(hi + 1, zero_code);
  return (std::fabs(levels[hi] - p) <= std::fabs(p - levels[lo])) ? hi : lo;
}

// The nearest level (log_code), returned as (xq - x) + x like LogQuantizer.forward's
// straight-through form.
FQ_CLONES void fake_quant_log_span(const float* x, float* out, int64_t n, float scale, int steps, int zero_code,
                                   const float* levels) {
  for (int64_t j = 0; j < n; ++j) {
    const float v = x[j];
    const float q = levels[log_code(v, scale, steps, zero_code, levels)];
    out[j] = (q - v) + v;
  }
}

at::Tensor fake_quant_log(const at::Tensor& x, double scale, int64_t steps, const at::Tensor& levels) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat,
              "fake_quant_log: x must be a float32 CPU tensor, got ", x.scalar_type(), " on ", x.device());
  TORCH_CHECK(steps == 1 || steps == 2, "fake_quant_log: steps per octave must be 1 or 2, got ", steps);
  TORCH_CHECK(levels.scalar_type() == at::kFloat && levels.dim() == 1 && levels.is_contiguous() &&
                  levels.numel() >= 2 && levels.numel() <= 65536,
              "fake_quant_log: levels must be a contiguous float32 vector of 2..65536 values");
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  const float* xp = xc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float* lv = levels.data_ptr<float>();
  const int zero_code = static_cast<int>(levels.numel() - 1);
  const float s = static_cast<float>(scale);
  constexpr int64_t kSpan = 4096;
  const int64_t n = xc.numel();
  at::parallel_for(0, (n + kSpan - 1) / kSpan, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t lo = t * kSpan;
      fake_quant_log_span(xp + lo, op + lo, std::min(kSpan, n - lo), s, static_cast<int>(steps), zero_code, lv);
    }
  });
  return out;
}


// ---------------------------------------------------------------------------------------
// The quantized attention (fastquant/ops/attention.py states the contract), in three passes
// and two matrix products:
//
//   1. Q, K, V -> their codes minus the zero points, a + c = clamp(round(x / s) + z) - z, as
//      float32 (integers of magnitude <= 255);
//   2. T = (a_q + c_q)(a_k + c_k)^T by at::matmul: the contract's T (the corrections are this
//      product expanded), exact in float32 while D 255^2 < 2^24 (D <= 256);
//   3. per row: S = T (s_q s_k) sm_scale, the softmax in fp32 (a vectorised exp), the codes
//      of P (log2 / log-sqrt2: the nearest level in value, as fake_quant_log_span; uniform,
//      p_steps = 0: clamp(round(P / p_scale), 0, 2^p_bits - 1)) and P' in place of T;
//   4. P' (a_v + c_v) by at::matmul: exact for uniform codes while N 255^2 < 2^24 (N <= 258),
//      fp32 sums of exact products otherwise; times p_scale s_v into [B, N, H, D].
//
// The products run on torch's BLAS with its threads; the passes on torch's intra-op threads.

// out[d] = clamp(nearbyint(x[d] / s) + z, 0, qmax) - z (the code minus the zero point, exact).
FQ_CLONES void centered_codes_row(const float* x, int64_t d_, float s, float z, float qmax, float* out) {
  for (int64_t d = 0; d < d_; ++d) {
    float q = std::nearbyint(x[d] / s) + z;
    out[d] = std::min(std::max(q, 0.0f), qmax) - z;
  }
}

// x[j] = exp(x[j] - mx) for j < n, returns their sum: e^y = 2^k e^r with k = round(y log2 e),
// r = y - k ln 2 (ln 2 in two parts), e^r by its Taylor polynomial to r^7 (|r| <= ln2 / 2:
// relative error below 2e-7); y < -87 (a result below the smallest normal float) gives 0.
FQ_CLONES float exp_row(float* x, int64_t n, float mx) {
  constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693145751953125f, kLn2Lo = 1.42860682030941723e-6f;
  float sum = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    float y = x[j] - mx;
    const bool under = y < -87.0f;
    y = under ? -87.0f : y;
    const float kf = std::nearbyint(y * kLog2e);
    const float r = (y - kf * kLn2Hi) - kf * kLn2Lo;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t bits = (static_cast<int32_t>(kf) + 127) << 23;
    float two_k;
    std::memcpy(&two_k, &bits, sizeof(two_k));
    const float e = under ? 0.0f : p * two_k;
    x[j] = e;
    sum += e;
  }
  return sum;
}

// Scores in place: t[j] = t[j] * mult; returns their maximum.
FQ_CLONES float scale_row(float* t, int64_t n, float mult) {
  float mx = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    t[j] = t[j] * mult;
    mx = std::max(mx, t[j]);
  }
  return mx;
}

// e[j] <- clamp(round(e[j] / sum / ps), 0, qmax) (uniform softmax codes, zero point 0).
FQ_CLONES void uniform_codes_row(float* e, int64_t n, float sum, float ps, float qmax) {
  for (int64_t j = 0; j < n; ++j) {
    const float v = std::nearbyint((e[j] / sum) / ps);
    e[j] = std::min(std::max(v, 0.0f), qmax);
  }
}

// e[j] <- weights[log_code(P_j = e[j] / sum)].
FQ_CLONES void log_weights_row(float* e, int64_t n, float sum, float scale, int steps, int zero_code,
                               const float* levels, const float* weights) {
  for (int64_t j = 0; j < n; ++j) e[j] = weights[log_code(e[j] / sum, scale, steps, zero_code, levels)];
}

// The same for log2 (steps 1), without tables: the levels scale 2^-c and the weights 2^-c are
// exact powers of two times the scale (c <= 100 here: r >= 1e-30 bounds the upper candidate),
// built from their exponent bits, so the loop vectorises.
FQ_CLONES void log2_weights_row(float* e, int64_t n, float sum, float scale, int zero_code) {
  for (int64_t j = 0; j < n; ++j) {
    const float p = e[j] / sum;
    const float r = std::max(p / scale, 1e-30f);
    int32_t bits;
    std::memcpy(&bits, &r, sizeof(bits));
    const int32_t ex = ((bits >> 23) & 0xff) - 127;
    const int up = (bits & 0x7fffff) != 0 ? 1 : 0;  // m > 1
    int hi = -ex - up;
    hi = std::min(std::max(hi, 0), zero_code);
    const int lo = std::min(hi + 1, zero_code);
    const int32_t hb = (127 - hi) << 23, lb = (127 - lo) << 23;
    float ph, pl;
    std::memcpy(&ph, &hb, sizeof(ph));
    std::memcpy(&pl, &lb, sizeof(pl));
    const float lh = hi == zero_code ? 0.0f : scale * ph, ll = lo == zero_code ? 0.0f : scale * pl;
    const bool take_hi = std::fabs(lh - p) <= std::fabs(p - ll);
    const float w = take_hi ? ph : pl;
    e[j] = (take_hi ? hi : lo) == zero_code ? 0.0f : w;
  }
}

FQ_CLONES void scaled_copy(const float* x, int64_t n, float a, float* out) {
  for (int64_t d = 0; d < n; ++d) out[d] = a * x[d];
}

at::Tensor quant_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& s_q,
                           const at::Tensor& z_q, const at::Tensor& s_k, const at::Tensor& z_k, double s_v,
                           double z_v, int64_t a_bits, double sm_scale, double p_scale, int64_t p_steps,
                           int64_t p_bits, const at::Tensor& levels, const at::Tensor& weights) {
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 4,
                "quant_attention: q, k, v must be 4-D float32 CPU tensors [B, H, N, D]");
    TORCH_CHECK(t->sizes() == q.sizes(), "quant_attention: q, k and v must have one shape");
  }
  TORCH_CHECK(a_bits >= 2 && a_bits <= 8, "quant_attention: a_bits must be 2..8, got ", a_bits);
  TORCH_CHECK(p_steps >= 0 && p_steps <= 2, "quant_attention: p_steps must be 0 (uniform), 1 or 2, got ", p_steps);
  TORCH_CHECK(p_bits >= 2 && p_bits <= 8, "quant_attention: p_bits must be 2..8, got ", p_bits);
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  TORCH_CHECK(D <= 256, "quant_attention: head dim must be at most 256, got ", D);
  check_vec(s_q, H, "s_q");
  check_vec(z_q, H, "z_q");
  check_vec(s_k, H, "s_k");
  check_vec(z_k, H, "z_k");
  const int zero_code = (1 << p_bits) - 1;
  if (p_steps > 0) {
    check_vec(levels, zero_code + 1, "levels");
    check_vec(weights, zero_code + 1, "weights");
  }
  const float qmax = static_cast<float>((1 << a_bits) - 1);
  const float* sqp = s_q.data_ptr<float>();
  const float* zqp = z_q.data_ptr<float>();
  const float* skp = s_k.data_ptr<float>();
  const float* zkp = z_k.data_ptr<float>();
  const float sv = static_cast<float>(s_v), zv = static_cast<float>(z_v), ps = static_cast<float>(p_scale);

  // 1. centered codes, [B, H, N, D] contiguous (the inputs may be strided views of qkv)
  at::Tensor cq = at::empty({B, H, N, D}, q.options()), ck = at::empty_like(cq), cv = at::empty_like(cq);
  const at::Tensor* in[3] = {&q, &k, &v};
  at::Tensor* outs[3] = {&cq, &ck, &cv};
  for (int w = 0; w < 3; ++w) {
    const at::Tensor& x = *in[w];
    const at::Tensor xc = x.stride(3) == 1 ? x : x.contiguous();
    const float* xp = xc.data_ptr<float>();
    float* op = outs[w]->data_ptr<float>();
    const int64_t sb = xc.stride(0), sh = xc.stride(1), sn = xc.stride(2);
    at::parallel_for(0, B * H * N, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / (H * N), h = (r / N) % H, n = r % N;
        const float s = w == 0 ? sqp[h] : (w == 1 ? skp[h] : sv);
        const float z = w == 0 ? zqp[h] : (w == 1 ? zkp[h] : zv);
        centered_codes_row(xp + b * sb + h * sh + n * sn, D, s, z, qmax, op + r * D);
      }
    });
  }
  // 2. T, exact
  at::Tensor t = at::matmul(cq, ck.transpose(-2, -1)).contiguous();  // [B, H, N, N]
  // 3. softmax and the probabilities' codes, in place
  float* tp = t.data_ptr<float>();
  const float* lv = p_steps > 0 ? levels.data_ptr<float>() : nullptr;
  const float* pw = p_steps > 0 ? weights.data_ptr<float>() : nullptr;
  const float pqmax = static_cast<float>(zero_code);
  // log2: the table-free loop when the tables are exact powers of two (they are when made by
  // the quantizer's own dequantize, as the backend does), the tables otherwise
  bool log2_exact = p_steps == 1;
  for (int c = 0; log2_exact && c < zero_code && c <= 100; ++c) {
    const int32_t b = (127 - c) << 23;
    float pc;
    std::memcpy(&pc, &b, sizeof(pc));
    log2_exact = lv[c] == ps * pc && pw[c] == pc;
  }
  at::parallel_for(0, B * H * N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t h = (r / N) % H;
      const float mult = (sqp[h] * skp[h]) * static_cast<float>(sm_scale);
      float* row = tp + r * N;
      const float mx = scale_row(row, N, mult);
      const float sum = exp_row(row, N, mx);
      if (p_steps == 1 && log2_exact)
        log2_weights_row(row, N, sum, ps, zero_code);
      else if (p_steps > 0)
        log_weights_row(row, N, sum, ps, static_cast<int>(p_steps), zero_code, lv, pw);
      else
        uniform_codes_row(row, N, sum, ps, pqmax);
    }
  });
  // 4. P' (a_v + c_v), scaled into [B, N, H, D]
  const at::Tensor o = at::matmul(t, cv).contiguous();  // [B, H, N, D]
  at::Tensor out = at::empty({B, N, H, D}, q.options());
  const float* opp = o.data_ptr<float>();
  float* outp = out.data_ptr<float>();
  const float amp = ps * sv;
  at::parallel_for(0, B * H * N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / (H * N), h = (r / N) % H, n = r % N;
      scaled_copy(opp + r * D, D, amp, outp + ((b * N + n) * H + h) * D);
    }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastquant CPU kernels: the fused quantize / int8 GEMM / epilogue of a deployed linear layer";
  m.def("int8_linear_static", &int8_linear_static, "Int8Linear forward with a calibrated per-tensor input step",
        py::arg("x"), py::arg("weight_t"), py::arg("x_scale"), py::arg("x_zero"), py::arg("a_bits"),
        py::arg("w_corr"), py::arg("col_add"), py::arg("col_scale"));
  m.def("int8_linear_dynamic", &int8_linear_dynamic,
        "Int8Linear forward with per-token input quantization; returns (y, step, zero point)", py::arg("x"),
        py::arg("weight_t"), py::arg("a_bits"), py::arg("w_corr"), py::arg("b_sum"), py::arg("w_scale"),
        py::arg("bias"));
  m.def("fake_quant_uniform", &fake_quant_uniform,
        "(clamp(round(x / s) + z, 0, 2^bits - 1) - z) * s in one pass, s and z per tensor or per channel "
        "(contiguous float32 out)",
        py::arg("x"), py::arg("scale"), py::arg("zero_point"), py::arg("inner"), py::arg("bits"));
  m.def("fake_quant_log", &fake_quant_log, "a log quantizer's nearest level, (xq - x) + x, in one pass",
        py::arg("x"), py::arg("scale"), py::arg("steps"), py::arg("levels"));
  m.def("quant_attention", &quant_attention,
        "the fused quantized attention (fastquant/ops/attention.py): q, k, v [B, H, N, D] float32 -> "
        "[B, N, H, D] float32; p_steps 0: uniform softmax codes, 1/2: log2/log-sqrt2 (levels: the level "
        "values, weights: 2^(-code / p_steps), 0 for the zero code)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("s_q"), py::arg("z_q"), py::arg("s_k"), py::arg("z_k"),
        py::arg("s_v"), py::arg("z_v"), py::arg("a_bits"), py::arg("sm_scale"), py::arg("p_scale"),
        py::arg("p_steps"), py::arg("p_bits"), py::arg("levels"), py::arg("weights"));
}
