"""Fused quantized attention: the Triton kernel against its PyTorch twin.

Without a GPU the kernel runs in Triton's CPU interpreter, in one child process started
with TRITON_INTERPRET=1 (see test_kernels_int8.py for why); each case is reported as its
own test. Cases use large tiles so that each runs a handful of program instances.

Tolerance, derived from the contract (``fastquant.ops.attention``). The integer codes and
T are exact, so the kernel and the twin differ only through:

1. the fp32 sum of ``P' (a_v + c_v)`` (the twin sums in float64): at most
   ``(N + 4) 2^-23`` times ``M = p_scale s_v sum_j P'_j |a_v + c_v|`` (the sum of the
   terms' magnitudes): N + 4 roundings (the sum in any order, the epilogue's), each of
   at most 2^-23 relative, which also covers tensor cores' fp32 sums rounding toward
   zero (twice round-to-nearest's 2^-24);
2. P' in fp16: the kernel keeps the powers of two 2^-n exact (log-sqrt2's factor 2^-0.5
   is applied in fp32), and fp16 flushes those below 2^-24, which loses at most those P';
3. the output type's rounding: half an ulp of |O| (one ulp for bf16, which the
   interpreter stores rounding toward zero);
4. a probability within rounding distance of the midpoint between two levels (or of the
   zero code's threshold) may take the other level. Both sides compute P to about 1e-6
   relative (the twin's float32 softmax; the kernel's exponent and row sums), so the
   test finds, from a float64 softmax, every probability whose ``w = -p_steps
   log2(P / p_scale)`` lies within 1e-4 of such a decision point, and allows each its
   level gap times ``p_scale s_v |a_v + c_v|``.

Every element must be within 1 + 2 + 3 + 4 ("allowed"), and all but a handful within
1 + 2 + 3 ("tight"; only rows holding a flipped code may exceed it).
"""
import math

import pytest
import torch
from _interp import run_interpreted  # tests/_interp.py (the tests folder is on sys.path)
from _marks import needs_gpu  # tests/_marks.py

from fastquant.ops.attention import _codes, quant_attention, torch_quant_attention
from fastquant.quant import log_codes
from fastquant.quant import range_to_qparams


# name -> (B, H, N, D, input dtype, a_bits, p_steps, p_bits, p_scale, gain, blocks, out dtype)
# gain scales q and k (per head, times 1, 1.5, 2, ...): larger gains give peakier softmaxes,
# whose probabilities reach the small levels and the zero code. blocks None: the wrapper's.
CASES = {
    "n197_a8_log2_p4_fp32_default_blocks": (2, 3, 197, 64, "float32", 8, 1, 4, 1.0, 2.0, None, None),
    "n197_a4_sqrt2_p4_fp16_4_key_tiles": (1, 2, 197, 64, "float16", 4, 2, 4, 0.8, 2.0, (64, 64), None),
    "n65_a8_sqrt2_p8_fp16_tail_of_1_key": (2, 2, 65, 64, "float16", 8, 2, 8, 1.0, 1.5, (128, 64), None),
    "n65_a4_log2_p3_bf16": (1, 3, 65, 64, "bfloat16", 4, 1, 3, 0.9, 2.5, (64, 128), None),
    "n17_a8_log2_p8_fp32_peaky": (2, 3, 17, 64, "float32", 8, 1, 8, 1.0, 6.0, (32, 32), None),
    "n17_a6_sqrt2_p6_d32_fp16_to_fp32": (1, 2, 17, 32, "float16", 6, 2, 6, 0.7, 2.0, (32, 32), "float32"),
    "n33_a6_log2_p5_d128_fp32": (1, 2, 33, 128, "float32", 6, 1, 5, 1.0, 1.5, (64, 64), None),
    "n1_a8_sqrt2_p4_fp32": (2, 2, 1, 64, "float32", 8, 2, 4, 0.5, 1.0, (16, 16), None),
}
# Data on a grid of quarter steps, so that many x / s land exactly on .5 (round half to
# even decides them): q, k, v in multiples of 0.125 with steps 0.25.
TIES_CASE = "ties_n40_a8_log2_p4_fp32"
CASE_NAMES = list(CASES) + [TIES_CASE]

MIDPOINT_WIDTH = 1e-4  # in w = -p_steps log2(P / p_scale) units (see the module docstring)


def make_inputs(b, h, n, d, dtype, a_bits, gain, seed=0, device="cpu"):
    """q, k, v [B, H, N, D] as the model has them (views of one qkv tensor, permuted) and
    per-head / per-tensor quantizer parameters from their ranges (min-max calibration)."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, n, 3, h, d, generator=g) + 0.3 * torch.randn(1, 1, 3, h, d, generator=g)
    head_gain = gain * (1.0 + 0.5 * torch.arange(h, dtype=torch.float32)).reshape(1, 1, 1, h, 1)
    qkv[:, :, :2] *= head_gain
    qkv = qkv.to(device=device, dtype=getattr(torch, dtype))
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # [B, H, N, D] each, non-contiguous
    qmax = (1 << a_bits) - 1
    params = []
    for x in (q, k):
        per_head = x.float().transpose(0, 1).reshape(h, -1)
        params += list(range_to_qparams(per_head.amin(1), per_head.amax(1), qmax))
    params += list(range_to_qparams(v.float().amin(), v.float().amax(), qmax))
    return q, k, v, params


def ties_inputs():
    g = torch.Generator().manual_seed(3)
    qkv = torch.randint(-20, 21, (1, 40, 3, 2, 64), generator=g).float() * 0.125
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    s = torch.full((2,), 0.25)
    z = torch.tensor([128.0, 120.0])
    return (q, k, v, s, z, s, z.flip(0), torch.tensor(0.25), torch.tensor(131.0), 8, 0.125, 1.0, 1, 4)


def case_args(name, device="cpu"):
    """(arguments of triton_quant_attention and torch_quant_attention, keyword arguments
    of the Triton wrapper only)."""
    if name == TIES_CASE:
        return tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in ties_inputs()), {"blocks": (64, 64)}
    b, h, n, d, dtype, a_bits, p_steps, p_bits, p_scale, gain, blocks, out = CASES[name]
    q, k, v, (s_q, z_q, s_k, z_k, s_v, z_v) = make_inputs(b, h, n, d, dtype, a_bits, gain, device=device)
    args = (q, k, v, s_q, z_q, s_k, z_k, s_v, z_v, a_bits, d ** -0.5, p_scale, p_steps, p_bits)
    return args, {"blocks": blocks, "out_dtype": getattr(torch, out) if out else None}


def check_against_twin(out, args) -> dict:
    """Compare the kernel's output with torch_quant_attention under the module docstring's
    bounds; returns the figures (floats, ints and the two verdicts)."""
    q, k, v, s_q, z_q, s_k, z_k, s_v, z_v, a_bits, sm_scale, p_scale, p_steps, p_bits = args
    args = tuple(t.cpu() if isinstance(t, torch.Tensor) else t for t in args)
    ref = torch_quant_attention(*args)  # [B, N, H, D] float32
    q, k, v, s_q, z_q, s_k, z_k, s_v, z_v = args[:9]
    bsz, heads, n, d = q.shape
    qmax, o = (1 << a_bits) - 1, 1 << (a_bits - 1)
    zero_code = (1 << p_bits) - 1

    # The twin's probabilities, in float64 from the exact T, and its codes
    col = dict(dtype=torch.float32)
    sq, zq = torch.as_tensor(s_q, **col).reshape(1, -1, 1, 1), torch.as_tensor(z_q, **col).reshape(1, -1, 1, 1)
    sk, zk = torch.as_tensor(s_k, **col).reshape(1, -1, 1, 1), torch.as_tensor(z_k, **col).reshape(1, -1, 1, 1)
    sv, zv = torch.as_tensor(s_v, **col).reshape(()), torch.as_tensor(z_v, **col).reshape(())
    a_q, a_k = _codes(q, sq, zq, qmax, o), _codes(k, sk, zk, qmax, o)
    v_int = (_codes(v, sv, zv, qmax, o) + (o - zv).to(torch.int64)).double()  # a_v + c_v
    c_q, c_k = (o - zq).to(torch.int64), (o - zk).to(torch.int64)
    t = (a_q @ a_k.transpose(-2, -1) + c_k * a_q.sum(-1, keepdim=True)
         + c_q * a_k.sum(-1).unsqueeze(-2) + d * c_q * c_k)
    scale = ((sq * sk) * torch.tensor(sm_scale, **col)).double()
    p64 = torch.softmax(t.double() * scale, dim=-1)
    p32 = torch.softmax(t.float() * scale.float(), dim=-1)
    e = log_codes(p32, p_scale, p_steps, zero_code).double()
    p_lvl = torch.where(e == zero_code, torch.zeros_like(e), torch.exp2(-e / p_steps))

    # 4: probabilities near a decision point, and the level gap a flip there costs
    w = -p_steps * torch.log2((p64 / p_scale).clamp_min(1e-30))
    hi = torch.floor(w)
    mid = p_steps * math.log2(2.0 / (1.0 + 2.0 ** (-1.0 / p_steps)))

    def level(c):
        return torch.where(c >= zero_code, torch.zeros_like(c), torch.exp2(-c.clamp(min=0) / p_steps))

    near_mid = ((w - hi - mid).abs() < MIDPOINT_WIDTH) & (hi >= -1) & (hi < zero_code)
    near_zero = (w - zero_code).abs() < MIDPOINT_WIDTH
    gap = (torch.where(near_mid, level(hi) - level(hi + 1), torch.zeros_like(w))
           + torch.where(near_zero, level(torch.full_like(w, zero_code - 1.0)), torch.zeros_like(w)))

    # 1 + 2 + 3 and 4, per output element [B, H, N, D], moved to [B, N, H, D]
    amp = float(p_scale) * float(sv)
    mag = amp * (p_lvl @ v_int.abs())
    flushed = torch.where(torch.floor(e / p_steps) > 24, p_lvl, torch.zeros_like(p_lvl))
    out_ulp = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -7}[out.dtype]
    ref64 = ref.double()
    tight = ((n + 4) * 2.0 ** -23 * mag + amp * (flushed @ v_int.abs())).transpose(1, 2) + out_ulp * ref64.abs()
    allowed = tight + amp * (gap @ v_int.abs()).transpose(1, 2)
    err = (out.cpu().double() - ref64).abs()
    return {
        "shape_ok": tuple(out.shape) == (bsz, n, heads, d),
        "max_err": float(err.max()),
        "ref_max": float(ref64.abs().max()),
        "max_err_over_tight": float((err / tight.clamp_min(1e-30)).max()),
        "beyond_tight": int((err > tight).sum()),
        "elements": err.numel(),
        "near_decision_points": int((near_mid | near_zero).sum()),
        "codes_used": sorted(set(int(c) for c in e.unique())),
        "within_allowed": bool((err <= allowed).all()),
    }


_CHILD = r"""
import importlib.util, json, sys, time
import torch
from fastquant.kernels import attention as K

spec = importlib.util.spec_from_file_location("cases", sys.argv[1])
cases = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cases)
report = {"interpreted": K.INTERPRETED, "cases": {}}
for name in cases.CASE_NAMES:
    args, kwargs = cases.case_args(name)
    start = time.perf_counter()
    out = K.triton_quant_attention(*args, **kwargs)
    seconds = time.perf_counter() - start
    expected = kwargs.get("out_dtype") or args[0].dtype
    report["cases"][name] = {**cases.check_against_twin(out, args), "dtype_ok": out.dtype == expected,
                             "seconds": round(seconds, 2)}
json.dump(report, sys.stdout)
"""


@pytest.fixture(scope="module")
def report():
    return run_interpreted(_CHILD, __file__)


def test_interpreter_really_interprets(report):
    assert report["interpreted"]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_triton_quant_attention_matches_twin(report, case):
    r = report["cases"][case]
    assert r["shape_ok"] and r["dtype_ok"], r
    assert r["within_allowed"], r
    # a flipped code moves one row's outputs; anything beyond that is a bug
    assert r["beyond_tight"] <= max(8, r["elements"] // 1000), r


def test_cases_reach_the_small_levels_and_the_zero_code(report):
    """The cases exercise the log quantizer's range: its top, deep codes and zero."""
    used = set()
    for name, (*_, p_bits, _ps, _g, _bl, _o) in CASES.items():
        codes = set(report["cases"][name]["codes_used"])
        zero_code = (1 << p_bits) - 1
        used |= {"top" if 0 in codes else None, "zero" if zero_code in codes else None}
        used |= {"deep" if any(12 <= c < zero_code for c in codes) else None}
    assert {"top", "zero", "deep"} <= used, used


def _valid_cpu_args():
    q, k, v, params = make_inputs(1, 2, 5, 32, "float32", 8, 1.0)
    return [q, k, v, *params, 8, 32 ** -0.5, 1.0, 1, 4]


_BAD_INPUTS = [  # (argument index -> replacement, the error message expected)
    ({0: torch.randn(2, 5, 32)}, r"q must be a 4-D tensor \[B, H, N, D\], got \(2, 5, 32\)"),
    ({1: torch.randn(1, 2, 6, 32)}, r"same shape .* got \(1, 2, 5, 32\), \(1, 2, 6, 32\) and \(1, 2, 5, 32\)"),
    ({2: torch.randn(1, 2, 5, 32, dtype=torch.float64)}, r"share one dtype .* torch\.float64"),
    ({0: torch.ones(1, 2, 5, 32, dtype=torch.int8)}, r"share one dtype"),
    ({0: torch.randn(1, 2, 5, 48), 1: torch.randn(1, 2, 5, 48), 2: torch.randn(1, 2, 5, 48)},
     r"head dim D must be 16, 32, 64 or 128, got 48"),
    ({3: torch.ones(3)}, r"s_q must hold one value per head, shape \[2\], got \(3,\)"),
    ({6: torch.ones(2, 1)}, r"z_k must hold one value per head"),
    ({7: torch.ones(2)}, r"s_v must be a scalar"),
    ({9: 9}, r"a_bits must be 2\.\.8, got 9"),
    ({10: 0.0}, r"sm_scale must be positive and finite"),
    ({12: 3}, r"p_steps must be 0 \(uniform\), 1 \(log2\) or 2 \(log-sqrt2\), got 3"),
    ({13: 1}, r"p_bits must be 2\.\.8, got 1"),
]


@pytest.mark.parametrize("change, message", _BAD_INPUTS, ids=[m.split(" ")[0] for _, m in _BAD_INPUTS])
def test_op_rejects_bad_inputs(change, message):
    args = _valid_cpu_args()
    for i, value in change.items():
        args[i] = value
    with pytest.raises(ValueError, match="^quant_attention: .*" + message):
        quant_attention(*args)


def test_op_on_valid_inputs_is_the_twin():
    args = _valid_cpu_args()
    assert torch.equal(quant_attention(*args, backend="torch"), torch_quant_attention(*args))


def test_wrapper_rejects_bad_options_and_cpu_tensors():
    kernels = pytest.importorskip("fastquant.kernels.attention")
    args = _valid_cpu_args()
    with pytest.raises(ValueError, match="out_dtype must be float16, bfloat16 or float32"):
        kernels.triton_quant_attention(*args, out_dtype=torch.int32)
    with pytest.raises(ValueError, match=r"blocks must be two powers of two, at least 16, got \(48, 64\)"):
        kernels.triton_quant_attention(*args, blocks=(48, 64))
    if not kernels.INTERPRETED:  # compiled mode: CPU tensors are refused with the way out
        with pytest.raises(ValueError, match="expected CUDA tensors, got device cpu .*TRITON_INTERPRET=1"):
            kernels.triton_quant_attention(*args)


@needs_gpu
@pytest.mark.parametrize("heads, dtype, p_steps", [(12, "float16", 2), (6, "bfloat16", 1)])
def test_triton_quant_attention_on_gpu(heads, dtype, p_steps):
    from fastquant.kernels.attention import triton_quant_attention

    q, k, v, params = make_inputs(4, heads, 197, 64, dtype, 6, 2.0, device="cuda")
    args = (q, k, v, *params, 6, 64 ** -0.5, 1.0, p_steps, 6)
    r = check_against_twin(triton_quant_attention(*args), args)
    assert r["within_allowed"] and r["beyond_tight"] <= r["elements"] // 1000, r
