"""PyTorch reference twin of the fused fake-quant attention of reconstruction training
(``kernels/fq_attention.py`` computes the same forward and backward in Triton; this is its
tests' oracle), and the opt-in switch that lets ``QuantAttention`` use the kernel.

Contract. Inputs q, k, v [B, H, N, D] (any strides), for each head h the steps and zero
points of the uniform quantizers of Q and K (``s_q[h]``, ``z_q[h]``, ``s_k[h]``, ``z_k[h]``:
a per-tensor quantizer is one value repeated, its gradient the sum over the heads), V's
(``s_v``, ``z_v``, per tensor), all with codes 0..``qmax``; the softmax scale ``sm_scale``;
the log quantizer of the probabilities (``p_scale``, ``p_steps`` = 1 for log2 or 2 for
log-sqrt2, ``p_bits``); optional QDrop keep masks (1: keep the float value) for Q, K, V
([B, H, N, D]) and P ([B, H, N, N]). What ``QuantAttention`` computes in training with its
matmuls' quantizers wrapped by ``fastquant.recon.ActQuant`` (LSQ steps, QDrop):

    x~  = lerp((clamp(round_ste(x / s_x) + z_x, 0, qmax) - z_x) * s_x, x, keep_x)    X = Q, K, V
    S   = (Q~ @ K~^T) * sm_scale
    P   = softmax(S) over the keys
    P^  = LogQuantizer's level of P: p_scale 2^(-e / p_steps), e the code of the nearest level
          in value (0 for the zero code 2^p_bits - 1), computed on detached P
    P~  = lerp((P^ - P).detach() + P, P, keep_p)           straight-through, then QDrop
    O   = P~ @ V~                                          [B, H, N, D]

Gradients are autograd's through exactly these operations (``round_ste`` passes the
gradient straight through, ``clamp`` passes it where its input is inside [0, qmax], the
ends included). With g = dL/dx~ of an operand and u = x / s:

    dx = g                      where kept or 0 <= round(u) + z <= qmax, else 0
    ds = sum over the elements its step covers (one head, or the tensor) of
         g * (round(u) - u)      inside the range (d x~ / ds = code - z - u, code = round(u) + z)
         g * (0 - z)             clipped below (x~ = (0 - z) s does not depend on x)
         g * (qmax - z)          clipped above
         0                       where kept (lerp sends the whole gradient to x)
    dP = dL/dP~                 (the straight-through value and the lerp pass it whole)
    dS = P * (dP - rowsum(dP * P))     with P the float softmax (not P~)
    dQ~ = dS K~ sm_scale,  dK~ = dS^T Q~ sm_scale,  dV~ = P~^T dO

The kernel differs from this twin only in float rounding (fp32 sums in another order; its
own exp and log2), so a probability within rounding distance of a midpoint between two
levels may take the other level, which moves O and dV (not dq, dk: their gradient does not
go through P~); tests/test_kernels_fq_attention.py derives the bounds.

Integration. :func:`fused_attention_applies` says whether a ``QuantAttention`` call may use
the kernel (its matmuls' quantizers are ActQuant wrappers of the supported kinds, quantizing;
x is a float32 CUDA tensor; Triton is available; ``fq_linear.FUSED_RECON`` is on), and
:func:`fused_attention` then computes ``matmul_pv(softmax(matmul_qk(q, k^T) * scale), v)``
with it, drawing the QDrop masks as the wrappers would.
"""
from __future__ import annotations


import torch

from .attention import log_codes

__all__ = ["torch_fq_attention", "fake_quant_operand", "log_fake_quant", "fused_attention_applies",
           "fused_attention"]


def fake_quant_operand(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmax: int,
                       keep: torch.Tensor | None = None) -> torch.Tensor:
    """``ActQuant``'s output for a uniform quantizer with step ``s`` (LSQ) and QDrop mask ``keep``."""
    from ..quantizers import fake_quant_uniform

    xq = fake_quant_uniform(x, s, z, qmax)
    return xq if keep is None else torch.lerp(xq, x, keep.to(x.dtype))


def log_fake_quant(p: torch.Tensor, p_scale, p_steps: int, p_bits: int) -> torch.Tensor:
    """``LogQuantizer.dequantize(LogQuantizer.quantize(p))`` (the same float operations, in
    float32 whatever p's type, as the quantizer has them), in p's dtype; no gradient."""
    zero_code = (1 << p_bits) - 1
    scale = torch.as_tensor(p_scale, dtype=torch.float32, device=p.device).reshape(())
    e = log_codes(p.detach(), scale, p_steps, zero_code).float()
    val = scale * torch.exp2(-e / p_steps)
    return torch.where(e == zero_code, torch.zeros_like(val), val).to(p.dtype)


def torch_fq_attention(q, k, v, s_q, z_q, s_k, z_k, s_v, z_v, qmax: int, sm_scale: float, p_scale,
                       p_steps: int, p_bits: int, keep_q=None, keep_k=None, keep_p=None, keep_v=None):
    """The contract above. q, k, v [B, H, N, D]; s_q, z_q, s_k, z_k [H] (or one value);
    s_v, z_v, p_scale scalars (0-d or 1-element tensors, or floats); masks as in the contract
    (any dtype, 0 or 1). Differentiable in q, k, v and the steps. Returns [B, H, N, D]."""
    heads = q.shape[1]
    kw = dict(dtype=q.dtype, device=q.device)

    def per_head(x):  # one value broadcasts as the per-tensor quantizer's does
        t = (x if isinstance(x, torch.Tensor) else torch.tensor(x, **kw)).to(**kw)
        return t.reshape(()) if t.numel() == 1 else t.reshape(1, heads, 1, 1)

    def scalar(x):
        t = x if isinstance(x, torch.Tensor) else torch.tensor(x, **kw)
        return t.to(**kw).reshape(())

    qt = fake_quant_operand(q, per_head(s_q), per_head(z_q), qmax, keep_q)
    kt = fake_quant_operand(k, per_head(s_k), per_head(z_k), qmax, keep_k)
    vt = fake_quant_operand(v, scalar(s_v), scalar(z_v), qmax, keep_v)
    p = ((qt @ kt.transpose(-2, -1)) * sm_scale).softmax(dim=-1)
    pt = (log_fake_quant(p, p_scale, p_steps, p_bits) - p).detach() + p
    if keep_p is not None:
        pt = torch.lerp(pt, p, keep_p.to(p.dtype))
    return pt @ vt


# -- the opt-in switch of QuantAttention --------------------------------------------------------
# The switch is fastquant.ops.fq_linear.FUSED_RECON (FASTQUANT_FUSED_RECON=0 at import, or
# set it to False): it turns off the fused linear and attention ops together.


def _operands(attn):
    """(q, k, p, v wrappers) when ``attn``'s matmuls are quantized by ActQuant wrappers the
    kernel implements, else None: uniform Q and K with a learnable step per head or per
    tensor, a log quantizer on the probabilities, uniform V with one learnable step, all
    quantizing (mode "quant", not passed through in float), one qmax for Q, K and V."""
    from ..modules import QuantMatMul
    from ..quantizers import LogQuantizer, UniformQuantizer
    from ..recon.learnable import ActQuant

    qk, pv = getattr(attn, "matmul_qk", None), getattr(attn, "matmul_pv", None)
    if not (isinstance(qk, QuantMatMul) and isinstance(pv, QuantMatMul)):
        return None
    wrappers = (qk.a_quant, qk.b_quant, pv.a_quant, pv.b_quant)
    if not all(isinstance(w, ActQuant) and w.quantizer.mode == "quant" and not w.float_act for w in wrappers):
        return None
    aq, ak, ap, av = wrappers
    heads = attn.num_heads
    for w, per_head_ok in ((aq, True), (ak, True), (av, False)):
        q = w.quantizer
        if not isinstance(q, UniformQuantizer) or q.per_token or w.scale is None:
            return None
        shapes = {(), (1,)} | ({(1, heads, 1, 1)} if per_head_ok else set())
        if tuple(w.scale.shape) not in shapes or tuple(q.zero_point.shape) != tuple(w.scale.shape):
            return None
    if not (aq.quantizer.qmax == ak.quantizer.qmax == av.quantizer.qmax):
        return None
    if not isinstance(ap.quantizer, LogQuantizer):
        return None
    return wrappers


def fused_attention_applies(attn, x: torch.Tensor) -> bool:
    """Whether ``QuantAttention.forward`` (with no attention mask) computes its two matmuls
    and softmax with the fused kernel. ``x``: the attention's input, or its q (the forward
    passes q, whose dtype is the kernel's operands'); only its device and dtype are read.
    True when x is a float32 CUDA tensor, Triton is available, ``fq_linear.FUSED_RECON`` is
    on (``FASTQUANT_FUSED_RECON=0`` turns it off at import), the head dim is one the kernel takes, no attention dropout
    is active and the quantizers are of the supported kinds (``_operands``). Never true on
    the CPU."""
    from . import fq_linear  # one switch for both fused reconstruction ops

    if not x.is_cuda or x.dtype != torch.float32 or not fq_linear.FUSED_RECON:
        return False
    from ..kernels import TRITON_AVAILABLE

    if not TRITON_AVAILABLE or attn.head_dim not in (16, 32, 64, 128):
        return False
    if attn.training and getattr(attn.attn_drop, "p", 0.0) > 0:
        return False
    return _operands(attn) is not None


def fused_attention(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``attn.matmul_pv(softmax(attn.matmul_qk(q, k^T) * attn.scale), v)`` by the kernel
    (call only where :func:`fused_attention_applies`); [B, H, N, D].

    QDrop masks are drawn with ``keep_mask`` and each wrapper's ``drop_p`` and generator, in
    the reference path's order (Q, then K as K^T [B, H, D, N], then P, then V), each draw of
    the same size, so the generators advance exactly as there and the masks are the same
    elements. They are drawn as uint8 (``keep_mask`` of a uint8 tensor): the same random
    bytes, without the float masks. The steps pass through ``clamp_min(MIN_SCALE)`` as in
    ``ActQuant.quant``, so the gradients reach the wrappers' ``scale`` parameters."""
    from ..kernels.fq_attention import triton_fq_attention
    from ..recon.learnable import MIN_SCALE, keep_mask

    aq, ak, ap, av = _operands(attn)
    bsz, heads, n, d = q.shape

    def draw(w, shape):
        if w.drop_p <= 0:
            return None
        return keep_mask(torch.empty(shape, dtype=torch.uint8, device=q.device), w.drop_p, w.generator)

    keep_q = draw(aq, (bsz, heads, n, d))
    keep_k = draw(ak, (bsz, heads, d, n))
    keep_p = draw(ap, (bsz, heads, n, n))
    keep_v = draw(av, (bsz, heads, n, d))
    if keep_k is not None:
        keep_k = keep_k.transpose(-2, -1)
    lq = ap.quantizer
    return triton_fq_attention(
        q, k, v,
        aq.scale.clamp_min(MIN_SCALE).reshape(-1), aq.quantizer.zero_point.reshape(-1),
        ak.scale.clamp_min(MIN_SCALE).reshape(-1), ak.quantizer.zero_point.reshape(-1),
        av.scale.clamp_min(MIN_SCALE).reshape(-1), av.quantizer.zero_point.reshape(-1),
        aq.quantizer.qmax, attn.scale, lq.scale, lq.steps_per_octave, lq.bits,
        keep_q, keep_k, keep_p, keep_v)
