"""ONNX export (fastquant.export_onnx, `fastquant export`): the QDQ graph runs in ONNX Runtime
and agrees with the fake-quantized model."""
import json

import numpy as np
import onnx
import pytest
import torch

import fastquant
from fastquant.cli import main
from fastquant.data import stack
from fastquant.deploy.export import ExportLog, cpu_saturates
from fastquant.nn import QuantConv2d, QuantLinear
from fastquant.quant.log import LogQuantizer

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (requirements.txt installs it)")

N_TEST = 400


@pytest.fixture(scope="module")
def models(tiny, tiny_data):
    model, _, _ = tiny
    calib, _ = tiny_data
    return {(m, w, a): fastquant.quantize(model, calib[:32], fastquant.QuantConfig(w_bits=w, a_bits=a, method=m))
            for m, w, a in (("repq", 8, 8), ("rtn", 4, 4))}


@pytest.fixture(scope="module")
def test_images(tiny_data):
    _, test = tiny_data
    x, y = stack(test, range(N_TEST))
    return x, y


def _run(path, x, fuse=True):
    """ONNX Runtime's output; ``fuse=False``: without its QDQ fusion into integer kernels (the
    graph's own arithmetic, in float)."""
    so = ort.SessionOptions()
    if not fuse:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"images": x.numpy()})[0]


def _logits(model, x):
    with torch.no_grad():
        return model(x).numpy()


@pytest.mark.parametrize("key,softmax,per_head,weights,least", [
    (("repq", 8, 8), "uint8", "tensor", "asymmetric", 0.99),   # the integer-kernel form
    (("repq", 8, 8), "uint8", "tensor", "symmetric", 0.97),  # symmetric weights: the correction is near-exact
    (("repq", 8, 8), "exact", "exact", "asymmetric", 0.995),
    (("repq", 8, 8), "uint8", "tensor", "unsigned", 0.99),
    (("repq", 8, 8), "exact", "exact", "unsigned", 0.995),
    (("rtn", 4, 4), "exact", "exact", "asymmetric", 0.995),    # log2 softmax and 4-bit codes, exactly
])
def test_onnxruntime_agrees_with_the_fake_quant_model(models, test_images, tmp_path, key, softmax, per_head, weights,
                                                       least):
    """ONNX Runtime with its integer kernels predicts as the fake-quant model does. Where its
    uint8 x int8 kernels saturate (x86 without VNNI, ``cpu_saturates``), 8-bit int8 weights
    are checked without the fusion (the graph itself); uint8 weights always with it."""
    q = models[key]
    x, _ = test_images
    path = tmp_path / "m.onnx"
    rep = fastquant.export_onnx(q, path, softmax=softmax, per_head=per_head, weights=weights)
    fuse = not (cpu_saturates() and key[1] == 8 and weights != "unsigned")
    got, want = _run(path, x, fuse), _logits(q, x)
    agree = float((got.argmax(1) == want.argmax(1)).mean())
    assert agree >= least, f"{key} {softmax}/{per_head}/{weights}: {agree:.4f} of predictions agree"
    n_layers = sum(isinstance(m, (QuantLinear, QuantConv2d)) for m in q.modules())
    assert len(rep.weights) == n_layers
    if softmax == "exact":  # every quantizer is QDQ or the same rounding in float operations: the logits
        assert not rep.approximated  # are equal to float rounding, except where an activation crossed a
        worst = np.abs(got - want).max(1) / np.abs(want).max()  # rounding boundary upstream
        assert np.median(worst) < 1e-5, f"median image: logits differ by {np.median(worst):.2e} of their range"
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


@pytest.mark.parametrize("form", ["asymmetric", "symmetric", "unsigned"])
def test_weights_are_integer_initializers_equal_to_the_codes(models, tmp_path, form):
    q = models[("rtn", 4, 4)]
    path = tmp_path / "m.onnx"
    fastquant.export_onnx(q, path, weights=form)
    g = onnx.load(str(path)).graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in g.initializer}
    dq = {n.input[0]: n for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
          and inits[n.input[0]].dtype == (np.uint8 if form == "unsigned" else np.int8)}
    layer = q.blocks[0].mlp.fc1
    want = layer.weight_quant(layer.weight).detach().numpy()
    codes = next(n for n in dq if n.startswith("blocks.0.mlp.fc1"))
    node = dq[codes]
    scale, zp = inits[node.input[1]], inits[node.input[2]]
    got = (inits[codes].astype(np.float32) - zp[:, None]) * scale[:, None]
    if form == "symmetric":  # below 8 bits the code minus the zero point, exact
        assert (zp == 0).all() and inits[codes].min() >= -15 and inits[codes].max() <= 15
    elif form == "unsigned":  # fastquant's own codes 0 .. 15 and zero points
        assert inits[codes].max() <= 15 and (zp != 0).any()
    else:  # the codes and zero points moved down by 8
        assert inits[codes].min() >= -8 and inits[codes].max() <= 7 and (zp != 0).any()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())


def test_8bit_symmetric_weights_with_the_zero_point_correction(models):
    """At 8 bits the codes move down by 128 and the layer adds s (128 - z) times its input's
    row sum: with an unquantized input (no input quantizer), the same layer as the fake-quant
    one to float rounding."""
    from fastquant.deploy.export import ExportLinear

    q = models[("repq", 8, 8)]
    layer = q.blocks[1].mlp.fc1
    ex = ExportLinear(layer, None)
    assert (ex.zero_point == 0).all() and ex.correction is not None  # some zero point is not 128
    x = torch.randn(2, 7, layer.in_features)
    with torch.no_grad():
        want = torch.nn.functional.linear(x, layer.weight_quant(layer.weight), layer.bias)
        got = ex(x)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("base", ["2", "sqrt2"])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_log_threshold_table_equals_the_log_quantizer(base, bits):
    q = LogQuantizer(bits, base)
    q.scale.fill_(0.7)
    q.mode = "quant"
    g = torch.Generator().manual_seed(bits)
    p = torch.cat([torch.rand(50000, generator=g), torch.rand(50000, generator=g) ** 8,
                   torch.tensor([0.7, 1.0])])
    if bits < 8:  # at 8 bits the levels reach below 1e-30 of the scale, where neither is specified
        p = torch.cat([p, torch.rand(100, generator=g) * 1e-35, torch.zeros(1)])
    else:
        p = p[p > 1e-28]
    levels = q.levels()
    mids = (levels[:-2] + levels[1:-1]) / 2
    # just above and below the switches (at a switch itself float rounding decides either way)
    mids = mids[mids > 1e-29]  # (below 1e-30 of the scale both take the value as 1e-30 of it)
    up, down = mids * (1 + 2 ** -20), mids * (1 - 2 ** -20)
    p = torch.cat([p, up, down])
    assert torch.equal(ExportLog(q)(p), q(p))


def test_bad_arguments_are_refused_and_nothing_is_written(models, tiny, tmp_path):
    q = models[("repq", 8, 8)]
    path = tmp_path / "m.onnx"
    for kw, words in (({"softmax": "log"}, "softmax"), ({"per_head": "head"}, "per_head"), ({"opset": 11}, "opset"),
                      ({"weights": "int4"}, "weights")):
        with pytest.raises(fastquant.FastquantError, match=words):
            fastquant.export_onnx(q, path, **kw)
    with pytest.raises(fastquant.FastquantError, match="fastquant.quantize"):
        fastquant.export_onnx(tiny[0], path)
    with pytest.raises(fastquant.FastquantError, match="before fastquant.convert"):
        fastquant.export_onnx(fastquant.convert(q, "torch"), path)
    with pytest.raises(fastquant.FastquantError, match="folder"):
        fastquant.export_onnx(q, tmp_path / "missing" / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_cli_export(models, tmp_path, capsys):
    saved = tmp_path / "q.safetensors"
    fastquant.save(models[("repq", 8, 8)], saved)
    out, js = tmp_path / "q.onnx", tmp_path / "q.json"
    assert main(["export", "--quantized", str(saved), "--onnx", str(out), "--json", str(js)]) == 0
    rec = json.loads(js.read_text())
    assert rec["path"] == str(out) and len(rec["weights"]) > 0 and out.is_file()
    capsys.readouterr()
    assert main(["export", "--quantized", str(saved), "--onnx", str(out), "--softmax", "log"]) == 2
    assert main(["export", "--quantized", str(tmp_path / "none.safetensors"), "--onnx", str(tmp_path / "n.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith(("error:", "usage:")) or "fastquant export" in line for line in err)
    assert not (tmp_path / "n.onnx").exists()


@pytest.mark.parametrize("saturates", [True, False])
def test_cli_export_notes_where_int8_kernels_saturate(models, tmp_path, capsys, monkeypatch, saturates):
    """On a CPU without VNNI an 8-bit model's int8 export gets a one-line note naming
    --weights unsigned; the unsigned export, or a CPU with VNNI, gets none."""
    import fastquant.deploy.export as export

    monkeypatch.setattr(export, "cpu_saturates", lambda: saturates)
    saved = tmp_path / "q.safetensors"
    fastquant.save(models[("repq", 8, 8)], saved)
    capsys.readouterr()
    assert main(["export", "--quantized", str(saved), "--onnx", str(tmp_path / "a.onnx")]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == (1 if saturates else 0) and all("--weights unsigned" in n for n in notes)
    assert main(["export", "--quantized", str(saved), "--onnx", str(tmp_path / "u.onnx"), "--weights", "unsigned"]) == 0
    assert not [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
