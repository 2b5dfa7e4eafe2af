"""Per-token symmetric int8 quantization.

The op ``fastquant::quantize_per_token_int8(Tensor x) -> (Tensor q, Tensor scale)`` is
declared once here (``fastquant.ops.op``), with a fake implementation so torch.compile
can trace it. Backends: ``torch`` (``torch_quantize_per_token_int8``, the reference and the
tests' oracle), ``triton`` (``kernels/quant_int8.py``), ``cuda`` (``csrc/quant_int8.cu``);
all return the same bits.

Call ``quantize_per_token_int8`` (it checks its input, then calls the op), or
``torch.ops.fastquant.quantize_per_token_int8`` inside code that is already checked.
"""
import torch

from .op import declare

__all__ = ["QUANTIZE_PER_TOKEN_INT8", "quantize_per_token_int8", "torch_quantize_per_token_int8", "check_float_rows"]

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


def _library_quantize_per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return QUANTIZE_PER_TOKEN_INT8(x)


def _fake(x):
    return (x.new_empty(x.shape, dtype=torch.int8),
            x.new_empty(x.shape[:-1], dtype=torch.float32))


QUANTIZE_PER_TOKEN_INT8 = declare("quantize_per_token_int8", torch_quantize_per_token_int8, _fake,
                                  _library_quantize_per_token_int8)


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
