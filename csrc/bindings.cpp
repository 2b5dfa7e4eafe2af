// Python bindings of the CUDA kernels (module fastquant._C). The kernels themselves are
// torch-free (csrc/*.cu with extern "C" launchers); this file checks tensors, allocates
// outputs, picks the current stream and calls the launchers.

#include <torch/extension.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <tuple>
#include <vector>

#include "int8_linear.h"
#include "quant_attention.h"
#include "quant_int8.h"

namespace {

int launcher_dtype(const at::Tensor& x, const char* op) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return FASTQUANT_FLOAT32;
    case at::kHalf:
      return FASTQUANT_FLOAT16;
    case at::kBFloat16:
      return FASTQUANT_BFLOAT16;
    default:
      TORCH_CHECK(false, op, ": expected float32, float16 or bfloat16, got ", x.scalar_type());
  }
  return -1;
}

std::tuple<at::Tensor, at::Tensor> quantize_per_token_int8(const at::Tensor& x) {
  constexpr const char* op = "quantize_per_token_int8";
  TORCH_CHECK(x.is_cuda(), op, ": expected a CUDA tensor, got device ", x.device());
  const int dtype = launcher_dtype(x, op);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, op, ": expected shape [..., N] with N > 0, got ",
              x.sizes());
  TORCH_CHECK(x.is_contiguous(), op, ": expected a contiguous tensor, got shape ", x.sizes(),
              " with strides ", x.strides());

  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t cols = x.size(-1);
  const int64_t rows = x.numel() / cols;
  TORCH_CHECK(rows <= INT32_MAX, op, ": at most 2^31 - 1 rows, got ", rows, " (shape ",
              x.sizes(), ")");

  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  std::vector<int64_t> scale_shape(x.sizes().begin(), x.sizes().end() - 1);
  at::Tensor scale = at::empty(scale_shape, x.options().dtype(at::kFloat));
  if (rows == 0) return {q, scale};

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  C10_CUDA_CHECK(fastquant_quantize_per_token_int8(x.data_ptr(), dtype, q.data_ptr<int8_t>(),
                                                   scale.data_ptr<float>(), rows, cols, stream));
  return {q, scale};
}

void check_cuda_f32(const at::Tensor& t, const char* op, const char* name, int64_t numel) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == numel, op, ": ",
              name, " must be a contiguous float32 CUDA tensor of ", numel, " elements, got ", t.scalar_type(),
              " ", t.sizes(), " on ", t.device());
}

cudaStream_t stream_of(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

// x [M, K] with unit column stride -> (a int8 [M, K], rowsum int32 [M], s_x [M], c_x [M]).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize_asym(const at::Tensor& x, int64_t bits,
                                                                         const c10::optional<at::Tensor>& scale,
                                                                         const c10::optional<at::Tensor>& zero) {
  constexpr const char* op = "quantize_asym";
  TORCH_CHECK(x.is_cuda(), op, ": expected a CUDA tensor, got device ", x.device());
  const int dtype = launcher_dtype(x, op);
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0 && x.stride(1) == 1 && x.stride(0) >= x.size(1), op,
              ": expected [M, K] with K > 0 and unit column stride, got ", x.sizes(), " strides ", x.strides());
  TORCH_CHECK(bits >= 2 && bits <= 8, op, ": bits must be 2..8, got ", bits);
  TORCH_CHECK(scale.has_value() == zero.has_value(), op, ": give both scale and zero, or neither");
  const bool per_token = !scale.has_value();
  if (!per_token) {
    check_cuda_f32(*scale, op, "scale", 1);
    check_cuda_f32(*zero, op, "zero", 1);
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor a = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor rowsum = at::empty({M}, x.options().dtype(at::kInt));
  at::Tensor s_x = at::empty({M}, x.options().dtype(at::kFloat));
  at::Tensor c_x = at::empty({M}, x.options().dtype(at::kFloat));
  C10_CUDA_CHECK(fastquant_quantize_asym(x.data_ptr(), dtype, M, K, x.stride(0), static_cast<int>(bits), per_token,
                                         per_token ? nullptr : scale->data_ptr<float>(),
                                         per_token ? nullptr : zero->data_ptr<float>(), a.data_ptr<int8_t>(),
                                         rowsum.data_ptr<int32_t>(), s_x.data_ptr<float>(), c_x.data_ptr<float>(),
                                         stream_of(x)));
  return {a, rowsum, s_x, c_x};
}

at::Tensor int8_gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& rowsum, const at::Tensor& s_x,
                     const at::Tensor& c_x, const at::Tensor& s_w, const at::Tensor& c_w, const at::Tensor& b_sum,
                     const c10::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  constexpr const char* op = "int8_gemm";
  TORCH_CHECK(a.is_cuda() && a.scalar_type() == at::kChar && a.dim() == 2 && a.is_contiguous(), op,
              ": a must be a contiguous int8 CUDA matrix, got ", a.scalar_type(), " ", a.sizes());
  TORCH_CHECK(b.is_cuda() && b.dim() == 2 && b.is_contiguous() &&
                  (b.scalar_type() == at::kChar || b.scalar_type() == at::kByte),
              op, ": b must be a contiguous int8 (codes) or uint8 (packed 4-bit codes) CUDA matrix, got ",
              b.scalar_type(), " ", b.sizes());
  TORCH_CHECK(a.device() == b.device(), op, ": a and b are on different devices");
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  const bool w4 = b.scalar_type() == at::kByte;
  TORCH_CHECK(K > 0 && N > 0, op, ": empty K or N");
  TORCH_CHECK(b.size(0) == (w4 ? (K + 1) / 2 : K), op, ": b has ", b.size(0), " rows, expected ",
              (w4 ? (K + 1) / 2 : K), " for K = ", K);
  TORCH_CHECK(rowsum.is_cuda() && rowsum.scalar_type() == at::kInt && rowsum.is_contiguous() && rowsum.numel() == M,
              op, ": rowsum must be a contiguous int32 CUDA vector of ", M, " elements");
  check_cuda_f32(s_x, op, "s_x", M);
  check_cuda_f32(c_x, op, "c_x", M);
  check_cuda_f32(s_w, op, "s_w", N);
  check_cuda_f32(c_w, op, "c_w", N);
  check_cuda_f32(b_sum, op, "b_sum", N);
  if (bias.has_value()) check_cuda_f32(*bias, op, "bias", N);
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor out = at::empty({M, N}, a.options().dtype(out_dtype));
  const int odtype = launcher_dtype(out, op);
  C10_CUDA_CHECK(fastquant_int8_gemm(a.data_ptr<int8_t>(), b.data_ptr(), w4, rowsum.data_ptr<int32_t>(),
                                     s_x.data_ptr<float>(), c_x.data_ptr<float>(), s_w.data_ptr<float>(),
                                     c_w.data_ptr<float>(), b_sum.data_ptr<float>(),
                                     bias.has_value() ? bias->data_ptr<float>() : nullptr, out.data_ptr(), odtype, M,
                                     N, K, stream_of(a)));
  return out;
}

at::Tensor pack_int4(const at::Tensor& w) {
  constexpr const char* op = "pack_int4";
  TORCH_CHECK(w.is_cuda() && w.scalar_type() == at::kChar && w.dim() == 2 && w.is_contiguous() && w.numel() > 0, op,
              ": w must be a non-empty contiguous int8 CUDA matrix [K, N], got ", w.scalar_type(), " ", w.sizes());
  const c10::cuda::CUDAGuard guard(w.device());
  const int64_t K = w.size(0), N = w.size(1);
  at::Tensor packed = at::empty({(K + 1) / 2, N}, w.options().dtype(at::kByte));
  C10_CUDA_CHECK(fastquant_pack_int4(w.data_ptr<int8_t>(), packed.data_ptr<uint8_t>(), K, N, stream_of(w)));
  return packed;
}

// q, k, v [B, H, N, 64] with equal strides and unit stride along the last dim -> [B, N, H, 64].
at::Tensor quant_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& s_q,
                           const at::Tensor& z_q, const at::Tensor& s_k, const at::Tensor& z_k, double s_v,
                           double z_v, int64_t a_bits, double sm_scale, const at::Tensor& levels, double p_scale,
                           int64_t p_steps, int64_t p_bits, at::ScalarType out_dtype) {
  constexpr const char* op = "quant_attention";
  TORCH_CHECK(q.is_cuda(), op, ": expected CUDA tensors, got device ", q.device());
  const int dtype = launcher_dtype(q, op);
  TORCH_CHECK(q.dim() == 4 && q.sizes() == k.sizes() && q.sizes() == v.sizes(), op,
              ": q, k, v must be [B, H, N, D] of one shape, got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() && k.device() == q.device() &&
                  v.device() == q.device(),
              op, ": q, k, v must share dtype and device");
  TORCH_CHECK(q.strides() == k.strides() && q.strides() == v.strides() && q.stride(3) == 1, op,
              ": q, k, v must share strides with unit stride along D, got ", q.strides(), ", ", k.strides(), ", ",
              v.strides());
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  TORCH_CHECK(D == 64, op, ": head dimension must be 64, got ", D);
  TORCH_CHECK(N >= 1 && N <= FASTQUANT_ATTENTION_MAX_KEYS, op, ": sequence length must be 1..",
              FASTQUANT_ATTENTION_MAX_KEYS, ", got ", N);
  TORCH_CHECK(a_bits >= 2 && a_bits <= 8 && p_bits >= 2 && p_bits <= 8 && (p_steps == 1 || p_steps == 2), op,
              ": bad bit widths or steps (a_bits ", a_bits, ", p_bits ", p_bits, ", p_steps ", p_steps, ")");
  check_cuda_f32(s_q, op, "s_q", H);
  check_cuda_f32(z_q, op, "z_q", H);
  check_cuda_f32(s_k, op, "s_k", H);
  check_cuda_f32(z_k, op, "z_k", H);
  check_cuda_f32(levels, op, "levels", int64_t(1) << p_bits);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({B, N, H, D}, q.options().dtype(out_dtype));
  const int odtype = launcher_dtype(out, op);
  C10_CUDA_CHECK(fastquant_quant_attention(
      q.data_ptr(), k.data_ptr(), v.data_ptr(), dtype, B, H, N, D, q.stride(0), q.stride(1), q.stride(2),
      s_q.data_ptr<float>(), z_q.data_ptr<float>(), s_k.data_ptr<float>(), z_k.data_ptr<float>(),
      static_cast<float>(s_v), static_cast<float>(z_v), static_cast<int>(a_bits), static_cast<float>(sm_scale),
      levels.data_ptr<float>(), static_cast<float>(p_scale), static_cast<int>(p_steps), static_cast<int>(p_bits),
      out.data_ptr(), odtype, stream_of(q)));
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastquant CUDA kernels";
  m.def("quantize_per_token_int8", &quantize_per_token_int8, pybind11::arg("x"),
        "Per-token symmetric int8 quantization of a contiguous CUDA tensor [..., N] "
        "(float32, float16 or bfloat16). Returns (q int8 [..., N], scale float32 [...]).");
  m.def("quantize_asym", &quantize_asym, pybind11::arg("x"), pybind11::arg("bits"),
        pybind11::arg("scale") = pybind11::none(), pybind11::arg("zero") = pybind11::none(),
        "Asymmetric quantization of x [M, K] for the int8 GEMM, per token (no scale) or with a calibrated "
        "step and zero point (1-element float32 CUDA tensors). Returns (a int8, rowsum int32, s_x, c_x).");
  m.def("int8_gemm", &int8_gemm, pybind11::arg("a"), pybind11::arg("b"), pybind11::arg("rowsum"),
        pybind11::arg("s_x"), pybind11::arg("c_x"), pybind11::arg("s_w"), pybind11::arg("c_w"),
        pybind11::arg("b_sum"), pybind11::arg("bias"), pybind11::arg("out_dtype"),
        "int8 GEMM with the dequantization epilogue (see csrc/int8_linear.h); b int8 [K, N] or packed "
        "4-bit uint8 [ceil(K/2), N].");
  m.def("pack_int4", &pack_int4, pybind11::arg("w"),
        "4-bit weight codes minus 8, int8 [K, N] -> uint8 [ceil(K/2), N], two per byte (as pack_int4_t).");
  m.def("quant_attention", &quant_attention, pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"),
        pybind11::arg("s_q"), pybind11::arg("z_q"), pybind11::arg("s_k"), pybind11::arg("z_k"),
        pybind11::arg("s_v"), pybind11::arg("z_v"), pybind11::arg("a_bits"), pybind11::arg("sm_scale"),
        pybind11::arg("levels"), pybind11::arg("p_scale"), pybind11::arg("p_steps"), pybind11::arg("p_bits"),
        pybind11::arg("out_dtype"),
        "Fused quantized attention (fastquant/ops/attention.py): q, k, v [B, H, N, 64] -> [B, N, H, 64].");
}
