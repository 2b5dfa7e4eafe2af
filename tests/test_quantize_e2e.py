import pytest
import torch

import fastquant
from fastquant.evaluate import evaluate

N_EVAL = 500


@pytest.fixture(scope="module")
def fp_top1(tiny, tiny_data):
    model, _, _ = tiny
    return evaluate(model, tiny_data[1], N_EVAL, progress=False)


def test_vit_tiny_is_a_real_classifier(fp_top1):
    assert fp_top1 > 80.0


@pytest.mark.parametrize("method", ["rtn", "repq"])
def test_w8a8_keeps_accuracy(tiny, tiny_data, fp_top1, method):
    model, _, _ = tiny
    calib, test = tiny_data
    q = fastquant.quantize(model, calib, fastquant.QuantConfig(w_bits=8, a_bits=8, method=method), progress=False)
    assert abs(evaluate(q, test, N_EVAL, progress=False) - fp_top1) <= 1.0
    # The float model is untouched (quantize works on a copy by default).
    assert not any(type(m).__name__.startswith("Quant") for m in model.modules())


def test_w4a4_runs_and_degrades_gracefully(tiny, tiny_data, fp_top1):
    model, _, _ = tiny
    calib, test = tiny_data
    q = fastquant.quantize(model, calib, fastquant.QuantConfig(w_bits=4, a_bits=4, method="repq"), progress=False)
    acc = evaluate(q, test, N_EVAL, progress=False)
    assert fp_top1 - 15 < acc <= fp_top1 + 2


def test_calibration_accepts_batches_and_is_deterministic(tiny, tiny_data):
    model, _, _ = tiny
    calib, test = tiny_data
    cfg = fastquant.QuantConfig(w_bits=6, a_bits=6, method="repq", calib_batch_size=16)
    a = fastquant.quantize(model, calib, cfg, progress=False)
    b = fastquant.quantize(model, [(calib[i:i + 16], None) for i in range(0, len(calib), 16)], cfg, progress=False)
    x, _ = test.batch(range(8))
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_bad_calibration_data(tiny):
    model, _, _ = tiny
    x = torch.randn(4, 3, 28, 28)
    x[1, 0, 0, 0] = float("nan")
    with pytest.raises(fastquant.FastquantError, match="NaN or Inf"):
        fastquant.quantize(model, x, progress=False)
    with pytest.raises(fastquant.FastquantError, match="empty"):
        fastquant.quantize(model, torch.empty(0, 3, 28, 28), progress=False)
    with pytest.raises(fastquant.FastquantError, match="empty"):
        fastquant.quantize(model, [], progress=False)


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="gptq"), "unknown method"),
    (dict(w_bits=9), "w_bits must be an integer from 2 to 8"),
    (dict(a_bits=1), "a_bits must be an integer from 2 to 8"),
    (dict(calib="kl"), "unknown calibration"),
    (dict(softmax="exp"), "unknown softmax"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(fastquant.FastquantError, match=match):
        fastquant.QuantConfig(**kwargs)


def test_dinov2_backbone_and_head():
    """The converted DINOv2 backbone with the committed head is a good classifier."""
    from fastquant.data import load_dataset
    from fastquant.models import load_model

    model, dcfg, spec = load_model("dinov2-s14-fmnist")
    assert spec.img_size == 112 and model.backbone.pos_embed.shape == (1, 65, 384)
    test = load_dataset("fmnist", "test", dcfg)
    assert evaluate(model, test, 100, progress=False) >= 80.0
