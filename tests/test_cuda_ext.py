"""The CUDA C++ extension (fastquant._C, csrc/) against its PyTorch twins, on a GPU.

Skipped without a CUDA GPU and the built extension (CI compile-checks the sources with
nvcc instead: tests/test_compile_checks.py). The twins run on the CPU: the integer GEMM
twin needs int64 matmuls, which CUDA lacks.
"""
import copy

import pytest
import torch
from _marks import dinov2_weights_missing, fmnist_missing, gpu_marks  # tests/ is on sys.path
from test_kernels_attention import check_against_twin, make_inputs

from fastquant import backends
from fastquant.ops.int8_linear import pack_weight_int4, torch_int8_gemm, torch_quantize_asym

pytestmark = gpu_marks("needs a CUDA GPU and the CUDA extension"
                       + (f" ({backends.CUDA_EXT_REASON})" if backends.CUDA_EXT_REASON else ""),
                       extra_condition=not backends.CUDA_EXT_AVAILABLE)


def _x(rows, cols, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, cols, generator=g) * 2 + 0.3).to(dtype)


@pytest.mark.parametrize("rows,cols", [(1, 384), (203, 97), (197, 768)])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("per_token", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_asym_equals_the_twin_bit_for_bit(rows, cols, bits, per_token, dtype):
    from fastquant import _C

    x = _x(rows, cols, dtype)
    scale, zero = (None, None) if per_token else (torch.tensor([0.05]), torch.tensor([float((1 << bits) // 3)]))
    ref = torch_quantize_asym(x, bits, scale, zero)
    got = _C.quantize_asym(x.cuda(), bits) if per_token else _C.quantize_asym(x.cuda(), bits, scale.cuda(), zero.cuda())
    for r, g in zip(ref, got):
        assert torch.equal(r, g.cpu())


@pytest.mark.parametrize("m,k,n", [(203, 97, 40), (197, 384, 1536), (1, 768, 768), (130, 64, 200)])
@pytest.mark.parametrize("w4", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_gemm_equals_the_twin_bit_for_bit(m, k, n, w4, out_dtype, bias):
    """Exact int32 sums and the twin's epilogue, each float operation rounded on its own:
    equal bits (odd K and N take the bounds-checked loads, the others the vector ones)."""
    from fastquant import _C

    g = torch.Generator().manual_seed(1)
    a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-8, 8, (k, n), generator=g, dtype=torch.int8) if w4 else \
        torch.randint(-128, 128, (k, n), generator=g, dtype=torch.int8)
    rowsum = a.int().sum(1).int()
    s_x, c_x = torch.rand(m, generator=g) * 0.1 + 0.01, torch.randint(-3, 4, (m,), generator=g).float()
    s_w, c_w = torch.rand(n, generator=g) * 0.1 + 0.01, torch.randint(-3, 4, (n,), generator=g).float()
    b_sum = b.float().sum(0) + k * c_w
    bias_t = torch.randn(n, generator=g) if bias else None
    ref = torch_int8_gemm(a, b, rowsum, s_x, c_x, s_w, c_w, b_sum, bias_t, out_dtype=out_dtype)
    cuda = [t.cuda() if t is not None else None for t in (a, pack_weight_int4(b) if w4 else b, rowsum, s_x, c_x, s_w, c_w,
                                                          b_sum, bias_t)]
    got = _C.int8_gemm(*cuda, out_dtype)
    assert got.dtype == out_dtype and torch.equal(got.cpu(), ref)


@pytest.mark.parametrize("k,n", [(768, 3072), (97, 40), (1, 5)])
def test_pack_int4_equals_the_twin(k, n):
    from fastquant import _C

    w = torch.randint(-8, 8, (k, n), generator=torch.Generator().manual_seed(2), dtype=torch.int8)
    assert torch.equal(_C.pack_int4(w.cuda()).cpu(), pack_weight_int4(w))


@pytest.mark.parametrize("n", [197, 65, 17, 256])
@pytest.mark.parametrize("a_bits,p_steps,p_bits", [(8, 1, 4), (4, 2, 4), (6, 2, 8)])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_quant_attention_matches_the_twin(n, a_bits, p_steps, p_bits, dtype):
    """The bounds of tests/test_kernels_attention.py (derived there from the contract)."""
    from fastquant import _C
    from fastquant.quant import LogQuantizer

    q, k, v, params = make_inputs(2, 3, n, 64, dtype, a_bits, 2.0, device="cuda")
    args = (q, k, v, *params, a_bits, 64 ** -0.5, 0.9, p_steps, p_bits)
    lq = LogQuantizer(p_bits, "2" if p_steps == 1 else "sqrt2")
    lq.scale.fill_(0.9)
    levels = lq.dequantize(torch.arange(lq.zero_code + 1)).float().cuda()
    s_q, z_q, s_k, z_k, s_v, z_v = params
    out = _C.quant_attention(q, k, v, s_q.cuda(), z_q.cuda(), s_k.cuda(), z_k.cuda(), float(s_v), float(z_v), a_bits,
                             64 ** -0.5, levels, 0.9, p_steps, p_bits, q.dtype)
    r = check_against_twin(out, args)
    assert r["shape_ok"] and r["within_allowed"] and r["beyond_tight"] <= max(8, r["elements"] // 1000), r


@pytest.mark.skipif(bool(dinov2_weights_missing() or fmnist_missing()),
                    reason=dinov2_weights_missing() or fmnist_missing())
def test_cuda_deployment_keeps_the_predictions():
    """convert(model.cuda(), 'cuda') on dinov2-s14-fmnist (head dim 64, 65 tokens): every
    linear layer on the CUDA GEMM, every attention fused, predictions as the fake-quant model's."""
    import fastquant
    from fastquant.data import load_dataset, stack
    from fastquant import convert, record_of
    from fastquant.nn import FusedQuantAttention, Int8Linear
    from fastquant.models import load_model

    model, dcfg, _ = load_model("dinov2-s14-fmnist")
    calib, _ = stack(load_dataset("fmnist", "train", dcfg), range(64))
    q = fastquant.quantize(model, calib[:32], fastquant.QuantConfig(method="rtn", w_bits=8, a_bits=8), progress=False)
    dep = convert(copy.deepcopy(q).cuda(), "cuda")
    assert all(m.backend == "cuda" for m in dep.modules() if isinstance(m, Int8Linear))
    assert record_of(dep).deploy.fused_attention and not record_of(dep).deploy.unfused_attention
    assert all(isinstance(dep.get_submodule(n), FusedQuantAttention) for n in record_of(dep).deploy.fused_attention)
    x = calib[32:64]
    with torch.no_grad():
        ref, out = q(x), dep(x.cuda()).cpu()
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    assert (out - ref).abs().median() <= 1e-2 * ref.abs().max()
