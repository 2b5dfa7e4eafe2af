"""The fused fake-quant linear layer of reconstruction: the PyTorch twin against the layer it
replaces, and the Triton kernels (forward and backward) against the contract.

Without a GPU the kernels run in Triton's CPU interpreter, in one child process started
with TRITON_INTERPRET=1 (see test_kernels_int8.py for why); each case is reported as its
own test. The child runs every case through ``fq_linear(..., backend="triton")`` and
autograd (the GPU tile shapes: M, N and K tails all occur) or, for cases with explicit
``blocks`` / ``splits``, through the kernel wrappers.

Tolerances, derived from the contract (``fastquant.ops.fq_linear``). The oracle is the
contract evaluated in float64 from the float32 grids (``fq_grids``: the codes, v and the
masks exactly as PyTorch computes them). The kernels differ from it only through

1. fp16 operands: integer codes are exact; a kept ``v = x / s_x`` and a soft weight code
   are rounded to fp16 (at most ``u = 2^-11`` relative); the kernel's soft codes also
   differ from PyTorch's before that rounding by its sigmoid (``tl.exp``, approximate
   division on GPUs: at most ``eps_h = 2^-19`` in h) and the float32 rounding of
   ``(w_floor + h) + z`` (two ulps of the largest code). ``dy`` (times ``s_w`` for dx) is
   scaled by a power of two and rounded to fp16: ``u`` relative (plus fp32's 2^-24 for
   the product with s_w), far from fp16's subnormals by construction of the scale.
   With operand bounds ``P = |g_x| + e_x``, ``Q = |g_w| + e_w``, a product's error is at
   most ``P Q^T - |g_x| |g_w|^T``;
2. fp32 accumulation over the reduced dimension R: at most ``(R + 2) 2^-23`` times the
   sum of the terms' magnitudes (2^-23, not 2^-24, per addition: tensor cores may
   truncate);
3. the epilogues' few fp32 roundings: 2^-22 of |y| + |bias| (forward), 2^-16 of
   |dalpha| (dalpha also carries the sigmoid's relative error through
   ``1.2 sig (1 - sig)``, at most 12 eps_h since sig <= 11/12 there);
4. ds_x sums M K terms in fp32 in some order: ``(M K + 2) 2^-24`` of the sum of their
   magnitudes, on top of G's error times ``|g_x - pass v|``.

Every element must lie within its bound (reported as ``ratio``: the largest error over
bound, at most 1). The dalpha of weights whose h (or code) sits within 1e-5 of a clamp
bound is left out: the gradient jumps there, and which side a rounding difference puts
it on is arbitrary (counted, expected to be none or a handful). Hard-rounded operands
without QDrop are exact in fp16, so there the forward differs from the float32 twin by
epilogue rounding only; the ties case (x / s_x exactly on .5, weight grid the identity)
checks codes and clip masks bit for bit.

Also reported, for the record: the deviation of the kernels from the float32 twin
relative to the largest output (the cost of fp16 operands) and the twin's own error.
"""
import copy
import math

import pytest
import torch
from _interp import run_interpreted  # tests/_interp.py (the tests folder is on sys.path)
from _marks import needs_gpu  # tests/_marks.py

import fastquant.ops.fq_linear as fq_mod
from fastquant import settings
from fastquant.nn import QuantLinear
from fastquant.ops.fq_linear import fq_grids, fq_linear, fused_recon_linear, torch_fq_linear
from fastquant.quant import ActQuant, AdaRoundWeight, keep_mask


U16, EPS_H = 2.0 ** -11, 2.0 ** -19

# name -> (M, K, N, a_bits, w_bits, soft, keep, bias, x requires grad, dy scale, blocks, splits)
# blocks None: the autograd function with the wrappers' GPU tiles (fwd 128x128x32, dx
# 128x32x64, dw 32x128x64); else the wrappers directly with (BLOCK_M, BLOCK_N, BLOCK_K).
CASES = {
    "m197_k96_n64_a4w4_soft_keep_bias": (197, 96, 64, 4, 4, True, True, True, True, 1e-7, None, None),
    "m70_k64_n48_a8w3_soft_keep": (70, 64, 48, 8, 3, True, True, False, True, 1.0, None, None),
    "m70_k96_n48_a4w3_hard_bias": (70, 96, 48, 4, 3, False, False, True, True, 1e-3, None, None),
    "m197_k64_n64_a8w4_hard_keep": (197, 64, 64, 8, 4, False, True, False, True, 1e-7, None, None),
    "m70_k80_n48_a4w4_soft_no_keep_ds_only": (70, 80, 48, 4, 4, True, False, True, False, 1e-7, None, None),
    "m197_k96_n48_a2w8_soft_keep_bias_split2": (197, 96, 48, 2, 8, True, True, True, True, 1e-5, (64, 64, 128), 2),
}
TIES_CASE = "ties_m40_k64_a4w4_identity_weight"
CASE_NAMES = list(CASES) + [TIES_CASE]


# -- inputs ---------------------------------------------------------------------------------------
def make_inputs(m, k, n, a_bits, w_bits, keep, bias, seed=0, device="cpu"):
    """x, s_x, z_x, qmax_x, keep, alpha, w_floor, s_w [N, 1], z_w [N, 1], qmax_w, bias: x spread
    over about 1.5 times the activation range (both ends clip), codes w_floor + z_w from -1 to
    qmax_w + 1 (both clamps of the weight code occur), alpha ~ N(0, 2^2) (h clamped at 0 and
    1 in about a third of the weights)."""
    g = torch.Generator().manual_seed(seed)
    qx, qw = (1 << a_bits) - 1, (1 << w_bits) - 1
    z_x = torch.tensor(float(qx // 3))
    s_x = torch.tensor(0.37)
    x = (torch.rand(m, k, generator=g) * 1.5 - 0.25) * qx * s_x - z_x * s_x
    keep_t = (torch.rand(m, k, generator=g) < 0.5) if keep else None
    z_w = torch.randint(0, qw + 1, (n, 1), generator=g).float()
    w_floor = torch.randint(-1, qw + 2, (n, k), generator=g).float() - z_w
    alpha = torch.randn(n, k, generator=g) * 2
    s_w = torch.rand(n, 1, generator=g) * 0.05 + 0.01
    b = torch.randn(n, generator=g) if bias else None
    out = (x, s_x, z_x, qx, keep_t, alpha, w_floor, s_w, z_w, qw, b)
    return tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in out)


def ties_inputs(device="cpu"):
    """x / s_x exactly on .5 (round half to even decides every code) from below the range
    to above it, s_x = 0.25, and a hard-rounded weight grid equal to the identity (s_w = 1),
    so y / s_x is g_x itself; dy on multiples of 2^-10 (exact in fp16)."""
    g = torch.Generator().manual_seed(5)
    m, k = 40, 64
    qx, qw = 15, 15
    z_x = torch.tensor(6.0)
    halves = torch.randint(-z_x.int().item() - 3, qx - z_x.int().item() + 3, (m, k), generator=g).float() + 0.5
    s_x = torch.tensor(0.25)
    x = halves * s_x
    z_w = torch.full((k, 1), 4.0)
    w_floor = torch.eye(k)
    alpha = -torch.rand(k, k, generator=g) - 0.1  # h = 0: the code is w_floor + z_w
    s_w = torch.ones(k, 1)
    dy = torch.randint(-64, 65, (m, k), generator=g).float() * 2.0 ** -10
    args = (x, s_x, z_x, qx, None, alpha, w_floor, s_w, z_w, qw, None)
    return tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in args), dy.to(device)


def case_inputs(name, device="cpu"):
    """(inputs, dy, soft, x requires grad, blocks, splits) of a case."""
    if name == TIES_CASE:
        args, dy = ties_inputs(device)
        return args, dy, False, True, None, None
    m, k, n, a_bits, w_bits, soft, keep, bias, x_grad, dy_scale, blocks, splits = CASES[name]
    args = make_inputs(m, k, n, a_bits, w_bits, keep, bias, device=device)
    dy = torch.randn(m, n, generator=torch.Generator().manual_seed(7)).to(device) * dy_scale
    return args, dy, soft, x_grad, blocks, splits


# -- the oracle and the bounds ------------------------------------------------------------------
def _gamma(r: int) -> float:
    return (r + 2) * 2.0 ** -23


def _ulp32(v: float) -> float:
    return 2.0 ** (math.floor(math.log2(max(v, 1.0))) - 23)


def exact_and_bounds(args, dy, soft):
    """Float64 values of the contract from the float32 grids, and each element's bound
    (module docstring): {name: (exact, bound)}, plus 'skip' (dalpha elements at a clamp)."""
    x, s_x, z_x, qx, keep, alpha, w_floor, s_w, z_w, qw, bias = args
    g_x, v, passed, g_w = (t.double() if t.is_floating_point() else t
                           for t in fq_grids(x, s_x, z_x, qx, keep, alpha, w_floor, z_w, qw, soft))
    sx, sw = s_x.double().reshape(()), s_w.double().reshape(-1)
    m, k = x.shape
    n = alpha.shape[0]
    kept = torch.zeros_like(passed) if keep is None else keep.bool()
    e_x = U16 * g_x.abs() * kept
    e_w = torch.zeros_like(g_w)
    if soft:
        big = float((w_floor.abs().max() + 1 + z_w.abs().max()).item())
        e_w = U16 * g_w.abs() + EPS_H + 2 * _ulp32(big)
    P, Q = g_x.abs() + e_x, g_w.abs() + e_w
    A = g_x.abs() @ g_w.abs().t()
    PQ = P @ Q.t()
    y = (g_x @ g_w.t()) * (sx * sw)
    b = torch.zeros(n, dtype=torch.float64, device=x.device) if bias is None else bias.double()
    y_bound = (PQ - A + _gamma(k) * PQ) * (sx * sw) + 2.0 ** -22 * ((y + b).abs() + b.abs())
    out = {"y": (y + b, y_bound)}

    dyd = dy.double()
    dys = dyd * sw
    u = U16 + 2.0 ** -24
    D, Dp = dys.abs(), dys.abs() * (1 + u)
    G = dys @ g_w
    G_bound = (Dp @ Q - D @ g_w.abs()) + _gamma(n) * (Dp @ Q)
    out["dx"] = (G * passed, G_bound * passed + 2.0 ** -22 * G.abs())
    d = torch.where(passed, g_x - v, g_x)
    ds = (G * d).sum()
    ds_bound = (G_bound * d.abs()).sum() + (m * k + 2) * 2.0 ** -24 * ((G.abs() + G_bound) * d.abs()).sum()
    out["ds"] = (ds.reshape(1), ds_bound.reshape(1))
    if soft:
        factor = fq_mod._weight_grad_factor(alpha, w_floor, z_w, qw).double()
        C = dyd.t() @ g_x
        Cp = dyd.abs().t() @ P * (1 + u)
        C_bound = (Cp - dyd.abs().t() @ g_x.abs()) + _gamma(m) * Cp
        scale = (sx * sw)[:, None]
        dalpha = scale * C * factor
        dalpha_bound = scale * C_bound * factor.abs() + (2.0 ** -16 + 12 * EPS_H) * dalpha.abs()
        # Where the factor itself may differ: h within rounding of a clamp bound. (The
        # code's clamp needs no margin of its own: w_floor + z_w is an integer, so a code
        # near 0 or qmax_w with h inside (0, 1) has h near one of its bounds.)
        h_pre = torch.sigmoid(alpha.double()) * 1.2 - 0.1
        out["dalpha"] = (dalpha, dalpha_bound)
        out["skip"] = (h_pre.abs() < 1e-5) | ((h_pre - 1).abs() < 1e-5)
    out["db"] = (dyd.sum(0), _gamma(m) * dyd.abs().sum(0))
    return out


def compare(got: dict, twin: dict, ref: dict) -> dict:
    """Per quantity: the largest error / bound (``ratio``), the largest error and value, the
    deviation from the float32 twin and the twin's own error (relative to the largest
    value)."""
    report = {}
    skip = ref.get("skip")
    for key, value in ref.items():
        if key == "skip":
            continue
        exact, bound = value
        g = got.get(key)
        if g is None:
            report[key] = {"missing": True}
            continue
        g = g.double().reshape(exact.shape)
        err = (g - exact).abs()
        ok = torch.ones_like(err, dtype=torch.bool)
        if key == "dalpha" and skip is not None:
            ok = ~skip
        scale = float(exact.abs().max()) or 1.0
        t = twin.get(key)
        report[key] = {
            "ratio": float((err / bound.clamp_min(1e-300))[ok].max()) if ok.any() else 0.0,
            "max_err": float(err[ok].max()) if ok.any() else 0.0,
            "max_abs": scale,
            "skipped": int((~ok).sum()),
            "dev_vs_twin": None if t is None else float((g - t.double().reshape(exact.shape)).abs().max()) / scale,
            "twin_err": None if t is None else float((t.double().reshape(exact.shape) - exact).abs().max()) / scale,
        }
    return report


def run_autograd(fn, args, dy, soft, x_grad, **kw):
    """{y, dx, ds, dalpha, db} of ``fn`` (fq_linear or the twin) by autograd."""
    x, s_x, z_x, qx, keep, alpha, w_floor, s_w, z_w, qw, bias = args
    x = x.clone().requires_grad_(x_grad)
    s_x = s_x.clone().requires_grad_()
    alpha = alpha.clone().requires_grad_(soft)
    bias = None if bias is None else bias.clone().requires_grad_()
    y = fn(x, s_x, z_x, qx, keep, alpha, w_floor, s_w, z_w, qw, bias, soft, **kw)
    y.backward(dy)
    out = {"y": y.detach(), "ds": s_x.grad}
    if x_grad:
        out["dx"] = x.grad
    if soft:
        out["dalpha"] = alpha.grad
    if bias is not None:
        out["db"] = bias.grad
    return out


def run_case(name, backend="triton", device="cpu") -> dict:
    """A case through the kernels (or ``backend``), compared as the module docstring says."""
    args, dy, soft, x_grad, blocks, splits = case_inputs(name, device)
    if blocks is None:
        got = run_autograd(fq_linear, args, dy, soft, x_grad, backend=backend)
    else:
        from fastquant.kernels.fq_linear import triton_fq_linear_backward, triton_fq_linear_forward

        y = triton_fq_linear_forward(*args, soft, blocks=blocks)
        dx, ds, dalpha, db = triton_fq_linear_backward(dy, *args[:10], soft, x_grad, True, soft, args[10] is not None,
                                                       blocks=blocks, splits=splits)
        got = {"y": y, "dx": dx, "ds": ds, "dalpha": dalpha, "db": db}
    got = {key: v.cpu() for key, v in got.items() if v is not None}
    args_cpu = tuple(t.cpu() if isinstance(t, torch.Tensor) else t for t in args)
    twin = run_autograd(torch_fq_linear, args_cpu, dy.cpu(), soft, x_grad)
    ref = exact_and_bounds(args_cpu, dy.cpu(), soft)
    if not x_grad:
        ref.pop("dx")
    if args[10] is None:
        ref.pop("db")
    report = compare(got, twin, ref)
    if name == TIES_CASE:
        report["exact"] = {"y": bool(torch.equal(got["y"], twin["y"])),
                           "dx": bool(torch.equal(got["dx"], ref["dx"][0].float()))}
    return report


_CHILD = r"""
import importlib.util, json, sys, time
import torch
from fastquant.kernels import fq_linear as K

spec = importlib.util.spec_from_file_location("cases", sys.argv[1])
cases = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cases)
report = {"interpreted": K.INTERPRETED, "cases": {}, "seconds": {}}
for name in cases.CASE_NAMES:
    t = time.perf_counter()
    report["cases"][name] = cases.run_case(name)
    report["seconds"][name] = round(time.perf_counter() - t, 2)
t = time.perf_counter()
report["seam"] = cases.run_seam()
report["seconds"]["seam"] = round(time.perf_counter() - t, 2)
json.dump(report, sys.stdout)
"""


@pytest.fixture(scope="module")
def report():
    return run_interpreted(_CHILD, __file__)


def test_interpreter_really_interprets(report):
    assert report["interpreted"]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_triton_fq_linear_within_derived_bounds(report, case):
    r = report["cases"][case]
    args, dy, soft, x_grad, _, _ = case_inputs(case)
    expected = {"y", "ds"} | ({"dx"} if x_grad else set()) | ({"dalpha"} if soft else set())
    expected |= {"db"} if args[10] is not None else set()
    assert expected <= set(r), r
    for key in expected:
        assert not r[key].get("missing") and r[key]["ratio"] <= 1.0, (key, r[key])
    if soft:
        assert r["dalpha"]["skipped"] <= 3, r["dalpha"]
    has_keep = args[4] is not None
    if not soft and not has_keep:  # exact fp16 operands: the forward is the twin's up to the epilogue
        assert r["y"]["dev_vs_twin"] <= 2.0 ** -21, r["y"]
    else:  # fp16 rounding of soft codes / kept values: about 2^-11 of the terms, far below 1%
        assert r["y"]["dev_vs_twin"] <= 2e-3, r["y"]


def test_triton_fq_linear_ties_are_exact(report):
    r = report["cases"][TIES_CASE]
    assert r["exact"] == {"y": True, "dx": True}, r


# -- the twin against the layer it replaces (CPU, no interpreter) --------------------------------
def _wrapped_layer(a_bits, w_bits, bias, seed=0):
    """test_deploy's calibrated QuantLinear (96 -> 40, per-tensor input step), frozen, with
    the reconstruction wrappers installed and V moved off its start so that some h are
    clamped and some not."""
    from test_deploy import _layer  # tests/ is on sys.path

    layer = _layer(w_bits, a_bits, False, bias, seed)
    assert layer.weight_quant.mode == layer.input_quant.mode == "quant"
    for p in layer.parameters():
        p.requires_grad_(False)
    layer.weight_quant = AdaRoundWeight(layer.weight_quant, layer.weight)
    layer.input_quant = ActQuant(layer.input_quant)
    with torch.no_grad():
        layer.weight_quant.alpha.add_(torch.randn(40, 96, generator=torch.Generator().manual_seed(seed + 1)) * 2)
    return layer


SEAM_CASES = {"soft_qdrop": (True, 0.5), "hard_no_qdrop": (False, 0.0)}


def run_seam(device="cpu") -> dict:
    """A wrapped QuantLinear (W3A4, bias) through the fused op against its reference grid
    path in fp32 (same QDrop mask): on the CPU the operands ``recon_operands`` takes from the
    wrappers go through ``fq_linear(..., backend="triton")`` (the interpreter); on a GPU the
    layer itself runs, with settings.fused_recon() on and off. Largest differences relative to the
    largest reference value: y, then the gradients of x, the LSQ step, alpha and bias."""
    out = {}
    for name, (soft, drop) in SEAM_CASES.items():
        layer = _wrapped_layer(4, 3, True).to(device)
        act, wq = layer.input_quant, layer.weight_quant
        wq.soft, act.drop_p = soft, drop
        layer.grid_dtype = torch.float32
        params = [act.scale, wq.alpha, layer.bias]
        for p in params:
            p.requires_grad_(True)
        x = (torch.randn(3, 21, 96, generator=torch.Generator().manual_seed(1)) * 0.4).to(device).requires_grad_()
        dy = torch.randn(3, 21, 40, generator=torch.Generator().manual_seed(2)).to(device)
        used = True
        if device != "cpu":  # the seam really takes the fused op here
            with torch.no_grad():
                used = fused_recon_linear(layer, x) is not None
        results = []
        for fused in (False, True):
            act.generator = torch.Generator(device=device).manual_seed(3)
            with settings.overridden(fused_recon=fused):
                if fused and device == "cpu":
                    args = fq_mod.recon_operands(layer, x)
                    y = fq_linear(*args, backend="triton").reshape(3, 21, 40)
                else:
                    y = layer(x)
            results.append([y] + list(torch.autograd.grad(y, [x] + params, dy, allow_unused=True)))
        rel = []
        for r, g in zip(*results):
            rel.append(None if r is None or g is None else float((g - r).abs().max() / r.abs().max()))
        out[name] = {"rel": rel, "alpha_grad": results[1][3] is not None, "fused_used": used}
    return out


@pytest.mark.parametrize("case", list(SEAM_CASES))
def test_fused_seam_equals_the_grid_path(report, case):
    """The wiring from the wrappers to the op (a wiring error is an O(1) difference): y and
    every gradient within 2e-3 of the largest value (fp16 operands: about 1e-4 measured;
    hard rounding without QDrop: exact operands, y to fp32 rounding)."""
    r = report["seam"][case]
    soft = SEAM_CASES[case][0]
    assert r["alpha_grad"] == soft, r
    assert all(v is not None and v <= 2e-3 for i, v in enumerate(r["rel"]) if not (i == 3 and not soft)), r
    if not soft:
        assert r["rel"][0] <= 1e-6, r


@pytest.mark.parametrize("soft", [True, False])
@pytest.mark.parametrize("drop", [0.0, 0.5])
@pytest.mark.parametrize("bias", [True, False])
def test_twin_equals_the_quant_linear_grid_path(soft, drop, bias):
    """torch_fq_linear = QuantLinear._grid_forward with fp32 grids (ActQuant / LsqGrid,
    AdaRoundWeight, grid_linear), values and gradients (x, the LSQ step, alpha, bias),
    with the same QDrop mask drawn from the same generator."""
    from fastquant.quant import functional

    assert (fq_mod.ZETA, fq_mod.GAMMA) == (functional.ZETA, functional.GAMMA)  # AdaRound's one definition
    layer = _wrapped_layer(4, 3, bias)
    act, wq = layer.input_quant, layer.weight_quant
    wq.soft = soft
    act.drop_p = drop
    act.scale.requires_grad_(True)
    wq.alpha.requires_grad_(True)
    if bias:
        layer.bias.requires_grad_(True)
    x = (torch.randn(3, 21, 96, generator=torch.Generator().manual_seed(1)) * 0.4).requires_grad_()
    dy = torch.randn(3, 21, 40, generator=torch.Generator().manual_seed(2))
    params = [x, act.scale, wq.alpha] + ([layer.bias] if bias else [])

    act.generator = torch.Generator().manual_seed(3)
    layer.grid_dtype = torch.float32
    ref = layer(x)
    ref_grads = torch.autograd.grad(ref, params, dy, allow_unused=True)

    act.generator = torch.Generator().manual_seed(3)
    keep = keep_mask(x.reshape(-1, 96), drop, act.generator, dtype=torch.bool) if drop else None
    qa, qw = act.quantizer, wq.quantizer
    y = torch_fq_linear(x.reshape(-1, 96), act.scale.clamp_min(1e-8), qa.zero_point, qa.qmax, keep, wq.alpha,
                        wq.w_floor, qw.scale, qw.zero_point, qw.qmax, layer.bias, soft).reshape(ref.shape)
    grads = torch.autograd.grad(y, params, dy, allow_unused=True)
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())
    assert 0 < (ref_grads[0] == 0).float().mean() < 0.5  # some elements clipped, most pass
    for g, r in zip(grads, ref_grads):
        if r is None:
            assert g is None
            continue
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5 * r.abs().max().item())
    assert (ref_grads[2] is None) == (not soft)  # hard rounding: no gradient to alpha


@pytest.mark.parametrize("case", list(CASES))
def test_torch_backends_equal_the_twin(case):
    """The written-out PyTorch forward and backward (the ops' CPU implementation), named
    ('torch') and picked for CPU tensors (None), equal the
    autograd twin to float32 rounding (they order the same sums differently; ds_x is
    summed in one term per element, the twin's in two that cancel: compared within the
    twin's own error bound)."""
    args, dy, soft, x_grad, _, _ = case_inputs(case)
    twin = run_autograd(torch_fq_linear, args, dy, soft, x_grad)
    ref = exact_and_bounds(args, dy, soft)
    for backend in ("torch", None):
        got = run_autograd(fq_linear, args, dy, soft, x_grad, backend=backend)
        assert set(got) == set(twin)
        for key, t in twin.items():
            tol = 1e-5 * t.abs().max().item()
            if key == "ds":
                tol = float(ref["ds"][1])
            torch.testing.assert_close(got[key], t, rtol=1e-5, atol=tol, msg=f"{backend} {key}")


def test_ops_pass_opcheck():
    args, dy, soft, _, _, _ = case_inputs("m70_k64_n48_a8w3_soft_keep")
    torch.library.opcheck(torch.ops.fastquant.fq_linear_fwd.default, args + (soft,))
    torch.library.opcheck(torch.ops.fastquant.fq_linear_bwd.default,
                          (dy,) + args[:10] + (soft, True, True, True, False))


def test_keep_mask_as_bool_draws_the_same_mask():
    x = torch.zeros(33, 17)
    a = keep_mask(x, 0.5, torch.Generator().manual_seed(4))
    b = keep_mask(x, 0.5, torch.Generator().manual_seed(4), dtype=torch.bool)
    assert b.dtype == torch.bool and torch.equal(a, b.float())
    assert keep_mask(x, 1.0, None, dtype=torch.bool).all() and not keep_mask(x, 0.0, None, dtype=torch.bool).any()


def test_the_cpu_path_is_left_alone(monkeypatch):
    """On CPU tensors the seam declines (None) and QuantLinear computes what it did."""
    layer = _wrapped_layer(4, 4, True)
    layer.grid_dtype = torch.bfloat16
    x = torch.randn(2, 5, 96)
    assert fused_recon_linear(layer, x) is None
    calls = []
    monkeypatch.setattr(fq_mod, "fq_linear", lambda *a, **k: calls.append(1))
    layer(x)
    assert not calls


def test_fq_linear_checks_its_inputs():
    args = make_inputs(8, 32, 16, 4, 4, True, True)
    with pytest.raises(ValueError, match="x must be a 2-D float32"):
        fq_linear(args[0].double(), *args[1:])
    with pytest.raises(ValueError, match=r"alpha and w_floor must be \[N, K\]"):
        fq_linear(args[0][:, :16], *args[1:4], None, *args[5:])
    with pytest.raises(ValueError, match="qmax_x must be 2"):
        fq_linear(args[0], args[1], args[2], 16, *args[4:])
    with pytest.raises(ValueError, match="keep must have x's shape"):
        fq_linear(*args[:4], args[4][:3], *args[5:])


def test_triton_wrappers_refuse_cpu_tensors_outside_the_interpreter():
    kernels = pytest.importorskip("fastquant.kernels.fq_linear")
    if kernels.INTERPRETED:
        pytest.skip("TRITON_INTERPRET is set in this process")
    args = make_inputs(8, 32, 16, 4, 4, True, True)
    with pytest.raises(ValueError, match="expected CUDA tensors"):
        kernels.triton_fq_linear_forward(*args, True)


# -- on a GPU --------------------------------------------------------------------------------------
@needs_gpu
@pytest.mark.parametrize("case", CASE_NAMES)
def test_triton_fq_linear_on_gpu(case):
    r = run_case(case, backend=None, device="cuda")
    for key, v in r.items():
        if key != "exact":
            assert v["ratio"] <= 1.0, (key, v)
    if case == TIES_CASE:
        assert r["exact"] == {"y": True, "dx": True}, r


@needs_gpu
def test_fused_seam_on_gpu():
    for case, r in run_seam("cuda").items():
        soft = SEAM_CASES[case][0]
        assert r["fused_used"] and r["alpha_grad"] == soft, r
        assert all(v is not None and v <= 2e-3 for i, v in enumerate(r["rel"]) if not (i == 3 and not soft)), r


@needs_gpu
def test_triton_fq_linear_vit_b_shape_on_gpu():
    """fc1 of ViT-B at batch 8 (M = 1576, K = 768, N = 3072), W4A4, QDrop, soft rounding."""
    args = make_inputs(1576, 768, 3072, 4, 4, True, True, device="cuda")
    dy = torch.randn(1576, 3072, device="cuda") * 1e-7
    got = run_autograd(fq_linear, args, dy, True, True)
    r = compare(got, {}, exact_and_bounds(args, dy, True))  # float64 on the GPU
    for key, v in r.items():
        assert v["ratio"] <= 1.0, (key, v)


def recon_step_models(model_name="vit_tiny_patch16_224", batch=4, device="cuda", seed=0):
    """(block, its input tokens, its float output): the second block of a randomly
    initialised timm ViT quantized W4A4 (rtn), with reconstruction's wrappers installed
    (AdaRound soft rounding, LSQ steps, QDrop p = 0.5)."""
    import fastquant
    from fastquant._compat import import_timm
    from fastquant.recon import LearnableState
    from fastquant.adapters import embed

    timm = import_timm()
    torch.manual_seed(seed)
    model = timm.create_model(model_name, pretrained=False, num_classes=10).to(device).eval()
    calib = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed)).to(device)
    q = fastquant.quantize(model, calib, fastquant.QuantConfig(w_bits=4, a_bits=4, method="rtn"), progress=False)
    for p in list(model.parameters()) + list(q.parameters()):
        p.requires_grad_(False)
    with torch.no_grad():
        tokens = model.blocks[0](embed(model, calib))
        target = model.blocks[1](tokens)
    block = q.blocks[1]
    state = LearnableState([block])
    return block, state, tokens, target


def recon_steps(block, state, tokens, target, steps, fused: bool, seed=0):
    """Losses and the first step's gradients of ``steps`` Adam steps of AdaRound + LSQ +
    QDrop on a copy of ``block`` (its QuantLinears on the grid path; fused or the fp32
    reference grid product)."""
    block, state = copy.deepcopy((block, state))
    weights, acts = state.of([block])
    params = [w.alpha for _, w in weights] + [a.scale for a in acts if a.scale is not None]
    for p in params:
        p.requires_grad_(True)
    for _, w in weights:
        w.soft = True
    gen = torch.Generator(device=tokens.device).manual_seed(seed)
    for a in acts:
        a.drop_p, a.generator = 0.5, gen
    for m in block.modules():
        if isinstance(m, QuantLinear):
            m.grid_dtype = torch.float32
    opt = torch.optim.Adam([{"params": params[:len(weights)], "lr": 1e-2}, {"params": params[len(weights):],
                                                                              "lr": 4e-5}])
    losses, grads = [], None
    with settings.overridden(fused_recon=fused):
        for _ in range(steps):
            loss = torch.nn.functional.mse_loss(block(tokens), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grads is None:
                grads = [p.grad.detach().clone() for p in params]
            opt.step()
            losses.append(loss.item())
    return losses, grads


@needs_gpu
def test_recon_step_matches_the_reference_on_gpu():
    """One block's reconstruction steps (AdaRound + LSQ + QDrop) with the fused op and with
    the fp32 reference grid product, same seed: the first loss to fp16 operand rounding
    (1e-3), the first step's gradients within 2% (relative L2), the trajectory over three
    steps within 1%."""
    block, state, tokens, target = recon_step_models()
    ref_losses, ref_grads = recon_steps(block, state, tokens, target, 3, fused=False)
    losses, grads = recon_steps(block, state, tokens, target, 3, fused=True)
    assert abs(losses[0] - ref_losses[0]) <= 1e-3 * ref_losses[0], (losses, ref_losses)
    for g, r in zip(grads, ref_grads):
        assert (g - r).norm() <= 2e-2 * r.norm() + 1e-30, ((g - r).norm().item(), r.norm().item())
    for a, b in zip(losses, ref_losses):
        assert abs(a - b) <= 1e-2 * b, (losses, ref_losses)
