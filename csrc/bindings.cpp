// Python bindings of the CUDA kernels (module fastquant._C). The kernels themselves are
// torch-free (csrc/*.cu with extern "C" launchers); this file checks tensors, allocates
// outputs, picks the current stream and calls the launchers.

#include <torch/extension.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <tuple>
#include <vector>

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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastquant CUDA kernels";
  m.def("quantize_per_token_int8", &quantize_per_token_int8, pybind11::arg("x"),
        "Per-token symmetric int8 quantization of a contiguous CUDA tensor [..., N] "
        "(float32, float16 or bfloat16). Returns (q int8 [..., N], scale float32 [...]).");
}
