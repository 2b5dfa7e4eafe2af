"""Deployment: integer linear layers against the fake-quant layers they replace."""
import pytest
import torch
from _marks import needs_gpu  # tests/_marks.py
from torch import nn

import fastquant
from fastquant import convert, record_of
from fastquant.nn import Int8Linear
from fastquant.evaluate import evaluate
from fastquant.nn import QuantLinear, adopt
from fastquant.quant import UniformQuantizer


def _layer(w_bits: int, a_bits: int, per_token: bool, bias: bool, seed: int = 0) -> QuantLinear:
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(96, 40, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(40, 96, generator=gen) * 0.1 + 0.02)
        if bias:
            lin.bias.copy_(torch.randn(40, generator=gen))
    wq = UniformQuantizer(w_bits, (40, 1))
    wq.calibrate_tensor(lin.weight.detach())
    iq = UniformQuantizer(a_bits, (), per_token=per_token)
    if not per_token:
        iq.set_qparams(torch.tensor(0.05), torch.tensor(float((1 << a_bits) // 3)))  # asymmetric range
    iq.mode = "quant"
    return QuantLinear(lin, wq, iq)


@pytest.mark.parametrize("w_bits,a_bits", [(8, 8), (4, 8), (3, 3), (6, 4)])
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_equals_the_fake_quant_layer(w_bits, a_bits, per_token, bias):
    """Same codes, exact integer sums: only float rounding of the epilogue differs."""
    layer = _layer(w_bits, a_bits, per_token, bias)
    dep = Int8Linear.pack(layer)
    x = torch.randn(3, 37, 96) * 2 + 0.3  # some values clipped at both ends
    with torch.no_grad():
        ref, out = layer(x), dep(x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert dep.weight_t.dtype == torch.int8


def test_cpu_extension_is_built():
    """make test installs fastquant with its CPU extension; a failed (optional) build must
    not pass unnoticed, since the kernel tests below would then skip."""
    import os

    from fastquant import backends

    if os.environ.get("FASTQUANT_CPU_EXT") == "0":
        pytest.skip("FASTQUANT_CPU_EXT=0: the CPU extension was not meant to be built")
    assert backends.CPU_EXT_AVAILABLE, backends.CPU_EXT_REASON


@pytest.mark.parametrize("w_bits,a_bits", [(8, 8), (4, 8), (3, 3), (6, 4)])
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("rows", [1, 17, 203])  # below, at and above the kernels' 16-row grain
def test_fused_cpu_kernels_equal_the_reference(w_bits, a_bits, per_token, rows):
    """The fused kernels produce the same codes (a single different code would move an
    output by about s_x * |w| * s_w, far above the bound) and the same epilogue up to float
    rounding; inputs may be non-contiguous or bfloat16."""
    from fastquant import backends

    if not backends.CPU_EXT_AVAILABLE:
        pytest.skip(backends.CPU_EXT_REASON)
    dep = Int8Linear.pack(_layer(w_bits, a_bits, per_token, bias=True, seed=rows)).set_backend("cpu")
    gen = torch.Generator().manual_seed(rows)
    x = (torch.randn(96, rows, generator=gen) * 2 + 0.3).t()  # non-contiguous rows
    with torch.no_grad():
        ref = dep.reference(x)
        out = dep(x)
        assert out.dtype == torch.float32 and out.shape == (rows, 40)
        assert (out - ref).abs().max() <= 1e-6 * ref.abs().max()
        xb = x.to(torch.bfloat16)  # computed in float32, returned in the input's dtype
        outb, out32 = dep(xb), dep(xb.float())
        assert outb.dtype == torch.bfloat16 and torch.equal(outb, out32.to(torch.bfloat16))
        refb = dep.reference(xb)
        assert (out32 - refb).abs().max() <= 1e-6 * refb.abs().max()
    dep.set_backend("torch")
    with torch.no_grad():
        assert torch.equal(dep(x), ref)


def test_fused_cpu_kernels_check_their_inputs():
    from fastquant import backends

    if not backends.CPU_EXT_AVAILABLE:
        pytest.skip(backends.CPU_EXT_REASON)
    from fastquant import _C_cpu

    dep = Int8Linear.pack(_layer(8, 8, False, True))
    args = (8, dep.w_corr, dep.col_add, dep.col_scale)
    with pytest.raises(RuntimeError, match="x must be a contiguous 2-D float32"):
        _C_cpu.int8_linear_static(torch.zeros(4, 96, dtype=torch.float64), dep.weight_t, 0.1, 0.0, *args)
    with pytest.raises(RuntimeError, match="weight_t must be an int8"):
        _C_cpu.int8_linear_static(torch.zeros(4, 95), dep.weight_t, 0.1, 0.0, *args)
    with pytest.raises(RuntimeError, match="col_scale must be"):
        _C_cpu.int8_linear_static(torch.zeros(4, 96), dep.weight_t, 0.1, 0.0, 8, dep.w_corr, dep.col_add,
                                  dep.col_scale[:3])


def test_attention_fake_quant_kernel_equals_the_quantizer(tiny_w8a8):
    """convert() gives the attention operands' quantizers one-pass kernels; they compute
    exactly what UniformQuantizer.forward does (same float operations), per tensor and
    per head."""
    from fastquant import backends
    from fastquant.nn import KernelFakeQuant

    dep = convert(tiny_w8a8)
    quantizers = [m for m in dep.modules() if isinstance(m, KernelFakeQuant)]
    assert len(quantizers) >= 2 * len(dep.blocks)  # at least two per attention
    if not backends.CPU_EXT_AVAILABLE:
        pytest.skip(backends.CPU_EXT_REASON)
    x = (torch.randn(2, 3, 64, 197) * 3).transpose(-1, -2)  # non-contiguous, as attention operands are
    for q in quantizers[:4]:
        with torch.no_grad():
            assert torch.equal(q(x), UniformQuantizer.forward(q, x))
        assert set(q.state_dict()) == set(UniformQuantizer(8).state_dict())  # saved under the same names
    per_head = adopt(KernelFakeQuant, UniformQuantizer(4, (1, 3, 1, 1)))
    per_head.set_qparams(torch.tensor([0.1, 0.3, 0.05]), torch.tensor([7.0, 3.0, 12.0]))
    assert per_head._inner(x) == 197 * 64
    with torch.no_grad():
        assert torch.equal(per_head(x), UniformQuantizer.forward(per_head, x))
    assert per_head._inner(torch.zeros(3, 5)) == 0  # steps that do not fit: the PyTorch path


@pytest.mark.parametrize("bits,base", [(8, "2"), (4, "2"), (4, "sqrt2"), (6, "sqrt2"), (3, "2")])
def test_log_quant_kernel_equals_the_quantizer(bits, base):
    """The softmax's log quantizer in one pass: the same level as LogQuantizer.forward for
    softmax rows, exact levels, midpoints between levels, zero, and values above the scale."""
    from fastquant import backends
    from fastquant.nn import KernelLogQuant
    from fastquant.quant import LogQuantizer

    if not backends.CPU_EXT_AVAILABLE:
        pytest.skip(backends.CPU_EXT_REASON)
    q = adopt(KernelLogQuant, LogQuantizer(bits, base))
    q.scale.fill_(0.9)
    q.mode = "quant"
    levels = q.dequantize(torch.arange(q.zero_code + 1))
    mids = (levels[:-1] + levels[1:]) / 2
    special = torch.cat([levels, mids, torch.nextafter(mids, torch.zeros(())), torch.nextafter(levels, torch.ones(())),
                         torch.tensor([0.0, 1.0, 0.95, 1e-30, 1e-40, -0.5])])
    probs = torch.softmax(torch.randn(2, 3, 197, 197) * 4, -1)
    for x in (special, probs, probs.transpose(-1, -2)):
        with torch.no_grad():
            got, ref = q(x), LogQuantizer.forward(q, x)
        assert torch.equal(got, ref), (got - ref).abs().max()


def test_int8_linear_refuses_what_it_cannot_express():
    layer = _layer(8, 8, False, True)
    layer.input_quant = UniformQuantizer(8, (96,))
    layer.input_quant.mode = "quant"
    assert "per channel" in Int8Linear.why_not(layer)
    with pytest.raises(fastquant.FastquantError, match="per channel"):
        Int8Linear.pack(layer)
    layer.input_quant = None
    assert "not uniformly quantized" in Int8Linear.why_not(layer)


@pytest.fixture(scope="module")
def tiny_w8a8(tiny, tiny_data):
    model, _, _ = tiny
    calib, _ = tiny_data
    return fastquant.quantize(model, calib[:32], fastquant.QuantConfig(method="repq", w_bits=8, a_bits=8),
                              progress=False)


def test_convert_runs_every_linear_on_integers_and_keeps_accuracy(tiny_w8a8, tiny_data):
    q = tiny_w8a8
    _, test = tiny_data
    dep = convert(q)
    n_linear = sum(isinstance(m, QuantLinear) for m in q.modules())
    assert len(record_of(dep).deploy.converted) == n_linear and not record_of(dep).deploy.kept
    assert not any(isinstance(m, QuantLinear) for m in dep.modules())
    assert any(isinstance(m, QuantLinear) for m in q.modules())  # the original is untouched
    images = torch.stack([test[i][0] for i in range(200)])
    with torch.no_grad():
        ref, out = q(images), dep(images)
    # Float rounding can move an activation across a rounding boundary deep in the model,
    # so compare predictions and the typical logit difference rather than every element.
    assert (ref.argmax(1) == out.argmax(1)).float().mean() >= 0.98
    assert (out - ref).abs().median() <= 0.01 * ref.abs().max()
    acc_q = evaluate(q, test, 500, 100, progress=False)
    acc_d = evaluate(dep, test, 500, 100, progress=False)
    assert abs(acc_q - acc_d) <= 1.0


@pytest.mark.parametrize("backend,match", [("gpu", "unknown backend"), ("triton", "needs the model on a CUDA"),
                                           ("cuda", "needs the model on a CUDA")])
def test_convert_bad_backend(tiny_w8a8, backend, match):
    with pytest.raises(fastquant.FastquantError, match=match):
        convert(tiny_w8a8, backend=backend)


def test_convert_needs_a_quantized_model(tiny):
    with pytest.raises(fastquant.FastquantError, match="fastquant.quantize"):
        convert(tiny[0])


def test_deployed_model_saves_and_loads_as_integers(tiny, tiny_data, tmp_path):
    model, _, _ = tiny
    calib, test = tiny_data
    q = fastquant.quantize(model, calib[:32], fastquant.QuantConfig(method="rtn", w_bits=4, a_bits=8), progress=False)
    dep = convert(q)
    path = tmp_path / "dep.safetensors"
    fastquant.save(dep, path)
    loaded = fastquant.load(path)
    assert record_of(loaded).deploy.converted == record_of(dep).deploy.converted
    for name in record_of(dep).deploy.converted:
        a, b = dep.get_submodule(name), loaded.get_submodule(name)
        assert isinstance(b, Int8Linear)
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    x, _ = test.batch(range(8))
    with torch.no_grad():
        assert torch.equal(loaded(x), dep(x))


@needs_gpu
def test_triton_deployment_on_gpu(tiny_w8a8, tiny_data):
    """convert(model.cuda(), 'triton') runs every linear layer on the Triton kernels and keeps
    the fake-quantized model's predictions."""
    import copy

    dep = convert(copy.deepcopy(tiny_w8a8).cuda(), "triton")
    assert all(m.backend == "triton" for m in dep.modules() if isinstance(m, Int8Linear))
    calib, _ = tiny_data
    x = calib[:16]
    with torch.no_grad():
        ref = tiny_w8a8(x)
        out = dep(x.cuda()).cpu()
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    assert (out - ref).abs().max() <= 1e-3 * ref.abs().max() + 1e-3


@pytest.mark.parametrize("softmax", ["log2", "log_sqrt2"])
def test_fused_attention_twin_equals_the_fake_quant_attention(tiny, tiny_data, softmax):
    """FusedQuantAttention on its PyTorch twin (integer Q K^T with the zero-point
    corrections, log codes, P' a_v) computes what the fake-quant attention computes, up to
    float rounding: this checks the contract the CUDA and Triton kernels implement, and
    the module's plumbing (qkv split, layout, projection)."""
    import copy

    from fastquant.deploy import fuse_attention
    from fastquant.nn import FusedQuantAttention

    model, _, _ = tiny
    calib, _ = tiny_data
    q = fastquant.quantize(model, calib[:32], fastquant.QuantConfig(method="rtn", w_bits=8, a_bits=8, softmax=softmax),
                           progress=False)
    fused = copy.deepcopy(q)
    names, unfused = fuse_attention(fused, "torch")
    assert len(names) == len(fused.blocks) and not unfused
    assert all(isinstance(fused.get_submodule(n), FusedQuantAttention) for n in names)
    x = calib[32:40]
    for block_q, block_f in zip(q.blocks, fused.blocks):  # attention by attention, same input
        h = torch.randn(4, 50, block_q.attn.qkv.in_features) * 0.5
        with torch.no_grad():
            ref, out = block_q.attn(h), block_f.attn(h)
        assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    with torch.no_grad():
        ref, out = q(x), fused(x)
    # Downstream quantizers can round a value differing in its last bit to the other side.
    assert (ref.argmax(1) == out.argmax(1)).all()
    assert (out - ref).abs().median() <= 1e-3 * ref.abs().max()


def test_why_not_fused_names_the_reason(tiny, tiny_data):
    from fastquant.nn import FusedQuantAttention

    model, _, _ = tiny
    calib, _ = tiny_data
    for cfg, backend, match in ((dict(softmax="uniform"), "triton", "uniformly quantized (the triton kernel"),
                                (dict(softmax="uniform"), "cpu", ""),
                                (dict(per_token=True, qk_per_head=False), "cpu", "fixed step")):
        q = fastquant.quantize(model, calib[:16], fastquant.QuantConfig(method="rtn", w_bits=8, a_bits=8, **cfg),
                               progress=False)
        reason = FusedQuantAttention.why_not(q.blocks[0].attn, backend)
        assert match in reason and (reason == "") == (match == "")


@needs_gpu
def test_triton_deployment_fuses_attention_on_gpu(tiny, tiny_data):
    """With a log-quantized softmax, convert(..., 'triton') also fuses every attention
    (kernels/attention.py) and keeps the fake-quantized model's predictions."""
    import copy

    from fastquant.nn import FusedQuantAttention

    model, _, _ = tiny
    calib, _ = tiny_data
    q = fastquant.quantize(model, calib[:32], fastquant.QuantConfig(method="rtn", w_bits=8, a_bits=8), progress=False)
    dep = convert(copy.deepcopy(q).cuda(), "triton")
    names = record_of(dep).deploy.fused_attention
    assert len(names) == len(dep.blocks) and all(isinstance(dep.get_submodule(n), FusedQuantAttention) for n in names)
    x = calib[32:64]
    with torch.no_grad():
        ref, out = q(x), dep(x.cuda()).cpu()
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    assert (out - ref).abs().median() <= 1e-2 * ref.abs().max()


def test_int8_linear_keeps_float32_scales_when_the_model_is_cast_to_half():
    """.half() casts activations, not the epilogue's constants (b_sum and col_add would not
    survive fp16); the half layer matches the float one up to the input's fp16 rounding."""
    import copy

    dep = Int8Linear.pack(_layer(8, 8, False, True))
    half = copy.deepcopy(dep).half()
    assert half.weight_t.dtype == torch.int8
    assert all(getattr(half, n).dtype == torch.float32 for n in Int8Linear._FLOAT32_BUFFERS
               if getattr(half, n) is not None)
    assert all(torch.equal(getattr(half, n), getattr(dep, n)) for n in ("b_sum", "col_add", "col_scale"))
    x = torch.randn(7, 96)
    with torch.no_grad():
        out = half(x.half())
        ref = dep(x.half().float())  # the same (fp16-rounded) input in float32
    assert out.dtype == torch.float16
    assert (out.float() - ref).abs().max() <= 2 ** -10 * ref.abs().max()
