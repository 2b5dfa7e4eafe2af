"""Deployed int8 linear layers: the PyTorch twins, and the Triton kernels against them.

Without a GPU the Triton kernels run in Triton's CPU interpreter, in one child process
started with TRITON_INTERPRET=1 (see test_kernels_int8.py for why); each case is reported
as its own test. Quantization is compared bit for bit; the GEMM's float32 epilogue within
float32 rounding (the compiler may contract it into fused multiply-adds), and an fp16 or
bf16 output within one unit in the last place of the correctly rounded reference.
"""

import pytest
import torch
from _interp import run_interpreted  # tests/_interp.py (the tests folder is on sys.path)
from _marks import needs_gpu  # tests/_marks.py

from fastquant.nn import Int8Linear
from fastquant.ops.int8_linear import torch_int8_gemm, torch_quantize_asym


# name -> (code building x, bits, calibrated (scale, zero) or None, keyword arguments)
QUANTIZE_CASES = {
    "per_token_a8_197x384": ("torch.randn(197, 384) * 2 + 0.3", 8, None, {}),
    "per_token_a4_chunked_37x100": ("torch.randn(37, 100)", 4, None, {"block_k": 32}),
    "per_token_a3_transposed": ("torch.randn(96, 21).t()", 3, None, {}),
    "per_token_positive_rows_fp16": ("(torch.rand(9, 64) + 0.5).half()", 8, None, {}),
    "per_tensor_a8_bf16": ("(torch.randn(33, 96) * 3).bfloat16()", 8, (0.05, 85.0), {}),
    "per_tensor_a6_ties": ("torch.arange(-40.0, 40.0, 0.5).reshape(4, 40) * 0.25", 6, (0.25, 31.0), {}),
    "no_rows": ("torch.randn(0, 16)", 8, None, {}),
}
# name -> (M, K, N, bias, out dtype, blocks)
GEMM_CASES = {  # "w4": the weight packed two codes per byte, values -8..7
    "w4_37x101x40_fp32_bias": (37, 101, 40, True, "float32", (16, 16, 32)),
    "w4_65x64x48_fp16": (65, 64, 48, False, "float16", (16, 32, 64)),
    "37x96x40_fp32_bias": (37, 96, 40, True, "float32", (16, 16, 32)),
    "197x100x72_fp32_k_tail": (197, 100, 72, False, "float32", (32, 32, 32)),
    "65x64x48_fp16_bias": (65, 64, 48, True, "float16", (16, 32, 32)),
    "1x32x16_bf16": (1, 32, 16, True, "bfloat16", (16, 16, 32)),
}

_CHILD = r"""
import importlib.util, json, sys
import torch
from fastquant.kernels import int8_linear as K
from fastquant.ops.int8_linear import pack_weight_int4, torch_int8_gemm, torch_quantize_asym

spec = importlib.util.spec_from_file_location("cases", sys.argv[1])
cases = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cases)
torch.manual_seed(0)
report = {"interpreted": K.INTERPRETED, "quantize": {}, "gemm": {}}
for name, (code, bits, calib, kw) in cases.QUANTIZE_CASES.items():
    x = eval(code)
    args = (bits,) if calib is None else (bits, torch.tensor(calib[0]), torch.tensor(calib[1]))
    got, ref = K.triton_quantize_asym(x, *args, **kw), torch_quantize_asym(x, *args)
    report["quantize"][name] = {
        "equal": [bool(torch.equal(g, r)) for g, r in zip(got, ref)],
        "dtypes": [str(g.dtype) for g in got],
        "mismatches": int((got[0] != ref[0]).sum()),
    }
for name, (m, k, n, bias, out, blocks) in cases.GEMM_CASES.items():
    g = torch.Generator().manual_seed(m * n)
    x = torch.randn(m, k, generator=g)
    a, rowsum, s_x, c_x = torch_quantize_asym(x, 8)
    w4 = name.startswith("w4")
    b = torch.randint(-8 if w4 else -128, 8 if w4 else 128, (k, n), dtype=torch.int8, generator=g)
    s_w, c_w = torch.rand(n, generator=g) * 0.01, torch.randint(-8, 8, (n,), generator=g).float()
    b_sum = b.float().sum(0) + k * c_w
    bias_t = torch.randn(n, generator=g) if bias else None
    dt = getattr(torch, out)
    args = (a, b, rowsum, s_x, c_x, s_w, c_w, b_sum, bias_t)
    y = K.triton_int8_gemm(a, pack_weight_int4(b) if w4 else b, *args[2:], out_dtype=dt, blocks=blocks)
    ref32 = torch_int8_gemm(*args, out_dtype=torch.float32)
    # float32: within float32 rounding of the epilogue; fp16/bf16: the correctly rounded
    # reference within one unit in the last place of the output type
    eps = 1e-6 if out == "float32" else torch.finfo(dt).eps
    err = (y.float() - ref32.to(dt).float()).abs()
    report["gemm"][name] = {
        "dtype_ok": y.dtype == dt and tuple(y.shape) == (m, n),
        "max_err": float(err.max()),
        "ref_max": float(ref32.abs().max()),
        "within": bool((err <= eps * ref32.abs() + 1e-6 * ref32.abs().max()).all()),
    }
# The deployed layer with backend "triton" (the interpreter runs it on CPU tensors).
from test_deploy import _layer  # the tests folder is on the child's PYTHONPATH
from fastquant.nn import Int8Linear
report["layer"] = {}
for w_bits, per_token in ((4, False), (4, True), (8, True)):
    dep = Int8Linear.pack(_layer(w_bits, 8, per_token, bias=True))
    x = torch.randn(2, 19, 96) * 2
    ref = dep.reference(x.reshape(-1, 96)).reshape(2, 19, 40)
    dep.set_backend("triton")
    y = dep(x)
    report["layer"][f"w{w_bits}_{'per_token' if per_token else 'per_tensor'}"] = {
        "packed": dep.weight_packed is not None and dep.weight_packed.dtype == torch.uint8,
        "shape_ok": y.shape == ref.shape and y.dtype == x.dtype,
        "within": bool((y - ref).abs().max() <= 1e-5 * ref.abs().max())}
json.dump(report, sys.stdout)
"""


@pytest.fixture(scope="module")
def report():
    return run_interpreted(_CHILD, __file__)


def test_twins_compose_to_the_deployed_layer():
    """quantize + GEMM twins = Int8Linear.reference (which folds the per-tensor constants)."""
    from test_deploy import _layer  # the tests folder is on sys.path (no __init__.py)

    for per_token in (False, True):
        dep = Int8Linear.pack(_layer(4, 8, per_token, bias=True))
        x = torch.randn(50, 96) * 2
        scale = None if per_token else dep.x_scale
        a, rowsum, s_x, c_x = torch_quantize_asym(x, 8, scale, None if per_token else dep.x_zero)
        y = torch_int8_gemm(a, dep.weight_t, rowsum, s_x, c_x, dep.w_scale, dep.w_corr, dep.b_sum, dep.bias,
                            out_dtype=torch.float32)
        ref = dep.reference(x)
        assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_interpreter_really_interprets(report):
    assert report["interpreted"]


@pytest.mark.parametrize("case", list(QUANTIZE_CASES))
def test_triton_quantize_asym_equals_reference(report, case):
    r = report["quantize"][case]
    assert r["dtypes"] == ["torch.int8", "torch.int32", "torch.float32", "torch.float32"], r
    assert all(r["equal"]), r


@pytest.mark.parametrize("case", list(GEMM_CASES))
def test_triton_int8_gemm_equals_reference(report, case):
    r = report["gemm"][case]
    assert r["dtype_ok"] and r["within"], r


@pytest.mark.parametrize("case", ["w4_per_tensor", "w4_per_token", "w8_per_token"])
def test_int8_linear_triton_backend_equals_its_reference(report, case):
    r = report["layer"][case]
    assert r["shape_ok"] and r["within"], r
    assert r["packed"] == case.startswith("w4"), r


def test_pack_weight_int4_layout():
    from fastquant.ops.int8_linear import pack_int4, pack_weight_int4, unpack_int4, unpack_weight_int4

    w = torch.tensor([[-8, 7], [0, -1], [3, 5]], dtype=torch.int8)  # K = 3 (odd), N = 2
    packed = pack_weight_int4(w)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 2)
    # row 0: k=0 low nibble, k=1 high nibble (code = value + 8); row 1: k=2, then the pad (code 8)
    assert packed.tolist() == [[0 | (8 << 4), 15 | (7 << 4)], [11 | (8 << 4), 13 | (8 << 4)]]
    assert torch.equal(unpack_weight_int4(packed, 3), w)
    # The same packing along the last dim is the saved file's layout (odd length padded with 0).
    codes = torch.tensor([[1, 2, 3], [15, 0, 9]], dtype=torch.uint8)
    assert pack_int4(codes, dim=-1).tolist() == [[1 | (2 << 4), 3], [15, 9]]
    assert torch.equal(unpack_int4(pack_int4(codes, dim=-1), 3, dim=-1), codes)


@needs_gpu
def test_triton_int8_linear_on_gpu():
    from fastquant.kernels import int8_linear as K

    torch.manual_seed(0)
    m, k, n = 64 * 197, 768, 3072
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    got = K.triton_quantize_asym(x, 8)
    ref = torch_quantize_asym(x.cpu(), 8)
    assert all(torch.equal(g.cpu(), r) for g, r in zip(got, ref))
    b = torch.randint(-128, 128, (k, n), dtype=torch.int8)
    s_w, c_w = torch.rand(n) * 0.01, torch.zeros(n)
    b_sum = b.float().sum(0)
    args = (ref[0], b, ref[1], ref[2], ref[3], s_w, c_w, b_sum, None)
    y = K.triton_int8_gemm(*[t.cuda() if t is not None else None for t in args], out_dtype=torch.float32)
    y_ref = torch_int8_gemm(*args, out_dtype=torch.float32)
    assert ((y.cpu() - y_ref).abs() <= 1e-6 * y_ref.abs() + 1e-6 * y_ref.abs().max()).all()
