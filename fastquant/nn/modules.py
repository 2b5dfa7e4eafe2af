"""Quantized drop-in modules, swapped in for timm's by type.

Each module keeps the float weights and fake-quantizes weights and inputs through
its quantizers (``None`` leaves that operand in float). Attention modules subclass
timm's, adopt the original module's parameters and sub-modules, and keep its
forward signature, so timm's blocks call them unchanged.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._compat import import_timm
from ..ops import fq_attention as fq
from ..ops.fq_linear import fused_recon_linear
from ..ops.grid import grid_linear

timm = import_timm()
from timm.layers.attention import Attention, maybe_add_mask, resolve_self_attn_mask  # noqa: E402
from timm.models.swin_transformer import WindowAttention  # noqa: E402

__all__ = ["QuantLinear", "QuantConv2d", "QuantMatMul", "QuantAttention", "QuantWindowAttention", "Attention",
           "WindowAttention", "adopt"]


def _q(quantizer: Optional[nn.Module], x: torch.Tensor) -> torch.Tensor:
    return x if quantizer is None else quantizer(x)


class QuantLinear(nn.Module):
    """y = Qa(x) Qw(W)^T + b (with ``input_div`` d: Qa(x / d) Qw(W)^T + b, W holding W diag(d)).

    With a grid dtype set (``set_grid_dtype``: reconstruction sets it while it trains),
    quantizers that can give their output as an integer grid times a scale (``grid(x) ->
    (g, s)``, the learnable wrappers of ``fastquant.quant``) have the product computed on the
    grids in that dtype and the scales applied after it (``fastquant.ops.grid_linear``). On
    CUDA tensors, a layer wrapped by ``ActQuant`` (per-tensor step) and ``AdaRoundWeight``
    runs the fused op instead (``fastquant.ops.fq_linear.fused_recon_linear``: fp16 grids,
    quantization in the GEMM's prologue, its own backward).
    """

    grid_dtype: Optional[torch.dtype] = None

    def __init__(self, linear: nn.Linear, weight_quant: nn.Module, input_quant: Optional[nn.Module]):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight_quant = weight_quant
        self.input_quant = input_quant
        # Per input channel divisors (smoothing, ``fastquant.calib``): the layer computes
        # Qa(x / d) Qw(W')^T + b with W' = W diag(d); None: no division.
        self.register_buffer("input_div", None)

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the input quantizer sees: x, divided by ``input_div`` when the layer has one."""
        return x if self.input_div is None else x / self.input_div

    def set_grid_dtype(self, dtype: Optional[torch.dtype]) -> "QuantLinear":
        """Take the product on integer grids in ``dtype`` when the quantizers allow it (None: off)."""
        self.grid_dtype = dtype
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prepare_input(x)
        if self.grid_dtype is not None:
            y = self._grid_forward(x)
            if y is not None:
                return y
        return F.linear(_q(self.input_quant, x), self.weight_quant(self.weight), self.bias)

    def _grid_forward(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        if x.is_cuda:  # the fused fake-quant linear op, when the layer's quantizers allow it
            y = fused_recon_linear(self, x)
            if y is not None:
                return y
        if self.input_quant is None:
            return None
        gx, gw = self.input_quant.grid(x), self.weight_quant.grid(self.weight)
        if gx is None or gw is None:
            return None
        return grid_linear(gx[0], gx[1], gw[0], gw[1], self.bias, self.grid_dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class QuantConv2d(nn.Module):
    """A Conv2d (the patch embedding) with quantized weight and input."""

    def __init__(self, conv: nn.Conv2d, weight_quant: nn.Module, input_quant: Optional[nn.Module]):
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        if conv.padding_mode != "zeros":
            raise NotImplementedError(f"QuantConv2d supports padding_mode='zeros', got {conv.padding_mode!r}")
        self.weight = conv.weight
        self.bias = conv.bias
        self.weight_quant = weight_quant
        self.input_quant = input_quant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(_q(self.input_quant, x), self.weight_quant(self.weight), self.bias,
                        self.stride, self.padding, self.dilation, self.groups)


class QuantMatMul(nn.Module):
    """a @ b with both operands quantized."""

    def __init__(self, a_quant: Optional[nn.Module], b_quant: Optional[nn.Module]):
        super().__init__()
        self.a_quant = a_quant
        self.b_quant = b_quant

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return _q(self.a_quant, a) @ _q(self.b_quant, b)


def adopt(cls, module: nn.Module):
    """A ``cls`` instance sharing ``module``'s parameters, buffers, children and attributes
    (how quantized attention subclasses take over timm's modules, and deployed modules the
    fake-quant ones, without copying or patching them)."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    new.__dict__.update(module.__dict__)
    return new


def _with_matmuls(cls, attn: nn.Module, qk: QuantMatMul, pv: QuantMatMul):
    """``attn`` as a ``cls`` whose two matmuls are quantized (timm's fused SDPA path off)."""
    new = adopt(cls, attn)
    new.fused_attn = False
    new.matmul_qk = qk
    new.matmul_pv = pv
    return new


class QuantAttention(Attention):
    """timm ``Attention`` with quantized matmuls: Q and K (per head) for Q K^T, then the
    softmax probabilities (log quantizer) and V for P V. Same forward signature."""

    @classmethod
    def from_float(cls, attn: Attention, qk: QuantMatMul, pv: QuantMatMul) -> "QuantAttention":
        return _with_matmuls(cls, attn, qk, pv)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        B, N, C = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if x.is_cuda and attn_mask is None and not is_causal and fq.fused_attention_applies(self, q):
            x = fq.fused_attention(self, q, k, v)  # reconstruction's fused op
        else:
            attn = self.matmul_qk(q, k.transpose(-2, -1)) * self.scale
            attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal))
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = self.matmul_pv(attn, v)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class QuantWindowAttention(WindowAttention):
    """Swin's window attention (relative position bias, shifted-window mask) with
    quantized matmuls, as in ``QuantAttention``. Same forward signature."""

    @classmethod
    def from_float(cls, attn: WindowAttention, qk: QuantMatMul, pv: QuantMatMul) -> "QuantWindowAttention":
        return _with_matmuls(cls, attn, qk, pv)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B_, N, C = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = self.matmul_qk(q, k.transpose(-2, -1)) * self.scale
        attn = attn + self._get_rel_pos_bias()
        if mask is not None:
            num_win = mask.shape[0]
            attn = attn.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = self.matmul_pv(attn, v)
        x = x.transpose(1, 2).reshape(B_, N, -1)
        return self.proj_drop(self.proj(x))
