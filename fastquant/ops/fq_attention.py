"""The fused fake-quant attention of reconstruction training, forward and backward, as ops:
its contract, its PyTorch twin (the tests' oracle), the autograd Function, and the seam
that lets ``QuantAttention`` use it (``kernels/fq_attention.py`` computes the same in Triton).

Contract. Inputs q, k, v [B, H, N, D] (any strides), for each head h the steps and zero
points of the uniform quantizers of Q and K (``s_q[h]``, ``z_q[h]``, ``s_k[h]``, ``z_k[h]``:
a per-tensor quantizer is one value repeated, its gradient the sum over the heads), V's
(``s_v``, ``z_v``, per tensor), all with codes 0..``qmax``; the softmax scale ``sm_scale``;
the log quantizer of the probabilities (``p_scale``, ``p_steps`` = 1 for log2 or 2 for
log-sqrt2, ``p_bits``); optional QDrop keep masks (1: keep the float value) for Q, K, V
([B, H, N, D]) and P ([B, H, N, N]). What ``QuantAttention`` computes in training with its
matmuls' quantizers wrapped by ``fastquant.quant.ActQuant`` (LSQ steps, QDrop):

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

Ops. ``fq_attention_fwd`` and ``fq_attention_bwd`` (``fastquant.ops.op``) have the
backends ``torch`` (the twin: the forward without autograd, the backward by autograd
through it, recomputed) and ``triton``; :class:`FqAttentionFunction` ties them together and
:func:`fq_attention` (checks, then the Function) is the public function.

Integration. :func:`fused_attention_applies` says whether a ``QuantAttention`` call may use
the fused op (its matmuls' quantizers are ActQuant wrappers of the supported kinds,
quantizing; x is a float32 CUDA tensor; a fused backend is registered for CUDA;
``fastquant.settings.fused_recon()`` is on), and :func:`fused_attention` then computes
``matmul_pv(softmax(matmul_qk(q, k^T) * scale), v)`` with it, drawing the QDrop masks as
the wrappers would.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import settings
from ..quant.functional import fake_quant_uniform, log_codes
from ..quant.learnable import MIN_SCALE, ActQuant, keep_mask
from .attention import check_qkv
from .op import declare

__all__ = ["FQ_ATTENTION_FWD", "FQ_ATTENTION_BWD", "FqAttentionFunction", "fq_attention", "torch_fq_attention",
           "torch_fq_attention_forward", "torch_fq_attention_backward", "fake_quant_operand", "log_fake_quant",
           "fused_attention_applies", "fused_attention"]


def fake_quant_operand(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmax: int,
                       keep: torch.Tensor | None = None) -> torch.Tensor:
    """``ActQuant``'s output for a uniform quantizer with step ``s`` (LSQ) and QDrop mask ``keep``."""
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


# -- the ops ----------------------------------------------------------------------------------
# Both take the operands as fq_attention prepares them: q, k, v float32 [B, H, N, D]; s_q, z_q,
# s_k, z_k float32 [H]; s_v, z_v, p_scale float32 [1]; QDrop masks uint8, contiguous, or None.
# The forward returns (O, F, m, l): O [B, H, N, D] (a view of a [B, N, H, D] tensor from the
# kernel), F = P V~ (the float probabilities' output, which softmax's backward needs) and
# the softmax's row maxima m and sums l = sum_j exp(S_j - m) [B, H, N]; the backward
# (dq, dk, dv, ds_q [H], ds_k [H], ds_v [1]).


def _quantized_operands(q, k, v, s_q, z_q, s_k, z_k, s_v, z_v, qmax, keep_q, keep_k, keep_v):
    heads = q.shape[1]

    def per_head(t):
        return t.reshape(()) if t.numel() == 1 else t.reshape(1, heads, 1, 1)

    return (fake_quant_operand(q, per_head(s_q), per_head(z_q), qmax, keep_q),
            fake_quant_operand(k, per_head(s_k), per_head(z_k), qmax, keep_k),
            fake_quant_operand(v, s_v.reshape(()), z_v.reshape(()), qmax, keep_v))


def torch_fq_attention_forward(q, k, v, s_q, z_q, s_k, z_k, s_v, z_v, p_scale, keep_q, keep_k, keep_p, keep_v,
                               qmax: int, sm_scale: float, p_steps: int, p_bits: int):
    """(O, F, m, l) of the twin (no autograd): the ops' ``torch`` forward."""
    with torch.no_grad():
        qt, kt, vt = _quantized_operands(q, k, v, s_q, z_q, s_k, z_k, s_v, z_v, qmax, keep_q, keep_k, keep_v)
        scores = (qt @ kt.transpose(-2, -1)) * sm_scale
        m = scores.amax(-1)
        l = torch.exp(scores - m.unsqueeze(-1)).sum(-1)
        p = scores.softmax(dim=-1)
        pt = (log_fake_quant(p, p_scale, p_steps, p_bits) - p) + p  # the twin's straight-through value
        if keep_p is not None:
            pt = torch.lerp(pt, p, keep_p.to(p.dtype))
        return pt @ vt, p @ vt, m, l


def _lsq_backward(g, x, s, z, qmax: int, keep, dims):
    """(dx, ds) of ``lerp(fake_quant(x, s, z), x, keep)`` for the output gradient g: dx = g
    where kept or inside the range, else 0; ds sums, over ``dims``, g (round(u) - u) inside,
    g (code - z) clipped, 0 kept (u = x / s)."""
    u = x / s
    r = torch.round(u) + z
    inside = (r >= 0) & (r <= qmax)
    per_elem = torch.where(inside, torch.round(u) - u, torch.clamp(r, 0, qmax) - z)
    dx = torch.where(inside, g, torch.zeros_like(g))
    if keep is not None:
        kept = keep != 0
        dx = torch.where(kept, g, dx)
        per_elem = torch.where(kept, torch.zeros_like(per_elem), per_elem)
    return dx, (g * per_elem).sum(dims)


def torch_fq_attention_backward(do, q, k, v, f, m, l, s_q, z_q, s_k, z_k, s_v, z_v, p_scale, keep_q, keep_k, keep_p,
                                keep_v, qmax: int, sm_scale: float, p_steps: int, p_bits: int):
    """(dq, dk, dv, ds_q [H], ds_k [H], ds_v [1]) of the contract's formulas written out
    (module docstring), recomputing the forward (F, m and l are not needed): the ops'
    ``torch`` backward. Equal to autograd through the twin up to float32 rounding."""
    heads = q.shape[1]

    def per_head(t):
        return t.reshape(1, heads, 1, 1) if t.numel() > 1 else t.reshape(())

    sq, zq, sk, zk = per_head(s_q), per_head(z_q), per_head(s_k), per_head(z_k)
    sv, zv = s_v.reshape(()), z_v.reshape(())
    qt = fake_quant_operand(q, sq, zq, qmax, keep_q)
    kt = fake_quant_operand(k, sk, zk, qmax, keep_k)
    vt = fake_quant_operand(v, sv, zv, qmax, keep_v)
    p = ((qt @ kt.transpose(-2, -1)) * sm_scale).softmax(dim=-1)
    pt = (log_fake_quant(p, p_scale, p_steps, p_bits) - p) + p
    if keep_p is not None:
        pt = torch.lerp(pt, p, keep_p.to(p.dtype))
    dvt = pt.transpose(-2, -1) @ do
    dp = do @ vt.transpose(-2, -1)  # the log quantizer's straight-through value and QDrop's lerp pass it whole
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    dqt = (ds @ kt) * sm_scale
    dkt = (ds.transpose(-2, -1) @ qt) * sm_scale
    head_dims = (0, 2, 3)
    dq, ds_q = _lsq_backward(dqt, q, sq, zq, qmax, keep_q, head_dims)
    dk, ds_k = _lsq_backward(dkt, k, sk, zk, qmax, keep_k, head_dims)
    dv, ds_v = _lsq_backward(dvt, v, sv, zv, qmax, keep_v, (0, 1, 2, 3))
    def like(grad, step):  # a step shared by the heads gets the sum of theirs
        return grad.reshape(step.shape) if grad.numel() == step.numel() else grad.sum().reshape(step.shape)

    return dq, dk, dv, like(ds_q, s_q), like(ds_k, s_k), ds_v.reshape(s_v.shape)


def _lib_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s_q: torch.Tensor, z_q: torch.Tensor,
             s_k: torch.Tensor, z_k: torch.Tensor, s_v: torch.Tensor, z_v: torch.Tensor, p_scale: torch.Tensor,
             keep_q: Optional[torch.Tensor], keep_k: Optional[torch.Tensor], keep_p: Optional[torch.Tensor],
             keep_v: Optional[torch.Tensor], qmax: int, sm_scale: float, p_steps: int,
             p_bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    out, f, m, l = FQ_ATTENTION_FWD(q, k, v, s_q, z_q, s_k, z_k, s_v, z_v, p_scale, keep_q, keep_k, keep_p, keep_v,
                                    qmax, sm_scale, p_steps, p_bits)
    return out.contiguous(), f, m, l


def _fake_fwd(q, k, v, s_q, z_q, s_k, z_k, s_v, z_v, p_scale, keep_q, keep_k, keep_p, keep_v, qmax, sm_scale, p_steps,
              p_bits):
    b, h, n, d = q.shape
    return (q.new_empty((b, h, n, d)), q.new_empty((b, h, n, d)), q.new_empty((b, h, n)), q.new_empty((b, h, n)))


FQ_ATTENTION_FWD = declare("fq_attention_fwd", torch_fq_attention_forward, _fake_fwd, _lib_fwd)


def _lib_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, f: torch.Tensor, m: torch.Tensor,
             l: torch.Tensor, s_q: torch.Tensor, z_q: torch.Tensor, s_k: torch.Tensor, z_k: torch.Tensor,
             s_v: torch.Tensor, z_v: torch.Tensor, p_scale: torch.Tensor, keep_q: Optional[torch.Tensor],
             keep_k: Optional[torch.Tensor], keep_p: Optional[torch.Tensor], keep_v: Optional[torch.Tensor],
             qmax: int, sm_scale: float, p_steps: int,
             p_bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return FQ_ATTENTION_BWD(do, q, k, v, f, m, l, s_q, z_q, s_k, z_k, s_v, z_v, p_scale, keep_q, keep_k, keep_p,
                            keep_v, qmax, sm_scale, p_steps, p_bits)


def _fake_bwd(do, q, k, v, f, m, l, s_q, z_q, s_k, z_k, s_v, z_v, p_scale, keep_q, keep_k, keep_p, keep_v, qmax,
              sm_scale, p_steps, p_bits):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(s_q),
            torch.empty_like(s_k), torch.empty_like(s_v))


FQ_ATTENTION_BWD = declare("fq_attention_bwd", torch_fq_attention_backward, _fake_bwd, _lib_bwd)


class FqAttentionFunction(torch.autograd.Function):
    """O of the contract with the backend's backward (None: the tensors' preferred backend;
    ``options``: keyword options of that backend, such as its tiles). Saves q, k, v, the
    masks, F and m, l; gradients for q, k, v, s_q, s_k, s_v; none for zero points, p_scale
    and masks."""

    @staticmethod
    def forward(ctx, q, k, v, s_q, z_q, s_k, z_k, s_v, z_v, p_scale, keep_q, keep_k, keep_p, keep_v, meta, backend,
                options):
        qmax, sm_scale, p_steps, p_bits = meta
        out, f, m, l = FQ_ATTENTION_FWD(q, k, v, s_q, z_q, s_k, z_k, s_v, z_v, p_scale, keep_q, keep_k, keep_p,
                                        keep_v, qmax, sm_scale, p_steps, p_bits, backend=backend, **options)
        ctx.save_for_backward(q, k, v, f, m, l, s_q, z_q, s_k, z_k, s_v, z_v, p_scale, keep_q, keep_k, keep_p, keep_v)
        ctx.meta, ctx.backend, ctx.options = meta, backend, options
        return out

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        grads = FQ_ATTENTION_BWD(grad_out, *saved, *ctx.meta, backend=ctx.backend, **ctx.options)
        dq, dk, dv, ds_q, ds_k, ds_v = grads
        need = ctx.needs_input_grad
        return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None,
                ds_q if need[3] else None, None, ds_k if need[5] else None, None,
                ds_v if need[7] else None, None, None, None, None, None, None, None, None, None)


def _prepare(q, k, v, s_q, z_q, s_k, z_k, s_v, z_v, p_scale, qmax, p_steps, p_bits, sm_scale, keep_q, keep_k, keep_p,
             keep_v):
    """Checked operands in the ops' form (see the comment above the ops)."""
    name = "fq_attention"
    bsz, heads, n, d = check_qkv(name, q, k, v, (torch.float32,), "be float32 (the reconstruction loop's type)")
    if isinstance(qmax, bool) or not isinstance(qmax, int) or not 1 <= qmax <= 255:
        raise ValueError(f"{name}: qmax must be an integer 1..255 (2^bits - 1), got {qmax!r}")
    if p_steps not in (1, 2):
        raise ValueError(f"{name}: p_steps must be 1 (log2) or 2 (log-sqrt2), got {p_steps}")
    if isinstance(p_bits, bool) or not isinstance(p_bits, int) or not 2 <= p_bits <= 8:
        raise ValueError(f"{name}: p_bits must be 2..8, got {p_bits!r}")
    if not math.isfinite(sm_scale):
        raise ValueError(f"{name}: sm_scale must be finite, got {sm_scale}")
    dev = q.device

    def per_head(x, label):
        t = torch.as_tensor(x, dtype=torch.float32, device=dev) if not isinstance(x, torch.Tensor) else x
        if t.numel() == 1:
            t = t.reshape(1).expand(heads)
        if t.dim() != 1 or t.numel() != heads:
            raise ValueError(f"{name}: {label} must hold one value per head, shape [{heads}] (or one value), "
                             f"got {tuple(t.shape)}")
        return t.to(device=dev, dtype=torch.float32).contiguous()

    def scalar(x, label):
        t = torch.as_tensor(x, dtype=torch.float32, device=dev) if not isinstance(x, torch.Tensor) else x
        if t.numel() != 1:
            raise ValueError(f"{name}: {label} must be a scalar (a float or a 1-element tensor), "
                             f"got shape {tuple(t.shape)}")
        return t.to(device=dev, dtype=torch.float32).reshape(1)

    def mask(m, label, shape):
        if m is None:
            return None
        if not isinstance(m, torch.Tensor) or tuple(m.shape) != shape:
            got = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"{name}: {label} must be a tensor of shape {list(shape)}, got {got}")
        if m.device != dev:
            raise ValueError(f"{name}: {label} must be on {dev}, got {m.device}")
        return (m != 0).view(torch.uint8).contiguous()

    params = [per_head(x, label) for x, label in ((s_q, "s_q"), (z_q, "z_q"), (s_k, "s_k"), (z_k, "z_k"))]
    params += [scalar(s_v, "s_v"), scalar(z_v, "z_v"), scalar(p_scale, "p_scale")]
    masks = [mask(keep_q, "keep_q", (bsz, heads, n, d)), mask(keep_k, "keep_k", (bsz, heads, n, d)),
             mask(keep_p, "keep_p", (bsz, heads, n, n)), mask(keep_v, "keep_v", (bsz, heads, n, d))]
    return params, masks


def fq_attention(q, k, v, s_q, z_q, s_k, z_k, s_v, z_v, qmax: int, sm_scale: float, p_scale, p_steps: int,
                 p_bits: int, keep_q=None, keep_k=None, keep_p=None, keep_v=None, *, backend: Optional[str] = None,
                 **options) -> torch.Tensor:
    """O [B, H, N, D] of the contract (``torch_fq_attention``'s arguments), differentiable in
    q, k, v, s_q, s_k and s_v.

    ``q``, ``k``, ``v``: float32 [B, H, N, D], any strides, D one of 16, 32, 64, 128.
    ``s_q``, ``z_q``, ``s_k``, ``z_k``: one value per head ([H] tensors; a 1-element tensor
    or a float is repeated, and its gradient summed); ``s_v``, ``z_v``, ``p_scale``: floats
    or 1-element tensors. Steps are used as given (positive: LSQ clamps them before).
    ``qmax`` 1..255; ``p_steps`` 1 (log2) or 2 (log-sqrt2); ``p_bits`` 2..8. ``keep_*``:
    QDrop masks (nonzero: keep the float value), [B, H, N, D] for q, k, v and [B, H, N, N]
    for the probabilities, any dtype and strides; kept as uint8 for the backward.
    ``backend``: None (the tensors' preferred one: ``triton`` on CUDA, else ``torch``) or a
    backend name; ``options`` go to its kernels (``triton``: ``blocks=(BLOCK_M, BLOCK_N)``).
    """
    params, masks = _prepare(q, k, v, s_q, z_q, s_k, z_k, s_v, z_v, p_scale, qmax, p_steps, p_bits, sm_scale,
                             keep_q, keep_k, keep_p, keep_v)
    if q.shape[2] == 0 or q.shape[0] * q.shape[1] == 0:
        return torch.zeros_like(q)
    return FqAttentionFunction.apply(q, k, v, *params, *masks, (qmax, float(sm_scale), p_steps, p_bits), backend,
                                     options)


# -- the seam in QuantAttention ----------------------------------------------------------------
def _operands(attn):
    """(q, k, p, v wrappers) when ``attn``'s matmuls are quantized by ActQuant wrappers the
    kernel implements, else None: uniform Q and K with a learnable step per head or per
    tensor, a log quantizer on the probabilities, uniform V with one learnable step, all
    quantizing (mode "quant", not passed through in float), one qmax for Q, K and V."""
    qk, pv = getattr(attn, "matmul_qk", None), getattr(attn, "matmul_pv", None)
    if qk is None or pv is None:
        return None
    wrappers = (getattr(qk, "a_quant", None), getattr(qk, "b_quant", None), getattr(pv, "a_quant", None),
                getattr(pv, "b_quant", None))
    if not all(isinstance(w, ActQuant) and w.quantizing for w in wrappers):
        return None
    aq, ak, ap, av = wrappers
    heads = attn.num_heads
    for w, per_head_ok in ((aq, True), (ak, True), (av, False)):
        q = w.quantizer
        if q.kind != "uniform" or q.per_token or w.scale is None:
            return None
        shapes = {(), (1,)} | ({(1, heads, 1, 1)} if per_head_ok else set())
        if tuple(w.scale.shape) not in shapes or tuple(q.zero_point.shape) != tuple(w.scale.shape):
            return None
    if not (aq.qmax == ak.qmax == av.qmax):
        return None
    if ap.kind != "log":
        return None
    return wrappers


def fused_attention_applies(attn, x: torch.Tensor) -> bool:
    """Whether ``QuantAttention.forward`` (with no attention mask) computes its two matmuls
    and softmax with the fused op. ``x``: the attention's input, or its q (only its device
    and dtype are read). True when x is a float32 CUDA tensor, a fused backend is registered
    for CUDA, ``fastquant.settings.fused_recon()`` is on (``FASTQUANT_FUSED_RECON=0`` turns
    it off), the head dim is one the kernel takes, no attention dropout is active and the
    quantizers are of the supported kinds (``_operands``). Never true on the CPU."""
    if not x.is_cuda or x.dtype != torch.float32 or not settings.fused_recon():
        return False
    if FQ_ATTENTION_FWD.resolve("cuda") == "torch" or attn.head_dim not in (16, 32, 64, 128):
        return False
    if attn.training and getattr(attn.attn_drop, "p", 0.0) > 0:
        return False
    return _operands(attn) is not None


def fused_attention(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    backend: Optional[str] = None) -> torch.Tensor:
    """``attn.matmul_pv(softmax(attn.matmul_qk(q, k^T) * attn.scale), v)`` by the fused op
    (call only where :func:`fused_attention_applies`); [B, H, N, D]. ``backend``: the op's
    (None: the tensors' preferred one).

    QDrop masks are drawn with ``keep_mask`` and each wrapper's ``drop_p`` and generator, in
    the reference path's order (Q, then K as K^T [B, H, D, N], then P, then V), each draw of
    the same size, so the generators advance exactly as there and the masks are the same
    elements. They are drawn as uint8 (``keep_mask`` of a uint8 tensor): the same random
    bytes, without the float masks. The steps pass through ``clamp_min(MIN_SCALE)`` as in
    ``ActQuant.quant``, so the gradients reach the wrappers' ``scale`` parameters."""
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
    return fq_attention(
        q, k, v,
        aq.scale.clamp_min(MIN_SCALE).reshape(-1), aq.quantizer.zero_point.reshape(-1),
        ak.scale.clamp_min(MIN_SCALE).reshape(-1), ak.quantizer.zero_point.reshape(-1),
        av.scale.clamp_min(MIN_SCALE).reshape(-1), av.quantizer.zero_point.reshape(-1),
        aq.qmax, attn.scale, lq.scale, lq.steps_per_octave, lq.bits,
        keep_q, keep_k, keep_p, keep_v, backend=backend)
