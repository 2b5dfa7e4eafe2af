import pytest
import torch

from fastquant import FastquantError
from fastquant.quant import LogQuantizer, UniformQuantizer, fake_quant_uniform


def calibrated(q, x):
    q.start_observing()
    q(x)
    q.finish_observing()
    return q


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_minmax_per_tensor_grid(bits):
    x = torch.linspace(-1.0, 3.0, 1001)
    q = calibrated(UniformQuantizer(bits), x)
    qmax = 2**bits - 1
    assert torch.allclose(q.scale, torch.tensor(4.0 / qmax))
    assert q.zero_point.item() == round(1.0 / (4.0 / qmax))
    codes = q.quantize(x)
    assert codes.min().item() == 0 and codes.max().item() == qmax
    # Fake quantization is dequantize(quantize(x)) and lands on at most 2**bits values.
    assert torch.equal(q(x), q.dequantize(codes))
    assert q(x).unique().numel() <= 2**bits
    # Error within half a step inside the range.
    assert (q(x) - x).abs().max() <= q.scale / 2 + 1e-6


def test_range_includes_zero_and_zero_is_exact():
    x = torch.rand(100) + 2.0  # all positive
    q = calibrated(UniformQuantizer(4), x)
    assert q(torch.zeros(3)).abs().max() == 0


def test_per_channel_weight_scales():
    w = torch.randn(6, 10) * torch.arange(1, 7)[:, None]
    q = UniformQuantizer(4, (6, 1))
    q.calibrate_tensor(w)
    lo, hi = w.amin(1).clamp_max(0), w.amax(1).clamp_min(0)
    assert torch.allclose(q.scale.squeeze(1), (hi - lo) / 15)


def test_per_head_scale_shape_and_reduction():
    x = torch.randn(2, 3, 5, 4) * torch.tensor([1.0, 10.0, 100.0])[None, :, None, None]
    q = calibrated(UniformQuantizer(8, (1, 3, 1, 1)), x)
    amax = x.abs().amax(dim=(0, 2, 3))
    assert (q.scale.flatten() < amax / 50).all() and (q.scale.flatten() > amax / 300).all()
    with pytest.raises(FastquantError, match="does not fit"):
        q.observe(torch.randn(2, 4, 5, 4))


def test_per_token_is_dynamic():
    q = UniformQuantizer(8, (), per_token=True)
    q.mode = "quant"
    x = torch.randn(4, 16) * torch.tensor([1.0, 10.0, 100.0, 1000.0])[:, None]
    err = (q(x) - x).abs().amax(1) / x.abs().amax(1)
    assert (err < 0.01).all()


def test_mse_search_never_worse_than_minmax():
    x = torch.randn(50000)
    x[:10] *= 40  # outliers
    mm = calibrated(UniformQuantizer(4, method="minmax"), x)
    mse = calibrated(UniformQuantizer(4, method="mse"), x)
    assert ((mse(x) - x) ** 2).mean() < ((mm(x) - x) ** 2).mean()


def test_percentile_clips_outliers():
    x = torch.randn(100000)
    x[0] = 1000.0
    q = calibrated(UniformQuantizer(8, method="percentile", percentile=99.9), x)
    assert q.scale.item() * 255 < 20


def test_straight_through_gradient():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, generator=g).requires_grad_()
    y = fake_quant_uniform(x * 0.5, torch.tensor(0.1), torch.tensor(8.0), 15)
    y.sum().backward()
    # The gradient passes where the rounded code lies on the grid, and is zero where it is clipped.
    code = torch.round(x.detach() * 0.5 / 0.1) + 8
    inside = (code >= 0) & (code <= 15)
    assert inside.any() and (~inside).any()
    assert torch.allclose(x.grad[inside], torch.full_like(x.grad[inside], 0.5))
    assert (x.grad[~inside] == 0).all()


@pytest.mark.parametrize("bits", [1, 9, 0, 3.5])
def test_bad_bits(bits):
    with pytest.raises(FastquantError, match="2 to 8"):
        UniformQuantizer(bits)


@pytest.mark.parametrize("base,k", [("2", 1), ("sqrt2", 2)])
def test_log_quantizer_levels(base, k):
    q = LogQuantizer(4, base)
    calibrated(q, torch.tensor([0.0, 0.25, 1.0]))
    levels = 2.0 ** (-torch.arange(15) / k)
    # Exact levels map to themselves, zero stays zero.
    assert torch.allclose(q(levels), levels)
    assert q(torch.zeros(4)).abs().max() == 0
    # Codes: 0..14 are levels, 15 is zero.
    assert q.quantize(torch.tensor([1.0, 0.0])).tolist() == [0, 15]
    # Rounding is to the nearest level in value.
    a, b = levels[3].item(), levels[4].item()
    assert q(torch.tensor([b + 0.49 * (a - b)])).item() == pytest.approx(b)
    assert q(torch.tensor([b + 0.51 * (a - b)])).item() == pytest.approx(a)
    # Far below the smallest level: zero.
    assert q(torch.tensor([levels[-1].item() * 0.3])).item() == 0.0


def test_quantizer_state_in_state_dict():
    q = calibrated(UniformQuantizer(4, (3,)), torch.randn(10, 3))
    sd = q.state_dict()
    assert set(sd) == {"scale", "zero_point"}
    q2 = UniformQuantizer(4, (3,))
    q2.load_state_dict(sd)
    q2.mode = "quant"
    x = torch.randn(5, 3)
    assert torch.equal(q(x), q2(x))


def test_no_calibration_data():
    q = UniformQuantizer(4)
    q.start_observing()
    with pytest.raises(FastquantError, match="no calibration data"):
        q.finish_observing()


def test_nan_in_observation():
    q = UniformQuantizer(4)
    q.start_observing()
    with pytest.raises(FastquantError, match="NaN or Inf"):
        q(torch.tensor([1.0, float("nan")]))


def test_zero_point_search_keeps_the_negative_side_of_a_gelu_output():
    """A post-GELU input: most values in [-0.17, 2], a few outliers at 8. Scaling both ends of
    the range alike rounds the zero point to 0 and clips every negative value (an error of
    one sign); with keep_min the search finds a zero point that keeps them, at a lower error."""
    torch.manual_seed(0)
    x = torch.nn.functional.gelu(torch.randn(4096, 64) * 0.8)
    x[:8, 0] = 8.0
    plain = calibrated(UniformQuantizer(4, method="mse"), x)
    kept = calibrated(UniformQuantizer(4, method="mse", keep_min=True), x)
    assert plain.zero_point.item() == 0 and kept.zero_point.item() >= 1
    err_plain, err_kept = (plain(x) - x), (kept(x) - x)
    assert err_kept.pow(2).mean() < 0.5 * err_plain.pow(2).mean()
    assert err_kept.mean().abs() < 0.2 * err_plain.mean().abs()  # the one-signed part
    # A range that is all positive, or a search that is not MSE, is unchanged by it.
    y = x.clamp_min(0) + 0.5
    assert torch.equal(calibrated(UniformQuantizer(4, method="mse"), y).zero_point,
                       calibrated(UniformQuantizer(4, method="mse", keep_min=True), y).zero_point)
    for method in ("minmax", "percentile"):
        a = calibrated(UniformQuantizer(4, method=method), x)
        b = calibrated(UniformQuantizer(4, method=method, keep_min=True), x)
        assert torch.equal(a.scale, b.scale) and torch.equal(a.zero_point, b.zero_point)


def test_zero_point_search_defaults():
    """repq and the reconstruction methods search the zero point; rtn (min/max) has no search."""
    import fastquant

    assert fastquant.QuantConfig(method="repq").resolved("zero_point_search") is True
    assert fastquant.QuantConfig(method="brecq").resolved("zero_point_search") is True
    assert fastquant.QuantConfig(method="rtn").resolved("zero_point_search") is False
    assert fastquant.QuantConfig(method="pfcr", zero_point_search=False).resolved("zero_point_search") is False
    with pytest.raises(FastquantError, match="zero_point_search must be True, False or None"):
        fastquant.QuantConfig(zero_point_search=1)


def test_only_activation_quantizers_search_the_zero_point(tiny, tiny_data):
    """Weights keep the plain search: only activation quantizers get keep_min."""
    import fastquant

    model, _, _ = tiny
    q = fastquant.quantize(model, tiny_data[0][:16], fastquant.QuantConfig(method="repq", w_bits=4, a_bits=4),
                           progress=False)
    uniform = {n: m for n, m in q.named_modules() if isinstance(m, UniformQuantizer)}
    assert uniform and all(m.keep_min == (not n.endswith("weight_quant")) for n, m in uniform.items())
