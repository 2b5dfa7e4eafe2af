"""The fused quantized attention of the CPU extension (csrc/cpu_int8.cpp, backend ``cpu``)
against its PyTorch twin (fastquant.ops.attention), and deployed models that use it.

Log softmax codes: the bounds of tests/test_kernels_attention.py (derived there from the
contract): the CPU kernel sums P' (a_v + c_v) in fp32 in some order and computes the
softmax with its own exponential, as the GPU kernels do, and keeps every P' in fp32 (no
fp16 flush). Uniform softmax codes (p_steps 0): the products and sums are int32, exact; the
only float steps after the softmax are the int32 -> fp32 conversion and the multiplication
by p_scale s_v (two roundings, 2^-23 of |O|), unless a probability lies within rounding of a
half step (P / p_scale = n + 1/2), where either code is right: such a flip may add
p_scale s_v |a_v + c_v|.
"""
import pytest
import torch
from test_kernels_attention import (
    CASES,
    TIES_CASE,
    case_args,
    check_against_twin,
    make_inputs,
)

import fastquant
from fastquant import backends
from fastquant.ops.attention import QUANT_ATTENTION, _codes, torch_quant_attention

pytestmark = pytest.mark.skipif(not backends.CPU_EXT_AVAILABLE, reason=f"no CPU extension: {backends.CPU_EXT_REASON}")

HALF_WIDTH = 1e-5  # relative distance of P / p_scale from n + 1/2 within which either code is right


def _float32(args):
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


@pytest.mark.parametrize("name", list(CASES) + [TIES_CASE])
def test_log_softmax_cases_match_the_twin(name):
    args = _float32(case_args(name)[0])
    out = QUANT_ATTENTION(*args, backend="cpu")
    r = check_against_twin(out, args)
    assert r["shape_ok"] and out.dtype == torch.float32
    assert r["within_allowed"], r
    assert r["beyond_tight"] <= 8, r


@pytest.mark.parametrize("b,h,n,d,a_bits,p_bits,gain", [
    (2, 3, 197, 64, 8, 8, 2.0), (1, 6, 50, 64, 6, 8, 1.0), (2, 2, 17, 32, 4, 4, 3.0), (1, 2, 65, 128, 8, 6, 1.5)])
def test_uniform_softmax_matches_the_twin(b, h, n, d, a_bits, p_bits, gain):
    q, k, v, (s_q, z_q, s_k, z_k, s_v, z_v) = make_inputs(b, h, n, d, "float32", a_bits, gain, seed=n)
    p_scale = 1.0 / ((1 << p_bits) - 1)
    args = (q, k, v, s_q, z_q, s_k, z_k, s_v, z_v, a_bits, d ** -0.5, p_scale, 0, p_bits)
    out = QUANT_ATTENTION(*args, backend="cpu")
    ref = torch_quant_attention(*args).double()
    # where a probability sits on a half step, either code is right
    qmax, o = (1 << a_bits) - 1, 1 << (a_bits - 1)
    sq, zq, sk, zk = (t.reshape(1, -1, 1, 1) for t in (s_q, z_q, s_k, z_k))
    a_q, a_k = _codes(q, sq, zq, qmax, o), _codes(k, sk, zk, qmax, o)
    c_q, c_k = (o - zq).to(torch.int64), (o - zk).to(torch.int64)
    t = a_q @ a_k.transpose(-2, -1) + c_k * a_q.sum(-1, keepdim=True) + c_q * a_k.sum(-1).unsqueeze(-2) + d * c_q * c_k
    p64 = torch.softmax(t.double() * ((sq * sk) * torch.tensor(d ** -0.5)).double(), -1) / p_scale
    frac = p64 - torch.floor(p64)
    near_half = ((frac - 0.5).abs() < HALF_WIDTH * p64.clamp_min(1.0))
    v_int = (_codes(v, s_v, z_v, qmax, o) + (o - z_v).to(torch.int64)).double().abs()
    amp = p_scale * float(s_v)
    allowed = (2.0 ** -22 * ref.abs() + 1e-30 + amp * (near_half.double() @ v_int).transpose(1, 2))
    err = (out.double() - ref).abs()
    assert (err <= allowed).all(), float((err - allowed).max())
    assert int((err > 2.0 ** -22 * ref.abs() + 1e-30).sum()) <= 8 * max(1, int(near_half.sum()))


def test_strided_and_contiguous_inputs_agree():
    q, k, v, params = make_inputs(1, 3, 33, 64, "float32", 8, 1.0)
    args = (*params, 8, 0.125, 1.0, 2, 4)
    assert torch.equal(QUANT_ATTENTION(q, k, v, *args, backend="cpu"),
                       QUANT_ATTENTION(q.contiguous(), k.contiguous(), v.contiguous(), *args, backend="cpu"))


@pytest.mark.parametrize("method,bits,softmax_kind", [("repq", 8, "uniform"), ("rtn", 4, "log")])
def test_cpu_deployment_fuses_attention(tiny, tiny_data, method, bits, softmax_kind):
    from fastquant.data import stack
    from fastquant.nn import FusedQuantAttention

    model, _, _ = tiny
    calib, test = tiny_data
    q = fastquant.quantize(model, calib[:32], fastquant.QuantConfig(method=method, w_bits=bits, a_bits=bits),
                           progress=False)
    assert q.blocks[0].attn.matmul_pv.a_quant.kind == softmax_kind
    dep = fastquant.convert(q, "cpu")
    rep = fastquant.record_of(dep).deploy
    assert len(rep.fused_attention) == len(q.blocks) and not rep.unfused_attention
    assert all(isinstance(b.attn, FusedQuantAttention) and b.attn.fused_backend == "cpu" for b in dep.blocks)
    x, _ = stack(test, range(200))
    with torch.no_grad():
        ref, out = q(x), dep(x)
    assert float((ref.argmax(1) == out.argmax(1)).float().mean()) >= 0.98
    assert (out - ref).abs().median() <= 1e-3 * ref.abs().max()


def test_fused_cpu_attention_saves_and_loads(tiny, tiny_data, tmp_path):
    model, _, _ = tiny
    calib, _ = tiny_data
    q = fastquant.quantize(model, calib[:32], fastquant.QuantConfig(method="repq", w_bits=8, a_bits=8),
                           progress=False)
    dep = fastquant.convert(q, "cpu")
    fastquant.save(dep, tmp_path / "d.safetensors")
    back = fastquant.load(tmp_path / "d.safetensors")
    assert fastquant.record_of(back).deploy.fused_attention == fastquant.record_of(dep).deploy.fused_attention
    x = calib[32:40]
    with torch.no_grad():
        assert torch.equal(back(x), dep(x))


def test_inputs_needing_gradients_take_the_fake_quant_path(tiny, tiny_data, monkeypatch):
    """The kernel computes no gradient: an input that needs one runs the module's fake-quant
    forward (QuantAttention's) instead of the fused op."""
    from fastquant.nn import QuantAttention

    model, _, _ = tiny
    calib, _ = tiny_data
    q = fastquant.quantize(model, calib[:16], fastquant.QuantConfig(method="rtn", w_bits=8, a_bits=8),
                           progress=False)
    attn = fastquant.convert(q, "cpu").blocks[0].attn
    from fastquant.nn import deployed

    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return QUANT_ATTENTION(*args, **kwargs)

    monkeypatch.setattr(deployed, "QUANT_ATTENTION", type("Spy", (), {"__call__": staticmethod(spy),
                                                                       "supports": QUANT_ATTENTION.supports})())
    x = torch.randn(2, 50, attn.qkv.in_features, requires_grad=True)
    assert torch.equal(attn(x), QuantAttention.forward(attn, x)) and calls == []
    with torch.no_grad():
        attn(x)
    assert calls == ["cpu"]
