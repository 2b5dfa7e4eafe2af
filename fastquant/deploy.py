"""Deployment: quantized models whose linear layers run real integer GEMMs.

``convert(qmodel)`` replaces every :class:`~fastquant.modules.QuantLinear` of a
calibrated (or reconstructed) fake-quant model by an :class:`Int8Linear` that holds its
weight as integer codes and computes ``y = x~ W~^T + b`` with an int8 x int8 -> int32
matrix product (``torch._int_mm``: VNNI on x86 CPUs) and a float epilogue, instead of
float math on dequantized values. The algebra, for activation codes ``q_x`` (scale
``s_x``, zero point ``z_x``) and weight codes ``q_w`` (per output channel ``s_w``,
``z_w``), with offsets ``o = 2^(bits-1)`` that move both into int8 (``a = q_x - o_x``,
``b = q_w - o_w``):

    sum_k (q_x - z_x)(q_w - z_w) = sum_k a b  +  c_w sum_k a  +  c_x (sum_k b + K c_w),
    c_x = o_x - z_x,  c_w = o_w - z_w,

so ``y = s_x s_w [acc + c_w A + c_x B'] + b`` with ``acc`` the int32 product, ``A`` the
row sums of ``a`` and ``B' = sum_k b + K c_w`` fixed at conversion. For a calibrated
(per-tensor) input step everything but ``acc`` and ``A`` is folded into two per-channel
vectors; per-token (dynamic) inputs compute ``s_x``, ``z_x`` per row at run time.

On the CPU the whole layer (quantize the input and take its row sums, the int8 GEMM, the
epilogue) runs in one call of the compiled extension ``fastquant._C_cpu``
(``csrc/cpu_int8.cpp``: three passes instead of about ten); ``Int8Linear.reference`` is
the PyTorch twin it is tested against and the path used when the extension is not built
(``fastquant.backends.CPU_EXT_REASON``).

Layers the integer path cannot express (a per-channel input step, weights or inputs
wider than 8 bits, a non-uniform quantizer) keep their fake-quant module; ``convert``
reports them. Attention matmuls, the patch embedding and the normalisations stay as in
the fake-quant model (float math; on the CPU the attention operands' fake quantization,
uniform per tensor or per head and the softmax's log quantizers, runs in one pass each
of the CPU extension: ``KernelFakeQuant``, ``KernelLogQuant``), so the converted model's
outputs equal the fake-quant model's up to float rounding (the integer sums are exact;
tests bound the difference).
"""
from __future__ import annotations

import copy
import math
from typing import Optional

import torch
from torch import nn

from . import backends
from .errors import FastquantError
from .modules import QuantAttention, QuantLinear, QuantMatMul, _adopt
from .ops.attention import torch_quant_attention
from .ops.int8_linear import pack_int4_t, torch_quantize_asym
from .quantizers import LogQuantizer, UniformQuantizer

BACKENDS = ("auto", "cpu", "triton", "cuda")


def _offset(bits: int) -> int:
    return 1 << (bits - 1)


def why_not_int8(layer: QuantLinear) -> str:
    """Why ``layer`` cannot run as an Int8Linear ('' if it can)."""
    wq, iq = layer.weight_quant, layer.input_quant
    if not isinstance(wq, UniformQuantizer) or wq.per_token:
        return "its weight quantizer is not a per-channel uniform quantizer"
    if wq.mode != "quant":
        return "its weight quantizer is not calibrated"
    if not isinstance(iq, UniformQuantizer):
        return "its input is not uniformly quantized"
    if iq.mode != "quant":
        return "its input quantizer is not calibrated"
    if not iq.per_token and iq.scale.numel() != 1:
        return "its input has one step per channel (the integer product needs one per tensor or per token)"
    if wq.bits > 8 or iq.bits > 8:
        return "it has more than 8 bits"
    return ""


class Int8Linear(nn.Module):
    """A linear layer on integer codes: int8 x int8 -> int32, then a float epilogue.

    Buffers: ``weight_t`` [K, N] int8 (``q_w - o_w``, transposed for the product),
    ``w_bits`` codes' width, ``w_scale`` and ``w_corr`` (``c_w``) [N], ``b_sum``
    (``B'``) [N]; for a calibrated input step ``col_scale = s_x s_w`` and ``col_add =
    c_x B' + bias / (s_x s_w)`` [N]; for a per-token input the bias and ``s_x``/``z_x``
    per row.
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
        # "cpu": the fused CPU kernels (fastquant._C_cpu) when they are built; "triton":
        # the Triton kernels (kernels/int8_linear.py); "cuda": the CUDA C++ kernels
        # (csrc/int8_linear.cu, fastquant._C). use_kernels=False forces the PyTorch
        # reference path.
        self.backend = "cpu"
        self.use_kernels = True
        # backend "triton" or "cuda" with weights of at most 4 bits: the codes two per byte,
        # which the GEMM unpacks (fastquant.ops.int8_linear.pack_int4_t); set by set_backend.
        # A buffer so that .to() moves it; not saved (fastquant.save stores the codes).
        self.register_buffer("weight_packed", None, persistent=False)

    # Scales, corrections and bias stay float32 when the model is cast (``.half()``): the
    # kernels' epilogues compute in float32, and b_sum or col_add would not survive fp16.
    _FLOAT32_BUFFERS = ("w_scale", "w_corr", "b_sum", "bias", "x_scale", "x_zero", "col_scale", "col_add")

    def _apply(self, fn, recurse=True):
        kept = {n: self._buffers[n] for n in self._FLOAT32_BUFFERS if self._buffers.get(n) is not None}
        super()._apply(fn, recurse)
        for name, buf in kept.items():
            device = fn(buf.new_empty(0)).device  # where the cast sends tensors, without the dtype
            self._buffers[name] = buf.to(device=device, dtype=torch.float32)
        return self

    def set_backend(self, backend: str) -> "Int8Linear":
        self.backend = backend
        self.weight_packed = None
        if backend in ("triton", "cuda") and self.w_bits <= 4:
            if backend == "cuda" and self.weight_t.is_cuda and backends.CUDA_EXT_AVAILABLE:
                from fastquant import _C

                self.weight_packed = _C.pack_int4(self.weight_t.contiguous())
            else:
                self.weight_packed = pack_int4_t(self.weight_t)
        return self

    def extra_repr(self) -> str:
        inp = "per-token" if self.per_token else "per-tensor"
        return (f"in_features={self.in_features}, out_features={self.out_features}, W{self.w_bits}A{self.a_bits}, "
                f"{inp} input, bias={self.bias is not None}")

    @classmethod
    @torch.no_grad()
    def from_quant_linear(cls, layer: QuantLinear) -> "Int8Linear":
        reason = why_not_int8(layer)
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
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.backend == "triton" and self.use_kernels:
            return self._triton(x2).reshape(*shape[:-1], self.out_features)
        if self.backend == "cuda" and self.use_kernels and x2.is_cuda and x2.shape[0] > 0:
            return self._cuda(x2).reshape(*shape[:-1], self.out_features)
        if self.use_kernels and backends.CPU_EXT_AVAILABLE and x2.device.type == "cpu" and x2.shape[0] > 0:
            out = self._fused(x2.float().contiguous())
        else:
            out = self.reference(x2)
        return out.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def _triton(self, x2: torch.Tensor) -> torch.Tensor:
        from fastquant.kernels.int8_linear import triton_int8_gemm, triton_quantize_asym

        if self.per_token:
            a, rowsum, s_x, c_x = triton_quantize_asym(x2, self.a_bits)
        else:
            a, rowsum, s_x, c_x = triton_quantize_asym(x2, self.a_bits, self.x_scale, self.x_zero)
        out_dtype = x2.dtype if x2.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
        weight = self.weight_packed if self.weight_packed is not None else self.weight_t
        y = triton_int8_gemm(a, weight, rowsum, s_x, c_x, self.w_scale, self.w_corr, self.b_sum, self.bias,
                             out_dtype=out_dtype)
        return y.to(x2.dtype)

    def _cuda(self, x2: torch.Tensor) -> torch.Tensor:
        from fastquant import _C

        x2 = x2 if x2.dtype in (torch.float16, torch.bfloat16, torch.float32) else x2.float()
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        if self.per_token:
            a, rowsum, s_x, c_x = _C.quantize_asym(x2, self.a_bits)
        else:
            a, rowsum, s_x, c_x = _C.quantize_asym(x2, self.a_bits, self.x_scale.reshape(1), self.x_zero.reshape(1))
        weight = self.weight_packed if self.weight_packed is not None else self.weight_t
        return _C.int8_gemm(a, weight, rowsum, s_x, c_x, self.w_scale, self.w_corr, self.b_sum, self.bias, x2.dtype)

    def _fused(self, x2: torch.Tensor) -> torch.Tensor:
        from fastquant import _C_cpu

        if self.per_token:
            return _C_cpu.int8_linear_dynamic(x2, self.weight_t, self.a_bits, self.w_corr, self.b_sum, self.w_scale,
                                              self.bias)[0]
        return _C_cpu.int8_linear_static(x2, self.weight_t, float(self.x_scale), float(self.x_zero), self.a_bits,
                                         self.w_corr, self.col_add, self.col_scale)

    def reference(self, x2: torch.Tensor) -> torch.Tensor:
        """The PyTorch path for ``x2`` [rows, in_features] (float32 out): the oracle the
        fused CPU kernels are tested against, and the path on other devices."""
        if self.per_token:
            a8, row, s_x, c_x = torch_quantize_asym(x2, self.a_bits)
        else:
            a8, row, _, _ = torch_quantize_asym(x2, self.a_bits, self.x_scale, self.x_zero)
        acc = torch._int_mm(a8, self.weight_t).float()
        acc.addr_(row.float(), self.w_corr)  # exact row sums: integers below 2^24 in magnitude
        if self.per_token:
            acc.add_(c_x[:, None] * self.b_sum).mul_(s_x[:, None] * self.w_scale)
            if self.bias is not None:
                acc.add_(self.bias)
        else:
            acc.add_(self.col_add).mul_(self.col_scale)
        return acc


def _kernels_apply(x: torch.Tensor) -> bool:
    return (backends.CPU_EXT_AVAILABLE and x.device.type == "cpu" and x.dtype == torch.float32
            and not (torch.is_grad_enabled() and x.requires_grad))


class KernelFakeQuant(UniformQuantizer):
    """A calibrated :class:`UniformQuantizer` of a deployed model's attention (one step per
    tensor or per head) whose forward runs the one-pass CPU kernel when it can: float32 CPU
    input, no gradient wanted. Same buffers and state-dict names as the quantizer it
    replaces; the result equals ``UniformQuantizer.forward`` exactly (same float operations)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "quant" and _kernels_apply(x):
            inner = self._inner(x)
            if inner:
                from fastquant import _C_cpu

                return _C_cpu.fake_quant_uniform(x, self.scale.reshape(-1).float().contiguous(),
                                                 self.zero_point.reshape(-1).float().contiguous(), inner, self.bits)
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
        if self.mode == "quant" and _kernels_apply(x):
            from fastquant import _C_cpu

            levels = self.dequantize(torch.arange(self.zero_code + 1, device=x.device)).float().contiguous()
            return _C_cpu.fake_quant_log(x, float(self.scale), self.steps_per_octave, levels)
        return super().forward(x)


def why_not_fused(attn: nn.Module) -> str:
    """Why the quantized attention ``attn`` cannot run as one fused kernel ('' if it can):
    the kernels take plain timm attention whose Q and K are uniformly quantized per tensor
    or per head, the probabilities by a log quantizer and V per tensor, all calibrated,
    with one bit width for Q, K and V."""
    if type(attn) is not QuantAttention:
        return f"{type(attn).__name__} is not plain ViT attention"
    qq, kq = attn.matmul_qk.a_quant, attn.matmul_qk.b_quant
    pq, vq = attn.matmul_pv.a_quant, attn.matmul_pv.b_quant
    heads = attn.num_heads
    for name, u in (("Q", qq), ("K", kq), ("V", vq)):
        if type(u) is not UniformQuantizer or u.mode != "quant" or u.per_token:
            return f"its {name} is not quantized by a calibrated uniform quantizer with a fixed step"
    if qq.scale.numel() not in (1, heads) or kq.scale.numel() not in (1, heads) or vq.scale.numel() != 1:
        return "its Q and K steps are not per tensor or per head, or V's not per tensor"
    if type(pq) is not LogQuantizer or pq.mode != "quant":
        return "its softmax probabilities are not log-quantized"
    if not qq.bits == kq.bits == vq.bits:
        return "Q, K and V have different bit widths"
    if not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)):
        return "it normalises Q and K"
    return ""


class FusedQuantAttention(QuantAttention):
    """A deployed :class:`~fastquant.modules.QuantAttention` whose quantized Q K^T, softmax,
    log-quantized probabilities and P V run as one kernel (``fused_backend``: ``cuda``,
    csrc/quant_attention.cu, head dim 64 and up to 256 tokens; ``triton``,
    kernels/attention.py, head dims 16 to 128 (powers of two), any length; ``torch``: the
    PyTorch twin ``torch_quant_attention``, for tests). Inputs the kernel does not take (a
    mask, other shapes) run the fake-quant forward. Same parameters and state-dict names
    as the module it replaces; the quantizers' values are read once, at conversion, onto
    the device the model is on then (convert the model where it will run)."""

    fused_backend = "torch"

    def fuse(self, backend: str) -> "FusedQuantAttention":
        qq, kq = self.matmul_qk.a_quant, self.matmul_qk.b_quant
        pq, vq = self.matmul_pv.a_quant, self.matmul_pv.b_quant
        heads = self.num_heads
        self.fused_backend = backend
        per_head = [u.scale.reshape(-1).float().expand(heads).contiguous() for u in (qq, kq)]
        zeros = [u.zero_point.reshape(-1).float().expand(heads).contiguous() for u in (qq, kq)]
        self._kernel_args = dict(
            s_q=per_head[0], z_q=zeros[0], s_k=per_head[1], z_k=zeros[1],
            s_v=float(vq.scale), z_v=float(vq.zero_point), a_bits=qq.bits, sm_scale=float(self.scale),
            levels=pq.dequantize(torch.arange(pq.zero_code + 1, device=pq.scale.device)).float().contiguous(),
            p_scale=float(pq.scale), p_steps=pq.steps_per_octave, p_bits=pq.bits)
        return self

    def _kernel_takes(self, x: torch.Tensor, attn_mask, is_causal: bool) -> bool:
        if attn_mask is not None or is_causal or getattr(self, "gate", None) is not None:
            return False
        if self.fused_backend == "torch":
            return True
        if not (x.is_cuda or (self.fused_backend == "triton" and backends.triton_interpret())):
            return False
        n = x.shape[1]
        if self.fused_backend == "cuda":
            return self.head_dim == 64 and n <= 256
        return self.head_dim in (16, 32, 64, 128)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        if not self._kernel_takes(x, attn_mask, is_causal):
            return super().forward(x, attn_mask, is_causal)
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        f = self._kernel_args
        if self.fused_backend == "cuda":
            from fastquant import _C

            if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
                q, k, v = q.float(), k.float(), v.float()
            out = _C.quant_attention(q, k, v, f["s_q"], f["z_q"], f["s_k"], f["z_k"], f["s_v"], f["z_v"],
                                     f["a_bits"], f["sm_scale"], f["levels"], f["p_scale"], f["p_steps"],
                                     f["p_bits"], q.dtype)
        elif self.fused_backend == "triton":
            from fastquant.kernels.attention import triton_quant_attention

            out = triton_quant_attention(q, k, v, f["s_q"], f["z_q"], f["s_k"], f["z_k"], f["s_v"], f["z_v"],
                                         f["a_bits"], f["sm_scale"], f["p_scale"], f["p_steps"], f["p_bits"])
        else:
            out = torch_quant_attention(q, k, v, f["s_q"], f["z_q"], f["s_k"], f["z_k"], f["s_v"], f["z_v"],
                                        f["a_bits"], f["sm_scale"], f["p_scale"], f["p_steps"], f["p_bits"])
        out = self.norm(out.reshape(B, N, self.attn_dim).to(x.dtype))
        return self.proj_drop(self.proj(out))


def _kernel_quantizer(q: nn.Module):
    if getattr(q, "mode", None) != "quant":
        return q
    if type(q) is UniformQuantizer and not q.per_token:
        return _adopt(KernelFakeQuant, q)
    if type(q) is LogQuantizer:
        return _adopt(KernelLogQuant, q)
    return q


def convert(qmodel: nn.Module, backend: str = "auto", *, inplace: bool = False) -> nn.Module:
    """A deployable copy of ``qmodel`` (from ``fastquant.quantize`` or ``fastquant.load``)
    whose quantized linear layers run on integers (see the module docstring).

    ``backend``: ``cpu`` (a model on the CPU: ``torch._int_mm``, VNNI on x86, inside the
    fused kernels of ``fastquant._C_cpu``), ``triton`` (a model on a CUDA device: the Triton
    quantize and int8 GEMM kernels of ``kernels/int8_linear.py``), ``cuda`` (a model on a
    CUDA device: the CUDA C++ kernels of ``csrc/``, extension ``fastquant._C``), or
    ``auto`` (``cpu`` on the CPU; on CUDA, ``cuda`` when the extension is built, else
    ``triton``). With ``triton`` and ``cuda`` the attention blocks whose quantizers allow
    it (``why_not_fused``) become :class:`FusedQuantAttention`: one kernel from Q, K, V
    to the attention output. The result records ``fastquant_deploy`` = {backend,
    converted layer names, the others with the reason, fused attention names, the
    others with the reason}.
    """
    if backend not in BACKENDS:
        raise FastquantError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if getattr(qmodel, "fastquant_config", None) is None:
        raise FastquantError("convert() needs a model returned by fastquant.quantize or fastquant.load")
    param = next(qmodel.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    if backend == "auto":
        backend = "cpu" if device.type == "cpu" else ("cuda" if backends.CUDA_EXT_AVAILABLE else "triton")
    if backend == "cuda":
        if device.type != "cuda":
            raise FastquantError(f"backend 'cuda' needs the model on a CUDA device, it is on {device}")
        if not backends.CUDA_EXT_AVAILABLE:
            raise FastquantError(f"backend 'cuda' is unavailable: {backends.CUDA_EXT_REASON}")
    elif backend == "triton":
        if device.type != "cuda":
            raise FastquantError(f"backend 'triton' needs the model on a CUDA device, it is on {device}")
        if not backends.TRITON_AVAILABLE:
            raise FastquantError(f"backend 'triton' is unavailable: {backends.TRITON_REASON}")
    elif device.type != "cpu":
        raise FastquantError(f"backend 'cpu' needs the model on the CPU, it is on {device}")
    model = qmodel if inplace else copy.deepcopy(qmodel)
    converted, kept = [], {}
    for name, layer in list(model.named_modules()):
        if not isinstance(layer, QuantLinear):
            continue
        reason = why_not_int8(layer)
        if reason:
            kept[name] = reason
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, Int8Linear.from_quant_linear(layer).set_backend(backend))
        converted.append(name)
    fused, unfused = [], {}
    if backend in ("triton", "cuda"):
        fused, unfused = _fuse_attention(model, backend)
    for m in model.modules():  # the other attention matmuls stay fake-quantized (one pass each on the CPU)
        if isinstance(m, QuantMatMul):
            m.a_quant, m.b_quant = _kernel_quantizer(m.a_quant), _kernel_quantizer(m.b_quant)
    if not converted:
        raise FastquantError("no layer of this model can run on integers: "
                             + "; ".join(f"{n}: {r}" for n, r in list(kept.items())[:3]))
    model.fastquant_deploy = {"backend": backend, "converted": converted, "kept": kept,
                              "fused_attention": fused, "unfused_attention": unfused}
    return model.eval()


def _fuse_attention(model: nn.Module, backend: str) -> tuple[list[str], dict[str, str]]:
    """Turn every fusable QuantAttention of ``model`` into a FusedQuantAttention (in place)."""
    fused, unfused = [], {}
    for name, m in list(model.named_modules()):
        if not isinstance(m, QuantAttention):
            continue
        reason = why_not_fused(m)
        if reason:
            unfused[name] = reason
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, _adopt(FusedQuantAttention, m).fuse(backend))
        fused.append(name)
    return fused, unfused
