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
              "int8_linear: ", name, " must be a contiguous float32 CPU vector of length ", n, ", got ",
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

// Nearest level of a log quantizer, in value (LogQuantizer.quantize then .dequantize),
// returned as (xq - x) + x like LogQuantizer.forward's straight-through form.
// levels[q] = scale * 2^(-q / steps) for q < zero_code, levels[zero_code] = 0 (made by
// the caller with the quantizer's own dequantize). The upper candidate
// hi = clamp(floor(-steps * log2(x / scale)), 0, zero_code) is read from the float's
// exponent and mantissa instead of a log2 call; where float rounding could put it one
// code off (x within rounding of a level) both candidate pairs hold that level and it is
// the nearer one, so the chosen level is the same.
FQ_CLONES void fake_quant_log_span(const float* x, float* out, int64_t n, float scale, int steps, int zero_code,
                                   const float* levels) {
  constexpr float kSqrt2 = 1.41421356237309504880f;
  for (int64_t j = 0; j < n; ++j) {
    const float v = x[j];
    const float r = std::max(v / scale, 1e-30f);
    int e;
    const float m = 2.0f * std::frexp(r, &e);  // r = m * 2^(e-1), m in [1, 2)
    const int p = e - 1;
    // floor(-steps * log2(r)) = -steps * p - ceil(steps * log2(m)) for m in [1, 2)
    int up = 0;
    if (m > 1.0f) up = (steps == 1) ? 1 : (m > kSqrt2 ? 2 : 1);
    int hi = -steps * p - up;
    hi = std::min(std::max(hi, 0), zero_code);
    const int lo = std::min(hi + 1, zero_code);
    const float hv = levels[hi], lv = levels[lo];
    const float q = (std::fabs(hv - v) <= std::fabs(v - lv)) ? hv : lv;
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
}
