import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastquant
from fastquant._compat import import_timm
from fastquant.nn import QuantAttention, QuantConv2d, QuantLinear, QuantMatMul, QuantWindowAttention
from fastquant.quant import quantizers_in, set_mode

timm = import_timm()
from timm.models.swin_transformer import SwinTransformer  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402


def small_vit(**kw):
    args = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5)
    args.update(kw)
    torch.manual_seed(0)
    return VisionTransformer(**args).eval()


def small_swin():
    torch.manual_seed(0)
    return SwinTransformer(img_size=56, patch_size=4, window_size=7, embed_dim=24, depths=(2, 2),
                           num_heads=(2, 4), num_classes=5).eval()


def count(model, cls):
    return sum(isinstance(m, cls) for m in model.modules())


@pytest.mark.parametrize("builder,attn_cls,x_shape", [
    (small_vit, QuantAttention, (4, 3, 32, 32)),
    (lambda: small_vit(init_values=1e-2, embed_dim=60, num_heads=5), QuantAttention, (3, 3, 32, 32)),  # LayerScale, head dim 12
    (small_swin, QuantWindowAttention, (2, 3, 56, 56)),  # relative position bias and shifted-window mask
])
def test_swap_keeps_float_function(builder, attn_cls, x_shape):
    model = builder()
    x = torch.randn(x_shape)
    with torch.no_grad():
        ref = model(x)
    n_attn = count(model, (timm.layers.attention.Attention, timm.models.swin_transformer.WindowAttention))
    n_linear = count(model, nn.Linear)
    q = fastquant.quantize(model, x, fastquant.QuantConfig(w_bits=8, a_bits=8, method="rtn"), progress=False)
    # Every Linear, the patch embedding and both attention matmuls are quantized.
    assert count(q, attn_cls) == n_attn
    assert count(q, QuantLinear) == n_linear and count(q, nn.Linear) == 0
    assert count(q, QuantConv2d) == 1
    assert count(q, QuantMatMul) == 2 * n_attn
    set_mode(quantizers_in(q), "off")
    with torch.no_grad():
        assert torch.allclose(q(x), ref, atol=1e-5, rtol=1e-4)
    set_mode(quantizers_in(q), "quant")
    with torch.no_grad():
        out = q(x)
    assert not torch.allclose(out, ref)  # quantization does something
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    assert cos > 0.99


def test_forward_signature_kept():
    model = small_vit()
    x = torch.randn(2, 3, 32, 32)
    q = fastquant.quantize(model, x, fastquant.QuantConfig(method="rtn"), progress=False)
    attn = q.blocks[0].attn
    tokens = torch.randn(2, 17, 48)
    mask = torch.ones(17, 17, dtype=torch.bool).tril()
    set_mode(quantizers_in(q), "off")
    ref_attn = model.blocks[0].attn
    ref_attn.fused_attn = False
    with torch.no_grad():
        assert torch.allclose(attn(tokens, attn_mask=mask), ref_attn(tokens, attn_mask=mask), atol=1e-5)
        assert torch.allclose(attn(tokens, is_causal=True), ref_attn(tokens, attn_mask=mask), atol=1e-5)


def test_layer_policy():
    model = small_vit()
    x = torch.randn(4, 3, 32, 32)
    q = fastquant.quantize(model, x, fastquant.QuantConfig(w_bits=4, a_bits=4, method="rtn"), progress=False)
    pe = q.patch_embed.proj
    assert pe.input_quant.bits == 8 and pe.weight_quant.bits == 4
    assert q.head.weight_quant.bits == 4 and q.head.input_quant.bits == 4
    assert q.blocks[0].attn.matmul_qk.a_quant.scale.shape == (1, 3, 1, 1)
    q2 = fastquant.quantize(model, x, fastquant.QuantConfig(w_bits=4, a_bits=4, method="rtn", head_w_bits=8,
                                                            head_a_bits=8, patch_embed_a_bits=6), progress=False)
    assert q2.head.weight_quant.bits == 8 and q2.patch_embed.proj.input_quant.bits == 6


def test_reparam_is_exact_in_float_and_per_tensor_after():
    model = small_vit(init_values=0.5)
    # Make post-LayerNorm channels very uneven, as in real ViTs.
    with torch.no_grad():
        for blk in model.blocks:
            blk.norm1.weight.mul_(torch.logspace(-1, 1.5, 48))
            blk.norm1.bias.add_(torch.linspace(-2, 2, 48))
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    # Nearest rounding everywhere keeps the float weights, so with the quantizers off the
    # model is the float one.
    cfg = fastquant.QuantConfig(w_bits=8, a_bits=4, method="repq", bias_correct=False, weight_rounding="nearest",
                                edge_rounding="nearest")
    q = fastquant.quantize(model, x, cfg, progress=False)
    # qkv and fc1 take LayerNorm outputs: the LayerNorms were rewritten and their
    # input quantizers ended per tensor.
    for blk, ref_blk in zip(q.blocks, model.blocks):
        assert not torch.allclose(blk.norm1.weight, ref_blk.norm1.weight)
        assert not torch.allclose(blk.norm2.bias, ref_blk.norm2.bias)
        assert blk.attn.qkv.input_quant.scale.dim() == 0
        assert blk.mlp.fc1.input_quant.scale.dim() == 0
    set_mode(quantizers_in(q), "off")
    with torch.no_grad():
        assert torch.allclose(q(x), ref, atol=1e-4, rtol=1e-4)


def test_reparam_matches_per_channel_quantization():
    """Per-tensor quantization after reparameterisation == per-channel before it."""
    from fastquant.calib import reparameterize
    from fastquant.quant import UniformQuantizer

    torch.manual_seed(1)
    ln = nn.LayerNorm(16)
    with torch.no_grad():
        ln.weight.copy_(torch.logspace(-1, 1, 16))
        ln.bias.copy_(torch.linspace(-1, 1, 16))
    lin = nn.Linear(16, 8)
    x = torch.randn(64, 16)
    wq = UniformQuantizer(8, (8, 1))
    wq.mode = "off"
    ql = QuantLinear(copy.deepcopy(lin), wq, UniformQuantizer(4, (16,)))
    ql.input_quant.start_observing()
    ql(ln(x))
    ql.input_quant.finish_observing()
    with torch.no_grad():
        per_channel = ql(ln(x))
        ln2 = copy.deepcopy(ln)
        reparameterize(ln2, [(ql, None)])
        assert ql.input_quant.scale.dim() == 0
        per_tensor = ql(ln2(x))
    assert torch.allclose(per_tensor, per_channel, atol=1e-4)


def test_probe_head_reparam_through_token_pooling():
    """A probe's head reads [class token, mean token] of the final LayerNorm: its
    per-channel input scales fold into that LayerNorm too, exactly in float."""
    from fastquant.models.probe import LinearProbe

    torch.manual_seed(0)
    backbone = small_vit(num_classes=0, init_values=0.5)
    with torch.no_grad():
        backbone.norm.weight.mul_(torch.logspace(-1, 1.5, 48))
    model = LinearProbe(backbone, 4).eval()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    q = fastquant.quantize(model, x, fastquant.QuantConfig(w_bits=8, a_bits=8, method="repq", bias_correct=False,
                                                           weight_rounding="nearest", edge_rounding="nearest"),
                           progress=False)
    assert q.head.input_quant.scale.dim() == 0
    assert not torch.equal(q.backbone.norm.weight, model.backbone.norm.weight)
    set_mode(quantizers_in(q), "off")
    with torch.no_grad():
        assert torch.allclose(q(x), ref, atol=1e-4, rtol=1e-4)


def test_bias_correction_removes_the_mean_output_shift():
    """After bias correction a layer's mean output on the calibration images, with
    quantized weight and input, equals the float layer's (float inputs)."""
    model = small_vit(init_values=0.5)
    x = torch.randn(8, 3, 32, 32)
    # Nearest rounding keeps the float weights, so both copies see the same float inputs.
    plain = fastquant.quantize(model, x, fastquant.QuantConfig(w_bits=4, a_bits=4, bias_correct=False,
                                                               weight_rounding="nearest", edge_rounding="nearest"),
                               progress=False)
    q = fastquant.quantize(model, x, fastquant.QuantConfig(w_bits=4, a_bits=4, weight_rounding="nearest",
                                                           edge_rounding="nearest"), progress=False)
    assert fastquant.record_of(q).config.resolved("bias_correct")
    for name in ("blocks.0.mlp.fc2", "blocks.1.attn.proj"):
        layer, ref = q.get_submodule(name), plain.get_submodule(name)
        # The float inputs, taken from the uncorrected copy (q's upstream biases moved).
        inputs = []
        h = ref.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach()))
        set_mode(quantizers_in(plain), "off")
        with torch.no_grad():
            plain(x)
        h.remove()
        set_mode(quantizers_in(plain), "quant")
        xin = torch.cat(inputs).reshape(-1, layer.in_features)
        with torch.no_grad():
            float_layer = model.get_submodule(name)
            y_fp = F.linear(xin, float_layer.weight, float_layer.bias).mean(0)
            y_q = layer(xin).mean(0)
            y_plain = ref(xin).mean(0)
        assert torch.allclose(y_q, y_fp, atol=2e-5), name
        assert (y_plain - y_fp).abs().max() > 5e-4, name  # there was a shift to remove


def test_gptq_rounding_lowers_the_output_error():
    """GPTQ picks grid points (same codes as the quantizer gives them) whose output
    error on inputs with the given second moment is below round-to-nearest's."""
    from fastquant.calib import gptq_round, round_to_grid
    from fastquant.quant import UniformQuantizer

    g = torch.Generator().manual_seed(0)
    mix = torch.randn(32, 32, generator=g)
    x = torch.randn(2048, 32, generator=g) @ mix  # correlated input channels
    w = torch.randn(16, 32, generator=g)
    wq = UniformQuantizer(3, (16, 1), method="minmax")
    wq.calibrate_tensor(w)
    near = round_to_grid(w, wq)
    opt = gptq_round(w, wq, x.t() @ x / len(x))
    assert torch.equal(wq(opt), opt)  # on the grid: the quantizer keeps it
    assert not torch.equal(opt, near)
    err = lambda q: (x @ (q - w).t()).pow(2).mean()
    assert err(opt) < 0.7 * err(near)
    # The compensated weights (each column as GPTQ rounded it) round to GPTQ's choice.
    again, before = gptq_round(w, wq, x.t() @ x / len(x), compensated=True)
    assert torch.equal(again, opt) and torch.equal(round_to_grid(before, wq), opt)
    assert torch.equal(before[:, 0], w[:, 0]) and not torch.allclose(before, w, atol=1e-3)


def test_conv_patches_are_what_the_weight_multiplies():
    """A convolution's output is its input patches times the flattened weight, so GPTQ can
    treat the patch embedding as a Linear over patches."""
    from fastquant.nn.observe import conv_patches

    model = small_vit()
    q = fastquant.quantize(model, torch.randn(4, 3, 32, 32), fastquant.QuantConfig(w_bits=8, a_bits=8, method="rtn"),
                           progress=False)
    conv = q.patch_embed.proj
    x = torch.randn(2, 3, 32, 32)
    rows = conv_patches(conv, x)
    ref = F.conv2d(x, conv.weight, None, conv.stride, conv.padding)  # [N, O, h, w]
    got = (rows @ conv.weight.reshape(conv.out_channels, -1).t()).reshape(2, -1, conv.out_channels)
    assert torch.allclose(got, ref.flatten(2).transpose(1, 2), atol=1e-5)


def test_edge_rounding_gptq_lowers_the_patch_embedding_error():
    """edge_rounding="gptq" rounds the patch embedding (and the classifier) with GPTQ while
    the blocks keep round-to-nearest: the embedding's weights stay on their grid, its output
    error on the calibration images falls below nearest rounding's, and the blocks' weights
    are the same float weights as with nearest edge rounding."""
    from fastquant.calib import edge_layers

    model = small_vit()
    g = torch.Generator().manual_seed(0)
    # Smooth, correlated images (as real ones are): upsampled low-resolution noise.
    x = F.interpolate(torch.randn(32, 3, 8, 8, generator=g), size=32, mode="bilinear", align_corners=False)
    cfg = dict(w_bits=4, a_bits=8, method="repq", weight_rounding="nearest", bias_correct=False)
    near = fastquant.quantize(model, x, fastquant.QuantConfig(edge_rounding="nearest", **cfg), progress=False)
    gptq = fastquant.quantize(model, x, fastquant.QuantConfig(**cfg), progress=False)
    assert fastquant.record_of(gptq).config.resolved("edge_rounding") == "gptq"
    assert edge_layers(gptq) == {gptq.patch_embed.proj, gptq.head}
    conv = gptq.patch_embed.proj
    assert torch.equal(conv.weight_quant(conv.weight), conv.weight)  # on the grid
    assert not torch.equal(conv.weight, near.patch_embed.proj.weight)
    assert not torch.equal(gptq.head.weight, near.head.weight)
    assert torch.equal(gptq.blocks[0].mlp.fc1.weight, near.blocks[0].mlp.fc1.weight)
    fconv = model.patch_embed.proj
    with torch.no_grad():
        ref = fconv(x)
        err = lambda q: float((q.patch_embed.proj(x) - ref).pow(2).mean())
        assert err(gptq) < 0.7 * err(near)


def test_edge_rounding_is_checked():
    with pytest.raises(fastquant.FastquantError, match="unknown edge rounding 'best'"):
        fastquant.QuantConfig(edge_rounding="best")
    assert fastquant.QuantConfig(method="rtn").resolved("edge_rounding") == "nearest"
    assert fastquant.QuantConfig(method="pfcr").resolved("edge_rounding") == "gptq"
