"""int8 ops: per-token symmetric quantization.

The op ``fastquant::quantize_per_token_int8(Tensor x) -> (Tensor q, Tensor scale)`` is
declared once here with torch.library, with a fake implementation so torch.compile can
trace it. Implementations:

- every device but CUDA: ``torch_quantize_per_token_int8``, the PyTorch reference, which
  is also the oracle the tests compare the kernels against;
- CUDA: the CUDA extension (``csrc/quant_int8.cu``) when built, else the Triton kernel
  (``kernels/quant_int8.py``), else the reference.

Call ``quantize_per_token_int8`` (it checks its input, then calls the op), or
``torch.ops.fastquant.quantize_per_token_int8`` inside code that is already checked.
"""
import functools

import torch

from fastquant import backends

__all__ = ["quantize_per_token_int8", "torch_quantize_per_token_int8"]

# An all-zero row would get scale 0 and quantize 0/0; with the floor it gets a tiny,
# finite scale and quantizes to zeros. Kernels use the same float32 constant.
SCALE_FLOOR = 1e-8
QMAX = 127


def torch_quantize_per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: symmetric int8 quantization of each row (last dim) of ``x``.

    In float32 (x is converted first):

        scale = max(amax(|x|, dim=-1) / 127, 1e-8)
        q     = clamp(round_half_to_even(x / scale), -127, 127)

    Returns ``(q, scale)``: q int8 of x's shape, contiguous; scale float32 of shape
    x.shape[:-1], so that ``q * scale[..., None]`` approximates x. -128 is never used.
    Both divisions are tensor by tensor: PyTorch divides a CUDA tensor by a Python scalar
    through its reciprocal, which can differ from true division in the last bit.
    """
    xf = x.to(torch.float32).contiguous()
    amax = xf.abs().amax(dim=-1)
    scale = (amax / torch.full_like(amax, float(QMAX))).clamp_min(SCALE_FLOOR)
    q = torch.round(xf / scale.unsqueeze(-1)).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


@torch.library.custom_op("fastquant::quantize_per_token_int8", mutates_args=())
def _quantize_per_token_int8_op(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch_quantize_per_token_int8(x)


@_quantize_per_token_int8_op.register_fake
def _(x):
    return (x.new_empty(x.shape, dtype=torch.int8),
            x.new_empty(x.shape[:-1], dtype=torch.float32))


@functools.cache
def _cuda_kernel():
    """The fastest available CUDA implementation: ``(name, fn)``."""
    if backends.CUDA_EXT_AVAILABLE:
        from fastquant import _C

        return "cuda_ext", _C.quantize_per_token_int8
    if backends.TRITON_AVAILABLE:
        from fastquant.kernels.quant_int8 import triton_quantize_per_token_int8

        return "triton", triton_quantize_per_token_int8
    return "torch", torch_quantize_per_token_int8


@_quantize_per_token_int8_op.register_kernel("cuda")
def _(x):
    name, fn = _cuda_kernel()
    if name == "cuda_ext" and x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        # The contract reads x as float32, so converting first changes nothing.
        x = x.to(torch.float32)
    return fn(x.contiguous())


def check_float_rows(x, name: str) -> None:
    """The input contract of the per-token kernels: a floating-point tensor [..., N], N > 0."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{name}: expected shape [..., N] with N > 0, got {tuple(x.shape)}")


def quantize_per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (per-row, last dim) symmetric int8 quantization; see the reference.

    ``x``: any floating-point dtype, shape [..., N] with N > 0, any strides, any device.
    Returns ``(q, scale)`` with q int8 of x's shape and scale float32 of shape
    x.shape[:-1]; every backend returns the same bits as the reference.
    """
    check_float_rows(x, "quantize_per_token_int8")
    return torch.ops.fastquant.quantize_per_token_int8(x.contiguous())
