"""fc2 smoothing (``QuantConfig.fc2_smooth``): every MLP's fc2 divides its input per channel
and holds W diag(d); the float model is unchanged, the divided input's channel ranges are
equalised, and the layer saves, loads and deploys like any other."""
import json

import pytest
import torch

import fastquant
from fastquant.nn import Int8Linear, QuantLinear
from fastquant.quant import quantizers_in, quantizers_off


@pytest.fixture(scope="module")
def smoothed(tiny, tiny_data):
    model, _, _ = tiny
    calib, test = tiny_data
    cfg = fastquant.QuantConfig(method="rtn", w_bits=4, a_bits=4, fc2_smooth=1.0)
    q = fastquant.quantize(model, calib[:32], cfg, progress=False)
    x, _ = test.batch(range(16))
    return model, q, calib[:32], x


def fc2s(q):
    return [b.mlp.fc2 for b in q.blocks]


def test_only_fc2_divides_and_the_float_model_is_unchanged(smoothed):
    model, q, _, x = smoothed
    assert all(isinstance(m, QuantLinear) and m.input_div is not None for m in fc2s(q))
    others = [m for m in q.modules() if isinstance(m, QuantLinear) and m not in fc2s(q)]
    assert others and all(m.input_div is None for m in others)
    with torch.no_grad(), quantizers_off(quantizers_in(q)):
        ref = model(x)
        assert (q(x) - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_alpha_one_equalises_the_input_ranges(smoothed):
    model, q, calib, _ = smoothed
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a: seen.__setitem__(mod, a[0].detach().abs().flatten(0, -2)
                                                                          .amax(0)))
             for m in fc2s(q)]
    with torch.no_grad(), quantizers_off(quantizers_in(q)):
        q(calib)
    for h in hooks:
        h.remove()
    for m in fc2s(q):
        raw = seen[m]
        divided = raw / m.input_div
        live = raw > 1e-5 * raw.max()
        assert divided[live].max() / divided[live].min() < 1.0001  # one range for every channel
        assert raw[live].max() / raw[live].min() > 2  # which the raw input did not have


def test_save_load_and_deploy(smoothed, tmp_path):
    _, q, _, x = smoothed
    fastquant.save(q, tmp_path / "q.safetensors")
    loaded = fastquant.load(tmp_path / "q.safetensors")
    d = fastquant.convert(q, "torch")
    layers = [m for m in d.modules() if isinstance(m, Int8Linear) and m.input_div is not None]
    assert len(layers) == len(q.blocks)
    fastquant.save(d, tmp_path / "d.safetensors")
    with torch.no_grad():
        ref = q(x)
        assert torch.equal(loaded(x), ref)
        assert (d(x) - ref).abs().max() <= 1e-4 * ref.abs().max()
        assert torch.equal(fastquant.load(tmp_path / "d.safetensors")(x), d(x))


def test_files_from_before_the_field_load_unsmoothed(tiny, tiny_data, tmp_path):
    """A config saved without fc2_smooth (or zero_point_search) means no smoothing (and the
    plain search), whatever the method's default."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model, _, _ = tiny
    q = fastquant.quantize(model, tiny_data[0][:16], fastquant.QuantConfig(method="rtn", w_bits=8, a_bits=8),
                           progress=False)
    fastquant.save(q, tmp_path / "new.safetensors")
    with safe_open(str(tmp_path / "new.safetensors"), framework="pt") as f:
        meta = dict(f.metadata())
    cfg = json.loads(meta["config"])
    del cfg["fc2_smooth"], cfg["zero_point_search"]
    meta["config"] = json.dumps(cfg)
    del meta["sha256"]  # files from before the field had no checksums either
    save_file(load_file(str(tmp_path / "new.safetensors")), str(tmp_path / "old.safetensors"), metadata=meta)
    old = fastquant.load(tmp_path / "old.safetensors")
    assert fastquant.record_of(old).config.fc2_smooth == 0.0
    assert fastquant.record_of(old).config.zero_point_search is False
    x, _ = tiny_data[1].batch(range(8))
    with torch.no_grad():
        assert torch.equal(old(x), q(x))


@pytest.mark.parametrize("value", [-0.1, 1.5, "1", True, float("nan")])
def test_bad_alpha(value):
    with pytest.raises(fastquant.FastquantError, match="fc2_smooth must be a number in \\[0, 1\\]"):
        fastquant.QuantConfig(fc2_smooth=value)
