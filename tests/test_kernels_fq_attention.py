"""Fused fake-quant attention of reconstruction training: the twin against the real modules,
and the Triton kernels (forward and backward) against the twin.

Without a GPU the kernels run in Triton's CPU interpreter, in one child process started with
TRITON_INTERPRET=1 (tests/_interp.py); each case is reported as its own test. Cases use large
tiles so that each runs a handful of program instances.

Tolerances. Q~, K~ and V~ are bit-identical on both sides (the same fp32 division, round half
to even and product), so the kernel and the twin differ only through fp32 rounding: the sums
of the three products (in another order), exp, log2 and the softmax's row sum. Two rules:

1. dq, dk, ds_q, ds_k do not depend on P~ (the log quantizer and QDrop's lerp pass dP
   through whole, and softmax's backward uses the float P), so they are continuous in the
   rounding and take flash-attention's rule against a float64 evaluation of the twin (same
   inputs, same integer codes: inputs lying within 1e-3 of a rounding tie x / s = n + 1/2
   are moved off it, so that float64 and float32 round them alike; exact ties stay exact):
   ``max |kernel - twin64| <= 2 max |twin32 - twin64| + 2^-20 max |twin64|`` (8 ulps of the
   largest value). Where the twin is exact (twin32 == twin64: with N = 1 the softmax is
   constant and all four are exactly 0, dS = P (dP - dP P) cancelling exactly), the rule
   has nothing to scale and the kernel may differ by one ulp of M, the largest sum of the
   magnitudes of the gradient's terms (``|dS| <= P (|dO| |V~|^T + rowsum(P |dO| |V~|^T))``
   times |K~| or |Q~|, and times the LSQ factors for the steps): the kernel takes
   rowsum(dP P) as dO . (P V~), another rounding of the same sum, so its dS is a residue.
   ds_q and ds_k always get that ulp of M as well: each is one sum over a whole head of
   terms that cancel (M reaches 10^5 times the result), taken in another order than the
   twin's, so how close the twin's own order happens to land is no yardstick (seen: a
   twin error of 4e-5 and a kernel error of 1.1e-4 on a case with M = 6.7e5).
2. O, dv and ds_v go through P~: a probability within rounding distance of the midpoint of
   two log levels (or of the zero code's threshold) may take the other level on one side.
   Bounds derived per element, from the twin's fp32 intermediates:
   - S: each side's fp32 dot is within D 2^-24 of the exact sum of |Q~||K~| terms, so
     ``dS = (D + 2) 2^-23 (|Q~| |K~|^T) sm_scale`` bounds their difference (2: the scaling);
   - log P moves by at most ``dS_ij + max_j dS_ij`` (the row's log-sum-exp moves by at most
     its largest dS) plus ``2^-23 (|S - m| + N + 8) + 2^-20`` (the subtraction of the row
     maximum, the row sum of N terms, exp's last bits on a CPU; 2^-20 for a GPU's
     approximate exp2 and log2), so ``w = -p_steps log2(P / p_scale)`` moves by
     ``band = p_steps log2(e) dlogP``: only probabilities whose w lies within ``band`` of a
     decision point may flip, each by its level gap ``p_scale |L_c - L_c+1|`` (or
     ``p_scale L_Z-1`` at the zero threshold); kept ones (QDrop) never flip;
   - unflipped P~ differ by at most ``2^-22 max(P^, P)`` (the straight-through value
     ``(P^ - P) + P``, two roundings on each side) and kept ones by ``P expm1(dlogP)``;
   - sums: an fp32 sum of n terms in any order is within n 2^-24 of the exact sum of the
     magnitudes on each side, ``(N + 4) 2^-23`` for both; the steps' gradients are sums over
     a whole head or tensor, computed on both sides by trees (numpy's pairwise sum in the
     interpreter's tl.sum, torch's cascade sum, the per-program shares), within
     ``(ceil(log2 n) + 4) 2^-23`` of the sum of the magnitudes of the terms ``g (code - z)``
     and ``g u`` (autograd sums them separately).
   "tight" is the bound without flips, "allowed" with them: every element must be within
   "allowed", and all but a handful within "tight" (only flipped probabilities' rows or
   keys may exceed it); ds_v must be within its tight bound unless O or dv show a flip.
"""
import math

import pytest
import torch
from _interp import run_interpreted  # tests/_interp.py (the tests folder is on sys.path)
from _marks import needs_gpu_with  # tests/_marks.py

from fastquant.ops.fq_attention import fake_quant_operand, fq_attention, log_fake_quant, torch_fq_attention
from fastquant.quant import log_codes, range_to_qparams

needs_gpu = needs_gpu_with("needs a CUDA GPU (the kernels run in the interpreter here; this checks compiled "
                           "GPU numerics at ViT-B scale)")

# name -> (B, H, N, D, a_bits, p_steps, p_bits, p_scale, gain, masks, blocks)
# gain scales q and k (per head, times 1, 1.5, 2, ...): larger gains give peakier softmaxes,
# whose probabilities reach the small levels and the zero code. masks: which operands have
# QDrop masks ("qkvp": all). blocks None: the wrapper's (interpreter: one tile up to 128).
CASES = {
    "n197_d64_a8_log2_p4_qdrop": (1, 2, 197, 64, 8, 1, 4, 1.0, 1.5, "qkvp", None),
    "n197_d64_a4_sqrt2_p6": (1, 2, 197, 64, 4, 2, 6, 0.8, 2.0, "", None),
    "n65_d64_a4_log2_p8_qdrop_b2_3x2_tiles": (2, 2, 65, 64, 4, 1, 8, 1.0, 2.0, "qkvp", (32, 64)),
    "n65_d32_a8_sqrt2_p4_p_mask_only": (1, 3, 65, 32, 8, 2, 4, 0.9, 1.5, "p", None),
    "n17_d64_a4_sqrt2_p8_qdrop_peaky": (2, 3, 17, 64, 4, 2, 8, 1.0, 5.0, "qkvp", None),
    "n17_d32_a8_log2_p5_qk_masks": (2, 2, 17, 32, 8, 1, 5, 0.7, 2.0, "qk", None),
    "n1_d64_a8_log2_p4_qdrop": (2, 2, 1, 64, 8, 1, 4, 1.0, 1.0, "qkvp", None),
    "n33_d128_a6_sqrt2_p6_qdrop": (1, 2, 33, 128, 6, 2, 6, 1.0, 1.5, "qkvp", None),
}
# Data on a grid of eighths with steps 0.25, so that many x / s are exact ties n + 1/2 (round
# half to even decides them) and, with 4 bits and zero points 7..9, many clip at both ends.
TIES_CASE = "ties_n40_d64_a4_log2_p4_qdrop"
CASE_NAMES = list(CASES) + [TIES_CASE]
DROP_P = 0.3
TIE_MARGIN = 1e-3  # inputs this close to a rounding tie (in steps) are moved by 0.01 steps


def _nudge_off_ties(x, s):
    """x with the elements whose x / s lies within TIE_MARGIN of n + 1/2 moved by 0.01 s."""
    u = x.double() / s.double()
    near = ((u - torch.floor(u) - 0.5).abs() < TIE_MARGIN)
    return torch.where(near, x + 0.01 * s, x)


def _masks(kinds, shape_qkv, shape_p, gen):
    def draw(shape):
        return (torch.rand(shape, generator=gen) < DROP_P).to(torch.uint8)

    return {f"keep_{c}": draw(shape_p if c == "p" else shape_qkv) if c in kinds else None for c in "qkpv"}


def make_case(name, device="cpu"):
    """Arguments of torch_fq_attention / fq_attention (a dict) and the output gradient.
    q, k, v are views of one permuted qkv tensor (non-contiguous), as the model has them."""
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    if name == TIES_CASE:
        b, h, n, d, a_bits, p_steps, p_bits, p_scale, kinds, blocks = 1, 2, 40, 64, 4, 1, 4, 1.0, "qkvp", (64, 64)
        qkv = torch.randint(-20, 21, (b, n, 3, h, d), generator=g).float() * 0.125
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        s_q = s_k = torch.full((h,), 0.25)
        z_q, z_k = torch.tensor([8.0, 7.0]), torch.tensor([9.0, 8.0])
        s_v, z_v = torch.tensor(0.25), torch.tensor(8.0)
    else:
        b, h, n, d, a_bits, p_steps, p_bits, p_scale, gain, kinds, blocks = CASES[name]
        qkv = torch.randn(b, n, 3, h, d, generator=g) + 0.3 * torch.randn(1, 1, 3, h, d, generator=g)
        qkv[:, :, :2] *= gain * (1.0 + 0.5 * torch.arange(h, dtype=torch.float32)).reshape(1, 1, 1, h, 1)
        qmax = (1 << a_bits) - 1
        params = []
        for i in range(3):  # steps at 0.8 of the min-max range: the extremes clip
            x = qkv[:, :, i].transpose(1, 2)  # [B, H, N, D]
            rows = x.transpose(0, 1).reshape(h, -1) if i < 2 else x.reshape(1, -1)
            s, z = range_to_qparams(0.8 * rows.amin(1), 0.8 * rows.amax(1), qmax)
            params.append((s, z))
            qkv[:, :, i] = _nudge_off_ties(x, s.reshape(1, -1, 1, 1) if i < 2 else s.reshape(())).transpose(1, 2)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        (s_q, z_q), (s_k, z_k), (s_v, z_v) = params
        s_v, z_v = s_v.reshape(()), z_v.reshape(())
    args = dict(q=q, k=k, v=v, s_q=s_q, z_q=z_q, s_k=s_k, z_k=z_k, s_v=s_v, z_v=z_v, qmax=(1 << a_bits) - 1,
                sm_scale=d ** -0.5, p_scale=torch.tensor(p_scale), p_steps=p_steps, p_bits=p_bits,
                **_masks(kinds, (b, h, n, d), (b, h, n, n), g))
    grad = torch.randn(b, h, n, d, generator=g)
    args = {key: val.to(device) if isinstance(val, torch.Tensor) else val for key, val in args.items()}
    return args, grad.to(device), blocks


DIFF = ("q", "k", "v", "s_q", "s_k", "s_v")  # the differentiable arguments, in the gradients' order
GRADS = ("dq", "dk", "dv", "ds_q", "ds_k", "ds_v")


def forward_backward(fn, args, grad, dtype=torch.float32, **kw):
    """fn's output and the gradients of sum(output * grad) for DIFF, all in ``dtype``."""
    args = dict(args)
    leaves = []
    for key in DIFF:
        t = args[key].detach().to(dtype).clone().requires_grad_()
        args[key] = t
        leaves.append(t)
    out = fn(**args, **kw)
    grads = torch.autograd.grad((out * grad.to(dtype)).sum(), leaves)
    return out.detach(), list(grads)


def _bounds(args, grad):
    """The per-element bounds of rule 2 (module docstring) for O, dV~ and the ds_v terms, the
    magnitudes M of rule 1, and what the case exercises (near decision points, codes used,
    kept and clipped elements of V)."""
    a = {key: (val.detach().float().cpu() if isinstance(val, torch.Tensor) else val) for key, val in args.items()}
    b, h, n, d = a["q"].shape
    qmax, p_steps, p_bits, sm = a["qmax"], a["p_steps"], a["p_bits"], a["sm_scale"]
    zero_code = (1 << p_bits) - 1
    p_scale = float(a["p_scale"])
    col = lambda x: x.reshape(1, -1, 1, 1).expand(1, h, 1, 1)  # noqa: E731
    qt = fake_quant_operand(a["q"], col(a["s_q"]), col(a["z_q"]), qmax, a["keep_q"])
    kt = fake_quant_operand(a["k"], col(a["s_k"]), col(a["z_k"]), qmax, a["keep_k"])
    vt = fake_quant_operand(a["v"], a["s_v"].reshape(()), a["z_v"].reshape(()), qmax, a["keep_v"])
    s32 = (qt @ kt.transpose(-2, -1)) * sm
    p32 = s32.softmax(-1)  # the twin's P, bit for bit (on the CPU)
    pq = log_fake_quant(p32, a["p_scale"], p_steps, p_bits)
    keep_p = torch.zeros_like(p32) if a["keep_p"] is None else a["keep_p"].float()
    pt = torch.where(keep_p.bool(), p32, (pq - p32) + p32)

    s64 = (qt.double() @ kt.double().transpose(-2, -1)) * sm
    p64 = s64.softmax(-1)
    ds = (d + 2) * 2.0 ** -23 * (qt.abs().double() @ kt.abs().double().transpose(-2, -1)) * sm
    dlogp = (ds + ds.amax(-1, keepdim=True)
             + 2.0 ** -23 * ((s64 - s64.amax(-1, keepdim=True)).abs() + n + 8) + 2.0 ** -20)
    band = p_steps * math.log2(math.e) * dlogp
    w = -p_steps * torch.log2((p64 / p_scale).clamp_min(1e-30))
    hi = torch.floor(w)
    mid = p_steps * math.log2(2.0 / (1.0 + 2.0 ** (-1.0 / p_steps)))

    def level(c):
        return torch.where(c >= zero_code, torch.zeros_like(c), torch.exp2(-c.clamp(min=0) / p_steps))

    near_mid = ((w - hi - mid).abs() < band) & (hi >= 0) & (hi <= zero_code - 2)
    near_zero = (w - zero_code).abs() < band
    gap = p_scale * (torch.where(near_mid, level(hi) - level(hi + 1), torch.zeros_like(w))
                     + torch.where(near_zero, level(torch.full_like(w, zero_code - 1.0)), torch.zeros_like(w)))
    gap = gap * (1 - keep_p.double())
    unflipped = torch.where(keep_p.bool(), p32.double() * torch.expm1(dlogp),
                            2.0 ** -22 * torch.maximum(pq, p32).double())

    pt_abs, v_abs, g_abs = pt.abs().double(), vt.abs().double(), grad.detach().abs().double().cpu()
    sums = (n + 4) * 2.0 ** -23
    o_tight = sums * (pt_abs @ v_abs) + unflipped @ v_abs + 2.0 ** -24 * (pt.double() @ vt.double()).abs()
    o_flip = gap @ v_abs
    dv_tight = sums * (pt_abs.transpose(-2, -1) @ g_abs) + unflipped.transpose(-2, -1) @ g_abs
    dv_flip = gap.transpose(-2, -1) @ g_abs
    passed, dxs, dxs_mag, kept, clipped = _lsq_factors(a["v"], a["s_v"].reshape(()), a["z_v"].reshape(()), qmax,
                                                       a["keep_v"])
    # rule 1's floor: the magnitudes of the terms of dq, dk, ds_q, ds_k (dS = P (dP - delta))
    dp_abs = g_abs @ v_abs.transpose(-2, -1)
    ds_mag = p64 * (dp_abs + (p64 * dp_abs).sum(-1, keepdim=True))
    dq_mag = (ds_mag @ kt.abs().double()) * sm
    dk_mag = (ds_mag.transpose(-2, -1) @ qt.abs().double()) * sm
    per_head_sum = lambda x: x.sum((0, 2, 3))  # noqa: E731
    mags = {"dq": float(dq_mag.max()), "dk": float(dk_mag.max()),
            "ds_q": float(per_head_sum(dq_mag * _lsq_factors(a["q"], col(a["s_q"]), col(a["z_q"]), qmax,
                                                             a["keep_q"])[2]).max()),
            "ds_k": float(per_head_sum(dk_mag * _lsq_factors(a["k"], col(a["s_k"]), col(a["z_k"]), qmax,
                                                             a["keep_k"])[2]).max())}
    codes = log_codes_used(p32, a["p_scale"], p_steps, zero_code)
    return dict(o_tight=o_tight, o_flip=o_flip, dv_tight=dv_tight, dv_flip=dv_flip, passed=passed, dxs=dxs,
                dxs_mag=dxs_mag, near=int(((near_mid | near_zero) & (keep_p == 0)).sum()), codes=codes,
                kept=kept, clipped=clipped, mags=mags)


def _lsq_factors(x, s, z, qmax, keep):
    """For x~ = lerp(fake_quant(x, s, z), x, keep): dx~/dx (0 or 1), dx~/ds (code - z - u
    inside the range, code - z clipped, 0 kept), the magnitude |code - z| + |u| of the two
    terms autograd sums separately (0 kept), and the numbers of kept and clipped elements."""
    u = x.double() / s.double()
    r = torch.round(x / s).double() + z.double()
    inside = (r >= 0) & (r <= qmax)
    code = r.clamp(0, qmax)
    keep = torch.zeros_like(u, dtype=torch.bool) if keep is None else keep.bool()
    dxs = torch.where(keep, 0.0, code - z.double() - torch.where(inside, u, 0.0))
    dxs_mag = torch.where(keep, 0.0, (code - z.double()).abs() + u.abs())
    return (inside | keep).double(), dxs, dxs_mag, int(keep.sum()), int((~inside).sum())


def log_codes_used(p, p_scale, p_steps, zero_code):
    return sorted(set(int(c) for c in log_codes(p, p_scale, p_steps, zero_code).unique()))


def compare(got_out, got_grads, args, grad) -> dict:
    """Figures of the kernel's output and gradients against the twin under the module
    docstring's rules (floats, ints and verdicts)."""
    out32, grads32 = forward_backward(torch_fq_attention, args, grad)  # on the args' device
    out64, grads64 = forward_backward(torch_fq_attention, args, grad, torch.float64)
    out32, out64, grads32, grads64 = out32.cpu(), out64.cpu(), [g.cpu() for g in grads32], [g.cpu() for g in grads64]
    cpu = {key: (val.cpu() if isinstance(val, torch.Tensor) else val) for key, val in args.items()}
    grad = grad.cpu()
    got_out, got_grads = got_out.detach().cpu(), [x.detach().cpu() for x in got_grads]
    r = {"shape_ok": got_out.shape == out32.shape and all(x.shape == y.shape for x, y in zip(got_grads, grads32))}
    bd = _bounds(cpu, grad)
    # rule 1
    for name, got, t32, t64 in zip(GRADS, got_grads, grads32, grads64):
        if name in ("dv", "ds_v"):
            continue
        err_k = float((got.double() - t64).abs().max())
        err_t = float((t32.double() - t64).abs().max())
        ref_max = float(t64.abs().max())
        one_ulp_of_m = err_t == 0 or name in ("ds_q", "ds_k")
        allowed = 2 * err_t + 2.0 ** -20 * ref_max + (2.0 ** -24 * bd["mags"][name] if one_ulp_of_m else 0.0)
        r[name] = {"err": err_k, "twin_err": err_t, "ref_max": ref_max, "magnitude": bd["mags"][name],
                   "allowed": allowed, "ok": err_k <= allowed}
    # rule 2
    err = (got_out.double() - out32.double()).abs()
    r["out"] = {"err": float(err.max()), "ref_max": float(out32.abs().max()),
                "beyond_tight": int((err > bd["o_tight"]).sum()), "elements": err.numel(),
                "ok": bool((err <= bd["o_tight"] + bd["o_flip"]).all())}
    dv_tight = bd["dv_tight"] * bd["passed"] + 2.0 ** -22 * grads32[2].double().abs()
    dv_allowed = dv_tight + bd["dv_flip"] * bd["passed"]
    err = (got_grads[2].double() - grads32[2].double()).abs()
    r["dv"] = {"err": float(err.max()), "ref_max": float(grads32[2].abs().max()),
               "beyond_tight": int((err > dv_tight).sum()), "elements": err.numel(),
               "ok": bool((err <= dv_allowed).all())}
    dv_mag = (grads32[2].double().abs() + bd["dv_tight"] + bd["dv_flip"])
    terms = dv_mag.numel()
    sv_bound = (((bd["dv_tight"] + bd["dv_flip"]) * bd["dxs"].abs()).sum()
                + (math.ceil(math.log2(terms)) + 4) * 2.0 ** -23 * (dv_mag * bd["dxs_mag"]).sum())
    err = abs(float(got_grads[5].double().sum() - grads32[5].double().sum()))
    sv_tight = ((bd["dv_tight"] * bd["dxs"].abs()).sum()
                + (math.ceil(math.log2(terms)) + 4) * 2.0 ** -23 * (dv_mag * bd["dxs_mag"]).sum())
    r["ds_v"] = {"err": err, "ref_max": float(grads32[5].abs().max()), "bound": float(sv_bound),
                 "tight": float(sv_tight), "ok": err <= float(sv_bound), "ok_tight": err <= float(sv_tight)}
    r["near_decision_points"], r["codes_used"] = bd["near"], bd["codes"]
    r["v_kept"], r["v_clipped"] = bd["kept"], bd["clipped"]
    return r


_CHILD = r"""
import importlib.util, json, sys, time
import torch
from fastquant.kernels import fq_attention as K
from fastquant.ops.fq_attention import fq_attention

spec = importlib.util.spec_from_file_location("cases", sys.argv[1])
cases = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cases)
report = {"interpreted": K.INTERPRETED, "cases": {}}
for name in cases.CASE_NAMES:
    args, grad, blocks = cases.make_case(name)
    start = time.perf_counter()
    out, grads = cases.forward_backward(fq_attention, args, grad, backend="triton",
                                        **({"blocks": blocks} if blocks else {}))
    seconds = time.perf_counter() - start
    report["cases"][name] = {**cases.compare(out, grads, args, grad), "seconds": round(seconds, 2)}
report["integration"] = cases.integration_in_interpreter()
json.dump(report, sys.stdout)
"""


@pytest.fixture(scope="module")
def report():
    return run_interpreted(_CHILD, __file__)


def test_interpreter_really_interprets(report):
    assert report["interpreted"]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_kernels_match_twin(report, case):
    r = report["cases"][case]
    assert r["shape_ok"], r
    for name in ("out", "dq", "dk", "dv", "ds_q", "ds_k", "ds_v"):
        assert r[name]["ok"], (name, r[name])
    for name in ("out", "dv"):  # a flipped level moves one row (O) or key (dv); more is a bug
        assert r[name]["beyond_tight"] <= max(8, r[name]["elements"] // 1000), (name, r[name])
    # a flip large enough to move ds_v beyond its tight bound shows in O or dv
    flipped = r["out"]["beyond_tight"] + r["dv"]["beyond_tight"] > 0
    assert r["ds_v"]["ok_tight"] or flipped, r["ds_v"]


def test_cases_cover_the_quantizers_ranges(report):
    """The cases reach the log quantizer's top level, deep levels and zero code, and V's
    clipping and QDrop's kept elements."""
    used = set()
    for name in CASE_NAMES:
        r = report["cases"][name]
        p_bits = 4 if name == TIES_CASE else CASES[name][6]
        codes, zero_code = set(r["codes_used"]), (1 << p_bits) - 1
        used |= {"top" if 0 in codes else None, "zero" if zero_code in codes else None,
                 "deep" if any(12 <= c < zero_code for c in codes) else None,
                 "clipped" if r["v_clipped"] else None, "kept" if r["v_kept"] else None}
    assert {"top", "zero", "deep", "clipped", "kept"} <= used, used


# -- the twin is what the modules compute ----------------------------------------------------------
def small_attention(per_head: bool, bits: int = 4, base: str = "sqrt2", heads: int = 2, dim: int = 64,
                    tokens: int = 17, seed: int = 0):
    """A calibrated QuantAttention (timm Attention, head dim dim / heads) with its matmuls'
    quantizers wrapped for reconstruction (LearnableState), in training mode, and an input."""
    from fastquant.nn import QuantAttention, QuantMatMul
    from fastquant.quant import LogQuantizer, UniformQuantizer
    from fastquant.recon import LearnableState
    from timm.layers.attention import Attention

    torch.manual_seed(seed)
    shape = (1, heads, 1, 1) if per_head else ()
    attn = QuantAttention.from_float(
        Attention(dim, num_heads=heads, qkv_bias=True),
        QuantMatMul(UniformQuantizer(bits, shape), UniformQuantizer(bits, shape)),
        QuantMatMul(LogQuantizer(bits, base), UniformQuantizer(bits)))
    x = torch.randn(2, tokens, dim) * 2
    quantizers = [attn.matmul_qk.a_quant, attn.matmul_qk.b_quant, attn.matmul_pv.a_quant, attn.matmul_pv.b_quant]
    for qz in quantizers:
        qz.start_observing()
    with torch.no_grad():
        attn(x)
    for qz in quantizers:
        qz.finish_observing()
    LearnableState([attn])
    with torch.no_grad():  # learned steps away from the calibrated ones, so that some values clip
        for w in (attn.matmul_qk.a_quant, attn.matmul_qk.b_quant, attn.matmul_pv.b_quant):
            w.scale.mul_(0.8)
            w.scale.requires_grad_(True)
    return attn.train(), x


def module_qkv(attn, x):
    """q, k, v [B, H, N, D] as QuantAttention.forward makes them, detached leaves."""
    b, n, _ = x.shape
    with torch.no_grad():
        qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    return [t.requires_grad_() for t in qkv.unbind(0)]


def reference_path(attn, q, k, v):
    """QuantAttention.forward's reference computation between the projections."""
    a = attn.matmul_qk(q, k.transpose(-2, -1)) * attn.scale
    return attn.matmul_pv(attn.attn_drop(a.softmax(dim=-1)), v)


def twin_args(attn, q, k, v, seed: int):
    """torch_fq_attention's arguments for ``attn``'s wrappers, with the QDrop masks the
    wrappers draw from ``seed`` (in the reference's order: Q, K^T, P, V)."""
    from fastquant.quant import MIN_SCALE, keep_mask

    aq, ak, ap, av = attn.matmul_qk.a_quant, attn.matmul_qk.b_quant, attn.matmul_pv.a_quant, attn.matmul_pv.b_quant
    gen = torch.Generator(device=q.device).manual_seed(seed)
    b, h, n, d = q.shape
    masks = {}
    if aq.drop_p > 0:
        masks["keep_q"] = keep_mask(q, aq.drop_p, gen)
        masks["keep_k"] = keep_mask(k.transpose(-2, -1), ak.drop_p, gen).transpose(-2, -1)
        masks["keep_p"] = keep_mask(torch.empty(b, h, n, n, device=q.device), ap.drop_p, gen)
        masks["keep_v"] = keep_mask(v, av.drop_p, gen)
    lq = ap.quantizer
    return dict(q=q, k=k, v=v, s_q=aq.scale.clamp_min(MIN_SCALE).reshape(-1), z_q=aq.quantizer.zero_point.reshape(-1),
                s_k=ak.scale.clamp_min(MIN_SCALE).reshape(-1), z_k=ak.quantizer.zero_point.reshape(-1),
                s_v=av.scale.clamp_min(MIN_SCALE), z_v=av.quantizer.zero_point, qmax=aq.quantizer.qmax,
                sm_scale=attn.scale, p_scale=lq.scale, p_steps=lq.steps_per_octave, p_bits=lq.bits, **masks)


def set_qdrop(attn, p: float, seed: int, device="cpu"):
    gen = torch.Generator(device=device).manual_seed(seed)
    for w in (attn.matmul_qk.a_quant, attn.matmul_qk.b_quant, attn.matmul_pv.a_quant, attn.matmul_pv.b_quant):
        w.drop_p, w.generator = p, gen
    return gen


@pytest.mark.parametrize("per_head", [True, False], ids=["per_head", "per_tensor"])
@pytest.mark.parametrize("drop_p", [0.0, 0.5], ids=["no_qdrop", "qdrop"])
def test_twin_equals_the_modules_in_training(per_head, drop_p):
    """torch_fq_attention gives QuantAttention's values and every gradient (q, k, v and the
    LSQ steps of the ActQuant wrappers, through clamp_min and the per-tensor broadcast), with
    the QDrop masks the wrappers draw."""
    attn, x = small_attention(per_head)
    wrappers = (attn.matmul_qk.a_quant, attn.matmul_qk.b_quant, attn.matmul_pv.b_quant)
    q, k, v = module_qkv(attn, x)
    w = torch.randn(2, attn.num_heads, x.shape[1], attn.head_dim)
    set_qdrop(attn, drop_p, seed=5)
    ref = reference_path(attn, q, k, v)
    ref_grads = torch.autograd.grad((ref * w).sum(), [q, k, v] + [a.scale for a in wrappers])
    out = torch_fq_attention(**twin_args(attn, q, k, v, seed=5))
    grads = torch.autograd.grad((out * w).sum(), [q, k, v] + [a.scale for a in wrappers])
    assert torch.equal(out, ref)
    for g, rg in zip(grads, ref_grads):
        assert g.shape == rg.shape
        torch.testing.assert_close(g, rg, rtol=1e-6, atol=1e-6 * float(rg.abs().max()))
    # the cases exercise clipping (LSQ's clipped term) and, with QDrop, kept elements
    assert (grads[0] == 0).any()


def test_lsq_step_gradient_by_hand():
    """The twin's ds is the docstring's: g (round(u) - u) inside, g (code - z) clipped, 0 kept."""
    x = torch.tensor([-3.0, -0.3, 0.1, 0.74, 1.25, 9.0]).requires_grad_()
    s, z, qmax = torch.tensor(0.5, requires_grad=True), torch.tensor(2.0), 7
    keep = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    gx, gs = torch.autograd.grad((fake_quant_operand(x, s, z, qmax, keep) * g).sum(), (x, s))
    u = x.detach() / 0.5
    # -3.0: u = -6, code clipped at 0 -> (0 - z); 9.0: u = 18, clipped at 7 -> (7 - z);
    # 0.74 is kept; the others are inside: round(u) - u (1.25 / 0.5 = 2.5 rounds to even 2)
    expect = (1.0 * (0 - 2) + 2.0 * (torch.round(u[1]) - u[1]) + 3.0 * (torch.round(u[2]) - u[2])
              + 5.0 * (2.0 - 2.5) + 6.0 * (7 - 2))
    torch.testing.assert_close(gs, expect, rtol=1e-6, atol=1e-6)
    assert gx.tolist() == [0.0, 2.0, 3.0, 4.0, 5.0, 0.0]


# -- the integration switch ----------------------------------------------------------------------------
def test_cpu_forward_never_takes_the_fused_path(monkeypatch):
    from fastquant.ops import fq_attention

    def boom(*a, **kw):
        raise AssertionError("the fused kernel was called on the CPU")

    monkeypatch.setattr(fq_attention, "fused_attention", boom)
    monkeypatch.setattr(fq_attention, "fused_attention_applies", boom)
    attn, x = small_attention(True)
    set_qdrop(attn, 0.5, seed=1)
    attn(x).sum().backward()


class _FakeCuda:
    """What fused_attention_applies reads of x, for a CUDA float32 input."""

    is_cuda = True
    dtype = torch.float32


def test_fused_attention_applies_to_the_supported_wrappers_only():
    pytest.importorskip("triton")
    from fastquant import settings
    from fastquant.ops.fq_attention import fused_attention_applies
    from fastquant.quant import ActQuant, UniformQuantizer

    with settings.overridden(fused_recon=True):
        for per_head in (True, False):
            attn, x = small_attention(per_head)
            assert fused_attention_applies(attn, _FakeCuda()) and not fused_attention_applies(attn, x)
    with settings.overridden(fused_recon=False):  # the one switch of both fused ops
        assert not fused_attention_applies(attn, _FakeCuda())
    attn.matmul_pv.b_quant.float_ = True  # POS's float stage: the reference path
    assert not fused_attention_applies(attn, _FakeCuda())
    attn.matmul_pv.b_quant.float_ = False
    attn.matmul_qk.a_quant.quantizer.mode = "off"
    assert not fused_attention_applies(attn, _FakeCuda())
    attn.matmul_qk.a_quant.quantizer.mode = "quant"
    softmax_quant = attn.matmul_pv.a_quant
    uniform = UniformQuantizer(4)
    uniform.set_qparams(torch.tensor(1 / 15), torch.tensor(0.0))
    attn.matmul_pv.a_quant = ActQuant(uniform)  # a uniform softmax quantizer: not the kernel's
    assert not fused_attention_applies(attn, _FakeCuda())
    attn.matmul_pv.a_quant = softmax_quant
    per_token = UniformQuantizer(4, per_token=True)
    per_token.mode = "quant"
    attn.matmul_pv.b_quant = ActQuant(per_token)  # no learnable step
    assert not fused_attention_applies(attn, _FakeCuda())


def fused_against_reference(attn, x, seed: int, backend=None) -> dict:
    """``fused_attention`` (the call QuantAttention makes on CUDA) against the module's
    reference path, with QDrop at 0.5 and the same generator seed: values and gradients
    within the kernel's bounds (compare), and the generator left in the same state."""
    from fastquant.ops.fq_attention import fused_attention

    q, k, v = module_qkv(attn, x)
    w = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed)).to(x.device)
    wrappers = (attn.matmul_qk.a_quant, attn.matmul_qk.b_quant, attn.matmul_pv.b_quant)
    gen = set_qdrop(attn, 0.5, seed, x.device)
    out = fused_attention(attn, q, k, v, backend)
    grads = torch.autograd.grad((out * w).sum(), [q, k, v] + [a.scale for a in wrappers])
    state_fused = gen.get_state()
    gen = set_qdrop(attn, 0.5, seed, x.device)
    with torch.no_grad():
        reference_path(attn, q, k, v)
    state_ref = gen.get_state()
    grads = list(grads[:3]) + [g.reshape(-1) for g in grads[3:]]
    r = compare(out, grads, twin_args(attn, q, k, v, seed), w)
    return {"ok": all(r[n]["ok"] for n in ("out", "dq", "dk", "dv", "ds_q", "ds_k", "ds_v")),
            "same_generator_state": bool(torch.equal(state_fused, state_ref)), "figures": r}


def integration_in_interpreter() -> dict:
    """Run in the interpreter child (CPU tensors reach the kernels there)."""
    attn, x = small_attention(True, bits=4, base="2", heads=2, dim=64, tokens=23)
    return fused_against_reference(attn, x, seed=9, backend="triton")


def test_fused_attention_matches_the_modules_in_the_interpreter(report):
    r = report["integration"]
    assert r["same_generator_state"], r
    assert r["ok"], r


# -- the wrapper's checks ---------------------------------------------------------------------------
def _valid_cpu_args():
    args, _, _ = make_case("n1_d64_a8_log2_p4_qdrop")
    return args


_BAD_INPUTS = [  # (argument -> replacement, the error message expected)
    ({"q": torch.randn(2, 1, 64)}, r"q must be a 4-D tensor \[B, H, N, D\], got \(2, 1, 64\)"),
    ({"k": torch.randn(2, 2, 2, 64)}, r"same shape .* got \(2, 2, 1, 64\), \(2, 2, 2, 64\) and \(2, 2, 1, 64\)"),
    ({"v": torch.randn(2, 2, 1, 64, dtype=torch.float64)}, r"must be float32 .* torch\.float64"),
    ({"q": torch.randn(2, 2, 1, 64).half()}, r"must be float32"),
    ({"q": torch.randn(2, 2, 1, 48), "k": torch.randn(2, 2, 1, 48), "v": torch.randn(2, 2, 1, 48),
      "keep_q": None, "keep_k": None, "keep_v": None}, r"head dim D must be 16, 32, 64 or 128, got 48"),
    ({"s_q": torch.ones(3)}, r"s_q must hold one value per head, shape \[2\] \(or one value\), got \(3,\)"),
    ({"z_k": torch.ones(2, 1)}, r"z_k must hold one value per head"),
    ({"s_v": torch.ones(2)}, r"s_v must be a scalar"),
    ({"p_scale": torch.ones(2)}, r"p_scale must be a scalar"),
    ({"qmax": 256}, r"qmax must be an integer 1\.\.255 \(2\^bits - 1\), got 256"),
    ({"qmax": 15.0}, r"qmax must be an integer"),
    ({"sm_scale": float("nan")}, r"sm_scale must be finite"),
    ({"p_steps": 3}, r"p_steps must be 1 \(log2\) or 2 \(log-sqrt2\), got 3"),
    ({"p_bits": 9}, r"p_bits must be 2\.\.8, got 9"),
    ({"keep_p": torch.ones(2, 2, 1, 2)}, r"keep_p must be a tensor of shape \[2, 2, 1, 1\], got \(2, 2, 1, 2\)"),
    ({"keep_q": torch.ones(2, 2, 64)}, r"keep_q must be a tensor of shape \[2, 2, 1, 64\]"),
]


@pytest.mark.parametrize("change, message", _BAD_INPUTS, ids=[m.split(" ")[0] for _, m in _BAD_INPUTS])
def test_op_rejects_bad_inputs(change, message):
    args = _valid_cpu_args()
    args.update(change)
    with pytest.raises(ValueError, match="^fq_attention: .*" + message):
        fq_attention(**args)


def test_triton_backend_rejects_bad_blocks_and_cpu_tensors():
    kernels = pytest.importorskip("fastquant.kernels.fq_attention")
    args = _valid_cpu_args()
    with pytest.raises(ValueError, match=r"blocks must be two powers of two, at least 16, got \(48, 64\)"):
        fq_attention(**args, backend="triton", blocks=(48, 64))
    if not kernels.INTERPRETED:  # compiled mode: CPU tensors are refused with the way out
        with pytest.raises(ValueError, match="expected CUDA tensors, got device cpu .*TRITON_INTERPRET=1"):
            fq_attention(**args, backend="triton")


# -- on a GPU ----------------------------------------------------------------------------------------
@needs_gpu
@pytest.mark.parametrize("p_steps, masks", [(2, "qkvp"), (1, "")])
def test_kernels_match_twin_on_gpu(p_steps, masks, monkeypatch):
    """ViT-B's attention (batch 32, 12 heads, 197 tokens, D = 64), compiled kernels."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setitem(CASES, "gpu", (32, 12, 197, 64, 4, p_steps, 4, 1.0, 1.5, masks, None))
    args, grad, _ = make_case("gpu", device="cuda")
    out, grads = forward_backward(fq_attention, args, grad, backend="triton")
    r = compare(out, grads, args, grad)
    for name in ("out", "dq", "dk", "dv", "ds_q", "ds_k", "ds_v"):
        assert r[name]["ok"], (name, r[name])
    for name in ("out", "dv"):
        assert r[name]["beyond_tight"] <= r[name]["elements"] // 1000, (name, r[name])


@needs_gpu
def test_quant_attention_takes_the_fused_path_on_gpu(monkeypatch):
    """On CUDA, QuantAttention.forward calls the kernel (unless settings.fused_recon() is off),
    whose values and gradients match the reference path's under the kernel's bounds, with
    the same QDrop masks and the generator left in the same state."""
    from fastquant.ops import fq_attention

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    attn, x = small_attention(True, heads=6, dim=384, tokens=197)
    attn, x = attn.cuda(), x.repeat(16, 1, 1).cuda()
    calls = []
    fused = fq_attention.fused_attention
    monkeypatch.setattr(fq_attention, "fused_attention", lambda *a: calls.append(1) or fused(*a))
    set_qdrop(attn, 0.5, 3, "cuda")
    attn(x).sum().backward()
    from fastquant import settings

    with settings.overridden(fused_recon=False):
        attn(x).sum().backward()
    assert calls == [1]
    r = fused_against_reference(attn, x, seed=3)
    assert r["same_generator_state"] and r["ok"], r
