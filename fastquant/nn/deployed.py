"""Deployed modules: linear layers on integer codes, and attention that runs as one kernel.

:class:`Int8Linear` holds a layer's weight as integer codes and computes ``y = x~ W~^T + b``
with an int8 x int8 -> int32 matrix product and a float epilogue, instead of float math on
dequantized values. The algebra, for activation codes ``q_x`` (scale ``s_x``, zero point
``z_x``) and weight codes ``q_w`` (per output channel ``s_w``, ``z_w``), with offsets
``o = 2^(bits-1)`` that move both into int8 (``a = q_x - o_x``, ``b = q_w - o_w``):

    sum_k (q_x - z_x)(q_w - z_w) = sum_k a b  +  c_w sum_k a  +  c_x (sum_k b + K c_w),
    c_x = o_x - z_x,  c_w = o_w - z_w,

so ``y = s_x s_w [acc + c_w A + c_x B'] + b`` with ``acc`` the int32 product, ``A`` the
row sums of ``a`` and ``B' = sum_k b + K c_w`` fixed at conversion. For a calibrated
(per-tensor) input step everything but ``acc`` and ``A`` is folded into two per-channel
vectors; per-token (dynamic) inputs compute ``s_x``, ``z_x`` per row at run time.
``Int8Linear.pack(layer)`` makes one from a fake-quant :class:`~fastquant.nn.QuantLinear`;
its forward is one call of the op ``int8_linear`` on the layer's ``backend``
(``fastquant.ops.op``: ``cpu``, the fused kernels of ``fastquant._C_cpu``; ``triton``;
``cuda``; ``torch``, the PyTorch twin).

:class:`FusedQuantAttention` runs a :class:`~fastquant.nn.QuantAttention`'s quantized
Q K^T, softmax, log-quantized probabilities and P V as one op (``quant_attention``).
:class:`KernelFakeQuant` and :class:`KernelLogQuant` are the attention operands'
quantizers of a model deployed on the CPU, fake-quantizing in one pass of the CPU
extension (the same values as the quantizers they replace).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .. import backends
from ..errors import FastquantError
from ..ops.attention import QUANT_ATTENTION
from ..ops.fake_quant import FAKE_QUANT_LOG, FAKE_QUANT_UNIFORM
from ..ops.int8_linear import INT8_LINEAR, PACK_WEIGHT_INT4, torch_int8_linear
from ..quant import LogQuantizer, Quantizer, UniformQuantizer
from .modules import QuantAttention, QuantLinear, adopt

__all__ = ["Int8Linear", "FusedQuantAttention", "KernelFakeQuant", "KernelLogQuant", "deployed_quantizer"]


def _offset(bits: int) -> int:
    return 1 << (bits - 1)


class Int8Linear(nn.Module):
    """A linear layer on integer codes: int8 x int8 -> int32, then a float epilogue.

    Buffers: ``weight_t`` [K, N] int8 (``q_w - o_w``, transposed for the product),
    ``w_bits`` codes' width, ``w_scale`` and ``w_corr`` (``c_w``) [N], ``b_sum``
    (``B'``) [N]; for a calibrated input step ``col_scale = s_x s_w`` and ``col_add =
    c_x B' + bias / (s_x s_w)`` [N]; for a per-token input the bias and ``s_x``/``z_x``
    per row; ``input_div`` [K] when the fake-quant layer divides its input per channel
    (smoothing), applied before quantization.
    """

    def __init__(self, in_features: int, out_features: int, w_bits: int, a_bits: int, per_token: bool,
                 has_bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.w_bits, self.a_bits, self.per_token = w_bits, a_bits, per_token
        self.register_buffer("weight_t", torch.zeros(in_features, out_features, dtype=torch.int8))
        self.register_buffer("w_scale", torch.ones(out_features))
        self.register_buffer("w_corr", torch.zeros(out_features))
        self.register_buffer("b_sum", torch.zeros(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if has_bias else None)
        self.register_buffer("x_scale", torch.ones(()))
        self.register_buffer("x_zero", torch.zeros(()))
        self.register_buffer("col_scale", torch.ones(out_features))
        self.register_buffer("col_add", torch.zeros(out_features))
        # The backend of the op int8_linear (fastquant.ops.op); set_backend changes it.
        self.backend = "torch"
        # backend "triton" or "cuda" with weights of at most 4 bits: the codes two per byte,
        # which the GEMM unpacks (fastquant.ops.int8_linear.pack_weight_int4); set by
        # set_backend. A buffer so that .to() moves it; not saved (fastquant.save stores the codes).
        self.register_buffer("weight_packed", None, persistent=False)
        # The fake-quant layer's per-channel input divisors (QuantLinear.input_div), applied
        # before the input is quantized; None: none.
        self.register_buffer("input_div", None)

    # Scales, corrections and bias stay float32 when the model is cast (``.half()``): the
    # kernels' epilogues compute in float32, and b_sum or col_add would not survive fp16.
    _FLOAT32_BUFFERS = ("w_scale", "w_corr", "b_sum", "bias", "x_scale", "x_zero", "col_scale", "col_add",
                        "input_div")

    def _apply(self, fn, recurse=True):
        kept = {n: self._buffers[n] for n in self._FLOAT32_BUFFERS if self._buffers.get(n) is not None}
        super()._apply(fn, recurse)
        for name, buf in kept.items():
            device = fn(buf.new_empty(0)).device  # where the cast sends tensors, without the dtype
            self._buffers[name] = buf.to(device=device, dtype=torch.float32)
        return self

    def set_backend(self, backend: str) -> "Int8Linear":
        """Run on ``backend`` (FastquantError naming the reason when it is not there). The
        GPU GEMMs read 4-bit weights packed two per byte."""
        INT8_LINEAR.implementation(backend)
        self.backend = backend
        self.weight_packed = None
        if backend in ("triton", "cuda") and self.w_bits <= 4:
            self.weight_packed = PACK_WEIGHT_INT4(self.weight_t)
        return self

    def extra_repr(self) -> str:
        inp = "per-token" if self.per_token else "per-tensor"
        return (f"in_features={self.in_features}, out_features={self.out_features}, W{self.w_bits}A{self.a_bits}, "
                f"{inp} input, bias={self.bias is not None}")

    @staticmethod
    def why_not(layer: nn.Module) -> str:
        """Why ``layer`` cannot run as an Int8Linear ('' if it can)."""
        if not isinstance(layer, QuantLinear):
            return f"it is a {type(layer).__name__}, not a QuantLinear"
        wq, iq = layer.weight_quant, layer.input_quant
        if not isinstance(wq, Quantizer) or wq.kind != "uniform" or wq.per_token:
            return "its weight quantizer is not a per-channel uniform quantizer"
        if wq.mode != "quant":
            return "its weight quantizer is not calibrated"
        if not isinstance(iq, Quantizer) or iq.kind != "uniform":
            return "its input is not uniformly quantized"
        if iq.mode != "quant":
            return "its input quantizer is not calibrated"
        if not iq.per_token and iq.scale.numel() != 1:
            return "its input has one step per channel (the integer product needs one per tensor or per token)"
        if wq.bits > 8 or iq.bits > 8:
            return "it has more than 8 bits"
        return ""

    @classmethod
    @torch.no_grad()
    def pack(cls, layer: QuantLinear) -> "Int8Linear":
        """The deployed layer of a calibrated fake-quant ``layer``: its weight codes, steps and
        corrections (backend ``torch``; ``set_backend`` picks another)."""
        reason = cls.why_not(layer)
        if reason:
            raise FastquantError(f"this layer cannot run on integers: {reason}")
        wq, iq = layer.weight_quant, layer.input_quant
        new = cls(layer.in_features, layer.out_features, wq.bits, iq.bits, iq.per_token, layer.bias is not None)
        codes = wq.quantize(layer.weight.detach()).float()  # [N, K] in 0 .. 2^bits - 1
        b = codes - _offset(wq.bits)
        s_w = wq.scale.reshape(-1).float().expand(layer.out_features).clone()
        c_w = _offset(wq.bits) - wq.zero_point.reshape(-1).float().expand(layer.out_features)
        new.weight_t.copy_(b.t().to(torch.int8))
        new.w_scale.copy_(s_w)
        new.w_corr.copy_(c_w)
        new.b_sum.copy_(b.sum(1) + layer.in_features * c_w)
        if layer.bias is not None:
            new.bias.copy_(layer.bias.detach().float())
        if not iq.per_token:
            s_x, z_x = iq.scale.reshape(()).float(), iq.zero_point.reshape(()).float()
            new.x_scale.copy_(s_x)
            new.x_zero.copy_(z_x)
            new.col_scale.copy_(s_x * s_w)
            add = (_offset(iq.bits) - z_x) * new.b_sum
            if layer.bias is not None:
                add = add + layer.bias.detach().float() / (s_x * s_w)
            new.col_add.copy_(add)
        if layer.input_div is not None:
            new.input_div = layer.input_div.detach().float().clone()
        return new.to(layer.weight.device)

    @torch.no_grad()
    def quant_state(self) -> dict:
        """The fake-quant layer's state this layer was made from, under QuantLinear's
        state-dict names (``weight_int``: the weight codes): what ``fastquant.save`` stores."""
        o_w = _offset(self.w_bits)
        state = {
            "weight_int": (self.weight_t.t().float() + o_w).to(torch.uint8),
            "weight_quant.scale": self.w_scale.reshape(-1, 1).clone(),
            "weight_quant.zero_point": (o_w - self.w_corr).reshape(-1, 1),
            "input_quant.scale": self.x_scale.clone(),
            "input_quant.zero_point": self.x_zero.clone(),
        }
        if self.bias is not None:
            state["bias"] = self.bias.clone()
        if self.input_div is not None:
            state["input_div"] = self.input_div.clone()
        return state

    def _args(self, x2: torch.Tensor, weight: torch.Tensor) -> tuple:
        return (x2, weight, self.a_bits, self.per_token, self.x_scale, self.x_zero, self.w_scale, self.w_corr,
                self.b_sum, self.bias, self.col_scale, self.col_add)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.input_div is not None:
            x2 = (x2 / self.input_div).to(x.dtype)
        backend = self.backend if INT8_LINEAR.supports(self.backend, x2, self.weight_t) else "torch"
        packed = backend in ("triton", "cuda") and self.weight_packed is not None
        out = INT8_LINEAR(*self._args(x2, self.weight_packed if packed else self.weight_t), backend=backend)
        return out.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def reference(self, x2: torch.Tensor) -> torch.Tensor:
        """The PyTorch twin on ``x2`` [rows, in_features] (float32 out): the oracle every
        backend is tested against."""
        if self.input_div is not None:
            x2 = (x2 / self.input_div).to(x2.dtype)
        return torch_int8_linear(*self._args(x2, self.weight_t))


class KernelFakeQuant(UniformQuantizer):
    """A calibrated :class:`UniformQuantizer` of a deployed model's attention (one step per
    tensor or per head) whose forward runs the one-pass CPU kernel when it can: float32 CPU
    input, no gradient wanted. Same buffers and state-dict names as the quantizer it
    replaces; the result equals ``UniformQuantizer.forward`` exactly (same float operations)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "quant":
            args = (x, self.scale, self.zero_point, self._inner(x), self.bits)
            if FAKE_QUANT_UNIFORM.supports("cpu", *args):
                return FAKE_QUANT_UNIFORM(*args, backend="cpu")
        return super().forward(x)

    def _inner(self, x: torch.Tensor) -> int:
        """Elements per channel run of contiguous x, or 0 if the steps do not fit the kernel."""
        if self.scale.numel() == 1:
            return x.numel()
        dims = [d for d, n in enumerate(self.scale.shape) if n > 1]
        if self.scale.dim() != x.dim() or len(dims) != 1 or x.shape[dims[0]] != self.scale.shape[dims[0]]:
            return 0
        return math.prod(x.shape[dims[0] + 1:])


class KernelLogQuant(LogQuantizer):
    """A calibrated :class:`LogQuantizer` (the softmax probabilities) of a deployed model
    whose forward runs the one-pass CPU kernel when it can. Same buffers as the quantizer
    it replaces; the kernel picks the same level (see ``csrc/cpu_int8.cpp``) and returns
    ``(xq - x) + x`` as ``LogQuantizer.forward`` does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "quant" and FAKE_QUANT_LOG.supports("cpu", x, None, None, None):
            return FAKE_QUANT_LOG(x, float(self.scale), self.steps_per_octave, self.levels(), backend="cpu")
        return super().forward(x)


class FusedQuantAttention(QuantAttention):
    """A deployed :class:`~fastquant.nn.QuantAttention` whose quantized Q K^T, softmax,
    quantized probabilities and P V run as one op, ``quant_attention``, on ``fused_backend``
    (``cpu``: csrc/cpu_int8.cpp, log or uniform softmax codes, head dims up to 256;
    ``cuda``: csrc/quant_attention.cu, head dim 64 and up to 256 tokens;
    ``triton``: kernels/attention.py, head dims 16 to 128, powers of two, any length;
    ``torch``: the PyTorch twin, for tests). Inputs the backend does not take (a mask, other
    shapes) run the fake-quant forward. Same parameters and state-dict names as the module
    it replaces; the quantizers' values are read once, at ``fuse``, onto the device the model
    is on then (convert the model where it will run)."""

    fused_backend = "torch"

    @staticmethod
    def why_not(attn: nn.Module, backend: str = "cpu") -> str:
        """Why the quantized attention ``attn`` cannot run as one fused op on ``backend`` ('' if
        it can): the kernels take plain timm attention whose Q and K are uniformly quantized
        per tensor or per head, the probabilities by a log quantizer (on the CPU also by a
        uniform one with zero point 0) and V per tensor, all calibrated, with one bit width
        for Q, K and V."""
        if type(attn) is not QuantAttention:
            return f"{type(attn).__name__} is not plain ViT attention"
        qq, kq = attn.matmul_qk.a_quant, attn.matmul_qk.b_quant
        pq, vq = attn.matmul_pv.a_quant, attn.matmul_pv.b_quant
        heads = attn.num_heads
        for name, u in (("Q", qq), ("K", kq), ("V", vq)):
            if not isinstance(u, Quantizer) or u.kind != "uniform" or u.mode != "quant" or u.per_token:
                return f"its {name} is not quantized by a calibrated uniform quantizer with a fixed step"
        if qq.scale.numel() not in (1, heads) or kq.scale.numel() not in (1, heads) or vq.scale.numel() != 1:
            return "its Q and K steps are not per tensor or per head, or V's not per tensor"
        uniform_p = (isinstance(pq, Quantizer) and pq.kind == "uniform" and pq.mode == "quant" and not pq.per_token
                     and pq.scale.numel() == 1 and float(pq.zero_point) == 0.0)
        if uniform_p and backend in ("triton", "cuda"):
            return f"its softmax probabilities are uniformly quantized (the {backend} kernel takes log quantizers)"
        if not uniform_p and (not isinstance(pq, Quantizer) or pq.kind != "log" or pq.mode != "quant"):
            return "its softmax probabilities are not log-quantized (nor uniformly, per tensor, with zero point 0)"
        if not qq.bits == kq.bits == vq.bits:
            return "Q, K and V have different bit widths"
        if not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)):
            return "it normalises Q and K"
        return ""

    def fuse(self, backend: str) -> "FusedQuantAttention":
        QUANT_ATTENTION.implementation(backend)
        qq, kq = self.matmul_qk.a_quant, self.matmul_qk.b_quant
        pq, vq = self.matmul_pv.a_quant, self.matmul_pv.b_quant
        heads = self.num_heads
        self.fused_backend = backend
        per_head = [u.scale.reshape(-1).float().expand(heads).contiguous() for u in (qq, kq)]
        zeros = [u.zero_point.reshape(-1).float().expand(heads).contiguous() for u in (qq, kq)]
        p_steps = pq.steps_per_octave if pq.kind == "log" else 0  # 0: uniform codes (quant_attention's contract)
        self._op_args = (per_head[0], zeros[0], per_head[1], zeros[1], float(vq.scale), float(vq.zero_point),
                         qq.bits, float(self.scale), float(pq.scale), p_steps, pq.bits)
        return self

    def _op_takes(self, x: torch.Tensor, q: torch.Tensor, attn_mask, is_causal: bool) -> bool:
        if attn_mask is not None or is_causal or getattr(self, "gate", None) is not None:
            return False
        if self.fused_backend == "torch":
            return True
        if self.fused_backend == "cpu":
            return (x.device.type == "cpu" and x.dtype == torch.float32
                    and not (torch.is_grad_enabled() and x.requires_grad) and QUANT_ATTENTION.supports("cpu", q))
        if not (x.is_cuda or (self.fused_backend == "triton" and backends.triton_interpret())):
            return False
        return QUANT_ATTENTION.supports(self.fused_backend, q)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        shape_q = torch.empty((0, self.num_heads, N, self.head_dim), device="meta")  # q's shape, for the check
        if not self._op_takes(x, shape_q, attn_mask, is_causal):
            return super().forward(x, attn_mask, is_causal)
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = QUANT_ATTENTION(q, k, v, *self._op_args, backend=self.fused_backend)
        out = self.norm(out.reshape(B, N, self.attn_dim).to(x.dtype))
        return self.proj_drop(self.proj(out))


def deployed_quantizer(q: nn.Module) -> nn.Module:
    """The quantizer a deployed model's attention keeps, with one-pass CPU kernels where it
    has one (a calibrated uniform quantizer with fixed steps, a log quantizer); others as
    they are."""
    if getattr(q, "mode", None) != "quant":
        return q
    if type(q) is UniformQuantizer and not q.per_token:
        return adopt(KernelFakeQuant, q)
    if type(q) is LogQuantizer:
        return adopt(KernelLogQuant, q)
    return q
